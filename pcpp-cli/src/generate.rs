//! `pcpp-cli generate`: text to image with an SDXL pipeline folder, serial or patch-parallel
//! (PCPP §1: the latent is cut into row bands, one per rank of a CFG group).
//!
//! Everything the user passes is validated before any model work: sizes, steps, portions, the
//! output paths (writable folder), the initial noise file's shape. The image and the optional
//! latents are written atomically.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;

use pcpp_comm::launch;
use pcpp_comm::{CommKind, LocalTransport, RankError, Transport, TransportKind, TransportOptions};
use pcpp_core::{ParallelConfig, ParallelMode, PatchRuntime, RunReport};
use pcpp_kernels::io::SafetensorsFile;
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::scheduler::SchedulerKind;
use pcpp_sdxl::weights::{find_weight_file, Weights};
use pcpp_sdxl::{
    denoise_with, image_from_rgb8, img2img_start_step, to_rgb8, DenoiseParams, DenoiseStart,
    MicroCond, ModelIndex, Pipeline, PromptEmbeds, StepNoise, TextEncoders, UNet, UNetConfig,
    VaeDecoder, VaeEncoder,
};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::output;

/// The tiny random-weight SDXL pipeline shipped in the repository, the default `--model`.
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-sdxl");

/// Which transport connects the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// Ranks as threads of this process.
    Local,
    /// MPI (launch with `mpirun -n N`).
    Mpi,
    /// UCX.
    Ucx,
    /// NCCL (GPUs).
    Nccl,
    /// NCCL if available, else MPI under mpirun, else local.
    Auto,
}

/// Where the UNet runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The CPU twin.
    Cpu,
    /// The GPU of this rank's node-local rank (`cuda:{local_rank}`; GPU 0 for local ranks).
    Cuda,
}

impl DeviceArg {
    /// The device of a rank whose GPU ordinal is `gpu`.
    pub fn device(self, gpu: usize) -> Device {
        match self {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda(gpu),
        }
    }

    /// Errors if this build cannot run on the device.
    pub fn check_built(self) -> Result<()> {
        if self == DeviceArg::Cuda && !cfg!(feature = "cuda") {
            bail!("--device cuda: this build has no CUDA back-end; rebuild pcpp-cli with `--features cuda`");
        }
        Ok(())
    }
}

/// The scheduler flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulerArg {
    /// Euler discrete (SDXL's default).
    Euler,
    /// DDIM, η = 0.
    Ddim,
    /// DPM-Solver++ 2M.
    #[value(name = "dpmpp-2m")]
    DpmPp2M,
    /// DPM-Solver++ 2M with Karras sigmas.
    #[value(name = "dpmpp-2m-karras")]
    DpmPp2MKarras,
    /// Euler ancestral (per-step noise derived from the initial noise).
    #[value(name = "euler-a")]
    EulerA,
}

impl From<TransportArg> for TransportKind {
    fn from(t: TransportArg) -> TransportKind {
        match t {
            TransportArg::Local => TransportKind::Local,
            TransportArg::Mpi => TransportKind::Mpi,
            TransportArg::Ucx => TransportKind::Ucx,
            TransportArg::Nccl => TransportKind::Nccl,
            TransportArg::Auto => TransportKind::Auto,
        }
    }
}

impl From<SchedulerArg> for SchedulerKind {
    fn from(s: SchedulerArg) -> SchedulerKind {
        match s {
            SchedulerArg::Euler => SchedulerKind::Euler,
            SchedulerArg::Ddim => SchedulerKind::Ddim,
            SchedulerArg::DpmPp2M => SchedulerKind::DpmPp2M,
            SchedulerArg::DpmPp2MKarras => SchedulerKind::DpmPp2MKarras,
            SchedulerArg::EulerA => SchedulerKind::EulerAncestral,
        }
    }
}

/// Arguments of `pcpp-cli generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Diffusers SDXL pipeline folder, or an SDXL single-file checkpoint (.safetensors) (default: the tiny random-weight model in the repository).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt.
    #[arg(long, value_parser = utf8_text(), required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// Negative prompt (empty = none: zero conditioning, as SDXL).
    #[arg(long, value_parser = utf8_text())]
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1 disables CFG).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f32,
    /// Image height in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Seed of the initial noise (this project's generator; use --init-noise to match another tool).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampler (default: the one the model folder names).
    #[arg(long, value_enum)]
    pub scheduler: Option<SchedulerArg>,
    /// Read the initial noise from tensor `initial_noise` [1, 4, H/f, W/f] (f = the VAE's scale factor, 8 for SDXL) of this safetensors file.
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// Write the final latents as tensor `latents` to this safetensors file.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output PNG.
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub batch: crate::batch::BatchFlags,
    /// How ranks talk to each other.
    #[arg(long, value_enum, default_value = "local")]
    pub transport: TransportArg,
    /// Number of ranks (with `--transport local`).
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Parallel scheme: pcpp, distrifusion, naive-patch, tensor or serial.
    #[arg(long, default_value = "pcpp")]
    pub parallel: ParallelMode,
    /// PCPP portion: one value, or one per resolution level separated by commas.
    #[arg(long, default_value = "0.3")]
    pub portion: String,
    /// Synchronous warm-up steps before stale context is used (default: 4, at most --steps).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Keep both CFG branches on every rank instead of splitting the ranks into two groups.
    #[arg(long)]
    pub no_cfg_split: bool,
    /// Seconds any wait for another rank may take before the job fails (a lost peer becomes an
    /// error instead of a hang).
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    #[command(flatten)]
    pub modes: crate::mode_flags::ModeFlags,
    /// Write a JSON report (per-step time, bytes by layer kind, waits) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Image-to-image: start from this PNG (encoded with the VAE encoder's mean); its size is the
    /// output size.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Image-to-image strength in (0, 1]: the last ⌊steps·strength⌋ steps run (default 0.3).
    #[arg(long)]
    pub strength: Option<f32>,
    /// SDXL micro-conditioning: original image size `H,W` (default: the output size).
    #[arg(long)]
    pub original_size: Option<String>,
    /// SDXL micro-conditioning: crop coordinates `TOP,LEFT` (default: 0,0).
    #[arg(long)]
    pub crops_coords_top_left: Option<String>,
    /// SDXL micro-conditioning: target image size `H,W` (default: the output size).
    #[arg(long)]
    pub target_size: Option<String>,
    /// Where the UNet weights and activations live (text encoders and VAE stay on the CPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// With --device cuda, run every step eagerly instead of replaying the steady steps as CUDA
    /// graphs (one per step parity, captured after two eager steady steps).
    #[arg(long)]
    pub no_cuda_graphs: bool,
}

/// Parses `A,B` (two non-negative integers) for `flag`.
fn parse_pair(flag: &str, s: &str) -> Result<(usize, usize)> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let nums = parts
        .iter()
        .map(|p| p.parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>();
    match (parts.len(), nums) {
        (2, Ok(v)) => Ok((v[0], v[1])),
        _ => bail!("{flag} {s}: expected two non-negative integers `A,B`"),
    }
}

/// Reads `--init-image` as `[1, 3, H, W]` in `[-1, 1]` (diffusers' `VaeImageProcessor`).
fn read_init_image(path: &Path) -> Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("--init-image {}: cannot read image", path.display()))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok(image_from_rgb8(img.as_raw(), h, w)?)
}

/// A text argument that may arrive as any bytes: non-UTF-8 input is an error naming the flag.
fn utf8_text() -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new()
        .try_map(|s| s.into_string().map_err(|_| "the text is not valid UTF-8"))
}

/// Validated settings of one generation.
struct Plan {
    model: PathBuf,
    height: usize,
    width: usize,
    scheduler: SchedulerKind,
    portions: Vec<f64>,
    noise: Tensor,
    /// SDXL micro-conditioning.
    micro: MicroCond,
    /// Image-to-image: the init image `[1, 3, H, W]` in `[-1, 1]` and the strength.
    init: Option<(Tensor, f32)>,
}

pub fn parse_portions(s: &str) -> Result<Vec<f64>> {
    let v = s
        .split(',')
        .map(|p| {
            let x: f64 = p
                .trim()
                .parse()
                .with_context(|| format!("--portion {s}: `{p}` is not a number"))?;
            if !x.is_finite() || x < 0.0 {
                bail!("--portion {s}: {x} is outside [0, ∞) (use ≥ ranks−1 for DistriFusion's full context)");
            }
            Ok(x)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(v)
}

fn read_json_value(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// `(sample_size, in_channels, vae_scale_factor)` from the UNet and VAE configs, as diffusers
/// derives its default size (`sample_size · 2^(len(vae.block_out_channels) − 1)`).
fn model_geometry(model: &Path) -> Result<(usize, usize, usize)> {
    let unet = read_json_value(&model.join("unet").join("config.json"))?;
    let vae_path = model.join("vae").join("config.json");
    let vae = read_json_value(&vae_path)?;
    let blocks = vae["block_out_channels"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0);
    if blocks == 0 || blocks > 8 {
        bail!(
            "{}: `block_out_channels` must list 1 to 8 blocks",
            vae_path.display()
        );
    }
    let size = unet["sample_size"].as_u64().unwrap_or(128) as usize;
    let ch = unet["in_channels"].as_u64().unwrap_or(4) as usize;
    Ok((size, ch, 1 << (blocks - 1)))
}

/// Unit Gaussian noise from `seed` (ChaCha8 + the standard normal of `rand_distr`).
pub fn seeded_noise(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(shape, v)?)
}

fn validate(a: &GenerateArgs) -> Result<Plan> {
    let model = a
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
    let model = crate::convert::resolve_model(model)?;
    if !model.is_dir() {
        if a.model.is_none() {
            bail!(
                "the built-in default model folder {} is missing; pass --model DIR",
                model.display()
            );
        }
        bail!("--model {}: folder not found", model.display());
    }
    if a.prompt().trim().is_empty() {
        bail!("--prompt is empty");
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if !a.guidance.is_finite() || a.guidance < 0.0 {
        bail!("--guidance {}: must be a finite number ≥ 0", a.guidance);
    }
    if let Some(w) = a.warmup_steps.filter(|&w| w > a.steps) {
        bail!("--warmup-steps {w} is larger than --steps {}", a.steps);
    }
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    if a.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    a.device.check_built()?;
    let portions = parse_portions(&a.portion)?;
    let index = ModelIndex::load(&model)?;
    let (sample, channels, vae_scale) = model_geometry(&model)?;
    let init_image = a.init_image.as_deref().map(read_init_image).transpose()?;
    let (height, width) = match &init_image {
        Some(img) => {
            let (h, w) = (img.shape()[2], img.shape()[3]);
            for (flag, given, own) in [("--height", a.height, h), ("--width", a.width, w)] {
                if let Some(v) = given.filter(|&v| v != own) {
                    bail!("{flag} {v} differs from the --init-image size {h}×{w} (the output has the init image's size)");
                }
            }
            (h, w)
        }
        None => (
            a.height.unwrap_or(sample * vae_scale),
            a.width.unwrap_or(sample * vae_scale),
        ),
    };
    let multiple = vae_scale.max(8);
    for (flag, v) in [("--height", height), ("--width", width)] {
        if v == 0 || v % multiple != 0 {
            bail!("{flag} {v}: must be a positive multiple of {multiple}");
        }
    }
    let scheduler = match a.scheduler {
        Some(s) => s.into(),
        None => Pipeline::load_scheduler_config(&model)
            .ok()
            .and_then(|c| SchedulerKind::from_config(&c))
            .or_else(|| index.default_scheduler())
            .unwrap_or(SchedulerKind::Euler),
    };
    output::check_writable(a.output(), "--output")?;
    if a.output().extension().map(|e| e.to_ascii_lowercase()) != Some("png".into()) {
        bail!("--output {}: must end in .png", a.output().display());
    }
    if let Some(p) = &a.save_latents {
        output::check_writable(p, "--save-latents")?;
    }
    if let Some(p) = &a.report {
        output::check_writable(p, "--report")?;
    }
    if a.no_cuda_graphs && a.device != DeviceArg::Cuda {
        bail!("--no-cuda-graphs needs --device cuda (CUDA graphs are a GPU feature)");
    }
    let init = match init_image {
        Some(img) => {
            let strength = a.strength.unwrap_or(0.3);
            img2img_start_step(a.steps, strength)
                .map_err(|e| anyhow::anyhow!("--strength {strength} --steps {}: {e}", a.steps))?;
            Some((img, strength))
        }
        None if a.strength.is_some() => bail!("--strength needs --init-image"),
        None => None,
    };
    let mut micro = MicroCond::for_size(height, width);
    if let Some(s) = &a.original_size {
        micro.original_size = parse_pair("--original-size", s)?;
    }
    if let Some(s) = &a.crops_coords_top_left {
        micro.crop_top_left = parse_pair("--crops-coords-top-left", s)?;
    }
    if let Some(s) = &a.target_size {
        micro.target_size = parse_pair("--target-size", s)?;
    }
    let shape = [1, channels, height / vae_scale, width / vae_scale];
    let noise = match &a.init_noise {
        Some(p) => {
            let f = SafetensorsFile::open(p).with_context(|| "--init-noise".to_string())?;
            let t = f
                .load("initial_noise", Some(DType::F32))
                .with_context(|| "--init-noise".to_string())?;
            if t.shape() != shape {
                bail!(
                    "--init-noise {}: tensor `initial_noise` has shape {:?}, expected {shape:?} for {height}×{width}",
                    p.display(),
                    t.shape()
                );
            }
            t
        }
        None => seeded_noise(&shape, a.seed)?,
    };
    Ok(Plan {
        model,
        height,
        width,
        scheduler,
        portions,
        noise,
        micro,
        init,
    })
}

fn progress_bar(steps: usize) -> ProgressBar {
    let pb = ProgressBar::new(steps as u64);
    if let Ok(style) =
        ProgressStyle::with_template("denoising {bar:30} {pos}/{len} steps [{elapsed_precise}]")
    {
        pb.set_style(style);
    }
    pb
}

fn parameters_text(a: &GenerateArgs, p: &Plan) -> String {
    let mut s = a.prompt().to_string();
    if let Some(n) = a.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
        s.push_str(&format!("\nNegative prompt: {n}"));
    }
    let sampler = p.scheduler.label();
    let seed = match &a.init_noise {
        Some(f) => format!("init-noise {}", f.display()),
        None => a.seed.to_string(),
    };
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {sampler}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {}, Parallel: {}, Ranks: {}",
        a.steps,
        a.guidance,
        p.width,
        p.height,
        p.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        a.parallel,
        a.ranks,
    ));
    if let (Some(f), Some((_, strength))) = (&a.init_image, &p.init) {
        s.push_str(&format!(
            ", Init image: {}, Denoising strength: {strength}",
            f.display()
        ));
    }
    s
}

/// The parallel configuration the flags ask for.
fn parallel_config(a: &GenerateArgs, portions: &[f64]) -> Result<ParallelConfig> {
    let mut cfg = ParallelConfig::preset(a.parallel, portions, a.warmup_steps, a.steps);
    a.modes.apply(&mut cfg)?;
    Ok(cfg)
}

/// Tensors packed for a broadcast: per tensor its rank, dims and f32 data, little-endian.
fn pack(ts: &[&Tensor]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for t in ts {
        out.extend_from_slice(&(t.shape().len() as u64).to_le_bytes());
        for &d in t.shape() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        for v in t.to_vec_f32()? {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

fn unpack(mut b: &[u8], n: usize) -> Result<Vec<Tensor>> {
    let mut take = |k: usize| -> Result<&[u8]> {
        if b.len() < k {
            bail!("internal: broadcast message too short");
        }
        let (h, t) = b.split_at(k);
        b = t;
        Ok(h)
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let rank = u64::from_le_bytes(take(8)?.try_into()?) as usize;
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            shape.push(u64::from_le_bytes(take(8)?.try_into()?) as usize);
        }
        let numel: usize = shape.iter().product();
        let data = take(numel * 4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push(Tensor::from_vec(&shape, data)?);
    }
    Ok(out)
}

/// What rank 0 brings back from a generation.
struct RankResult {
    latents: Tensor,
    reports: Vec<RunReport>,
}

/// One rank's part of a generation over `world`: prompt encoding on rank 0 (broadcast), the
/// patch-parallel denoising loop on every rank, results on rank 0.
fn run_rank(
    a: &GenerateArgs,
    plan: &Plan,
    pcfg: &ParallelConfig,
    world: Arc<dyn Transport>,
    gpu: usize,
) -> Result<Option<RankResult>> {
    let rank = world.rank();
    let device = a.device.device(gpu);
    let unet_dir = plan.model.join("unet");
    let ucfg = UNetConfig::from_file(&unet_dir.join("config.json"))?;
    let factor = ucfg.downsample_factor();
    let (lh, lw) = (plan.noise.shape()[2], plan.noise.shape()[3]);
    if lh % factor != 0 || lw % factor != 0 {
        bail!(
            "--height {} --width {}: the latent ({lh}×{lw}) must be a multiple of {factor} in both directions for this UNet (image size a multiple of {})",
            plan.height,
            plan.width,
            factor * plan.height / lh
        );
    }
    let params = DenoiseParams {
        steps: a.steps,
        guidance: a.guidance,
        scheduler: plan.scheduler,
        micro: plan.micro,
        cuda_graphs: !a.no_cuda_graphs,
    };
    let cfg_split = params.cfg() && !a.no_cfg_split && world.size() >= 2;
    let runtime = PatchRuntime::new(
        world.clone(),
        cfg_split,
        pcfg.clone(),
        lh,
        lw,
        factor.trailing_zeros() as usize,
    )
    .map_err(|e| anyhow::anyhow!("--ranks {}: {e}", world.size()))?;

    // Text encoders run once, on rank 0; the embeddings and the initial noise are broadcast so
    // every rank starts from bit-identical inputs (pcpp-algorithm.md §7.11, §7.14).
    let mut msg = Vec::new();
    if rank == 0 {
        let text = TextEncoders::load(&plan.model, DType::F32)?;
        let e = text.encode(a.prompt(), a.negative_prompt.as_deref(), params.cfg())?;
        if e.truncated {
            eprintln!("warning: the prompt is longer than 77 tokens and was truncated");
        }
        let mut parts = vec![&e.prompt_embeds, &e.pooled, &plan.noise];
        // Image-to-image: rank 0 encodes the init image (VAE encoder mean, scaled latents).
        let init_latents = match &plan.init {
            Some((img, _)) => {
                let enc = VaeEncoder::load(&plan.model.join("vae"), DType::F32)?;
                Some(enc.scale_latents(&enc.encode_mean(img)?)?)
            }
            None => None,
        };
        if let Some(l) = &init_latents {
            parts.push(l);
        }
        msg = pack(&parts)?;
    }
    world.broadcast(CommKind::Control, 0, &mut msg)?;
    let mut ts = unpack(&msg, 3 + usize::from(plan.init.is_some()))?.into_iter();
    let (Some(prompt_embeds), Some(pooled), Some(noise)) = (ts.next(), ts.next(), ts.next()) else {
        bail!("internal: broadcast of the prompt embeddings");
    };
    let init_latents = ts.next();
    let start = match (&init_latents, &plan.init) {
        (Some(latents), Some((_, strength))) => DenoiseStart::Image {
            latents,
            noise: &noise,
            strength: *strength,
        },
        _ => DenoiseStart::Noise(&noise),
    };
    let embeds = PromptEmbeds {
        prompt_embeds: prompt_embeds.to_device(device)?,
        pooled: pooled.to_device(device)?,
        truncated: false,
    };

    let weights = Weights::open(
        &find_weight_file(&unet_dir, "diffusion_pytorch_model")?,
        DType::F32,
    )?
    .on_device(device);
    let unet = UNet::build(ucfg, &weights, runtime.factory())?;
    let sched = Pipeline::load_scheduler_config(&plan.model)?;
    let run_steps = match &plan.init {
        Some((_, strength)) => a.steps - img2img_start_step(a.steps, *strength)?,
        None => a.steps,
    };
    let pb = (rank == 0).then(|| progress_bar(run_steps));
    let latents = denoise_with(
        &unet,
        runtime.driver(),
        &sched,
        &params,
        &embeds,
        &start,
        &StepNoise::Derived,
        &mut |i, _| {
            if let Some(pb) = &pb {
                pb.set_position(i as u64)
            }
        },
    )?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let report = serde_json::to_vec(&runtime.report())?;
    let all = world.all_gather(CommKind::Control, &report)?;
    if rank != 0 {
        return Ok(None);
    }
    let reports = all
        .iter()
        .map(|r| serde_json::from_slice(r))
        .collect::<std::result::Result<Vec<RunReport>, _>>()?;
    Ok(Some(RankResult { latents, reports }))
}

fn transport_options(a: &GenerateArgs) -> TransportOptions {
    TransportOptions::with_timeout(std::time::Duration::from_secs(a.timeout))
}

/// The configs and weight-file sizes of a model folder, for the start-up check that every rank
/// runs the same model.
fn model_fingerprint(model: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for sub in [
        "model_index.json",
        "unet/config.json",
        "scheduler/scheduler_config.json",
    ] {
        out.extend(std::fs::read(model.join(sub)).unwrap_or_default());
    }
    if let Ok(entries) = std::fs::read_dir(model.join("unet")) {
        let mut sizes: Vec<(String, u64)> = entries
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().map(|m| m.len()).unwrap_or(0),
                )
            })
            .collect();
        sizes.sort();
        out.extend(format!("{sizes:?}").into_bytes());
    }
    out
}

/// Runs the command.
pub fn run(a: GenerateArgs) -> Result<()> {
    if a.batch.prompts.is_some() {
        return crate::batch::run(a);
    }
    let plan = validate(&a)?;
    let pcfg = parallel_config(&a, &plan.portions)?;
    pcfg.validate()?;
    let t0 = Instant::now();
    let env = launch::LaunchEnv::from_env()?;
    let kind = launch::resolve(a.transport.into(), &env);
    let result = if kind == TransportKind::Local {
        let outs = LocalTransport::run(a.ranks, transport_options(&a), |t| {
            run_rank(&a, &plan, &pcfg, t, 0)
        })
        .map_err(|e| match e {
            RankError::Failed { rank, source } => anyhow::anyhow!("rank {rank}: {source:#}"),
            other => anyhow::anyhow!("{other}"),
        })?;
        outs.into_iter().flatten().next()
    } else {
        let opts = launch::ConnectOptions {
            transport: transport_options(&a),
            ..launch::ConnectOptions::default()
        };
        let conn = launch::connect(kind, &env, &opts)?;
        let world = conn.transport.clone();
        if a.ranks != 1 && a.ranks != conn.world_size {
            launch::abort_job(
                world.as_ref(),
                &format!(
                    "--ranks {} disagrees with the {} processes the launcher started",
                    a.ranks, conn.world_size
                ),
            );
        }
        launch::abort_on_panic(world.clone());
        let hash =
            launch::fingerprint(&[format!("{a:?}").as_bytes(), &model_fingerprint(&plan.model)]);
        if let Err(e) = launch::check_same_everywhere(world.as_ref(), &hash) {
            launch::abort_job(world.as_ref(), &e.to_string());
        }
        match run_rank(&a, &plan, &pcfg, world.clone(), conn.local_rank) {
            Ok(r) => r,
            Err(e) => launch::abort_job(world.as_ref(), &format!("{e:#}")),
        }
    };
    let Some(res) = result else {
        return Ok(());
    };
    let dt = t0.elapsed().as_secs_f64();
    if let Some(p) = &a.report {
        let total: f64 = res
            .reports
            .first()
            .map(|r| r.steps.iter().map(|s| s.seconds).sum())
            .unwrap_or(0.0);
        let doc = serde_json::json!({
            "model": plan.model.display().to_string(),
            "height": plan.height,
            "width": plan.width,
            "steps": a.steps,
            "transport": kind.name(),
            "ranks": a.ranks,
            "denoise_seconds": total,
            "wall_seconds": dt,
            "per_rank": res.reports,
        });
        output::write_atomic(p, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    }
    let vae = VaeDecoder::load(&plan.model.join("vae"), DType::F32)?;
    finish(&a, &plan, &vae, &res.latents)?;
    eprintln!(
        "wrote {} in {:.2} s",
        a.output().display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the latents (if asked), decodes and writes the PNG.
fn finish(a: &GenerateArgs, plan: &Plan, vae: &VaeDecoder, latents: &Tensor) -> Result<()> {
    if let Some(p) = &a.save_latents {
        pcpp_kernels::io::save(p, &[("latents", latents)], None)
            .with_context(|| format!("--save-latents {}", p.display()))?;
    }
    let img = vae.decode(&vae.unscale_latents(latents)?)?;
    let (h, w) = (img.shape()[2], img.shape()[3]);
    let rgb = to_rgb8(&img)?;
    output::write_png(
        a.output(),
        &rgb[0],
        w,
        h,
        &[("parameters", parameters_text(a, plan))],
    )
}
