//! Patch parallelism of the tiny SDXL UNet over N ranks as threads (PCPP §1–§4): synchronous
//! steps reproduce the serial latents for 2, 3, 4 and 8 ranks with and without CFG split; stale
//! steps read context exactly one step old; the bytes the runtime counts equal the plan's formula
//! (`docs/parallelism.md`) and the transport's own counters; PCPP moves fewer bytes than
//! DistriFusion; a band that would be empty is a clear error.

use std::sync::Arc;

use pcpp_comm::{LocalTransport, Transport, TransportOptions};
use pcpp_core::plan::{generation_traffic, plan, step_traffic, PlanSetup};
use pcpp_core::{
    BandPlan, GnMode, ParallelConfig, ParallelMode, PatchRuntime, RunReport, SerialDriver,
    SerialFactory, SplitScheme, StepCtx, StepDriver, SyncMode, Traffic,
};
use pcpp_kernels::{DType, Tensor};
use pcpp_sdxl::{unet_inventory, UNet, UNetCond, UNetConfig};
use pcpp_tests::{assert_close, tiny_model, TOL_RANKS};

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// Latent rows and columns: 64 rows leave 32 at the coarse level, enough for 8 ranks, and split
/// unevenly over 3.
const H: usize = 64;
const W: usize = 8;

fn pattern(shape: &[usize], seed: f32, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|i| ((i as f32 * 0.618_034 + seed).sin() * 43_758.547).fract() * scale)
        .collect();
    Tensor::from_vec(shape, v).expect("pattern")
}

/// Text conditioning of one CFG branch (0 = unconditional).
fn branch_cond(branch: usize) -> (Tensor, Tensor, Tensor) {
    let s = branch as f32 * 3.0 + 1.0;
    (
        pattern(&[1, 8, 64], s, 1.0),
        pattern(&[1, 32], s + 0.5, 1.0),
        Tensor::from_vec(&[1, 6], vec![64.0, 64.0, 0.0, 0.0, 64.0, 64.0]).expect("ids"),
    )
}

fn cond_for(branches: &[usize]) -> UNetCond {
    let parts: Vec<_> = branches.iter().map(|&b| branch_cond(b)).collect();
    let cat = |f: &dyn Fn(&(Tensor, Tensor, Tensor)) -> &Tensor| {
        let ts: Vec<&Tensor> = parts.iter().map(f).collect();
        Tensor::cat(&ts, 0).expect("cat")
    };
    UNetCond::new(cat(&|p| &p.0), Some(cat(&|p| &p.1)), Some(cat(&|p| &p.2)))
}

/// The initial latent of every test run.
fn initial_latent() -> Tensor {
    pattern(&[1, 4, H, W], 0.25, 2.0)
}

/// One step of the small CFG loop: `x ← x − 0.1·(u + 2·(c − u))` from the model output `out`
/// (`[uncond; cond]`).
fn cfg_update(x: &Tensor, out: &Tensor) -> Result<Tensor, BoxErr> {
    let u = out.narrow(0, 0, 1)?;
    let c = out.narrow(0, 1, 1)?;
    let eps = u.add(&c.sub(&u)?.affine(2.0, 0.0)?)?;
    Ok(x.sub(&eps.affine(0.1, 0.0)?)?)
}

fn timestep(step: usize) -> Result<Tensor, BoxErr> {
    Ok(Tensor::from_vec(&[1], vec![900.0 - 100.0 * step as f32])?)
}

/// A small denoising loop with CFG, every step through `driver`.
fn denoise(unet: &UNet, driver: &dyn StepDriver, steps: usize) -> Result<Tensor, BoxErr> {
    let branches: Vec<usize> = match driver.cfg_branch() {
        Some(g) => vec![g],
        None => vec![0, 1],
    };
    let cond = cond_for(&branches);
    let mut x = initial_latent();
    driver.begin_generation()?;
    for step in 0..steps {
        let ctx = driver.step_ctx(step);
        let input = if branches.len() == 2 {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x.clone()
        };
        let out = unet.forward(&ctx, &input, &timestep(step)?, &cond, None)?;
        x = cfg_update(&x, &out)?;
    }
    driver.end_generation()?;
    Ok(x)
}

fn serial_latent(steps: usize) -> Tensor {
    let unet = UNet::load(&tiny_model().join("unet"), DType::F32, &SerialFactory).expect("unet");
    denoise(&unet, &SerialDriver, steps).expect("serial run")
}

struct RankOut {
    latent: Tensor,
    report: RunReport,
    slots: Vec<String>,
    /// The transports' own counters (group and world), per kind.
    transport: Traffic,
}

fn run_ranks(
    n: usize,
    cfg_split: bool,
    cfg: &ParallelConfig,
    steps: usize,
) -> Result<Vec<RankOut>, String> {
    LocalTransport::run(n, TransportOptions::default(), |t: Arc<dyn Transport>| {
        let rt = PatchRuntime::new(t, cfg_split, cfg.clone(), H, W, 1)?;
        let unet = UNet::load(&tiny_model().join("unet"), DType::F32, rt.factory())?;
        let latent = denoise(&unet, rt.driver(), steps)?;
        let transport = rt.transport_traffic();
        Ok::<_, BoxErr>(RankOut {
            latent,
            report: rt.report(),
            slots: rt.slot_ids(),
            transport,
        })
    })
    .map_err(|e| e.to_string())
}

fn all_sync(mut cfg: ParallelConfig, steps: usize) -> ParallelConfig {
    cfg.warmup_steps = steps;
    cfg
}

#[test]
fn synchronous_steps_equal_serial_for_2_3_4_8_ranks() {
    let steps = 2;
    let want = serial_latent(steps);
    for n in [2, 3, 4, 8] {
        for split in [false, true] {
            let cfg = all_sync(ParallelConfig::pcpp(0.3), steps);
            let outs = run_ranks(n, split, &cfg, steps).expect("ranks");
            for (r, o) in outs.iter().enumerate() {
                assert_close(
                    &format!("{n} ranks, cfg split {split}, rank {r}"),
                    &o.latent,
                    &want,
                    TOL_RANKS,
                );
                assert_eq!(o.report.max_stale_age, 0, "no stale reads when all sync");
            }
        }
    }
}

#[test]
fn distrifusion_and_group_norm_modes_are_exact_when_synchronous() {
    let steps = 2;
    let want = serial_latent(steps);
    for (name, cfg) in [
        ("distrifusion", ParallelConfig::distrifusion()),
        (
            "pcpp stale gn",
            ParallelConfig {
                gn_mode: GnMode::Stale,
                ..ParallelConfig::pcpp(0.0)
            },
        ),
    ] {
        let outs = run_ranks(3, false, &all_sync(cfg, steps), steps).expect("ranks");
        assert_close(name, &outs[0].latent, &want, TOL_RANKS);
    }
}

#[test]
fn one_rank_and_serial_mode_are_plain_serial() {
    let steps = 3;
    let want = serial_latent(steps);
    let one = run_ranks(1, true, &ParallelConfig::pcpp(0.3), steps).expect("1 rank");
    assert_eq!(one[0].latent.max_abs_diff(&want).unwrap(), 0.0);
    let serial = run_ranks(2, true, &ParallelConfig::serial(), steps).expect("serial mode");
    for o in &serial {
        assert_eq!(o.latent.max_abs_diff(&want).unwrap(), 0.0);
        assert_eq!(o.report.total.sent.total(), 0);
    }
}

#[test]
fn stale_steps_read_context_exactly_one_step_old() {
    let (steps, warmup) = (5, 2);
    for (cfg, split) in [
        (ParallelConfig::pcpp(0.3), false),
        (ParallelConfig::distrifusion(), true),
    ] {
        let cfg = ParallelConfig {
            warmup_steps: warmup,
            ..cfg
        };
        let outs = run_ranks(4, split, &cfg, steps).expect("ranks");
        let want = serial_latent(steps);
        for o in &outs {
            let rep = &o.report;
            assert_eq!(rep.steps.len(), steps);
            assert_eq!((rep.min_stale_age, rep.max_stale_age), (1, 1));
            for s in &rep.steps {
                let expect = if s.step < warmup { 0 } else { o.slots.len() };
                assert_eq!(s.stale_reads as usize, expect, "step {}", s.step);
                assert_eq!(s.sync, s.step < warmup);
            }
            // Stale context changes the result, but not wildly.
            let e = pcpp_tests::rel_err(&o.latent, &want);
            assert!(e > 0.0 && e < 0.5, "stale run error {e}");
            assert_eq!(
                o.latent.max_abs_diff(&outs[0].latent).unwrap(),
                0.0,
                "all ranks hold the same latent"
            );
        }
    }
}

fn tiny_config() -> UNetConfig {
    UNetConfig::from_file(&tiny_model().join("unet/config.json")).expect("config")
}

#[test]
fn registered_slots_match_the_inventory() {
    let inv = unet_inventory(&tiny_config());
    let outs = run_ranks(2, false, &ParallelConfig::pcpp(0.3), 1).expect("ranks");
    assert_eq!(outs[0].slots, inv.slot_ids());
    assert!(inv.slot_ids().len() > 20);
}

#[test]
fn measured_bytes_equal_the_plan_formula() {
    let inv = unet_inventory(&tiny_config());
    let (steps, warmup) = (3, 1);
    let mut steady = Vec::new();
    let pcpp = ParallelConfig::pcpp(0.3);
    let df = ParallelConfig::distrifusion();
    let all = vec![
        pcpp.clone(),
        ParallelConfig::pcpp(1.5),
        df.clone(),
        ParallelConfig::naive_patch(),
        ParallelConfig {
            gn_mode: GnMode::Separate,
            ..ParallelConfig::pcpp(0.0)
        },
        ParallelConfig {
            gn_mode: GnMode::Sync,
            ..ParallelConfig::pcpp(0.3)
        },
        ParallelConfig {
            gn_mode: GnMode::Stale,
            ..ParallelConfig::distrifusion()
        },
        ParallelConfig {
            sync_mode: SyncMode::Full,
            ..ParallelConfig::pcpp(0.3)
        },
        ParallelConfig {
            sync_mode: SyncMode::None,
            ..ParallelConfig::pcpp(0.3)
        },
    ];
    for (n, split, cfgs) in [(3, false, all), (5, true, vec![pcpp, df])] {
        for base in cfgs {
            let cfg = ParallelConfig {
                warmup_steps: warmup,
                ..base
            };
            let outs = run_ranks(n, split, &cfg, steps).expect("ranks");
            let setup = PlanSetup {
                height: H,
                width: W,
                world_size: n,
                cfg_split: split,
                batch: if split { 1 } else { 2 },
                elem_size: 4,
            };
            let p = plan(&inv, &setup, &cfg).expect("plan");
            for (r, o) in outs.iter().enumerate() {
                let what = format!("{} n={n} split={split} rank {r}", cfg.mode);
                for s in &o.report.steps {
                    let want = if s.sync {
                        p.ranks[r].warmup
                    } else {
                        p.ranks[r].steady
                    };
                    assert_eq!(s.traffic, want, "{what} step {}", s.step);
                }
                assert_eq!(
                    o.report.total,
                    generation_traffic(&p, r, steps),
                    "{what} total"
                );
                assert_eq!(o.transport, o.report.total, "{what}: transport counters");
            }
            if n == 3 {
                steady.push((cfg.mode, cfg.portion[0], p.bytes_per_step));
            }
        }
    }
    let bytes = |m: ParallelMode, portion: f64| {
        steady
            .iter()
            .find(|s| s.0 == m && (s.1 == portion || m != ParallelMode::Pcpp))
            .map(|s| s.2)
            .expect("measured")
    };
    let (pcpp, df) = (
        bytes(ParallelMode::Pcpp, 0.3),
        bytes(ParallelMode::DistriFusion, 0.0),
    );
    assert!(pcpp < df, "pcpp {pcpp} ≥ distrifusion {df}");
    assert!(bytes(ParallelMode::NaivePatch, 0.0) < pcpp);
}

#[test]
fn a_band_that_would_be_empty_is_an_error() {
    let err = LocalTransport::run(8, TransportOptions::default(), |t| {
        PatchRuntime::new(t, false, ParallelConfig::pcpp(0.3), 8, 8, 1).map(|_| ())
    })
    .expect_err("8 ranks on 4 coarse rows");
    let msg = err.to_string();
    assert!(msg.contains("band would be empty"), "{msg}");
}

#[test]
fn stale_pcpp_beats_naive_patch_and_full_portion_is_distrifusion() {
    let (steps, n) = (4, 4);
    let want = serial_latent(steps);
    let run = |cfg: ParallelConfig| {
        let cfg = ParallelConfig {
            warmup_steps: 1,
            ..cfg
        };
        run_ranks(n, false, &cfg, steps)
            .expect("ranks")
            .remove(0)
            .latent
    };
    let pcpp = run(ParallelConfig::pcpp(0.3));
    let naive = run(ParallelConfig::naive_patch());
    let (e_pcpp, e_naive) = (
        pcpp_tests::rel_err(&pcpp, &want),
        pcpp_tests::rel_err(&naive, &want),
    );
    assert!(
        e_pcpp * 5.0 < e_naive,
        "pcpp error {e_pcpp:.3e} vs naive patch {e_naive:.3e}"
    );
    // `portion ≥ n − 1` reaches every band: DistriFusion exactly.
    let full = run(ParallelConfig::pcpp((n - 1) as f64));
    let df = run(ParallelConfig::distrifusion());
    assert_eq!(full.max_abs_diff(&df).unwrap(), 0.0);
    assert!(pcpp.max_abs_diff(&df).unwrap() > 0.0);
}

#[test]
fn full_sync_mode_equals_serial_at_every_step() {
    let steps = 3;
    let want = serial_latent(steps);
    for n in [2, 3, 4] {
        for split in [false, true] {
            let cfg = ParallelConfig {
                sync_mode: SyncMode::Full,
                warmup_steps: 1,
                ..ParallelConfig::pcpp(0.3)
            };
            let outs = run_ranks(n, split, &cfg, steps).expect("ranks");
            for (r, o) in outs.iter().enumerate() {
                let what = format!("full sync, {n} ranks, cfg split {split}, rank {r}");
                assert_close(&what, &o.latent, &want, TOL_RANKS);
                assert!(o.report.steps.iter().all(|s| s.sync), "{what}");
                assert_eq!(o.report.max_stale_age, 0, "{what}");
                // Every step moves the warm-up volume.
                let first = o.report.steps[0].traffic;
                assert_eq!(first.recvd.attention > 0, o.report.group_size > 1, "{what}");
                for s in &o.report.steps {
                    assert_eq!(s.traffic, first, "{what} step {}", s.step);
                }
            }
        }
    }
}

#[test]
fn no_sync_mode_moves_only_the_gather_after_warmup() {
    let (steps, warmup, n) = (5, 2, 4);
    let want = serial_latent(steps);
    let base = ParallelConfig {
        warmup_steps: warmup,
        ..ParallelConfig::pcpp(0.3)
    };
    let none = ParallelConfig {
        sync_mode: SyncMode::None,
        ..base.clone()
    };
    let outs = run_ranks(n, false, &none, steps).expect("ranks");
    let asynch = run_ranks(n, false, &base, steps).expect("ranks");
    let inv = unet_inventory(&tiny_config());
    // Slots read in stale steps: halo convs and self-attentions (group norms go local).
    let frozen = inv
        .layers
        .iter()
        .filter(|l| {
            matches!(
                l.kind,
                pcpp_core::LayerKind::Conv { .. } | pcpp_core::LayerKind::SelfAttention { .. }
            )
        })
        .count();
    for (r, o) in outs.iter().enumerate() {
        let rep = &o.report;
        for s in &rep.steps {
            let t = &s.traffic;
            if s.step < warmup {
                assert!(s.sync);
                assert!(t.recvd.halo > 0 && t.recvd.attention > 0 && t.recvd.group_norm > 0);
                continue;
            }
            assert!(!s.sync, "rank {r} step {}", s.step);
            for k in [&t.sent, &t.recvd] {
                assert_eq!(
                    (k.halo, k.group_norm, k.attention),
                    (0, 0, 0),
                    "rank {r} step {}: no exchange after warm-up",
                    s.step
                );
                assert!(k.gather > 0, "the output is still gathered");
            }
            assert_eq!(s.stale_reads as usize, frozen, "rank {r} step {}", s.step);
        }
        // The frozen context is that of the last warm-up step.
        assert_eq!(rep.min_stale_age, 1);
        assert_eq!(rep.max_stale_age as usize, steps - warmup);
        let e_none = pcpp_tests::rel_err(&o.latent, &want);
        let e_async = pcpp_tests::rel_err(&asynch[r].latent, &want);
        assert!(e_none > 0.0 && e_none < 0.5, "no-sync error {e_none}");
        assert!(o.latent.max_abs_diff(&asynch[r].latent).unwrap() > 0.0);
        assert!(
            e_async < e_none,
            "async {e_async:.3e} vs no sync {e_none:.3e}"
        );
    }
}

/// Naive patch parallelism by hand: every band of the latent denoised as a separate image by the
/// serial UNet, cut into `n` row or column bands as `scheme` says for each step.
fn naive_reference(scheme: SplitScheme, n: usize, steps: usize) -> Tensor {
    let unet = UNet::load(&tiny_model().join("unet"), DType::F32, &SerialFactory).expect("unet");
    let cond = cond_for(&[0, 1]);
    let mut x = initial_latent();
    for step in 0..steps {
        let cols = scheme.cols_at(step);
        let (axis, bands) = if cols {
            (3, BandPlan::new(W, H, 1, n).expect("column bands"))
        } else {
            (2, BandPlan::new(H, W, 1, n).expect("row bands"))
        };
        let outs: Vec<Tensor> = (0..n)
            .map(|j| {
                let r = bands.band(0, j);
                let xs = x.narrow(axis, r.start, r.len()).expect("band");
                let input = Tensor::cat(&[&xs, &xs], 0).expect("cat");
                let ctx = StepCtx { step, sync: true };
                unet.forward(&ctx, &input, &timestep(step).expect("t"), &cond, None)
                    .expect("band forward")
            })
            .collect();
        let refs: Vec<&Tensor> = outs.iter().collect();
        let out = Tensor::cat(&refs, axis).expect("cat bands");
        x = cfg_update(&x, &out).expect("update");
    }
    x
}

#[test]
fn naive_patch_split_schemes_cut_rows_columns_or_alternate() {
    let steps = 3;
    let inv = unet_inventory(&tiny_config());
    let mut latents = Vec::new();
    for scheme in [SplitScheme::Rows, SplitScheme::Cols, SplitScheme::Alternate] {
        let cfg = ParallelConfig {
            split_scheme: scheme,
            ..ParallelConfig::naive_patch()
        };
        // 3 ranks: 22/22/20 rows but 4/2/2 columns of the 64×8 latent, so the bytes differ.
        let n = 3;
        let outs = run_ranks(n, false, &cfg, steps).expect("ranks");
        let want = naive_reference(scheme, n, steps);
        let setup = PlanSetup {
            height: H,
            width: W,
            world_size: n,
            cfg_split: false,
            batch: 2,
            elem_size: 4,
        };
        let p = plan(&inv, &setup, &cfg).expect("plan");
        for (r, o) in outs.iter().enumerate() {
            let what = format!("{scheme} rank {r}");
            assert_eq!(o.latent.shape(), &[1, 4, H, W], "{what}");
            assert_close(&what, &o.latent, &want, TOL_RANKS);
            for s in &o.report.steps {
                assert_eq!(
                    s.traffic,
                    step_traffic(&p, r, s.step),
                    "{what} step {}",
                    s.step
                );
                // Each rank sends its band of the [2, 4, ·, ·] f32 output to the 2 others.
                let cols = scheme.cols_at(s.step);
                let band = match (cols, r) {
                    (false, 2) => 20 * W,
                    (false, _) => 22 * W,
                    (true, 0) => 4 * H,
                    (true, _) => 2 * H,
                };
                assert_eq!(
                    s.traffic.sent.gather as usize,
                    2 * 2 * 4 * band * 4,
                    "{what}"
                );
                assert_eq!(s.traffic.sent.total(), s.traffic.sent.gather);
            }
            assert_eq!(o.report.total, generation_traffic(&p, r, steps), "{what}");
            assert_eq!(o.transport, o.report.total, "{what}: transport counters");
        }
        latents.push(outs[0].latent.clone());
    }
    let d = |a: usize, b: usize| latents[a].max_abs_diff(&latents[b]).unwrap();
    assert!(d(0, 1) > 0.0, "cols differ from rows");
    assert!(d(0, 2) > 0.0, "alternate differs from rows");
    assert!(d(1, 2) > 0.0, "alternate differs from cols");
    // Too many column bands is the same clear error as too many row bands.
    let err = LocalTransport::run(5, TransportOptions::default(), |t| {
        let cfg = ParallelConfig {
            split_scheme: SplitScheme::Cols,
            ..ParallelConfig::naive_patch()
        };
        PatchRuntime::new(t, false, cfg, H, W, 1).map(|_| ())
    })
    .expect_err("5 column bands of 4 coarse columns");
    assert!(err.to_string().contains("band would be empty"), "{err}");
}

#[test]
fn tensor_parallel_equals_serial_and_moves_the_planned_bytes() {
    let steps = 2;
    let want = serial_latent(steps);
    let inv = unet_inventory(&tiny_config());
    // 2 ranks without CFG split and 4 ranks with it: tensor parallelism over groups of 2 (the
    // tiny model's first blocks have 2 channels, so a group of 4 cannot split them, below).
    for (n, split) in [(2, false), (2, true), (4, true)] {
        {
            let cfg = ParallelConfig::tensor();
            let outs = run_ranks(n, split, &cfg, steps).expect("ranks");
            let setup = PlanSetup {
                height: H,
                width: W,
                world_size: n,
                cfg_split: split,
                batch: if split { 1 } else { 2 },
                elem_size: 4,
            };
            let p = plan(&inv, &setup, &cfg).expect("plan");
            for (r, o) in outs.iter().enumerate() {
                let what = format!("tensor, {n} ranks, cfg split {split}, rank {r}");
                assert_close(&what, &o.latent, &want, TOL_RANKS);
                assert!(o.slots.is_empty(), "{what}: no stale slots");
                for s in &o.report.steps {
                    assert_eq!(
                        s.traffic,
                        step_traffic(&p, r, s.step),
                        "{what} step {}",
                        s.step
                    );
                    let t = &s.traffic.sent;
                    assert_eq!((t.halo, t.group_norm, t.attention), (0, 0, 0), "{what}");
                    assert_eq!(t.all_reduce > 0, o.report.group_size > 1, "{what}");
                }
                assert_eq!(o.transport, o.report.total, "{what}: transport counters");
            }
        }
    }
    let Err(err) = run_ranks(4, false, &ParallelConfig::tensor(), 1) else {
        panic!("a 4-way split of 2 channels must fail");
    };
    assert!(err.contains("needs at least 4 channels"), "{err}");
}
