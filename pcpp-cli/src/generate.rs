//! `pcpp-cli generate`: text to image with an SDXL pipeline folder, serial or patch-parallel
//! (PCPP §1: the latent is cut into row bands, one per rank of a CFG group).
//!
//! Everything the user passes is validated before any model work: sizes, steps, portions, the
//! output paths (writable folder), the initial noise file's shape. Each rank then loads its models
//! once ([`pcpp_sdxl::Generator`]) and makes every requested image with them; rank 0 writes the
//! image and the optional latents atomically and prints the times of loading and of each image.

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
use pcpp_kernels::{DType, Tensor};
use pcpp_sdxl::scheduler::SchedulerKind;
use pcpp_sdxl::{
    image_from_rgb8, img2img_start_step, to_rgb8, DenoiseParams, GeneratedImage, Generator,
    ImageJob, LoadOptions, LoraSet, LoraSpec, MicroCond, ModelGeometry, ModelIndex, Pipeline,
};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

pub use crate::args::{DeviceArg, SchedulerArg, TransportArg};
use crate::output;

/// The tiny random-weight SDXL pipeline shipped in the repository, the default `--model`.
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-sdxl");

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
    /// Classifier-free guidance scale (≤ 1 disables CFG; default 5). Flux: the embedded guidance
    /// scale (default 3.5; ignored by models without guidance embedding).
    #[arg(long)]
    pub guidance: Option<f32>,
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
    #[command(flatten)]
    pub flux: crate::flux_generate::FluxFlags,
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
    /// How exchanges over MPI / UCX move GPU data: auto (CUDA-aware when the library moves device
    /// memory, else staged), cuda-aware, staged (pinned host buffers, copies on the communication
    /// stream) or host (pageable copies the compute stream waits for; no CUDA graphs). Default:
    /// $PCPP_DEVICE_COMM, else auto.
    #[arg(long)]
    pub device_comm: Option<pcpp_comm::DeviceComm>,
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
    /// Where every model runs: the text encoders, the UNet and the VAE (rank 0 encodes and
    /// decodes; every rank denoises).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute dtype of the UNet and the text encoders (default: f16 on a GPU, f32 on the CPU).
    /// A VAE whose config says `force_upcast` (SDXL's) decodes in f32 under f16, as diffusers does.
    #[arg(long)]
    pub dtype: Option<DType>,
    /// The VAE's dtype (default: f32 where the VAE's config says `force_upcast` and --dtype is
    /// f16, else --dtype).
    #[arg(long)]
    pub vae_dtype: Option<DType>,
    /// A LoRA adapter `FILE[:SCALE]` (kohya/A1111 or diffusers/PEFT safetensors; scale 1 by
    /// default), merged into the UNet's and the text encoders' weights once, at load; repeat the
    /// flag for several.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<String>,
    #[command(flatten)]
    pub controlnet: crate::control_flags::ControlFlags,
    /// With several ranks, decode the image on rank 0 alone instead of every rank decoding its
    /// band (the parallel decode is exact: the same image).
    #[arg(long)]
    pub serial_decode: bool,
    /// Print the load, encode, denoise and decode times of each image and the peak GPU memory.
    #[arg(long, short = 'v')]
    pub verbose: bool,
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

/// Reads `--init-image` as `[1, 3, H, W]` in `[-1, 1]`, resized the way diffusers'
/// `VaeImageProcessor` does it: each side rounded down to a multiple of the VAE's scale factor
/// (Lanczos). Where that size is still not a multiple of what the UNet needs, it is rounded down
/// further, with a note.
fn read_init_image(path: &Path, geo: &ModelGeometry) -> Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("--init-image {}: cannot read image", path.display()))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (f, m) = (geo.vae_scale_factor, geo.pixel_multiple().max(8));
    let (mut th, mut tw) = (h - h % f, w - w % f);
    if th % m != 0 || tw % m != 0 {
        (th, tw) = (th - th % m, tw - tw % m);
        if th > 0 && tw > 0 {
            eprintln!("note: --init-image {}: {w}×{h} resized to {tw}×{th} (this model needs sides that are multiples of {m})", path.display());
        }
    }
    if th == 0 || tw == 0 {
        bail!(
            "--init-image {}: {w}×{h} is smaller than the model's {m}×{m}-pixel minimum",
            path.display()
        );
    }
    let img = if (th, tw) == (h, w) {
        img
    } else {
        image::imageops::resize(
            &img,
            tw as u32,
            th as u32,
            image::imageops::FilterType::Lanczos3,
        )
    };
    Ok(image_from_rgb8(img.as_raw(), th, tw)?)
}

/// A text argument that may arrive as any bytes: non-UTF-8 input is an error naming the flag.
fn utf8_text() -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new()
        .try_map(|s| s.into_string().map_err(|_| "the text is not valid UTF-8"))
}

/// One image to make: its prompt, initial noise and output file.
pub struct Job {
    /// The prompt.
    pub prompt: String,
    /// Unit Gaussian noise `[1, c, h, w]`.
    pub noise: Tensor,
    /// The PNG to write.
    pub output: PathBuf,
    /// What made the noise (a seed or the `--init-noise` file), for the image's metadata.
    pub seed: String,
    /// `--prompts`: the 1-based line, for error messages.
    pub line: Option<usize>,
}

/// Validated settings of a `generate` run.
struct Plan {
    model: PathBuf,
    geometry: ModelGeometry,
    height: usize,
    width: usize,
    scheduler: SchedulerKind,
    portions: Vec<f64>,
    /// SDXL micro-conditioning.
    micro: MicroCond,
    /// Image-to-image: the init image `[1, 3, H, W]` in `[-1, 1]` and the strength.
    init: Option<(Tensor, f32)>,
    dtype: DType,
    jobs: Vec<Job>,
    /// `--prompts`: lines whose image already exists.
    skipped: usize,
    /// The `--lora` adapters, read once.
    lora: Option<LoraSet>,
    /// The `--controlnet` folders with their control images and guidance.
    control: Option<crate::control_flags::ControlPlan>,
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

/// Unit Gaussian noise from `seed` (ChaCha8 + the standard normal of `rand_distr`).
pub fn seeded_noise(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(shape, v)?)
}

/// Reads `initial_noise` of `--init-noise` and checks its shape.
fn read_noise(p: &Path, shape: &[usize], (height, width): (usize, usize)) -> Result<Tensor> {
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
    Ok(t)
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
    if a.batch.prompts.is_none() && a.prompt().trim().is_empty() {
        bail!("--prompt is empty");
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let guidance = a.cfg_scale();
    if !guidance.is_finite() || guidance < 0.0 {
        bail!("--guidance {guidance}: must be a finite number ≥ 0");
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
    let dtype = a.dtype.unwrap_or(match a.device {
        DeviceArg::Cpu => DType::F32,
        DeviceArg::Cuda => DType::F16,
    });
    if a.device == DeviceArg::Cpu && dtype != DType::F32 {
        bail!("--dtype {dtype}: the CPU computes in f32; use --dtype f32 or --device cuda");
    }
    if let Some(v) = a
        .vae_dtype
        .filter(|&v| a.device == DeviceArg::Cpu && v != DType::F32)
    {
        bail!("--vae-dtype {v}: the CPU computes in f32; use --vae-dtype f32 or --device cuda");
    }
    let portions = parse_portions(&a.portion)?;
    let lora = if a.loras.is_empty() {
        None
    } else {
        let specs = a
            .loras
            .iter()
            .map(|s| LoraSpec::parse(s).map_err(|e| anyhow::anyhow!("--lora {s}: {e}")))
            .collect::<Result<Vec<_>>>()?;
        Some(LoraSet::load(&specs)?)
    };
    let index = ModelIndex::load(&model)?;
    let geometry = ModelGeometry::load(&model)?;
    let init_image = a
        .init_image
        .as_deref()
        .map(|p| read_init_image(p, &geometry))
        .transpose()?;
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
            a.height.unwrap_or(geometry.default_size()),
            a.width.unwrap_or(geometry.default_size()),
        ),
    };
    // diffusers asks for multiples of 8; the UNet's down-sampling may ask for more.
    let multiple = geometry.pixel_multiple().max(8);
    for (flag, v) in [("--height", height), ("--width", width)] {
        if v == 0 || v % multiple != 0 {
            bail!("{flag} {v}: must be a positive multiple of {multiple} for this model (its VAE scales by {} and its UNet halves the latent {} times)",
                geometry.vae_scale_factor, geometry.latent_multiple.trailing_zeros());
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
    let control = a.controlnet.validate(height, width, init.is_some())?;
    let shape = geometry.latent_shape(height, width);
    let (jobs, skipped) = match &a.batch.prompts {
        Some(_) => crate::batch::jobs(a, &shape)?,
        None => {
            output::check_writable(a.output(), "--output")?;
            if a.output().extension().map(|e| e.to_ascii_lowercase()) != Some("png".into()) {
                bail!("--output {}: must end in .png", a.output().display());
            }
            let job =
                crate::batch::single_job(a, &shape, |p| read_noise(p, &shape, (height, width)))?;
            (vec![job], 0)
        }
    };
    Ok(Plan {
        model,
        geometry,
        height,
        width,
        scheduler,
        portions,
        micro,
        init,
        dtype,
        jobs,
        skipped,
        lora,
        control,
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

fn parameters_text(a: &GenerateArgs, p: &Plan, job: &Job) -> String {
    let mut s = job.prompt.clone();
    if let Some(n) = a.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
        s.push_str(&format!("\nNegative prompt: {n}"));
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Parallel: {}, Ranks: {}, Dtype: {}",
        a.steps,
        p.scheduler.label(),
        a.cfg_scale(),
        job.seed,
        p.width,
        p.height,
        p.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        a.parallel,
        a.ranks,
        p.dtype,
    ));
    for l in &a.loras {
        s.push_str(&format!(", Lora: {l}"));
    }
    s.push_str(&a.controlnet.metadata(p.control.as_ref()));
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

fn transport_options(a: &GenerateArgs) -> Result<TransportOptions> {
    crate::args::transport_options(a.timeout, a.device_comm, a.device)
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

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Runs the command.
pub fn run(a: GenerateArgs) -> Result<()> {
    if crate::flux_generate::is_flux(&a) {
        return crate::flux_generate::run(&a);
    }
    crate::flux_generate::reject_for_sdxl(&a)?;
    let plan = validate(&a)?;
    if plan.jobs.is_empty() {
        if let Some(dir) = &a.batch.output_dir {
            eprintln!(
                "0 images written, {} already present, in {}",
                plan.skipped,
                dir.display()
            );
        }
        return Ok(());
    }
    let pcfg = parallel_config(&a, &plan.portions)?;
    pcfg.validate()?;
    let env = launch::LaunchEnv::from_env()?;
    let kind = launch::resolve(a.transport.into(), &env);
    if kind == TransportKind::Local {
        LocalTransport::run(a.ranks, transport_options(&a)?, |t| {
            run_rank(&a, &plan, &pcfg, t, 0, kind)
        })
        .map_err(|e| match e {
            RankError::Failed { rank, source } => anyhow::anyhow!("rank {rank}: {source:#}"),
            other => anyhow::anyhow!("{other}"),
        })?;
        return Ok(());
    }
    let opts = launch::ConnectOptions {
        transport: transport_options(&a)?,
        ..launch::ConnectOptions::default()
    };
    let adapters = plan
        .lora
        .as_ref()
        .map(LoraSet::fingerprint)
        .unwrap_or_default();
    let (conn, gpu) = crate::job::join_job(
        kind,
        &env,
        &opts,
        a.ranks,
        a.device,
        &[
            format!("{a:?}").as_bytes(),
            &model_fingerprint(&plan.model),
            &adapters,
            &a.controlnet.fingerprint(),
        ],
    )?;
    let world = conn.transport.clone();
    if let Err(e) = run_rank(&a, &plan, &pcfg, world.clone(), gpu, kind) {
        launch::abort_job(world.as_ref(), &format!("{e:#}"));
    }
    Ok(())
}

/// One rank's part of a run over `world`: the models loaded once, then every job (rank 0 encodes,
/// every rank denoises its band, rank 0 decodes and writes the files).
fn run_rank(
    a: &GenerateArgs,
    plan: &Plan,
    pcfg: &ParallelConfig,
    world: Arc<dyn Transport>,
    gpu: usize,
    kind: TransportKind,
) -> Result<()> {
    let t_load = Instant::now();
    let rank = world.rank();
    let device = a.device.device(gpu);
    let params = DenoiseParams {
        steps: a.steps,
        guidance: a.cfg_scale(),
        scheduler: plan.scheduler,
        micro: plan.micro,
        cuda_graphs: !a.no_cuda_graphs,
    };
    let cfg_split = params.cfg() && !a.no_cfg_split && world.size() >= 2;
    let lat = plan.geometry.latent_shape(plan.height, plan.width);
    let runtime = PatchRuntime::new(
        world.clone(),
        cfg_split,
        pcfg.clone(),
        lat[2],
        lat[3],
        plan.geometry.latent_multiple.trailing_zeros() as usize,
    )
    .map_err(|e| anyhow::anyhow!("--ranks {}: {e}", world.size()))?;
    pcpp_kernels::reset_memory_high_water(device)?;
    // Several ranks decode their bands of the image together (the result equals the serial
    // decode), unless asked to decode on rank 0 alone.
    let parallel_decode = world.size() > 1 && !a.serial_decode;
    let opts = LoadOptions {
        dtype: plan.dtype,
        device,
        encoders: rank == 0,
        decoder: rank == 0 && !parallel_decode,
        vae_encoder: plan.init.is_some(),
        vae_dtype: a.vae_dtype,
        lora: plan.lora.as_ref(),
        controlnets: plan.control.as_ref().map_or(&[], |c| &c.dirs),
    };
    let mut gen = Generator::load(&plan.model, &opts, runtime.factory())?;
    if parallel_decode {
        gen.decode_in_parallel(world.clone(), lat[2], lat[3])
            .map_err(|e| anyhow::anyhow!("parallel VAE decode over {} ranks: {e}", world.size()))?;
    }
    pcpp_kernels::synchronize(device)?;
    let load_seconds = t_load.elapsed().as_secs_f64();
    if rank == 0 {
        eprintln!(
            "loaded {} ({} on {device}) in {load_seconds:.2} s",
            plan.model.display(),
            plan.dtype
        );
    }
    let run_steps = match &plan.init {
        Some((_, strength)) => a.steps - img2img_start_step(a.steps, *strength)?,
        None => a.steps,
    };
    for job in &plan.jobs {
        let t0 = Instant::now();
        let pb = (rank == 0).then(|| progress_bar(run_steps));
        let image = ImageJob {
            prompt: &job.prompt,
            negative: a.negative_prompt.as_deref(),
            params: &params,
            noise: &job.noise,
            init: plan.init.as_ref().map(|(img, s)| (img, *s)),
            control: plan.control.as_ref().map_or(&[], |c| &c.inputs),
        };
        let res = gen.generate(world.as_ref(), runtime.driver(), &image, &mut |i, _| {
            if let Some(pb) = &pb {
                pb.set_position(i as u64)
            }
        });
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        let res = match (res, &a.batch.prompts, job.line) {
            (Err(e), Some(f), Some(line)) => {
                return Err(
                    anyhow::Error::new(e).context(format!("--prompts {} line {line}", f.display()))
                )
            }
            (r, _, _) => r?,
        };
        let mut own = runtime.report();
        own.decode = gen.decode_traffic();
        own.decode_seconds = gen.decode_seconds();
        let report = serde_json::to_vec(&own)?;
        let all = world.all_gather(CommKind::Control, &report)?;
        let Some(img) = res else {
            continue;
        };
        let reports = all
            .iter()
            .map(|r| serde_json::from_slice(r))
            .collect::<std::result::Result<Vec<RunReport>, _>>()?;
        if img.truncated {
            eprintln!("warning: the prompt is longer than 77 tokens and was truncated");
        }
        write_outputs(a, plan, job, &img)?;
        let image_seconds = t0.elapsed().as_secs_f64();
        let peak = pcpp_kernels::memory_high_water(device)?;
        if let Some(p) = &a.report {
            let doc = serde_json::json!({
                "model": plan.model.display().to_string(),
                "height": plan.height,
                "width": plan.width,
                "steps": a.steps,
                "dtype": plan.dtype.to_string(),
                "device": device.to_string(),
                "transport": kind.name(),
                "ranks": world.size(),
                "load_seconds": load_seconds,
                "image_seconds": image_seconds,
                "encode_seconds": img.seconds.encode,
                "denoise_seconds": img.seconds.denoise,
                "decode_seconds": img.seconds.decode,
                "step_seconds": img.step_seconds,
                "peak_gpu_allocated_bytes": peak.map(|p| p.0),
                "peak_gpu_reserved_bytes": peak.map(|p| p.1),
                "per_rank": reports,
            });
            output::write_atomic(p, serde_json::to_string_pretty(&doc)?.as_bytes())?;
        }
        eprintln!("wrote {} in {image_seconds:.2} s", job.output.display());
        if a.verbose {
            let s = img.seconds;
            let mut line = format!(
                "  encode {:.3} s, denoise {:.3} s ({} steps), decode {:.3} s",
                s.encode,
                s.denoise,
                img.step_seconds.len(),
                s.decode
            );
            if let Some((alloc, reserved)) = peak {
                line.push_str(&format!(
                    "; peak GPU memory {:.2} GiB allocated, {:.2} GiB reserved",
                    gib(alloc),
                    gib(reserved)
                ));
            }
            eprintln!("{line}");
        }
    }
    if rank == 0 {
        if let (Some(dir), true) = (&a.batch.output_dir, a.batch.prompts.is_some()) {
            eprintln!(
                "{} images written, {} already present, in {}",
                plan.jobs.len(),
                plan.skipped,
                dir.display()
            );
        }
    }
    Ok(())
}

/// Writes the latents (if asked) and the PNG of one image.
fn write_outputs(a: &GenerateArgs, plan: &Plan, job: &Job, img: &GeneratedImage) -> Result<()> {
    if let Some(p) = &a.save_latents {
        pcpp_kernels::io::save(p, &[("latents", &img.latents)], None)
            .with_context(|| format!("--save-latents {}", p.display()))?;
    }
    let (h, w) = (img.image.shape()[2], img.image.shape()[3]);
    let rgb = to_rgb8(&img.image)?;
    output::write_png(
        &job.output,
        &rgb[0],
        w,
        h,
        &[("parameters", parameters_text(a, plan, job))],
    )
}
