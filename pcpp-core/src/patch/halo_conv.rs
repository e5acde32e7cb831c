//! The patch-parallel `k×k` convolution (PCPP §2.2, §7.3): halo rows point-to-point from the
//! bands that hold them (normally the two neighbours), zero rows at the image border; fresh in
//! synchronous steps, the previous step's rows afterwards. Naive patch parallelism pads with
//! zeros where other bands would be (rows, or columns on steps that cut columns).

use std::sync::Arc;

use pcpp_kernels::{Conv2dParams, Tensor};

use super::{dims4, Shared};
use crate::cache::Slot;
use crate::exchange::RecvSpec;
use crate::geometry::HaloPlan;
use crate::layers::{Conv2dLayer, CoreError, LayerContext, Result, StepCtx};

pub(super) struct HaloConv {
    pub(super) id: String,
    pub(super) sh: Arc<Shared>,
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) slot: Option<Arc<Slot>>,
}

impl Conv2dLayer for HaloConv {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        let sh = &self.sh;
        let (b, c, rows, w) = dims4(id, x)?;
        let k = self.weight.shape()[2];
        if sh.cols(ctx) {
            // Naive patch cutting columns: zero columns where other bands would be.
            let level = sh.level_at(ctx, id, rows, w)?;
            let hp = HaloPlan::new(sh.cplan(id)?, level, sh.me(), k, self.stride, self.pad);
            let left: usize = hp.recv_above.iter().map(|r| r.1).sum();
            let right: usize = hp.recv_below.iter().map(|r| r.1).sum();
            let params = Conv2dParams {
                stride: self.stride,
                pad_top: self.pad,
                pad_bottom: self.pad,
                pad_left: hp.pad_top + left,
                pad_right: hp.pad_bottom + right,
            };
            return x.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
        }
        let level = sh.level(id, rows, w)?;
        let hp = HaloPlan::new(sh.plan(), level, sh.me(), k, self.stride, self.pad);
        let above: usize = hp.recv_above.iter().map(|r| r.1).sum();
        let below: usize = hp.recv_below.iter().map(|r| r.1).sum();
        let slot = match (&self.slot, sh.communicates()) {
            (Some(s), true) => s,
            _ => {
                // Naive patch parallelism: zero rows where other bands would be.
                let params = Conv2dParams {
                    stride: self.stride,
                    pad_top: hp.pad_top + above,
                    pad_bottom: hp.pad_bottom + below,
                    pad_left: self.pad,
                    pad_right: self.pad,
                };
                return x.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
            }
        };
        let sends = hp
            .send
            .iter()
            .map(|(p, r)| Ok((*p, x.narrow(2, r.start, r.len()).at(id)?)))
            .collect::<Result<Vec<_>>>()?;
        let recv_rows: Vec<(usize, usize)> = hp
            .recv_above
            .iter()
            .chain(&hp.recv_below)
            .copied()
            .collect();
        let recvs = recv_rows
            .iter()
            .map(|&(p, n)| RecvSpec {
                peer: p,
                shape: vec![b, c, n, w],
                dtype: x.dtype(),
            })
            .collect();
        let dev = x.device();
        let got = if ctx.sync {
            sh.sync_exchange(id, slot, ctx, sends, recvs, dev, |g| {
                Ok(Some((g.to_vec(), None)))
            })?
        } else {
            sh.stale_exchange(id, slot, ctx, sends, recvs, None, dev)?.0
        };
        if got.len() != recv_rows.len() {
            return Err(CoreError::Config(format!(
                "layer `{id}`: {} halo parts stored, {} expected",
                got.len(),
                recv_rows.len()
            )));
        }
        // Image-border rows are the convolution's own zero padding.
        let n_above = hp.recv_above.len();
        let mut parts: Vec<&Tensor> = got.iter().take(n_above).collect();
        parts.push(x);
        parts.extend(got.iter().skip(n_above));
        let xin = if parts.len() == 1 {
            x.clone()
        } else {
            Tensor::cat(&parts, 2).at(id)?
        };
        let params = Conv2dParams {
            stride: self.stride,
            pad_top: hp.pad_top,
            pad_bottom: hp.pad_bottom,
            pad_left: self.pad,
            pad_right: self.pad,
        };
        xin.conv2d(&self.weight, self.bias.as_ref(), params).at(id)
    }
}
