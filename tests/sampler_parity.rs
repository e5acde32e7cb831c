//! Parity of the DPM-Solver++ 2M (plain and Karras σ) and Euler ancestral samplers against
//! diffusers 0.42.1 (`tests/data/samplers/`, see tests/data/README.md): timesteps, σ and
//! `init_noise_sigma` for several step counts and configurations, a chained 6-step run from stored
//! model outputs (and, for Euler ancestral, stored per-step noise), `add_noise` at every step,
//! and whole tiny-model pipelines from the stored initial (and per-step) noise.

use std::collections::HashMap;

use pcpp_core::{SerialDriver, SerialFactory};
use pcpp_kernels::{DType, Tensor};
use pcpp_sdxl::scheduler::{build, Scheduler, SchedulerConfig, SchedulerKind};
use pcpp_sdxl::{
    denoise_with, to_unit_range, DenoiseParams, DenoiseStart, MicroCond, Pipeline, StepNoise,
};
use pcpp_tests::{assert_close, data, refs, rel_err, tiny_model, RefCall, TOL_PIPELINE};

/// Allowed max|Δ| relative to max|ref| for scheduler arithmetic.
const TOL: f32 = 1e-6;
const STEP_COUNTS: [usize; 8] = [1, 2, 3, 4, 10, 25, 30, 50];
const CHAIN: usize = 6;

/// (reference name, kind)
const VARIANTS: [(&str, SchedulerKind); 6] = [
    ("dpmpp_2m", SchedulerKind::DpmPp2M),
    ("dpmpp_2m_karras", SchedulerKind::DpmPp2MKarras),
    ("euler_a", SchedulerKind::EulerAncestral),
    ("dpmpp_2m_linspace_v", SchedulerKind::DpmPp2M),
    ("dpmpp_2m_karras_sigma_min", SchedulerKind::DpmPp2MKarras),
    ("euler_a_trailing_v", SchedulerKind::EulerAncestral),
];

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(data("samplers/meta.json")).expect("samplers/meta.json");
    serde_json::from_str(&text).expect("meta.json parses")
}

fn config(meta: &serde_json::Value, name: &str) -> SchedulerConfig {
    let text = meta["schedulers"][format!("{name}.config")].to_string();
    SchedulerConfig::from_json_str(&text, Some(&data("samplers/meta.json"))).expect("config")
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32().expect("f32")
}

fn close(name: &str, got: &[f32], want: &Tensor) {
    let want = vec_f32(want);
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let rel = if scale > 0.0 { err / scale } else { err };
    assert!(
        rel <= TOL,
        "{name}: max|Δ| {err:e} (relative {rel:e}) exceeds {TOL:e}"
    );
}

fn timesteps_of(r: &HashMap<String, Tensor>, key: &str) -> Vec<f64> {
    vec_f32(&r[key]).into_iter().map(f64::from).collect()
}

#[test]
fn timesteps_sigmas_and_init_noise_sigma_match() {
    let r = refs("samplers/schedulers.safetensors");
    let meta = meta();
    for (name, kind) in VARIANTS {
        let cfg = config(&meta, name);
        for n in STEP_COUNTS {
            let s = build(kind, &cfg, n).unwrap_or_else(|e| panic!("{name} n={n}: {e}"));
            assert_eq!(
                s.timesteps(),
                timesteps_of(&r, &format!("{name}.n{n}.timesteps")).as_slice(),
                "{name}.n{n}.timesteps"
            );
            let want = meta["schedulers"][format!("{name}.n{n}.init_noise_sigma")]
                .as_f64()
                .expect("init_noise_sigma");
            let got = s.init_noise_sigma();
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{name}.n{n}.init_noise_sigma: {got} vs {want}"
            );
            let sigmas = match kind {
                SchedulerKind::DpmPp2M | SchedulerKind::DpmPp2MKarras => {
                    pcpp_sdxl::scheduler::DpmSolverPp2MScheduler::new(
                        &cfg,
                        n,
                        kind == SchedulerKind::DpmPp2MKarras,
                    )
                    .expect("dpm")
                    .sigmas()
                    .to_vec()
                }
                _ => pcpp_sdxl::scheduler::EulerAncestralScheduler::new(&cfg, n)
                    .expect("euler-a")
                    .sigmas()
                    .to_vec(),
            };
            close(
                &format!("{name}.n{n}.sigmas"),
                &sigmas,
                &r[&format!("{name}.n{n}.sigmas")],
            );
        }
    }
}

#[test]
fn chained_steps_and_add_noise_match() {
    let r = refs("samplers/schedulers.safetensors");
    let meta = meta();
    let outputs = vec_f32(&r["step_model_outputs"]);
    let noise = vec_f32(&r["step_noise"]);
    let initial = vec_f32(&r["step_initial_sample"]);
    let len = initial.len();
    for (name, kind) in VARIANTS {
        let cfg = config(&meta, name);
        let mut s: Box<dyn Scheduler> = build(kind, &cfg, CHAIN).expect("build");
        let sigma = s.init_noise_sigma() as f32;
        let mut sample: Vec<f32> = initial.iter().map(|&x| x * sigma).collect();
        for i in 0..CHAIN {
            let scaled = s.scale_model_input(&sample, i).expect("scale");
            close(
                &format!("{name}.step{i}.scaled_input"),
                &scaled,
                &r[&format!("{name}.step{i}.scaled_input")],
            );
            let out = &outputs[i * len..(i + 1) * len];
            let n = s.needs_noise().then(|| &noise[i * len..(i + 1) * len]);
            sample = s.step(out, i, &sample, n).expect("step");
            close(
                &format!("{name}.step{i}.prev_sample"),
                &sample,
                &r[&format!("{name}.step{i}.prev_sample")],
            );
        }
        for i in 0..CHAIN {
            let noisy = s.add_noise(&initial, &noise[..len], i).expect("add_noise");
            close(
                &format!("{name}.add_noise{i}"),
                &noisy,
                &r[&format!("{name}.add_noise{i}")],
            );
        }
    }
}

fn run_pipeline(name: &str, kind: SchedulerKind) {
    let c = RefCall::from_meta(&meta()[name]);
    let (prompt, negative) = (c.prompt.as_str(), c.negative.as_deref());
    let (guidance, steps, h, w) = (c.guidance, c.steps, c.height, c.width);
    let r = refs(&format!("samplers/{name}.safetensors"));
    let pipe = Pipeline::load(&tiny_model(), DType::F32, &SerialFactory).expect("load pipeline");
    let embeds = pipe.text.encode(prompt, negative, true).expect("encode");
    let params = DenoiseParams {
        steps,
        guidance,
        scheduler: kind,
        micro: MicroCond::for_size(h, w),
        cuda_graphs: false,
    };
    let step_noise = if kind.is_stochastic() {
        StepNoise::Given(
            (0..steps)
                .map(|i| r[&format!("step{i}.noise")].clone())
                .collect(),
        )
    } else {
        StepNoise::Derived
    };
    let latents = denoise_with(
        &pipe.unet,
        None,
        &SerialDriver,
        &pipe.scheduler,
        &params,
        &embeds,
        &DenoiseStart::Noise(&r["initial_noise"]),
        &step_noise,
        &mut |_, _| {},
    )
    .expect("denoise")
    .latents;
    println!(
        "{name}: final latents rel err {:.3e}",
        rel_err(&latents, &r["final_latents"])
    );
    assert_close("final_latents", &latents, &r["final_latents"], TOL_PIPELINE);
    let img = pipe.decode(&latents).expect("decode");
    let unit = to_unit_range(&img).expect("unit");
    let want = r["image_np"].permute(&[0, 3, 1, 2]).expect("permute");
    let e = unit.max_abs_diff(&want).expect("diff");
    println!("{name}: image max|Δ| {e:.3e}");
    assert!(e <= TOL_PIPELINE, "{name}: image max|Δ| {e:e}");
}

#[test]
fn dpmpp_2m_pipeline_matches_diffusers() {
    run_pipeline("pipeline_dpmpp_2m", SchedulerKind::DpmPp2M);
}

#[test]
fn dpmpp_2m_karras_pipeline_matches_diffusers() {
    run_pipeline("pipeline_dpmpp_2m_karras", SchedulerKind::DpmPp2MKarras);
}

#[test]
fn euler_ancestral_pipeline_with_stored_noise_matches_diffusers() {
    run_pipeline("pipeline_euler_a", SchedulerKind::EulerAncestral);
}

#[test]
fn derived_step_noise_is_reproducible_and_per_step() {
    let initial: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let a = pcpp_sdxl::derived_step_noise(&initial, 3, 256);
    assert_eq!(a, pcpp_sdxl::derived_step_noise(&initial, 3, 256));
    assert_ne!(a, pcpp_sdxl::derived_step_noise(&initial, 4, 256));
    let mut other = initial.clone();
    other[17] = f32::from_bits(other[17].to_bits() ^ 1);
    assert_ne!(a, pcpp_sdxl::derived_step_noise(&other, 3, 256));
    let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / a.len() as f64;
    let var = a
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    assert!(mean.abs() < 0.25 && (var - 1.0).abs() < 0.3, "{mean} {var}");
}

#[test]
fn img2img_start_step_follows_diffusers() {
    // diffusers: init = min(int(steps * strength), steps), t_start = steps - init
    assert_eq!(pcpp_sdxl::img2img_start_step(30, 0.3).expect("ok"), 21);
    assert_eq!(pcpp_sdxl::img2img_start_step(4, 1.0).expect("ok"), 0);
    assert_eq!(pcpp_sdxl::img2img_start_step(10, 0.75).expect("ok"), 3);
    assert_eq!(pcpp_sdxl::img2img_start_step(50, 0.999).expect("ok"), 1);
    assert!(pcpp_sdxl::img2img_start_step(3, 0.2).is_err());
    assert!(pcpp_sdxl::img2img_start_step(3, 0.0).is_err());
    assert!(pcpp_sdxl::img2img_start_step(3, 1.5).is_err());
    assert!(pcpp_sdxl::img2img_start_step(3, f32::NAN).is_err());
}
