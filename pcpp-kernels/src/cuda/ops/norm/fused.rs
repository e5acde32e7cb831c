//! Channels-last group norms in fewer launches (PCPP §2.6's statistics, issue 17's launch count):
//! the apply finishes its group statistics itself from the partial sums (`gn_apply_nhwc_stats`,
//! two launches instead of three), or the whole norm runs as one launch whose grid meets at a
//! barrier between the sums and the apply (`gn_nhwc_one`, where its blocks fit on the device at
//! once with room to spare: [`resident_blocks`]). Both give the bits of the separate kernels: the same partial sums in the same order, the
//! same statistics code (`gn_final_of`, `gn_moment_of`, `gn_merge_of`), the same affine.

use std::sync::atomic::{AtomicU8, Ordering};

use cudarc::driver::{DeviceRepr, LaunchConfig};

use super::super::{ptr, tname, vector, Gpu};
use super::{gn_chunks, gn_sums, param, GnCounts, StatsWindow, Sums};
use crate::{Result, Tensor};

/// How a channels-last group norm gets its statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GnStats {
    /// A statistics kernel between the sums and the apply (three launches; the default).
    Kernel,
    /// The apply finishes them from the sums (two launches).
    Apply,
    /// Sums, statistics and apply in one launch where the grid fits on the device at once; the
    /// apply finishes them elsewhere.
    OneLaunch,
}

impl GnStats {
    /// The setting by its name in `PCPP_GN_STATS` (`kernel`, `apply`, `one`).
    pub fn parse(name: &str) -> Option<GnStats> {
        match name {
            "kernel" => Some(GnStats::Kernel),
            "apply" => Some(GnStats::Apply),
            "one" => Some(GnStats::OneLaunch),
            _ => None,
        }
    }

    /// Its name in `PCPP_GN_STATS`.
    pub fn name(self) -> &'static str {
        match self {
            GnStats::Kernel => "kernel",
            GnStats::Apply => "apply",
            GnStats::OneLaunch => "one",
        }
    }
}

static GN_STATS: AtomicU8 = AtomicU8::new(0);

/// How channels-last group norms get their statistics: [`GnStats::Kernel`] unless
/// [`set_gn_stats`] chose another (not yet measured on a GPU).
pub fn gn_stats() -> GnStats {
    match GN_STATS.load(Ordering::Relaxed) {
        1 => GnStats::Apply,
        2 => GnStats::OneLaunch,
        _ => GnStats::Kernel,
    }
}

/// Chooses how channels-last group norms get their statistics for this process.
pub fn set_gn_stats(s: GnStats) {
    let v = match s {
        GnStats::Kernel => 0,
        GnStats::Apply => 1,
        GnStats::OneLaunch => 2,
    };
    GN_STATS.store(v, Ordering::Relaxed);
}

/// Where the statistics come from: the partial sums finished as `gn_finalize` does (`eps`), or
/// merged with a statistics window as `gn_merge_sums` does (the window, its band counts as the
/// kernels take them, `eps`).
pub(super) enum StatsFrom<'a> {
    Final(f64),
    Merged(&'a StatsWindow<'a>, &'a GnCounts, f64),
}

/// `struct GnStatsSrc` of vector.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct GnStatsSrc {
    sums: u64,
    chunks: i32,
    n: f64,
    bands: u64,
    fresh: u64,
    p: i32,
    own: i32,
    corrected: i32,
    eps: f64,
}
// SAFETY: plain-old-data with the layout of `struct GnStatsSrc` in vector.cu.
unsafe impl DeviceRepr for GnStatsSrc {}

/// The group norm of `x` (`[b, c, s]`, checked; `gn_apply_nhwc` takes it and `to`) written
/// channels-last at `to.0`, images `to.1` elements apart, in fewer launches as [`gn_stats`]
/// chooses; `false` (nothing launched) with [`GnStats::Kernel`].
pub(super) fn try_nhwc(
    gpu: &Gpu,
    x: &Tensor,
    ((b, c, s), groups): ((usize, usize, usize), usize),
    from: StatsFrom<'_>,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    silu: bool,
    (to, image_stride): (u64, usize),
) -> Result<bool> {
    let how = gn_stats();
    if how == GnStats::Kernel {
        return Ok(false);
    }
    let dt = x.dtype();
    let ((_g, gp), (_b, bp)) = (param(gamma, dt)?, param(beta, dt)?);
    let none = GnCounts {
        n: [0.0; crate::ops::MAX_GN_BANDS],
    };
    let (bands, fresh, p, own, corrected, counts, eps) = match from {
        StatsFrom::Final(eps) => (0, 0, 0, -1, 0, none, eps),
        StatsFrom::Merged(win, counts, eps) => {
            let rows = b * groups;
            let fresh = ptr(win.fresh)? + (win.fresh_row * rows * 2 * 4) as u64;
            let (own, corrected) = (win.own as i32, win.corrected as i32);
            let p = win.counts.len() as i32;
            (ptr(win.bands)?, fresh, p, own, corrected, *counts, eps)
        }
    };
    let group_len = (c / groups) * s;
    let mut src = GnStatsSrc {
        sums: 0,
        chunks: 0,
        n: group_len as f64,
        bands,
        fresh,
        p,
        own,
        corrected,
        eps,
    };
    let tiles = s.div_ceil(64) * c.div_ceil(64) * b;
    // The chunking of gn_sums (the same partial sums, so the same bits).
    let (chunk, chunks) = gn_chunks(group_len, b * groups, gpu.sms);
    let vec_sums = vector::gn_sums_vec_name(dt, ptr(x)?, group_len, chunk).is_some();
    let grid = tiles.max(chunks * b * groups);
    let name = format!("gn_nhwc_one_{}", tname(dt));
    if how == GnStats::OneLaunch && vec_sums && grid <= resident_blocks(gpu, &name)? {
        // Every (group, chunk) slot is written before the barrier and read after it.
        let sums = Sums::alloc(gpu, b * groups, chunks)?;
        src.sums = sums.ptr(gpu);
        src.chunks = chunks as i32;
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(gpu, name, cfg;
            ptr(x)?, src.sums, group_len as i64, chunk as i64, src, counts, gp, bp, to,
            c as i32, s as i64, b as i32, groups as i32, silu as i32, image_stride as i64,
            gpu.grid_barrier());
        return Ok(true);
    }
    let sums = gn_sums(x, (b, c, s), groups)?;
    src.sums = sums.ptr(gpu);
    src.chunks = sums.chunks as i32;
    let cfg = LaunchConfig {
        grid_dim: (s.div_ceil(64) as u32, c.div_ceil(64) as u32, b as u32),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    launch!(gpu, format!("gn_apply_nhwc_stats_{}", tname(dt)), cfg;
        ptr(x)?, src, counts, gp, bp, to, c as i32, s as i64, groups as i32, silu as i32,
        image_stride as i64);
    Ok(true)
}

/// How many 256-thread blocks of kernel `name` the one-launch norm lets its grid have: one block
/// fewer a multiprocessor than the kernel's resources allow at once, and at most two, so that
/// every block finds room while the kernel before it drains and the communication stream's kernels
/// hold some (none, and no one-launch norm, where only one fits).
fn resident_blocks(gpu: &Gpu, name: &str) -> Result<usize> {
    let per_sm = gpu
        .func(name)?
        .occupancy_max_active_blocks_per_multiprocessor(256, 0, None)
        .map_err(|e| gpu.err("occupancy", e))?;
    Ok(gpu.sms * (per_sm as usize).saturating_sub(1).min(2))
}

#[cfg(test)]
mod tests {
    use super::GnStats;

    #[test]
    fn settings_round_trip_by_name() {
        for s in [GnStats::Kernel, GnStats::Apply, GnStats::OneLaunch] {
            assert_eq!(GnStats::parse(s.name()), Some(s));
        }
        assert_eq!(GnStats::parse("1"), None);
    }
}
