//! Linear layers of few rows on Hopper's warpgroup MMAs (`gemm_wg.cu`): the GEMMs of a PCPP
//! band's transformer blocks (paper §3; a 32-row band of a 1024² SDXL image has 256 tokens at
//! its deepest level). The shape was chosen for the L2 reads (a block of BM rows and BN columns
//! reads X n/BN and W m/BM times), so a block takes up to 256 rows and 128 rows of W. These
//! kernels are launched programmatically (their weights are asked into L2 while the kernel
//! before them finishes), split K across a thread-block cluster and reduce it in distributed
//! shared memory, add bias, an accumulator or GEGLU's gate in their epilogue, leave the partial
//! row statistics of their output for the layer norm that reads it, and apply that layer norm
//! to X as they load it (`crate::norm_linear`).
//!
//! Measured on an H200 they pass every parity test but are slower than cuBLASLt (a band step of
//! 15.2 against 8.45 ms): at these sizes each block's chain of dependent phases, not the L2
//! reads, sets their time (docs/small-gemm.md). So [`SmallGemm::Off`] is the default.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use super::*;

/// How much of a band's linear layers runs on the small-row kernels: each level takes what the
/// one before it takes and more, so that a GPU run can time them one step at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SmallGemm {
    /// cuBLASLt for every linear layer; GEGLU and the layer norms as their own passes.
    Off = 0,
    /// The small-row kernels for linear layers with a bias or an accumulator.
    Gemm = 1,
    /// Also GEGLU in the feed-forward input's epilogue.
    Geglu = 2,
    /// Also the layer norms: the row statistics from the epilogues and the norm applied as the
    /// next GEMM loads its input.
    Fused = 3,
}

impl SmallGemm {
    /// The level named `s`: `0` (off), `gemm`, `geglu`, or `1` / `fused` (all of it).
    pub fn parse(s: &str) -> Option<SmallGemm> {
        Some(match s {
            "0" | "off" => SmallGemm::Off,
            "gemm" => SmallGemm::Gemm,
            "geglu" => SmallGemm::Geglu,
            "1" | "fused" => SmallGemm::Fused,
            _ => return None,
        })
    }

    /// The name [`SmallGemm::parse`] reads back.
    pub fn name(self) -> &'static str {
        match self {
            SmallGemm::Off => "off",
            SmallGemm::Gemm => "gemm",
            SmallGemm::Geglu => "geglu",
            SmallGemm::Fused => "fused",
        }
    }

    /// The level a GEMM needs: the plain kernels, GEGLU's epilogue, or the fused norms (an
    /// input norm or output statistics).
    fn needed(geglu: bool, norms: bool) -> SmallGemm {
        if norms {
            SmallGemm::Fused
        } else if geglu {
            SmallGemm::Geglu
        } else {
            SmallGemm::Gemm
        }
    }
}

static SMALL_GEMM: AtomicU8 = AtomicU8::new(SmallGemm::Off as u8);

/// How much runs on the warpgroup-MMA kernels for linear layers of at most
/// [`SMALL_GEMM_ROWS`] rows where the device has them (sm_90a); [`SmallGemm::Off`] unless
/// [`set_small_gemm`] chose more (off by default: measured slower than cuBLASLt,
/// docs/small-gemm.md).
pub fn small_gemm() -> SmallGemm {
    match SMALL_GEMM.load(Ordering::Relaxed) {
        1 => SmallGemm::Gemm,
        2 => SmallGemm::Geglu,
        3 => SmallGemm::Fused,
        _ => SmallGemm::Off,
    }
}

/// Chooses how much runs on the small-row kernels for this process.
pub fn set_small_gemm(level: SmallGemm) {
    SMALL_GEMM.store(level as u8, Ordering::Relaxed);
}

/// The most rows the small-row kernels take; above it cuBLASLt's larger tiles fill the device.
pub const SMALL_GEMM_ROWS: usize = 1024;

/// Dynamic shared memory of a block of `nw` warpgroups (`64·nw` rows): 1 KiB of alignment slack,
/// `GW_ST` = 4 stages of `64·nw` rows of X and 128 of W (128 bytes a row) and `64·nw` (mean,
/// rstd) pairs (gemm_wg.cu). The f32 partial tile of the K split reuses the stages.
pub(crate) fn gemm_wg_bytes(nw: usize) -> u32 {
    (1024 + 4 * (nw * 64 * 128 + 128 * 128) + nw * 64 * 8) as u32
}

/// The kernel of `geglu` and `norm` for `dt` (without the suffix: `gemm_wg`, `gemm_wg_ln_geglu`).
pub(crate) fn gemm_wg_name(geglu: bool, norm: bool) -> String {
    format!(
        "gemm_wg{}{}",
        if norm { "_ln" } else { "" },
        if geglu { "_geglu" } else { "" }
    )
}

/// Most warpgroups a block takes (256 rows): the largest the kernels compile for.
pub(crate) const MAX_WARPGROUPS: usize = 4;

static ROWS_PER_BLOCK: AtomicUsize = AtomicUsize::new(64 * MAX_WARPGROUPS);

/// Caps the rows of a small-row GEMM block (64, 128 or 256, the default): fewer rows read W
/// more often but give more blocks to a GEMM. Other values are rounded down to one of those.
pub fn set_small_gemm_rows(rows: usize) {
    ROWS_PER_BLOCK.store(rows.clamp(64, 64 * MAX_WARPGROUPS), Ordering::Relaxed);
}

/// The rows-per-block cap of [`set_small_gemm_rows`].
pub fn small_gemm_rows() -> usize {
    ROWS_PER_BLOCK.load(Ordering::Relaxed)
}

static MAX_SPLITS: AtomicUsize = AtomicUsize::new(8);

/// Caps the blocks of a cluster that share one tile's K (1, 2, 4 or 8, the default; other values
/// are rounded down to one of those): every block of a split reads a whole f32 tile from the
/// cluster's shared memory, so fewer splits move less between multiprocessors but leave more of
/// them idle.
pub fn set_small_gemm_splits(splits: usize) {
    let s = splits.clamp(1, 8);
    MAX_SPLITS.store(1 << s.ilog2(), Ordering::Relaxed);
}

/// The K-split cap of [`set_small_gemm_splits`].
pub fn small_gemm_splits() -> usize {
    MAX_SPLITS.load(Ordering::Relaxed)
}

/// Warpgroups of a block for `m` rows: enough for all of them (a band's level-2 tokens in one
/// block, so that W is read once), a power of two, at most the cap.
fn warpgroups(m: usize, cap_rows: usize) -> usize {
    let mut nw = 1;
    while nw < MAX_WARPGROUPS && 64 * nw < m && 128 * nw <= cap_rows {
        nw *= 2;
    }
    nw
}

/// Output columns of a block: 128, or 64 with GEGLU (its 64 value and 64 gate rows of W).
fn block_cols(geglu: bool) -> usize {
    if geglu {
        64
    } else {
        128
    }
}

/// How many blocks of a cluster share K: doubled (up to `max`, at most 8, the portable cluster)
/// while the blocks still fit on the multiprocessors in one wave (one block each) and every
/// block keeps at least two 64-column chunks.
fn splits(tiles: usize, chunks: usize, sms: usize, max: usize) -> usize {
    let mut s = 1;
    while s < max.min(8) && tiles * s * 2 <= sms && chunks >= 4 * s {
        s *= 2;
    }
    s
}

/// The launch of a GEMM of `m` rows, inner size `k` and `n` outputs: warpgroups a block and the
/// grid (column tiles, row tiles, K splits); `None` where its tiles would not all run at once (a
/// block of two or four warpgroups takes a multiprocessor, one of one warpgroup half of one),
/// which cuBLASLt's grids do better.
fn launch_shape(
    (m, k, n): (usize, usize, usize),
    geglu: bool,
    (cap_rows, max_splits): (usize, usize),
    sms: usize,
) -> Option<(usize, [usize; 3])> {
    let nw = warpgroups(m, cap_rows);
    let (gx, gy) = (n.div_ceil(block_cols(geglu)), m.div_ceil(64 * nw));
    if gx * gy > sms * if nw == 1 { 2 } else { 1 } {
        return None;
    }
    let s = splits(gx * gy, k.div_ceil(64), sms, max_splits);
    Some((nw, [gx, gy, s]))
}

/// A layer norm of X applied as the small-row kernels load it: the partial statistics its
/// producer wrote (`[m, ceil(k/64), 2]` f32, [`WgOperands::stats_out`] of the GEMM that made X),
/// the affine parameters (`[k]`, the weights' dtype) and epsilon.
pub(crate) struct WgNorm {
    pub stats: u64,
    pub gamma: Option<u64>,
    pub beta: Option<u64>,
    pub eps: f32,
}

/// The operands of one small-row GEMM: device addresses of X `[m, k]`, W `[n, k]` (`[2n, k]` for
/// GEGLU), the bias (`[n]`, `[2n]`), the accumulator `[m, n]` and Y `[m, n]`; optionally where
/// the epilogue writes Y's partial row statistics (`[m, ceil(n/64), 2]` f32) and the layer norm
/// X is read through.
pub(crate) struct WgOperands {
    pub x: u64,
    pub w: u64,
    pub bias: Option<u64>,
    pub acc: Option<u64>,
    pub y: u64,
    pub stats_out: Option<u64>,
    pub norm: Option<WgNorm>,
}

impl WgOperands {
    /// `Y = X·Wᵀ + bias` with Y at device address `y`: no accumulator, statistics or norm.
    pub fn new(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, y: u64) -> Result<WgOperands> {
        Ok(WgOperands {
            x: ptr(x)?,
            w: ptr(w)?,
            bias: bias.map(ptr).transpose()?,
            acc: None,
            y,
            stats_out: None,
            norm: None,
        })
    }
}

/// The launch ([`launch_shape`] with the process's caps) of a GEMM of `m` rows, inner size `k`
/// and `n` outputs in `dt` on `gpu` that the small-row kernels take (alignment aside), with
/// GEGLU's epilogue (`geglu`) or a fused norm or output statistics (`norms`): [`small_gemm`] at
/// that level, compiled here, f16 or bf16, `1 ..= SMALL_GEMM_ROWS` rows, `k` and `n` multiples
/// of 8, and tiles that run at once; `None` where they do not take it.
fn gemm_wg_launch(
    gpu: &Gpu,
    dt: DType,
    (m, k, n): (usize, usize, usize),
    (geglu, norms): (bool, bool),
) -> Option<(usize, [usize; 3])> {
    let takes = small_gemm() >= SmallGemm::needed(geglu, norms)
        && gpu.gemm_wg
        && dt != DType::F32
        && (1..=SMALL_GEMM_ROWS).contains(&m)
        && k > 0
        && k % 8 == 0
        && k <= i32::MAX as usize
        && n > 0
        && n % 8 == 0
        && n <= i32::MAX as usize / 2;
    takes
        .then(|| {
            launch_shape(
                (m, k, n),
                geglu,
                (small_gemm_rows(), small_gemm_splits()),
                gpu.sms,
            )
        })
        .flatten()
}

/// Whether the small-row kernels take a GEMM ([`gemm_wg_launch`]).
pub(crate) fn gemm_wg_applies(
    gpu: &Gpu,
    dt: DType,
    mkn: (usize, usize, usize),
    epilogue: (bool, bool),
) -> bool {
    gemm_wg_launch(gpu, dt, mkn, epilogue).is_some()
}

/// `Y = X·Wᵀ + bias (+ acc)`, or with `geglu` `Y = (X·W₁ᵀ + b₁) · gelu(X·W₂ᵀ + b₂)` over the two
/// halves of W, on the small-row kernels (X through its layer norm with `o.norm`). Returns
/// whether it launched: [`gemm_wg_launch`] and 16-byte-aligned operands.
pub(crate) fn try_gemm_wg(
    gpu: &Gpu,
    dt: DType,
    o: &WgOperands,
    (m, k, n): (usize, usize, usize),
    geglu: bool,
) -> Result<bool> {
    let norm = o.norm.as_ref();
    let ptrs = [
        Some(o.x),
        Some(o.w),
        o.acc,
        Some(o.y),
        o.stats_out,
        norm.map(|l| l.stats),
    ];
    let halves = [
        o.bias,
        norm.and_then(|l| l.gamma),
        norm.and_then(|l| l.beta),
    ];
    let norms = norm.is_some() || o.stats_out.is_some();
    let Some((nw, [gx, gy, s])) = gemm_wg_launch(gpu, dt, (m, k, n), (geglu, norms)) else {
        return Ok(false);
    };
    if ptrs.iter().flatten().any(|p| p % 16 != 0) || halves.iter().flatten().any(|p| p % 4 != 0) {
        return Ok(false);
    }
    let name = format!("{}_{}", gemm_wg_name(geglu, norm.is_some()), tname(dt));
    let f = gpu.func(&name)?;
    let cfg = LaunchConfig {
        grid_dim: (gx as u32, gy as u32, s as u32),
        block_dim: (128 * nw as u32, 1, 1),
        shared_mem_bytes: gemm_wg_bytes(nw),
    };
    let (bias, acc) = (o.bias.unwrap_or(0), o.acc.unwrap_or(0));
    let stats_out = o.stats_out.unwrap_or(0);
    let (stats_in, gamma, beta, eps) = norm.map_or((0, 0, 0, 0.0f32), |l| {
        (l.stats, l.gamma.unwrap_or(0), l.beta.unwrap_or(0), l.eps)
    });
    let (mi, ni, ki) = (m as i32, n as i32, k as i32);
    let mut params = [
        kernel_param(&o.x),
        kernel_param(&o.w),
        kernel_param(&bias),
        kernel_param(&acc),
        kernel_param(&o.y),
        kernel_param(&mi),
        kernel_param(&ni),
        kernel_param(&ki),
        kernel_param(&stats_out),
        kernel_param(&stats_in),
        kernel_param(&gamma),
        kernel_param(&beta),
        kernel_param(&eps),
    ];
    // SAFETY: the arguments match `GEMM_WG` in gemm_wg.cu; X holds m·k, W n·k (2n·k), the bias n
    // (2n), acc and Y m·n elements of `dt`, the statistics m·ceil(n/64)·2 (out) and
    // m·ceil(k/64)·2 (in) f32 and gamma and beta k elements (the caller's checked shapes); `s`
    // divides the grid's z.
    unsafe { launch_ex_cluster(gpu, f, cfg, s as u32, &mut params) }
        .map_err(|e| gpu.err(&name, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::{
        block_cols, gemm_wg_bytes, gemm_wg_name, launch_shape, splits, warpgroups, SmallGemm,
        MAX_WARPGROUPS,
    };

    #[test]
    fn each_level_takes_what_the_one_before_takes() {
        for level in [
            SmallGemm::Off,
            SmallGemm::Gemm,
            SmallGemm::Geglu,
            SmallGemm::Fused,
        ] {
            assert_eq!(SmallGemm::parse(level.name()), Some(level));
        }
        assert_eq!(SmallGemm::parse("1"), Some(SmallGemm::Fused));
        assert_eq!(SmallGemm::parse("0"), Some(SmallGemm::Off));
        assert_eq!(SmallGemm::parse("on"), None);
        let takes = |level: SmallGemm, geglu, norms| level >= SmallGemm::needed(geglu, norms);
        assert!(!takes(SmallGemm::Off, false, false));
        assert!(takes(SmallGemm::Gemm, false, false) && !takes(SmallGemm::Gemm, true, false));
        assert!(takes(SmallGemm::Geglu, true, false) && !takes(SmallGemm::Geglu, false, true));
        assert!(takes(SmallGemm::Fused, true, true) && takes(SmallGemm::Fused, false, false));
    }

    #[test]
    fn every_block_fits_hoppers_shared_memory() {
        // 4 stages of 256 rows of X and 128 of W, the alignment slack and the row statistics.
        assert_eq!(gemm_wg_bytes(4), 1024 + 4 * 49152 + 2048);
        assert!(gemm_wg_bytes(MAX_WARPGROUPS) <= 227 * 1024);
        // One warpgroup's blocks fit twice on a multiprocessor (`launch_shape` counts on it).
        assert!(2 * gemm_wg_bytes(1) <= 227 * 1024);
        assert_eq!(gemm_wg_name(true, true), "gemm_wg_ln_geglu");
        assert_eq!(gemm_wg_name(false, false), "gemm_wg");
    }

    #[test]
    fn a_block_takes_a_bands_rows_up_to_the_cap() {
        // A 32-row band's level-2 tokens (256) in one block of four warpgroups.
        assert_eq!(warpgroups(256, 256), 4);
        assert_eq!(warpgroups(1024, 256), 4);
        assert_eq!(warpgroups(77, 256), 2);
        assert_eq!(warpgroups(64, 256), 1);
        assert_eq!(warpgroups(1, 256), 1);
        // The cap, rounded down to 64, 128 or 256 rows.
        assert_eq!(warpgroups(256, 128), 2);
        assert_eq!(warpgroups(256, 100), 1);
        assert_eq!(block_cols(true), 64);
        assert_eq!(block_cols(false), 128);
    }

    #[test]
    fn grids_of_more_than_one_wave_are_left_to_cublaslt() {
        // A 32-row band's level-2 feed-forward input (GEGLU, 256 rows): 80 blocks, no split.
        assert_eq!(
            launch_shape((256, 1280, 5120), true, (256, 8), 132),
            Some((4, [80, 1, 1]))
        );
        // Its 1280-wide projections: 10 tiles split eight ways.
        assert_eq!(
            launch_shape((256, 1280, 1280), false, (256, 8), 132),
            Some((4, [10, 1, 8]))
        );
        // A level-1 band's feed-forward input (1 024 rows, 640 → 2 × 2560): 160 tiles.
        assert_eq!(launch_shape((1024, 640, 2560), true, (256, 8), 132), None);
        // Blocks of one warpgroup: two a multiprocessor.
        assert_eq!(
            launch_shape((256, 1280, 1280), false, (64, 8), 132),
            Some((1, [10, 4, 2]))
        );
        assert_eq!(launch_shape((1024, 64, 4096), false, (64, 8), 132), None);
    }

    #[test]
    fn k_is_split_only_where_tiles_leave_multiprocessors_idle() {
        // A 256-token band's 1280 → 1280 projection: 10 tiles of 256 × 128, 20 chunks → eight
        // blocks a tile (80 blocks).
        assert_eq!(splits(10, 20, 132, 8), 8);
        // Its feed-forward output (K = 5120): also eight.
        assert_eq!(splits(10, 80, 132, 8), 8);
        // The stacked Q/K/V (30 tiles): four (120 blocks; eight would not fit one wave).
        assert_eq!(splits(30, 20, 132, 8), 4);
        // The feed-forward input with GEGLU (80 tiles) fills the device alone.
        assert_eq!(splits(80, 20, 132, 8), 1);
        // A level-1 band (1 024 rows, 640 wide: 20 tiles, 10 chunks): four.
        assert_eq!(splits(20, 10, 132, 8), 4);
        // Short K is not split below two chunks a block.
        assert_eq!(splits(2, 3, 132, 8), 1);
        assert_eq!(splits(2, 7, 132, 8), 2);
        assert_eq!(splits(2, 12, 132, 8), 4);
        // The cap.
        assert_eq!(splits(10, 20, 132, 4), 4);
        assert_eq!(splits(10, 20, 132, 1), 1);
        assert_eq!(
            launch_shape((256, 1280, 1280), false, (256, 2), 132),
            Some((4, [10, 1, 2]))
        );
    }
}
