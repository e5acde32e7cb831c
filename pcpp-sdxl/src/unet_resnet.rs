//! The UNet's ResNet block (diffusers `ResnetBlock2D` with a time embedding):
//! `skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))`, the skip a
//! `1×1` `conv_shortcut` when the channels change. conv1's bias is folded into the time
//! projection's at load, and the shortcut's into conv2's (the same sums, fewer per-channel adds
//! per step).
//!
//! Built from the core factory's layers: its `3×3` convolutions and group norms are the
//! patch-parallel ones (PCPP §2.2, §2.6). Under tensor parallelism (the §5 baseline) the factory's
//! [`ChannelSplit`] gives this rank a share of the middle channels (conv1's outputs, the time
//! projection, norm2, conv2's inputs, conv2's bias on one rank) and sums the partial outputs.

use std::sync::Arc;

use pcpp_core::{ChannelSplit, Conv2dLayer, GroupNormLayer, LayerFactory};
use pcpp_kernels::Tensor;

use crate::error::Result;
use crate::unet_blocks::{gnorm, Fwd, Linear};
use crate::weights::Weights;

pub(crate) struct ResnetBlock {
    name: String,
    norm1: Arc<dyn GroupNormLayer>,
    conv1: Arc<dyn Conv2dLayer>,
    temb_proj: Linear,
    norm2: Arc<dyn GroupNormLayer>,
    conv2: Arc<dyn Conv2dLayer>,
    /// This rank's share of the middle channels under tensor parallelism.
    split: Option<Arc<dyn ChannelSplit>>,
    shortcut: Option<Arc<dyn Conv2dLayer>>,
}

impl ResnetBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        f: &dyn LayerFactory,
        w: &Weights,
        p: &str,
        ci: usize,
        co: usize,
        temb: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let norm1 = gnorm(f, w, &format!("{p}.norm1"), ci, groups, eps)?;
        let mut temb_proj = Linear::load(w, &format!("{p}.time_emb_proj"), temb, co, true)?;
        let split = f.channel_split(p, co, groups)?;
        // Rows (output channels) or columns (input channels) of this rank's share.
        let share = |t: Tensor, dim: usize| -> Result<Tensor> {
            Ok(match &split {
                Some(s) => {
                    let r = s.share();
                    t.narrow(dim, r.start, r.len())?
                }
                None => t,
            })
        };
        let opt = |t: Option<Tensor>| t.map(|t| share(t, 0)).transpose();
        let id1 = format!("{p}.conv1");
        // conv1's bias is added with the time projection's (one per-channel add fewer per
        // step): conv1(x) + b1 + (W·t + bt) = conv1(x) + (W·t + (bt + b1)).
        let conv1 = f.conv2d(
            &id1,
            share(w.get(&format!("{id1}.weight"), &[co, ci, 3, 3])?, 0)?,
            None,
            1,
            1,
        )?;
        temb_proj.w = share(temb_proj.w, 0)?;
        temb_proj.b = match (
            opt(temb_proj.b)?,
            opt(w.get_opt(&format!("{id1}.bias"), &[co])?)?,
        ) {
            (Some(bt), Some(b1)) => Some(bt.add(&b1)?),
            (bt, b1) => bt.or(b1),
        };
        let id_n2 = format!("{p}.norm2");
        let gamma = opt(Some(w.get(&format!("{id_n2}.weight"), &[co])?))?;
        let beta = opt(Some(w.get(&format!("{id_n2}.bias"), &[co])?))?;
        let norm2 = match &split {
            Some(s) => s.group_norm(&id_n2, eps, gamma, beta)?,
            None => f.group_norm(&id_n2, groups, eps, gamma, beta)?,
        };
        let id2 = format!("{p}.conv2");
        // The shortcut's bias is added with conv2's (where this rank adds conv2's bias): the
        // skip is then one GEMM, `x + ... = (W_s·x + b_s) + conv2(h) + b2 = W_s·x + conv2(h) +
        // (b2 + b_s)`.
        let id_s = format!("{p}.conv_shortcut");
        let shortcut = if ci != co {
            let ws = w.get(&format!("{id_s}.weight"), &[co, ci, 1, 1])?;
            Some((ws, w.get_opt(&format!("{id_s}.bias"), &[co])?))
        } else {
            None
        };
        let bias2 = match (
            w.get_opt(&format!("{id2}.bias"), &[co])?,
            shortcut.as_ref().and_then(|s| s.1.clone()),
        ) {
            (Some(b2), Some(bs)) => Some(b2.add(&bs)?),
            (b2, bs) => b2.or(bs),
        };
        let conv2 = f.conv2d(
            &id2,
            share(w.get(&format!("{id2}.weight"), &[co, co, 3, 3])?, 1)?,
            bias2.filter(|_| split.as_ref().map_or(true, |s| s.adds_bias())),
            1,
            1,
        )?;
        let shortcut = match shortcut {
            Some((ws, _)) => Some(f.conv2d(&id_s, ws, None, 1, 0)?),
            None => None,
        };
        Ok(ResnetBlock {
            name: p.to_string(),
            norm1,
            conv1,
            temb_proj,
            norm2,
            conv2,
            split,
            shortcut,
        })
    }

    /// `temb_act` is `silu(temb)`, shared by all blocks.
    pub(crate) fn forward(&self, fw: &Fwd, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let ctx = fw.ctx;
        let t = self.temb_proj.forward(temb_act)?;
        let h = self
            .conv1
            .forward_normed(ctx, self.norm1.as_ref(), (x, true), Some(&t), None)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(ctx, x)?,
            None => x.clone(),
        };
        let out = match &self.split {
            Some(s) => {
                let h = self.norm2.forward(ctx, &h, true)?;
                skip.add(&s.reduce(ctx, &self.conv2.forward(ctx, &h)?)?)?
            }
            None => {
                let n2 = self.norm2.as_ref();
                self.conv2
                    .forward_normed(ctx, n2, (&h, true), None, Some(&skip))?
            }
        };
        fw.tap(&self.name, &out);
        Ok(out)
    }
}
