//! Where this rank's band sits in its level's grid, for a model's absolute position encodings
//! (a DiT's RoPE reads each image token's absolute row and column): the band plan's offset of the
//! band, or, on steps where naive patch parallelism cuts columns, of the column band.

use std::sync::Arc;

use super::Shared;
use crate::layers::{BandLocator, BandRect, Result, StepCtx};

pub(super) struct PatchLocator {
    pub(super) id: String,
    pub(super) sh: Arc<Shared>,
}

impl BandLocator for PatchLocator {
    fn locate(&self, ctx: &StepCtx, (rows, cols): (usize, usize)) -> Result<BandRect> {
        let (sh, id) = (&self.sh, &self.id);
        let level = sh.level_at(ctx, id, rows, cols)?;
        if sh.cols(ctx) {
            // The column plan is the band plan of the transposed grid.
            let plan = sh.cplan(id)?;
            return Ok(BandRect {
                top: 0,
                left: plan.band(level, sh.me()).start,
                rows,
                cols,
                height: plan.width_at(level),
                width: plan.height_at(level),
            });
        }
        let plan = sh.plan();
        Ok(BandRect {
            top: plan.band(level, sh.me()).start,
            left: 0,
            rows,
            cols,
            height: plan.height_at(level),
            width: plan.width_at(level),
        })
    }
}
