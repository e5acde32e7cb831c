//! diffusers' `FluxTransformer2DModel` (FLUX.1-dev and -schnell): `x_embedder` and
//! `context_embedder`, the conditioning `time_text_embed` (sinusoidal timestep → MLP, plus the
//! same for the guidance scale when `guidance_embeds`, plus an MLP of the pooled CLIP output),
//! the double-stream then single-stream blocks ([`crate::blocks`]), `norm_out`
//! (`AdaLayerNormContinuous`) and `proj_out`; built through the core's [`LayerFactory`] so that
//! the same code runs serially or patch-parallel (PCPP §2 on a DiT).
//!
//! The model reads the unpacked latents `[b, C, h, w]`: FluxPipeline's 2×2 packing followed by
//! the `x_embedder` linear is exactly a 2×2 stride-2 convolution with the linear's weight, which
//! the factory's input layer runs on this rank's band of the packed token grid (`h/2 × w/2`; the
//! band plan's unit). The band's tokens get their RoPE at their absolute packed row and column
//! (the factory's band locator); the text tokens are whole on every rank. `proj_out`'s tokens go
//! through the factory's gather (every rank gets the whole prediction) and are unpacked back to
//! `[b, C, h, w]`. The timestep and the guidance scale are device tensors, so a CUDA graph of
//! the steady step captures the whole forward.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pcpp_core::{BandLocator, Conv2dLayer, DenoiseModel, GatherLayer, LayerFactory, StepCtx};
use pcpp_kernels::{Activation, DType, Device, Tensor};
use pcpp_sdxl::weights::{find_weight_file, Weights};

use crate::blocks::{modulate, DoubleBlock, JointRope, SingleBlock};
use crate::config::FluxTransformerConfig;
use crate::error::{FluxError, Result};
use crate::nn::Linear;
use crate::rope::{band_ids, text_ids, RopeTables};

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

/// The conditioning of a generation besides the latents and the timestep, on the model's device.
pub struct FluxCond {
    /// T5 hidden states `[b, T, joint_attention_dim]`, in the model's dtype.
    pub txt: Tensor,
    /// Pooled CLIP output `[b, pooled_projection_dim]`, in the model's dtype.
    pub pooled: Tensor,
    /// The embedded guidance scale `[b]` in f32 (models with `guidance_embeds` only; e.g. 3.5).
    pub guidance: Option<Tensor>,
}

impl FluxCond {
    /// The conditioning of `txt` and `pooled` (any dtype and device) with guidance scale
    /// `guidance`, cast to `dtype` and moved to `device`.
    pub fn new(
        txt: &Tensor,
        pooled: &Tensor,
        guidance: Option<f32>,
        dtype: DType,
        device: Device,
    ) -> Result<FluxCond> {
        let b = pooled.shape().first().copied().unwrap_or(1);
        Ok(FluxCond {
            txt: txt.to_dtype(dtype)?.to_device(device)?,
            pooled: pooled.to_dtype(dtype)?.to_device(device)?,
            guidance: match guidance {
                Some(g) => Some(Tensor::from_vec(&[b], vec![g; b])?.to_device(device)?),
                None => None,
            },
        })
    }
}

/// The RoPE tables the forward passes of one model have used, by band (text tables by length):
/// made once on the host, so that later steps (and CUDA graph captures) upload nothing.
type RopeCache = Mutex<HashMap<(bool, usize, usize, usize, usize), Arc<RopeTables>>>;

/// The Flux transformer.
pub struct FluxTransformer {
    config: FluxTransformerConfig,
    /// Packing and `x_embedder`: a 2×2 stride-2 convolution on the band.
    x_embedder: Arc<dyn Conv2dLayer>,
    locator: Arc<dyn BandLocator>,
    gather: Arc<dyn GatherLayer>,
    rope: RopeCache,
    dtype: DType,
    device: Device,
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
    /// `.fp16` variant or shards with an index), its spatially coupled layers built by `f`.
    pub fn load_on(
        dir: &Path,
        dtype: DType,
        device: Device,
        f: &dyn LayerFactory,
    ) -> Result<FluxTransformer> {
        let config = FluxTransformerConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::open(&find_weight_file(dir, "diffusion_pytorch_model")?, dtype)?
            .on_device(device);
        let m = FluxTransformer::build(config, &w, f)?;
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
        f: &dyn LayerFactory,
    ) -> Result<FluxTransformer> {
        let cfg = FluxTransformerConfig::from_file(config)?;
        let w = Weights::random_every(config, dtype, seed).on_device(device);
        FluxTransformer::build(cfg, &w, f)
    }

    /// Builds the model from `w` (tensor names as diffusers writes them), its spatially coupled
    /// layers (input, attention, gather) by `f` ([`pcpp_core::SerialFactory`] for one device).
    pub fn build(
        config: FluxTransformerConfig,
        w: &Weights,
        f: &dyn LayerFactory,
    ) -> Result<FluxTransformer> {
        let c = &config;
        let (heads, dh, d) = (c.num_attention_heads, c.attention_head_dim, c.inner_dim());
        for (key, n) in [
            ("in_channels", c.in_channels),
            ("out_channels", c.out_channels()),
        ] {
            if n % 4 != 0 {
                return Err(FluxError::Input(format!(
                    "transformer config: `{key}` = {n} is not 4 × the latent channels (2×2 packed tokens)"
                )));
            }
        }
        let emb = Linear::load(w, "x_embedder", c.in_channels, d, true)?;
        // token channel (ch, py, px) of the packing is kernel tap (py, px) of channel ch
        let kernel = emb.w.reshape(&[d, c.in_channels / 4, 2, 2])?;
        let t = "time_text_embed";
        let dtype = emb.w.dtype();
        let device = emb.w.device();
        Ok(FluxTransformer {
            x_embedder: f.input_conv2d("x_embedder", kernel, emb.b, 2, 0)?,
            locator: f.band_locator("x_embedder")?,
            rope: Mutex::new(HashMap::new()),
            dtype,
            device,
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
                .map(|i| DoubleBlock::load(w, &format!("transformer_blocks.{i}"), heads, dh, f))
                .collect::<Result<_>>()?,
            single: (0..c.num_single_layers)
                .map(|i| {
                    SingleBlock::load(w, &format!("single_transformer_blocks.{i}"), heads, dh, f)
                })
                .collect::<Result<_>>()?,
            norm_out: Linear::load(w, "norm_out.linear", d, 2 * d, true)?,
            proj_out: Linear::load(w, "proj_out", d, c.out_channels(), true)?,
            gather: f.gather("proj_out")?,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FluxTransformerConfig {
        &self.config
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The conditioning vector `temb: [b, d]` of a step at timesteps `t: [b]` (as FluxPipeline
    /// passes them, `t / 1000`, f32 on the model's device).
    fn temb(&self, t: &Tensor, cond: &FluxCond) -> Result<Tensor> {
        // the model multiplies the pipeline's `t / 1000` by 1000 in the model dtype
        let proj = |v: &Tensor| -> Result<Tensor> {
            Ok(v.to_dtype(self.dtype)?
                .affine(1000.0, 0.0)?
                .timestep_embedding(TIME_PROJ_DIM, true, 0.0)?)
        };
        let mut temb = self.timestep_embedder.forward(&proj(t)?)?;
        match (&self.guidance_embedder, &cond.guidance) {
            (Some(g), Some(s)) => temb = temb.add(&g.forward(&proj(s)?)?)?,
            (Some(_), None) => {
                return Err(FluxError::Input(
                    "this transformer embeds the guidance scale (guidance_embeds): a guidance value is required".into(),
                ))
            }
            (None, _) => {}
        }
        Ok(temb.add(&self.text_embedder.forward(&cond.pooled)?)?)
    }

    /// The RoPE tables of the `t` text tokens and of the band at `top`, `left` of size
    /// `rows × cols`, made on first use.
    fn rope_tables(
        &self,
        t: usize,
        (top, left): (usize, usize),
        (rows, cols): (usize, usize),
    ) -> Result<(Arc<RopeTables>, Arc<RopeTables>)> {
        let mut cache = self
            .rope
            .lock()
            .map_err(|_| FluxError::Input("internal: the RoPE cache is poisoned".into()))?;
        let axes = &self.config.axes_dims_rope;
        let mut get = |key, ids: &dyn Fn() -> Vec<[f32; 3]>| -> Result<Arc<RopeTables>> {
            if let Some(r) = cache.get(&key) {
                return Ok(r.clone());
            }
            let r = Arc::new(RopeTables::new(&ids(), axes, self.device)?);
            cache.insert(key, r.clone());
            Ok(r)
        };
        let txt = get((true, t, 0, 0, 0), &|| text_ids(t))?;
        let img = get((false, top, left, rows, cols), &|| {
            band_ids((top, left), (rows, cols))
        })?;
        Ok((txt, img))
    }

    /// The velocity prediction `[b, C, h, w]` for the unpacked latents `x: [b, C, h, w]` (`C` =
    /// `in_channels / 4`, `h` and `w` even; the whole latent on every rank) at timesteps `t: [b]`
    /// (FluxPipeline's `t / 1000`, f32 on the model's device). Serial with [`pcpp_core::SerialFactory`]
    /// layers; with a patch-parallel factory's, every rank computes its band and gets the whole
    /// prediction.
    pub fn forward(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        t: &Tensor,
        cond: &FluxCond,
    ) -> Result<Tensor> {
        let c = &self.config;
        let ch = c.in_channels / 4;
        let b = match x.shape() {
            &[b, xc, h, w] if xc == ch && b > 0 && h > 0 && w > 0 && h % 2 == 0 && w % 2 == 0 => b,
            sh => {
                return Err(FluxError::Input(format!(
                    "transformer: latents must be [b, {ch}, h, w] with even h and w, got {sh:?}"
                )))
            }
        };
        let n_txt = match cond.txt.shape() {
            &[bt, n, w] if bt == b && w == c.joint_attention_dim && n > 0 => n,
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
        if t.shape() != [b] || cond.guidance.as_ref().is_some_and(|g| g.shape() != [b]) {
            return Err(FluxError::Input(format!(
                "transformer: the timestep and the guidance must be [{b}], got {:?} and {:?}",
                t.shape(),
                cond.guidance.as_ref().map(|g| g.shape().to_vec())
            )));
        }
        let temb = self.temb(t, cond)?;
        let silu = temb.act(Activation::Silu)?;
        let h = self.x_embedder.forward(ctx, &x.to_dtype(self.dtype)?)?;
        let (rows, cols) = (h.shape()[2], h.shape()[3]);
        let band = self.locator.locate(ctx, (rows, cols))?;
        let (rope_txt, rope_img) = self.rope_tables(n_txt, (band.top, band.left), (rows, cols))?;
        let rope = JointRope {
            txt: &rope_txt,
            img: &rope_img,
            spatial: (rows, cols),
        };
        let mut img = h.to_tokens()?;
        let mut txt = self.context_embedder.forward(&cond.txt)?;
        for blk in &self.double {
            (txt, img) = blk.forward(ctx, &img, &txt, &silu, &rope)?;
        }
        let mut joint = Tensor::cat(&[&txt, &img], 1)?;
        for blk in &self.single {
            joint = blk.forward(ctx, &joint, &silu, &rope)?;
        }
        let img = joint.narrow(1, n_txt, rows * cols)?;
        // AdaLayerNormContinuous: (scale, shift), in that order
        let m = self.norm_out.forward(&silu)?.chunk(2, 1)?;
        let out = self.proj_out.forward(&modulate(&img, &m[1], &m[0])?)?;
        let whole = self.gather.forward(ctx, &out.from_tokens(rows, cols)?)?;
        // unpacking: channel (ch, py, px) of token (r, q) is latent pixel (2r + py, 2q + px)
        let (oc, gh, gw) = (c.out_channels() / 4, whole.shape()[2], whole.shape()[3]);
        Ok(whole
            .reshape(&[b, oc, 2, 2, gh, gw])?
            .permute(&[0, 1, 4, 2, 5, 3])?
            .reshape(&[b, oc, 2 * gh, 2 * gw])?)
    }

    /// The serial transformer's prediction for packed latent tokens `img: [b, N, in_channels]` of
    /// a `rows × cols` packed grid (FluxPipeline's layout and diffusers' forward signature), as
    /// packed tokens `[b, N, out_channels]`. Only for a model built with [`pcpp_core::SerialFactory`].
    pub fn forward_packed(
        &self,
        img: &Tensor,
        (rows, cols): (usize, usize),
        t: &Tensor,
        cond: &FluxCond,
    ) -> Result<Tensor> {
        let x = crate::pipeline::unpack_latents(img, 2 * rows, 2 * cols)?;
        let out = self.forward(&StepCtx::serial(), &x, t, cond)?;
        crate::pipeline::pack_latents(&out)
    }
}

/// The Flux transformer as the core denoising loop's model: its conditioning is the prompt's
/// [`FluxCond`]; the loop's timesteps are FluxPipeline's `t / 1000`.
impl DenoiseModel for FluxTransformer {
    type Cond = FluxCond;
    type Error = FluxError;

    fn device(&self) -> Device {
        self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn forward(&self, ctx: &StepCtx, x: &Tensor, t: &Tensor, cond: &FluxCond) -> Result<Tensor> {
        FluxTransformer::forward(self, ctx, x, t, cond)
    }
}
