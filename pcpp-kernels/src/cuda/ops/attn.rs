//! Multi-head attention on the GPU: the fused flash-attention kernels (`flash_attn.cu`, head
//! sizes 64 and 128, and the head-size-128 variants with Q in shared memory; on Hopper
//! `flash_hopper.cu`, warpgroup MMAs for both head sizes, and `flash_ws.cu`, the same
//! warp-specialised with TMA loads; for a band's small grids `flash_small64`, 64-row tiles of
//! `flash_attn.cu`'s kernel on packed projections) and the unfused
//! cuBLAS path (score GEMM, row softmax, value GEMM in query chunks) for other head sizes, f32,
//! and as the reference the fused kernels are tested against.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use cudarc::driver::LaunchConfig;

use super::tma::matrix_map;
use super::{cast, cfg_rows, gemm_batched, gpu_of, out, ptr, tname, Gpu};
use crate::{Cols, DType, Result, Tensor};

/// Scores of at most this many bytes are materialised at once (per query chunk).
const ATTN_SCORE_BYTES: usize = 256 << 20;

/// Multi-head attention through cuBLAS in query chunks: `S = QKᵀ/√d` (f32), row softmax into the
/// storage dtype, `O = P·V`. The score matrix never exceeds [`ATTN_SCORE_BYTES`].
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
) -> Result<Tensor> {
    let gpu = gpu_of(q)?;
    let dt = q.dtype();
    let k = if k.dtype() != dt {
        cast(k, dt)?
    } else {
        k.clone()
    };
    let v = if v.dtype() != dt {
        cast(v, dt)?
    } else {
        v.clone()
    };
    let (b, lq, dm) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let dh = dm / heads;
    let y = out(&gpu, q.shape(), dt)?;
    if b * lq == 0 {
        return Ok(y);
    }
    let scale_log2 = std::f32::consts::LOG2_E / (dh as f32).sqrt();
    let blocks = [(q, 0), (&k, 0), (&v, 0)].map(|(t, start)| (t, start, dm));
    if warpspec(&gpu, blocks, &y, (lk, heads), causal)? {
        return Ok(y);
    }
    // The Hopper kernel without TMA, where chosen (or a warp-specialised one was) and available.
    let hopper = gpu.flash_hopper
        && (flash128() == Flash128::Hopper || flash128().warpspec_form().is_some());
    let fused: Option<(std::borrow::Cow<str>, usize, u32)> = match (dh, hopper) {
        (64 | 128, true) => Some((flash_hopper_name(dh).into(), 128, flash_hopper_bytes(dh))),
        (64, _) => Some(("flash_attn".into(), 128, 0)),
        (128, _)
            if !matches!(flash128(), Flash128::SharedQ | Flash128::RegistersQ)
                && gpu.flash_shared_q64 =>
        {
            Some(("flash_attn128q64".into(), 128, FLASH_SHARED_Q64_BYTES))
        }
        (128, _) if flash128() != Flash128::RegistersQ && gpu.flash_shared_q => {
            Some(("flash_attn128q".into(), 128, FLASH_SHARED_Q_BYTES))
        }
        (128, _) => Some(("flash_attn128".into(), 64, 0)),
        _ => None,
    };
    if let (Some((name, rows, smem)), false) = (fused, dt == DType::F32) {
        let cfg = LaunchConfig {
            grid_dim: (lq.div_ceil(rows) as u32, heads as u32, b as u32),
            // The Hopper kernels: two warpgroups; the others: four warps.
            block_dim: (if hopper { 256 } else { 128 }, 1, 1),
            shared_mem_bytes: smem,
        };
        launch!(gpu, format!("{name}_{}", tname(dt)), cfg;
            ptr(q)?, ptr(&k)?, ptr(&v)?, ptr(&y)?, lq as i32, lk as i32, heads as i32, scale_log2,
            causal as i32);
        return Ok(y);
    }
    attention_chunked(&gpu, (q, &k, &v, &y), (b, lq, lk, heads), causal)?;
    Ok(y)
}

/// Dynamic shared memory of the head-size-128 kernel with Q in shared memory: a 128-row Q tile
/// and two stages of 32-row K and V tiles, rows padded to 136 halves.
pub(crate) const FLASH_SHARED_Q_BYTES: u32 = (128 + 4 * 32) * 136 * 2;
/// The same with 64-row K and V tiles.
pub(crate) const FLASH_SHARED_Q64_BYTES: u32 = (128 + 4 * 64) * 136 * 2;

/// The Hopper kernel for head size `dh` (64 or 128), without its dtype suffix.
pub(crate) fn flash_hopper_name(dh: usize) -> String {
    format!("flash_wg{dh}")
}

/// The warp-specialised kernel on Q, K and V given as `(tensor [b, l, n], first column, row
/// stride n)` blocks of `heads · dh` columns, into `y: [b, lq, heads · dh]`; returns whether it
/// ran: it needs an sm_90a device with [`Flash128::Warpspec`] (or a form of it) chosen, f16 or
/// bf16, head size 64 or 128, and TMA maps of all three (128-row boxes; where one cannot be made
/// the caller takes another kernel). A band's small grids ([`small_grid`]) go to the small-grid
/// kernel instead, on the same operands.
fn warpspec(
    gpu: &Arc<Gpu>,
    blocks: [(&Tensor, usize, usize); 3],
    y: &Tensor,
    (lk, heads): (usize, usize),
    causal: bool,
) -> Result<bool> {
    let (b, lq, dm) = (y.shape()[0], y.shape()[1], y.shape()[2]);
    let dt = y.dtype();
    let dh = dm / heads;
    let choice = flash128();
    let form = match choice.warpspec_form() {
        Some(f) if gpu.flash_ws && matches!(dh, 64 | 128) && dt != DType::F32 => f,
        _ => return Ok(false),
    };
    let scale_log2 = std::f32::consts::LOG2_E / (dh as f32).sqrt();
    if small_grid(choice, (b, lq, lk, heads, dh), gpu.sms)
        && small(gpu, blocks, y, (lk, heads), scale_log2, causal)?
    {
        return Ok(true);
    }
    // Three MMA warpgroups exist for head size 64 (elsewhere two). The default takes the rows
    // of each head in 192-row tiles up to `split` and in 128-row tiles after it (`row_split`).
    let (three, form) = match form.strip_prefix("3w") {
        Some(rest) => (true, rest),
        None if form == "2w" => (false, ""),
        None => (false, form),
    };
    let split = match choice {
        _ if dh != 64 || !gpu.flash_ws3 => 0,
        _ if three => lq,
        Flash128::Warpspec | Flash128::WarpspecNoSmall | Flash128::WarpspecSmallWide => {
            row_split(heads * b, lq, lk, gpu.sms)
        }
        Flash128::WarpspecWhole if three_groups_pay(heads * b, lq, gpu.sms) => lq,
        _ => 0,
    };
    let map = |(t, start, n): (&Tensor, usize, usize), rows: usize, box_rows: usize| {
        let addr = ptr(t).ok()? + (start * dt.size()) as u64;
        matrix_map(addr, dt, (b, rows, dm), n, box_rows as u32)
    };
    let (Some(tk), Some(tv)) = (map(blocks[1], lk, 128), map(blocks[2], lk, 128)) else {
        return Ok(false);
    };
    // Each launch's rows, warpgroups and Q map (all made before anything is launched).
    let mut launches = Vec::new();
    for (q0, q1, groups) in [(0, split, 3), (split, lq, 2)] {
        if q1 > q0 {
            let Some(tq) = map(blocks[0], lq, 64 * groups) else {
                return Ok(false);
            };
            launches.push((q0, q1, groups, tq));
        }
    }
    for (q0, q1, groups, tq) in launches {
        let bm = 64 * groups;
        let qtiles = (q1 - q0).div_ceil(bm);
        let tiles = qtiles * heads * b;
        let prefix = if groups == 3 { "3w" } else { "" };
        // The default schedule runs persistent where its tiles take more than one wave.
        let (name, grid) = match form {
            "" if flash_persistent() && tiles > gpu.sms => (format!("{prefix}r"), (gpu.sms, 1, 1)),
            f => (format!("{prefix}{f}"), (qtiles, heads, b)),
        };
        let cfg = LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block_dim: (128 * (groups as u32 + 1), 1, 1),
            shared_mem_bytes: flash_ws_bytes(dh, groups),
        };
        launch!(gpu, format!("{}_{}", flash_ws_name(dh, &name), tname(dt)), cfg;
            tq, tk, tv, ptr(y)?, lq as i32, lk as i32, heads as i32, b as i32, q0 as i32,
            q1 as i32, scale_log2, causal as i32);
    }
    Ok(true)
}

/// Whether `choice` runs an attention of `b` images, `lq` queries, `lk` keys and `heads` heads of
/// size `dh` on the small-grid kernel (`flash_small64`) on a device of `sms` multiprocessors:
/// the default [`Flash128::Warpspec`] (or [`Flash128::WarpspecSmallWide`], which also takes up
/// to two waves of tiles over up to [`SMALL_WIDE_KEYS`] keys), head size 64, at most
/// [`SMALL_GRID_KEYS`] keys, and fewer 64-row query tiles than multiprocessors, so that each
/// of its blocks has a multiprocessor to itself while the warp-specialised grid would leave
/// more than half of them idle. SDXL's
/// 32-row band at 1024²: level 2's attentions (256 queries × 20 heads over a window of about
/// 410 keys, and over the 77 text tokens). Not level 1's self-attention (1 024 × 10 over about
/// 1 640 keys), nor level 2 of a 512², b = 2 image (160 blocks of 64 rows): the small-grid kernel
/// ran them slower (runs I1 and I3, docs/benchmarks.md).
pub fn small_grid(
    choice: Flash128,
    (b, lq, lk, heads, dh): (usize, usize, usize, usize, usize),
    sms: usize,
) -> bool {
    let tiles = lq.div_ceil(64) * heads * b;
    dh == 64
        && match choice {
            Flash128::Warpspec => lk <= SMALL_GRID_KEYS && tiles < sms,
            Flash128::WarpspecSmallWide => {
                (lk <= SMALL_GRID_KEYS && tiles < sms)
                    || (lk <= SMALL_WIDE_KEYS && tiles <= 2 * sms)
            }
            _ => false,
        }
}

/// The most keys of an attention that [`small_grid`] gives the small-grid kernel.
pub const SMALL_GRID_KEYS: usize = 512;

/// The most keys of an attention of up to two waves of 64-row tiles that
/// [`Flash128::WarpspecSmallWide`] gives the small-grid kernel.
pub const SMALL_WIDE_KEYS: usize = 2048;

/// The small-grid kernel (`flash_small64`: FlashAttention-2's tiles, 64 query rows per block of
/// four warps, `mma.sync`, cp.async K/V stages) on Q, K and V read in place, for [`warpspec`]
/// (its operands, its scale); returns whether it ran: rows and first columns must be 16-byte
/// aligned for its copies.
fn small(
    gpu: &Arc<Gpu>,
    blocks: [(&Tensor, usize, usize); 3],
    y: &Tensor,
    (lk, heads): (usize, usize),
    scale_log2: f32,
    causal: bool,
) -> Result<bool> {
    let dt = y.dtype();
    let lanes = 16 / dt.size();
    if blocks
        .iter()
        .any(|&(_, start, n)| start % lanes != 0 || n % lanes != 0)
    {
        return Ok(false);
    }
    let [q, k, v] = blocks.map(|(t, start, _)| ptr(t).map(|p| p + (start * dt.size()) as u64));
    let [sq, sk, sv] = blocks.map(|(_, _, n)| n as i64);
    let (b, lq) = (y.shape()[0], y.shape()[1]);
    let groups = small_split_groups(lk, small_split().min(gpu.small_split));
    let (name, smem) = match groups {
        1 => ("flash_small64".to_string(), 0),
        g => (format!("flash_small64s{g}"), small_split_bytes(g)),
    };
    let cfg = LaunchConfig {
        grid_dim: (lq.div_ceil(64) as u32, heads as u32, b as u32),
        block_dim: (128 * groups as u32, 1, 1),
        shared_mem_bytes: smem,
    };
    launch!(gpu, format!("{name}_{}", tname(dt)), cfg;
        q?, k?, v?, ptr(y)?, lq as i32, lk as i32, heads as i32, sq, sk, sv, scale_log2,
        causal as i32);
    Ok(true)
}

/// The key-split groups of the small-grid kernel over `lk` keys when at most `most` may run:
/// the largest of 1, 2 and 4 that is at most `most` and at most the number of 64-key tiles, so
/// that every group has a tile (a band's window of about 410 keys: four groups of one or two
/// tiles; the 77 text tokens: two of one).
pub(crate) fn small_split_groups(lk: usize, most: usize) -> usize {
    let tiles = lk.div_ceil(64);
    [4, 2, 1]
        .into_iter()
        .find(|&g| g <= most && g <= tiles)
        .unwrap_or(1)
}

/// Dynamic shared memory of the small-grid kernel with `groups` key-split groups: two stages of
/// 64-key K and V tiles a group, rows padded to 72 halves.
pub(crate) const fn small_split_bytes(groups: usize) -> u32 {
    (groups * 4 * 64 * 72 * 2) as u32
}

/// The most key-split groups of the small-grid attention kernel by default: four, which made
/// a PCPP band's step 0.09-0.15 ms faster than one chain on an H100 (docs/benchmarks.md, run
/// W2; `PCPP_FLASH128=ws-split1` and `ws-split2` choose fewer).
pub const SMALL_SPLIT_DEFAULT: usize = 4;

static SMALL_SPLIT: AtomicU8 = AtomicU8::new(SMALL_SPLIT_DEFAULT as u8);

/// The most key-split groups of the small-grid attention kernel ([`SMALL_SPLIT_DEFAULT`]
/// unless [`set_small_split`] chose; the device may allow fewer, see [`small_split_groups`]).
pub fn small_split() -> usize {
    SMALL_SPLIT.load(Ordering::Relaxed) as usize
}

/// Sets the most key-split groups (1, 2 or 4; 1 walks every key tile in one chain, the kernel
/// before the split) of the small-grid attention kernel for this process.
pub fn set_small_split(most: usize) {
    SMALL_SPLIT.store(most.clamp(1, 4) as u8, Ordering::Relaxed);
}

/// Whether three MMA warpgroups (192-row Q tiles) finish a grid of `grids` (heads × batch)
/// attentions over `lq` queries before two (128-row tiles) on `sms` multiprocessors, one block
/// per multiprocessor at a time: a 192-row block costs about [`WS3_BLOCK_COST`] 128-row blocks,
/// and each grid runs in whole waves, so the tile that leaves less of its last wave idle wins
/// (SDXL at 2048²: 4 096 queries × 20 heads run 4 waves of 192-row blocks, 3.3 of them busy,
/// but 5 waves of 128-row blocks, 4.85 busy). A band's small grids keep the 128-row tiles'
/// parallelism.
pub(crate) fn three_groups_pay(grids: usize, lq: usize, sms: usize) -> bool {
    let waves = |rows: usize| (lq.div_ceil(rows) * grids).div_ceil(sms.max(1)) as f64;
    waves(192) * WS3_BLOCK_COST < waves(128)
}

/// Where the default schedule switches each head's rows from 192-row to 128-row tiles: the
/// first `split` rows (a multiple of 192, or `lq`) go to one launch of three-warpgroup blocks,
/// the rest to a second launch of two-warpgroup blocks. Of every split, the one whose two
/// launches finish first in whole waves on `sms` multiprocessors (a 192-row block costing
/// [`WS3_BLOCK_COST`] 128-row ones, a second launch [`SECOND_LAUNCH_COST`] more) is taken, and
/// of equal ones the single launch. SDXL at 2048²: level 1's 16 384 queries × 10 heads run six
/// full waves of 192-row blocks and one of 128-row blocks (8.9 units) instead of seven waves of
/// 192-row blocks, the last half idle (9.1). Only grids over at least [`SPLIT_MIN_KEYS`] keys
/// are split (the others take one tile height, `three_groups_pay`): with shorter key loops each
/// block's start and end weigh more than the model counts, and on an H200 the split of
/// 4 096-key grids ran no faster than one launch (runs U2, docs/benchmarks.md).
pub(crate) fn row_split(grids: usize, lq: usize, lk: usize, sms: usize) -> usize {
    // The better single launch (`three_groups_pay` compares exactly their costs below).
    let all = lq.div_ceil(192);
    let single = if three_groups_pay(grids, lq, sms) {
        all
    } else {
        0
    };
    if lk < SPLIT_MIN_KEYS {
        return (192 * single).min(lq);
    }
    let sms = sms.max(1);
    let waves = |tiles: usize| tiles.div_ceil(sms) as f64;
    let cost = |m: usize| {
        let split = (192 * m).min(lq);
        let rest = (lq - split).div_ceil(128) * grids;
        let second = if split > 0 && rest > 0 {
            SECOND_LAUNCH_COST
        } else {
            0.0
        };
        waves(m * grids) * WS3_BLOCK_COST + waves(rest) + second
    };
    // A mixed split must be cheaper than the single launch; of equal mixed ones, the one with
    // the most rows in the larger tiles.
    let mixed = (1..all).rev().min_by(|&x, &y| cost(x).total_cmp(&cost(y)));
    let best = match mixed {
        Some(m) if cost(m) < cost(single) - 1e-9 => m,
        _ => single,
    };
    (192 * best).min(lq)
}

/// The time of a 192-row, three-warpgroup attention block in units of a 128-row, two-warpgroup
/// one over the same keys: 1.5 times the rows at about 15 % more throughput (fitted to the
/// SDXL steps' two- and three-warpgroup runs on an H200, docs/benchmarks.md).
pub(crate) const WS3_BLOCK_COST: f64 = 1.3;

/// What a second attention launch costs beyond its waves, in 128-row blocks (its launch and
/// its first tiles' loads).
pub(crate) const SECOND_LAUNCH_COST: f64 = 0.1;

/// The fewest keys of a grid whose rows [`row_split`] splits between two tile heights.
pub(crate) const SPLIT_MIN_KEYS: usize = 8192;

static PERSISTENT: AtomicBool = AtomicBool::new(true);

/// Whether the warp-specialised attention's default schedule runs as a persistent grid (one
/// block per multiprocessor looping over the query tiles, so that a block's producer loads the
/// next tile while its MMA warpgroups finish the last) where its tiles take more than one
/// wave: on unless [`set_flash_persistent`] turned it off.
pub fn flash_persistent() -> bool {
    PERSISTENT.load(Ordering::Relaxed)
}

/// Chooses between the persistent grid and one block per query tile for the warp-specialised
/// attention (same results), for this process.
pub fn set_flash_persistent(on: bool) {
    PERSISTENT.store(on, Ordering::Relaxed);
}

/// [`crate::Tensor::attention_packed`] where its blocks can be read in place (see
/// [`warpspec`]): `None` otherwise, and the caller copies the blocks out. The caller checked
/// shapes, devices and `width % heads`.
pub(crate) fn attention_in_place(
    q: Cols,
    k: Cols,
    v: Cols,
    width: usize,
    heads: usize,
    causal: bool,
) -> Result<Option<Tensor>> {
    let dt = q.t.dtype();
    if k.t.dtype() != dt || v.t.dtype() != dt {
        return Ok(None);
    }
    let gpu = gpu_of(q.t)?;
    let (b, lq) = (q.t.shape()[0], q.t.shape()[1]);
    let y = out(&gpu, &[b, lq, width], dt)?;
    if b * lq == 0 {
        return Ok(Some(y));
    }
    let blocks = [q, k, v].map(|c| (c.t, c.start, c.t.shape()[2]));
    Ok(warpspec(&gpu, blocks, &y, (k.t.shape()[1], heads), causal)?.then_some(y))
}

/// The warp-specialised kernel of `form` ([`Flash128::warpspec_form`]) for head size `dh` (64 or
/// 128), without its dtype suffix.
pub(crate) fn flash_ws_name(dh: usize, form: &str) -> String {
    format!("flash_ws{form}{dh}")
}

/// Dynamic shared memory of the warp-specialised kernels with `groups` MMA warpgroups (2 or 3)
/// for head size `dh`: 1 KiB of alignment slack, the `64 · groups`-row Q tile and two stages of
/// 128-row K and V tiles.
pub(crate) const fn flash_ws_bytes(dh: usize, groups: usize) -> u32 {
    (1024 + (64 * groups + 4 * 128) * dh * 2) as u32
}

/// Dynamic shared memory of the Hopper kernels (plain and warp-specialised) for head size `dh`
/// (64 or 128): 1 KiB of slack to align the tiles to 1 KiB (the swizzle atoms), a 128-row Q tile
/// and two stages of 128-row K and V tiles, unpadded (wgmma's 128-byte-swizzle layout).
pub(crate) const fn flash_hopper_bytes(dh: usize) -> u32 {
    flash_ws_bytes(dh, 2)
}

/// The fused flash-attention kernel for head size 128 (Flux.1), f16/bf16. Head size 64 has one
/// kernel besides [`Flash128::Hopper`]; other head sizes and f32 take the cuBLAS path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flash128 {
    /// Q fragments in registers, one 16-row tile per warp, 64 query rows per block. Taken where
    /// the device cannot give a block 68 KiB of shared memory, or when [`set_flash128`] chooses
    /// it (`pcpp-cli`: `PCPP_FLASH128=registers-q`).
    RegistersQ,
    /// The block's 128-row Q tile in shared memory, two 16-row tiles per warp (every K/V fragment
    /// feeds two MMAs), 32-key tiles; needs 68 KiB of shared memory per block. Taken where the
    /// device cannot give a block 102 KiB (`pcpp-cli`: `PCPP_FLASH128=shared-q`).
    SharedQ,
    /// [`Flash128::SharedQ`] with 64-key tiles (FlashAttention-2's tile for head size 128 on
    /// Hopper): half the softmax rescales and barriers per key, 102 KiB of shared memory per
    /// block. The default before [`Flash128::Hopper`]: on an H200 it made the FLUX.1-dev step 4%
    /// (1024²) and 9% (2048²) faster than [`Flash128::SharedQ`] (docs/benchmarks.md).
    SharedQ64,
    /// Hopper's warpgroup MMAs (`wgmma`, sm_90a), head sizes 64 and 128: 128 query rows per block
    /// in two warpgroups, 128-key tiles, Q, K and V read by the MMAs from shared memory in the
    /// 128-byte-swizzle layout, two K/V stages (161 KiB at head size 128). The default before
    /// [`Flash128::Warpspec`]: on an H200 it made the FLUX.1-dev step 6 % (1024²) and 11 %
    /// (2048²) faster than [`Flash128::SharedQ64`] (docs/benchmarks.md). On other devices
    /// [`Flash128::SharedQ64`] and the head-size-64 kernel.
    Hopper,
    /// FlashAttention-3's warp specialisation of [`Flash128::Hopper`] (`flash_ws.cu`): a
    /// producer warpgroup loads Q, K and V with TMA into mbarrier-guarded stages while two MMA
    /// warpgroups take turns issuing their MMAs (ping-pong) and overlap each tile's softmax with
    /// the previous tile's P·V (intra-warpgroup overlap). The default: on an H200 it made the
    /// FLUX.1-dev step 8 % (1024²) and 16 % (2048²) faster than [`Flash128::Hopper`]
    /// (docs/benchmarks.md). At head size 64 it splits each head's rows between a launch of
    /// three-MMA-warpgroup blocks (192-row tiles, [`Flash128::Warpspec3`]) and one of
    /// two-warpgroup blocks where the two finish their waves first (`row_split`). Grids of more
    /// tiles than multiprocessors run persistent ([`flash_persistent`]); a band's small grids
    /// over at most [`SMALL_GRID_KEYS`] keys take the small-grid kernel instead
    /// ([`small_grid`]). Where a tensor map
    /// cannot be made, the kernels of
    /// [`Flash128::Hopper`]; off sm_90a, those of [`Flash128::SharedQ64`].
    Warpspec,
    /// [`Flash128::Warpspec`] with two MMA warpgroups at every size (the default before it took
    /// three for large head-size-64 grids).
    Warpspec2,
    /// [`Flash128::Warpspec`] with each head-size-64 grid in one tile height, three warpgroups
    /// where `three_groups_pay` (the default before `row_split` mixed the two).
    WarpspecWhole,
    /// [`Flash128::Warpspec`] with the ping-pong but without the intra-warpgroup overlap.
    WarpspecPingpong,
    /// [`Flash128::Warpspec`] with the intra-warpgroup overlap but without the ping-pong.
    WarpspecOverlap,
    /// [`Flash128::Warpspec`] with three MMA warpgroups and 192-row Q tiles for head size 64
    /// (FlashAttention-3's tile there: each K/V tile feeds 1.5 times the MMAs; the three take
    /// turns); head size 128 keeps two.
    Warpspec3,
    /// [`Flash128::Warpspec3`] without the ping-pong.
    Warpspec3Overlap,
    /// [`Flash128::Warpspec`] without the small-grid kernel: the warp-specialised grids for
    /// every attention (the default before `small_grid`).
    WarpspecNoSmall,
    /// [`Flash128::Warpspec`] with the small-grid kernel also for grids of up to two waves of
    /// 64-row tiles over up to [`SMALL_WIDE_KEYS`] keys (a band's level-1 self-attention:
    /// 1 024 queries × 10 heads over about 1 640 keys), its key tiles split between up to four
    /// groups of warps (`pcpp-cli` sets the split with the choice).
    WarpspecSmallWide,
}

impl Flash128 {
    /// The kernel-name infix of a warp-specialised choice (`""`, `"p"`, `"o"`: `flash_ws.cu`'s
    /// instances), `None` for the others.
    pub(crate) fn warpspec_form(self) -> Option<&'static str> {
        match self {
            Flash128::Warpspec => Some(""),
            Flash128::Warpspec2 => Some("2w"),
            Flash128::WarpspecWhole => Some(""),
            Flash128::WarpspecPingpong => Some("p"),
            Flash128::WarpspecOverlap => Some("o"),
            Flash128::Warpspec3 => Some("3w"),
            Flash128::Warpspec3Overlap => Some("3wo"),
            Flash128::WarpspecNoSmall => Some(""),
            Flash128::WarpspecSmallWide => Some(""),
            _ => None,
        }
    }
}

static FLASH128: AtomicU8 = AtomicU8::new(5);

/// The head-size-128 kernel in use ([`Flash128::Warpspec`] unless [`set_flash128`] chose).
pub fn flash128() -> Flash128 {
    match FLASH128.load(Ordering::Relaxed) {
        1 => Flash128::RegistersQ,
        2 => Flash128::SharedQ,
        3 => Flash128::SharedQ64,
        4 => Flash128::Hopper,
        6 => Flash128::WarpspecPingpong,
        7 => Flash128::WarpspecOverlap,
        8 => Flash128::Warpspec3,
        9 => Flash128::Warpspec3Overlap,
        10 => Flash128::Warpspec2,
        11 => Flash128::WarpspecWhole,
        12 => Flash128::WarpspecNoSmall,
        13 => Flash128::WarpspecSmallWide,
        _ => Flash128::Warpspec,
    }
}

/// Chooses the head-size-128 flash-attention kernel for this process.
pub fn set_flash128(v: Flash128) {
    let code = match v {
        Flash128::RegistersQ => 1,
        Flash128::SharedQ => 2,
        Flash128::SharedQ64 => 3,
        Flash128::Hopper => 4,
        Flash128::Warpspec => 5,
        Flash128::WarpspecPingpong => 6,
        Flash128::WarpspecOverlap => 7,
        Flash128::Warpspec3 => 8,
        Flash128::Warpspec3Overlap => 9,
        Flash128::Warpspec2 => 10,
        Flash128::WarpspecWhole => 11,
        Flash128::WarpspecNoSmall => 12,
        Flash128::WarpspecSmallWide => 13,
    };
    FLASH128.store(code, Ordering::Relaxed);
}

/// The unfused path: head sizes without a fused kernel, and f32.
fn attention_chunked(
    gpu: &Arc<Gpu>,
    (q, k, v, y): (&Tensor, &Tensor, &Tensor, &Tensor),
    (b, lq, lk, heads): (usize, usize, usize, usize),
    causal: bool,
) -> Result<()> {
    let dt = q.dtype();
    let dm = q.shape()[2];
    let dh = dm / heads;
    let es = dt.size() as u64;
    let qc = (ATTN_SCORE_BYTES / (heads * lk * 4)).clamp(1, lq);
    // SAFETY: fully written by the score GEMM before the softmax reads it.
    let s =
        unsafe { gpu.stream.alloc::<f32>(heads * qc * lk) }.map_err(|e| gpu.err("scores", e))?;
    let p = gpu.alloc(dt, heads * qc * lk)?;
    let sp = {
        let (a, _s) = cudarc::driver::DevicePtr::device_ptr(&s, &gpu.stream);
        a
    };
    let pp = p.ptr();
    let scale = 1.0 / (dh as f32).sqrt();
    let (qp, kp, vp, yp) = (ptr(q)?, ptr(k)?, ptr(v)?, ptr(y)?);
    for bi in 0..b {
        let mut q0 = 0;
        while q0 < lq {
            let n = qc.min(lq - q0);
            let qoff = qp + ((bi * lq + q0) * dm) as u64 * es;
            let koff = kp + (bi * lk * dm) as u64 * es;
            let voff = vp + (bi * lk * dm) as u64 * es;
            let yoff = yp + ((bi * lq + q0) * dm) as u64 * es;
            gemm_batched(
                gpu,
                (true, false),
                (lk, n, dh),
                scale,
                (koff, dm, dh),
                (qoff, dm, dh),
                (sp, lk, n * lk),
                heads,
                dt,
                DType::F32,
            )?;
            launch!(gpu, format!("softmax_{}", tname(dt)), cfg_rows(heads * n, 256);
                sp, pp, lk as i64, causal as i32, q0 as i64, n as i64);
            gemm_batched(
                gpu,
                (false, false),
                (dh, n, lk),
                1.0,
                (voff, dm, dh),
                (pp, lk, n * lk),
                (yoff, dm, dh),
                heads,
                dt,
                dt,
            )?;
            q0 += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{row_split, small_grid, small_split_groups, three_groups_pay, Flash128};

    #[test]
    fn small_grid_key_splits_give_every_group_a_tile() {
        // A band's window (7 tiles), its text tokens (2), one tile.
        assert_eq!(small_split_groups(410, 4), 4);
        assert_eq!(small_split_groups(77, 4), 2);
        assert_eq!(small_split_groups(64, 4), 1);
        assert_eq!(small_split_groups(65, 4), 2);
        assert_eq!(small_split_groups(192, 4), 2);
        assert_eq!(small_split_groups(256, 4), 4);
        // Fewer allowed (the setting or the device).
        assert_eq!(small_split_groups(410, 2), 2);
        assert_eq!(small_split_groups(410, 3), 2);
        assert_eq!(small_split_groups(410, 1), 1);
        assert_eq!(small_split_groups(0, 4), 1);
    }

    /// The attentions that the small-grid kernel takes on a 132-multiprocessor GPU: a band's
    /// over few keys, never a whole image's, head size 64 only, and only by default.
    #[test]
    fn small_grids_are_a_bands_short_attentions() {
        let ws = Flash128::Warpspec;
        // SDXL's 32-row band at 1024²: level 2 (256 queries × 20 heads over its window of about
        // 410 keys, and the 77 text tokens: 80 blocks), but not level 1 (1 024 × 10: 160
        // blocks), whatever its keys.
        assert!(small_grid(ws, (1, 256, 410, 20, 64), 132));
        assert!(small_grid(ws, (1, 256, 77, 20, 64), 132));
        assert!(!small_grid(ws, (1, 1024, 1640, 10, 64), 132));
        assert!(!small_grid(ws, (1, 1024, 77, 10, 64), 132));
        assert!(small_grid(ws, (1, 256, 512, 20, 64), 132));
        assert!(!small_grid(ws, (1, 256, 513, 20, 64), 132));
        // Whole images: 512², b = 2, level 2 (256 × 20 × 2: 160 blocks); 1024², b = 2, level 2.
        assert!(!small_grid(ws, (2, 256, 256, 20, 64), 132));
        assert!(!small_grid(ws, (2, 1024, 77, 20, 64), 132));
        // Up to a wave of 64-row tiles (130 tiles, then 132).
        assert!(small_grid(ws, (1, 64 * 65, 256, 2, 64), 132));
        assert!(!small_grid(ws, (1, 64 * 65 + 1, 256, 2, 64), 132));
        // Head size 128 (Flux.1), and the other choices.
        assert!(!small_grid(ws, (1, 256, 410, 24, 128), 132));
        assert!(!small_grid(
            Flash128::WarpspecNoSmall,
            (1, 256, 410, 20, 64),
            132
        ));
        assert!(!small_grid(
            Flash128::WarpspecWhole,
            (1, 256, 410, 20, 64),
            132
        ));
        // The wide choice: level 1 of the band too (160 tiles over 1 640 keys), not a whole
        // 1024² image's level 1 (1 024 tiles) nor more than 2 048 keys.
        let wide = Flash128::WarpspecSmallWide;
        assert!(small_grid(wide, (1, 256, 410, 20, 64), 132));
        assert!(small_grid(wide, (1, 1024, 1640, 10, 64), 132));
        assert!(!small_grid(wide, (2, 4096, 4096, 10, 64), 132));
        assert!(!small_grid(wide, (1, 1024, 2049, 10, 64), 132));
        assert!(!small_grid(wide, (1, 1024, 1640, 10, 128), 132));
    }

    /// The rows of SDXL's self-attentions on a 132-multiprocessor GPU that go to 192-row tiles
    /// before the rest take 128-row tiles.
    #[test]
    fn rows_split_where_two_launches_finish_first() {
        // 2048², level 1: 16 384 × 10 in six full waves of 192-row blocks (15 168 rows per
        // head, 790 blocks) and one wave of 128-row blocks: 8.9 units against 9.1 for seven
        // waves of 192-row blocks and 10 for 128-row ones.
        assert_eq!(row_split(10, 16_384, 16_384, 132), 15_168);
        // Its cross-attention (77 keys): one launch of 192-row blocks.
        assert_eq!(row_split(10, 16_384, 77, 132), 16_384);
        // 2048², level 2 (and 1024², b = 2, level 1): 4 096 × 20 would split (4.7 units
        // against 5.0 for five waves of 128-row blocks) over 8 192 keys, but not over its own
        // 4 096.
        assert_eq!(row_split(20, 4096, 8192, 132), 13 * 192);
        assert_eq!(row_split(20, 4096, 4096, 132), 0);
        // 1024², b = 2, level 2: all 192-row blocks (two waves).
        assert_eq!(row_split(40, 1024, 1024, 132), 1024);
        // A 32-row band's levels: one wave of 128-row blocks.
        assert_eq!(row_split(10, 1024, 16_384, 132), 0);
        assert_eq!(row_split(20, 256, 16_384, 132), 0);
        // Nothing to attend.
        assert_eq!(row_split(0, 0, 16_384, 132), 0);
    }

    /// SDXL's self-attentions on a 132-multiprocessor GPU: three warpgroups where the last wave
    /// of 192-row blocks is full enough, two where it is mostly idle or the grid is a band's.
    #[test]
    fn three_warpgroups_where_their_waves_finish_first() {
        // 2048², level 1: 16 384 queries × 10 heads, 6.5 waves of 192-row blocks against 9.7.
        assert!(three_groups_pay(10, 16_384, 132));
        // 2048², level 2 (and 1024², b = 2, level 1): 4 096 × 20, 3.3 waves in 4 against 4.85
        // in 5.
        assert!(!three_groups_pay(20, 4096, 132));
        // 1024², b = 2, level 2: 1 024 × 40, 1.8 waves in 2 against 2.4 in 3.
        assert!(three_groups_pay(40, 1024, 132));
        // A 32-row band's levels: one wave either way, so the smaller tiles.
        assert!(!three_groups_pay(10, 1024, 132));
        assert!(!three_groups_pay(20, 256, 132));
        // Nothing to attend.
        assert!(!three_groups_pay(0, 0, 132));
    }
}
