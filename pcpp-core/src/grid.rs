//! The process grid (PCPP §1.1): the world is split into classifier-free-guidance groups, each of
//! which computes one CFG branch of the image, patch-parallel over its ranks. Any world size works:
//! with CFG split, group 0 (the unconditional branch) takes `⌈N/2⌉` ranks and group 1 the rest.
//! Neighbours never wrap around.

use crate::layers::{CoreError, Result};

/// Where one rank sits: its CFG group and its patch index within the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessGrid {
    /// Rank in the world.
    pub world_rank: usize,
    /// Number of ranks in the world.
    pub world_size: usize,
    /// Number of CFG groups (1 without CFG split, 2 with).
    pub groups: usize,
    /// This rank's CFG group (0 = unconditional branch when split).
    pub group: usize,
    /// First world rank of this rank's group.
    pub group_start: usize,
    /// Ranks in this rank's group (patches per image).
    pub group_size: usize,
}

impl ProcessGrid {
    /// The grid for `world_rank` of `world_size`, with or without CFG split. CFG split needs at least
    /// two ranks.
    pub fn new(world_rank: usize, world_size: usize, cfg_split: bool) -> Result<ProcessGrid> {
        if world_size == 0 || world_rank >= world_size {
            return Err(CoreError::Config(format!(
                "rank {world_rank} is outside a world of {world_size}"
            )));
        }
        if cfg_split && world_size < 2 {
            return Err(CoreError::Config("CFG split needs at least 2 ranks".into()));
        }
        let groups = if cfg_split { 2 } else { 1 };
        let sizes = Self::group_sizes(world_size, groups);
        let mut start = 0;
        for (g, &size) in sizes.iter().enumerate() {
            if world_rank < start + size {
                return Ok(ProcessGrid {
                    world_rank,
                    world_size,
                    groups,
                    group: g,
                    group_start: start,
                    group_size: size,
                });
            }
            start += size;
        }
        Err(CoreError::Config(format!(
            "rank {world_rank} fits no group"
        )))
    }

    /// Sizes of the groups: as equal as possible, larger first.
    pub fn group_sizes(world_size: usize, groups: usize) -> Vec<usize> {
        (0..groups)
            .map(|g| world_size / groups + usize::from(g < world_size % groups))
            .collect()
    }

    /// Index of this rank's patch within its group (its band, counted from the top).
    pub fn patch(&self) -> usize {
        self.world_rank - self.group_start
    }

    /// Patch index of the band above, if any.
    pub fn upper(&self) -> Option<usize> {
        self.patch().checked_sub(1)
    }

    /// Patch index of the band below, if any.
    pub fn lower(&self) -> Option<usize> {
        (self.patch() + 1 < self.group_size).then_some(self.patch() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_world_with_cfg_split() {
        let g: Vec<_> = (0..5)
            .map(|r| ProcessGrid::new(r, 5, true).unwrap())
            .collect();
        assert_eq!(
            g.iter().map(|g| g.group).collect::<Vec<_>>(),
            [0, 0, 0, 1, 1]
        );
        assert_eq!(
            g.iter().map(|g| g.patch()).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1]
        );
        assert_eq!(g[2].lower(), None);
        assert_eq!(g[3].upper(), None);
        assert!(ProcessGrid::new(0, 1, true).is_err());
    }
}
