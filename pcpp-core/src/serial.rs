//! The plain single-rank layers ([`SerialFactory`]): what every layer of the factory computes
//! when one rank holds the whole image, and the reference the parallel layers are tested against
//! (PCPP §1: a 1-rank run is the model itself).

use std::sync::Arc;

use pcpp_kernels::{Cols, Conv2dParams, LayerNormArgs, RowStats, Tensor};

use crate::layers::*;

/// Plain single-rank layers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SerialFactory;

struct SerialConv {
    id: String,
    weight: Tensor,
    bias: Option<Tensor>,
    params: Conv2dParams,
}

impl Conv2dLayer for SerialConv {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        self.forward_add(ctx, x, None, None)
    }

    fn forward_add(
        &self,
        _ctx: &StepCtx,
        x: &Tensor,
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        x.conv2d_add(
            &self.weight,
            self.bias.as_ref(),
            self.params,
            plane,
            residual,
        )
        .at(&self.id)
    }

    fn takes_nhwc(&self) -> bool {
        Tensor::conv_takes_nhwc(&self.weight)
    }

    fn forward_add_nhwc(
        &self,
        _ctx: &StepCtx,
        x: &Tensor,
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        x.conv2d_add_nhwc(
            &self.weight,
            self.bias.as_ref(),
            self.params,
            plane,
            residual,
        )
        .at(&self.id)
    }
}

struct SerialGroupNorm {
    id: String,
    groups: usize,
    eps: f64,
    gamma: Option<Tensor>,
    beta: Option<Tensor>,
}

impl GroupNormLayer for SerialGroupNorm {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor, silu_after: bool) -> Result<Tensor> {
        x.group_norm(
            self.groups,
            self.gamma.as_ref(),
            self.beta.as_ref(),
            self.eps,
            silu_after,
        )
        .at(&self.id)
    }

    fn forward_nhwc(&self, _ctx: &StepCtx, x: &Tensor, silu_after: bool) -> Result<Tensor> {
        x.group_norm_nhwc(
            self.groups,
            self.gamma.as_ref(),
            self.beta.as_ref(),
            self.eps,
            silu_after,
        )
        .at(&self.id)
    }
}

/// Self-attention of the whole image: q, k and v from one stacked GEMM, attended over in place.
struct SerialAttention {
    id: String,
    qkv: StackedProjection,
    to_out: Tensor,
    out_bias: Option<Tensor>,
    heads: usize,
}

impl SerialAttention {
    fn new(id: &str, w: AttentionWeights) -> Result<Self> {
        Ok(SerialAttention {
            id: id.to_string(),
            qkv: w.stacked_qkv().at(id)?,
            to_out: w.to_out,
            out_bias: w.out_bias,
            heads: w.heads,
        })
    }

    /// The heads' attention over the stacked projection `qkv`, before the output projection.
    fn attend(&self, qkv: &Tensor) -> Result<Tensor> {
        let c = self.to_out.shape()[1];
        let (q, k, v) = (Cols::new(qkv, 0), Cols::new(qkv, c), Cols::new(qkv, 2 * c));
        Tensor::attention_packed(q, k, v, c, self.heads, false).at(&self.id)
    }
}

impl SelfAttentionLayer for SerialAttention {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor, _spatial: (usize, usize)) -> Result<Tensor> {
        let qkv = self.qkv.forward(x).at(&self.id)?;
        self.attend(&qkv)?
            .linear(&self.to_out, self.out_bias.as_ref())
            .at(&self.id)
    }

    fn forward_norm_add(
        &self,
        _ctx: &StepCtx,
        x: &Tensor,
        norm: LayerNormArgs<'_>,
        stats: &RowStats,
        _spatial: (usize, usize),
    ) -> Result<(Tensor, RowStats)> {
        let qkv = x
            .norm_linear(norm, stats, &self.qkv.w, self.qkv.bias.as_ref())
            .at(&self.id)?;
        self.attend(&qkv)?
            .linear_add_stats(&self.to_out, self.out_bias.as_ref(), x)
            .at(&self.id)
    }
}

struct SerialProjectedAttention {
    id: String,
    heads: usize,
}

impl ProjectedAttentionLayer for SerialProjectedAttention {
    fn forward(
        &self,
        _ctx: &StepCtx,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        extra: Option<(&Tensor, &Tensor, &Tensor)>,
        _spatial: (usize, usize),
    ) -> Result<Tensor> {
        joint_attend(&self.id, self.heads, q, k, v, extra)
    }
}

/// Projected attention computed whole on this rank (serial, and tensor parallelism, which keeps
/// the whole image on every rank and does not split it).
pub(crate) fn whole_projected_attention(
    id: &str,
    heads: usize,
) -> Arc<dyn ProjectedAttentionLayer> {
    Arc::new(SerialProjectedAttention {
        id: id.to_string(),
        heads,
    })
}

/// Attention of `[extra q; q]` over `[extra k; k]`, `[extra v; v]` (token axis 1).
pub(crate) fn joint_attend(
    id: &str,
    heads: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    extra: Option<(&Tensor, &Tensor, &Tensor)>,
) -> Result<Tensor> {
    match extra {
        None => Tensor::attention(q, k, v, heads, false).at(id),
        Some((qe, ke, ve)) => {
            let q = Tensor::cat(&[qe, q], 1).at(id)?;
            let k = Tensor::cat(&[ke, k], 1).at(id)?;
            let v = Tensor::cat(&[ve, v], 1).at(id)?;
            Tensor::attention(&q, &k, &v, heads, false).at(id)
        }
    }
}

struct Identity;

impl GatherLayer for Identity {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

impl LayerFactory for SerialFactory {
    fn conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        Ok(Arc::new(SerialConv {
            id: id.to_string(),
            weight,
            bias,
            params: Conv2dParams::new(stride, padding),
        }))
    }

    fn input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.conv2d(id, weight, bias, stride, padding)
    }

    fn fine_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        _up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.conv2d(id, weight, bias, stride, padding)
    }

    fn fine_input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        _up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.conv2d(id, weight, bias, stride, padding)
    }

    fn group_norm(
        &self,
        id: &str,
        groups: usize,
        eps: f64,
        gamma: Option<Tensor>,
        beta: Option<Tensor>,
    ) -> Result<Arc<dyn GroupNormLayer>> {
        Ok(Arc::new(SerialGroupNorm {
            id: id.to_string(),
            groups,
            eps,
            gamma,
            beta,
        }))
    }

    fn self_attention(
        &self,
        id: &str,
        weights: AttentionWeights,
    ) -> Result<Arc<dyn SelfAttentionLayer>> {
        Ok(Arc::new(SerialAttention::new(id, weights)?))
    }

    fn projected_attention(
        &self,
        id: &str,
        heads: usize,
    ) -> Result<Arc<dyn ProjectedAttentionLayer>> {
        Ok(whole_projected_attention(id, heads))
    }

    fn gather(&self, _id: &str) -> Result<Arc<dyn GatherLayer>> {
        Ok(Arc::new(Identity))
    }
}
