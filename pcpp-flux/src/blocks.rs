//! The two block kinds of diffusers' `FluxTransformer2DModel`:
//!
//! - [`DoubleBlock`] (`FluxTransformerBlock`): separate weights for the image and the text stream
//!   (`AdaLayerNormZero` modulation, q/k/v projections with per-head RMS QK-norm, output
//!   projections, GELU-tanh feed-forwards), one joint attention over `[text; image]`;
//! - [`SingleBlock`] (`FluxSingleTransformerBlock`): one stream over `[text; image]`
//!   (`AdaLayerNormZeroSingle`), attention and MLP in parallel from the same normed input, joined
//!   by `proj_out` (applied as its two input halves accumulating into one output, which equals
//!   `proj_out` of their concatenation without materialising it).
//!
//! Both build their attention through the core's [`LayerFactory`]
//! ([`ProjectedAttentionLayer`], one per block, ids `transformer_blocks.{i}.attn` and
//! `single_transformer_blocks.{i}.attn`): q, k and v are projected, QK-normed and RoPE-rotated
//! here, and the layer attends over `[text; image]`, the image tokens being this rank's band
//! (their K/V exchanged with the other bands as the parallel mode says) and the text tokens whole
//! and fresh on every rank. The serial factory's layer is plain attention over the whole sequence.

use std::sync::Arc;

use pcpp_core::{LayerFactory, ProjectedAttentionLayer, StepCtx};
use pcpp_kernels::{Activation, Tensor};
use pcpp_sdxl::weights::Weights;

use crate::error::Result;
use crate::nn::{Linear, RmsNorm};
use crate::rope::RopeTables;

/// The RoPE tables of one forward pass: the text tokens' and the band's image tokens'.
pub struct JointRope<'a> {
    /// The `T` text tokens.
    pub txt: &'a RopeTables,
    /// The band's image tokens, row-major.
    pub img: &'a RopeTables,
    /// The band's `(rows, cols)` on the packed token grid.
    pub spatial: (usize, usize),
}

/// Eps of the parameter-free LayerNorms of the blocks.
const LN_EPS: f64 = 1e-6;

/// `LayerNorm(x) · (1 + scale) + shift` with `scale, shift: [b, d]` broadcast over tokens.
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.modulated_layer_norm(scale, shift, LN_EPS)?)
}

/// `x + gate · y` with `gate: [b, d]` broadcast over tokens.
fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(x.add_gated(gate, y)?)
}

/// The q/k/v projections of one stream with their per-head RMS norms.
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl Qkv {
    fn load(w: &Weights, p: &str, names: [&str; 5], d: usize, dh: usize) -> Result<Qkv> {
        let l = |n: &str| Linear::load(w, &format!("{p}.{n}"), d, d, true);
        let r = |n: &str| RmsNorm::load(w, &format!("{p}.{n}"), dh, 1e-6);
        Ok(Qkv {
            q: l(names[0])?,
            k: l(names[1])?,
            v: l(names[2])?,
            norm_q: r(names[3])?,
            norm_k: r(names[4])?,
        })
    }

    /// `(q, k, v)` of `x: [b, L, d]`, q and k RMS-normed per head.
    fn forward(&self, x: &Tensor, dh: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let per_head = |t: Tensor, n: &RmsNorm| -> Result<Tensor> {
            let s = t.shape().to_vec();
            Ok(n.forward(&t.reshape(&[s[0], s[1] * s[2] / dh, dh])?)?
                .reshape(&s)?)
        };
        Ok((
            per_head(self.q.forward(x)?, &self.norm_q)?,
            per_head(self.k.forward(x)?, &self.norm_k)?,
            self.v.forward(x)?,
        ))
    }
}

/// `net.0.proj` (d → 4d), GELU-tanh, `net.2` (4d → d): diffusers' `FeedForward("gelu-approximate")`.
struct FeedForward {
    up: Linear,
    down: Linear,
}

impl FeedForward {
    fn load(w: &Weights, p: &str, d: usize) -> Result<FeedForward> {
        Ok(FeedForward {
            up: Linear::load(w, &format!("{p}.net.0.proj"), d, 4 * d, true)?,
            down: Linear::load(w, &format!("{p}.net.2"), 4 * d, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down
            .forward(&self.up.forward_act(x, Activation::GeluTanh)?)
    }
}

/// A double-stream block.
pub struct DoubleBlock {
    attn: Arc<dyn ProjectedAttentionLayer>,
    norm1: Linear,
    norm1_context: Linear,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    dh: usize,
}

impl DoubleBlock {
    /// Loads `transformer_blocks.{i}` of width `heads · dh`, its attention built by `f`.
    pub fn load(
        w: &Weights,
        p: &str,
        heads: usize,
        dh: usize,
        f: &dyn LayerFactory,
    ) -> Result<DoubleBlock> {
        let d = heads * dh;
        let a = format!("{p}.attn");
        Ok(DoubleBlock {
            attn: f.projected_attention(&a, heads)?,
            norm1: Linear::load(w, &format!("{p}.norm1.linear"), d, 6 * d, true)?,
            norm1_context: Linear::load(w, &format!("{p}.norm1_context.linear"), d, 6 * d, true)?,
            img: Qkv::load(w, &a, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], d, dh)?,
            txt: Qkv::load(
                w,
                &a,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                d,
                dh,
            )?,
            to_out: Linear::load(w, &format!("{a}.to_out.0"), d, d, true)?,
            to_add_out: Linear::load(w, &format!("{a}.to_add_out"), d, d, true)?,
            ff: FeedForward::load(w, &format!("{p}.ff"), d)?,
            ff_context: FeedForward::load(w, &format!("{p}.ff_context"), d)?,
            dh,
        })
    }

    /// One block: `img: [b, N, d]` (the band's image tokens), `txt: [b, T, d]`, `silu_temb:
    /// [b, d]` (SiLU already applied). Returns the new `(txt, img)`.
    pub fn forward(
        &self,
        ctx: &StepCtx,
        img: &Tensor,
        txt: &Tensor,
        silu_temb: &Tensor,
        rope: &JointRope,
    ) -> Result<(Tensor, Tensor)> {
        let m = self.norm1.forward(silu_temb)?.chunk(6, 1)?;
        let c = self.norm1_context.forward(silu_temb)?.chunk(6, 1)?;
        // (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
        let nx = modulate(img, &m[0], &m[1])?;
        let nc = modulate(txt, &c[0], &c[1])?;
        let (q, k, v) = self.img.forward(&nx, self.dh)?;
        let (cq, ck, cv) = self.txt.forward(&nc, self.dh)?;
        let (q, k) = (rope.img.apply(&q)?, rope.img.apply(&k)?);
        let (cq, ck) = (rope.txt.apply(&cq)?, rope.txt.apply(&ck)?);
        let a = self
            .attn
            .forward(ctx, &q, &k, &v, Some((&cq, &ck, &cv)), rope.spatial)?;
        let t = txt.shape()[1];
        let n = img.shape()[1];
        let (ca, ia) = (a.narrow(1, 0, t)?, a.narrow(1, t, n)?);

        let img = gated_add(img, &m[2], &self.to_out.forward(&ia)?)?;
        let h = modulate(&img, &m[3], &m[4])?;
        let img = gated_add(&img, &m[5], &self.ff.forward(&h)?)?;

        let txt = gated_add(txt, &c[2], &self.to_add_out.forward(&ca)?)?;
        let h = modulate(&txt, &c[3], &c[4])?;
        let txt = gated_add(&txt, &c[5], &self.ff_context.forward(&h)?)?;
        Ok((txt, img))
    }
}

/// A single-stream block.
pub struct SingleBlock {
    attn: Arc<dyn ProjectedAttentionLayer>,
    norm: Linear,
    qkv: Qkv,
    proj_mlp: Linear,
    /// `proj_out` split by its input features: the attention's `d` (with the bias) and the MLP's
    /// `4d`, so that `proj_out(cat[a, mlp])` is two GEMMs into one output, without the concatenation.
    proj_out_attn: Linear,
    proj_out_mlp: Linear,
    dh: usize,
}

impl SingleBlock {
    /// Loads `single_transformer_blocks.{i}` of width `heads · dh` (MLP ratio 4), its attention
    /// built by `f`.
    pub fn load(
        w: &Weights,
        p: &str,
        heads: usize,
        dh: usize,
        f: &dyn LayerFactory,
    ) -> Result<SingleBlock> {
        let d = heads * dh;
        let proj_out = Linear::load(w, &format!("{p}.proj_out"), 5 * d, d, true)?;
        Ok(SingleBlock {
            attn: f.projected_attention(&format!("{p}.attn"), heads)?,
            norm: Linear::load(w, &format!("{p}.norm.linear"), d, 3 * d, true)?,
            qkv: Qkv::load(
                w,
                &format!("{p}.attn"),
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                d,
                dh,
            )?,
            proj_mlp: Linear::load(w, &format!("{p}.proj_mlp"), d, 4 * d, true)?,
            proj_out_attn: proj_out.input_slice(0, d, true)?,
            proj_out_mlp: proj_out.input_slice(d, 4 * d, false)?,
            dh,
        })
    }

    /// One block over the joint tokens `x: [b, T + N, d]` (`T` text tokens, then the band's
    /// image tokens).
    pub fn forward(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        silu_temb: &Tensor,
        rope: &JointRope,
    ) -> Result<Tensor> {
        // (shift, scale, gate)
        let m = self.norm.forward(silu_temb)?.chunk(3, 1)?;
        let nx = modulate(x, &m[0], &m[1])?;
        let mlp = self.proj_mlp.forward_act(&nx, Activation::GeluTanh)?;
        let (q, k, v) = self.qkv.forward(&nx, self.dh)?;
        let (t, n) = (rope.txt.len(), rope.img.len());
        let split = |x: &Tensor, r: bool| -> Result<(Tensor, Tensor)> {
            let (xt, xi) = (x.narrow(1, 0, t)?, x.narrow(1, t, n)?);
            if r {
                Ok((rope.txt.apply(&xt)?, rope.img.apply(&xi)?))
            } else {
                Ok((xt, xi))
            }
        };
        let ((qt, qi), (kt, ki), (vt, vi)) =
            (split(&q, true)?, split(&k, true)?, split(&v, false)?);
        let a = self
            .attn
            .forward(ctx, &qi, &ki, &vi, Some((&qt, &kt, &vt)), rope.spatial)?;
        let h = self
            .proj_out_mlp
            .forward_add(&mlp, &self.proj_out_attn.forward(&a)?)?;
        gated_add(x, &m[2], &h)
    }
}
