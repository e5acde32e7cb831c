//! Linear layers of few rows on Hopper's warpgroup MMAs (`gemm_wg.cu`): the GEMMs of a PCPP
//! band's transformer blocks (paper §3; a 32-row band of a 1024² SDXL image has 256 tokens at
//! its deepest level), where cuBLASLt's kernels wait for the kernel before them and their
//! feed-forward output takes a split-K pass and a reduction. These kernels are launched
//! programmatically (their weights are asked into L2 while the kernel before them finishes),
//! split K across a thread-block cluster and reduce it in distributed shared memory, add bias,
//! an accumulator or GEGLU's gate in their epilogue, leave the partial row statistics of their
//! output for the layer norm that reads it, and apply that layer norm to X as they load it
//! (`crate::norm_linear`).

use std::sync::atomic::{AtomicU8, Ordering};

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
/// [`set_small_gemm`] chose more (off by default until measured on a GPU against cuBLASLt).
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

/// Dynamic shared memory of a kernel: 1 KiB of alignment slack, its stages (`GwStages` in
/// gemm_wg.cu: 4-6 of 16 KiB, or of 24 KiB with GEGLU's gate tile) and 512 bytes of row
/// statistics.
pub(crate) fn gemm_wg_bytes(geglu: bool, norm: bool) -> u32 {
    let stages = match (geglu, norm) {
        (true, true) => 5,
        (true, false) => 4,
        (false, true) => 6,
        (false, false) => 5,
    };
    1024 + 512 + stages * if geglu { 24576 } else { 16384 }
}

/// The kernel of `geglu` and `norm` for `dt` (without the suffix: `gemm_wg`, `gemm_wg_ln_geglu`).
pub(crate) fn gemm_wg_name(geglu: bool, norm: bool) -> String {
    format!(
        "gemm_wg{}{}",
        if norm { "_ln" } else { "" },
        if geglu { "_geglu" } else { "" }
    )
}

/// Output tile edge of a block (rows and columns).
const TILE: usize = 64;

/// How many blocks of a cluster share K: doubled (up to 4) while the tiles alone leave
/// multiprocessors idle and every block keeps at least four 64-column chunks.
fn splits(tiles: usize, chunks: usize, sms: usize) -> usize {
    let mut s = 1;
    while s < 4 && tiles * s < sms && chunks >= 8 * s {
        s *= 2;
    }
    s
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

/// Whether the small-row kernels take a GEMM of `m` rows, inner size `k` and `n` outputs in
/// `dt` on `gpu` (alignment aside), with GEGLU's epilogue (`geglu`) or a fused norm or output
/// statistics (`norms`): [`small_gemm`] at that level, compiled here, f16 or bf16,
/// `1 ..= SMALL_GEMM_ROWS` rows, `k` and `n` multiples of 8.
pub(crate) fn gemm_wg_applies(
    gpu: &Gpu,
    dt: DType,
    (m, k, n): (usize, usize, usize),
    (geglu, norms): (bool, bool),
) -> bool {
    small_gemm() >= SmallGemm::needed(geglu, norms)
        && gpu.gemm_wg
        && dt != DType::F32
        && (1..=SMALL_GEMM_ROWS).contains(&m)
        && k > 0
        && k % 8 == 0
        && k <= i32::MAX as usize
        && n > 0
        && n % 8 == 0
        && n <= i32::MAX as usize / 2
}

/// `Y = X·Wᵀ + bias (+ acc)`, or with `geglu` `Y = (X·W₁ᵀ + b₁) · gelu(X·W₂ᵀ + b₂)` over the two
/// halves of W, on the small-row kernels (X through its layer norm with `o.norm`). Returns
/// whether it launched: [`gemm_wg_applies`] and 16-byte-aligned operands.
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
    if !gemm_wg_applies(gpu, dt, (m, k, n), (geglu, norms))
        || ptrs.iter().flatten().any(|p| p % 16 != 0)
        || halves.iter().flatten().any(|p| p % 4 != 0)
    {
        return Ok(false);
    }
    let tiles = n.div_ceil(TILE) * m.div_ceil(TILE);
    let s = splits(tiles, k.div_ceil(TILE), gpu.sms);
    let name = format!("{}_{}", gemm_wg_name(geglu, norm.is_some()), tname(dt));
    let f = gpu.func(&name)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, s as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: gemm_wg_bytes(geglu, norm.is_some()),
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
    use super::{gemm_wg_bytes, gemm_wg_name, splits, SmallGemm};

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
    fn every_kernel_fits_hoppers_shared_memory() {
        for (geglu, norm) in [(false, false), (true, false), (false, true), (true, true)] {
            let bytes = gemm_wg_bytes(geglu, norm);
            // Stages of 16 or 24 KiB after 1 KiB of alignment slack, 512 bytes of statistics.
            assert_eq!((bytes - 1536) % if geglu { 24576 } else { 16384 }, 0);
            assert!(
                bytes <= 227 * 1024,
                "{} takes {bytes}",
                gemm_wg_name(geglu, norm)
            );
        }
        // Two plain blocks fit on a multiprocessor, with or without the norm.
        assert!(2 * gemm_wg_bytes(false, true) <= 227 * 1024);
        assert_eq!(gemm_wg_name(true, true), "gemm_wg_ln_geglu");
        assert_eq!(gemm_wg_name(false, false), "gemm_wg");
    }

    #[test]
    fn k_is_split_only_where_tiles_leave_multiprocessors_idle() {
        // A 256-token band's 1280 → 1280 projection: 80 tiles, 20 chunks → two blocks a tile.
        assert_eq!(splits(80, 20, 132), 2);
        // Its feed-forward output (K = 5120): also two; four would not be needed for a wave.
        assert_eq!(splits(80, 80, 132), 2);
        // The stacked Q/K/V (240 tiles) and the level-1 band (160 tiles) fill the device.
        assert_eq!(splits(240, 20, 132), 1);
        assert_eq!(splits(160, 10, 132), 1);
        // Few tiles and a long K: up to four.
        assert_eq!(splits(8, 80, 132), 4);
        // Short K is not split below four chunks a block.
        assert_eq!(splits(8, 7, 132), 1);
        assert_eq!(splits(8, 12, 132), 2);
    }
}
