//! Flux.1 patch-parallel through the core (issue #19): the tiny FLUX.1-dev and -schnell
//! transformers (`models/tiny-flux-*`, their real random weights) over N ranks as threads, the
//! flow-matching pipeline driving the core's denoising loop. Image tokens are banded by packed
//! rows (a 7-row token grid: uneven bands for 2, 3 and 4 ranks), text tokens are on every rank.
//!
//! - Every step synchronous (warm-up covering every step, or `SyncMode::Full` after it) equals the
//!   serial run ≤ `TOL_RANKS`. This also fails if RoPE ignored the band offset: every band's image
//!   tokens would then be rotated as if they were the image's top rows.
//! - Stale PCPP, DistriFusion and naive patch run, and every rank's bytes in every step equal the
//!   plan built from [`pcpp_flux::flux_inventory`]; the registered slots are the inventory's.

use std::sync::Arc;

use pcpp_comm::{LocalTransport, Transport, TransportOptions};
use pcpp_core::plan::{plan, PlanSetup};
use pcpp_core::{LayerFactory, SerialFactory};
use pcpp_core::{
    ParallelConfig, ParallelMode, PatchRuntime, RunReport, SerialDriver, StepDriver, SyncMode,
};
use pcpp_flux::{flux_inventory, FluxParts, FluxPipeline, FluxPrompt, FluxTransformerConfig};
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_tests::{assert_close, rel_err, repo, TOL_RANKS};

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// Unpacked latent size (the tiny VAE's factor is 2: a 28 × 12 image); the token grid is 7 × 3.
const LH: usize = 14;
const LW: usize = 6;
const TXT: usize = 6;

/// A deterministic pattern in [-1, 1).
fn pattern(shape: &[usize], seed: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|i| (((i as f32 * 0.618_034 + seed).sin() * 43_758.547).fract()) * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(shape, v).unwrap()
}

fn pipeline(variant: &str, f: &dyn LayerFactory) -> Result<FluxPipeline, BoxErr> {
    let dir = repo().join(format!("models/tiny-flux-{variant}"));
    let parts = FluxParts {
        encoders: false,
        decoder: false,
    };
    Ok(FluxPipeline::load_parts(
        &dir,
        DType::F32,
        DType::F32,
        Device::Cpu,
        f,
        parts,
    )?)
}

fn config(variant: &str) -> FluxTransformerConfig {
    let p = repo().join(format!(
        "models/tiny-flux-{variant}/transformer/config.json"
    ));
    FluxTransformerConfig::from_file(&p).expect("config")
}

/// The final latents of `steps` steps from fixed noise and text states.
fn denoise(pipe: &FluxPipeline, driver: &dyn StepDriver, steps: usize) -> Result<Tensor, BoxErr> {
    let c = pipe.transformer().config();
    let prompt = FluxPrompt {
        t5: pattern(&[1, TXT, c.joint_attention_dim], 1.0),
        pooled: pattern(&[1, c.pooled_projection_dim], 2.0),
        truncated: false,
    };
    let noise = pattern(&[1, c.in_channels / 4, LH, LW], 3.0);
    let guidance = pipe.embeds_guidance().then_some(3.5);
    let out = pipe.denoise(
        &prompt,
        &noise,
        steps,
        guidance,
        driver,
        false,
        &mut |_, _| {},
    )?;
    assert_eq!(out.nonfinite_at, None);
    Ok(out.latents)
}

fn serial(variant: &str, steps: usize) -> Tensor {
    let pipe = pipeline(variant, &SerialFactory).expect("serial pipeline");
    denoise(&pipe, &SerialDriver, steps).expect("serial")
}

fn ranks(
    variant: &str,
    n: usize,
    cfg: &ParallelConfig,
    steps: usize,
) -> Vec<(Tensor, RunReport, Vec<String>)> {
    LocalTransport::run(n, TransportOptions::default(), |t: Arc<dyn Transport>| {
        let rt = PatchRuntime::new(t, false, cfg.clone(), LH / 2, LW / 2, 0)?;
        let pipe = pipeline(variant, rt.factory())?;
        let x = denoise(&pipe, rt.driver(), steps)?;
        Ok::<_, BoxErr>((x, rt.report(), rt.slot_ids()))
    })
    .expect("ranks")
}

fn synchronous_equals_serial(variant: &str) {
    let steps = 3;
    let want = serial(variant, steps);
    let full_after_warmup = |c: ParallelConfig| ParallelConfig {
        warmup_steps: 1,
        sync_mode: SyncMode::Full,
        ..c
    };
    let all_warmup = |c: ParallelConfig| ParallelConfig {
        warmup_steps: steps,
        ..c
    };
    for n in [2, 3, 4] {
        for cfg in [
            all_warmup(ParallelConfig::pcpp(0.3)),
            full_after_warmup(ParallelConfig::pcpp(0.3)),
            full_after_warmup(ParallelConfig::distrifusion()),
        ] {
            for (r, (x, rep, _)) in ranks(variant, n, &cfg, steps).iter().enumerate() {
                assert!(
                    rep.steps.iter().all(|s| s.sync),
                    "n={n} rank {r}: a stale step"
                );
                let name = format!(
                    "flux {variant} {} {:?} n={n} rank {r}",
                    cfg.mode, cfg.sync_mode
                );
                assert_close(&name, x, &want, TOL_RANKS);
            }
        }
    }
}

#[test]
fn flux_dev_synchronous_ranks_equal_serial() {
    synchronous_equals_serial("dev");
}

#[test]
fn flux_schnell_synchronous_ranks_equal_serial() {
    synchronous_equals_serial("schnell");
}

#[test]
fn flux_stale_modes_run_and_bytes_follow_the_plan() {
    let (steps, n) = (3, 3);
    let inv = flux_inventory(&config("dev"));
    let setup = PlanSetup {
        height: LH / 2,
        width: LW / 2,
        world_size: n,
        cfg_split: false,
        batch: 1,
        elem_size: 4,
    };
    let want = serial("dev", steps);
    let with_warmup = |c: ParallelConfig| ParallelConfig {
        warmup_steps: 1,
        ..c
    };
    for cfg in [
        with_warmup(ParallelConfig::pcpp(0.5)),
        with_warmup(ParallelConfig::distrifusion()),
        ParallelConfig::naive_patch(),
    ] {
        let p = plan(&inv, &setup, &cfg).expect("plan");
        for (r, (x, rep, slots)) in ranks("dev", n, &cfg, steps).iter().enumerate() {
            let what = format!("{} rank {r}", cfg.mode);
            // naive patch keeps no stale context
            let want_slots = match cfg.mode {
                ParallelMode::NaivePatch => Vec::new(),
                _ => inv.slot_ids(),
            };
            assert_eq!(slots, &want_slots, "{what}");
            assert_eq!(rep.steps.len(), steps, "{what}");
            for s in &rep.steps {
                let plan_step = if s.sync {
                    p.ranks[r].warmup
                } else {
                    p.ranks[r].steady
                };
                assert_eq!(s.traffic, plan_step, "{what} step {}", s.step);
            }
            // stale (or no) context changes the result, but not by much
            let e = rel_err(x, &want);
            assert!(e > 0.0 && e < 0.5, "{what}: stale error {e}");
        }
        // something travels in every mode but naive patch's steady steps
        assert!(
            p.ranks.iter().all(|r| r.warmup.recvd.total() > 0),
            "{}",
            cfg.mode
        );
    }
}
