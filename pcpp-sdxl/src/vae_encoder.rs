//! The encoder half of diffusers' `AutoencoderKL` (`vae/`): images → latent distribution mean,
//! for image-to-image, plus the image pre-processing of diffusers' `VaeImageProcessor`
//! (`u8` → `[0, 1]` → `[-1, 1]`).
//!
//! Structure as diffusers' `Encoder`: `conv_in` (3×3) → down blocks (`layers_per_block` ResNets,
//! then, except in the last block, a 3×3 stride-2 conv after zero padding of one row at the bottom
//! and one column at the right) → mid block (ResNet, single-head self-attention, ResNet) →
//! GroupNorm → act → `conv_out` (2 × latent channels: mean and log-variance) → `quant_conv` (1×1).
//! GroupNorm eps is 1e-6 throughout. Image-to-image uses the distribution's mean (diffusers samples
//! `mean + exp(logvar/2)·ε` with the run's generator; for SDXL's VAE that spread is small, and the
//! mean keeps the encoding deterministic and independent of the noise generator).

use std::path::Path;

use serde::Deserialize;

use pcpp_core::{SerialFactory, StepCtx};
use pcpp_kernels::{Activation, Conv2dParams, DType, Device, Tensor};

use crate::error::{Result, SdxlError};
use crate::vae::{Attention, Conv, GroupNorm, Resnet, VaeConfig};
use crate::weights::{find_weight_file, read_json, Weights};

/// Encoder-side keys of `vae/config.json` that [`VaeConfig`] does not hold.
#[derive(Debug, Clone, Deserialize)]
struct EncoderKeys {
    #[serde(default = "three")]
    in_channels: usize,
    #[serde(default = "yes")]
    use_quant_conv: bool,
    #[serde(default)]
    down_block_types: Vec<String>,
}

fn three() -> usize {
    3
}
fn yes() -> bool {
    true
}

/// The weights of a down-sampling convolution (3×3, stride 2, padded asymmetrically).
struct Downsampler {
    w: Tensor,
    b: Tensor,
}

struct DownBlock {
    resnets: Vec<Resnet>,
    downsampler: Option<Downsampler>,
}

/// The VAE encoder of an `AutoencoderKL`.
pub struct VaeEncoder {
    config: VaeConfig,
    in_channels: usize,
    act: Activation,
    /// Element type of the weights.
    dtype: DType,
    conv_in: Conv,
    down_blocks: Vec<DownBlock>,
    mid_resnets: [Resnet; 2],
    mid_attention: Option<Attention>,
    norm_out: GroupNorm,
    conv_out: Conv,
    quant_conv: Option<Conv>,
}

impl VaeEncoder {
    /// Loads `dir/config.json` and the encoder side of
    /// `dir/diffusion_pytorch_model{,.fp16}.safetensors`, casting weights to `dtype`. A file
    /// without encoder weights (a decoder-only VAE) is an error naming the missing tensor.
    pub fn load(dir: &Path, dtype: DType) -> Result<VaeEncoder> {
        Self::load_on(dir, dtype, Device::Cpu)
    }

    /// [`VaeEncoder::load`] with the weights loaded straight to `device`.
    pub fn load_on(dir: &Path, dtype: DType, device: Device) -> Result<VaeEncoder> {
        let cfg_path = dir.join("config.json");
        let config = VaeConfig::from_file(&cfg_path)?;
        let keys: EncoderKeys = read_json(&cfg_path)?;
        if let Some(t) = keys
            .down_block_types
            .iter()
            .find(|t| t.as_str() != "DownEncoderBlock2D")
        {
            return Err(SdxlError::config(
                &cfg_path,
                format!(
                    "`down_block_types` entry {t:?} is not supported (only DownEncoderBlock2D)"
                ),
            ));
        }
        if keys.in_channels == 0 {
            return Err(SdxlError::config(&cfg_path, "`in_channels` is 0"));
        }
        let weights = Weights::open(&find_weight_file(dir, "diffusion_pytorch_model")?, dtype)?
            .on_device(device);
        let w = &weights;
        let f = &SerialFactory;
        let c = &config;
        let g = c.norm_num_groups;
        let lat = c.latent_channels;
        let chans = &c.block_out_channels;
        let top = chans[chans.len() - 1];

        let mut down_blocks = Vec::with_capacity(chans.len());
        let mut prev = chans[0];
        for (i, &co) in chans.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let ci = if j == 0 { prev } else { co };
                    Resnet::load(f, w, &format!("{p}.resnets.{j}"), ci, co, g)
                })
                .collect::<Result<_>>()?;
            let downsampler = if i + 1 < chans.len() {
                let d = format!("{p}.downsamplers.0.conv");
                Some(Downsampler {
                    w: w.get(&format!("{d}.weight"), &[co, co, 3, 3])?,
                    b: w.get(&format!("{d}.bias"), &[co])?,
                })
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsampler,
            });
            prev = co;
        }
        let mid = "encoder.mid_block";
        let mid_resnets = [
            Resnet::load(f, w, &format!("{mid}.resnets.0"), top, top, g)?,
            Resnet::load(f, w, &format!("{mid}.resnets.1"), top, top, g)?,
        ];
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
        let quant_conv = if keys.use_quant_conv {
            Some(Conv::load(f, w, "quant_conv", 2 * lat, 2 * lat, 1)?)
        } else {
            None
        };
        let encoder = VaeEncoder {
            act: c.activation(),
            dtype: weights.dtype(),
            in_channels: keys.in_channels,
            conv_in: Conv::load(f, w, "encoder.conv_in", keys.in_channels, chans[0], 3)?,
            down_blocks,
            mid_resnets,
            mid_attention,
            norm_out: GroupNorm::load(f, w, "encoder.conv_norm_out", top, g)?,
            conv_out: Conv::load(f, w, "encoder.conv_out", top, 2 * lat, 3)?,
            quant_conv,
            config,
        };
        Ok(encoder)
    }

    /// The model's config.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The latent distribution's mean (unscaled) of images in `[-1, 1]`.
    ///
    /// # Shapes
    /// `image: [b, in_channels, H, W]` with H, W multiples of 2^(n−1) (n = number of blocks) →
    /// `[b, latent_channels, H/2^(n−1), W/2^(n−1)]`.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        let f = 1usize << (self.down_blocks.len() - 1);
        match image.shape() {
            &[b, c, h, w] if b > 0 && c == self.in_channels && h > 0 && w > 0 => {
                if h % f != 0 || w % f != 0 {
                    return Err(SdxlError::Input(format!(
                        "vae encoder: image {h}×{w} is not a multiple of {f} in both directions"
                    )));
                }
            }
            s => {
                return Err(SdxlError::Input(format!(
                    "vae encoder: image must be [batch, {}, H, W], got {s:?}",
                    self.in_channels
                )))
            }
        }
        let act = self.act;
        let ctx = &StepCtx::serial();
        let mut x = self.conv_in.forward(ctx, image)?;
        for block in &self.down_blocks {
            for r in &block.resnets {
                x = r.forward(ctx, &x, act)?;
            }
            if let Some(d) = &block.downsampler {
                let p = Conv2dParams {
                    stride: 2,
                    pad_top: 0,
                    pad_bottom: 1,
                    pad_left: 0,
                    pad_right: 1,
                };
                x = x.conv2d(&d.w, Some(&d.b), p)?;
            }
        }
        x = self.mid_resnets[0].forward(ctx, &x, act)?;
        if let Some(a) = &self.mid_attention {
            x = a.forward(ctx, &x)?;
        }
        x = self.mid_resnets[1].forward(ctx, &x, act)?;
        let x = self.norm_out.forward(ctx, &x, Some(act))?;
        let mut moments = self.conv_out.forward(ctx, &x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(ctx, &moments)?;
        }
        Ok(moments.narrow(1, 0, self.config.latent_channels)?)
    }

    /// The pipeline's latent scaling of encoded latents (inverse of
    /// [`VaeDecoder::unscale_latents`](crate::VaeDecoder::unscale_latents)):
    /// `(l − mean)·scaling_factor/std` with per-channel statistics, else
    /// `(l − shift_factor)·scaling_factor`.
    ///
    /// # Shapes
    /// `latents: [b, latent_channels, h, w]`.
    pub fn scale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let sf = c.scaling_factor as f32;
        match (&c.latents_mean, &c.latents_std) {
            (Some(m), Some(s)) => {
                let n = c.latent_channels;
                let col = |v: &[f64], f: &dyn Fn(f64) -> f32| {
                    Tensor::from_vec(&[1, n, 1, 1], v.iter().map(|&x| f(x)).collect())?
                        .to_device(latents.device())
                };
                Ok(latents
                    .sub(&col(m, &|x| x as f32)?)?
                    .affine(sf, 0.0)?
                    .mul(&col(s, &|x| 1.0 / x as f32)?)?)
            }
            _ => {
                let shift = c.shift_factor.unwrap_or(0.0) as f32;
                Ok(latents.affine(sf, -shift * sf)?)
            }
        }
    }
}

/// diffusers' `VaeImageProcessor.preprocess` of an RGB8 image: `x/255` in `float32`, then
/// `2x − 1`.
///
/// # Shapes
/// `rgb: height·width·3` bytes, row-major → `[1, 3, height, width]`.
pub fn image_from_rgb8(rgb: &[u8], height: usize, width: usize) -> Result<Tensor> {
    if rgb.len() != height * width * 3 {
        return Err(SdxlError::Input(format!(
            "image has {} bytes, expected {height}×{width}×3",
            rgb.len()
        )));
    }
    let plane = height * width;
    let mut v = vec![0.0f32; 3 * plane];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for (c, &b) in px.iter().enumerate() {
            v[c * plane + i] = 2.0 * (f32::from(b) / 255.0) - 1.0;
        }
    }
    Ok(Tensor::from_vec(&[1, 3, height, width], v)?)
}
