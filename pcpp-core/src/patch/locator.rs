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

#[cfg(test)]
mod tests {
    use pcpp_comm::{LocalTransport, Transport, TransportOptions};

    use crate::{BandRect, ParallelConfig, PatchRuntime, SplitScheme};

    /// Each rank's place at both levels of a 14 × 6 grid over three ranks, on a step that cuts
    /// rows and (naive patch, `alternate`) on one that cuts columns.
    #[test]
    fn bands_sit_at_their_plans_offsets() {
        let cfg = ParallelConfig {
            split_scheme: SplitScheme::Alternate,
            ..ParallelConfig::naive_patch()
        };
        let out = LocalTransport::run(
            3,
            TransportOptions::default(),
            |t: std::sync::Arc<dyn Transport>| {
                let rt = PatchRuntime::new(t, false, cfg.clone(), 14, 6, 1)?;
                let loc = rt.factory().band_locator("rope")?;
                let (plan, me) = (rt.band_plan().clone(), rt.grid().patch());
                let cplan = rt.topology().cplan(rt.grid().world_rank).cloned().unwrap();
                let mut got = Vec::new();
                for level in 0..2 {
                    let rows = plan.band(level, me).len();
                    got.push(loc.locate(&rt.driver().step_ctx(0), (rows, plan.width_at(level)))?);
                    let cols = cplan.band(level, me).len();
                    got.push(loc.locate(&rt.driver().step_ctx(1), (plan.height_at(level), cols))?);
                }
                Ok::<_, crate::CoreError>(got)
            },
        )
        .unwrap();
        let rect = |top, left, rows, cols, height, width| BandRect {
            top,
            left,
            rows,
            cols,
            height,
            width,
        };
        // Rows are cut at the coarse level (7 rows: 3, 2, 2 → 6, 4, 4 at level 0); columns
        // likewise (3 columns: 1, 1, 1 → 2, 2, 2).
        assert_eq!(
            out[1],
            vec![
                rect(6, 0, 4, 6, 14, 6),
                rect(0, 2, 14, 2, 14, 6),
                rect(3, 0, 2, 3, 7, 3),
                rect(0, 1, 7, 1, 7, 3),
            ]
        );
        for (r, rects) in out.iter().enumerate() {
            assert_eq!(rects[0].top, [0, 6, 10][r], "rank {r}");
            assert_eq!(rects[1].left, [0, 2, 4][r], "rank {r}");
        }
    }
}
