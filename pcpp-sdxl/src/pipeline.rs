//! The SDXL text-to-image pipeline (diffusers' `StableDiffusionXLPipeline`): loading a diffusers
//! pipeline folder, SDXL prompt encoding with both CLIP encoders, the classifier-free-guided
//! denoising loop and the VAE decode.
//!
//! The denoising loop is written against [`StepDriver`] (PCPP §1.1, §1.4, §4): it asks the driver
//! for each step's context (synchronous warm-up or stale), and with CFG split it feeds only this
//! rank's branch to the UNet, whose gather layer returns both branches. Serially the driver is
//! [`SerialDriver`](pcpp_core::SerialDriver) and the loop is exactly diffusers'.

use std::path::{Path, PathBuf};

use pcpp_core::StepDriver;
use pcpp_kernels::{DType, Device, Tensor};
use serde::Deserialize;

use crate::clip::ClipTextModel;
use crate::error::{Result, SdxlError};
use crate::graph::StepGraphs;
use crate::scheduler::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet, UNetCond};
use crate::vae::VaeDecoder;
use crate::weights::read_json;

/// The parts of `model_index.json` the pipeline uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    /// Pipeline class; must be `StableDiffusionXLPipeline`.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// Zeros instead of an encoded empty negative prompt (SDXL base: true).
    #[serde(default = "yes")]
    pub force_zeros_for_empty_prompt: bool,
    /// `[library, class]` of the scheduler.
    #[serde(default)]
    pub scheduler: Option<(Option<String>, Option<String>)>,
}

fn yes() -> bool {
    true
}

impl ModelIndex {
    /// Reads and checks `DIR/model_index.json`.
    pub fn load(dir: &Path) -> Result<ModelIndex> {
        let path = dir.join("model_index.json");
        if !dir.is_dir() {
            return Err(SdxlError::Model {
                path: dir.to_path_buf(),
                msg: "model folder not found".into(),
            });
        }
        if !path.is_file() {
            return Err(SdxlError::Model {
                path,
                msg: "missing: not a diffusers pipeline folder (expected model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)".into(),
            });
        }
        let idx: ModelIndex = read_json(&path)?;
        if idx.class_name != "StableDiffusionXLPipeline" {
            return Err(SdxlError::config(
                &path,
                format!(
                    "_class_name is `{}`, expected `StableDiffusionXLPipeline`",
                    idx.class_name
                ),
            ));
        }
        Ok(idx)
    }

    /// The scheduler kind the folder names, if it is one we support.
    pub fn default_scheduler(&self) -> Option<SchedulerKind> {
        self.scheduler
            .as_ref()
            .and_then(|(_, c)| c.as_deref())
            .and_then(SchedulerKind::from_class_name)
    }
}

/// Prompt conditioning for the UNet, CFG batch order `[uncond, cond]` (or only `cond` without CFG).
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[b, 77, te1_hidden + te2_hidden]`: penultimate hidden states of both encoders.
    pub prompt_embeds: Tensor,
    /// `[b, te2_projection]`: pooled, projected output of text encoder 2.
    pub pooled: Tensor,
    /// Whether the prompt or the negative prompt was cut to 77 tokens.
    pub truncated: bool,
}

/// Both tokenizers and CLIP text encoders of an SDXL pipeline.
pub struct TextEncoders {
    tok1: ClipTokenizer,
    tok2: ClipTokenizer,
    te1: ClipTextModel,
    te2: ClipTextModel,
    force_zeros_for_empty_prompt: bool,
}

struct Encoded1 {
    hidden: Tensor,
    pooled: Tensor,
    truncated: bool,
}

impl TextEncoders {
    /// Loads `tokenizer/`, `tokenizer_2/`, `text_encoder/`, `text_encoder_2/` of a pipeline folder.
    pub fn load(dir: &Path, dtype: DType) -> Result<TextEncoders> {
        Self::load_on(dir, dtype, Device::Cpu)
    }

    /// [`TextEncoders::load`] with the encoders' weights loaded straight to `device`.
    pub fn load_on(dir: &Path, dtype: DType, device: Device) -> Result<TextEncoders> {
        let idx = ModelIndex::load(dir)?;
        let tok = |sub: &str| {
            ClipTokenizer::from_dir(dir.join(sub)).map_err(|e| SdxlError::Model {
                path: dir.join(sub),
                msg: e.to_string(),
            })
        };
        let te2 = ClipTextModel::load_on(&dir.join("text_encoder_2"), dtype, device)?;
        if !te2.has_projection() {
            return Err(SdxlError::Model {
                path: dir.join("text_encoder_2"),
                msg: "SDXL's second text encoder needs a `text_projection` (CLIPTextModelWithProjection)".into(),
            });
        }
        Ok(TextEncoders {
            tok1: tok("tokenizer")?,
            tok2: tok("tokenizer_2")?,
            te1: ClipTextModel::load_on(&dir.join("text_encoder"), dtype, device)?,
            te2,
            force_zeros_for_empty_prompt: idx.force_zeros_for_empty_prompt,
        })
    }

    fn encode_one(&self, prompt: &str) -> Result<Encoded1> {
        let mut hidden = Vec::new();
        let mut pooled = None;
        let mut truncated = false;
        for (tok, te) in [(&self.tok1, &self.te1), (&self.tok2, &self.te2)] {
            let enc = tok
                .encode(prompt)
                .map_err(|e| SdxlError::Input(format!("prompt: {e}")))?;
            truncated |= enc.truncated;
            let ids = Tensor::from_vec(
                &[1, enc.ids.len()],
                enc.ids.iter().map(|&i| i as f32).collect(),
            )?;
            let out = te.forward(&ids)?;
            hidden.push(out.penultimate_hidden_state);
            if let Some(p) = out.text_embeds {
                pooled = Some(p);
            }
        }
        let pooled =
            pooled.ok_or_else(|| SdxlError::Input("text encoder 2 has no projection".into()))?;
        Ok(Encoded1 {
            hidden: Tensor::cat(&[&hidden[0], &hidden[1]], 2)?,
            pooled,
            truncated,
        })
    }

    /// SDXL prompt encoding (diffusers' `encode_prompt`). With `cfg`, returns `[uncond, cond]`:
    /// the negative prompt encoded like the prompt, or zeros when there is none (`None` or empty)
    /// and the model asks for `force_zeros_for_empty_prompt`.
    pub fn encode(&self, prompt: &str, negative: Option<&str>, cfg: bool) -> Result<PromptEmbeds> {
        let pos = self.encode_one(prompt)?;
        if !cfg {
            return Ok(PromptEmbeds {
                prompt_embeds: pos.hidden,
                pooled: pos.pooled,
                truncated: pos.truncated,
            });
        }
        let negative = negative.filter(|n| !n.is_empty());
        let neg = match negative {
            None if self.force_zeros_for_empty_prompt => Encoded1 {
                hidden: Tensor::zeros(pos.hidden.shape(), DType::F32),
                pooled: Tensor::zeros(pos.pooled.shape(), DType::F32),
                truncated: false,
            },
            other => self.encode_one(other.unwrap_or(""))?,
        };
        Ok(PromptEmbeds {
            prompt_embeds: Tensor::cat(&[&neg.hidden, &pos.hidden], 0)?,
            pooled: Tensor::cat(&[&neg.pooled, &pos.pooled], 0)?,
            truncated: pos.truncated || neg.truncated,
        })
    }
}

/// SDXL's micro-conditioning (`add_time_ids`), in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroCond {
    /// `(height, width)` of the original image.
    pub original_size: (usize, usize),
    /// `(top, left)` crop coordinates.
    pub crop_top_left: (usize, usize),
    /// `(height, width)` of the target image.
    pub target_size: (usize, usize),
}

impl MicroCond {
    /// diffusers' defaults for an `height × width` image: original = target = size, no crop.
    pub fn for_size(height: usize, width: usize) -> MicroCond {
        MicroCond {
            original_size: (height, width),
            crop_top_left: (0, 0),
            target_size: (height, width),
        }
    }

    /// The six `add_time_ids` values: original size, crop offset, target size.
    pub fn ids(&self) -> [f32; 6] {
        [
            self.original_size.0 as f32,
            self.original_size.1 as f32,
            self.crop_top_left.0 as f32,
            self.crop_top_left.1 as f32,
            self.target_size.0 as f32,
            self.target_size.1 as f32,
        ]
    }
}

/// What the denoising loop needs besides the model.
#[derive(Debug, Clone)]
pub struct DenoiseParams {
    /// Number of inference steps.
    pub steps: usize,
    /// Classifier-free guidance scale; CFG runs when it is > 1.
    pub guidance: f32,
    /// Which sampler.
    pub scheduler: SchedulerKind,
    /// SDXL micro-conditioning.
    pub micro: MicroCond,
    /// On a GPU, replay steady steps as CUDA graphs (one per step parity, captured after two
    /// eager steady steps; [`crate::StepGraphs`]). Ignored on the CPU.
    pub cuda_graphs: bool,
}

impl DenoiseParams {
    /// Whether classifier-free guidance runs (diffusers: `guidance_scale > 1`).
    pub fn cfg(&self) -> bool {
        self.guidance > 1.0
    }
}

/// Per-step progress: `(step just finished, total steps)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// Where the denoising loop starts.
#[derive(Debug, Clone, Copy)]
pub enum DenoiseStart<'a> {
    /// Text-to-image: unit Gaussian noise `[1, c, h, w]`, scaled by the scheduler's
    /// `init_noise_sigma`; all steps run.
    Noise(&'a Tensor),
    /// Image-to-image (diffusers' `StableDiffusionXLImg2ImgPipeline`): the clean (scaled) latents
    /// of the init image `[1, c, h, w]` are noised with `noise` (same shape) to the level of the
    /// first step kept, and only the last `⌊steps · strength⌋` steps run
    /// ([`img2img_start_step`]).
    Image {
        /// Encoded init image, already multiplied by the VAE's scaling factor.
        latents: &'a Tensor,
        /// Unit Gaussian noise of the same shape.
        noise: &'a Tensor,
        /// Denoising strength in (0, 1]: the fraction of the schedule that runs.
        strength: f32,
    },
}

/// Where a stochastic sampler (Euler ancestral) gets its per-step noise.
#[derive(Debug, Clone)]
pub enum StepNoise {
    /// Derived from the initial noise (reproducible, and identical on every rank since every rank
    /// starts from the same initial noise): see [`derived_step_noise`].
    Derived,
    /// Given per step (index = step index of the full schedule), e.g. a diffusers generator's
    /// stream for parity; each `[1, c, h, w]`.
    Given(Vec<Tensor>),
}

/// The per-step noise of [`StepNoise::Derived`]: ChaCha8 seeded with the 64-bit FNV-1a hash of the
/// initial noise's `f32` bit patterns (little-endian), stream `step + 1`, drawing `len` values from
/// `rand_distr`'s `StandardNormal` as `f32` (the same normal sampler as the CLI's seeded noise).
pub fn derived_step_noise(initial: &[f32], step: usize, len: usize) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for v in initial {
        for b in v.to_bits().to_le_bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hash);
    rng.set_stream(step as u64 + 1);
    (0..len).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// The first step an image-to-image run executes for `steps` steps at `strength`
/// (diffusers: `t_start = steps − min(⌊steps · strength⌋, steps)`). An error when no step would
/// run or `strength` is outside (0, 1].
pub fn img2img_start_step(steps: usize, strength: f32) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(SdxlError::Input(format!(
            "strength {strength} must be in (0, 1]"
        )));
    }
    let init = ((steps as f64 * f64::from(strength)) as usize).min(steps);
    if init == 0 {
        return Err(SdxlError::Input(format!(
            "strength {strength} with {steps} steps runs no denoising step (needs steps · strength ≥ 1)"
        )));
    }
    Ok(steps - init)
}

/// The guided denoising loop: from unit Gaussian `noise` `[1, c, h, w]` to the final latents
/// (text-to-image; [`denoise_with`] with [`DenoiseStart::Noise`] and [`StepNoise::Derived`]).
///
/// With `driver.cfg_branch() == Some(g)` only branch `g` is fed to the UNet (the UNet's gather
/// returns `[uncond; cond]`); otherwise the whole CFG batch is.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    unet: &UNet,
    driver: &dyn StepDriver,
    sched_cfg: &SchedulerConfig,
    params: &DenoiseParams,
    embeds: &PromptEmbeds,
    noise: &Tensor,
    progress: Progress<'_>,
) -> Result<Tensor> {
    denoise_with(
        unet,
        driver,
        sched_cfg,
        params,
        embeds,
        &DenoiseStart::Noise(noise),
        &StepNoise::Derived,
        progress,
    )
}

/// The guided denoising loop from `start` (text-to-image or image-to-image), with the per-step
/// noise of stochastic samplers from `step_noise`. Progress counts the steps that run.
#[allow(clippy::too_many_arguments)]
pub fn denoise_with(
    unet: &UNet,
    driver: &dyn StepDriver,
    sched_cfg: &SchedulerConfig,
    params: &DenoiseParams,
    embeds: &PromptEmbeds,
    start: &DenoiseStart<'_>,
    step_noise: &StepNoise,
    progress: Progress<'_>,
) -> Result<Tensor> {
    let mut sched: Box<dyn Scheduler> = scheduler::build(params.scheduler, sched_cfg, params.steps)
        .map_err(|e| SdxlError::Input(format!("scheduler: {e}")))?;
    let sched_err = |e: scheduler::SchedulerError| SdxlError::Input(format!("scheduler: {e}"));
    let noise = match start {
        DenoiseStart::Noise(n) => *n,
        DenoiseStart::Image { noise, latents, .. } => {
            if latents.shape() != noise.shape() {
                return Err(SdxlError::Input(format!(
                    "init-image latents {:?} and noise {:?} differ in shape",
                    latents.shape(),
                    noise.shape()
                )));
            }
            *noise
        }
    };
    let shape = noise.shape().to_vec();
    if shape.len() != 4 || shape[0] != 1 {
        return Err(SdxlError::Input(format!(
            "initial noise must be [1, channels, h, w], got {shape:?}"
        )));
    }
    let cfg = params.cfg();
    let want_b = if cfg { 2 } else { 1 };
    if embeds.prompt_embeds.shape()[0] != want_b {
        return Err(SdxlError::Input(format!(
            "prompt embeddings have batch {}, expected {want_b}",
            embeds.prompt_embeds.shape()[0]
        )));
    }
    let branch = if cfg { driver.cfg_branch() } else { None };
    let ids = params.micro.ids();
    let (text, pooled) = match branch {
        Some(g) => (
            embeds.prompt_embeds.narrow(0, g, 1)?,
            embeds.pooled.narrow(0, g, 1)?,
        ),
        None => (embeds.prompt_embeds.clone(), embeds.pooled.clone()),
    };
    let fed = text.shape()[0];
    let time_ids = Tensor::from_vec(&[fed, 6], ids.repeat(fed))?;
    let cond = UNetCond::new(text, Some(pooled), Some(time_ids));
    // Graph replays read device buffers only: the conditioning moves to the GPU once.
    let device = unet.device();
    let graphs_on = params.cuda_graphs && device != Device::Cpu;
    let cond = if graphs_on {
        cond.to_device(device)?
    } else {
        cond
    };
    let mut graphs = StepGraphs::new(graphs_on);

    let noise_v = noise.to_vec_f32()?;
    let (first, mut latents) = match start {
        DenoiseStart::Noise(_) => {
            let sigma0 = sched.init_noise_sigma() as f32;
            (0, noise_v.iter().map(|v| v * sigma0).collect::<Vec<_>>())
        }
        DenoiseStart::Image {
            latents, strength, ..
        } => {
            let first = img2img_start_step(params.steps, *strength)?;
            let clean = latents.to_vec_f32()?;
            (
                first,
                sched
                    .add_noise(&clean, &noise_v, first)
                    .map_err(sched_err)?,
            )
        }
    };
    if let StepNoise::Given(v) = step_noise {
        if sched.needs_noise() {
            if v.len() < sched.num_steps() {
                return Err(SdxlError::Input(format!(
                    "{} per-step noise tensors given for {} steps",
                    v.len(),
                    sched.num_steps()
                )));
            }
            if let Some(bad) = v.iter().find(|t| t.shape() != shape.as_slice()) {
                return Err(SdxlError::Input(format!(
                    "per-step noise has shape {:?}, expected {shape:?}",
                    bad.shape()
                )));
            }
        }
    }
    let timesteps = sched.timesteps().to_vec();
    let total = timesteps.len() - first;
    driver.begin_generation()?;
    for (i, &t) in timesteps.iter().enumerate().skip(first) {
        let scaled = sched.scale_model_input(&latents, i).map_err(sched_err)?;
        let x = Tensor::from_vec(&shape, scaled)?;
        let x_in = if cfg && branch.is_none() {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x
        };
        let ts = Tensor::from_vec(&[x_in.shape()[0]], vec![t as f32; x_in.shape()[0]])?;
        // The step's inputs go to the UNet's device first, eager or replayed alike (so the
        // timestep embedding is computed in the same place either way).
        let (x_in, ts) = (x_in.to_device(device)?, ts.to_device(device)?);
        let ctx = driver.step_ctx(i - first);
        let out = graphs.run(unet, driver, &ctx, &x_in, &ts, &cond)?;
        let guided = if cfg {
            let u = out.narrow(0, 0, 1)?;
            let c = out.narrow(0, 1, 1)?;
            u.add(&c.sub(&u)?.affine(params.guidance, 0.0)?)?
        } else {
            out
        };
        let fresh = if sched.needs_noise() {
            Some(match step_noise {
                StepNoise::Derived => derived_step_noise(&noise_v, i, latents.len()),
                StepNoise::Given(v) => v[i].to_vec_f32()?,
            })
        } else {
            None
        };
        latents = sched
            .step(&guided.to_vec_f32()?, i, &latents, fresh.as_deref())
            .map_err(sched_err)?;
        progress(i + 1 - first, total);
    }
    driver.end_generation()?;
    Ok(Tensor::from_vec(&shape, latents)?)
}

/// A loaded SDXL pipeline folder.
pub struct Pipeline {
    /// The folder.
    pub dir: PathBuf,
    /// `model_index.json`.
    pub index: ModelIndex,
    /// Both text encoders and tokenizers.
    pub text: TextEncoders,
    /// The UNet, built through the caller's layer factory.
    pub unet: UNet,
    /// The VAE decoder.
    pub vae: VaeDecoder,
    /// `scheduler/scheduler_config.json`.
    pub scheduler: SchedulerConfig,
}

impl Pipeline {
    /// Reads `scheduler/scheduler_config.json` of a pipeline folder.
    pub fn load_scheduler_config(dir: &Path) -> Result<SchedulerConfig> {
        let path = dir.join("scheduler").join("scheduler_config.json");
        SchedulerConfig::from_file(&path).map_err(|e| SdxlError::Model {
            path,
            msg: e.to_string(),
        })
    }

    /// Loads every component of a pipeline folder; the UNet is built through `factory`.
    pub fn load(
        dir: &Path,
        dtype: DType,
        factory: &dyn pcpp_core::LayerFactory,
    ) -> Result<Pipeline> {
        Self::load_on(dir, dtype, Device::Cpu, dtype, factory)
    }

    /// [`Pipeline::load`] with every model's weights loaded straight to `device`; the VAE in
    /// `vae_dtype` (bf16 or f32 on the GPU: the SDXL VAE overflows in f16).
    pub fn load_on(
        dir: &Path,
        dtype: DType,
        device: Device,
        vae_dtype: DType,
        factory: &dyn pcpp_core::LayerFactory,
    ) -> Result<Pipeline> {
        let index = ModelIndex::load(dir)?;
        let scheduler = Self::load_scheduler_config(dir)?;
        Ok(Pipeline {
            dir: dir.to_path_buf(),
            index,
            text: TextEncoders::load_on(dir, dtype, device)?,
            unet: UNet::load_on(&dir.join("unet"), dtype, device, factory)?,
            vae: VaeDecoder::load_on(&dir.join("vae"), vae_dtype, device)?,
            scheduler,
        })
    }

    /// Loads the VAE encoder of the folder (for image-to-image; not loaded by [`Pipeline::load`]).
    pub fn load_vae_encoder(&self, dtype: DType) -> Result<crate::vae_encoder::VaeEncoder> {
        crate::vae_encoder::VaeEncoder::load(&self.dir.join("vae"), dtype)
    }

    /// Decodes final latents to images in `[-1, 1]`, `[b, 3, 8h, 8w]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(&self.vae.unscale_latents(latents)?)
    }
}
