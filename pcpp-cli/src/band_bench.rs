//! `pcpp-cli bench --parallel MODE --ranks N`: the steady denoising step of one rank of patch
//! parallelism (PCPP §1–§4; the per-rank measurement of §7.4's communication/computation
//! overlap), measured alone on one device.
//!
//! Rank `r` of `N` is built with [`SoloTransport`]s: the same layers, bands, windows and byte
//! accounting as in a real run, but its messages are not delivered (receives read zeros), so the
//! time is this rank's computation — including packing what it sends and merging what it
//! receives — without any wait for other ranks. On a GPU the steady (stale) step is also captured
//! as a CUDA graph per step parity, the way a device-resident run replays it. Bytes per step come
//! from the runtime's report of the same step, so the time and the traffic belong together; the
//! modelled multi-GPU speed-up of `docs/benchmarks.md` combines them.
//!
//! With `--ranks 1` (or `--parallel serial`) it times the serial UNet step of the whole image:
//! the baseline of the patch efficiency `T_full / (N · T_patch)`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pcpp_comm::{SoloTransport, Transport, TransportOptions};
use pcpp_core::{ParallelConfig, ParallelMode, PatchRuntime, ProcessGrid, StepDriver, Traffic};
use pcpp_kernels::cpu::profile;
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::weights::Weights;
use pcpp_sdxl::{StepGraphs, UNet, UNetCond, UNetConfig};

use crate::bench::{median, Args};
use crate::generate::parse_portions;
use crate::kernel_costs::KernelCost;

/// What one rank measured.
struct RankResult {
    rank: usize,
    group_size: usize,
    fed_batch: usize,
    rows: usize,
    sync_ms: f64,
    eager_ms: f64,
    graph_ms: Option<f64>,
    /// Largest difference between a graph replay and the eager step, relative to max |eager|.
    graph_diff: f32,
    /// Whether the replay was compared with the eager step (only when those are stationary).
    graph_check: bool,
    traffic: Traffic,
    /// With --kernel-costs: each kind of node's cost inside the replayed step.
    costs: Vec<KernelCost>,
}

fn sync_device(device: Device) -> Result<()> {
    Ok(pcpp_kernels::synchronize(device)?)
}

/// Runs the per-rank step benchmark.
pub fn run(a: &Args) -> Result<()> {
    a.device.check_built()?;
    let device = a.device.device(0);
    let dtype = a.dtype.unwrap_or(match device {
        Device::Cpu => DType::F32,
        Device::Cuda(_) => DType::F16,
    });
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    if let Some(r) = a.rank {
        if r >= a.ranks {
            bail!("--rank {r}: must be below --ranks {}", a.ranks);
        }
    }
    if a.iters == 0 || a.batch == 0 {
        bail!("--iters and --batch must be at least 1");
    }
    let config = match (&a.config, a.random_weights) {
        (Some(c), true) => c.clone(),
        (None, true) => a.model.join("unet/config.json"),
        (Some(c), false) => bail!(
            "--config {} needs --random-weights (weights come from --model otherwise)",
            c.display()
        ),
        (None, false) => a.model.join("unet/config.json"),
    };
    let ucfg =
        UNetConfig::from_file(&config).with_context(|| format!("reading {}", config.display()))?;
    let factor = ucfg.downsample_factor();
    if a.height % factor != 0 || a.width % factor != 0 {
        bail!(
            "--height {} --width {}: latent sizes must be multiples of {factor}",
            a.height,
            a.width
        );
    }
    let mode = if a.ranks == 1 {
        ParallelMode::Serial
    } else {
        a.parallel
    };
    if mode == ParallelMode::Tensor {
        bail!("--parallel tensor: the per-rank step bench covers patch modes (pcpp, distrifusion, naive-patch, serial)");
    }
    let portions = parse_portions(&a.portion)?;
    // Sync warm-up steps, then the untimed and the timed steady steps.
    let warm = match mode {
        ParallelMode::Pcpp | ParallelMode::DistriFusion => a.warmup_steps.unwrap_or(1).max(1),
        _ => 0,
    };
    let graph_on = !a.no_graph && matches!(device, Device::Cuda(_));
    let steps = warm + 2 * (3 + a.warmup + a.iters);
    let pcfg = ParallelConfig::preset(mode, &portions, Some(warm), steps);
    pcfg.validate()?;
    let cfg_split = a.batch == 2 && !a.no_cfg_split && a.ranks >= 2;
    let ranks: Vec<usize> = match a.rank {
        Some(r) => vec![r],
        None => (0..a.ranks).collect(),
    };
    let weights = if a.random_weights || a.config.is_some() {
        Weights::random_for_unet_config(&config, dtype, a.seed)?
    } else {
        let dir = a.model.join("unet");
        pcpp_sdxl::weights::find_weight_file(&dir, "diffusion_pytorch_model")
            .and_then(|f| Weights::open(&f, dtype))
            .with_context(|| format!("loading the UNet of {}", a.model.display()))?
    }
    .on_device(device)
    .keep_taken();

    // Every attention kernel of --attention with every small-row GEMM choice of --small-gemm.
    let listed = |v: &[String]| -> Vec<Option<String>> {
        if v.is_empty() {
            vec![None]
        } else {
            v.iter().cloned().map(Some).collect()
        }
    };
    let mut results = Vec::new();
    for kernel in listed(&a.attention) {
        if let Some(name) = &kernel {
            crate::kernel_env::apply_attention(name);
        }
        for small in listed(&a.small_gemm) {
            if let Some(item) = &small {
                crate::kernel_env::apply_small_gemm(item);
            }
            for &r in &ranks {
                let res = run_rank(
                    a, &ucfg, &weights, &pcfg, mode, r, cfg_split, warm, graph_on, device, dtype,
                )?;
                results.push((kernel.clone(), small.clone(), res));
            }
        }
    }
    for (kernel, small, res) in &results {
        let sent = res.traffic.sent.total();
        let recvd = res.traffic.recvd.total();
        if a.json {
            let v = serde_json::json!({
                "mode": mode.to_string(),
                "ranks": a.ranks,
                "rank": res.rank,
                "group_size": res.group_size,
                "cfg_split": cfg_split,
                "portion": a.portion,
                "latent_hw": [a.height, a.width],
                "band_rows": res.rows,
                "batch_fed": res.fed_batch,
                "dtype": dtype.to_string(),
                "device": device.to_string(),
                "sync_step_ms": res.sync_ms,
                "steady_step_ms": res.eager_ms,
                "steady_step_graph_ms": res.graph_ms,
                "graph_checked_against_eager": res.graph_check,
                "graph_vs_eager_rel_diff": res.graph_diff,
                "iters": a.iters,
                "steady_sent_bytes": sent,
                "steady_recvd_bytes": recvd,
                "steady_traffic": res.traffic,
                "attention": kernel,
                "small_gemm": small,
                "kernel_costs": res.costs.iter().map(KernelCost::to_json).collect::<Vec<_>>(),
            });
            println!("{v}");
        } else {
            let sync = if res.sync_ms.is_nan() {
                String::new()
            } else {
                format!(", sync step {:.3} ms", res.sync_ms)
            };
            let kernel = [kernel, small]
                .iter()
                .flat_map(|c| c.as_ref().map(|k| format!(" [{k}]")))
                .collect::<String>();
            println!(
                "{mode} rank {}/{}{kernel} ({} rows of {}, batch {}, {dtype} on {device}): steady step {:.3} ms eager{}{sync}; steady step sends {sent} B, receives {recvd} B",
                res.rank,
                a.ranks,
                res.rows,
                a.height,
                res.fed_batch,
                res.eager_ms,
                res.graph_ms.map(|g| format!(", {g:.3} ms graph")).unwrap_or_default(),
            );
            if a.kernel_costs {
                crate::kernel_costs::print(&res.costs);
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_rank(
    a: &Args,
    ucfg: &UNetConfig,
    weights: &Weights,
    pcfg: &ParallelConfig,
    mode: ParallelMode,
    rank: usize,
    cfg_split: bool,
    warm: usize,
    graph_on: bool,
    device: Device,
    dtype: DType,
) -> Result<RankResult> {
    let opts = TransportOptions::default();
    let ordinal = match device {
        Device::Cuda(o) => o,
        Device::Cpu => 0,
    };
    let world: Arc<dyn Transport> =
        SoloTransport::new(rank, a.ranks, opts.clone())?.with_device(ordinal);
    let levels = ucfg.downsample_factor().trailing_zeros() as usize;
    let runtime = if a.ranks == 1 || mode == ParallelMode::Serial {
        PatchRuntime::new(world, cfg_split, pcfg.clone(), a.height, a.width, levels)?
    } else {
        let grid = ProcessGrid::new(rank, a.ranks, cfg_split)?;
        let group: Arc<dyn Transport> =
            SoloTransport::new(grid.patch(), grid.group_size, opts)?.with_device(ordinal);
        PatchRuntime::with_group(
            world,
            group,
            cfg_split,
            pcfg.clone(),
            a.height,
            a.width,
            levels,
        )?
    };
    let unet = UNet::build(ucfg.clone(), weights, runtime.factory())?;
    let fed = if runtime.cfg_branch().is_some() {
        a.batch / 2
    } else {
        a.batch
    };
    let rows = runtime.band_plan().band(0, runtime.grid().patch()).len();
    let rows = if runtime.is_serial() { a.height } else { rows };
    let sample = Tensor::rand_uniform(
        &[fed, ucfg.in_channels, a.height, a.width],
        dtype,
        device,
        (-1.0, 1.0),
        1 ^ a.seed,
    )?;
    let ts = Tensor::from_vec(&[fed], vec![500.0; fed])?
        .to_dtype(dtype)?
        .to_device(device)?;
    let cond = UNetCond::random(
        ucfg,
        fed,
        a.tokens,
        (8 * a.height, 8 * a.width),
        dtype,
        device,
        a.seed,
    )?;

    let driver = runtime.driver();
    driver.begin_generation()?;
    let eager_step = |step: usize| -> Result<(f64, Tensor)> {
        sync_device(device)?;
        let t = Instant::now();
        let ctx = driver.step_ctx(step);
        let out = unet.forward(&ctx, &sample, &ts, &cond, None)?;
        driver.end_step(step)?;
        sync_device(device)?;
        Ok((t.elapsed().as_secs_f64() * 1e3, out))
    };
    // Synchronous warm-up steps (pcpp, distrifusion).
    let mut sync_ms = Vec::new();
    for step in 0..warm {
        sync_ms.push(eager_step(step)?.0);
    }
    // Steady steps: two to fill both parities of the stale cache, `--warmup` untimed, `--iters`
    // timed. The traffic is that of the first steady step.
    let mut eager_ms = Vec::new();
    let mut step = warm;
    let mut last = Vec::new();
    let mut graph_diff = 0f32;
    let mut graph_check = false;
    profile::reset();
    for k in 0..2 + a.warmup + a.iters {
        profile::enable(a.profile && k >= 2 + a.warmup);
        let (ms, out) = eager_step(step)?;
        profile::enable(false);
        if graph_on {
            last.push(out.to_vec_f32()?);
            if last.len() > 2 {
                last.remove(0);
            }
        }
        if k >= 2 + a.warmup {
            eager_ms.push(ms);
        }
        step += 1;
    }
    if a.profile {
        pcpp_kernels::flush_gpu_profile()?;
        eprintln!("rank {rank}/{}: steady eager steps by op kind", a.ranks);
        crate::bench::print_profile(&profile::snapshot(), a.iters, median(eager_ms.clone()));
    }
    let mut costs = Vec::new();
    let graph_ms = if graph_on {
        let (ms, outs, c) = graph_steps(&unet, &runtime, &sample, &ts, &cond, device, step, a)?;
        costs = c;
        // Inputs and (solo) received data are the same every step. When that makes the eager
        // steps stationary (the last two agree exactly), the replay of graph `p` (step parity
        // `step + p`) must reproduce them. Corrected stale group norm carries each step's
        // own statistics into the next, so with the solo transport's zero context the steps of
        // some configurations keep changing, and there is nothing fixed to compare with.
        let stationary = last.len() == 2 && last[0] == last[1];
        graph_check = stationary;
        for (p, o) in outs.iter().enumerate().filter(|_| stationary) {
            let eager = &last[p];
            let scale = eager.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
            let diff = o
                .iter()
                .zip(eager)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            graph_diff = graph_diff.max(diff / scale);
            if o.len() != eager.len() || diff.is_nan() || diff > 1e-3 * scale {
                bail!("rank {rank}: the CUDA-graph replay of the steady step differs from the eager step by up to {diff} (max |eager| {scale})");
            }
        }
        Some(ms)
    } else {
        None
    };
    driver.end_generation()?;
    // The first steady step's traffic (its report closed when the next step began).
    let traffic = runtime
        .report()
        .steps
        .iter()
        .find(|s| s.step == warm)
        .map(|s| s.traffic)
        .unwrap_or_default();
    Ok(RankResult {
        rank,
        group_size: if runtime.is_serial() {
            1
        } else {
            runtime.grid().group_size
        },
        fed_batch: fed,
        rows,
        sync_ms: median(sync_ms),
        eager_ms: median(eager_ms),
        graph_ms,
        graph_diff,
        graph_check,
        traffic,
        costs,
    })
}

/// Steady steps replayed from CUDA graphs, one per step parity, captured by [`StepGraphs`] at
/// steps `first` and `first + 1` (both parities ran eagerly before, so every persistent buffer
/// exists): the outputs of those two steps, and the median time of `a.iters` further steps after
/// `a.warmup` untimed ones. A timed step is what a denoising loop does for a replayed step: open
/// the step, copy the inputs into the graph's buffers, replay.
#[allow(clippy::too_many_arguments)]
fn graph_steps(
    unet: &UNet,
    runtime: &PatchRuntime,
    sample: &Tensor,
    ts: &Tensor,
    cond: &UNetCond,
    device: Device,
    first: usize,
    a: &Args,
) -> Result<(f64, Vec<Vec<f32>>, Vec<KernelCost>)> {
    let driver = runtime.driver();
    let mut graphs = StepGraphs::new(true);
    let mut outs = Vec::new();
    for step in first..first + 2 {
        let ctx = driver.step_ctx(step);
        if !driver.repeats(&ctx) {
            bail!("step {step} does not repeat (synchronous, or exchanges through host memory): nothing to replay");
        }
        outs.push(
            graphs
                .step(unet, driver, &ctx, sample, ts, cond)?
                .to_vec_f32()?,
        );
    }
    let mut next = first + 2;
    // The median of `a.iters` replayed steps after `a.warmup` untimed ones, and the last output.
    let mut time = |graphs: &mut StepGraphs| -> Result<(f64, Tensor)> {
        let mut ms = Vec::new();
        let mut out = None;
        for i in 0..a.warmup + a.iters {
            sync_device(device)?;
            let t = Instant::now();
            let ctx = driver.step_ctx(next);
            next += 1;
            out = Some(graphs.step(unet, driver, &ctx, sample, ts, cond)?);
            sync_device(device)?;
            if i >= a.warmup {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let out =
            out.ok_or_else(|| anyhow::anyhow!("no replayed step (--warmup + --iters is 0)"))?;
        Ok((median(ms), out))
    };
    let (ms, out) = time(&mut graphs)?;
    if !out.to_vec_f32()?.iter().all(|v| v.is_finite()) {
        bail!("the replayed step produced non-finite values");
    }
    // Without CUDA there is no graph to replay: bench::run refuses --kernel-costs before.
    #[cfg(feature = "cuda")]
    let costs = if a.kernel_costs {
        crate::kernel_costs::measure(&mut graphs, &mut |g| Ok(time(g)?.0))?
    } else {
        Vec::new()
    };
    #[cfg(not(feature = "cuda"))]
    let costs = Vec::new();
    Ok((ms, outs, costs))
}
