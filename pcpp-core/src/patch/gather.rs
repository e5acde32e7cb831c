//! The output gather (PCPP §1.4): every rank gets every band, CFG branches stacked
//! `[uncond; cond]`, and the one band stitching it shares with the gather to one rank.

use std::sync::Arc;

use pcpp_comm::CommKind;
use pcpp_kernels::Tensor;

use super::{dims4, Shared, GATHER_TAG};
use crate::exchange::RecvSpec;
use crate::layers::{CoreError, GatherLayer, LayerContext, Result, StepCtx};

pub(super) struct PatchGather {
    pub(super) id: String,
    pub(super) sh: Arc<Shared>,
}

impl GatherLayer for PatchGather {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        let sh = &self.sh;
        let (b, c, rows, w) = dims4(id, x)?;
        let level = sh.level_at(ctx, id, rows, w)?;
        let me = sh.grid.world_rank;
        // Bands are rows (or, for naive patch cutting columns, columns) of the image.
        let cols = sh.cols(ctx);
        let axis = if cols { 3 } else { 2 };
        let plans = if cols {
            &sh.topo.cplans
        } else {
            &sh.topo.plans
        };
        let len_of = |r: usize| {
            let g = &sh.topo.grids[r];
            plans[g.group].band(level, g.patch()).len()
        };
        let shape_of = |r: usize| {
            if cols {
                vec![b, c, rows, len_of(r)]
            } else {
                vec![b, c, len_of(r), w]
            }
        };
        let others: Vec<usize> = (0..sh.topo.grids.len()).filter(|&r| r != me).collect();
        let sends = others.iter().map(|&r| (r, x.clone())).collect();
        let recvs = others
            .iter()
            .map(|&r| RecvSpec {
                peer: r,
                shape: shape_of(r),
                dtype: x.dtype(),
            })
            .collect();
        let got = sh.exchange_now(
            id,
            CommKind::Gather,
            GATHER_TAG,
            sends,
            recvs,
            x.device(),
            true,
        )?;
        stitch_bands(sh, id, me, x, got, axis)
    }
}

/// The whole image from every rank's band: `own` (this rank's, world rank `me`) and `got` (the
/// others', in world-rank order), joined along `axis` within each CFG group, the groups' images
/// along the batch. The one stitching of the output gather and of the gather to one rank.
pub(crate) fn stitch_bands(
    sh: &Shared,
    id: &str,
    me: usize,
    own: &Tensor,
    got: Vec<Tensor>,
    axis: usize,
) -> Result<Tensor> {
    let n = sh.topo.grids.len();
    if got.len() + 1 != n {
        return Err(CoreError::Config(format!(
            "layer `{id}`: {} bands received, {} expected",
            got.len(),
            n - 1
        )));
    }
    let mut it = got.into_iter();
    let bands: Vec<Tensor> = (0..n)
        .map(|r| {
            if r == me {
                Some(own.clone())
            } else {
                it.next()
            }
        })
        .collect::<Option<_>>()
        .ok_or_else(|| CoreError::Config(format!("layer `{id}`: a band is missing")))?;
    let mut images = (0..sh.grid.groups)
        .map(|g| {
            let members: Vec<&Tensor> = (0..n)
                .filter(|&r| sh.topo.grids[r].group == g)
                .map(|r| &bands[r])
                .collect();
            Tensor::cat(&members, axis).at(id)
        })
        .collect::<Result<Vec<_>>>()?;
    if images.len() == 1 {
        Ok(images.remove(0))
    } else {
        let refs: Vec<&Tensor> = images.iter().collect();
        Tensor::cat(&refs, 0).at(id)
    }
}
