//! Who computes which part of the image (PCPP §1.4, §2.1): the world's process grid (CFG groups
//! and each rank's band index), the row bands of each group at every resolution level, and, for
//! naive patch parallelism that cuts columns, the column bands. One value, built the same way by
//! the patch-parallel runtime (for its own rank) and by [`crate::plan::plan`] (for every rank), so
//! the two cannot disagree about a band.
//!
//! Bands are in units of the model's level-0 grid: the output grid of its input layer (the latent
//! for a UNet whose input convolution keeps the size, the token grid for a DiT that patchifies the
//! latent with a strided input layer).

use crate::geometry::BandPlan;
use crate::grid::ProcessGrid;
use crate::layers::{CoreError, Result};
use crate::schedule::{ParallelConfig, ParallelMode, SplitScheme};

/// The band layout of a whole world (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Every world rank's place, indexed by world rank.
    pub grids: Vec<ProcessGrid>,
    /// Ranks per CFG group.
    pub group_sizes: Vec<usize>,
    /// Row bands of each CFG group (a single band under tensor parallelism, which keeps the whole
    /// image on every rank).
    pub plans: Vec<BandPlan>,
    /// Column bands of each group (band plans of the transposed grid) when naive patch
    /// parallelism cuts columns on some step; empty otherwise.
    pub cplans: Vec<BandPlan>,
    /// Whether layers are plain serial ones (one rank, or [`ParallelMode::Serial`]).
    pub serial: bool,
    /// How steps cut the image: rows unless naive patch parallelism asks for columns.
    pub split: SplitScheme,
}

impl Topology {
    /// The layout of `world_size` ranks for a `height × width` level-0 grid that the model halves
    /// `levels` times, split into two CFG groups when `cfg_split` (and the run is parallel).
    /// Errors if a band would be empty.
    pub fn new(
        world_size: usize,
        cfg_split: bool,
        cfg: &ParallelConfig,
        height: usize,
        width: usize,
        levels: usize,
    ) -> Result<Topology> {
        let serial = world_size <= 1 || cfg.mode == ParallelMode::Serial;
        let split_cfg = cfg_split && !serial;
        let grids = (0..world_size.max(1))
            .map(|r| ProcessGrid::new(r, world_size.max(1), split_cfg))
            .collect::<Result<Vec<_>>>()?;
        let group_sizes = if serial {
            vec![1]
        } else {
            ProcessGrid::group_sizes(world_size, grids[0].groups)
        };
        let tensor = cfg.mode == ParallelMode::Tensor;
        let plans = group_sizes
            .iter()
            .map(|&n| BandPlan::new(height, width, levels, if tensor { 1 } else { n }))
            .collect::<Result<Vec<_>>>()?;
        let split = if !serial && cfg.mode == ParallelMode::NaivePatch {
            cfg.split_scheme
        } else {
            SplitScheme::Rows
        };
        let cplans = if split == SplitScheme::Rows {
            Vec::new()
        } else {
            group_sizes
                .iter()
                .map(|&n| {
                    BandPlan::new(width, height, levels, n).map_err(|e| {
                        CoreError::Config(format!("cutting columns (transposed grid): {e}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Topology {
            grids,
            group_sizes,
            plans,
            cplans,
            serial,
            split,
        })
    }

    /// Number of world ranks.
    pub fn world_size(&self) -> usize {
        self.grids.len()
    }

    /// The band index of world rank `rank` within its group (0 when serial).
    pub fn patch(&self, rank: usize) -> usize {
        if self.serial {
            0
        } else {
            self.grids[rank].patch()
        }
    }

    /// The row-band plan of world rank `rank`'s group.
    pub fn plan(&self, rank: usize) -> &BandPlan {
        &self.plans[if self.serial {
            0
        } else {
            self.grids[rank].group
        }]
    }

    /// The column-band plan of world rank `rank`'s group, when steps may cut columns.
    pub fn cplan(&self, rank: usize) -> Option<&BandPlan> {
        self.cplans.get(self.grids[rank].group)
    }

    /// Whether step `step` cuts columns.
    pub fn cols_at(&self, step: usize) -> bool {
        !self.serial && self.split.cols_at(step)
    }

    /// Rows (or, for a step that cuts columns, columns) of world rank `rank`'s band at `level`.
    pub fn band_len(&self, rank: usize, level: usize, cols: bool) -> usize {
        let g = &self.grids[rank];
        let plans = if cols { &self.cplans } else { &self.plans };
        plans[if self.serial { 0 } else { g.group }]
            .band(level, self.patch(rank))
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_of_a_group_shares_its_plan_and_bands_cover_the_grid() {
        let cfg = ParallelConfig::preset(ParallelMode::Pcpp, &[0.3], Some(2), 10);
        let t = Topology::new(5, true, &cfg, 24, 16, 2).unwrap();
        assert_eq!(t.group_sizes, vec![3, 2]);
        for g in 0..2 {
            let members: Vec<usize> = (0..5).filter(|&r| t.grids[r].group == g).collect();
            let rows: usize = members.iter().map(|&r| t.band_len(r, 0, false)).sum();
            assert_eq!(rows, 24, "group {g}");
        }
        let serial = Topology::new(3, true, &ParallelConfig::serial(), 24, 16, 2).unwrap();
        assert!(serial.serial);
        assert_eq!(serial.patch(2), 0);
        assert_eq!(serial.plan(2).ranks(), 1);
    }
}
