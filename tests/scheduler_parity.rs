//! Scheduler parity against diffusers 0.42.1: ᾱ, timesteps, sigmas, `init_noise_sigma` and a
//! chained 4-step `scale_model_input` + `step` for Euler discrete and DDIM
//! (`tests/data/refs-tiny-sdxl/schedulers.safetensors`), and the schedules and guided latents of the
//! two reference pipelines (`pipeline_{euler,ddim}.safetensors`).

use std::path::PathBuf;

use pcpp_sdxl::scheduler::{
    build, EulerDiscreteScheduler, Scheduler, SchedulerConfig, SchedulerKind,
};
use safetensors::{Dtype, SafeTensors};

/// Allowed max|Δ| relative to max|ref|.
const TOL: f64 = 1e-6;
/// Step counts stored in the reference file.
const STEP_COUNTS: [usize; 6] = [1, 2, 4, 25, 30, 50];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn refs_dir() -> PathBuf {
    root().join("tests/data/refs-tiny-sdxl")
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn meta() -> serde_json::Value {
    serde_json::from_slice(&read(refs_dir().join("meta.json"))).expect("meta.json")
}

/// A tensor as `f64` values (from f32 or i64 storage).
fn tensor(st: &SafeTensors<'_>, name: &str) -> Vec<f64> {
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64)
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

fn tensor_f32(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    tensor(st, name).into_iter().map(|x| x as f32).collect()
}

/// max|Δ| / max|ref|, asserting it is within [`TOL`].
fn check(name: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    let rel = if scale > 0.0 { err / scale } else { err };
    println!("{name}: max|Δ| = {err:.3e}, relative {rel:.3e}");
    assert!(
        rel <= TOL,
        "{name}: max|Δ| {err:e} (relative {rel:e}) exceeds {TOL:e}"
    );
    rel
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn euler_config() -> SchedulerConfig {
    SchedulerConfig::from_file(root().join("models/tiny-sdxl/scheduler/scheduler_config.json"))
        .expect("euler config")
}

fn ddim_config() -> SchedulerConfig {
    let text = meta()["schedulers"]["ddim.config"].to_string();
    SchedulerConfig::from_json_str(&text, Some(&refs_dir().join("meta.json"))).expect("ddim config")
}

#[test]
fn alphas_cumprod_match() {
    let bytes = read(refs_dir().join("schedulers.safetensors"));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    for (name, config) in [("euler", euler_config()), ("ddim", ddim_config())] {
        let got = config.alphas_cumprod().expect("alphas_cumprod");
        check(
            &format!("{name}.alphas_cumprod"),
            &widen(&got),
            &tensor(&st, &format!("{name}.alphas_cumprod")),
        );
    }
}

#[test]
fn timesteps_sigmas_and_init_noise_sigma_match() {
    let bytes = read(refs_dir().join("schedulers.safetensors"));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let meta = meta();
    let (euler_cfg, ddim_cfg) = (euler_config(), ddim_config());
    for n in STEP_COUNTS {
        let euler = EulerDiscreteScheduler::new(&euler_cfg, n).expect("euler");
        assert_eq!(
            euler.timesteps(),
            tensor(&st, &format!("euler.n{n}.timesteps")).as_slice(),
            "euler.n{n}.timesteps"
        );
        check(
            &format!("euler.n{n}.sigmas"),
            &widen(euler.sigmas()),
            &tensor(&st, &format!("euler.n{n}.sigmas")),
        );
        let want = meta["schedulers"][format!("euler.n{n}.init_noise_sigma")]
            .as_f64()
            .expect("init_noise_sigma");
        check(
            &format!("euler.n{n}.init_noise_sigma"),
            &[euler.init_noise_sigma()],
            &[want],
        );
        let ddim = build(SchedulerKind::Ddim, &ddim_cfg, n).expect("ddim");
        assert_eq!(
            ddim.timesteps(),
            tensor(&st, &format!("ddim.n{n}.timesteps")).as_slice(),
            "ddim.n{n}.timesteps"
        );
        assert_eq!(ddim.init_noise_sigma(), 1.0);
    }
}

#[test]
fn chained_steps_match() {
    let bytes = read(refs_dir().join("schedulers.safetensors"));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let outputs = tensor_f32(&st, "step_model_outputs");
    let initial = tensor_f32(&st, "step_initial_sample");
    let len = initial.len();
    for (name, kind, config) in [
        ("euler", SchedulerKind::Euler, euler_config()),
        ("ddim", SchedulerKind::Ddim, ddim_config()),
    ] {
        let mut sched = build(kind, &config, 4).expect("build");
        let sigma = sched.init_noise_sigma() as f32;
        let mut sample: Vec<f32> = initial.iter().map(|&x| x * sigma).collect();
        for i in 0..4 {
            let scaled = sched.scale_model_input(&sample, i).expect("scale");
            check(
                &format!("{name}.step{i}.scaled_input"),
                &widen(&scaled),
                &tensor(&st, &format!("{name}.step{i}.scaled_input")),
            );
            let output = &outputs[i * len..(i + 1) * len];
            sample = sched.step(output, i, &sample, None).expect("step");
            check(
                &format!("{name}.step{i}.prev_sample"),
                &widen(&sample),
                &tensor(&st, &format!("{name}.step{i}.prev_sample")),
            );
        }
    }
}

/// Replays a reference pipeline's denoising loop from its stored UNet outputs.
fn replay_pipeline(file: &str, kind: SchedulerKind, config: &SchedulerConfig) {
    let bytes = read(refs_dir().join(format!("{file}.safetensors")));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let guidance = meta()[file]["call"]["guidance_scale"]
        .as_f64()
        .expect("guidance_scale") as f32;
    let mut sched = build(kind, config, 4).expect("build");
    assert_eq!(
        sched.timesteps(),
        tensor(&st, "timesteps").as_slice(),
        "{file}.timesteps"
    );
    check(
        &format!("{file}.init_noise_sigma"),
        &[sched.init_noise_sigma()],
        &tensor(&st, "init_noise_sigma"),
    );
    let sigma = sched.init_noise_sigma() as f32;
    let mut latents: Vec<f32> = tensor_f32(&st, "initial_noise")
        .iter()
        .map(|&x| x * sigma)
        .collect();
    let len = latents.len();
    for i in 0..4 {
        let timestep = tensor(&st, &format!("step{i}.timestep"));
        assert_eq!(timestep, [sched.timesteps()[i]], "{file}.step{i}.timestep");
        let scaled = sched.scale_model_input(&latents, i).expect("scale");
        let unet_in = tensor(&st, &format!("step{i}.unet_in"));
        for half in unet_in.chunks_exact(len) {
            check(&format!("{file}.step{i}.unet_in"), &widen(&scaled), half);
        }
        let out = tensor_f32(&st, &format!("step{i}.unet_out"));
        let (uncond, cond) = out.split_at(len);
        let guided: Vec<f32> = uncond
            .iter()
            .zip(cond)
            .map(|(&u, &c)| u + guidance * (c - u))
            .collect();
        latents = sched.step(&guided, i, &latents, None).expect("step");
        check(
            &format!("{file}.step{i}.latents"),
            &widen(&latents),
            &tensor(&st, &format!("step{i}.latents")),
        );
    }
}

#[test]
fn pipeline_euler_schedule_matches() {
    let bytes = read(refs_dir().join("pipeline_euler.safetensors"));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let euler = EulerDiscreteScheduler::new(&euler_config(), 4).expect("euler");
    check(
        "pipeline_euler.sigmas",
        &widen(euler.sigmas()),
        &tensor(&st, "sigmas"),
    );
    replay_pipeline("pipeline_euler", SchedulerKind::Euler, &euler_config());
}

#[test]
fn pipeline_ddim_schedule_matches() {
    replay_pipeline("pipeline_ddim", SchedulerKind::Ddim, &ddim_config());
}

#[test]
fn config_errors_name_file_and_key() {
    let path = root().join("models/tiny-sdxl/scheduler/scheduler_config.json");
    let err = SchedulerConfig::from_json_str("{\"beta_start\": ", Some(&path)).unwrap_err();
    assert!(err.to_string().contains("scheduler_config.json"), "{err}");
    let err = SchedulerConfig::from_json_str(r#"{"beta_schedule": "quadratic"}"#, Some(&path))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("beta_schedule") && msg.contains("scheduler_config.json"),
        "{msg}"
    );
    assert!(build(SchedulerKind::Euler, &euler_config(), 0).is_err());
}
