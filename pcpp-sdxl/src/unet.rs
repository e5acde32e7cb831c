//! `UNet2DConditionModel` (SDXL, SD 2.x and SD 1.5 families) built through a
//! [`LayerFactory`], so the same code runs serially or patch-parallel (PCPP §2: ResNet blocks,
//! Transformer2D blocks, down/up-samplers; only the factory-built layers communicate).
//!
//! Weights are read by their diffusers names; every tensor of the file must be used.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pcpp_core::{Conv2dLayer, GatherLayer, GroupNormLayer, LayerFactory, StepCtx};
use pcpp_kernels::{DType, Device, Tensor};

use crate::error::{Result, SdxlError};
use crate::lora::ComponentLora;
use crate::unet_blocks::{conv, gnorm, Block, Encoder, Fwd};
use crate::unet_config::UNetConfig;
use crate::weights::{find_weight_file, Weights};

/// Records intermediate activations by module path (for parity tests and debugging).
#[derive(Default)]
pub struct Taps(Mutex<Vec<(String, Tensor)>>);

impl Taps {
    /// An empty recorder.
    pub fn new() -> Taps {
        Taps::default()
    }

    pub(crate) fn record(&self, name: &str, t: &Tensor) {
        if let Ok(mut v) = self.0.lock() {
            v.push((name.to_string(), t.clone()));
        }
    }

    /// The recorded activations, in forward order.
    pub fn take(&self) -> Vec<(String, Tensor)> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// Text conditioning for a UNet call, with a cache of the cross-attention K/V, which depend only on
/// the prompt and are computed once per generation (PCPP §2.5).
pub struct UNetCond {
    /// `[b, 77, cross_attention_dim]`.
    pub encoder_hidden_states: Tensor,
    /// SDXL pooled text embedding `[b, d]` (text_time models only).
    pub text_embeds: Option<Tensor>,
    /// SDXL micro-conditioning `[b, 6]` (text_time models only).
    pub time_ids: Option<Tensor>,
    pub(crate) cross_kv: Mutex<HashMap<String, (Tensor, Tensor)>>,
}

impl UNetCond {
    /// Conditioning from encoder states and the optional SDXL added inputs.
    pub fn new(
        encoder_hidden_states: Tensor,
        text_embeds: Option<Tensor>,
        time_ids: Option<Tensor>,
    ) -> UNetCond {
        UNetCond {
            encoder_hidden_states,
            text_embeds,
            time_ids,
            cross_kv: Mutex::new(HashMap::new()),
        }
    }

    /// Seeded uniform random conditioning in `cfg`'s shapes, for benchmarks without text encoders:
    /// `batch` rows of `tokens` text tokens, the pooled embedding and the micro-conditioning of a
    /// `height × width`-pixel image (SDXL models), in `dtype` on `device`.
    pub fn random(
        cfg: &UNetConfig,
        batch: usize,
        tokens: usize,
        (height, width): (usize, usize),
        dtype: DType,
        device: Device,
        seed: u64,
    ) -> Result<UNetCond> {
        let rnd = |shape: &[usize], s: u64| {
            Tensor::rand_uniform(shape, dtype, device, (-1.0, 1.0), s ^ seed)
        };
        let text = rnd(&[batch, tokens, cfg.text_dim()], 11)?;
        let Some(tt) = cfg.text_time else {
            return Ok(UNetCond::new(text, None, None));
        };
        let pooled_dim = tt
            .projection_input_dim
            .checked_sub(6 * tt.time_embed_dim)
            .filter(|&d| d > 0)
            .ok_or_else(|| {
                SdxlError::Input(format!(
                    "UNet config: projection_class_embeddings_input_dim {} leaves no pooled text embedding beside 6 × addition_time_embed_dim {}",
                    tt.projection_input_dim, tt.time_embed_dim
                ))
            })?;
        let ids = crate::pipeline::MicroCond::for_size(height, width).ids();
        let time_ids = Tensor::from_vec(&[batch, 6], ids.repeat(batch))?
            .to_dtype(dtype)?
            .to_device(device)?;
        Ok(UNetCond::new(
            text,
            Some(rnd(&[batch, pooled_dim], 12)?),
            Some(time_ids),
        ))
    }

    /// Rows `start..start + len` of the batch of every tensor.
    pub fn batch_slice(&self, start: usize, len: usize) -> Result<UNetCond> {
        let cut = |t: &Tensor| t.narrow(0, start, len);
        Ok(UNetCond::new(
            cut(&self.encoder_hidden_states)?,
            self.text_embeds.as_ref().map(cut).transpose()?,
            self.time_ids.as_ref().map(cut).transpose()?,
        ))
    }

    /// The same conditioning with every tensor on `device`.
    pub fn to_device(&self, device: Device) -> Result<UNetCond> {
        Ok(UNetCond::new(
            self.encoder_hidden_states.to_device(device)?,
            self.text_embeds
                .as_ref()
                .map(|t| t.to_device(device))
                .transpose()?,
            self.time_ids
                .as_ref()
                .map(|t| t.to_device(device))
                .transpose()?,
        ))
    }
}

/// The residuals a ControlNet adds to a UNet step (diffusers' `down_block_additional_residuals`
/// and `mid_block_additional_residual`), already scaled, on this rank's band.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// One per skip connection of the down path, in order (`conv_in` first).
    pub down: Vec<Tensor>,
    /// Added to the mid block's output.
    pub mid: Tensor,
}

impl ControlResiduals {
    /// The element-wise sum of two nets' residuals (diffusers' `MultiControlNetModel`).
    pub fn add(&self, other: &ControlResiduals) -> Result<ControlResiduals> {
        if self.down.len() != other.down.len() {
            return Err(SdxlError::Input(format!(
                "ControlNet residuals: {} and {} down residuals cannot be summed",
                self.down.len(),
                other.down.len()
            )));
        }
        Ok(ControlResiduals {
            down: self
                .down
                .iter()
                .zip(&other.down)
                .map(|(a, b)| a.add(b))
                .collect::<std::result::Result<_, _>>()?,
            mid: self.mid.add(&other.mid)?,
        })
    }
}

/// A UNet ready to run, built through some [`LayerFactory`].
pub struct UNet {
    cfg: UNetConfig,
    enc: Encoder,
    up: Vec<Block>,
    norm_out: Arc<dyn GroupNormLayer>,
    conv_out: Arc<dyn Conv2dLayer>,
    gather: Arc<dyn GatherLayer>,
}

impl UNet {
    /// The device the weights live on (where the step runs).
    pub fn device(&self) -> Device {
        self.enc.time_1.w.device()
    }

    /// The dtype of the weights (the compute and activation dtype of a step).
    pub fn dtype(&self) -> DType {
        self.enc.time_1.w.dtype()
    }

    /// Loads `dir/config.json` and the weights of a diffusers `unet/` folder.
    pub fn load(dir: &Path, dtype: DType, factory: &dyn LayerFactory) -> Result<UNet> {
        Self::load_on(dir, dtype, Device::Cpu, factory)
    }

    /// [`UNet::load`] with the weights loaded straight to `device`.
    pub fn load_on(
        dir: &Path,
        dtype: DType,
        device: Device,
        factory: &dyn LayerFactory,
    ) -> Result<UNet> {
        let none = ComponentLora::empty(crate::lora::LoraComponent::Unet);
        Self::load_with_lora(dir, dtype, device, factory, none)
    }

    /// [`UNet::load_on`] with LoRA adapters merged into the weights as they load (an error names
    /// any adapter that matches no module, or does not fit its module).
    pub fn load_with_lora(
        dir: &Path,
        dtype: DType,
        device: Device,
        factory: &dyn LayerFactory,
        lora: ComponentLora,
    ) -> Result<UNet> {
        if !dir.is_dir() {
            return Err(SdxlError::Model {
                path: dir.to_path_buf(),
                msg: "UNet folder not found".into(),
            });
        }
        let cfg = UNetConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(&find_weight_file(dir, "diffusion_pytorch_model")?, dtype)?
            .on_device(device)
            .with_lora(lora);
        UNet::build(cfg, &weights, factory)
    }

    /// A UNet with seeded random weights for the configuration `config` (a diffusers
    /// `unet/config.json`), for benchmarks of models whose weights are not at hand. When a
    /// `tensor_manifest.json` sits next to the config, the weights have exactly its names and
    /// shapes (a mismatch with the model is an error); otherwise diffusers' default names.
    pub fn random(
        config: &Path,
        dtype: DType,
        factory: &dyn LayerFactory,
        seed: u64,
    ) -> Result<UNet> {
        let cfg = UNetConfig::from_file(config)?;
        let weights = Weights::random_for_unet_config(config, dtype, seed)?;
        UNet::build(cfg, &weights, factory)
    }

    /// Builds from a resolved config and an opened weight file (all tensors must be used).
    pub fn build(cfg: UNetConfig, w: &Weights, f: &dyn LayerFactory) -> Result<UNet> {
        w.set_lora_unet_config(&cfg);
        let c0 = cfg.block_out_channels[0];
        let enc = Encoder::load(&cfg, w, f)?;
        let up = cfg
            .up
            .iter()
            .enumerate()
            .map(|(i, s)| Block::load(f, w, &format!("up_blocks.{i}"), s, &cfg, true))
            .collect::<Result<Vec<_>>>()?;
        let k_out = cfg.conv_out_kernel;
        let unet = UNet {
            enc,
            up,
            norm_out: gnorm(f, w, "conv_norm_out", c0, cfg.groups, cfg.eps)?,
            conv_out: conv(
                f,
                w,
                "conv_out",
                c0,
                cfg.out_channels,
                k_out,
                1,
                (k_out - 1) / 2,
            )?,
            gather: f.gather("out")?,
            cfg,
        };
        w.check_all_used()?;
        Ok(unet)
    }

    /// The channels of the down path's skip connections, in order (what a ControlNet's down
    /// residuals must have).
    pub fn skip_channels(&self) -> Vec<usize> {
        skip_channels(&self.cfg)
    }

    /// The resolved configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Validates the inputs of a forward pass; errors name the input.
    pub fn check_inputs(&self, sample: &Tensor, cond: &UNetCond) -> Result<()> {
        let s = sample.shape();
        let f = self.cfg.downsample_factor();
        if s.len() != 4 || s[1] != self.cfg.in_channels {
            return Err(SdxlError::Input(format!(
                "sample must be [b, {}, h, w], got {s:?}",
                self.cfg.in_channels
            )));
        }
        if s[2] % f != 0 || s[3] % f != 0 || s[2] == 0 || s[3] == 0 {
            return Err(SdxlError::Input(format!(
                "sample height and width ({}, {}) must be non-zero multiples of {f}",
                s[2], s[3]
            )));
        }
        let e = cond.encoder_hidden_states.shape();
        let cross = self.cfg.down.first().map_or(0, |b| b.cross_attention_dim);
        if e.len() != 3 || e[0] != s[0] || e[2] != cross {
            return Err(SdxlError::Input(format!(
                "encoder_hidden_states must be [{}, tokens, {cross}], got {e:?}",
                s[0]
            )));
        }
        if let Some(tt) = self.cfg.text_time {
            let te = cond.text_embeds.as_ref().ok_or_else(|| {
                SdxlError::Input(
                    "text_embeds is required by this UNet (addition_embed_type text_time)".into(),
                )
            })?;
            let ti = cond.time_ids.as_ref().ok_or_else(|| {
                SdxlError::Input(
                    "time_ids is required by this UNet (addition_embed_type text_time)".into(),
                )
            })?;
            let n_ids = ti.shape().get(1).copied().unwrap_or(0);
            let te_dim = te.shape().get(1).copied().unwrap_or(0);
            if te.rank() != 2
                || ti.rank() != 2
                || te.shape()[0] != s[0]
                || ti.shape()[0] != s[0]
                || te_dim + n_ids * tt.time_embed_dim != tt.projection_input_dim
            {
                return Err(SdxlError::Input(format!(
                    "text_embeds {:?} and time_ids {:?} do not fit: need [{b}, d] and [{b}, n] with d + n·{} = {}",
                    te.shape(),
                    ti.shape(),
                    tt.time_embed_dim,
                    tt.projection_input_dim,
                    b = s[0]
                )));
            }
        }
        Ok(())
    }

    /// One forward pass: the predicted noise for `sample` at `timesteps`.
    ///
    /// # Shapes
    /// `sample: [b, in, h, w]` (the whole latent on every rank), `timesteps: [b]` →
    /// `[b, out, h, w]` (gathered).
    pub fn forward(
        &self,
        ctx: &StepCtx,
        sample: &Tensor,
        timesteps: &Tensor,
        cond: &UNetCond,
        taps: Option<&Taps>,
    ) -> Result<Tensor> {
        self.forward_with(ctx, sample, timesteps, cond, None, taps)
    }

    /// [`UNet::forward`] with a ControlNet's residuals added as diffusers adds them: each down
    /// residual to its skip connection once the down path has run, the mid residual to the mid
    /// block's output. The residuals are on this rank's band (as the ControlNet returns them).
    pub fn forward_with(
        &self,
        ctx: &StepCtx,
        sample: &Tensor,
        timesteps: &Tensor,
        cond: &UNetCond,
        control: Option<&ControlResiduals>,
        taps: Option<&Taps>,
    ) -> Result<Tensor> {
        self.check_inputs(sample, cond)?;
        let fw = Fwd { ctx, taps };
        let t = batch_timesteps(timesteps, sample.shape()[0])?;
        let emb_act = self.enc.embed(&self.cfg, &fw, &t, cond)?;
        let h = self.enc.conv_in.forward(ctx, sample)?;
        fw.tap("conv_in", &h);
        let (h, mut skips) = self.enc.down(&fw, h, &emb_act, cond)?;
        if let Some(c) = control {
            if c.down.len() != skips.len() {
                return Err(SdxlError::Input(format!(
                    "ControlNet gave {} down residuals, the UNet has {} skip connections",
                    c.down.len(),
                    skips.len()
                )));
            }
            for (s, r) in skips.iter_mut().zip(&c.down) {
                *s = s.add(r)?;
            }
        }
        let mut h = self.enc.mid(&fw, h, &emb_act, cond)?;
        if let Some(c) = control {
            h = h.add(&c.mid)?;
        }
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    SdxlError::Input(format!("{}: skip connections exhausted", blk.name))
                })?;
                h = r.forward(&fw, &Tensor::cat(&[&h, &skip], 1)?, &emb_act)?;
                if let Some(a) = blk.attentions.get(j) {
                    h = a.forward(&fw, &h, cond)?;
                }
            }
            if let Some(u) = &blk.resample {
                h = u.forward(ctx, &h.upsample_nearest2x()?)?;
                fw.tap(&format!("{}.upsamplers.0", blk.name), &h);
            }
            fw.tap(&blk.name, &h);
        }
        let h =
            self.conv_out
                .forward_normed(ctx, self.norm_out.as_ref(), (&h, true), None, None)?;
        fw.tap("conv_out", &h);
        Ok(self.gather.forward(ctx, &h)?)
    }
}

/// The channels of the down path's skip connections of `cfg`, in order: `conv_in`'s, then one
/// per resnet and one per down-sampler.
pub(crate) fn skip_channels(cfg: &UNetConfig) -> Vec<usize> {
    let mut out = vec![cfg.block_out_channels[0]];
    for s in &cfg.down {
        out.extend(std::iter::repeat(s.out_channels).take(s.layers));
        if s.resample {
            out.push(s.out_channels);
        }
    }
    out
}

/// `timesteps` as `[b]`: one value repeated for the batch, or one per sample (an error otherwise).
pub(crate) fn batch_timesteps(timesteps: &Tensor, b: usize) -> Result<Tensor> {
    let t = if timesteps.numel() == 1 && b > 1 {
        let one = timesteps.reshape(&[1])?;
        Tensor::cat(&vec![&one; b], 0)?
    } else {
        timesteps.reshape(&[timesteps.numel()])?
    };
    if t.numel() != b {
        return Err(SdxlError::Input(format!(
            "timestep has {} entries for a batch of {b}",
            t.numel()
        )));
    }
    Ok(t)
}
