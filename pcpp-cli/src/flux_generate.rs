//! `pcpp-cli generate` for a Flux.1 pipeline folder (`model_index.json` names `FluxPipeline`):
//! flag checks, the initial noise, one serial run of [`pcpp_flux::FluxPipeline`] and the outputs.
//!
//! Flux differs from SDXL in what the shared flags mean: `--guidance` is the guidance scale the
//! transformer embeds (FLUX.1-dev; default 3.5), not classifier-free guidance, and is ignored with
//! a note by models without guidance embedding (FLUX.1-schnell); `--init-noise` and
//! `--save-latents` hold unpacked latents `[1, C, H/f, W/f]` (C the VAE's latent channels, f its
//! scale factor; the final latents before the VAE's scale and shift). Flags that have no Flux
//! meaning yet are errors that say so. One rank only for now.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use pcpp_flux::{FluxPipeline, FullAttention, PipelineKind, MAX_SEQUENCE_LENGTH};
use pcpp_kernels::io::SafetensorsFile;
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::{to_rgb8, vae_dtype, VaeConfig};

use crate::args::DeviceArg;
use crate::generate::{seeded_noise, GenerateArgs};
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
    given(a.batch.prompts.is_some(), "--prompts", later)?;
    given(a.report.is_some(), "--report", later)?;
    given(
        a.ranks != 1,
        "--ranks",
        "Flux runs on one rank for now (patch parallelism for Flux is not yet wired)",
    )?;
    given(
        a.modes.gn_mode.is_some() || a.modes.sync_mode.is_some() || a.modes.split_scheme.is_some(),
        "--gn-mode/--sync-mode/--split-scheme",
        "parallel options; Flux runs on one rank for now",
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
    device: Device,
    noise_shape: [usize; 4],
}

fn plan(a: &GenerateArgs) -> Result<FluxPlan> {
    reject_unsupported(a)?;
    let model = a.model.clone().context("--model is required")?;
    if a.prompt().trim().is_empty() {
        bail!("--prompt is empty");
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
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
    if let Some(p) = &a.save_latents {
        output::check_writable(p, "--save-latents")?;
    }
    output::check_writable(a.output(), "--output")?;
    Ok(FluxPlan {
        model,
        height,
        width,
        guidance,
        max_len,
        dtype,
        vae_dtype: a.vae_dtype.unwrap_or(vae_dtype(&vae_cfg, dtype)),
        device: match a.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda(0),
        },
        noise_shape: [1, vae_cfg.latent_channels, height / f, width / f],
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

/// `generate` for a Flux folder.
pub fn run(a: &GenerateArgs) -> Result<()> {
    let p = plan(a)?;
    let (noise, seed) = match &a.init_noise {
        Some(f) => (
            read_noise(f, &p.noise_shape)?,
            format!("file {}", f.display()),
        ),
        None => (seeded_noise(&p.noise_shape, a.seed)?, a.seed.to_string()),
    };
    let t0 = Instant::now();
    let pipe = FluxPipeline::load(&p.model, p.dtype, p.vae_dtype, p.device)
        .with_context(|| format!("loading {}", p.model.display()))?;
    let t_load = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let prompt = pipe
        .encode_prompt(a.prompt(), p.max_len)
        .context("prompt encoding")?;
    if prompt.truncated {
        eprintln!(
            "note: the prompt was cut to fit the tokenizers (77 CLIP tokens, {} T5 tokens)",
            p.max_len
        );
    }
    let mut on_step = |i: usize, n: usize| {
        if a.verbose {
            eprintln!("step {i}/{n}");
        }
    };
    let latents = pipe
        .denoise(
            &prompt,
            &noise,
            a.steps,
            p.guidance,
            &FullAttention,
            &mut on_step,
        )
        .context("denoising")?;
    let image = pipe.decode(&latents).context("VAE decode")?;
    let t_gen = t1.elapsed().as_secs_f64();
    if let Some(sp) = &a.save_latents {
        let l = latents.to_device(Device::Cpu)?;
        pcpp_kernels::io::save(sp, &[("latents", &l)], None)
            .with_context(|| format!("--save-latents {}", sp.display()))?;
    }
    let rgb = to_rgb8(&image.to_device(Device::Cpu)?)?;
    let params = format!(
        "{}\nSteps: {}, Guidance: {}, Seed: {seed}, Size: {}x{}, Model: {}, Max sequence length: {}",
        a.prompt(),
        a.steps,
        p.guidance.map_or("none".into(), |g| g.to_string()),
        p.width,
        p.height,
        p.model.display(),
        p.max_len
    );
    output::write_png(
        a.output(),
        &rgb[0],
        p.width,
        p.height,
        &[("parameters", params)],
    )?;
    eprintln!(
        "wrote {} ({}×{}, {} steps): load {t_load:.1} s, generate {t_gen:.1} s",
        a.output().display(),
        p.width,
        p.height,
        a.steps
    );
    Ok(())
}
