//! The SDXL text-to-image pipeline (diffusers' `StableDiffusionXLPipeline`): the pipeline folder
//! (`model_index.json`), SDXL prompt encoding with both CLIP encoders, the micro-conditioning, and
//! [`Pipeline`], every component of a folder loaded in one process (the denoising loop is in
//! [`crate::denoise`], one rank's product path in [`crate::generation`]).

use std::path::{Path, PathBuf};

use pcpp_kernels::{DType, Device, Tensor};
use serde::Deserialize;

use crate::clip::ClipTextModel;
use crate::error::{Result, SdxlError};
use crate::lora::{ComponentLora, LoraComponent, LoraSet};
use crate::scheduler::{SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet;
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

impl PromptEmbeds {
    /// Placeholder embeddings of a rank that receives the real ones by broadcast.
    pub fn empty() -> PromptEmbeds {
        PromptEmbeds {
            prompt_embeds: Tensor::zeros(&[0], DType::F32),
            pooled: Tensor::zeros(&[0], DType::F32),
            truncated: false,
        }
    }
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
        Self::load_with_lora(dir, dtype, device, None)
    }

    /// [`TextEncoders::load_on`] with the text-encoder adapters of `lora` merged into both
    /// encoders' weights as they load.
    pub fn load_with_lora(
        dir: &Path,
        dtype: DType,
        device: Device,
        lora: Option<&LoraSet>,
    ) -> Result<TextEncoders> {
        let part = |c| lora.map_or(ComponentLora::empty(c), |l| l.for_component(c));
        let idx = ModelIndex::load(dir)?;
        let tok = |sub: &str| {
            ClipTokenizer::from_dir(dir.join(sub)).map_err(|e| SdxlError::Model {
                path: dir.join(sub),
                msg: e.to_string(),
            })
        };
        let te2 = ClipTextModel::load_with_lora(
            &dir.join("text_encoder_2"),
            dtype,
            device,
            part(LoraComponent::TextEncoder2),
        )?;
        if !te2.has_projection() {
            return Err(SdxlError::Model {
                path: dir.join("text_encoder_2"),
                msg: "SDXL's second text encoder needs a `text_projection` (CLIPTextModelWithProjection)".into(),
            });
        }
        Ok(TextEncoders {
            tok1: tok("tokenizer")?,
            tok2: tok("tokenizer_2")?,
            te1: ClipTextModel::load_with_lora(
                &dir.join("text_encoder"),
                dtype,
                device,
                part(LoraComponent::TextEncoder),
            )?,
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
                hidden: Tensor::zeros_on(
                    pos.hidden.shape(),
                    pos.hidden.dtype(),
                    pos.hidden.device(),
                )?,
                pooled: Tensor::zeros_on(
                    pos.pooled.shape(),
                    pos.pooled.dtype(),
                    pos.pooled.device(),
                )?,
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

    /// Loads the VAE encoder of the folder (for image-to-image; not loaded by [`Pipeline::load`])
    /// on the UNet's device.
    pub fn load_vae_encoder(&self, dtype: DType) -> Result<crate::vae_encoder::VaeEncoder> {
        crate::vae_encoder::VaeEncoder::load_on(&self.dir.join("vae"), dtype, self.unet.device())
    }

    /// Decodes final latents to images in `[-1, 1]`, `[b, 3, 8h, 8w]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(&self.vae.unscale_latents(latents)?)
    }
}
