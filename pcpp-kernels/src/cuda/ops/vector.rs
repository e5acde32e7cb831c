//! Vectorised element-wise kernels and one-warp-per-row norms (`vector.cu`, "vectorised
//! element-wise kernels and row norms"): 16-byte loads and stores (8 halves or 4 floats per
//! access) where every pointer is 16-byte aligned and the extent is a multiple of the vector, a
//! division-free kernel for the row broadcasts of AdaLN modulation and gates (`[P, R, C]` against
//! `[P, 1, C]`), and layer / RMS norms with one warp per row instead of one block per row (Flux's
//! per-head QK norms have rows of 128). They compute what the scalar kernels compute, in f32.
//!
//! On by default (on an H200 they made the FLUX.1-dev 1024² step 1.5× and the SDXL 1024² b = 2
//! UNet step 1.1× faster, docs/benchmarks.md); [`set_vector_kernels`] turns them off for the
//! process (`pcpp-cli`: `PCPP_VECTOR_KERNELS=0`). Each `try_*` returns whether it launched; the
//! caller falls back to the scalar kernel when not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{DeviceRepr, LaunchConfig};

use super::{gpu_of, out, ptr, tname, Gpu, MAX_GRID_Y};
use crate::{DType, Result, Tensor};

static VECTOR: AtomicBool = AtomicBool::new(true);

/// Whether the vectorised kernels are on (on unless [`set_vector_kernels`] turned them off).
pub fn vector_kernels() -> bool {
    VECTOR.load(Ordering::Relaxed)
}

/// Turns the vectorised element-wise kernels and the one-warp-per-row norms on or off for this
/// process.
pub fn set_vector_kernels(on: bool) {
    VECTOR.store(on, Ordering::Relaxed);
}

static GEGLU_PREFETCH: AtomicBool = AtomicBool::new(true);

/// Whether a GEGLU thread takes several rows, loading the next one's vectors while it computes
/// one, where the grid has waves to spare (`geglu_row_blocks`); on unless
/// [`set_geglu_prefetch`] turned it off (then every thread takes one row; same bits).
pub fn geglu_prefetch() -> bool {
    GEGLU_PREFETCH.load(Ordering::Relaxed)
}

/// Turns the GEGLU rows' prefetch on or off for this process.
pub fn set_geglu_prefetch(on: bool) {
    GEGLU_PREFETCH.store(on, Ordering::Relaxed);
}

static NORM_REGISTERS: AtomicBool = AtomicBool::new(true);

/// Whether layer norms hold their row in registers (`row_norm_reg`, one read of the row) where it
/// fits, instead of reading it three times (`row_norm_warp`); on unless [`set_norm_registers`]
/// turned it off.
pub fn norm_registers() -> bool {
    NORM_REGISTERS.load(Ordering::Relaxed)
}

/// Turns the register-resident layer norms on or off for this process (same bits either way).
pub fn set_norm_registers(on: bool) {
    NORM_REGISTERS.store(on, Ordering::Relaxed);
}

/// The `row_norm_reg` kernel (without its dtype suffix) whose lanes hold a row of `d` elements
/// in registers: 2, 3, 5 or 12 16-byte vectors per lane; `None` when the row is longer.
fn row_norm_reg_name(dt: DType, d: usize) -> Option<&'static str> {
    let per_lane = d.div_ceil(32 * lanes(dt));
    [
        (2, "row_norm_reg2"),
        (3, "row_norm_reg3"),
        (5, "row_norm_reg5"),
        (12, "row_norm_reg12"),
    ]
    .into_iter()
    .find(|(nv, _)| per_lane <= *nv)
    .map(|(_, n)| n)
}

/// Layer norm of `rows` rows of `d` with the row in registers; with `a2`, of `a + a2` (written to
/// `s`). Returns whether it launched: the register norms on, `d` a multiple of the vector within
/// the largest kernel, and 16-byte-aligned pointers.
pub(super) fn try_row_norm_registers(
    gpu: &Arc<Gpu>,
    dt: DType,
    (a, a2, s, g, b, y): (u64, u64, u64, u64, u64, u64),
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<bool> {
    let name = match row_norm_reg_name(dt, d) {
        Some(n) if norm_registers() && vector_kernels() && d % lanes(dt) == 0 => n,
        _ => return Ok(false),
    };
    if rows == 0 || !aligned(&[a, a2, s, g, b, y]) {
        return Ok(false);
    }
    launch!(gpu, format!("{name}_{}", tname(dt)), cfg_warp_rows(rows);
        a, a2, s, g, b, y, rows as i64, d as i64, eps);
    Ok(true)
}

/// Elements per 16-byte vector.
fn lanes(dt: DType) -> usize {
    16 / dt.size()
}

fn aligned(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

fn cfg_flat(nv: usize) -> LaunchConfig {
    Gpu::cfg_elems(nv)
}

/// Blocks over `per_row` items of a row (x) and over `rows` rows (y, grid-strided past the
/// grid's limit), of [`row_block_threads`] threads each.
fn cfg_row_blocks(per_row: usize, rows: usize) -> LaunchConfig {
    let t = row_block_threads(per_row);
    LaunchConfig {
        grid_dim: (
            per_row.div_ceil(t).clamp(1, 1024) as u32,
            rows.min(MAX_GRID_Y) as u32,
            1,
        ),
        block_dim: (t as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads of a row block over `per_row` items: the multiple of 32 from 64 to 256 that leaves
/// the fewest threads without an item (the largest among equals). A block's warps that have
/// nothing to do still hold its place on the multiprocessor until the whole block ends: 256
/// threads over GEGLU's 320 vectors at SDXL's level 1 left 37.5 % of the resident warps idle,
/// and fewer loads in flight; 160 threads leave none.
fn row_block_threads(per_row: usize) -> usize {
    let n = per_row.max(1);
    (2..=8)
        .rev()
        .map(|w| 32 * w)
        .min_by_key(|&t| n.div_ceil(t) * t - n)
        .unwrap_or(256)
}

/// One warp per row, 8 rows per block of 256 threads.
pub(super) fn cfg_warp_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `y = op(x)` (op code of `unary_op`) on `n` elements, vectorised.
pub(super) fn try_unary(
    gpu: &Arc<Gpu>,
    dt: DType,
    (x, y): (u64, u64),
    n: usize,
    (code, a, b): (i32, f32, f32),
) -> Result<bool> {
    let v = lanes(dt);
    if !vector_kernels() || n % v != 0 || !aligned(&[x, y]) {
        return Ok(false);
    }
    let nv = n / v;
    launch!(gpu, format!("unary_vec_{}", tname(dt)), cfg_flat(nv);
        x, y, nv as i64, code, a, b);
    Ok(true)
}

/// `y = a op b` on `n` elements of equal shapes, vectorised.
pub(super) fn try_binary_same(
    gpu: &Arc<Gpu>,
    dt: DType,
    (a, b, y): (u64, u64, u64),
    n: usize,
    op: i32,
) -> Result<bool> {
    let v = lanes(dt);
    if !vector_kernels() || n % v != 0 || !aligned(&[a, b, y]) {
        return Ok(false);
    }
    let nv = n / v;
    launch!(gpu, format!("binary_same_vec_{}", tname(dt)), cfg_flat(nv);
        a, b, y, nv as i64, op);
    Ok(true)
}

/// `y[p, :] = a[p, :] op v[p % vmod]` over `planes` planes of `s` elements, vectorised (the
/// per-plane broadcast of a `[b, c, 1, 1]` operand or a per-channel bias).
pub(super) fn try_plane_binary(
    gpu: &Arc<Gpu>,
    dt: DType,
    (a, v, y): (u64, u64, u64),
    (planes, s): (usize, usize),
    op: i32,
    vmod: usize,
) -> Result<bool> {
    let n = lanes(dt);
    if !vector_kernels() || s % n != 0 || !aligned(&[a, y]) || !(1..=MAX_GRID_Y).contains(&planes) {
        return Ok(false);
    }
    launch!(gpu, format!("plane_binary_vec_{}", tname(dt)), super::cfg_planes(planes, s / n);
        a, v, y, s as i64, op, vmod as i64);
    Ok(true)
}

/// Group-norm apply over `planes` planes of `s` elements (`c` channels, `groups` groups, the
/// per-(batch, group) mean and 1/σ at `mean_rstd`), vectorised.
#[allow(clippy::too_many_arguments)]
pub(super) fn try_gn_apply_planes(
    gpu: &Arc<Gpu>,
    dt: DType,
    (x, mean_rstd, gamma, beta, y): (u64, u64, u64, u64, u64),
    (planes, c, s, groups): (usize, usize, usize, usize),
    silu: bool,
) -> Result<bool> {
    let n = lanes(dt);
    if !vector_kernels() || s % n != 0 || !aligned(&[x, y]) || !(1..=MAX_GRID_Y).contains(&planes) {
        return Ok(false);
    }
    launch!(gpu, format!("gn_apply_planes_vec_{}", tname(dt)), super::cfg_planes(planes, s / n);
        x, mean_rstd, gamma, beta, y, c as i32, s as i64, groups as i32, silu as i32);
    Ok(true)
}

/// Whether the group-norm sums of groups of `group_len` elements at `x`, in chunks of `chunk`,
/// can take the vectorised kernel; its name if so.
pub(super) fn gn_sums_vec_name(
    dt: DType,
    x: u64,
    group_len: usize,
    chunk: usize,
) -> Option<String> {
    let n = lanes(dt);
    (vector_kernels() && group_len % n == 0 && chunk % n == 0 && aligned(&[x]))
        .then(|| format!("gn_sums_vec_{}", tname(dt)))
}

/// `(rows, rows per broadcast row, cols)` when `full` (strides `sf`) is contiguous over `out`
/// and `bc` (strides `sbc`) is a contiguous `[P, C]` broadcast over one run of axes: out viewed as
/// `[P, R, C]`, `bc` as `[P, 1, C]`.
pub(super) fn row_pattern(
    out: &[usize],
    sf: &[usize],
    sbc: &[usize],
) -> Option<(usize, usize, usize)> {
    let rank = out.len();
    let mut st = 1;
    for i in (0..rank).rev() {
        if out[i] > 1 && sf[i] != st {
            return None;
        }
        st *= out[i];
    }
    let zero = |i: usize| out[i] > 1 && sbc[i] == 0;
    let z0 = (0..rank).find(|&i| zero(i))?;
    let z1 = (0..rank).rev().find(|&i| zero(i))?;
    if (z0..=z1).any(|i| out[i] > 1 && sbc[i] != 0) {
        return None;
    }
    let cols: usize = out[z1 + 1..].iter().product();
    let rpp: usize = out[z0..=z1].iter().product();
    let p: usize = out[..z0].iter().product();
    let mut st = 1;
    for i in (z1 + 1..rank).rev() {
        if out[i] > 1 && sbc[i] != st {
            return None;
        }
        st *= out[i];
    }
    let mut st = cols;
    for i in (0..z0).rev() {
        if out[i] > 1 && sbc[i] != st {
            return None;
        }
        st *= out[i];
    }
    Some((p * rpp, rpp, cols))
}

/// `y = full op bc` (or `bc op full` with `bleft`) for a row broadcast `(rows, rpp, cols)` of
/// [`row_pattern`]. Rows shorter than a warp stay with the general kernel.
#[allow(clippy::too_many_arguments)]
pub(super) fn try_row_broadcast(
    gpu: &Arc<Gpu>,
    dt: DType,
    (full, bc, y): (u64, u64, u64),
    (rows, rpp, cols): (usize, usize, usize),
    op: i32,
    bleft: bool,
) -> Result<bool> {
    if !vector_kernels() || cols < 32 || rows == 0 {
        return Ok(false);
    }
    let v = lanes(dt);
    let vec = cols % v == 0 && aligned(&[full, bc, y]);
    let per_row = if vec { cols / v } else { cols };
    let cfg = cfg_row_blocks(per_row, rows);
    launch!(gpu, format!("rowb_binary_{}", tname(dt)), cfg;
        full, bc, y, rows as i64, rpp as i64, cols as i64, op, bleft as i32, vec as i32);
    Ok(true)
}

/// GEGLU of `rows` rows of `[h | gate]` into `[rows, h]`, vectorised.
pub(super) fn try_geglu(
    gpu: &Arc<Gpu>,
    dt: DType,
    (x, y): (u64, u64),
    rows: usize,
    h: usize,
) -> Result<bool> {
    let v = lanes(dt);
    if !vector_kernels() || h % v != 0 || !aligned(&[x, y]) {
        return Ok(false);
    }
    let mut cfg = cfg_row_blocks(h / v, rows);
    if geglu_prefetch() {
        let row_threads = (cfg.grid_dim.0 * cfg.block_dim.0) as usize;
        cfg.grid_dim.1 = geglu_row_blocks(row_threads, rows, gpu.sms) as u32;
    }
    launch!(gpu, format!("geglu_vec_{}", tname(dt)), cfg;
        x, y, rows as i64, h as i64);
    Ok(true)
}

/// Most rows a GEGLU thread takes (each loading its next row's vectors while it computes one).
const GEGLU_ROWS: usize = 4;

/// The GEGLU grid's blocks along the rows (`row_threads`: the threads across one row): one row
/// each (no prefetch) where the grid would otherwise take fewer than two waves of 2 048 threads
/// per multiprocessor (a band's few rows keep every block), up to [`GEGLU_ROWS`] rows per thread
/// where it has waves to spare.
fn geglu_row_blocks(row_threads: usize, rows: usize, sms: usize) -> usize {
    let per_thread = (row_threads * rows / (2 * 2048 * sms.max(1))).clamp(1, GEGLU_ROWS);
    rows.div_ceil(per_thread).min(MAX_GRID_Y)
}

/// Layer norm (`mean_too`) or RMS norm over rows of `d`, one warp per row; `g`, `b`: 0 when
/// absent.
#[allow(clippy::too_many_arguments)]
pub(super) fn try_row_norm(
    gpu: &Arc<Gpu>,
    dt: DType,
    (x, g, b, y): (u64, u64, u64, u64),
    rows: usize,
    d: usize,
    eps: f32,
    mean_too: bool,
) -> Result<bool> {
    if !vector_kernels() || d > 8192 || rows == 0 {
        return Ok(false);
    }
    if mean_too && try_row_norm_registers(gpu, dt, (x, 0, 0, g, b, y), rows, d, eps)? {
        return Ok(true);
    }
    let v = lanes(dt);
    let vec = d % v == 0 && aligned(&[x, g, b, y]);
    let cfg = cfg_warp_rows(rows);
    launch!(gpu, format!("row_norm_warp_{}", tname(dt)), cfg;
        x, g, b, y, rows as i64, d as i64, eps, mean_too as i32, vec as i32, 0u64, 0u64, 1i64);
    Ok(true)
}

/// `LayerNorm(x)·(1 + scale) + shift` of `x: [b, L, d]` with `scale, shift: [b, d]`, one pass
/// ([`crate::Tensor::modulated_layer_norm`]); `None` when the vectorised kernels are off or `d` is
/// too long for one warp.
pub(crate) fn modulated_layer_norm(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    let d = *x.shape().last().unwrap_or(&0);
    let b = scale.shape()[0];
    let rows = x.numel() / d.max(1);
    if !vector_kernels() || d > 8192 || rows == 0 || b == 0 || rows % b != 0 {
        return Ok(None);
    }
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let y = out(&gpu, x.shape(), dt)?;
    let (xp, sp, tp, yp) = (ptr(x)?, ptr(scale)?, ptr(shift)?, ptr(&y)?);
    let vec = d % lanes(dt) == 0 && aligned(&[xp, sp, tp, yp]);
    let cfg = cfg_warp_rows(rows);
    launch!(gpu, format!("row_norm_warp_{}", tname(dt)), cfg;
        xp, 0u64, 0u64, yp, rows as i64, d as i64, eps as f32, 1i32, vec as i32, sp, tp,
        (rows / b) as i64);
    Ok(Some(y))
}

/// `x + gate·y` of `x, y: [b, L, d]` with `gate: [b, d]`, one pass
/// ([`crate::Tensor::add_gated`]); `None` when the vectorised kernels are off.
pub(crate) fn add_gated(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Option<Tensor>> {
    let d = *x.shape().last().unwrap_or(&0);
    let b = gate.shape()[0];
    let rows = x.numel() / d.max(1);
    if !vector_kernels() || rows == 0 || b == 0 || rows % b != 0 {
        return Ok(None);
    }
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let o = out(&gpu, x.shape(), dt)?;
    let (xp, gp, yp, op) = (ptr(x)?, ptr(gate)?, ptr(y)?, ptr(&o)?);
    let v = lanes(dt);
    let vec = d % v == 0 && aligned(&[xp, gp, yp, op]);
    let per_row = if vec { d / v } else { d };
    let cfg = cfg_row_blocks(per_row, rows);
    launch!(gpu, format!("gated_add_{}", tname(dt)), cfg;
        xp, gp, yp, op, rows as i64, (rows / b) as i64, d as i64, vec as i32);
    Ok(Some(o))
}

/// [`crate::Tensor::rotate_pairs`] of `x: [b, len, heads·2·half]` with f32 `cos`, `sin` of
/// `len·half` values, one pass.
pub(crate) fn rotate_pairs(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    (b, len, heads, half): (usize, usize, usize, usize),
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let y = out(&gpu, x.shape(), dt)?;
    let (rows, pairs) = (b * len, heads * half);
    if rows * pairs == 0 {
        return Ok(y);
    }
    let cfg = cfg_row_blocks(pairs, rows);
    launch!(gpu, format!("rotate_pairs_{}", tname(dt)), cfg;
        ptr(x)?, ptr(cos)?, ptr(sin)?, ptr(&y)?, rows as i64, len as i64, pairs as i64, half as i64);
    Ok(y)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CatSrc {
    n: i32,
    src: [u64; 8],
    len: [i64; 8],
    off: [i64; 8],
}
// SAFETY: plain-old-data with the layout of `struct CatSrc` in vector.cu.
unsafe impl DeviceRepr for CatSrc {}

/// Concatenation of at most 8 inputs of `y`'s dtype along an axis with `outer` rows before it and
/// `inner` elements after it, in one launch instead of one per input; `false` when the vectorised
/// kernels are off or the inputs do not fit.
pub(super) fn try_cat(
    gpu: &Arc<Gpu>,
    ts: &[&Tensor],
    y: &Tensor,
    (outer, inner, dim): (usize, usize, usize),
) -> Result<bool> {
    let dt = y.dtype();
    if !vector_kernels() || ts.len() > 8 || ts.iter().any(|t| t.dtype() != dt) || outer == 0 {
        return Ok(false);
    }
    let es = dt.size();
    let total = y.shape()[dim] * inner * es;
    let mut bytes = Vec::with_capacity(ts.len());
    let mut ptrs = Vec::with_capacity(ts.len() + 1);
    ptrs.push(ptr(y)?);
    for t in ts {
        bytes.push(t.shape()[dim] * inner * es);
        ptrs.push(ptr(t)?);
    }
    let wide = aligned(&ptrs) && total % 16 == 0 && bytes.iter().all(|b| b % 16 == 0);
    let word = if wide { 16 } else { 2 };
    let mut c = CatSrc {
        n: ts.len() as i32,
        src: [0; 8],
        len: [0; 8],
        off: [0; 8],
    };
    let mut off = 0;
    for (i, b) in bytes.iter().enumerate() {
        c.src[i] = ptrs[i + 1];
        c.len[i] = (b / word) as i64;
        c.off[i] = (off / word) as i64;
        off += b;
    }
    let most = bytes.iter().max().copied().unwrap_or(0) / word * outer;
    if most == 0 {
        return Ok(true);
    }
    let cfg = LaunchConfig {
        grid_dim: (
            most.div_ceil(256).clamp(1, 16384) as u32,
            ts.len() as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = if wide {
        "cat_multi_u128"
    } else {
        "cat_multi_u16"
    };
    launch!(gpu, name, cfg; ptrs[0], outer as i64, (total / word) as i64, c);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::{cfg_row_blocks, geglu_row_blocks, row_block_threads, row_pattern};

    #[test]
    fn geglu_threads_take_several_rows_only_with_waves_to_spare() {
        // SDXL at 2048², 132 multiprocessors: level 2 (640 threads across 640 vectors, 4 096
        // rows) and level 1 (320, 16 384 rows) take four rows a thread.
        assert_eq!(geglu_row_blocks(640, 4096, 132), 1024);
        assert_eq!(geglu_row_blocks(320, 16384, 132), 4096);
        // 1024², b = 2, level 2: 1.31 M threads are 4.8 waves of 270 336: two rows a thread.
        assert_eq!(geglu_row_blocks(640, 2048, 132), 1024);
        // A 32-row band's 256 rows keep a block each; so does a small GPU's short grid.
        assert_eq!(geglu_row_blocks(640, 256, 132), 256);
        assert_eq!(geglu_row_blocks(256, 10, 1), 10);
        // Rows that four do not divide: the last block's threads take fewer.
        assert_eq!(geglu_row_blocks(256, 80001, 132), 20001);
    }

    #[test]
    fn row_blocks_leave_fewest_threads_idle() {
        // GEGLU at SDXL's levels 1 and 2: 320 and 640 vectors a row.
        assert_eq!(row_block_threads(320), 160);
        assert_eq!(row_block_threads(640), 160);
        // Multiples of 256 keep 256; a short row takes the smallest block that holds it.
        assert_eq!(row_block_threads(512), 256);
        assert_eq!(row_block_threads(40), 64);
        assert_eq!(row_block_threads(0), 64);
        let cfg = cfg_row_blocks(320, 7);
        assert_eq!((cfg.grid_dim, cfg.block_dim.0), ((2, 7, 1), 160));
    }

    #[test]
    fn row_pattern_finds_adaln_broadcasts_and_nothing_else() {
        // [2, 6, 8] against [2, 1, 8]
        assert_eq!(
            row_pattern(&[2, 6, 8], &[48, 8, 1], &[8, 0, 1]),
            Some((12, 6, 8))
        );
        // [6, 8] against [8]: one broadcast row
        assert_eq!(row_pattern(&[6, 8], &[8, 1], &[0, 1]), Some((6, 6, 8)));
        // [2, 3, 4, 8] against [2, 1, 1, 8]
        assert_eq!(
            row_pattern(&[2, 3, 4, 8], &[96, 32, 8, 1], &[8, 0, 0, 1]),
            Some((24, 12, 8))
        );
        // size-1 axes anywhere are ignored
        assert_eq!(
            row_pattern(&[1, 6, 1, 8], &[48, 8, 8, 1], &[8, 0, 8, 1]),
            Some((6, 6, 8))
        );
        // two separate broadcast runs: not a row broadcast
        assert_eq!(row_pattern(&[2, 3, 4], &[12, 4, 1], &[0, 1, 0]), None);
        // the full operand not contiguous
        assert_eq!(row_pattern(&[2, 6, 8], &[8, 16, 1], &[8, 0, 1]), None);
        // the broadcast operand not a contiguous [P, C]
        assert_eq!(row_pattern(&[2, 6, 8], &[48, 8, 1], &[1, 0, 2]), None);
        // nothing broadcast
        assert_eq!(row_pattern(&[2, 6, 8], &[48, 8, 1], &[48, 8, 1]), None);
    }
}
