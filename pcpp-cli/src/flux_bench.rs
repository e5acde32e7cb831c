//! `pcpp-cli flux-bench`: times one step of the Flux transformer (diffusers'
//! `FluxTransformer2DModel` forward) from a config with seeded random weights: the serial step of
//! the whole image, or the steady (stale) step of one rank of patch parallelism (PCPP §1–§4 on a
//! DiT; §7.4's per-rank measurement), measured alone on this device.
//!
//! The timed call is the very forward the denoising loop calls ([`pcpp_core::DenoiseModel`] of
//! [`FluxTransformer`]): eager, and on a GPU replayed from the CUDA graph that
//! [`StepGraphs`] captures per step parity. Rank `r` of `N` runs over a [`SoloTransport`]: the
//! same bands, K/V windows and byte accounting as a real run, but its messages are not
//! delivered (receives read zeros), so the time is its computation without waits. One JSON line
//! per run: the times in ms and the bytes of the first steady step from the runtime's report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use pcpp_comm::{SoloTransport, Transport, TransportOptions};
use pcpp_core::{ParallelConfig, ParallelMode, PatchRuntime, ProcessGrid, StepGraphs};
use pcpp_flux::{FluxCond, FluxTransformer, FluxTransformerConfig};
use pcpp_kernels::{DType, Device, Tensor};

use pcpp_kernels::cpu::profile;

use crate::bench::median;
use crate::generate::{parse_portions, DeviceArg};

/// Arguments of `pcpp-cli flux-bench`.
#[derive(Debug, Clone, Args)]
pub struct FluxBenchArgs {
    /// A Flux `transformer/config.json` (e.g. pcpp-flux/configs/flux1-dev/transformer/config.json).
    #[arg(long)]
    pub config: PathBuf,
    /// Image height in pixels.
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// The VAE's scale factor (8 for FLUX.1): latent = image / this, tokens = latent / 2.
    #[arg(long, default_value_t = 8)]
    pub vae_scale: usize,
    /// T5 text tokens.
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Number of ranks of the run the measured rank belongs to (1: the serial step).
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// The rank measured.
    #[arg(long, default_value_t = 0)]
    pub rank: usize,
    /// Parallel scheme: pcpp, distrifusion or naive-patch.
    #[arg(long, default_value = "pcpp")]
    pub parallel: ParallelMode,
    /// PCPP portion.
    #[arg(long, default_value = "0.3")]
    pub portion: String,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute dtype (default: bf16 on a GPU, f32 on the CPU).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Untimed steps before the timed ones (each of eager and graph).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps (each of eager and graph).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Seed of the weights and inputs.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Skip the CUDA-graph replay (GPU only).
    #[arg(long)]
    pub no_cuda_graphs: bool,
    /// Time every op of the timed eager steps by kind (on a GPU: the GPU time between events
    /// around each op) and add the per-step breakdown to the JSON line (`profile`).
    #[arg(long)]
    pub profile: bool,
    /// GPU kernel choices to time one after the other on the same weights, comma-separated
    /// (one JSON line each): the attention kernel (`ws`, `ws-pingpong`, `ws-overlap`, `hopper`,
    /// `shared-q64`, `shared-q`, `registers-q`) with optional `+fused` (GELU / accumulate GEMM
    /// epilogues) and `+scalar` (element-wise kernels without vector loads), e.g.
    /// `hopper+fused,ws+fused`. The `--profile` breakdown is taken for the first. Default: the
    /// environment's choice.
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,
}

fn ms_since(t: Instant, device: Device) -> Result<f64> {
    pcpp_kernels::synchronize(device)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Runs the benchmark.
pub fn run(a: FluxBenchArgs) -> Result<()> {
    a.device.check_built()?;
    let device = a.device.device(0);
    let dtype = a.dtype.unwrap_or(match device {
        Device::Cpu => DType::F32,
        Device::Cuda(_) => DType::BF16,
    });
    if device == Device::Cpu && dtype != DType::F32 {
        bail!("--dtype {dtype}: the CPU computes in f32");
    }
    if a.ranks == 0 || a.rank >= a.ranks {
        bail!("--rank {} must be below --ranks {}", a.rank, a.ranks);
    }
    let m = 2 * a.vae_scale;
    if a.vae_scale == 0 || a.height % m != 0 || a.width % m != 0 || a.height == 0 || a.width == 0 {
        bail!("--height/--width must be positive multiples of {m} (2 × --vae-scale)");
    }
    if a.tokens == 0 || a.iters == 0 {
        bail!("--tokens and --iters must be at least 1");
    }
    let mode = if a.ranks == 1 {
        ParallelMode::Serial
    } else {
        a.parallel
    };
    if mode == ParallelMode::Tensor {
        bail!("--parallel tensor: Flux runs serial or patch-parallel");
    }
    let parsed = (a.variants.iter())
        .map(|v| Ok((v.clone(), crate::kernel_env::parse_variant(v, device)?)))
        .collect::<Result<Vec<_>>>()?;
    let cfg = FluxTransformerConfig::from_file(&a.config)?;
    let portions = parse_portions(&a.portion)?;
    let pcfg = ParallelConfig::preset(mode, &portions, Some(1), usize::MAX);
    pcfg.validate()?;
    let (hp, wp) = (a.height / m, a.width / m);
    let ordinal = match device {
        Device::Cuda(o) => o,
        Device::Cpu => 0,
    };
    let solo = |rank: usize, n: usize| -> Result<Arc<dyn Transport>> {
        Ok(SoloTransport::new(rank, n, TransportOptions::default())?.with_device(ordinal))
    };
    let world = solo(a.rank, a.ranks)?;
    let runtime = if a.ranks == 1 {
        PatchRuntime::new(world, false, pcfg, hp, wp, 0)
    } else {
        // a solo transport cannot split itself: the rank's group transport is built directly
        let grid = ProcessGrid::new(a.rank, a.ranks, false)?;
        let group = solo(grid.patch(), grid.group_size)?;
        PatchRuntime::with_group(world, group, false, pcfg, hp, wp, 0)
    }
    .map_err(|e| anyhow::anyhow!("--ranks {}: {e}", a.ranks))?;
    let t_build = Instant::now();
    let model = FluxTransformer::random(&a.config, dtype, device, a.seed, runtime.factory())?;
    let build_s = ms_since(t_build, device)? / 1e3;
    let rnd = |shape: &[usize], seed: u64| {
        Tensor::rand_uniform(shape, dtype, device, (-1.0, 1.0), seed ^ a.seed)
    };
    let x = rnd(&[1, cfg.in_channels / 4, 2 * hp, 2 * wp], 1)?;
    let txt = rnd(&[1, a.tokens, cfg.joint_attention_dim], 2)?;
    let pooled = rnd(&[1, cfg.pooled_projection_dim], 3)?;
    let guidance = cfg.guidance_embeds.then_some(3.5);
    let cond = FluxCond::new(&txt, &pooled, guidance, dtype, device)?;
    let ts = Tensor::from_vec(&[1], vec![0.5])?.to_device(device)?;
    let driver = runtime.driver();
    driver.begin_generation()?;
    let mut step = 0;
    let eager = |step: usize| -> Result<f64> {
        pcpp_kernels::synchronize(device)?;
        let t = Instant::now();
        let ctx = driver.step_ctx(step);
        pcpp_core::DenoiseModel::forward(&model, &ctx, &x, &ts, &cond)?;
        driver.end_step(step)?;
        driver.step_done(step)?;
        ms_since(t, device)
    };
    // step 0 is the synchronous warm-up step; two steady steps fill both stale parities
    let sync_ms = eager(0)?;
    step += 1;
    let variants = if parsed.is_empty() {
        vec![None]
    } else {
        parsed.into_iter().map(Some).collect()
    };
    let mut lines = Vec::new();
    for (vi, variant) in variants.into_iter().enumerate() {
        if let Some((_, v)) = &variant {
            v.apply();
        }
        let profiling = a.profile && vi == 0;
        let mut eager_ms = Vec::new();
        profile::reset();
        for k in 0..2 + a.warmup + a.iters {
            profile::enable(profiling && k >= 2 + a.warmup);
            let ms = eager(step);
            profile::enable(false);
            let ms = ms?;
            if k >= 2 + a.warmup {
                eager_ms.push(ms);
            }
            step += 1;
        }
        let ops = if profiling {
            pcpp_kernels::flush_gpu_profile()?;
            let kernels = profile::snapshot();
            crate::bench::print_profile(&kernels, a.iters, median(eager_ms.clone()));
            Some(profile_json(&kernels, a.iters))
        } else {
            None
        };
        let graph_ms = if device != Device::Cpu && !a.no_cuda_graphs {
            // a fresh capture per variant: a graph holds the kernels chosen when it was captured
            let mut graphs = StepGraphs::new(true);
            let mut ms = Vec::new();
            for k in 0..2 + a.warmup + a.iters {
                pcpp_kernels::synchronize(device)?;
                let t = Instant::now();
                let ctx = driver.step_ctx(step);
                if !driver.repeats(&ctx) {
                    bail!("step {step} does not repeat: nothing to replay");
                }
                graphs.step(&model, driver, &ctx, &x, &ts, &cond)?;
                let took = ms_since(t, device)?;
                driver.step_done(step)?;
                if k >= 2 + a.warmup {
                    ms.push(took);
                }
                step += 1;
            }
            Some(median(ms))
        } else {
            None
        };
        let kernels = crate::kernel_env::choices(device);
        lines.push((variant, median(eager_ms), graph_ms, ops, kernels));
    }
    driver.end_generation()?;
    let traffic = runtime
        .report()
        .steps
        .iter()
        .find(|s| s.step == 1)
        .map(|s| s.traffic)
        .unwrap_or_default();
    let rows = if runtime.is_serial() {
        hp
    } else {
        runtime.band_plan().band(0, runtime.grid().patch()).len()
    };
    for (variant, eager_ms, graph_ms, ops, kernels) in lines {
        let mut v = serde_json::json!({
            "model": "flux-transformer",
            "config": a.config.display().to_string(),
            "height": a.height,
            "width": a.width,
            "image_tokens": hp * wp,
            "text_tokens": a.tokens,
            "token_grid": [hp, wp],
            "mode": mode.to_string(),
            "ranks": a.ranks,
            "rank": a.rank,
            "band_rows": rows,
            "dtype": dtype.to_string(),
            "device": device.to_string(),
            "build_seconds": build_s,
            "sync_step_ms": sync_ms,
            "steady_step_ms": eager_ms,
            "steady_step_graph_ms": graph_ms,
            "steady_sent_bytes": traffic.sent.total(),
            "steady_recvd_bytes": traffic.recvd.total(),
            "steady_traffic": traffic,
        });
        if let Some((name, _)) = variant {
            v["variant"] = name.into();
        }
        if let Some(ops) = ops {
            v["profile"] = ops;
        }
        // which kernels ran (`PCPP_FLASH128`, `PCPP_VECTOR_KERNELS`, `PCPP_FUSED_EPILOGUES`)
        if let serde_json::Value::Object(k) = kernels {
            v.as_object_mut().expect("a JSON object").extend(k);
        }
        crate::output::print(&format!("{v}\n"))?;
    }
    Ok(())
}

/// Per-step counters of `iters` profiled steps by op kind: `{kind: {calls, ms, gflop}}`.
fn profile_json(kernels: &[profile::KernelStats], iters: usize) -> serde_json::Value {
    let n = iters.max(1) as f64;
    let m: serde_json::Map<String, serde_json::Value> = kernels
        .iter()
        .filter(|k| k.calls > 0)
        .map(|k| {
            (
                k.kernel.name().to_string(),
                serde_json::json!({
                    "calls": k.calls as f64 / n,
                    "ms": k.seconds * 1e3 / n,
                    "gflop": k.flops as f64 / 1e9 / n,
                }),
            )
        })
        .collect();
    serde_json::Value::Object(m)
}
