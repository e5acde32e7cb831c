//! The decoder half of diffusers' `AutoencoderKL` (`vae/`): latents → images, plus the image
//! post-processing of diffusers' `VaeImageProcessor` (`[-1, 1]` → `[0, 1]` → `u8`).
//!
//! Structure as diffusers' `Decoder`: `post_quant_conv` (1×1) → `conv_in` (3×3) → mid block
//! (ResNet, single-head self-attention over the h·w tokens, ResNet) → up blocks (reversed channels,
//! `layers_per_block + 1` ResNets each, nearest ×2 + 3×3 conv except the last) → GroupNorm → act →
//! `conv_out`. Every GroupNorm in the decoder uses eps 1e-6; there is no time embedding. Encoder
//! tensors (`encoder.*`, `quant_conv.*`) are accepted but not loaded.
//!
//! The convolutions, group norms and the attention are built through a `pcpp-core`
//! [`LayerFactory`], as in the UNet: [`SerialFactory`] gives the plain serial decoder, the
//! one-pass runtime of [`crate::vae_parallel`] a decoder of which each rank runs one band of rows.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use pcpp_core::{
    AttentionWeights, Conv2dLayer, GroupNormLayer, LayerFactory, SelfAttentionLayer, SerialFactory,
    StepCtx,
};
use pcpp_kernels::{Activation, DType, Device, Tensor};

use crate::error::{Result, SdxlError};
use crate::weights::{find_weight_file, read_json, Weights};

/// The fields of diffusers' `AutoencoderKL` config (`vae/config.json`) this engine reads.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// Channels per resolution level (encoder order; the decoder walks them reversed).
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder block (decoder blocks have one more).
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    /// Latent channels.
    #[serde(default = "d_latent")]
    pub latent_channels: usize,
    /// Image channels.
    #[serde(default = "d_out")]
    pub out_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// Activation of the ResNets and before `conv_out`.
    #[serde(default = "d_act")]
    pub act_fn: String,
    /// Latent scale: the pipeline decodes `latents / scaling_factor` (+ `shift_factor`).
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    /// Latent shift (SD3 / Flux style), applied after the division by `scaling_factor`.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent mean; with `latents_std`, latents decode as `l·std/scaling + mean`.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviation.
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Whether a 1×1 `post_quant_conv` precedes the decoder.
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid block has its attention layer.
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    /// Decoder block kinds; only `UpDecoderBlock2D` exists.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// The model overflows in fp16 and should run in f32 (or bf16).
    #[serde(default)]
    pub force_upcast: bool,
}

fn d_channels() -> Vec<usize> {
    vec![64]
}
fn d_one() -> usize {
    1
}
fn d_latent() -> usize {
    4
}
fn d_out() -> usize {
    3
}
fn d_groups() -> usize {
    32
}
fn d_act() -> String {
    "silu".to_string()
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

/// Largest value any size key may take; beyond it a config is rejected before allocating.
const MAX_DIM: usize = 1 << 16;

/// GroupNorm epsilon of every decoder norm (diffusers hard-codes it).
const EPS: f64 = 1e-6;

impl VaeConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<VaeConfig> {
        let c: VaeConfig = read_json(path)?;
        c.validate(path)?;
        Ok(c)
    }

    /// Checks ranges and supported options; `path` is only used in error messages.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |m: String| Err(SdxlError::config(path, m));
        let n = self.block_out_channels.len();
        if n == 0 || n > 16 {
            return err(format!(
                "`block_out_channels` has {n} entries, expected 1..=16"
            ));
        }
        if !self.up_block_types.is_empty() && self.up_block_types.len() != n {
            return err(format!(
                "`up_block_types` has {} entries, `block_out_channels` {n}",
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| t.as_str() != "UpDecoderBlock2D")
        {
            return err(format!(
                "`up_block_types` entry {t:?} is not supported (only UpDecoderBlock2D)"
            ));
        }
        let mut sizes = vec![
            ("layers_per_block", self.layers_per_block),
            ("latent_channels", self.latent_channels),
            ("out_channels", self.out_channels),
            ("norm_num_groups", self.norm_num_groups),
        ];
        sizes.extend(
            self.block_out_channels
                .iter()
                .map(|&c| ("block_out_channels", c)),
        );
        for (key, v) in sizes {
            if v == 0 || v > MAX_DIM {
                return err(format!("`{key}` = {v} is out of range (1..={MAX_DIM})"));
            }
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return err(format!(
                "`block_out_channels` entry {c} does not split into `norm_num_groups` = {} groups",
                self.norm_num_groups
            ));
        }
        if Activation::from_config_name(&self.act_fn).is_none() {
            return err(format!("`act_fn` = {:?} is not supported", self.act_fn));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return err(format!(
                "`scaling_factor` = {} must be finite and non-zero",
                self.scaling_factor
            ));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return err("`shift_factor` must be finite".to_string());
        }
        match (&self.latents_mean, &self.latents_std) {
            (None, None) => {}
            (Some(m), Some(s)) if m.len() == self.latent_channels && s.len() == m.len() => {}
            _ => {
                return err(format!(
                    "`latents_mean` and `latents_std` must both be null or both have `latent_channels` = {} entries",
                    self.latent_channels
                ))
            }
        }
        Ok(())
    }

    /// The activation function.
    /// The image-to-latent scale factor, `2^(len(block_out_channels) − 1)` (8 for SDXL).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    pub fn activation(&self) -> Activation {
        Activation::from_config_name(&self.act_fn).unwrap_or(Activation::Silu)
    }

    /// Number of ×2 up-samplings of the decoder (one fewer than the blocks): the image is
    /// `2^levels` times the latent in both directions.
    pub fn levels(&self) -> usize {
        self.block_out_channels.len().saturating_sub(1)
    }
}

pub(crate) struct Conv {
    layer: Arc<dyn Conv2dLayer>,
}

impl Conv {
    /// A `k×k` convolution (stride 1, padding `k/2`) built through `f`; `p` is its weight prefix
    /// and layer id.
    pub(crate) fn load(
        f: &dyn LayerFactory,
        w: &Weights,
        p: &str,
        ci: usize,
        co: usize,
        k: usize,
    ) -> Result<Conv> {
        let weight = w.get(&format!("{p}.weight"), &[co, ci, k, k])?;
        let bias = w.get(&format!("{p}.bias"), &[co])?;
        Ok(Conv {
            layer: f.conv2d(p, weight, Some(bias), 1, k / 2)?,
        })
    }

    pub(crate) fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        Ok(self.layer.forward(ctx, x)?)
    }
}

pub(crate) struct GroupNorm {
    layer: Arc<dyn GroupNormLayer>,
}

impl GroupNorm {
    pub(crate) fn load(
        f: &dyn LayerFactory,
        w: &Weights,
        p: &str,
        c: usize,
        groups: usize,
    ) -> Result<GroupNorm> {
        let g = w.get(&format!("{p}.weight"), &[c])?;
        let b = w.get(&format!("{p}.bias"), &[c])?;
        Ok(GroupNorm {
            layer: f.group_norm(p, groups, EPS, Some(g), Some(b))?,
        })
    }

    /// GroupNorm, then `act` if given (SiLU fused into the kernel).
    pub(crate) fn forward(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        let fuse = act == Some(Activation::Silu);
        let y = self.layer.forward(ctx, x, fuse)?;
        Ok(match act {
            Some(a) if !fuse => y.act(a)?,
            _ => y,
        })
    }
}

pub(crate) struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    pub(crate) fn load(
        f: &dyn LayerFactory,
        w: &Weights,
        p: &str,
        ci: usize,
        co: usize,
        groups: usize,
    ) -> Result<Resnet> {
        Ok(Resnet {
            norm1: GroupNorm::load(f, w, &format!("{p}.norm1"), ci, groups)?,
            conv1: Conv::load(f, w, &format!("{p}.conv1"), ci, co, 3)?,
            norm2: GroupNorm::load(f, w, &format!("{p}.norm2"), co, groups)?,
            conv2: Conv::load(f, w, &format!("{p}.conv2"), co, co, 3)?,
            shortcut: if ci != co {
                Some(Conv::load(f, w, &format!("{p}.conv_shortcut"), ci, co, 1)?)
            } else {
                None
            },
        })
    }

    pub(crate) fn forward(&self, ctx: &StepCtx, x: &Tensor, act: Activation) -> Result<Tensor> {
        let h = self.norm1.forward(ctx, x, Some(act))?;
        let h = self.conv1.forward(ctx, &h)?;
        let h = self.norm2.forward(ctx, &h, Some(act))?;
        let h = self.conv2.forward(ctx, &h)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(ctx, x)?,
            None => x.clone(),
        };
        Ok(skip.add(&h)?)
    }
}

/// Mid-block attention: GroupNorm, one head over all h·w tokens (q/k/v and output projections
/// with biases), residual.
pub(crate) struct Attention {
    norm: GroupNorm,
    attn: Arc<dyn SelfAttentionLayer>,
}

impl Attention {
    pub(crate) fn load(
        f: &dyn LayerFactory,
        w: &Weights,
        p: &str,
        c: usize,
        groups: usize,
    ) -> Result<Attention> {
        let norm = GroupNorm::load(f, w, &format!("{p}.group_norm"), c, groups)?;
        let lin = |n: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                w.get(&format!("{p}.{n}.weight"), &[c, c])?,
                w.get(&format!("{p}.{n}.bias"), &[c])?,
            ))
        };
        let (to_q, q_bias) = lin("to_q")?;
        let (to_k, k_bias) = lin("to_k")?;
        let (to_v, v_bias) = lin("to_v")?;
        let (to_out, out_bias) = lin("to_out.0")?;
        let weights = AttentionWeights {
            to_q,
            to_k,
            to_v,
            q_bias: Some(q_bias),
            k_bias: Some(k_bias),
            v_bias: Some(v_bias),
            to_out,
            out_bias: Some(out_bias),
            heads: 1,
        };
        Ok(Attention {
            norm,
            attn: f.self_attention(p, weights)?,
        })
    }

    pub(crate) fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let (h, w) = (x.shape()[2], x.shape()[3]);
        let t = self.norm.forward(ctx, x, None)?.to_tokens()?;
        let a = self.attn.forward(ctx, &t, (h, w))?;
        Ok(a.from_tokens(h, w)?.add(x)?)
    }
}

struct UpBlock {
    resnets: Vec<Resnet>,
    upsampler: Option<Conv>,
}

/// The VAE decoder of an `AutoencoderKL`, built through a [`LayerFactory`] like the UNet: with
/// [`SerialFactory`] it decodes whole latents ([`VaeDecoder::decode`]); with the one-pass runtime
/// of [`crate::vae_parallel::decode_runtime`] each rank decodes its band of latent rows
/// ([`crate::vae_parallel::decode_bands`]).
pub struct VaeDecoder {
    config: VaeConfig,
    act: Activation,
    /// Element type and device of the weights (the decode runs in them on a GPU).
    dtype: DType,
    device: Device,
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid_resnets: [Resnet; 2],
    mid_attention: Option<Attention>,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl VaeDecoder {
    /// Loads `dir/config.json` and the decoder side of
    /// `dir/diffusion_pytorch_model{,.fp16}.safetensors`, casting weights to `dtype`.
    pub fn load(dir: &Path, dtype: DType) -> Result<VaeDecoder> {
        Self::load_on(dir, dtype, Device::Cpu)
    }

    /// [`VaeDecoder::load`] with the weights loaded straight to `device` (use bf16 or f32 on the
    /// GPU: the SDXL VAE overflows in f16).
    pub fn load_on(dir: &Path, dtype: DType, device: Device) -> Result<VaeDecoder> {
        Self::load_with(dir, dtype, device, &SerialFactory)
    }

    /// [`VaeDecoder::load_on`] with the spatially coupled layers built through `factory` (e.g.
    /// the runtime of [`crate::vae_parallel::decode_runtime`] for a patch-parallel decode).
    pub fn load_with(
        dir: &Path,
        dtype: DType,
        device: Device,
        factory: &dyn LayerFactory,
    ) -> Result<VaeDecoder> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(&find_weight_file(dir, "diffusion_pytorch_model")?, dtype)?
            .on_device(device);
        Self::build(config, &weights, factory)
    }

    /// Builds the decoder from a config and a weight store holding at least its tensors (the
    /// encoder's are ignored; any other unused tensor is an error), its convolutions, group norms
    /// and attention through `f`, in the order the decode runs them.
    pub fn build(config: VaeConfig, weights: &Weights, f: &dyn LayerFactory) -> Result<VaeDecoder> {
        let w = weights;
        let c = &config;
        let g = c.norm_num_groups;
        let lat = c.latent_channels;
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let top = rev[0];

        let post_quant_conv = if c.use_post_quant_conv {
            Some(Conv::load(f, w, "post_quant_conv", lat, lat, 1)?)
        } else {
            None
        };
        let conv_in = Conv::load(f, w, "decoder.conv_in", lat, top, 3)?;
        let mid = "decoder.mid_block";
        let resnet0 = Resnet::load(f, w, &format!("{mid}.resnets.0"), top, top, g)?;
        let mid_attention = if c.mid_block_add_attention {
            Some(Attention::load(
                f,
                w,
                &format!("{mid}.attentions.0"),
                top,
                g,
            )?)
        } else {
            None
        };
        let resnet1 = Resnet::load(f, w, &format!("{mid}.resnets.1"), top, top, g)?;
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut prev = top;
        for (i, &co) in rev.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let ci = if j == 0 { prev } else { co };
                    Resnet::load(f, w, &format!("{p}.resnets.{j}"), ci, co, g)
                })
                .collect::<Result<_>>()?;
            let upsampler = if i + 1 < rev.len() {
                Some(Conv::load(
                    f,
                    w,
                    &format!("{p}.upsamplers.0.conv"),
                    co,
                    co,
                    3,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            prev = co;
        }
        let bottom = c.block_out_channels[0];
        let norm_out = GroupNorm::load(f, w, "decoder.conv_norm_out", bottom, g)?;
        let conv_out = Conv::load(f, w, "decoder.conv_out", bottom, c.out_channels, 3)?;
        let decoder = VaeDecoder {
            act: c.activation(),
            dtype: weights.dtype(),
            device: weights.device(),
            post_quant_conv,
            conv_in,
            mid_resnets: [resnet0, resnet1],
            mid_attention,
            up_blocks,
            norm_out,
            conv_out,
            config,
        };
        for name in weights.names() {
            if name.starts_with("encoder.") || name.starts_with("quant_conv.") {
                weights.ignore(&name);
            }
        }
        weights.check_all_used()?;
        Ok(decoder)
    }

    /// The model's config.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype of the weights (what a decode computes in on a GPU).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of ×2 up-samplings between the latent and the image (the image is `2^levels`
    /// times the latent in both directions).
    pub fn levels(&self) -> usize {
        self.config.levels()
    }

    /// Undoes the pipeline's latent scaling: `l / scaling_factor (+ shift_factor)`, or with
    /// per-channel statistics `l·std / scaling_factor + mean` (as diffusers' pipelines do).
    /// Per pixel, so it applies to a band of latent rows as well.
    ///
    /// # Shapes
    /// `latents: [b, latent_channels, h, w]`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        self.check_latents(latents)?;
        let sf = c.scaling_factor as f32;
        match (&c.latents_mean, &c.latents_std) {
            (Some(m), Some(s)) => {
                let n = c.latent_channels;
                let col = |v: &[f64]| {
                    Tensor::from_vec(&[1, n, 1, 1], v.iter().map(|&x| x as f32).collect())?
                        .to_device(latents.device())
                };
                Ok(latents
                    .mul(&col(s)?)?
                    .affine(1.0 / sf, 0.0)?
                    .add(&col(m)?)?)
            }
            _ => Ok(latents.affine(1.0 / sf, c.shift_factor.unwrap_or(0.0) as f32)?),
        }
    }

    pub(crate) fn check_latents(&self, latents: &Tensor) -> Result<()> {
        match latents.shape() {
            &[b, c, h, w] if b > 0 && c == self.config.latent_channels && h > 0 && w > 0 => Ok(()),
            s => Err(SdxlError::Input(format!(
                "vae: latents must be [batch, {}, h, w], got {s:?}",
                self.config.latent_channels
            ))),
        }
    }

    /// Decodes latents that are already unscaled (see [`VaeDecoder::unscale_latents`]) into
    /// images in roughly `[-1, 1]`, on a decoder built through [`SerialFactory`] (a decoder built
    /// through a parallel runtime decodes bands: [`crate::vae_parallel::decode_bands`]).
    ///
    /// # Shapes
    /// `latents: [b, latent_channels, h, w]` → `[b, out_channels, h·2^(n−1), w·2^(n−1)]` with `n`
    /// the number of blocks.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_latents(latents)?;
        self.forward(&StepCtx::serial(), latents)
    }

    /// The decoder's layers on `latents` (whole, or this rank's band of rows), in context `ctx`.
    pub(crate) fn forward(&self, ctx: &StepCtx, latents: &Tensor) -> Result<Tensor> {
        let act = self.act;
        // On a GPU, decode in the weights' dtype (latents may come from an f16 UNet, and the SDXL
        // VAE overflows in f16); the CPU twin computes in f32 whatever the storage.
        let latents = if matches!(self.device, Device::Cuda(_)) {
            latents.to_dtype(self.dtype)?.to_device(self.device)?
        } else {
            latents.clone()
        };
        let mut x = match &self.post_quant_conv {
            Some(c) => c.forward(ctx, &latents)?,
            None => latents,
        };
        x = self.conv_in.forward(ctx, &x)?;
        x = self.mid_resnets[0].forward(ctx, &x, act)?;
        if let Some(a) = &self.mid_attention {
            x = a.forward(ctx, &x)?;
        }
        x = self.mid_resnets[1].forward(ctx, &x, act)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(ctx, &x, act)?;
            }
            if let Some(up) = &block.upsampler {
                // Nearest ×2 is row-local: a band of rows becomes the band of twice the rows.
                x = up.forward(ctx, &x.upsample_nearest2x()?)?;
            }
        }
        let x = self.norm_out.forward(ctx, &x, Some(act))?;
        self.conv_out.forward(ctx, &x)
    }
}

/// diffusers' `denormalize`: `(x/2 + 0.5).clamp(0, 1)`, the float image in `[0, 1]`.
pub fn to_unit_range(img: &Tensor) -> Result<Tensor> {
    Ok(img.affine(0.5, 0.5)?.clamp(0.0, 1.0)?)
}

/// Images `[b, c, h, w]` in `[-1, 1]` → one `h·w·c` (HWC) `u8` buffer per image, as diffusers'
/// `numpy_to_pil`: `round(to_unit_range(x)·255)` (ties to even, like NumPy).
pub fn to_rgb8(img: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (b, c, h, w) = match img.shape() {
        &[b, c, h, w] => (b, c, h, w),
        s => {
            return Err(SdxlError::Input(format!(
                "to_rgb8: image must be [batch, channels, h, w], got {s:?}"
            )))
        }
    };
    let x = to_unit_range(img)?.to_vec_f32()?;
    let plane = h * w;
    Ok((0..b)
        .map(|i| {
            let im = &x[i * c * plane..(i + 1) * c * plane];
            let mut out = Vec::with_capacity(c * plane);
            for p in 0..plane {
                for ch in 0..c {
                    out.push((im[ch * plane + p] * 255.0).round_ties_even() as u8);
                }
            }
            out
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb8_rounds_like_numpy() {
        let img = Tensor::from_vec(&[1, 3, 1, 2], vec![-1.0, 1.0, 0.0, 2.0, -3.0, 0.5]).unwrap();
        let out = to_rgb8(&img).unwrap();
        assert_eq!(out, vec![vec![0, 128, 0, 255, 255, 191]]);
    }
}
