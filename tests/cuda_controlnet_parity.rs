//! ControlNets on the GPU (`tests/data/controlnet`): one forward of the SDXL-embedding net (image at
//! 8× the latent) in f32 and f16 against diffusers' residuals; the 4-step pipeline run with a
//! 0.2–0.8 window against diffusers' latents; and a 10-step run with CUDA graphs (the window's
//! steps captured together with the UNet and replayed) against the same run on the CPU. Ignored by
//! default (needs a GPU): `cargo test --release --features cuda --test cuda_controlnet_parity -- --ignored`.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use pcpp_comm::{LocalTransport, Transport, TransportOptions};
use pcpp_core::{ParallelConfig, PatchRuntime, SerialFactory, StepCtx};
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::scheduler::SchedulerKind;
use pcpp_sdxl::{
    ControlGuidance, ControlInput, ControlNet, DenoiseParams, Generator, ImageJob, LoadOptions,
    MicroCond, UNetCond,
};
use pcpp_tests::{data, refs, rel_err, tiny_model, TOL_PIPELINE};

const GPU: Device = Device::Cuda(0);

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

#[test]
#[ignore = "needs a CUDA GPU"]
fn one_forward_on_the_gpu_matches_diffusers() {
    let r = refs("controlnet/refs.safetensors");
    for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::F16, 2e-2)] {
        let net = ControlNet::load(
            &data("controlnet/controlnet_px8"),
            dtype,
            GPU,
            &SerialFactory,
            0,
        )
        .unwrap();
        let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(GPU).unwrap();
        let cond = UNetCond::new(
            on(&r["fwd.encoder_hidden_states"]),
            Some(on(&r["fwd.text_embeds"])),
            Some(on(&r["fwd.time_ids"])),
        );
        let ts = r["fwd.timestep"].to_device(GPU).unwrap();
        let out = net
            .forward(
                &StepCtx::serial(),
                &on(&r["fwd.sample"]),
                &ts,
                &cond,
                &on(&r["fwd.controlnet_cond"]),
                0.7,
                None,
            )
            .unwrap();
        let host = |t: &Tensor| {
            t.to_device(Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        for (k, d) in out.down.iter().enumerate() {
            let e = rel_err(&host(d), &r[&format!("fwd.down.{k}")]);
            assert!(e <= tol, "{dtype} down.{k}: rel err {e:.3e}");
        }
        let e = rel_err(&host(&out.mid), &r["fwd.mid"]);
        assert!(e <= tol, "{dtype} mid: rel err {e:.3e}");
        println!("{dtype}: residuals within {tol:e}");
    }
}

/// The final latents of the tiny model with `controlnet` at scale 0.6, window 0.2–0.8, `steps`
/// steps, on `device` (one rank; CUDA graphs when on the GPU).
fn run(device: Device, steps: usize) -> Tensor {
    let r = refs("controlnet/refs.safetensors");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("controlnet/meta.json")).unwrap())
            .unwrap();
    let call = &meta["call"];
    let img = {
        let bytes = std::fs::read(data("controlnet/control.png")).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        let (h, w) = (info.height as usize, info.width as usize);
        pcpp_sdxl::control_image_from_rgb8(&buf[..h * w * 3], h, w).unwrap()
    };
    let inputs = [ControlInput {
        image: img,
        guidance: ControlGuidance {
            scale: 0.6,
            start: 0.2,
            end: 0.8,
        },
    }];
    let nets = [data("controlnet/controlnet")];
    let params = DenoiseParams {
        steps,
        guidance: call["guidance_scale"].as_f64().unwrap() as f32,
        scheduler: SchedulerKind::Euler,
        micro: MicroCond::for_size(64, 64),
        cuda_graphs: device != Device::Cpu,
    };
    let noise = r["initial_noise"].clone();
    let out = LocalTransport::run(1, TransportOptions::default(), |t: Arc<dyn Transport>| {
        let rt = PatchRuntime::new(t.clone(), false, ParallelConfig::pcpp(0.3), 32, 32, 1)?;
        let opts = LoadOptions {
            dtype: DType::F32,
            device,
            encoders: true,
            decoder: true,
            vae_encoder: false,
            vae_dtype: None,
            lora: None,
            controlnets: &nets,
        };
        let gen = Generator::load(&tiny_model(), &opts, rt.factory())?;
        let job = ImageJob {
            prompt: call["prompt"].as_str().unwrap(),
            negative: call["negative_prompt"].as_str(),
            params: &params,
            noise: &noise,
            init: None,
            control: &inputs,
        };
        let img = gen.generate(t.as_ref(), rt.driver(), &job, &mut |_, _| {})?;
        Ok::<_, BoxErr>(img.map(|i| i.latents))
    })
    .unwrap();
    out.into_iter().next().flatten().unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn pipeline_on_the_gpu_matches_diffusers_and_the_cpu_with_graphs() {
    let r = refs("controlnet/refs.safetensors");
    let gpu = run(GPU, 4);
    let e = rel_err(&gpu, &r["window.final_latents"]);
    println!("GPU, 4 steps, window 0.2-0.8 vs diffusers: rel err {e:.3e}");
    assert!(e <= TOL_PIPELINE, "{e:.3e}");
    // 10 steps: the window's six steps share one scale, so after two eager ones their graph is
    // captured (with the ControlNet) and replayed four times.
    let (cpu, gpu) = (run(Device::Cpu, 10), run(GPU, 10));
    let e = rel_err(&gpu, &cpu);
    println!("GPU with CUDA graphs vs CPU, 10 steps: rel err {e:.3e}");
    assert!(e <= TOL_PIPELINE, "{e:.3e}");
}
