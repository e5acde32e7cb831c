//! `pcpp-cli patch-bench`: the patch-parallel denoising loop (PCPP §1–§4, §7.4) of a full-size UNet
//! config with seeded random weights and random text conditioning, on every rank of a
//! process-based (MPI, UCX, NCCL) or local world: per-step time with real communication, bytes
//! per step, and the final latents for PSNR / SSIM against a one-rank run.
//!
//! Every rank builds the same weights, conditioning and initial noise from the seeds (no model
//! files and no text encoders needed), runs `--steps` Euler steps with classifier-free guidance
//! through the pipeline's denoising loop (`pcpp_sdxl::denoise_with`, the loop `generate` runs)
//! and, on rank 0, writes a JSON report (`--report`) and the latents (`--save-latents`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use pcpp_comm::launch;
use pcpp_comm::{CommKind, LocalTransport, RankError, Transport, TransportKind};
use pcpp_core::{ParallelConfig, ParallelMode, PatchRuntime, RunReport};
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::scheduler::{SchedulerConfig, SchedulerKind};
use pcpp_sdxl::weights::Weights;
use pcpp_sdxl::{
    denoise_with, DenoiseParams, DenoiseStart, MicroCond, PromptEmbeds, StepNoise, UNet, UNetCond,
    UNetConfig,
};

use crate::bench::median;
use crate::generate::{parse_portions, seeded_noise, DeviceArg, TransportArg};
use crate::output;

/// Arguments of `pcpp-cli patch-bench`.
#[derive(Debug, Args)]
pub struct PatchBenchArgs {
    /// Diffusers pipeline config folder with `unet/config.json` (+ `tensor_manifest.json`) and
    /// `scheduler/scheduler_config.json`.
    #[arg(long, default_value = "models/sdxl-base-1.0-configs")]
    pub config: PathBuf,
    /// Image height in pixels (latent = height / 8).
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Image width in pixels (latent = width / 8).
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Euler steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Guidance scale (> 1: classifier-free guidance, batch of two branches).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f32,
    /// Storage dtype of weights and activations.
    #[arg(long, default_value = "f16")]
    pub dtype: DType,
    /// Where the UNet runs.
    #[arg(long, value_enum, default_value = "cuda")]
    pub device: DeviceArg,
    /// How ranks talk to each other.
    #[arg(long, value_enum, default_value = "local")]
    pub transport: TransportArg,
    /// Number of ranks (with `--transport local`).
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Parallel scheme: pcpp, distrifusion, naive-patch or serial.
    #[arg(long, default_value = "pcpp")]
    pub parallel: ParallelMode,
    /// PCPP portion: one value, or one per resolution level separated by commas.
    #[arg(long, default_value = "0.3")]
    pub portion: String,
    /// Synchronous warm-up steps (default 4, at most --steps).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Keep both CFG branches on every rank.
    #[arg(long)]
    pub no_cfg_split: bool,
    /// Seed of the weights, the conditioning and the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds any wait for another rank may take.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// How exchanges over MPI / UCX move GPU data: auto, cuda-aware, staged or host (see
    /// `generate --help`). Default: $PCPP_DEVICE_COMM, else auto.
    #[arg(long)]
    pub device_comm: Option<pcpp_comm::DeviceComm>,
    /// Write the final latents (f32, tensor `latents`) to this safetensors file.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// On a GPU, capture the steady (stale) UNet step as one CUDA graph per step parity, after
    /// two eager steady steps, and replay it (device-resident stale cache; NCCL work captured
    /// on the communication stream).
    #[arg(long)]
    pub graph: bool,
    /// Write the JSON report (per-step times, bytes per step and rank) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

struct RankOut {
    latents: Tensor,
    reports: Vec<RunReport>,
    build_seconds: f64,
}

fn parallel_config(a: &PatchBenchArgs) -> Result<ParallelConfig> {
    let portions = parse_portions(&a.portion)?;
    let cfg = ParallelConfig::preset(a.parallel, &portions, a.warmup_steps, a.steps);
    cfg.validate()?;
    Ok(cfg)
}

/// One rank's run: weights, conditioning, the denoising loop; results on rank 0.
fn run_rank(
    a: &PatchBenchArgs,
    pcfg: &ParallelConfig,
    world: Arc<dyn Transport>,
    gpu: usize,
) -> Result<Option<RankOut>> {
    let t0 = Instant::now();
    let device = a.device.device(gpu);
    let unet_dir = a.config.join("unet");
    let ucfg = UNetConfig::from_file(&unet_dir.join("config.json"))?;
    let factor = ucfg.downsample_factor();
    let (lh, lw) = (a.height / 8, a.width / 8);
    if a.height % 8 != 0 || a.width % 8 != 0 || lh % factor != 0 || lw % factor != 0 {
        bail!(
            "--height {} --width {}: must be multiples of {}",
            a.height,
            a.width,
            8 * factor
        );
    }
    let cfg_on = a.guidance > 1.0;
    let cfg_split = cfg_on && !a.no_cfg_split && world.size() >= 2;
    let runtime = PatchRuntime::new(
        world.clone(),
        cfg_split,
        pcfg.clone(),
        lh,
        lw,
        factor.trailing_zeros() as usize,
    )
    .map_err(|e| anyhow::anyhow!("--ranks {}: {e}", world.size()))?;
    let weights = Weights::random_for_unet_config(&unet_dir.join("config.json"), a.dtype, a.seed)?
        .on_device(device);
    let unet = UNet::build(ucfg.clone(), &weights, runtime.factory())?;
    let sched_path = a.config.join("scheduler").join("scheduler_config.json");
    let sched_cfg = SchedulerConfig::from_file(&sched_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", sched_path.display()))?;

    // Conditioning of both branches, identical on every rank (seeded, generated on the device).
    let nb = if cfg_on { 2 } else { 1 };
    let all = UNetCond::random(&ucfg, nb, 77, (a.height, a.width), a.dtype, device, a.seed)?;
    let embeds = PromptEmbeds {
        prompt_embeds: all.encoder_hidden_states.clone(),
        pooled: all
            .text_embeds
            .clone()
            .unwrap_or_else(|| Tensor::zeros(&[nb, 0], a.dtype)),
        truncated: false,
    };
    let shape = [1, ucfg.in_channels, lh, lw];
    let noise = seeded_noise(&shape, a.seed)?;
    let build_seconds = t0.elapsed().as_secs_f64();
    if a.graph && device == Device::Cpu {
        bail!("--graph needs --device cuda");
    }
    if a.graph
        && !runtime.is_serial()
        && !runtime.driver().repeats(&pcpp_core::StepCtx {
            step: 0,
            sync: false,
        })
    {
        bail!("--graph: CUDA graphs need exchanges that stay on the GPU (--transport nccl, or mpi / ucx without --device-comm host; not --parallel tensor) or one rank");
    }
    let params = DenoiseParams {
        steps: a.steps,
        guidance: a.guidance,
        scheduler: SchedulerKind::Euler,
        micro: MicroCond::for_size(a.height, a.width),
        cuda_graphs: a.graph,
    };
    let latents = denoise_with(
        &unet,
        None,
        runtime.driver(),
        &sched_cfg,
        &params,
        &embeds,
        &DenoiseStart::Noise(&noise),
        &StepNoise::Derived,
        &mut |_, _| {},
    )?
    .latents;
    let report = serde_json::to_vec(&runtime.report())?;
    let all = world.all_gather(CommKind::Control, &report)?;
    if world.rank() != 0 {
        return Ok(None);
    }
    let reports = all
        .iter()
        .map(|r| serde_json::from_slice(r))
        .collect::<std::result::Result<Vec<RunReport>, _>>()?;
    Ok(Some(RankOut {
        latents: latents.to_device(Device::Cpu)?,
        reports,
        build_seconds,
    }))
}

/// Runs the command.
pub fn run(a: PatchBenchArgs) -> Result<()> {
    a.device.check_built()?;
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    if a.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    if let Some(p) = &a.report {
        output::check_writable(p, "--report")?;
    }
    if let Some(p) = &a.save_latents {
        output::check_writable(p, "--save-latents")?;
    }
    let pcfg = parallel_config(&a)?;
    let opts = crate::args::transport_options(a.timeout, a.device_comm, a.device)?;
    let t0 = Instant::now();
    let env = launch::LaunchEnv::from_env()?;
    let kind = launch::resolve(a.transport.into(), &env);
    let (res, desc) = if kind == TransportKind::Local {
        let outs = LocalTransport::run(a.ranks, opts, |t| run_rank(&a, &pcfg, t, 0)).map_err(
            |e| match e {
                RankError::Failed { rank, source } => anyhow::anyhow!("rank {rank}: {source:#}"),
                other => anyhow::anyhow!("{other}"),
            },
        )?;
        (
            outs.into_iter().flatten().next(),
            format!("local, {} ranks", a.ranks),
        )
    } else {
        let copts = launch::ConnectOptions {
            transport: opts,
            ..launch::ConnectOptions::default()
        };
        let conn = launch::connect(kind, &env, &copts)?;
        let world = conn.transport.clone();
        launch::abort_on_panic(world.clone());
        let hash = launch::fingerprint(&[format!("{a:?}").as_bytes()]);
        if let Err(e) = launch::check_same_everywhere(world.as_ref(), &hash) {
            launch::abort_job(world.as_ref(), &e.to_string());
        }
        let gpu = match crate::args::gpu_of_local_rank(a.device, conn.local_rank) {
            Ok(g) => g,
            Err(e) => launch::abort_job(world.as_ref(), &format!("{e:#}")),
        };
        match run_rank(&a, &pcfg, world.clone(), gpu) {
            Ok(r) => (r, conn.description.clone()),
            Err(e) => launch::abort_job(world.as_ref(), &format!("{e:#}")),
        }
    };
    let Some(res) = res else {
        return Ok(());
    };
    let wall = t0.elapsed().as_secs_f64();
    let r0 = res.reports.first();
    let steps: Vec<f64> = r0
        .map(|r| r.steps.iter().map(|s| s.seconds).collect())
        .unwrap_or_default();
    // Steady state: the steps after the synchronous warm-up (all but the first for serial runs).
    let skip = if pcfg.mode == ParallelMode::Serial || res.reports.len() == 1 {
        1
    } else {
        pcfg.warmup_steps.max(1)
    };
    let steady = median(steps.iter().skip(skip).copied().collect());
    let denoise: f64 = steps.iter().sum();
    let bytes_per_rank: Vec<u64> = res.reports.iter().map(|r| r.total.sent.total()).collect();
    let stale_sent: Vec<u64> = res
        .reports
        .iter()
        .map(|r| {
            r.steps
                .iter()
                .skip(skip)
                .map(|s| s.traffic.sent.total())
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!(
        "patch-bench {}x{} {} steps {} {} ranks={} ({desc}): denoise {denoise:.2} s, steady step {:.2} ms, setup {:.1} s, bytes sent per rank {:?}, per stale step (max) {:?}",
        a.width,
        a.height,
        a.steps,
        a.parallel,
        a.dtype,
        res.reports.len(),
        steady * 1e3,
        res.build_seconds,
        bytes_per_rank,
        stale_sent
    );
    if let Some(p) = &a.save_latents {
        pcpp_kernels::io::save(p, &[("latents", &res.latents)], None)
            .with_context(|| format!("--save-latents {}", p.display()))?;
    }
    if let Some(p) = &a.report {
        let doc = serde_json::json!({
            "config": a.config.display().to_string(),
            "height": a.height,
            "width": a.width,
            "steps": a.steps,
            "dtype": a.dtype.to_string(),
            "mode": a.parallel.to_string(),
            "portion": a.portion,
            "transport": desc,
            "ranks": res.reports.len(),
            "setup_seconds": res.build_seconds,
            "denoise_seconds": denoise,
            "steady_step_seconds": steady,
            "wall_seconds": wall,
            "step_seconds": steps,
            "per_rank": res.reports,
        });
        output::write_atomic(p, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    }
    Ok(())
}
