//! The tiny SDXL pipeline with every model on the GPU (weights loaded straight to the device; the
//! scheduler's latent updates stay on the host) against diffusers' Euler run: prompt embeddings, final latents and the decoded image at the
//! pipeline tolerance in f32. Ignored by default (needs a GPU):
//! `cargo test --features cuda --test cuda_pipeline_parity -- --ignored`.
#![cfg(feature = "cuda")]

use pcpp_core::{SerialDriver, SerialFactory};
use pcpp_kernels::{DType, Device};
use pcpp_sdxl::scheduler::SchedulerKind;
use pcpp_sdxl::{denoise, to_unit_range, DenoiseParams, MicroCond, Pipeline};
use pcpp_tests::{data, refs, rel_err, tiny_model, RefCall, TOL_PIPELINE};

const GPU: Device = Device::Cuda(0);

#[test]
#[ignore = "needs a CUDA GPU"]
fn euler_pipeline_on_gpu_matches_diffusers() {
    let text = std::fs::read_to_string(data("refs-tiny-sdxl/meta.json")).expect("meta.json");
    let meta: serde_json::Value = serde_json::from_str(&text).expect("meta.json parses");
    let c = RefCall::from_meta(&meta["pipeline_euler"]);
    let (prompt, negative) = (c.prompt.as_str(), c.negative.as_deref());
    let (guidance, steps, h, w) = (c.guidance, c.steps, c.height, c.width);
    let r = refs("refs-tiny-sdxl/pipeline_euler.safetensors");
    let pipe = Pipeline::load_on(&tiny_model(), DType::F32, GPU, DType::F32, &SerialFactory)
        .expect("load pipeline on the GPU");
    let embeds = pipe.text.encode(prompt, negative, true).expect("encode");
    assert_eq!(
        embeds.prompt_embeds.device(),
        GPU,
        "text encoders ran off the GPU"
    );
    let cpu = |t: &pcpp_kernels::Tensor| t.to_device(Device::Cpu).expect("download");
    let e = rel_err(&cpu(&embeds.prompt_embeds), &r["prompt_embeds"]);
    println!("prompt_embeds rel err {e:.3e}");
    assert!(e <= TOL_PIPELINE, "prompt_embeds rel err {e:e}");

    let params = DenoiseParams {
        steps,
        guidance,
        scheduler: SchedulerKind::Euler,
        micro: MicroCond::for_size(h, w),
        cuda_graphs: false,
    };
    let noise = r["initial_noise"].to_device(GPU).expect("upload");
    let latents = denoise(
        &pipe.unet,
        &SerialDriver,
        &pipe.scheduler,
        &params,
        &embeds,
        &noise,
        &mut |_, _| {},
    )
    .expect("denoise");
    // The scheduler keeps the (small) latents on the host; the UNet runs on the GPU.
    let e = rel_err(&cpu(&latents), &r["final_latents"]);
    println!("final latents rel err {e:.3e}");
    assert!(e <= TOL_PIPELINE, "final latents rel err {e:e}");

    // Steps 3.. replayed from CUDA graphs (one per step parity) match diffusers like the eager
    // run. (In f32 the replay is not bitwise the eager run: library GEMMs may pick other kernels
    // under capture; the f16 SDXL steps of `patch-bench --graph` were bitwise equal.)
    let graphed = DenoiseParams {
        cuda_graphs: true,
        ..params.clone()
    };
    let latents_g = denoise(
        &pipe.unet,
        &SerialDriver,
        &pipe.scheduler,
        &graphed,
        &embeds,
        &noise,
        &mut |_, _| {},
    )
    .expect("denoise with CUDA graphs");
    let d = cpu(&latents_g).max_abs_diff(&cpu(&latents)).expect("diff");
    println!("graph replay vs eager latents max|Δ| {d:.3e}");
    let e = rel_err(&cpu(&latents_g), &r["final_latents"]);
    println!("final latents with CUDA graphs rel err {e:.3e}");
    assert!(
        e <= TOL_PIPELINE,
        "final latents with CUDA graphs rel err {e:e}"
    );

    let img = pipe.decode(&latents).expect("decode");
    assert_eq!(img.device(), GPU, "VAE ran off the GPU");
    let unit = cpu(&to_unit_range(&img).expect("unit"));
    let want = r["image_np"].permute(&[0, 3, 1, 2]).expect("permute");
    let d = unit.max_abs_diff(&want).expect("diff");
    println!("image max|Δ| {d:.3e}");
    assert!(d <= TOL_PIPELINE, "image max|Δ| {d:e}");
}
