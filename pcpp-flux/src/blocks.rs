//! The two block kinds of diffusers' `FluxTransformer2DModel`:
//!
//! - [`DoubleBlock`] (`FluxTransformerBlock`): separate weights for the image and the text stream
//!   (`AdaLayerNormZero` modulation, q/k/v projections with per-head RMS QK-norm, output
//!   projections, GELU-tanh feed-forwards), one joint attention over `[text; image]`;
//! - [`SingleBlock`] (`FluxSingleTransformerBlock`): one stream over `[text; image]`
//!   (`AdaLayerNormZeroSingle`), attention and MLP in parallel from the same normed input,
//!   concatenated into `proj_out`.
//!
//! Both hand the attention itself to a [`JointAttention`] (q, k, v already projected, normed and
//! rotated), so a parallel runtime can replace it.

use pcpp_kernels::{Activation, Tensor};
use pcpp_sdxl::weights::Weights;

use crate::error::Result;
use crate::nn::{Linear, RmsNorm};
use crate::rope::RopeTables;

/// The attention step of a block: `softmax(q·kᵀ/√dh)·v` over the joint sequence, text tokens
/// first. `q, k, v: [b, T + N, heads·dh]` are projected, QK-normed and RoPE-rotated; the result
/// has the same shape. `layer` numbers the attention layers of a forward pass (double blocks first,
/// then single blocks), so that an implementation can keep state per layer.
pub trait JointAttention: Sync {
    fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
    ) -> Result<Tensor>;
}

/// Attention over the whole sequence on one device (the serial reference).
pub struct FullAttention;

impl JointAttention for FullAttention {
    fn attend(
        &self,
        _layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        Ok(Tensor::attention(q, k, v, heads, false)?)
    }
}

/// Eps of the parameter-free LayerNorms of the blocks.
const LN_EPS: f64 = 1e-6;

/// `LayerNorm(x) · (1 + scale) + shift` with `scale, shift: [b, d]` broadcast over tokens.
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (b, d) = (shift.shape()[0], shift.shape()[1]);
    let n = x.layer_norm(None, None, LN_EPS)?;
    Ok(n.mul(&scale.affine(1.0, 1.0)?.reshape(&[b, 1, d])?)?
        .add(&shift.reshape(&[b, 1, d])?)?)
}

/// `x + gate · y` with `gate: [b, d]` broadcast over tokens.
fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (b, d) = (gate.shape()[0], gate.shape()[1]);
    Ok(x.add(&gate.reshape(&[b, 1, d])?.mul(y)?)?)
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
            .forward(&self.up.forward(x)?.act(Activation::GeluTanh)?)
    }
}

/// A double-stream block.
pub struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
    dh: usize,
}

impl DoubleBlock {
    /// Loads `transformer_blocks.{i}` of width `heads · dh`.
    pub fn load(w: &Weights, p: &str, heads: usize, dh: usize) -> Result<DoubleBlock> {
        let d = heads * dh;
        let a = format!("{p}.attn");
        Ok(DoubleBlock {
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
            heads,
            dh,
        })
    }

    /// One block: `img: [b, N, d]`, `txt: [b, T, d]`, `silu_temb: [b, d]` (SiLU already applied),
    /// `rope` over the `T + N` joint tokens. Returns the new `(txt, img)`.
    pub fn forward(
        &self,
        layer: usize,
        img: &Tensor,
        txt: &Tensor,
        silu_temb: &Tensor,
        rope: &RopeTables,
        attention: &dyn JointAttention,
    ) -> Result<(Tensor, Tensor)> {
        let m = self.norm1.forward(silu_temb)?.chunk(6, 1)?;
        let c = self.norm1_context.forward(silu_temb)?.chunk(6, 1)?;
        // (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)
        let nx = modulate(img, &m[0], &m[1])?;
        let nc = modulate(txt, &c[0], &c[1])?;
        let (q, k, v) = self.img.forward(&nx, self.dh)?;
        let (cq, ck, cv) = self.txt.forward(&nc, self.dh)?;
        let q = rope.apply(&Tensor::cat(&[&cq, &q], 1)?)?;
        let k = rope.apply(&Tensor::cat(&[&ck, &k], 1)?)?;
        let v = Tensor::cat(&[&cv, &v], 1)?;
        let a = attention.attend(layer, &q, &k, &v, self.heads)?;
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
    norm: Linear,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
    dh: usize,
}

impl SingleBlock {
    /// Loads `single_transformer_blocks.{i}` of width `heads · dh` (MLP ratio 4).
    pub fn load(w: &Weights, p: &str, heads: usize, dh: usize) -> Result<SingleBlock> {
        let d = heads * dh;
        Ok(SingleBlock {
            norm: Linear::load(w, &format!("{p}.norm.linear"), d, 3 * d, true)?,
            qkv: Qkv::load(
                w,
                &format!("{p}.attn"),
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                d,
                dh,
            )?,
            proj_mlp: Linear::load(w, &format!("{p}.proj_mlp"), d, 4 * d, true)?,
            proj_out: Linear::load(w, &format!("{p}.proj_out"), 5 * d, d, true)?,
            heads,
            dh,
        })
    }

    /// One block over the joint tokens `x: [b, T + N, d]`.
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        silu_temb: &Tensor,
        rope: &RopeTables,
        attention: &dyn JointAttention,
    ) -> Result<Tensor> {
        // (shift, scale, gate)
        let m = self.norm.forward(silu_temb)?.chunk(3, 1)?;
        let nx = modulate(x, &m[0], &m[1])?;
        let mlp = self.proj_mlp.forward(&nx)?.act(Activation::GeluTanh)?;
        let (q, k, v) = self.qkv.forward(&nx, self.dh)?;
        let a = attention.attend(layer, &rope.apply(&q)?, &rope.apply(&k)?, &v, self.heads)?;
        let h = self.proj_out.forward(&Tensor::cat(&[&a, &mlp], 2)?)?;
        gated_add(x, &m[2], &h)
    }
}
