//! `UNet2DConditionModel` (SDXL, SD 2.x and SD 1.5 families) built through a
//! [`LayerFactory`], so the same code runs serially or patch-parallel (PCPP §2: ResNet blocks,
//! Transformer2D blocks, down/up-samplers; only the factory-built layers communicate).
//!
//! Weights are read by their diffusers names; every tensor of the file must be used.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pcpp_core::{
    AttentionWeights, Conv2dLayer, FeedForwardLayer, FeedForwardWeights, GatherLayer,
    GroupNormLayer, LayerFactory, SelfAttentionLayer, StepCtx,
};
use pcpp_kernels::{Activation, DType, Device, Tensor};

use crate::error::{Result, SdxlError};
use crate::lora::ComponentLora;
use crate::unet_config::{BlockKind, BlockSpec, UNetConfig};
use crate::unet_resnet::ResnetBlock;
use crate::weights::{find_weight_file, Weights};

/// Records intermediate activations by module path (for parity tests and debugging).
#[derive(Default)]
pub struct Taps(Mutex<Vec<(String, Tensor)>>);

impl Taps {
    /// An empty recorder.
    pub fn new() -> Taps {
        Taps::default()
    }

    fn record(&self, name: &str, t: &Tensor) {
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
    cross_kv: Mutex<HashMap<String, (Tensor, Tensor)>>,
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

pub(crate) struct Linear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(
        w: &Weights,
        prefix: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<Linear> {
        Ok(Linear {
            w: w.get(&format!("{prefix}.weight"), &[out, inp])?,
            b: if bias {
                Some(w.get(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.linear(&self.w, self.b.as_ref())?)
    }
}

/// Everything a module's forward needs besides its input.
pub(crate) struct Fwd<'a> {
    pub(crate) ctx: &'a StepCtx,
    taps: Option<&'a Taps>,
}

impl Fwd<'_> {
    pub(crate) fn tap(&self, name: &str, t: &Tensor) {
        if let Some(taps) = self.taps {
            taps.record(name, t);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(
    f: &dyn LayerFactory,
    w: &Weights,
    p: &str,
    ci: usize,
    co: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Arc<dyn Conv2dLayer>> {
    let weight = w.get(&format!("{p}.weight"), &[co, ci, k, k])?;
    let bias = w.get_opt(&format!("{p}.bias"), &[co])?;
    Ok(f.conv2d(p, weight, bias, stride, pad)?)
}

pub(crate) fn gnorm(
    f: &dyn LayerFactory,
    w: &Weights,
    p: &str,
    c: usize,
    groups: usize,
    eps: f64,
) -> Result<Arc<dyn GroupNormLayer>> {
    let g = w.get(&format!("{p}.weight"), &[c])?;
    let b = w.get(&format!("{p}.bias"), &[c])?;
    Ok(f.group_norm(p, groups, eps, Some(g), Some(b))?)
}

struct CrossAttention {
    name: String,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    fn forward(&self, fw: &Fwd, x: &Tensor, cond: &UNetCond) -> Result<Tensor> {
        let kv = {
            let cached = cond
                .cross_kv
                .lock()
                .ok()
                .and_then(|m| m.get(&self.name).cloned());
            match cached {
                Some(kv) => kv,
                None => {
                    let e = &cond.encoder_hidden_states;
                    let kv = (self.to_k.forward(e)?, self.to_v.forward(e)?);
                    if let Ok(mut m) = cond.cross_kv.lock() {
                        m.insert(self.name.clone(), kv.clone());
                    }
                    kv
                }
            }
        };
        let q = self.to_q.forward(x)?;
        let kb = kv.0.shape()[0];
        let (k, v) = if kb == q.shape()[0] {
            kv
        } else {
            return Err(SdxlError::Input(format!(
                "{}: encoder_hidden_states has batch {kb}, sample has batch {}",
                self.name,
                q.shape()[0]
            )));
        };
        let out = self
            .to_out
            .forward(&Tensor::attention(&q, &k, &v, self.heads, false)?)?;
        fw.tap(&self.name, &out);
        Ok(out)
    }
}

struct TransformerBlock {
    name: String,
    norm1: (Tensor, Tensor),
    attn1: Arc<dyn SelfAttentionLayer>,
    norm2: (Tensor, Tensor),
    attn2: CrossAttention,
    norm3: (Tensor, Tensor),
    ff: Arc<dyn FeedForwardLayer>,
}

impl TransformerBlock {
    fn load(
        f: &dyn LayerFactory,
        w: &Weights,
        p: &str,
        dim: usize,
        heads: usize,
        cross: usize,
    ) -> Result<Self> {
        let ln = |n: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                w.get(&format!("{p}.{n}.weight"), &[dim])?,
                w.get(&format!("{p}.{n}.bias"), &[dim])?,
            ))
        };
        let a1 = format!("{p}.attn1");
        let aw = AttentionWeights {
            to_q: w.get(&format!("{a1}.to_q.weight"), &[dim, dim])?,
            to_k: w.get(&format!("{a1}.to_k.weight"), &[dim, dim])?,
            to_v: w.get(&format!("{a1}.to_v.weight"), &[dim, dim])?,
            q_bias: w.get_opt(&format!("{a1}.to_q.bias"), &[dim])?,
            k_bias: w.get_opt(&format!("{a1}.to_k.bias"), &[dim])?,
            v_bias: w.get_opt(&format!("{a1}.to_v.bias"), &[dim])?,
            to_out: w.get(&format!("{a1}.to_out.0.weight"), &[dim, dim])?,
            out_bias: w.get_opt(&format!("{a1}.to_out.0.bias"), &[dim])?,
            heads,
        };
        let a2 = format!("{p}.attn2");
        let opt_bias = |n: &str, out: usize| w.contains(&format!("{a2}.{n}.bias")) && out > 0;
        let inner = dim * 4;
        Ok(TransformerBlock {
            name: p.to_string(),
            norm1: ln("norm1")?,
            attn1: f.self_attention(&a1, aw)?,
            norm2: ln("norm2")?,
            attn2: CrossAttention {
                name: a2.clone(),
                to_q: Linear::load(w, &format!("{a2}.to_q"), dim, dim, opt_bias("to_q", dim))?,
                to_k: Linear::load(w, &format!("{a2}.to_k"), cross, dim, opt_bias("to_k", dim))?,
                to_v: Linear::load(w, &format!("{a2}.to_v"), cross, dim, opt_bias("to_v", dim))?,
                to_out: Linear::load(w, &format!("{a2}.to_out.0"), dim, dim, true)?,
                heads,
            },
            norm3: ln("norm3")?,
            ff: {
                let fin = Linear::load(w, &format!("{p}.ff.net.0.proj"), dim, inner * 2, true)?;
                let fout = Linear::load(w, &format!("{p}.ff.net.2"), inner, dim, true)?;
                f.feed_forward(
                    &format!("{p}.ff"),
                    FeedForwardWeights {
                        proj: fin.w,
                        proj_bias: fin.b,
                        out: fout.w,
                        out_bias: fout.b,
                    },
                )?
            },
        })
    }

    fn forward(
        &self,
        fw: &Fwd,
        x: &Tensor,
        spatial: (usize, usize),
        cond: &UNetCond,
    ) -> Result<Tensor> {
        let h = x.layer_norm(Some(&self.norm1.0), Some(&self.norm1.1), 1e-5)?;
        let a = self.attn1.forward(fw.ctx, &h, spatial)?;
        fw.tap(&format!("{}.attn1", self.name), &a);
        let x = a.add(x)?;
        let h = x.layer_norm(Some(&self.norm2.0), Some(&self.norm2.1), 1e-5)?;
        let x = self.attn2.forward(fw, &h, cond)?.add(&x)?;
        let h = x.layer_norm(Some(&self.norm3.0), Some(&self.norm3.1), 1e-5)?;
        let h = self.ff.forward(fw.ctx, &h)?;
        fw.tap(&format!("{}.ff", self.name), &h);
        let out = h.add(&x)?;
        fw.tap(&self.name, &out);
        Ok(out)
    }
}

enum Proj {
    Linear(Linear),
    Conv(Arc<dyn Conv2dLayer>),
}

struct Transformer2D {
    name: String,
    norm: Arc<dyn GroupNormLayer>,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    fn load(
        f: &dyn LayerFactory,
        w: &Weights,
        p: &str,
        c: usize,
        depth: usize,
        heads: usize,
        cross: usize,
        groups: usize,
        linear: bool,
    ) -> Result<Self> {
        let proj = |n: &str| -> Result<Proj> {
            let n = format!("{p}.{n}");
            Ok(if linear {
                Proj::Linear(Linear::load(w, &n, c, c, true)?)
            } else {
                Proj::Conv(conv(f, w, &n, c, c, 1, 1, 0)?)
            })
        };
        Ok(Transformer2D {
            name: p.to_string(),
            norm: gnorm(f, w, &format!("{p}.norm"), c, groups, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::load(
                        f,
                        w,
                        &format!("{p}.transformer_blocks.{i}"),
                        c,
                        heads,
                        cross,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, fw: &Fwd, x: &Tensor, cond: &UNetCond) -> Result<Tensor> {
        let (rows, cols) = (x.shape()[2], x.shape()[3]);
        let h = self.norm.forward(fw.ctx, x, false)?;
        let mut h = match &self.proj_in {
            Proj::Linear(l) => l.forward(&h.to_tokens()?)?,
            Proj::Conv(c) => c.forward(fw.ctx, &h)?.to_tokens()?,
        };
        for b in &self.blocks {
            h = b.forward(fw, &h, (rows, cols), cond)?;
        }
        let h = match &self.proj_out {
            Proj::Linear(l) => l.forward(&h)?.from_tokens(rows, cols)?,
            Proj::Conv(c) => c.forward(fw.ctx, &h.from_tokens(rows, cols)?)?,
        };
        let out = h.add(x)?;
        fw.tap(&self.name, &out);
        Ok(out)
    }
}

struct Block {
    name: String,
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    resample: Option<Arc<dyn Conv2dLayer>>,
}

impl Block {
    fn load(
        f: &dyn LayerFactory,
        w: &Weights,
        p: &str,
        s: &BlockSpec,
        cfg: &UNetConfig,
        up: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..s.layers {
            let ci = if up {
                let res_skip = if j == s.layers - 1 {
                    s.in_channels
                } else {
                    s.out_channels
                };
                let res_in = if j == 0 {
                    s.prev_out_channels
                } else {
                    s.out_channels
                };
                res_in + res_skip
            } else if j == 0 {
                s.in_channels
            } else {
                s.out_channels
            };
            resnets.push(ResnetBlock::load(
                f,
                w,
                &format!("{p}.resnets.{j}"),
                ci,
                s.out_channels,
                cfg.time_embed_dim,
                cfg.groups,
                cfg.eps,
            )?);
            if s.kind == BlockKind::CrossAttn {
                attentions.push(Transformer2D::load(
                    f,
                    w,
                    &format!("{p}.attentions.{j}"),
                    s.out_channels,
                    s.transformer_layers[j],
                    s.heads,
                    s.cross_attention_dim,
                    cfg.groups,
                    cfg.use_linear_projection,
                )?);
            }
        }
        let resample = if !s.resample {
            None
        } else if up {
            Some(conv(
                f,
                w,
                &format!("{p}.upsamplers.0.conv"),
                s.out_channels,
                s.out_channels,
                3,
                1,
                1,
            )?)
        } else {
            Some(conv(
                f,
                w,
                &format!("{p}.downsamplers.0.conv"),
                s.out_channels,
                s.out_channels,
                3,
                2,
                cfg.downsample_padding,
            )?)
        };
        Ok(Block {
            name: p.to_string(),
            resnets,
            attentions,
            resample,
        })
    }
}

/// A UNet ready to run, built through some [`LayerFactory`].
pub struct UNet {
    cfg: UNetConfig,
    conv_in: Arc<dyn Conv2dLayer>,
    time_1: Linear,
    time_2: Linear,
    add_1: Option<Linear>,
    add_2: Option<Linear>,
    down: Vec<Block>,
    mid: Option<(ResnetBlock, Transformer2D, ResnetBlock)>,
    up: Vec<Block>,
    norm_out: Arc<dyn GroupNormLayer>,
    conv_out: Arc<dyn Conv2dLayer>,
    gather: Arc<dyn GatherLayer>,
}

impl UNet {
    /// The device the weights live on (where the step runs).
    pub fn device(&self) -> Device {
        self.time_1.w.device()
    }

    /// The dtype of the weights (the compute and activation dtype of a step).
    pub fn dtype(&self) -> DType {
        self.time_1.w.dtype()
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
        let ted = cfg.time_embed_dim;
        let k_in = cfg.conv_in_kernel;
        let conv_in = f.input_conv2d(
            "conv_in",
            w.get("conv_in.weight", &[c0, cfg.in_channels, k_in, k_in])?,
            w.get_opt("conv_in.bias", &[c0])?,
            1,
            (k_in - 1) / 2,
        )?;
        let (add_1, add_2) = match cfg.text_time {
            Some(tt) => (
                Some(Linear::load(
                    w,
                    "add_embedding.linear_1",
                    tt.projection_input_dim,
                    ted,
                    true,
                )?),
                Some(Linear::load(w, "add_embedding.linear_2", ted, ted, true)?),
            ),
            None => (None, None),
        };
        let down = cfg
            .down
            .iter()
            .enumerate()
            .map(|(i, s)| Block::load(f, w, &format!("down_blocks.{i}"), s, &cfg, false))
            .collect::<Result<Vec<_>>>()?;
        let cl = *cfg.block_out_channels.last().unwrap_or(&c0);
        let mid = match cfg.mid {
            Some((depth, heads, cross)) => Some((
                ResnetBlock::load(
                    f,
                    w,
                    "mid_block.resnets.0",
                    cl,
                    cl,
                    ted,
                    cfg.groups,
                    cfg.eps,
                )?,
                Transformer2D::load(
                    f,
                    w,
                    "mid_block.attentions.0",
                    cl,
                    depth,
                    heads,
                    cross,
                    cfg.groups,
                    cfg.use_linear_projection,
                )?,
                ResnetBlock::load(
                    f,
                    w,
                    "mid_block.resnets.1",
                    cl,
                    cl,
                    ted,
                    cfg.groups,
                    cfg.eps,
                )?,
            )),
            None => None,
        };
        let up = cfg
            .up
            .iter()
            .enumerate()
            .map(|(i, s)| Block::load(f, w, &format!("up_blocks.{i}"), s, &cfg, true))
            .collect::<Result<Vec<_>>>()?;
        let k_out = cfg.conv_out_kernel;
        let unet = UNet {
            conv_in,
            time_1: Linear::load(w, "time_embedding.linear_1", c0, ted, true)?,
            time_2: Linear::load(w, "time_embedding.linear_2", ted, ted, true)?,
            add_1,
            add_2,
            down,
            mid,
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
        self.check_inputs(sample, cond)?;
        let fw = Fwd { ctx, taps };
        let b = sample.shape()[0];
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
        let c0 = self.cfg.block_out_channels[0];
        // As diffusers: the sinusoidal embedding of the (f32) timesteps, cast to the model's dtype.
        let t_emb = t
            .timestep_embedding(c0, self.cfg.flip_sin_to_cos, self.cfg.freq_shift)?
            .to_dtype(self.dtype())?;
        fw.tap("time_proj", &t_emb);
        let mut emb = self
            .time_2
            .forward(&self.time_1.forward(&t_emb)?.act(Activation::Silu)?)?;
        fw.tap("time_embedding", &emb);
        if let (Some(l1), Some(l2), Some(tt)) = (&self.add_1, &self.add_2, self.cfg.text_time) {
            let (te, ti) = (cond.text_embeds.as_ref(), cond.time_ids.as_ref());
            if let (Some(te), Some(ti)) = (te, ti) {
                let ids = ti.reshape(&[ti.numel()])?;
                let te_t = ids.timestep_embedding(
                    tt.time_embed_dim,
                    self.cfg.flip_sin_to_cos,
                    self.cfg.freq_shift,
                )?;
                fw.tap("add_time_proj", &te_t);
                let te_t = te_t.reshape(&[b, usize::MAX])?;
                let add = l2.forward(
                    &l1.forward(&Tensor::cat(&[te, &te_t], 1)?)?
                        .act(Activation::Silu)?,
                )?;
                fw.tap("add_embedding", &add);
                emb = emb.add(&add)?;
            }
        }
        let emb_act = emb.act(Activation::Silu)?;

        let mut h = self.conv_in.forward(ctx, sample)?;
        fw.tap("conv_in", &h);
        let mut skips = vec![h.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                h = r.forward(&fw, &h, &emb_act)?;
                if let Some(a) = blk.attentions.get(j) {
                    h = a.forward(&fw, &h, cond)?;
                }
                skips.push(h.clone());
            }
            if let Some(d) = &blk.resample {
                h = d.forward(ctx, &h)?;
                fw.tap(&format!("{}.downsamplers.0", blk.name), &h);
                skips.push(h.clone());
            }
            fw.tap(&blk.name, &h);
        }
        if let Some((r0, a, r1)) = &self.mid {
            h = r0.forward(&fw, &h, &emb_act)?;
            h = a.forward(&fw, &h, cond)?;
            h = r1.forward(&fw, &h, &emb_act)?;
            fw.tap("mid_block", &h);
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
        let h = self.norm_out.forward(ctx, &h, true)?;
        let h = self.conv_out.forward(ctx, &h)?;
        fw.tap("conv_out", &h);
        Ok(self.gather.forward(ctx, &h)?)
    }
}
