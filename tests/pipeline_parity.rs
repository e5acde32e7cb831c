//! Whole-pipeline parity against diffusers' `StableDiffusionXLPipeline` on the tiny model: prompt
//! embeddings, every step's UNet output and latents, final latents and the decoded image, for the
//! Euler run (no negative prompt: zeros) and the DDIM run (negative prompt, "!!" in the prompt), both
//! started from the stored `initial_noise`.

use pcpp_core::{SerialDriver, SerialFactory};
use pcpp_kernels::{DType, Tensor};
use pcpp_sdxl::scheduler::SchedulerKind;
use pcpp_sdxl::{denoise, to_unit_range, DenoiseParams, MicroCond, Pipeline};
use pcpp_tests::{
    assert_close, data, refs, rel_err, tiny_model, RefCall, TOL_MODULE, TOL_PIPELINE,
};

fn meta(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(data("refs-tiny-sdxl/meta.json")).expect("meta.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("meta.json parses");
    v[name].clone()
}

fn run(name: &str, kind: SchedulerKind) {
    let c = RefCall::from_meta(&meta(name));
    let (prompt, negative) = (c.prompt.as_str(), c.negative.as_deref());
    let (guidance, steps, h, w) = (c.guidance, c.steps, c.height, c.width);
    let r = refs(&format!("refs-tiny-sdxl/{name}.safetensors"));
    let pipe = Pipeline::load(&tiny_model(), DType::F32, &SerialFactory).expect("load pipeline");

    let embeds = pipe.text.encode(prompt, negative, true).expect("encode");
    assert_close(
        "prompt_embeds",
        &embeds.prompt_embeds,
        &r["prompt_embeds"],
        TOL_MODULE,
    );
    assert_close(
        "add_text_embeds",
        &embeds.pooled,
        &r["add_text_embeds"],
        TOL_MODULE,
    );

    let params = DenoiseParams {
        steps,
        guidance,
        scheduler: kind,
        micro: MicroCond::for_size(h, w),
        cuda_graphs: false,
    };
    let mut seen = 0;
    let latents = denoise(
        &pipe.unet,
        &SerialDriver,
        &pipe.scheduler,
        &params,
        &embeds,
        &r["initial_noise"],
        &mut |i, n| {
            assert_eq!(n, steps);
            seen = i;
        },
    )
    .expect("denoise");
    assert_eq!(seen, steps, "progress reported every step");
    println!(
        "{name}: final latents rel err {:.3e}",
        rel_err(&latents, &r["final_latents"])
    );
    assert_close("final_latents", &latents, &r["final_latents"], TOL_PIPELINE);

    let img = pipe.decode(&latents).expect("decode");
    let unit = to_unit_range(&img).expect("unit");
    // diffusers' image_np is [1, H, W, 3]; ours is [1, 3, H, W].
    let want = r["image_np"].permute(&[0, 3, 1, 2]).expect("permute");
    let e = unit.max_abs_diff(&want).expect("diff");
    println!("{name}: image max|Δ| {e:.3e}");
    assert!(
        e <= TOL_PIPELINE,
        "{name}: image max|Δ| {e:.3e} > {TOL_PIPELINE:.0e}"
    );
}

#[test]
fn euler_pipeline_matches_diffusers() {
    run("pipeline_euler", SchedulerKind::Euler);
}

#[test]
fn ddim_pipeline_with_negative_prompt_matches_diffusers() {
    run("pipeline_ddim", SchedulerKind::Ddim);
}

#[test]
fn guidance_one_runs_without_cfg() {
    let pipe = Pipeline::load(&tiny_model(), DType::F32, &SerialFactory).expect("load pipeline");
    let embeds = pipe.text.encode("a fox", None, false).expect("encode");
    assert_eq!(embeds.prompt_embeds.shape()[0], 1);
    let params = DenoiseParams {
        steps: 2,
        guidance: 1.0,
        scheduler: SchedulerKind::Euler,
        micro: MicroCond::for_size(64, 64),
        cuda_graphs: false,
    };
    let noise = Tensor::from_vec(
        &[1, 4, 8, 8],
        (0..256)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect(),
    )
    .expect("noise");
    let out = denoise(
        &pipe.unet,
        &SerialDriver,
        &pipe.scheduler,
        &params,
        &embeds,
        &noise,
        &mut |_, _| {},
    )
    .expect("denoise");
    assert_eq!(out.shape(), &[1, 4, 8, 8]);
    assert!(out.max_abs_diff(&noise).expect("diff") > 0.0);
}
