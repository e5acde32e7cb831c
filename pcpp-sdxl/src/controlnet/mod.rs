//! diffusers' `ControlNetModel` for SDXL (`models/controlnets/controlnet.py`), built through the
//! same [`LayerFactory`] as the UNet so that it runs patch-parallel with the UNet's bands, halos,
//! stale context and CUDA graphs (PCPP §2; the ControlNet's layers get their own stale-cache slots
//! under the id prefix `controlnet.{k}.`).
//!
//! The model is the UNet's encoder half (time and added text/time embeddings, `conv_in`, down
//! blocks, mid block: [`crate::unet_blocks::Encoder`], the UNet's own code) plus
//! - `controlnet_cond_embedding`: `conv_in`, `blocks.*` (3×3 convolutions, every second one with
//!   stride 2) and `conv_out`, SiLU after all but `conv_out`, from the control image at pixel
//!   resolution down to the latent grid. Its convolutions are built with
//!   [`LayerFactory::fine_input_conv2d`] / [`LayerFactory::fine_conv2d`]: each rank takes its band
//!   of the whole image (rows × 8) and exchanges halo rows like any other convolution;
//! - the zero convolutions `controlnet_down_blocks.{k}` (1×1, one per skip connection of the down
//!   path) and `controlnet_mid_block`, whose outputs times the conditioning scale are the
//!   residuals the UNet adds ([`ControlResiduals`]).
//!
//! `guess_mode` and `global_pool_conditions` are not supported (a config asking for global pooling
//! is refused).

mod step;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pcpp_core::{Conv2dLayer, LayerFactory, PrefixedFactory, StepCtx};
use pcpp_kernels::{Activation, DType, Device, Tensor};
use serde_json::Value;

use crate::error::{Result, SdxlError};
use crate::unet::{batch_timesteps, skip_channels, ControlResiduals, Taps, UNet, UNetCond};
use crate::unet_blocks::{Encoder, Fwd};
use crate::unet_config::{UNetConfig, UNetConfigJson};
use crate::weights::{find_weight_file, read_json, Weights};

pub(crate) use step::ControlledUNet;
pub use step::{
    control_image_from_rgb8, Control, ControlGuidance, ControlInput, ControlStep, ControlUnit,
};

/// A ControlNet's `config.json`, resolved.
#[derive(Debug, Clone)]
pub struct ControlNetConfig {
    /// The encoder's configuration, resolved as a UNet's (the up path mirrors the down path and
    /// is not used).
    pub unet: UNetConfig,
    /// Channels of the control image (`conditioning_channels`, 3: RGB).
    pub conditioning_channels: usize,
    /// `conditioning_embedding_out_channels`.
    pub embedding_channels: Vec<usize>,
    /// `controlnet_conditioning_channel_order = "bgr"`: the image's channels are reversed.
    pub bgr: bool,
}

impl ControlNetConfig {
    /// Reads and resolves a ControlNet `config.json`; errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<ControlNetConfig> {
        let mut v: Value = read_json(path)?;
        let err = |m: String| SdxlError::config(path, m);
        let obj = v
            .as_object_mut()
            .ok_or_else(|| err("not a JSON object".into()))?;
        if let Some(c) = obj.get("_class_name").and_then(Value::as_str) {
            if c != "ControlNetModel" {
                return Err(err(format!(
                    "`_class_name` is `{c}`; only diffusers' `ControlNetModel` is supported"
                )));
            }
        }
        let conditioning_channels = match obj.get("conditioning_channels") {
            None => 3,
            Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
                err(format!(
                    "`conditioning_channels` must be an integer, got {x}"
                ))
            })?,
        };
        if conditioning_channels != 3 {
            return Err(err(format!(
                "`conditioning_channels` = {conditioning_channels}: the control image is an RGB image (3 channels)"
            )));
        }
        let bgr = match obj
            .get("controlnet_conditioning_channel_order")
            .and_then(Value::as_str)
        {
            None | Some("rgb") => false,
            Some("bgr") => true,
            Some(o) => {
                return Err(err(format!(
                    "`controlnet_conditioning_channel_order` = `{o}`: must be `rgb` or `bgr`"
                )))
            }
        };
        if obj.get("global_pool_conditions").and_then(Value::as_bool) == Some(true) {
            return Err(err(
                "`global_pool_conditions` = true (shuffle-style ControlNets, which imply guess mode) is not supported by this engine".into(),
            ));
        }
        let embedding_channels = match obj.get("conditioning_embedding_out_channels") {
            None | Some(Value::Null) => vec![16, 32, 96, 256],
            Some(x) => serde_json::from_value::<Vec<usize>>(x.clone()).map_err(|_| {
                err(format!(
                    "`conditioning_embedding_out_channels` must be a list of integers, got {x}"
                ))
            })?,
        };
        if embedding_channels.is_empty() || embedding_channels.contains(&0) {
            return Err(err(format!(
                "`conditioning_embedding_out_channels` {embedding_channels:?} must be non-empty and positive"
            )));
        }
        // The encoder resolves like a UNet's: give it the up path a UNet would mirror.
        let down: Vec<String> = obj
            .get("down_block_types")
            .and_then(|d| serde_json::from_value(d.clone()).ok())
            .ok_or_else(|| err("`down_block_types` is missing or not a list of names".into()))?;
        let up: Vec<Value> = down
            .iter()
            .rev()
            .map(|d| Value::String(d.replace("Down", "Up")))
            .collect();
        obj.entry("up_block_types").or_insert(Value::Array(up));
        let in_ch = obj.get("in_channels").cloned().unwrap_or(Value::from(4));
        obj.entry("out_channels").or_insert(in_ch);
        let raw: UNetConfigJson =
            serde_json::from_value(v).map_err(|e| err(format!("not a ControlNet config: {e}")))?;
        Ok(ControlNetConfig {
            unet: UNetConfig::resolve(&raw, path)?,
            conditioning_channels,
            embedding_channels,
            bgr,
        })
    }

    /// How many times the conditioning embedding halves the control image (its stride-2
    /// convolutions): the control image is `2^up` times the latent.
    pub fn up(&self) -> usize {
        self.embedding_channels.len() - 1
    }
}

/// `controlnet_cond_embedding`: control image (pixels) → latent-grid features.
struct CondEmbedding {
    convs: Vec<Arc<dyn Conv2dLayer>>,
    conv_out: Arc<dyn Conv2dLayer>,
}

impl CondEmbedding {
    fn load(cfg: &ControlNetConfig, w: &Weights, f: &dyn LayerFactory) -> Result<CondEmbedding> {
        let p = "controlnet_cond_embedding";
        let up = cfg.up();
        let ch = &cfg.embedding_channels;
        let get = |name: &str, co: usize, ci: usize| -> Result<(Tensor, Option<Tensor>)> {
            Ok((
                w.get(&format!("{name}.weight"), &[co, ci, 3, 3])?,
                w.get_opt(&format!("{name}.bias"), &[co])?,
            ))
        };
        let name = format!("{p}.conv_in");
        let (wt, b) = get(&name, ch[0], cfg.conditioning_channels)?;
        let mut convs = vec![f.fine_input_conv2d(&name, wt, b, 1, 1, up)?];
        for i in 0..ch.len() - 1 {
            for (k, stride, co) in [(2 * i, 1, ch[i]), (2 * i + 1, 2, ch[i + 1])] {
                let name = format!("{p}.blocks.{k}");
                let (wt, b) = get(&name, co, ch[i])?;
                convs.push(f.fine_conv2d(&name, wt, b, stride, 1, up)?);
            }
        }
        let name = format!("{p}.conv_out");
        let c0 = cfg.unet.block_out_channels[0];
        let (wt, b) = get(&name, c0, ch[ch.len() - 1])?;
        Ok(CondEmbedding {
            convs,
            conv_out: f.conv2d(&name, wt, b, 1, 1)?,
        })
    }

    fn forward(&self, ctx: &StepCtx, image: &Tensor) -> Result<Tensor> {
        let mut h = image.clone();
        for c in &self.convs {
            h = c.forward(ctx, &h)?.act(Activation::Silu)?;
        }
        Ok(self.conv_out.forward(ctx, &h)?)
    }
}

/// A ControlNet ready to run, built through some [`LayerFactory`].
pub struct ControlNet {
    dir: PathBuf,
    cfg: ControlNetConfig,
    enc: Encoder,
    embed: CondEmbedding,
    zero_down: Vec<Arc<dyn Conv2dLayer>>,
    zero_mid: Arc<dyn Conv2dLayer>,
}

impl ControlNet {
    /// Loads a diffusers `ControlNetModel` folder (`config.json` and
    /// `diffusion_pytorch_model.safetensors` or its `.fp16` variant) in `dtype` straight to
    /// `device`, building its layers through `factory` with ids prefixed `controlnet.{index}.`.
    /// Every tensor of the file must be used; errors name the folder, file and tensor.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: Device,
        factory: &dyn LayerFactory,
        index: usize,
    ) -> Result<ControlNet> {
        if !dir.is_dir() {
            return Err(SdxlError::Model {
                path: dir.to_path_buf(),
                msg: "ControlNet folder not found".into(),
            });
        }
        let cfg = ControlNetConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(&find_weight_file(dir, "diffusion_pytorch_model")?, dtype)?
            .on_device(device);
        Self::build(dir, cfg, &weights, factory, index)
    }

    /// Builds from a resolved config and an opened weight file (all tensors must be used).
    pub fn build(
        dir: &Path,
        cfg: ControlNetConfig,
        w: &Weights,
        factory: &dyn LayerFactory,
        index: usize,
    ) -> Result<ControlNet> {
        let f = PrefixedFactory::new(factory, &format!("controlnet.{index}."));
        let enc = Encoder::load(&cfg.unet, w, &f)?;
        let embed = CondEmbedding::load(&cfg, w, &f)?;
        let zero = |name: &str, c: usize| -> Result<Arc<dyn Conv2dLayer>> {
            Ok(f.conv2d(
                name,
                w.get(&format!("{name}.weight"), &[c, c, 1, 1])?,
                w.get_opt(&format!("{name}.bias"), &[c])?,
                1,
                0,
            )?)
        };
        let zero_down = skip_channels(&cfg.unet)
            .into_iter()
            .enumerate()
            .map(|(k, c)| zero(&format!("controlnet_down_blocks.{k}"), c))
            .collect::<Result<Vec<_>>>()?;
        let cl = *cfg.unet.block_out_channels.last().unwrap_or(&1);
        let zero_mid = zero("controlnet_mid_block", cl)?;
        w.check_all_used()?;
        Ok(ControlNet {
            dir: dir.to_path_buf(),
            cfg,
            enc,
            embed,
            zero_down,
            zero_mid,
        })
    }

    /// The folder it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ControlNetConfig {
        &self.cfg
    }

    /// Errors unless this ControlNet's residuals fit `unet`: the same latent channels, skip
    /// connections (channels per down-path output), mid block and text width. The error names the
    /// ControlNet's config.
    pub fn check_fits(&self, unet: &UNet) -> Result<()> {
        let (c, u) = (&self.cfg.unet, unet.config());
        let path = self.dir.join("config.json");
        let mismatch = |what: &str, a: String, b: String| {
            SdxlError::config(
                &path,
                format!("{what} is {a} here but {b} in the UNet: this ControlNet was not made for this model"),
            )
        };
        if c.in_channels != u.in_channels {
            return Err(mismatch(
                "`in_channels`",
                c.in_channels.to_string(),
                u.in_channels.to_string(),
            ));
        }
        let (sc, su) = (skip_channels(c), unet.skip_channels());
        if sc != su {
            return Err(mismatch(
                "the down path's output channels (from `block_out_channels`, `layers_per_block`, `down_block_types`)",
                format!("{sc:?}"),
                format!("{su:?}"),
            ));
        }
        if c.mid.is_some() != u.mid.is_some() {
            return Err(mismatch(
                "the mid block",
                format!("{:?}", c.mid.map(|_| "present")),
                format!("{:?}", u.mid.map(|_| "present")),
            ));
        }
        if c.text_dim() != u.text_dim() {
            return Err(mismatch(
                "`cross_attention_dim`",
                c.text_dim().to_string(),
                u.text_dim().to_string(),
            ));
        }
        let proj = |x: &UNetConfig| {
            x.text_time
                .map(|t| (t.projection_input_dim, t.time_embed_dim))
        };
        if let (Some(a), Some(b)) = (proj(c), proj(u)) {
            if a != b {
                return Err(mismatch(
                    "(`projection_class_embeddings_input_dim`, `addition_time_embed_dim`)",
                    format!("{a:?}"),
                    format!("{b:?}"),
                ));
            }
        }
        Ok(())
    }

    /// The control image as the net reads it: `image` (`[1, 3, H, W]` in `[0, 1]`, any device)
    /// with its channels reversed for a `bgr` net, repeated to `batch` rows, in `dtype` on
    /// `device`. Errors unless `H × W` is `2^up` times the `latent` size.
    pub fn prepare_image(
        &self,
        image: &Tensor,
        batch: usize,
        latent: (usize, usize),
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let s = image.shape();
        let f = 1 << self.cfg.up();
        if s.len() != 4 || s[0] != 1 || s[1] != 3 || s[2] != latent.0 * f || s[3] != latent.1 * f {
            return Err(SdxlError::Input(format!(
                "ControlNet {}: the control image is {s:?}, expected [1, 3, {}, {}] ({f}× the {}×{} latent: the output size)",
                self.dir.display(),
                latent.0 * f,
                latent.1 * f,
                latent.0,
                latent.1
            )));
        }
        let img = image.to_dtype(DType::F32)?.to_device(Device::Cpu)?;
        let img = if self.cfg.bgr {
            let ch: Vec<Tensor> = (0..3)
                .rev()
                .map(|c| img.narrow(1, c, 1))
                .collect::<std::result::Result<_, _>>()?;
            Tensor::cat(&ch.iter().collect::<Vec<_>>(), 1)?
        } else {
            img
        };
        let img = if batch > 1 {
            Tensor::cat(&vec![&img; batch], 0)?
        } else {
            img
        };
        Ok(img.to_dtype(dtype)?.to_device(device)?)
    }

    /// One forward pass: the residuals for `sample` at `timesteps` under the control `image`
    /// (prepared by [`ControlNet::prepare_image`]), each multiplied by `scale`, on this rank's
    /// band.
    ///
    /// # Shapes
    /// `sample: [b, in, h, w]` (the whole latent on every rank), `timesteps: [b]` (or one),
    /// `image: [b, 3, h·2^up, w·2^up]` → one `[b, c_k, h_k, w]`-band residual per skip connection
    /// and the mid residual.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ctx: &StepCtx,
        sample: &Tensor,
        timesteps: &Tensor,
        cond: &UNetCond,
        image: &Tensor,
        scale: f32,
        taps: Option<&Taps>,
    ) -> Result<ControlResiduals> {
        let s = sample.shape();
        let f = 1 << self.cfg.up();
        let i = image.shape();
        if s.len() != 4 || i.len() != 4 || i[0] != s[0] || i[2] != s[2] * f || i[3] != s[3] * f {
            return Err(SdxlError::Input(format!(
                "ControlNet {}: control image {i:?} does not fit the sample {s:?} (needs [b, 3, {f}·h, {f}·w])",
                self.dir.display()
            )));
        }
        let fw = Fwd { ctx, taps };
        let t = batch_timesteps(timesteps, s[0])?;
        let emb_act = self.enc.embed(&self.cfg.unet, &fw, &t, cond)?;
        let h = self.enc.conv_in.forward(ctx, sample)?;
        fw.tap("conv_in", &h);
        let c = self.embed.forward(ctx, image)?;
        fw.tap("controlnet_cond_embedding", &c);
        let h = h.add(&c)?;
        let (h, skips) = self.enc.down(&fw, h, &emb_act, cond)?;
        let h = self.enc.mid(&fw, h, &emb_act, cond)?;
        let scaled = |t: Tensor| -> Result<Tensor> {
            Ok(if scale == 1.0 {
                t
            } else {
                t.affine(scale, 0.0)?
            })
        };
        let down = skips
            .iter()
            .zip(&self.zero_down)
            .map(|(x, z)| scaled(z.forward(ctx, x)?))
            .collect::<Result<Vec<_>>>()?;
        let mid = scaled(self.zero_mid.forward(ctx, &h)?)?;
        Ok(ControlResiduals { down, mid })
    }
}

#[cfg(test)]
mod tests;
