//! A second model through the patch-parallel core: the Flux-style DiT of `src/dit.rs` (random
//! weights; patchify stride 2, model-side q/k/v with QK-norm and a RoPE at each token's absolute
//! position, always-local text tokens in a joint attention) over N ranks as threads, driven by
//! the core's denoising loop. Synchronous steps equal serial for 2, 3 and 4 ranks (uneven bands
//! of the 14-row token grid; a RoPE that ignored the band offset would fail this) and with CFG
//! split; stale steps read image context one step old; the bytes equal the plan built from its
//! inventory (text K/V never travel); the registered slots are the inventory's.

use std::sync::Arc;

use pcpp_comm::{LocalTransport, Transport, TransportOptions};
use pcpp_core::plan::{plan, PlanSetup};
use pcpp_core::{
    denoise_loop, LoopOptions, ParallelConfig, PatchRuntime, RunReport, Sampler, SerialDriver,
    SerialFactory, StepDriver,
};
use pcpp_kernels::{DType, KernelError, Tensor};
use pcpp_tests::dit::{Dit, DitConfig, WeightRng};
use pcpp_tests::{assert_close, TOL_RANKS};

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// Latent size; the token grid (the bands' unit) is `H/2 × W/2`.
const H: usize = 28;
const W: usize = 8;
const P: usize = 2;
const TXT: usize = 5;
const SEED: u64 = 7;

/// A fixed-step sampler: `x − 0.1·prediction` at timesteps 800, 650, …
struct Toy(Vec<f64>);

impl Sampler for Toy {
    type Error = KernelError;

    fn timesteps(&self) -> &[f64] {
        &self.0
    }

    fn model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor, KernelError> {
        Ok(sample.clone())
    }

    fn advance(
        &mut self,
        prediction: &Tensor,
        _step: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor, KernelError> {
        sample.sub(&prediction.affine(0.1, 0.0)?)
    }
}

/// The final latents after `steps` steps; with `guidance`, CFG over unconditional (zero) and
/// conditional text tokens, this rank's branch only when the driver splits the branches.
fn denoise(
    model: &Dit,
    driver: &dyn StepDriver,
    steps: usize,
    guidance: Option<f32>,
) -> Result<Tensor, BoxErr> {
    let x = WeightRng::new(99).tensor(&[1, 4, H, W], 1.0);
    let dim = DitConfig::default().dim;
    let cond = WeightRng::new(5).tensor(&[1, TXT, dim], 1.0);
    let txt = match (guidance, driver.cfg_branch()) {
        (None, _) | (Some(_), Some(1)) => cond,
        (Some(_), Some(_)) => Tensor::zeros(&[1, TXT, dim], DType::F32),
        (Some(_), None) => Tensor::cat(&[&Tensor::zeros(&[1, TXT, dim], DType::F32), &cond], 0)?,
    };
    let mut sched = Toy((0..steps).map(|s| 800.0 - 150.0 * s as f64).collect());
    let opts = LoopOptions {
        first: 0,
        guidance,
        cuda_graphs: false,
    };
    let out = denoise_loop(
        model,
        &txt,
        driver,
        &mut sched,
        x,
        &opts,
        &mut |_| Err("the toy sampler needs no noise".into()),
        &mut |_, _| {},
    )?;
    assert_eq!(out.nonfinite_at, None);
    Ok(out.latents)
}

fn serial(steps: usize, guidance: Option<f32>) -> Tensor {
    let m = Dit::random(DitConfig::default(), SEED, &SerialFactory).expect("model");
    denoise(&m, &SerialDriver, steps, guidance).expect("serial")
}

fn ranks(
    n: usize,
    cfg: &ParallelConfig,
    steps: usize,
    guidance: Option<f32>,
) -> Vec<(Tensor, RunReport, Vec<String>)> {
    LocalTransport::run(n, TransportOptions::default(), |t: Arc<dyn Transport>| {
        let split = guidance.is_some();
        let rt = PatchRuntime::new(t, split, cfg.clone(), H / P, W / P, 0)?;
        let m = Dit::random(DitConfig::default(), SEED, rt.factory())?;
        let x = denoise(&m, rt.driver(), steps, guidance)?;
        Ok::<_, BoxErr>((x, rt.report(), rt.slot_ids()))
    })
    .expect("ranks")
}

#[test]
fn dit_synchronous_steps_equal_serial() {
    let steps = 2;
    let want = serial(steps, None);
    for n in [2, 3, 4] {
        for cfg in [ParallelConfig::pcpp(0.3), ParallelConfig::distrifusion()] {
            let cfg = ParallelConfig {
                warmup_steps: steps,
                ..cfg
            };
            for (r, (x, _, _)) in ranks(n, &cfg, steps, None).iter().enumerate() {
                assert_close(
                    &format!("dit {} n={n} rank {r}", cfg.mode),
                    x,
                    &want,
                    TOL_RANKS,
                );
            }
        }
    }
}

#[test]
fn dit_cfg_split_through_the_core_loop_equals_serial() {
    let (steps, g) = (2, Some(3.0));
    let want = serial(steps, g);
    let cfg = ParallelConfig {
        warmup_steps: steps,
        ..ParallelConfig::pcpp(0.3)
    };
    // Five ranks: branch groups of three (uneven bands) and two.
    for (r, (x, _, _)) in ranks(5, &cfg, steps, g).iter().enumerate() {
        assert_close(&format!("dit cfg split rank {r}"), x, &want, TOL_RANKS);
    }
}

#[test]
fn dit_stale_steps_and_bytes_follow_the_plan() {
    let (steps, n) = (4, 3);
    let inv = Dit::inventory(&DitConfig::default());
    let cfg = ParallelConfig {
        warmup_steps: 1,
        ..ParallelConfig::pcpp(0.5)
    };
    let setup = PlanSetup {
        height: H / P,
        width: W / P,
        world_size: n,
        cfg_split: false,
        batch: 1,
        elem_size: 4,
    };
    let p = plan(&inv, &setup, &cfg).expect("plan");
    let want = serial(steps, None);
    for (r, (x, rep, slots)) in ranks(n, &cfg, steps, None).iter().enumerate() {
        assert_eq!(slots, &inv.slot_ids());
        assert_eq!((rep.min_stale_age, rep.max_stale_age), (1, 1));
        for s in &rep.steps {
            let plan_step = if s.sync {
                p.ranks[r].warmup
            } else {
                p.ranks[r].steady
            };
            assert_eq!(s.traffic, plan_step, "rank {r} step {}", s.step);
        }
        let e = pcpp_tests::rel_err(x, &want);
        assert!(e > 0.0 && e < 0.5, "stale error {e}");
    }
}
