//! The building blocks of `UNet2DConditionModel`'s down, mid and up paths (diffusers'
//! `Transformer2DModel` with `BasicTransformerBlock`, `CrossAttnDownBlock2D` / `DownBlock2D` /
//! their up twins, over the `ResnetBlock2D` of [`crate::unet_resnet`]) and the shared encoder half (time and added embeddings,
//! `conv_in`, down blocks, mid block), built through a [`LayerFactory`] so that they run serially or
//! patch-parallel (PCPP §2). The UNet and the ControlNet (whose encoder is a copy of the UNet's)
//! both build from here.

use std::sync::Arc;

use pcpp_core::{
    AttentionWeights, Conv2dLayer, FeedForwardLayer, FeedForwardWeights, GroupNormLayer,
    LayerFactory, SelfAttentionLayer, StepCtx,
};
use pcpp_kernels::{Activation, LayerNormArgs, RowStats, Tensor};

use crate::error::{Result, SdxlError};
use crate::unet::{Taps, UNetCond};
use crate::unet_config::{BlockKind, BlockSpec, UNetConfig};
use crate::unet_resnet::ResnetBlock;
use crate::weights::Weights;

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
    pub(crate) taps: Option<&'a Taps>,
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

pub(crate) struct CrossAttention {
    name: String,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    /// The text tokens' K and V: computed once per generation and kept in `cond`.
    fn kv(&self, cond: &UNetCond) -> Result<(Tensor, Tensor)> {
        let cached = cond
            .cross_kv
            .lock()
            .ok()
            .and_then(|m| m.get(&self.name).cloned());
        if let Some(kv) = cached {
            return Ok(kv);
        }
        let e = &cond.encoder_hidden_states;
        let kv = (self.to_k.forward(e)?, self.to_v.forward(e)?);
        if let Ok(mut m) = cond.cross_kv.lock() {
            m.insert(self.name.clone(), kv.clone());
        }
        Ok(kv)
    }

    /// The queries' attention over the text tokens, heads merged, before the output projection.
    fn attend(&self, q: &Tensor, cond: &UNetCond) -> Result<Tensor> {
        let (k, v) = self.kv(cond)?;
        let kb = k.shape()[0];
        if kb != q.shape()[0] {
            return Err(SdxlError::Input(format!(
                "{}: encoder_hidden_states has batch {kb}, sample has batch {}",
                self.name,
                q.shape()[0]
            )));
        }
        Ok(Tensor::attention(q, &k, &v, self.heads, false)?)
    }

    pub(crate) fn forward(&self, fw: &Fwd, x: &Tensor, cond: &UNetCond) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let out = self.to_out.forward(&self.attend(&q, cond)?)?;
        fw.tap(&self.name, &out);
        Ok(out)
    }

    /// `x + forward(layer_norm(x))` and the row statistics of the sum: the norm applied as the
    /// query projection loads `x` (statistics from `stats`), the residual the output
    /// projection's accumulator ([`Tensor::norm_linear`], [`Tensor::linear_add_stats`]).
    pub(crate) fn forward_norm_add(
        &self,
        x: &Tensor,
        norm: LayerNormArgs<'_>,
        stats: &RowStats,
        cond: &UNetCond,
    ) -> Result<(Tensor, RowStats)> {
        let q = x.norm_linear(norm, stats, &self.to_q.w, self.to_q.b.as_ref())?;
        let o = self.attend(&q, cond)?;
        Ok(o.linear_add_stats(&self.to_out.w, self.to_out.b.as_ref(), x)?)
    }
}

/// The epsilon of diffusers' transformer-block layer norms.
const LN_EPS: f64 = 1e-5;

/// A transformer block's layer norm (weight, bias, [`LN_EPS`]) as a fused op takes it.
fn ln(n: &(Tensor, Tensor)) -> LayerNormArgs<'_> {
    LayerNormArgs {
        gamma: Some(&n.0),
        beta: Some(&n.1),
        eps: LN_EPS,
    }
}

pub(crate) struct TransformerBlock {
    name: String,
    norm1: (Tensor, Tensor),
    attn1: Arc<dyn SelfAttentionLayer>,
    norm2: (Tensor, Tensor),
    attn2: CrossAttention,
    norm3: (Tensor, Tensor),
    ff: Arc<dyn FeedForwardLayer>,
}

impl TransformerBlock {
    pub(crate) fn load(
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

    /// The block on `x` (`stats`: its row statistics, where the GEMM that made it left them);
    /// returns the output and its row statistics.
    pub(crate) fn forward(
        &self,
        fw: &Fwd,
        x: &Tensor,
        stats: &RowStats,
        spatial: (usize, usize),
        cond: &UNetCond,
    ) -> Result<(Tensor, RowStats)> {
        if self.fuses_norms(fw, x) {
            // The residual sums come out of the output projections with their row statistics,
            // and each layer norm runs inside the GEMMs that read its output.
            let ctx = fw.ctx;
            let (x, st) = self
                .attn1
                .forward_norm_add(ctx, x, ln(&self.norm1), stats, spatial)?;
            let (x, st) = self
                .attn2
                .forward_norm_add(&x, ln(&self.norm2), &st, cond)?;
            return Ok(self.ff.forward_norm_add(ctx, &x, ln(&self.norm3), &st)?);
        }
        let h = x.layer_norm(Some(&self.norm1.0), Some(&self.norm1.1), LN_EPS)?;
        let a = self.attn1.forward(fw.ctx, &h, spatial)?;
        fw.tap(&format!("{}.attn1", self.name), &a);
        // Each residual sum and the norm after it in one op.
        let (x, h) = a.add_layer_norm(x, Some(&self.norm2.0), Some(&self.norm2.1), LN_EPS)?;
        let c = self.attn2.forward(fw, &h, cond)?;
        let (x, h) = c.add_layer_norm(&x, Some(&self.norm3.0), Some(&self.norm3.1), LN_EPS)?;
        let out = if fw.taps.is_some() {
            let h = self.ff.forward(fw.ctx, &h)?;
            fw.tap(&format!("{}.ff", self.name), &h);
            h.add(&x)?
        } else {
            // The residual is the output projection's accumulator.
            self.ff.forward_add(fw.ctx, &h, &x)?
        };
        fw.tap(&self.name, &out);
        Ok((out, RowStats::none()))
    }

    /// Whether the block runs with its norms fused into the GEMMs (no taps wanted, and the
    /// kernels apply to this many rows: always on the CPU, where the fused ops are their
    /// compositions).
    fn fuses_norms(&self, fw: &Fwd, x: &Tensor) -> bool {
        fw.taps.is_none() && x.fused_norms_apply(self.norm1.0.shape()[0])
    }
}

pub(crate) enum Proj {
    Linear(Linear),
    Conv(Arc<dyn Conv2dLayer>),
}

pub(crate) struct Transformer2D {
    name: String,
    norm: Arc<dyn GroupNormLayer>,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
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

    pub(crate) fn forward(&self, fw: &Fwd, x: &Tensor, cond: &UNetCond) -> Result<Tensor> {
        let (rows, cols) = (x.shape()[2], x.shape()[3]);
        let mut h = match &self.proj_in {
            // The norm writes channels-last, which is the token layout; the projection leaves
            // the row statistics of its output for the first block's first norm.
            Proj::Linear(l) => {
                let h = self.norm.forward_nhwc(fw.ctx, x, false)?;
                let (b, c) = (x.shape()[0], x.shape()[1]);
                let h = h.reshape(&[b, rows * cols, c])?;
                match self.blocks.first() {
                    Some(first) if first.fuses_norms(fw, &h) => {
                        h.linear_stats(&l.w, l.b.as_ref())?
                    }
                    _ => (l.forward(&h)?, RowStats::none()),
                }
            }
            Proj::Conv(c) => {
                let h = self.norm.forward(fw.ctx, x, false)?;
                (c.forward(fw.ctx, &h)?.to_tokens()?, RowStats::none())
            }
        };
        for b in &self.blocks {
            h = b.forward(fw, &h.0, &h.1, (rows, cols), cond)?;
        }
        let h = h.0;
        let out = match &self.proj_out {
            Proj::Linear(l) => l.forward(&h)?.from_tokens_add(rows, cols, x)?,
            Proj::Conv(c) => c.forward_add(fw.ctx, &h.from_tokens(rows, cols)?, None, Some(x))?,
        };
        fw.tap(&self.name, &out);
        Ok(out)
    }
}

pub(crate) struct Block {
    pub(crate) name: String,
    pub(crate) resnets: Vec<ResnetBlock>,
    pub(crate) attentions: Vec<Transformer2D>,
    pub(crate) resample: Option<Arc<dyn Conv2dLayer>>,
}

impl Block {
    pub(crate) fn load(
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

/// The encoder half shared by the UNet and the ControlNet: time embedding (and SDXL's added
/// text/time embedding), `conv_in`, the down blocks and the mid block, with diffusers' names.
pub(crate) struct Encoder {
    pub(crate) conv_in: Arc<dyn Conv2dLayer>,
    pub(crate) time_1: Linear,
    time_2: Linear,
    add: Option<(Linear, Linear)>,
    down: Vec<Block>,
    mid: Option<(ResnetBlock, Transformer2D, ResnetBlock)>,
}

impl Encoder {
    /// Reads the encoder's weights of `cfg` from `w` and builds its layers through `f`.
    pub(crate) fn load(cfg: &UNetConfig, w: &Weights, f: &dyn LayerFactory) -> Result<Encoder> {
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
        let add = match cfg.text_time {
            Some(tt) => Some((
                Linear::load(
                    w,
                    "add_embedding.linear_1",
                    tt.projection_input_dim,
                    ted,
                    true,
                )?,
                Linear::load(w, "add_embedding.linear_2", ted, ted, true)?,
            )),
            None => None,
        };
        let down = cfg
            .down
            .iter()
            .enumerate()
            .map(|(i, s)| Block::load(f, w, &format!("down_blocks.{i}"), s, cfg, false))
            .collect::<Result<Vec<_>>>()?;
        let cl = *cfg.block_out_channels.last().unwrap_or(&c0);
        let resnet = |p: &str| ResnetBlock::load(f, w, p, cl, cl, ted, cfg.groups, cfg.eps);
        let mid = match cfg.mid {
            Some((depth, heads, cross)) => Some((
                resnet("mid_block.resnets.0")?,
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
                resnet("mid_block.resnets.1")?,
            )),
            None => None,
        };
        Ok(Encoder {
            conv_in,
            time_1: Linear::load(w, "time_embedding.linear_1", c0, ted, true)?,
            time_2: Linear::load(w, "time_embedding.linear_2", ted, ted, true)?,
            add,
            down,
            mid,
        })
    }

    /// `silu(time_embedding(t) + add_embedding(text_embeds, time_ids))` for the timesteps `t`
    /// (`[b]`, f32), as diffusers: the sinusoidal embedding of the f32 timesteps cast to the
    /// model's dtype.
    pub(crate) fn embed(
        &self,
        cfg: &UNetConfig,
        fw: &Fwd,
        t: &Tensor,
        cond: &UNetCond,
    ) -> Result<Tensor> {
        let b = t.numel();
        let c0 = cfg.block_out_channels[0];
        let t_emb = t
            .timestep_embedding(c0, cfg.flip_sin_to_cos, cfg.freq_shift)?
            .to_dtype(self.time_1.w.dtype())?;
        fw.tap("time_proj", &t_emb);
        let mut emb = self
            .time_2
            .forward(&self.time_1.forward(&t_emb)?.act(Activation::Silu)?)?;
        fw.tap("time_embedding", &emb);
        if let (Some((l1, l2)), Some(tt)) = (&self.add, cfg.text_time) {
            let (te, ti) = (cond.text_embeds.as_ref(), cond.time_ids.as_ref());
            if let (Some(te), Some(ti)) = (te, ti) {
                let ids = ti.reshape(&[ti.numel()])?;
                let te_t =
                    ids.timestep_embedding(tt.time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)?;
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
        Ok(emb.act(Activation::Silu)?)
    }

    /// The down blocks from `h` (the output of `conv_in`): the last output and the skip
    /// connections (`h` first, then every resnet/attention output and every down-sampler output).
    pub(crate) fn down(
        &self,
        fw: &Fwd,
        mut h: Tensor,
        emb_act: &Tensor,
        cond: &UNetCond,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips = vec![h.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                h = r.forward(fw, &h, emb_act)?;
                if let Some(a) = blk.attentions.get(j) {
                    h = a.forward(fw, &h, cond)?;
                }
                skips.push(h.clone());
            }
            if let Some(d) = &blk.resample {
                h = d.forward(fw.ctx, &h)?;
                fw.tap(&format!("{}.downsamplers.0", blk.name), &h);
                skips.push(h.clone());
            }
            fw.tap(&blk.name, &h);
        }
        Ok((h, skips))
    }

    /// The mid block (identity for a model without one).
    pub(crate) fn mid(
        &self,
        fw: &Fwd,
        h: Tensor,
        emb_act: &Tensor,
        cond: &UNetCond,
    ) -> Result<Tensor> {
        let Some((r0, a, r1)) = &self.mid else {
            return Ok(h);
        };
        let h = r0.forward(fw, &h, emb_act)?;
        let h = a.forward(fw, &h, cond)?;
        let h = r1.forward(fw, &h, emb_act)?;
        fw.tap("mid_block", &h);
        Ok(h)
    }
}
