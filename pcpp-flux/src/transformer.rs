//! diffusers' `FluxTransformer2DModel` (FLUX.1-dev and -schnell): `x_embedder` and
//! `context_embedder`, the conditioning `time_text_embed` (sinusoidal timestep → MLP, plus the
//! same for the guidance scale when `guidance_embeds`, plus an MLP of the pooled CLIP output),
//! the double-stream then single-stream blocks ([`crate::blocks`]), `norm_out`
//! (`AdaLayerNormContinuous`) and `proj_out`.
//!
//! Inputs are the packed latent tokens `[b, N, in_channels]`, the T5 states `[b, T, joint]`, the
//! pooled CLIP output, the timestep as the pipeline passes it (`t / 1000`), the guidance scale and
//! the RoPE tables of the joint `[text; image]` positions ([`crate::rope`]). The attention step of
//! every block goes through a [`JointAttention`].

use std::path::Path;

use pcpp_kernels::{Activation, DType, Device, Tensor};
use pcpp_sdxl::weights::{find_weight_file, Weights};

use crate::blocks::{modulate, DoubleBlock, JointAttention, SingleBlock};
use crate::config::FluxTransformerConfig;
use crate::error::{FluxError, Result};
use crate::nn::Linear;
use crate::rope::RopeTables;

/// Channels of the sinusoidal timestep / guidance projection.
const TIME_PROJ_DIM: usize = 256;

/// `linear_1 → SiLU → linear_2` (diffusers' `TimestepEmbedding` and `PixArtAlphaTextProjection`).
struct Mlp {
    l1: Linear,
    l2: Linear,
}

impl Mlp {
    fn load(w: &Weights, p: &str, inp: usize, d: usize) -> Result<Mlp> {
        Ok(Mlp {
            l1: Linear::load(w, &format!("{p}.linear_1"), inp, d, true)?,
            l2: Linear::load(w, &format!("{p}.linear_2"), d, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.l2.forward(&self.l1.forward(x)?.act(Activation::Silu)?)
    }
}

/// The conditioning of one forward pass besides the latents.
pub struct FluxCond<'a> {
    /// T5 hidden states `[b, T, joint_attention_dim]`.
    pub txt: &'a Tensor,
    /// Pooled CLIP output `[b, pooled_projection_dim]`.
    pub pooled: &'a Tensor,
    /// The timestep as FluxPipeline passes it to the model (`t / 1000`, i.e. the sigma).
    pub timestep: f32,
    /// The embedded guidance scale (models with `guidance_embeds` only; e.g. 3.5).
    pub guidance: Option<f32>,
}

/// The Flux transformer.
pub struct FluxTransformer {
    config: FluxTransformerConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp,
    guidance_embedder: Option<Mlp>,
    text_embedder: Mlp,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer {
    /// Loads a `transformer/` folder (`config.json` and `diffusion_pytorch_model.safetensors`, its
    /// `.fp16` variant or shards with an index).
    pub fn load_on(dir: &Path, dtype: DType, device: Device) -> Result<FluxTransformer> {
        let config = FluxTransformerConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::open(&find_weight_file(dir, "diffusion_pytorch_model")?, dtype)?
            .on_device(device);
        let m = FluxTransformer::build(config, &w)?;
        w.check_all_used()?;
        Ok(m)
    }

    /// A transformer of the configuration in `config` (a `transformer/config.json`) with seeded
    /// random weights, made tensor by tensor straight to `device`: for timing models whose weights
    /// are not at hand (e.g. full-size FLUX.1-dev from its config alone).
    pub fn random(
        config: &Path,
        dtype: DType,
        device: Device,
        seed: u64,
    ) -> Result<FluxTransformer> {
        let cfg = FluxTransformerConfig::from_file(config)?;
        let w = Weights::random_every(config, dtype, seed).on_device(device);
        FluxTransformer::build(cfg, &w)
    }

    /// Builds the model from `w` (tensor names as diffusers writes them).
    pub fn build(config: FluxTransformerConfig, w: &Weights) -> Result<FluxTransformer> {
        let c = &config;
        let (heads, dh, d) = (c.num_attention_heads, c.attention_head_dim, c.inner_dim());
        let t = "time_text_embed";
        Ok(FluxTransformer {
            x_embedder: Linear::load(w, "x_embedder", c.in_channels, d, true)?,
            context_embedder: Linear::load(w, "context_embedder", c.joint_attention_dim, d, true)?,
            timestep_embedder: Mlp::load(w, &format!("{t}.timestep_embedder"), TIME_PROJ_DIM, d)?,
            guidance_embedder: if c.guidance_embeds {
                Some(Mlp::load(
                    w,
                    &format!("{t}.guidance_embedder"),
                    TIME_PROJ_DIM,
                    d,
                )?)
            } else {
                None
            },
            text_embedder: Mlp::load(w, &format!("{t}.text_embedder"), c.pooled_projection_dim, d)?,
            double: (0..c.num_layers)
                .map(|i| DoubleBlock::load(w, &format!("transformer_blocks.{i}"), heads, dh))
                .collect::<Result<_>>()?,
            single: (0..c.num_single_layers)
                .map(|i| SingleBlock::load(w, &format!("single_transformer_blocks.{i}"), heads, dh))
                .collect::<Result<_>>()?,
            norm_out: Linear::load(w, "norm_out.linear", d, 2 * d, true)?,
            proj_out: Linear::load(w, "proj_out", d, c.out_channels(), true)?,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FluxTransformerConfig {
        &self.config
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.x_embedder.w.dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.x_embedder.w.device()
    }

    /// The conditioning vector `temb: [b, d]` of a step.
    fn temb(&self, cond: &FluxCond) -> Result<Tensor> {
        let b = cond.pooled.shape()[0];
        let (dt, dev) = (self.dtype(), self.device());
        let proj = |v: f32| -> Result<Tensor> {
            // the model multiplies the pipeline's `t / 1000` by 1000 in the model dtype
            let x = Tensor::from_f32(&[b], vec![v; b], dt)?.affine(1000.0, 0.0)?;
            Ok(x.to_device(dev)?
                .timestep_embedding(TIME_PROJ_DIM, true, 0.0)?)
        };
        let mut temb = self.timestep_embedder.forward(&proj(cond.timestep)?)?;
        match (&self.guidance_embedder, cond.guidance) {
            (Some(g), Some(s)) => temb = temb.add(&g.forward(&proj(s)?)?)?,
            (Some(_), None) => {
                return Err(FluxError::Input(
                    "this transformer embeds the guidance scale (guidance_embeds): a guidance value is required".into(),
                ))
            }
            (None, _) => {}
        }
        Ok(temb.add(&self.text_embedder.forward(cond.pooled)?)?)
    }

    /// The velocity prediction `[b, N, out_channels]` for packed latents `img: [b, N, in_channels]`;
    /// `rope` covers the `T + N` joint tokens, text first.
    pub fn forward(
        &self,
        img: &Tensor,
        cond: &FluxCond,
        rope: &RopeTables,
        attention: &dyn JointAttention,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, n) = match img.shape() {
            &[b, n, ch] if ch == c.in_channels && b > 0 && n > 0 => (b, n),
            sh => {
                return Err(FluxError::Input(format!(
                    "transformer: latents must be [b, tokens, {}], got {sh:?}",
                    c.in_channels
                )))
            }
        };
        let t = match cond.txt.shape() {
            &[bt, t, w] if bt == b && w == c.joint_attention_dim => t,
            sh => {
                return Err(FluxError::Input(format!(
                    "transformer: text states must be [{b}, T, {}], got {sh:?}",
                    c.joint_attention_dim
                )))
            }
        };
        if cond.pooled.shape() != [b, c.pooled_projection_dim] {
            return Err(FluxError::Input(format!(
                "transformer: pooled text must be [{b}, {}], got {:?}",
                c.pooled_projection_dim,
                cond.pooled.shape()
            )));
        }
        if rope.len() != t + n {
            return Err(FluxError::Input(format!(
                "transformer: RoPE tables cover {} tokens, the sequence has {t} + {n}",
                rope.len()
            )));
        }
        let temb = self.temb(cond)?;
        let silu = temb.act(Activation::Silu)?;
        let mut img = self.x_embedder.forward(img)?;
        let mut txt = self.context_embedder.forward(cond.txt)?;
        for (i, blk) in self.double.iter().enumerate() {
            (txt, img) = blk.forward(i, &img, &txt, &silu, rope, attention)?;
        }
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for (i, blk) in self.single.iter().enumerate() {
            x = blk.forward(self.double.len() + i, &x, &silu, rope, attention)?;
        }
        let img = x.narrow(1, t, n)?;
        // AdaLayerNormContinuous: (scale, shift), in that order
        let m = self.norm_out.forward(&silu)?.chunk(2, 1)?;
        self.proj_out.forward(&modulate(&img, &m[1], &m[0])?)
    }
}
