//! The patch-parallel input layer (PCPP §2.2): the whole latent in on every rank, this rank's
//! band of the level-0 grid out, no communication. It reads the input rows its band's outputs
//! need (zero padding only at the image border). With a stride it patchifies (a DiT's
//! `kernel = stride = p` patch embedding): band row `r` of the output reads input rows
//! `r·stride − padding …`, so the band plan is in units of the output (token) grid.

use std::sync::Arc;

use pcpp_kernels::{Conv2dParams, Tensor};

use super::{dims4, Shared};
use crate::layers::{Conv2dLayer, CoreError, LayerContext, Result, StepCtx};

pub(super) struct InputConv {
    pub(super) id: String,
    pub(super) sh: Arc<Shared>,
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) stride: usize,
    pub(super) pad: usize,
}

impl Conv2dLayer for InputConv {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        let (_, _, h, w) = dims4(id, x)?;
        let plan = self.sh.plan();
        let k = self.weight.shape()[2];
        let (s, p) = (self.stride.max(1), self.pad);
        let out = |n: usize| (n + 2 * p).checked_sub(k).map(|m| m / s + 1);
        if out(h) != Some(plan.height) || out(w) != Some(plan.width) {
            return Err(CoreError::Config(format!(
                "layer `{id}`: input is {h}×{w}, which a {k}×{k} kernel with stride {s} and padding {p} does not turn into the {}×{} grid the patch-parallel runtime was built for",
                plan.height, plan.width
            )));
        }
        let band = plan.band(0, self.sh.me());
        let params = Conv2dParams::new(s, p);
        if self.sh.cols(ctx) {
            // Naive patch cutting columns: the column band's input alone, zero-padded.
            let cb = self.sh.cplan(id)?.band(0, self.sh.me());
            let xs = x.narrow(3, cb.start * s, cb.len() * s).at(id)?;
            return xs.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
        }
        if !self.sh.communicates() {
            // Naive patch parallelism: the band's input alone, zero-padded like a separate image.
            let xs = x.narrow(2, band.start * s, band.len() * s).at(id)?;
            return xs.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
        }
        // Input rows that the band's outputs read (output row r reads r·s − p … r·s − p + k − 1),
        // clamped to the image; zeros outside it.
        let lo = (band.start * s) as isize - p as isize;
        let hi = ((band.end - 1) * s + k) as isize - p as isize;
        let (s0, s1) = (lo.max(0) as usize, (hi.min(h as isize)).max(0) as usize);
        let xs = x.narrow(2, s0, s1 - s0).at(id)?;
        let params = Conv2dParams {
            stride: s,
            pad_top: (-lo).max(0) as usize,
            pad_bottom: (hi - h as isize).max(0) as usize,
            pad_left: p,
            pad_right: p,
        };
        xs.conv2d(&self.weight, self.bias.as_ref(), params).at(id)
    }
}
