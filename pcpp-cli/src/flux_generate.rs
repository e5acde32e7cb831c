//! `pcpp-cli generate` for a Flux.1 pipeline folder (`model_index.json` names `FluxPipeline`):
//! flag checks, the initial noise, a run of [`pcpp_flux::FluxPipeline`] serial or patch-parallel
//! over `--ranks` (image-row bands of the packed token grid; text tokens on every rank; `--parallel
//! pcpp|distrifusion|naive-patch`, `--portion`, `--warmup-steps`, `--sync-mode` and the transports
//! as for SDXL) and the outputs. Rank 0 encodes the prompt and broadcasts it with the initial
//! noise; every rank denoises its band and gets the whole prediction each step; the 16-channel
//! VAE decodes with pcpp-sdxl's patch-parallel decode (every rank a band of latent rows, exact;
//! `--serial-decode`: rank 0 alone), and rank 0 writes the files. `--prompts FILE --output-dir
//! DIR` makes one image per line with the models loaded once, as for SDXL ([`crate::batch`]).
//!
//! Flux differs from SDXL in what the shared flags mean: `--guidance` is the guidance scale the
//! transformer embeds (FLUX.1-dev; default 3.5), not classifier-free guidance, and is ignored with
//! a note by models without guidance embedding (FLUX.1-schnell); `--init-noise` and
//! `--save-latents` hold unpacked latents `[1, C, H/f, W/f]` (C the VAE's latent channels, f its
//! scale factor; the final latents before the VAE's scale and shift). Flags that have no Flux
//! meaning yet are errors that say so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use pcpp_comm::{launch, CommKind, LocalTransport, RankError, Transport, TransportKind};
use pcpp_core::{ParallelConfig, ParallelMode, PatchRuntime, RunReport};
use pcpp_flux::{FluxParts, FluxPipeline, FluxPrompt, PipelineKind, MAX_SEQUENCE_LENGTH};
use pcpp_kernels::io::SafetensorsFile;
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::{to_rgb8, vae_dtype, vae_parallel, wire, VaeConfig, VaeDecoder};

use crate::args::DeviceArg;
use crate::generate::{parse_portions, GenerateArgs, Job};
use crate::output;

/// FluxPipeline's default embedded guidance scale.
pub const DEFAULT_GUIDANCE: f32 = 3.5;

/// Flags only Flux uses.
#[derive(Debug, Clone, Default, Args)]
pub struct FluxFlags {
    /// Flux: T5 prompt length in tokens, the prompt padded or cut to it (1..=512; default 512).
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
}

/// Whether `--model` names a Flux.1 pipeline folder.
pub fn is_flux(a: &GenerateArgs) -> bool {
    a.model
        .as_deref()
        .filter(|m| m.join("model_index.json").is_file())
        .and_then(|m| PipelineKind::of_folder(m).ok())
        .is_some_and(|k| k.is_flux())
}

/// Errors for Flux-only flags given for another model family.
pub fn reject_for_sdxl(a: &GenerateArgs) -> Result<()> {
    if a.flux.max_sequence_length.is_some() {
        bail!("--max-sequence-length: only Flux pipelines have a T5 prompt; this model is not one");
    }
    Ok(())
}

/// Rejects the SDXL and parallel flags that have no Flux meaning (yet).
fn reject_unsupported(a: &GenerateArgs) -> Result<()> {
    let given = |on: bool, flag: &str, why: &str| -> Result<()> {
        if on {
            bail!("{flag}: {why}");
        }
        Ok(())
    };
    let sdxl = "an SDXL option; Flux pipelines do not have it";
    let later = "not yet supported for Flux pipelines";
    given(
        a.negative_prompt.is_some(),
        "--negative-prompt",
        "Flux uses embedded guidance (--guidance), not classifier-free guidance with a negative prompt",
    )?;
    given(
        a.scheduler.is_some(),
        "--scheduler",
        "Flux pipelines use their flow-matching Euler scheduler only",
    )?;
    given(a.original_size.is_some(), "--original-size", sdxl)?;
    given(
        a.crops_coords_top_left.is_some(),
        "--crops-coords-top-left",
        sdxl,
    )?;
    given(a.target_size.is_some(), "--target-size", sdxl)?;
    given(a.init_image.is_some(), "--init-image", later)?;
    given(a.strength.is_some(), "--strength", later)?;
    given(!a.loras.is_empty(), "--lora", later)?;
    given(
        a.controlnet.any(),
        "--controlnet/--control-image/--control-scale/--control-start/--control-end",
        "SDXL ControlNets; Flux pipelines do not take them",
    )?;
    given(
        a.modes.gn_mode.is_some(),
        "--gn-mode",
        "Flux's transformer has no group norms",
    )?;
    given(
        a.no_cfg_split,
        "--no-cfg-split",
        "Flux uses embedded guidance, there are no CFG branches to split",
    )?;
    given(
        a.parallel == ParallelMode::Tensor,
        "--parallel tensor",
        "Flux runs serial or patch-parallel (pcpp, distrifusion, naive-patch)",
    )?;
    Ok(())
}

/// Validated settings of a Flux run.
struct FluxPlan {
    model: PathBuf,
    height: usize,
    width: usize,
    guidance: Option<f32>,
    max_len: usize,
    dtype: DType,
    vae_dtype: DType,
    noise_shape: [usize; 4],
    parallel: ParallelConfig,
    /// The images to make: one, or one per `--prompts` line whose image is not there yet.
    jobs: Vec<Job>,
    /// `--prompts` lines skipped because their image exists.
    skipped: usize,
}

fn plan(a: &GenerateArgs) -> Result<FluxPlan> {
    reject_unsupported(a)?;
    let model = a.model.clone().context("--model is required")?;
    if a.batch.prompts.is_none() && a.prompt().trim().is_empty() {
        bail!("--prompt is empty");
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    if a.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    if let Some(w) = a.warmup_steps.filter(|&w| w > a.steps) {
        bail!("--warmup-steps {w} is larger than --steps {}", a.steps);
    }
    let portions = parse_portions(&a.portion)?;
    let mut parallel = ParallelConfig::preset(a.parallel, &portions, a.warmup_steps, a.steps);
    a.modes.apply(&mut parallel)?;
    parallel.validate()?;
    let max_len = a.flux.max_sequence_length.unwrap_or(MAX_SEQUENCE_LENGTH);
    if max_len == 0 || max_len > MAX_SEQUENCE_LENGTH {
        bail!("--max-sequence-length {max_len}: must be in 1..={MAX_SEQUENCE_LENGTH}");
    }
    a.device.check_built()?;
    let dtype = a.dtype.unwrap_or(match a.device {
        DeviceArg::Cpu => DType::F32,
        DeviceArg::Cuda => DType::BF16,
    });
    if a.device == DeviceArg::Cpu
        && (dtype != DType::F32 || a.vae_dtype.is_some_and(|v| v != DType::F32))
    {
        bail!("--dtype/--vae-dtype: the CPU computes in f32; use f32 or --device cuda");
    }
    let vae_cfg = VaeConfig::from_file(&model.join("vae/config.json"))?;
    let f = vae_cfg.scale_factor();
    let tr = pcpp_flux::FluxTransformerConfig::from_file(&model.join("transformer/config.json"))?;
    let native = 128 * f; // FluxPipeline's default_sample_size × the VAE scale factor
    let (height, width) = (a.height.unwrap_or(native), a.width.unwrap_or(native));
    let m = 2 * f;
    if height == 0 || width == 0 || height % m != 0 || width % m != 0 {
        bail!("--height {height} / --width {width}: must be positive multiples of {m} for this model (2 × the VAE scale factor)");
    }
    let guidance = if tr.guidance_embeds {
        let g = a.guidance.unwrap_or(DEFAULT_GUIDANCE);
        if !g.is_finite() {
            bail!("--guidance {g}: must be a finite number");
        }
        Some(g)
    } else {
        if let Some(g) = a.guidance {
            eprintln!("note: --guidance {g} ignored: this model does not embed a guidance scale (guidance_embeds is false, e.g. FLUX.1-schnell)");
        }
        None
    };
    let noise_shape = [1, vae_cfg.latent_channels, height / f, width / f];
    let (jobs, skipped) = match &a.batch.prompts {
        Some(_) => crate::batch::jobs(a, &noise_shape)?,
        None => {
            for (p, flag) in [(&a.save_latents, "--save-latents"), (&a.report, "--report")] {
                if let Some(p) = p {
                    output::check_writable(p, flag)?;
                }
            }
            output::check_writable(a.output(), "--output")?;
            let job = crate::batch::single_job(a, &noise_shape, |f| read_noise(f, &noise_shape))?;
            (vec![job], 0)
        }
    };
    Ok(FluxPlan {
        model,
        height,
        width,
        guidance,
        max_len,
        dtype,
        vae_dtype: a.vae_dtype.unwrap_or(vae_dtype(&vae_cfg, dtype)),
        noise_shape,
        parallel,
        jobs,
        skipped,
    })
}

/// Reads tensor `initial_noise` of `--init-noise` and checks its shape.
fn read_noise(p: &Path, shape: &[usize]) -> Result<Tensor> {
    let f = SafetensorsFile::open(p).with_context(|| "--init-noise".to_string())?;
    let t = f
        .load("initial_noise", Some(DType::F32))
        .with_context(|| format!("--init-noise {}", p.display()))?;
    if t.shape() != shape {
        bail!(
            "--init-noise {}: tensor `initial_noise` has shape {:?}, expected {shape:?} (unpacked [1, C, H/f, W/f])",
            p.display(),
            t.shape()
        );
    }
    Ok(t)
}

/// The configs and weight-file sizes of a Flux folder, for the start-up check that every rank
/// of a launched job runs the same model.
fn model_fingerprint(model: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for sub in [
        "model_index.json",
        "transformer/config.json",
        "scheduler/scheduler_config.json",
    ] {
        out.extend(std::fs::read(model.join(sub)).unwrap_or_default());
    }
    if let Ok(entries) = std::fs::read_dir(model.join("transformer")) {
        let mut sizes: Vec<(String, u64)> = entries
            .flatten()
            .map(|e| {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                (e.file_name().to_string_lossy().into_owned(), len)
            })
            .collect();
        sizes.sort();
        out.extend(format!("{sizes:?}").into_bytes());
    }
    out
}

/// `generate` for a Flux folder: ranks as threads (`--transport local`) or as launched
/// processes (the other transports), as for SDXL.
pub fn run(a: &GenerateArgs) -> Result<()> {
    let p = plan(a)?;
    if p.jobs.is_empty() {
        if let Some(dir) = &a.batch.output_dir {
            eprintln!(
                "0 images written, {} already present, in {}",
                p.skipped,
                dir.display()
            );
        }
        return Ok(());
    }
    let opts = crate::args::transport_options(a.timeout, a.device_comm, a.device)?;
    let env = launch::LaunchEnv::from_env()?;
    let kind = launch::resolve(a.transport.into(), &env);
    if kind == TransportKind::Local {
        LocalTransport::run(a.ranks, opts, |t| run_rank(a, &p, t, 0, kind)).map_err(
            |e| match e {
                RankError::Failed { rank, source } => anyhow::anyhow!("rank {rank}: {source:#}"),
                other => anyhow::anyhow!("{other}"),
            },
        )?;
        return Ok(());
    }
    let copts = launch::ConnectOptions {
        transport: opts,
        ..launch::ConnectOptions::default()
    };
    let (conn, gpu) = crate::job::join_job(
        kind,
        &env,
        &copts,
        a.ranks,
        a.device,
        &[format!("{a:?}").as_bytes(), &model_fingerprint(&p.model)],
    )?;
    let world = conn.transport.clone();
    if let Err(e) = run_rank(a, &p, world.clone(), gpu, kind) {
        launch::abort_job(world.as_ref(), &format!("{e:#}"));
    }
    Ok(())
}

/// Rank 0's prompt encoding and initial noise on every rank, bit for bit.
fn broadcast_inputs(
    world: &dyn Transport,
    mine: Option<(FluxPrompt, Tensor)>,
) -> Result<(FluxPrompt, Tensor)> {
    let mut msg = Vec::new();
    if let Some((pr, noise)) = &mine {
        msg = wire::pack(&[&pr.t5, &pr.pooled, noise])?;
    }
    world
        .broadcast(CommKind::Control, 0, &mut msg)
        .map_err(|e| anyhow::anyhow!("broadcast of the prompt embeddings: {e}"))?;
    if let Some(m) = mine {
        return Ok(m);
    }
    let mut ts = wire::unpack(&msg, 3)?.into_iter();
    match (ts.next(), ts.next(), ts.next()) {
        (Some(t5), Some(pooled), Some(noise)) => Ok((
            FluxPrompt {
                t5,
                pooled,
                truncated: false,
            },
            noise,
        )),
        _ => bail!("internal: broadcast of the prompt embeddings"),
    }
}

/// One rank's part of a run over `world`: the transformer through this rank's patch-parallel
/// runtime (rank 0 also loads the text encoders and the VAE), the denoising of its band, and on
/// rank 0 the decode and the files.
fn run_rank(
    a: &GenerateArgs,
    p: &FluxPlan,
    world: Arc<dyn Transport>,
    gpu: usize,
    kind: TransportKind,
) -> Result<()> {
    let rank = world.rank();
    let device = a.device.device(gpu);
    let (lh, lw) = (p.noise_shape[2], p.noise_shape[3]);
    // bands are cut on the packed token grid (the transformer's level 0)
    let runtime = PatchRuntime::new(world.clone(), false, p.parallel.clone(), lh / 2, lw / 2, 0)
        .map_err(|e| anyhow::anyhow!("--ranks {}: {e}", world.size()))?;
    // several ranks decode their bands of the image together (exact), unless asked otherwise
    let decode_rt = if world.size() > 1 && !a.serial_decode {
        let vc = VaeConfig::from_file(&p.model.join("vae/config.json"))?;
        Some(
            vae_parallel::decode_runtime(world.clone(), &vc, lh, lw).map_err(|e| {
                anyhow::anyhow!("parallel VAE decode over {} ranks: {e}", world.size())
            })?,
        )
    } else {
        None
    };
    let t0 = Instant::now();
    let parts = FluxParts {
        encoders: rank == 0,
        decoder: rank == 0 && decode_rt.is_none(),
    };
    let pipe = FluxPipeline::load_parts(
        &p.model,
        p.dtype,
        p.vae_dtype,
        device,
        runtime.factory(),
        parts,
    )
    .with_context(|| format!("loading {}", p.model.display()))?;
    let band_vae = match &decode_rt {
        Some(rt) => Some(VaeDecoder::load_with(
            &p.model.join("vae"),
            p.vae_dtype,
            device,
            rt.factory(),
        )?),
        None => None,
    };
    let t_load = t0.elapsed().as_secs_f64();
    let r = RankRun {
        a,
        p,
        world: world.as_ref(),
        runtime: &runtime,
        pipe: &pipe,
        decode_rt: decode_rt.as_ref(),
        band_vae: band_vae.as_ref(),
        device,
        kind,
        t_load,
    };
    for job in &p.jobs {
        one_image(&r, job).map_err(|e| match job.line {
            Some(l) => e.context(format!("--prompts line {l}")),
            None => e,
        })?;
    }
    if let (0, Some(dir)) = (rank, &a.batch.output_dir) {
        eprintln!(
            "{} images written, {} already present, in {}",
            p.jobs.len(),
            p.skipped,
            dir.display()
        );
    }
    Ok(())
}

/// What one rank's images share: the loaded models and runtimes.
struct RankRun<'a> {
    a: &'a GenerateArgs,
    p: &'a FluxPlan,
    world: &'a dyn Transport,
    runtime: &'a PatchRuntime,
    pipe: &'a FluxPipeline,
    decode_rt: Option<&'a PatchRuntime>,
    band_vae: Option<&'a VaeDecoder>,
    device: Device,
    kind: TransportKind,
    t_load: f64,
}

/// One image on this rank: rank 0 encodes the prompt and broadcasts it with the noise, every rank
/// denoises its band, the decode, and on rank 0 the files.
fn one_image(r: &RankRun<'_>, job: &Job) -> Result<()> {
    let RankRun {
        a,
        p,
        world,
        runtime,
        pipe,
        decode_rt,
        band_vae,
        device,
        kind,
        t_load,
    } = *r;
    let rank = world.rank();
    let t1 = Instant::now();
    let mine = if rank == 0 {
        let prompt = pipe
            .encode_prompt(&job.prompt, p.max_len)
            .context("prompt encoding")?;
        pcpp_kernels::synchronize(device)?;
        if prompt.truncated {
            eprintln!(
                "note: the prompt was cut to fit the tokenizers (77 CLIP tokens, {} T5 tokens)",
                p.max_len
            );
        }
        Some((prompt, job.noise.clone()))
    } else {
        None
    };
    let t_encode = t1.elapsed().as_secs_f64();
    let (prompt, noise) = broadcast_inputs(world, mine)?;
    let t2 = Instant::now();
    let mut on_step = |i: usize, n: usize| {
        if a.verbose && rank == 0 {
            eprintln!("step {i}/{n}");
        }
    };
    let out = pipe
        .denoise(
            &prompt,
            &noise,
            a.steps,
            p.guidance,
            runtime.driver(),
            !a.no_cuda_graphs,
            &mut on_step,
        )
        .context("denoising")?;
    if let Some(s) = out.nonfinite_at {
        eprintln!("warning: the latents held a NaN or an infinity from step {s} on");
    }
    let latents = out.latents;
    pcpp_kernels::synchronize(device)?;
    let t_denoise = t2.elapsed().as_secs_f64();
    let t3 = Instant::now();
    let image = match (&decode_rt, &band_vae) {
        (Some(rt), Some(vae)) => {
            let z = vae.unscale_latents(&latents.to_dtype(vae.dtype())?)?;
            vae_parallel::decode_to_root(vae, rt, &z).context("parallel VAE decode")?
        }
        _ if rank == 0 => Some(pipe.decode(&latents).context("VAE decode")?),
        _ => None,
    };
    let mut own = runtime.report();
    own.decode = decode_rt.as_ref().map(|rt| rt.report().total);
    let all = world.all_gather(CommKind::Control, &serde_json::to_vec(&own)?)?;
    let Some(image) = image else {
        return Ok(());
    };
    pcpp_kernels::synchronize(device)?;
    let t_decode = t3.elapsed().as_secs_f64();
    let t_gen = t1.elapsed().as_secs_f64();
    if let Some(sp) = &a.save_latents {
        let l = latents.to_device(Device::Cpu)?;
        pcpp_kernels::io::save(sp, &[("latents", &l)], None)
            .with_context(|| format!("--save-latents {}", sp.display()))?;
    }
    if let Some(rp) = &a.report {
        let reports = all
            .iter()
            .map(|r| serde_json::from_slice(r))
            .collect::<std::result::Result<Vec<RunReport>, _>>()?;
        let doc = serde_json::json!({
            "model": p.model.display().to_string(),
            "height": p.height,
            "width": p.width,
            "steps": a.steps,
            "dtype": p.dtype.to_string(),
            "device": device.to_string(),
            "transport": kind.name(),
            "ranks": world.size(),
            "parallel": p.parallel.mode.to_string(),
            "load_seconds": t_load,
            "generate_seconds": t_gen,
            "encode_seconds": t_encode,
            "denoise_seconds": t_denoise,
            "decode_seconds": t_decode,
            "step_seconds": out.step_seconds,
            "per_rank": reports,
        });
        output::write_atomic(rp, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    }
    let rgb = to_rgb8(&image.to_device(Device::Cpu)?)?;
    let params = format!(
        "{}\nSteps: {}, Guidance: {}, Seed: {}, Size: {}x{}, Model: {}, Max sequence length: {}, Ranks: {}, Parallel: {}",
        job.prompt,
        a.steps,
        p.guidance.map_or("none".into(), |g| g.to_string()),
        p.width,
        p.height,
        p.model.display(),
        p.max_len,
        world.size(),
        p.parallel.mode,
        job.seed,
    );
    output::write_png(
        &job.output,
        &rgb[0],
        p.width,
        p.height,
        &[("parameters", params)],
    )?;
    if a.verbose {
        eprintln!(
            "encode {t_encode:.3} s, denoise {t_denoise:.3} s, decode {t_decode:.3} s (the \
             image's {t_gen:.3} s)"
        );
    }
    eprintln!(
        "wrote {} ({}×{}, {} steps, {} rank(s)): load {t_load:.1} s, generate {t_gen:.1} s",
        &job.output.display(),
        p.width,
        p.height,
        a.steps,
        world.size()
    );
    Ok(())
}
