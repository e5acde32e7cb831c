//! A second model through the patch-parallel core: the Flux-style DiT of `src/dit.rs` (random
//! weights; patchify stride 2, model-side q/k/v with QK-norm and a RoPE at each token's absolute
//! position, always-local text tokens in a joint attention) over N ranks as threads. Synchronous
//! steps equal serial for 2, 3 and 4 ranks (uneven bands of the 14-row token grid; a RoPE that
//! ignored the band offset would fail this); stale steps read image context one step old; the
//! bytes equal the plan built from its inventory (text K/V never travel); the registered slots
//! are the inventory's.

use std::sync::Arc;

use pcpp_comm::{LocalTransport, Transport, TransportOptions};
use pcpp_core::plan::{plan, PlanSetup};
use pcpp_core::{ParallelConfig, PatchRuntime, RunReport, SerialDriver, SerialFactory, StepDriver};
use pcpp_kernels::Tensor;
use pcpp_tests::dit::{Dit, DitConfig, WeightRng};
use pcpp_tests::{assert_close, TOL_RANKS};

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// Latent size; the token grid (the bands' unit) is `H/2 × W/2`.
const H: usize = 28;
const W: usize = 8;
const P: usize = 2;
const TXT: usize = 5;
const SEED: u64 = 7;

fn denoise(model: &Dit, driver: &dyn StepDriver, steps: usize) -> Result<Tensor, BoxErr> {
    let mut x = WeightRng::new(99).tensor(&[1, 4, H, W], 1.0);
    let txt = WeightRng::new(5).tensor(&[1, TXT, DitConfig::default().dim], 1.0);
    driver.begin_generation()?;
    for step in 0..steps {
        let ctx = driver.step_ctx(step);
        let t = Tensor::from_vec(&[1], vec![800.0 - 150.0 * step as f32])?;
        let eps = model.forward(&ctx, &x, &t, &txt)?;
        x = x.sub(&eps.affine(0.1, 0.0)?)?;
    }
    driver.end_generation()?;
    Ok(x)
}

fn serial(steps: usize) -> Tensor {
    let m = Dit::random(DitConfig::default(), SEED, &SerialFactory).expect("model");
    denoise(&m, &SerialDriver, steps).expect("serial")
}

fn ranks(n: usize, cfg: &ParallelConfig, steps: usize) -> Vec<(Tensor, RunReport, Vec<String>)> {
    LocalTransport::run(n, TransportOptions::default(), |t: Arc<dyn Transport>| {
        let rt = PatchRuntime::new(t, false, cfg.clone(), H / P, W / P, 0)?;
        let m = Dit::random(DitConfig::default(), SEED, rt.factory())?;
        let x = denoise(&m, rt.driver(), steps)?;
        Ok::<_, BoxErr>((x, rt.report(), rt.slot_ids()))
    })
    .expect("ranks")
}

#[test]
fn dit_synchronous_steps_equal_serial() {
    let steps = 2;
    let want = serial(steps);
    for n in [2, 3, 4] {
        for cfg in [ParallelConfig::pcpp(0.3), ParallelConfig::distrifusion()] {
            let cfg = ParallelConfig {
                warmup_steps: steps,
                ..cfg
            };
            for (r, (x, _, _)) in ranks(n, &cfg, steps).iter().enumerate() {
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
    let want = serial(steps);
    for (r, (x, rep, slots)) in ranks(n, &cfg, steps).iter().enumerate() {
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
