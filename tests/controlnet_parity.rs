//! ControlNet parity against diffusers 0.42.1 on the tiny model (`tests/data/controlnet`, written by
//! scripts/regen_controlnet_reference.py):
//! - one `ControlNetModel` forward with SDXL's conditioning embedding (control image at 8× the
//!   latent; all residuals, scale 0.7) and the control image preparation, serially and on 2 and 4
//!   ranks (each rank's residual bands equal the serial rows);
//! - `StableDiffusionXLControlNetPipeline` final latents through `Generator::load` +
//!   `Generator::generate` with nets whose embedding scales by 2 like the tiny VAE (scale 1.0 full range; scale 0.6 with window 0.2–0.8; 64×48; two nets
//!   with their own scales and windows) within 1e-4 of max|ref|;
//! - N ranks with every step synchronous equal one rank (≤ 1e-5) for N = 2 (CFG split, with a
//!   LoRA) and N = 4, and the conditioning embedding's convolutions are patch-parallel layers;
//! - a stale (PCPP) run whose ControlNet window opens after the warm-up; tensor parallelism (equal
//!   to one rank), naive patch (rows; alternating rows and columns) and DistriFusion;
//! - diffusers' fp16 variant file loads;
//! - clear errors: missing folder, missing tensor, a net that does not fit the UNet, wrong
//!   `conditioning_channels`, a control image of the wrong size, images without nets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pcpp_comm::{LocalTransport, Transport, TransportOptions};
use pcpp_core::{ParallelConfig, PatchRuntime, SerialFactory, StepCtx};
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::scheduler::SchedulerKind;
use pcpp_sdxl::{
    control_image_from_rgb8, ControlGuidance, ControlInput, ControlNet, DenoiseParams, Generator,
    ImageJob, LoadOptions, LoraSet, LoraSpec, MicroCond, ModelGeometry, UNet, UNetCond,
};
use pcpp_tests::{
    assert_close, data, refs, rel_err, tiny_model, TOL_CHAIN, TOL_PIPELINE, TOL_RANKS,
};

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

fn net_dir(name: &str) -> PathBuf {
    data(&format!("controlnet/{name}"))
}

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(data("controlnet/meta.json")).expect("meta.json");
    serde_json::from_str(&text).expect("meta.json parses")
}

/// A PNG of the fixtures as a control image tensor.
fn control_image(name: &str) -> Tensor {
    let p = data(&format!("controlnet/{name}"));
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&p).expect("open png"),
    ));
    let mut reader = dec.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!(info.color_type, png::ColorType::Rgb, "{name} is RGB");
    let (h, w) = (info.height as usize, info.width as usize);
    control_image_from_rgb8(&buf[..h * w * 3], h, w).expect("control image")
}

#[test]
fn one_forward_matches_diffusers_residuals() {
    let r = refs("controlnet/refs.safetensors");
    let net = ControlNet::load(
        &net_dir("controlnet_px8"),
        DType::F32,
        Device::Cpu,
        &SerialFactory,
        0,
    )
    .expect("load ControlNet");
    let unet = UNet::load(&tiny_model().join("unet"), DType::F32, &SerialFactory).expect("UNet");
    net.check_fits(&unet).expect("fits the tiny UNet");
    // The pipeline's image preparation: the PNG in [0, 1], repeated for CFG.
    let img = control_image("control.png");
    let prepared = net
        .prepare_image(&img, 2, (8, 8), DType::F32, Device::Cpu)
        .expect("prepare");
    assert_close(
        "controlnet_cond",
        &prepared,
        &r["fwd.controlnet_cond"],
        1e-7,
    );
    let cond = UNetCond::new(
        r["fwd.encoder_hidden_states"].clone(),
        Some(r["fwd.text_embeds"].clone()),
        Some(r["fwd.time_ids"].clone()),
    );
    let taps = pcpp_sdxl::Taps::new();
    let scale = meta()["fwd_scale"].as_f64().expect("fwd_scale") as f32;
    let out = net
        .forward(
            &StepCtx::serial(),
            &r["fwd.sample"],
            &r["fwd.timestep"],
            &cond,
            &prepared,
            scale,
            Some(&taps),
        )
        .expect("forward");
    let emb = taps
        .take()
        .into_iter()
        .find(|(n, _)| n == "controlnet_cond_embedding")
        .expect("tapped embedding")
        .1;
    assert_close("cond_embedding", &emb, &r["fwd.cond_embedding"], TOL_CHAIN);
    let n_down = r.keys().filter(|k| k.starts_with("fwd.down.")).count();
    assert_eq!(out.down.len(), n_down, "one residual per skip connection");
    for (k, d) in out.down.iter().enumerate() {
        let key = format!("fwd.down.{k}");
        println!("{key}: rel err {:.3e}", rel_err(d, &r[&key]));
        assert_close(&key, d, &r[&key], TOL_CHAIN);
    }
    assert_close("fwd.mid", &out.mid, &r["fwd.mid"], TOL_CHAIN);
}

/// The px8 net's forward (SDXL's conditioning embedding: the image at 8× the latent) on `n` ranks
/// with every exchange synchronous: each rank's residual bands equal the serial residuals' rows.
#[test]
fn one_forward_on_bands_equals_serial() {
    let r = refs("controlnet/refs.safetensors");
    let cond = || {
        UNetCond::new(
            r["fwd.encoder_hidden_states"].clone(),
            Some(r["fwd.text_embeds"].clone()),
            Some(r["fwd.time_ids"].clone()),
        )
    };
    let fwd = |f: &dyn pcpp_core::LayerFactory| {
        let net = ControlNet::load(&net_dir("controlnet_px8"), DType::F32, Device::Cpu, f, 0)?;
        net.forward(
            &StepCtx::serial(),
            &r["fwd.sample"],
            &r["fwd.timestep"],
            &cond(),
            &r["fwd.controlnet_cond"],
            0.7,
            None,
        )
    };
    let serial = fwd(&SerialFactory).expect("serial forward");
    for n in [2, 4] {
        let bands = LocalTransport::run(n, TransportOptions::default(), |t: Arc<dyn Transport>| {
            let rank = t.rank();
            let rt = PatchRuntime::one_pass(t, 8, 8, 1)?;
            let out = fwd(rt.factory())?;
            Ok::<_, BoxErr>((rank, rt.band_plan().clone(), out))
        })
        .expect("ranks");
        for (rank, plan, out) in bands {
            let all = serial.down.iter().chain([&serial.mid]);
            for (k, (got, want)) in out.down.iter().chain([&out.mid]).zip(all).enumerate() {
                let level = (8 / want.shape()[2]).trailing_zeros() as usize;
                let band = plan.band(level, rank);
                let want = want.narrow(2, band.start, band.len()).expect("band");
                let e = rel_err(got, &want);
                assert!(
                    e <= TOL_RANKS,
                    "{n} ranks, rank {rank}, residual {k}: {e:.3e}"
                );
            }
        }
    }
}

/// diffusers' fp16 variant file (`diffusion_pytorch_model.fp16.safetensors`, no f32 file) loads,
/// cast to f32: the residuals stay within fp16 rounding of diffusers' f32 ones.
#[test]
fn fp16_variant_file_loads() {
    let r = refs("controlnet/refs.safetensors");
    let dir = copy_dir(&net_dir("controlnet_px8"), "fp16");
    let f32_file = dir.join("diffusion_pytorch_model.safetensors");
    let all = pcpp_kernels::io::load_all(&f32_file).expect("load");
    let half: Vec<(String, Tensor)> = all
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).expect("f16")))
        .collect();
    let named: Vec<(&str, &Tensor)> = half.iter().map(|(k, v)| (k.as_str(), v)).collect();
    pcpp_kernels::io::save(
        dir.join("diffusion_pytorch_model.fp16.safetensors"),
        &named,
        None,
    )
    .expect("save fp16");
    std::fs::remove_file(&f32_file).expect("remove f32 file");
    let net =
        ControlNet::load(&dir, DType::F32, Device::Cpu, &SerialFactory, 0).expect("fp16 variant");
    let cond = UNetCond::new(
        r["fwd.encoder_hidden_states"].clone(),
        Some(r["fwd.text_embeds"].clone()),
        Some(r["fwd.time_ids"].clone()),
    );
    let out = net
        .forward(
            &StepCtx::serial(),
            &r["fwd.sample"],
            &r["fwd.timestep"],
            &cond,
            &r["fwd.controlnet_cond"],
            0.7,
            None,
        )
        .expect("forward");
    for (k, d) in out.down.iter().enumerate() {
        let e = rel_err(d, &r[&format!("fwd.down.{k}")]);
        assert!(e <= 5e-3 && e > 0.0, "down.{k}: rel err {e:.3e}");
    }
}

/// What one run needs besides the ranks.
#[derive(Clone)]
struct Run {
    nets: Vec<PathBuf>,
    inputs: Vec<ControlInput>,
    noise: Tensor,
    size: (usize, usize),
    lora: Option<Arc<LoraSet>>,
}

fn run(
    guidance: &[ControlGuidance],
    nets: &[&str],
    image: &str,
    noise: &str,
    size: (usize, usize),
) -> Run {
    let r = refs("controlnet/refs.safetensors");
    let img = control_image(image);
    Run {
        nets: nets.iter().map(|n| net_dir(n)).collect(),
        inputs: guidance
            .iter()
            .map(|g| ControlInput {
                image: img.clone(),
                guidance: *g,
            })
            .collect(),
        noise: r[noise].clone(),
        size,
        lora: None,
    }
}

fn guidance(scale: f32, start: f64, end: f64) -> ControlGuidance {
    ControlGuidance { scale, start, end }
}

/// The final latents of `run` on `n` local ranks (rank 0's), with `cfg` (`None`: every step
/// synchronous) and the CFG split when asked; also the slot ids of rank 0's runtime.
fn generate(
    run: &Run,
    n: usize,
    cfg_split: bool,
    cfg: Option<ParallelConfig>,
) -> Result<(Tensor, Vec<String>), String> {
    let m = meta();
    let call = &m["call"];
    let steps = call["num_inference_steps"].as_u64().expect("steps") as usize;
    let params = DenoiseParams {
        steps,
        guidance: call["guidance_scale"].as_f64().expect("guidance") as f32,
        scheduler: SchedulerKind::Euler,
        micro: MicroCond::for_size(run.size.0, run.size.1),
        cuda_graphs: false,
    };
    let pcfg = cfg.unwrap_or_else(|| {
        let mut c = ParallelConfig::pcpp(0.3);
        c.warmup_steps = steps;
        c
    });
    let outs = LocalTransport::run(n, TransportOptions::default(), |t: Arc<dyn Transport>| {
        let geo = ModelGeometry::load(&tiny_model())?;
        let f = geo.vae_scale_factor;
        let rt = PatchRuntime::new(
            t.clone(),
            cfg_split,
            pcfg.clone(),
            run.size.0 / f,
            run.size.1 / f,
            geo.latent_multiple.trailing_zeros() as usize,
        )?;
        let opts = LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            encoders: t.rank() == 0,
            decoder: t.rank() == 0,
            vae_encoder: false,
            vae_dtype: None,
            lora: run.lora.as_deref(),
            controlnets: &run.nets,
        };
        let gen = Generator::load(&tiny_model(), &opts, rt.factory())?;
        let job = ImageJob {
            prompt: call["prompt"].as_str().expect("prompt"),
            negative: call["negative_prompt"].as_str(),
            params: &params,
            noise: &run.noise,
            init: None,
            control: &run.inputs,
        };
        let img = gen.generate(t.as_ref(), rt.driver(), &job, &mut |_, _| {})?;
        Ok::<_, BoxErr>((img.map(|i| i.latents), rt.slot_ids()))
    })
    .map_err(|e| e.to_string())?;
    let mut outs = outs.into_iter();
    let (lat, slots) = outs.next().expect("rank 0");
    Ok((lat.expect("rank 0 has the image"), slots))
}

fn check(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    println!("{name}: rel err {:.3e}", rel_err(got, want));
    assert_close(name, got, want, tol);
}

#[test]
fn pipeline_runs_match_diffusers() {
    let r = refs("controlnet/refs.safetensors");
    let full = run(
        &[guidance(1.0, 0.0, 1.0)],
        &["controlnet"],
        "control.png",
        "initial_noise",
        (64, 64),
    );
    let (lat, _) = generate(&full, 1, false, None).expect("full run");
    check("full", &lat, &r["full.final_latents"], TOL_PIPELINE);
    // The ControlNet changes the result far beyond the tolerance (so the check above is not vacuous).
    assert!(rel_err(&lat, &r["base.final_latents"]) > 100.0 * TOL_PIPELINE);

    let window = run(
        &[guidance(0.6, 0.2, 0.8)],
        &["controlnet"],
        "control.png",
        "initial_noise",
        (64, 64),
    );
    let (lat, _) = generate(&window, 1, false, None).expect("window run");
    check("window", &lat, &r["window.final_latents"], TOL_PIPELINE);

    let tall = run(
        &[guidance(1.0, 0.0, 1.0)],
        &["controlnet"],
        "control_tall.png",
        "initial_noise_tall",
        (64, 48),
    );
    let (lat, _) = generate(&tall, 1, false, None).expect("tall run");
    check("tall", &lat, &r["tall.final_latents"], TOL_PIPELINE);

    let multi = run(
        &[guidance(0.8, 0.0, 1.0), guidance(0.5, 0.0, 0.5)],
        &["controlnet", "controlnet_b"],
        "control.png",
        "initial_noise",
        (64, 64),
    );
    let (lat, _) = generate(&multi, 1, false, None).expect("multi run");
    check("multi", &lat, &r["multi.final_latents"], TOL_PIPELINE);
}

#[test]
fn synchronous_ranks_equal_one_rank() {
    let window = run(
        &[guidance(0.6, 0.2, 0.8)],
        &["controlnet"],
        "control.png",
        "initial_noise",
        (64, 64),
    );
    let (serial, _) = generate(&window, 1, false, None).expect("serial");
    let (four, slots) = generate(&window, 4, false, None).expect("4 ranks");
    check("4 ranks vs 1", &four, &serial, TOL_RANKS);
    // The conditioning embedding's 3×3 convolutions exchange halos (own stale-cache slots, apart
    // from the UNet's); its first convolution cuts the band from the whole image.
    for id in [
        "controlnet.0.controlnet_cond_embedding.blocks.0",
        "controlnet.0.controlnet_cond_embedding.blocks.1",
        "controlnet.0.controlnet_cond_embedding.conv_out",
        "controlnet.0.down_blocks.0.resnets.0.conv1",
        "down_blocks.0.resnets.0.conv1",
    ] {
        assert!(slots.iter().any(|s| s == id), "no slot `{id}` in {slots:?}");
    }
    assert!(!slots
        .iter()
        .any(|s| s.contains("cond_embedding.conv_in") || s.contains("controlnet_down_blocks")));

    let lora = Arc::new(
        LoraSet::load(&[LoraSpec {
            path: data("lora/peft.safetensors"),
            scale: 0.7,
        }])
        .expect("LoRA"),
    );
    let with_lora = Run {
        lora: Some(lora),
        ..run(
            &[guidance(0.8, 0.0, 1.0), guidance(0.5, 0.0, 0.5)],
            &["controlnet", "controlnet_b"],
            "control.png",
            "initial_noise",
            (64, 64),
        )
    };
    let (serial, _) = generate(&with_lora, 1, false, None).expect("serial with LoRA");
    let (two, _) = generate(&with_lora, 2, true, None).expect("2 ranks, CFG split, LoRA");
    check(
        "2 ranks (CFG split, LoRA, 2 nets) vs 1",
        &two,
        &serial,
        TOL_RANKS,
    );
    let r = refs("controlnet/refs.safetensors");
    assert!(
        rel_err(&serial, &r["multi.final_latents"]) > 100.0 * TOL_PIPELINE,
        "the LoRA acts"
    );
}

#[test]
fn stale_steps_with_a_window_that_opens_late() {
    // PCPP with one warm-up step: the ControlNet's window opens at step 1, a stale step, whose
    // halos and attention context come from step 0, when the net ran with scale 0.
    let window = run(
        &[guidance(0.6, 0.2, 0.8)],
        &["controlnet"],
        "control.png",
        "initial_noise",
        (64, 64),
    );
    let mut cfg = ParallelConfig::pcpp(0.3);
    cfg.warmup_steps = 1;
    let (stale, _) = generate(&window, 2, false, Some(cfg)).expect("stale run");
    let (serial, _) = generate(&window, 1, false, None).expect("serial");
    let e = rel_err(&stale, &serial);
    println!("stale 2 ranks vs serial: {e:.3e}");
    assert!(e.is_finite() && e > 0.0 && e < 0.5, "{e}");
}

/// The other schemes run with a ControlNet: tensor parallelism equals one rank; naive patch (rows,
/// and columns on odd steps) and DistriFusion run and stay near it.
#[test]
fn other_schemes_run_with_a_controlnet() {
    let window = run(
        &[guidance(0.6, 0.2, 0.8)],
        &["controlnet"],
        "control.png",
        "initial_noise",
        (64, 64),
    );
    let (serial, _) = generate(&window, 1, false, None).expect("serial");
    let (tensor, _) = generate(&window, 2, false, Some(ParallelConfig::tensor())).expect("tensor");
    check("tensor parallel, 2 ranks vs 1", &tensor, &serial, TOL_RANKS);
    let alternate = ParallelConfig {
        split_scheme: pcpp_core::SplitScheme::Alternate,
        ..ParallelConfig::naive_patch()
    };
    for (name, cfg) in [
        ("naive patch", ParallelConfig::naive_patch()),
        ("naive patch, alternate", alternate),
        ("distrifusion", ParallelConfig::distrifusion()),
    ] {
        let (got, _) = generate(&window, 4, false, Some(cfg)).expect(name);
        let e = rel_err(&got, &serial);
        println!("{name}, 4 ranks vs 1: {e:.3e}");
        assert!(e.is_finite() && e < 0.5, "{name}: {e}");
    }
}

fn copy_dir(from: &Path, tag: &str) -> PathBuf {
    let to = std::env::temp_dir().join(format!("pcpp-cn-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&to).expect("temp dir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
    to
}

fn load_err(dir: &Path) -> String {
    match ControlNet::load(dir, DType::F32, Device::Cpu, &SerialFactory, 0) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let e = load_err(Path::new("/nonexistent/controlnet"));
    assert!(
        e.contains("/nonexistent/controlnet") && e.contains("not found"),
        "{e}"
    );

    // A missing tensor names the file and the tensor.
    let dir = copy_dir(&net_dir("controlnet"), "missing");
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let mut all = pcpp_kernels::io::load_all(&file).expect("load");
    all.remove("controlnet_mid_block.weight");
    let named: Vec<(&str, &Tensor)> = all.iter().map(|(k, v)| (k.as_str(), v)).collect();
    pcpp_kernels::io::save(&file, &named, None).expect("save");
    let e = load_err(&dir);
    assert!(
        e.contains("controlnet_mid_block.weight") && e.contains("diffusion_pytorch_model"),
        "{e}"
    );

    // conditioning_channels other than 3 names the key and the config.
    let dir = copy_dir(&net_dir("controlnet"), "channels");
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).expect("config");
    let text = text.replace(
        "\"conditioning_channels\": 3",
        "\"conditioning_channels\": 1",
    );
    std::fs::write(&cfg_path, text).expect("write config");
    let e = load_err(&dir);
    assert!(
        e.contains("conditioning_channels") && e.contains("config.json"),
        "{e}"
    );

    // A net made for another UNet.
    let net = ControlNet::load(
        &net_dir("controlnet"),
        DType::F32,
        Device::Cpu,
        &SerialFactory,
        0,
    )
    .expect("load");
    let other = UNet::load(&data("unet-alt/unet"), DType::F32, &SerialFactory).expect("alt UNet");
    let e = net.check_fits(&other).expect_err("misfit").to_string();
    assert!(
        e.contains("not made for this model") && e.contains("config.json"),
        "{e}"
    );

    // A control image of the wrong size, and images without nets, through generate.
    let mut wrong = run(
        &[guidance(1.0, 0.0, 1.0)],
        &["controlnet"],
        "control_tall.png",
        "initial_noise",
        (64, 64),
    );
    let e = generate(&wrong, 1, false, None).expect_err("wrong size");
    assert!(
        e.contains("control image") && e.contains("[1, 3, 64, 64]"),
        "{e}"
    );
    // A net whose embedding scales by 8 on a model whose VAE scales by 2.
    let px8 = Run {
        nets: vec![net_dir("controlnet_px8")],
        ..run(
            &[guidance(1.0, 0.0, 1.0)],
            &["controlnet"],
            "control.png",
            "initial_noise",
            (64, 64),
        )
    };
    let e = generate(&px8, 1, false, None).expect_err("px8 on the tiny model");
    assert!(
        e.contains("controlnet_px8") && e.contains("by 8, the VAE by 2"),
        "{e}"
    );
    wrong.nets.clear();
    let e = generate(&wrong, 1, false, None).expect_err("no nets");
    assert!(e.contains("1 control images for 0 ControlNets"), "{e}");
}
