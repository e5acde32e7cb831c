//! diffusers' `FluxPipeline` (text to image, one image, no true CFG): CLIP-L pooled output and
//! T5 hidden states of the prompt, 2×2 packing of the latents into tokens, image/text positions,
//! the flow-matching Euler loop over the transformer, unpacking, the VAE's scale and shift, and the
//! VAE decode.
//!
//! Latents outside this module are unpacked, `[1, C, h, w]` with `C` the VAE's latent channels and
//! `h, w` the image size over the VAE's scale factor (both even): the initial noise as the caller
//! gives it and the final latents before the VAE's scale/shift. Between steps the latents are kept
//! in f32 (diffusers rounds them to the model dtype after each step; identical in f32).

use std::path::{Path, PathBuf};

use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::tokenizer::ClipTokenizer;
use pcpp_sdxl::{ClipTextModel, VaeDecoder};

use crate::blocks::JointAttention;
use crate::config::{FlowMatchConfig, PipelineKind};
use crate::error::{FluxError, Result};
use crate::rope::{image_ids, text_ids, RopeTables};
use crate::scheduler::FlowMatchSchedule;
use crate::t5::T5Encoder;
use crate::t5_tokenizer::T5Tokenizer;
use crate::transformer::{FluxCond, FluxTransformer};

/// `[1, C, h, w]` → `[1, (h/2)·(w/2), 4C]` (FluxPipeline's `_pack_latents`).
pub fn pack_latents(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = match x.shape() {
        &[b, c, h, w] if h % 2 == 0 && w % 2 == 0 && h > 0 && w > 0 => (b, c, h, w),
        sh => {
            return Err(FluxError::Input(format!(
                "latents to pack must be [b, C, h, w] with even h and w, got {sh:?}"
            )))
        }
    };
    Ok(x.reshape(&[b, c, h / 2, 2, w / 2, 2])?
        .permute(&[0, 2, 4, 1, 3, 5])?
        .reshape(&[b, (h / 2) * (w / 2), 4 * c])?)
}

/// `[1, (h/2)·(w/2), 4C]` → `[1, C, h, w]` (FluxPipeline's `_unpack_latents`).
pub fn unpack_latents(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, c4) = match x.shape() {
        &[b, n, c4] if n == (h / 2) * (w / 2) && c4 % 4 == 0 => (b, c4),
        sh => {
            return Err(FluxError::Input(format!(
                "packed latents {sh:?} do not hold a {h}×{w} latent"
            )))
        }
    };
    Ok(x.reshape(&[b, h / 2, w / 2, c4 / 4, 2, 2])?
        .permute(&[0, 3, 1, 4, 2, 5])?
        .reshape(&[b, c4 / 4, h, w])?)
}

/// The encoded prompt.
pub struct FluxPrompt {
    /// T5 hidden states `[1, max_sequence_length, d_model]`.
    pub t5: Tensor,
    /// Pooled CLIP output `[1, hidden]`.
    pub pooled: Tensor,
    /// Whether either tokenizer cut the prompt.
    pub truncated: bool,
}

/// A loaded Flux.1 pipeline folder.
pub struct FluxPipeline {
    dir: PathBuf,
    clip_tokenizer: ClipTokenizer,
    clip: ClipTextModel,
    t5_tokenizer: T5Tokenizer,
    t5: T5Encoder,
    transformer: FluxTransformer,
    vae: VaeDecoder,
    scheduler: FlowMatchConfig,
}

impl FluxPipeline {
    /// Loads every component of `dir` (a diffusers FluxPipeline folder) in `dtype` on `device`;
    /// the VAE in `vae_dtype`.
    pub fn load(dir: &Path, dtype: DType, vae_dtype: DType, device: Device) -> Result<Self> {
        let kind = PipelineKind::of_folder(dir)?;
        if !kind.is_flux() {
            return Err(FluxError::Model {
                path: dir.join("model_index.json"),
                msg: format!("`_class_name` is `{}`, not FluxPipeline", kind.class_name),
            });
        }
        let tok_err = |sub: &str, e: pcpp_sdxl::tokenizer::TokenizerError| FluxError::Tokenizer {
            path: dir.join(sub),
            msg: e.to_string(),
        };
        // the components load in parallel threads (the transformer and T5 are the bulk)
        let joined =
            |what: &str| FluxError::Input(format!("internal: loading the {what} panicked"));
        let (transformer, t5, clip, vae) = std::thread::scope(|s| {
            let tr = s.spawn(|| FluxTransformer::load_on(&dir.join("transformer"), dtype, device));
            let t5 = s.spawn(|| T5Encoder::load_on(&dir.join("text_encoder_2"), dtype, device));
            let clip = s.spawn(|| ClipTextModel::load_on(&dir.join("text_encoder"), dtype, device));
            let vae = VaeDecoder::load_on(&dir.join("vae"), vae_dtype, device);
            (
                tr.join().map_err(|_| joined("transformer")),
                t5.join().map_err(|_| joined("T5 encoder")),
                clip.join().map_err(|_| joined("CLIP text encoder")),
                vae,
            )
        });
        Ok(FluxPipeline {
            clip_tokenizer: ClipTokenizer::from_dir(dir.join("tokenizer"))
                .map_err(|e| tok_err("tokenizer", e))?,
            clip: clip??,
            t5_tokenizer: T5Tokenizer::from_dir(&dir.join("tokenizer_2"))?,
            t5: t5??,
            transformer: transformer??,
            vae: vae?,
            scheduler: FlowMatchConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?,
            dir: dir.to_path_buf(),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The transformer.
    pub fn transformer(&self) -> &FluxTransformer {
        &self.transformer
    }

    /// The VAE decoder.
    pub fn vae(&self) -> &VaeDecoder {
        &self.vae
    }

    /// The scheduler config.
    pub fn scheduler(&self) -> &FlowMatchConfig {
        &self.scheduler
    }

    /// Whether the transformer embeds a guidance scale (FLUX.1-dev) or not (FLUX.1-schnell).
    pub fn embeds_guidance(&self) -> bool {
        self.transformer.config().guidance_embeds
    }

    /// Channels and spatial divisor of the unpacked latents: (VAE latent channels, VAE scale factor).
    pub fn latent_geometry(&self) -> (usize, usize) {
        let c = self.vae.config();
        (c.latent_channels, c.scale_factor())
    }

    /// The unpacked latent size `(h, w)` of an image `height × width` (FluxPipeline's
    /// `2 · (H // (2f))`); an error unless both are multiples of `2f`.
    pub fn latent_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let f = self.latent_geometry().1;
        if height == 0 || width == 0 || height % (2 * f) != 0 || width % (2 * f) != 0 {
            return Err(FluxError::Input(format!(
                "image size {width}×{height} must be a positive multiple of {} (2 × the VAE scale factor) in both directions",
                2 * f
            )));
        }
        Ok((height / f, width / f))
    }

    /// Encodes a prompt: CLIP pooled output (77 tokens) and T5 states (`max_sequence_length`
    /// tokens, padded, no attention mask), as FluxPipeline's `encode_prompt`.
    pub fn encode_prompt(&self, prompt: &str, max_sequence_length: usize) -> Result<FluxPrompt> {
        let clip = self
            .clip_tokenizer
            .encode(prompt)
            .map_err(|e| FluxError::Tokenizer {
                path: self.dir.join("tokenizer"),
                msg: e.to_string(),
            })?;
        let ids =
            |v: &[u32]| Tensor::from_vec(&[1, v.len()], v.iter().map(|&x| x as f32).collect());
        let pooled = self.clip.forward(&ids(&clip.ids)?)?.pooled;
        let t5 = self.t5_tokenizer.encode(prompt, max_sequence_length)?;
        let states = self.t5.forward(&ids(&t5.ids)?)?;
        Ok(FluxPrompt {
            t5: states,
            pooled,
            truncated: clip.truncated || t5.truncated,
        })
    }

    /// Denoises `noise: [1, C, h, w]` (unpacked) in `steps` steps and returns the final latents
    /// `[1, C, h, w]` (f32, before the VAE's scale/shift). `guidance` is the embedded guidance
    /// scale (required by, and only used with, models that embed it). `on_step(i, steps)` is called
    /// after every step.
    pub fn denoise(
        &self,
        prompt: &FluxPrompt,
        noise: &Tensor,
        steps: usize,
        guidance: Option<f32>,
        attention: &dyn JointAttention,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (c, _) = self.latent_geometry();
        let (h, w) = match noise.shape() {
            &[1, ch, h, w] if ch == c && h % 2 == 0 && w % 2 == 0 && h > 0 && w > 0 => (h, w),
            sh => {
                return Err(FluxError::Input(format!(
                    "initial noise must be [1, {c}, h, w] with even h and w, got {sh:?}"
                )))
            }
        };
        let guidance = if self.embeds_guidance() {
            Some(guidance.ok_or_else(|| {
                FluxError::Input("this model embeds the guidance scale: give one".into())
            })?)
        } else {
            None
        };
        let (dt, dev) = (self.transformer.dtype(), self.transformer.device());
        let t = prompt.t5.shape()[1];
        let (hp, wp) = (h / 2, w / 2);
        let mut ids = text_ids(t);
        ids.extend(image_ids(hp, wp, 0));
        let rope = RopeTables::new(&ids, &self.transformer.config().axes_dims_rope, dev)?;
        let schedule = FlowMatchSchedule::new(&self.scheduler, steps, hp * wp)?;
        let txt = prompt.t5.to_dtype(dt)?.to_device(dev)?;
        let pooled = prompt.pooled.to_dtype(dt)?.to_device(dev)?;
        let mut latents = pack_latents(&noise.to_dtype(DType::F32)?.to_device(dev)?)?;
        for (i, &ts) in schedule.timesteps.iter().enumerate() {
            let cond = FluxCond {
                txt: &txt,
                pooled: &pooled,
                timestep: ts / 1000.0,
                guidance,
            };
            let v = self
                .transformer
                .forward(&latents.to_dtype(dt)?, &cond, &rope, attention)?;
            latents = schedule.step(i, &v, &latents)?;
            on_step(i + 1, schedule.steps());
        }
        unpack_latents(&latents, h, w)
    }

    /// Decodes final latents `[1, C, h, w]` (before scale/shift) to an image `[1, 3, H, W]` in
    /// `[-1, 1]` (not clamped).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let vae_dt = self.vae.dtype();
        let z = self.vae.unscale_latents(&latents.to_dtype(vae_dt)?)?;
        Ok(self.vae.decode(&z)?)
    }
}
