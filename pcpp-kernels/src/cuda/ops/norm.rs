//! Group, layer and RMS norms on the GPU: group norm with device statistics, host statistics
//! (patch-parallel group norm, PCPP's exact and stale group-norm modes), or moments merged on the
//! device from per-band moments, and the row norms (one block per row; the vectorised one-warp
//! rows live in [`super::vector`]).

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

use super::{
    cast, cfg_planes, cfg_rows, gpu_of, out, pairs_fit, ptr, tname, vector, Gpu, MAX_GRID_Y,
};
use crate::{DType, GroupStats, Result, Tensor};

/// Partial `(Σx, Σx²)` per (batch, group) and chunk of the group's range, f32 block sums stored
/// as f64 in `[b·groups, chunks, 2]`: every slot is written (no zeroing, no atomics), and the
/// consumers add a group's chunks in chunk order, so the statistics are the same bits every run.
struct Sums {
    buf: CudaSlice<f64>,
    chunks: usize,
}

impl Sums {
    fn ptr(&self, gpu: &Gpu) -> u64 {
        cudarc::driver::DevicePtr::device_ptr(&self.buf, &gpu.stream).0
    }
}

/// The partial sums of `x` (`[b, c, s]`) per group and chunk of [`gn_chunk`] elements.
fn gn_sums(x: &Tensor, (b, c, s): (usize, usize, usize), groups: usize) -> Result<Sums> {
    let gpu = gpu_of(x)?;
    let bg = b * groups;
    let group_len = (c / groups) * s;
    let chunk = gn_chunk(group_len, bg, gpu.sms);
    let chunks = group_len.div_ceil(chunk).max(1);
    // SAFETY: the launch below writes every (group, chunk) slot before a consumer reads it.
    let buf = unsafe { gpu.stream.alloc::<f64>(2 * bg.max(1) * chunks) }
        .map_err(|e| gpu.err("group-norm sums", e))?;
    let sums = Sums { buf, chunks };
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, bg as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let xp = ptr(x)?;
    let name = vector::gn_sums_vec_name(x.dtype(), xp, group_len, chunk)
        .unwrap_or_else(|| format!("gn_sums_{}", tname(x.dtype())));
    launch!(gpu, name, cfg; xp, sums.ptr(&gpu), group_len as i64, chunk as i64);
    Ok(sums)
}

/// Elements of a group that one sums block adds: 8 192, or two to four times that where the grid
/// of 8 192-element chunks would take more than four blocks per multiprocessor (SDXL at 2048²:
/// 2 560 blocks of one load per thread at level 0; a block's two reductions then cost as much as
/// its loads). A band's small grids keep every block.
fn gn_chunk(group_len: usize, bg: usize, sms: usize) -> usize {
    const BASE: usize = 8192;
    let blocks = group_len.div_ceil(BASE) * bg;
    BASE * (blocks / (4 * sms.max(1))).clamp(1, 4)
}

/// Host statistics for patch-parallel group norm.
pub(crate) fn group_sums(
    x: &Tensor,
    dims: (usize, usize, usize),
    groups: usize,
) -> Result<Vec<[f64; 3]>> {
    let gpu = gpu_of(x)?;
    let sums = gn_sums(x, dims, groups)?;
    let host = gpu
        .stream
        .clone_dtoh(&sums.buf)
        .map_err(|e| gpu.err("group-norm sums download", e))?;
    let n = ((dims.1 / groups) * dims.2) as f64;
    Ok(host
        .chunks(2 * sums.chunks)
        .take(dims.0 * groups)
        .map(|g| {
            let (s, s2) = g
                .chunks(2)
                .fold((0.0, 0.0), |(a, b), p| (a + p[0], b + p[1]));
            [s, s2, n]
        })
        .collect())
}

fn gn_apply(
    x: &Tensor,
    mean_rstd: u64,
    (c, s, groups): (usize, usize, usize),
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let ((_g, gp), (_b, bp)) = (param(gamma, dt)?, param(beta, dt)?);
    let y = out(&gpu, x.shape(), dt)?;
    let n = x.numel();
    let planes = n / s.max(1);
    let ptrs = (ptr(x)?, mean_rstd, gp, bp, ptr(&y)?);
    if vector::try_gn_apply_planes(&gpu, dt, ptrs, (planes, c, s, groups), silu)? {
        return Ok(y);
    }
    if (1..=MAX_GRID_Y).contains(&planes) {
        launch!(gpu, format!("gn_apply_planes_{}", tname(dt)), cfg_planes(planes, s);
            ptr(x)?, mean_rstd, gp, bp, ptr(&y)?, c as i32, s as i64, groups as i32, silu as i32);
        return Ok(y);
    }
    launch!(gpu, format!("gn_apply_{}", tname(dt)), Gpu::cfg_elems(n);
        ptr(x)?, mean_rstd, gp, bp, ptr(&y)?, c as i64, s as i64, groups as i64, silu as i32, n as i64);
    Ok(y)
}

/// Per-(batch, group) `(mean, rstd)` as f32 on the device: [`gn_sums`] and `gn_finalize`.
fn gn_mean_rstd(
    x: &Tensor,
    dims: (usize, usize, usize),
    groups: usize,
    eps: f64,
) -> Result<CudaSlice<f32>> {
    let gpu = gpu_of(x)?;
    let (b, c, s) = dims;
    let bg = b * groups;
    let sums = gn_sums(x, dims, groups)?;
    // SAFETY: every element is written by gn_finalize before anything reads it.
    let mr = unsafe { gpu.stream.alloc::<f32>(2 * bg.max(1)) }.map_err(|e| gpu.err("alloc", e))?;
    let mp = cudarc::driver::DevicePtr::device_ptr(&mr, &gpu.stream).0;
    let n = ((c / groups) * s) as f64;
    launch!(gpu, "gn_finalize", Gpu::cfg_elems(bg);
        sums.ptr(&gpu), sums.chunks as i32, mp, bg as i32, n, eps);
    Ok(mr)
}

/// Group norm with statistics computed on the device.
pub(crate) fn group_norm(
    x: &Tensor,
    dims: (usize, usize, usize),
    groups: usize,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let mr = gn_mean_rstd(x, dims, groups, eps)?;
    let (mp, _s) = cudarc::driver::DevicePtr::device_ptr(&mr, &gpu.stream);
    gn_apply(x, mp, (dims.1, dims.2, groups), gamma, beta, silu)
}

/// [`group_norm`] written as `[b, s, c]` (NHWC) by one tiled pass (`gn_apply_nhwc`), the input
/// of an NHWC convolution; `None` where the channels or the plane are odd or the grid too large
/// (the caller then normalises and transposes).
pub(crate) fn group_norm_nhwc(
    x: &Tensor,
    dims: (usize, usize, usize),
    groups: usize,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    let (b, c, s) = dims;
    if b * c * s == 0 || !nhwc_apply_fits(x, dims, 0)? {
        return Ok(None);
    }
    let gpu = gpu_of(x)?;
    let mr = gn_mean_rstd(x, dims, groups, eps)?;
    let (mp, _s) = cudarc::driver::DevicePtr::device_ptr(&mr, &gpu.stream);
    let y = out(&gpu, &[b, s, c], x.dtype())?;
    let to = (ptr(&y)?, s * c);
    gn_apply_nhwc(&gpu, x, mp, (dims, groups), (gamma, beta), silu, to)?;
    Ok(Some(y))
}

/// Whether `gn_apply_nhwc` takes `x` (`(b, c, s)`) and an output at device address `to` (0: a
/// new tensor, aligned): even extents within its grid, pointers aligned to two elements.
fn nhwc_apply_fits(x: &Tensor, (b, c, s): (usize, usize, usize), to: u64) -> Result<bool> {
    let pair = 2 * x.dtype().size() as u64;
    Ok(pairs_fit(b, c, s) && ptr(x)? % pair == 0 && to % pair == 0)
}

/// `gn_apply_nhwc`: `x` (`[b, c, s]`) normalised with the per-(batch, group) `(mean, rstd)` at
/// `mr`, written channels-last at `to.0` with images `to.1` elements apart (a caller checked
/// [`nhwc_apply_fits`]).
fn gn_apply_nhwc(
    gpu: &Gpu,
    x: &Tensor,
    mr: u64,
    ((b, c, s), groups): ((usize, usize, usize), usize),
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    silu: bool,
    (to, image_stride): (u64, usize),
) -> Result<()> {
    let dt = x.dtype();
    let ((_g, gp), (_b, bp)) = (param(gamma, dt)?, param(beta, dt)?);
    let cfg = LaunchConfig {
        grid_dim: (s.div_ceil(64) as u32, c.div_ceil(64) as u32, b as u32),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    launch!(gpu, format!("gn_apply_nhwc_{}", tname(dt)), cfg;
        ptr(x)?, mr, gp, bp, to, c as i32, s as i64, groups as i32, silu as i32,
        image_stride as i64);
    Ok(())
}

/// Per-(batch, group) `(mean, m2)` as F32 `[b·groups, 2]`: [`gn_sums`] and the `gn_moments`
/// finalize kernel, all on the device.
pub(crate) fn group_moments(
    x: &Tensor,
    dims: (usize, usize, usize),
    groups: usize,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let (b, c, s) = dims;
    let bg = b * groups;
    let y = out(&gpu, &[bg, 2], DType::F32)?;
    if bg == 0 {
        return Ok(y);
    }
    let sums = gn_sums(x, dims, groups)?;
    let n = ((c / groups) * s) as f64;
    launch!(gpu, "gn_moments", Gpu::cfg_elems(bg);
        sums.ptr(&gpu), sums.chunks as i32, ptr(&y)?, bg as i32, n);
    Ok(y)
}

/// Element counts of the bands of [`group_norm_merged`], passed to the kernel by value (not
/// uploaded, so that the launch can be captured into a CUDA graph).
#[repr(C)]
#[derive(Clone, Copy)]
struct GnCounts {
    n: [f64; crate::ops::MAX_GN_BANDS],
}
// SAFETY: plain-old-data with the layout of `struct GnCounts` in kernels.cu.
unsafe impl DeviceRepr for GnCounts {}

/// Group norm with statistics merged on the device from per-band moments (the CPU twin is
/// [`crate::cpu::merge_group_moments`]); the caller checked shapes, dtypes, devices and `own`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_merged(
    x: &Tensor,
    (b, c, s): (usize, usize, usize),
    groups: usize,
    (bands, counts): (&Tensor, &[f64]),
    corrected: Option<(usize, &Tensor)>,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let bg = b * groups;
    let mut cn = GnCounts {
        n: [0.0; crate::ops::MAX_GN_BANDS],
    };
    cn.n[..counts.len()].copy_from_slice(counts);
    let (own, fp) = match corrected {
        Some((own, fresh)) => (own as i32, ptr(fresh)?),
        None => (-1, 0),
    };
    // SAFETY: every element is written by gn_merge before gn_apply reads it.
    let mr = unsafe { gpu.stream.alloc::<f32>(2 * bg.max(1)) }.map_err(|e| gpu.err("alloc", e))?;
    let (mp, _s) = cudarc::driver::DevicePtr::device_ptr(&mr, &gpu.stream);
    if bg > 0 {
        launch!(gpu, "gn_merge", Gpu::cfg_elems(bg);
            ptr(bands)?, fp, mp, counts.len() as i32, bg as i32, cn, own, eps);
    }
    gn_apply(x, mp, (c, s, groups), gamma, beta, silu)
}

/// A zero-filled tensor on device `ordinal` (cleared on the device's stream).
pub(crate) fn zeros(ordinal: usize, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let gpu = super::super::gpu(ordinal)?;
    let n: usize = shape.iter().product();
    Ok(Tensor::from_cuda(shape, dtype, gpu.alloc_zeroed(dtype, n)?))
}

/// Group norm with statistics given by the caller (e.g. gathered over all bands).
pub(crate) fn group_norm_with_stats(
    x: &Tensor,
    dims: (usize, usize, usize),
    stats: &GroupStats,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let mr: Vec<f32> = stats
        .mean_var()
        .iter()
        .flat_map(|&(m, v)| [m as f32, (1.0 / (v.max(0.0) + eps).sqrt()) as f32])
        .collect();
    let buf = gpu
        .stream
        .clone_htod(&mr)
        .map_err(|e| gpu.err("group-norm statistics upload", e))?;
    let (mp, _s) = cudarc::driver::DevicePtr::device_ptr(&buf, &gpu.stream);
    gn_apply(x, mp, (dims.1, dims.2, stats.groups), gamma, beta, silu)
}

pub(crate) fn layer_norm(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let d = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / d.max(1);
    let ((_g, gp), (_b, bp)) = (param(gamma, dt)?, param(beta, dt)?);
    let y = out(&gpu, x.shape(), dt)?;
    if rows > 0
        && !vector::try_row_norm(
            &gpu,
            dt,
            (ptr(x)?, gp, bp, ptr(&y)?),
            rows,
            d,
            eps as f32,
            true,
        )?
    {
        launch!(gpu, format!("layer_norm_{}", tname(dt)), cfg_rows(rows, 256);
            ptr(x)?, gp, bp, ptr(&y)?, d as i64, eps as f32);
    }
    Ok(y)
}

/// `(a + r, layer_norm(a + r))` in one launch (`add_row_norm_warp`), or `None` where the
/// vectorised kernels are off, the rows are too long for one warp, or the operands differ in
/// shape or dtype (the caller then adds and normalises). The caller checked devices and the
/// parameters' shapes.
pub(crate) fn add_layer_norm(
    a: &Tensor,
    r: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let dt = a.dtype();
    let d = *a.shape().last().unwrap_or(&1);
    let rows = a.numel() / d.max(1);
    if !vector::vector_kernels()
        || d > 8192
        || rows == 0
        || r.shape() != a.shape()
        || r.dtype() != dt
    {
        return Ok(None);
    }
    let gpu = gpu_of(a)?;
    let ((_g, gp), (_b, bp)) = (param(gamma, dt)?, param(beta, dt)?);
    let s = out(&gpu, a.shape(), dt)?;
    let y = out(&gpu, a.shape(), dt)?;
    let ptrs = [ptr(a)?, ptr(r)?, ptr(&s)?, gp, bp, ptr(&y)?];
    let p6 = (ptrs[0], ptrs[1], ptrs[2], gp, bp, ptrs[5]);
    if vector::try_row_norm_registers(&gpu, dt, p6, rows, d, eps as f32)? {
        return Ok(Some((s, y)));
    }
    let vec = d % (16 / dt.size()) == 0 && ptrs.iter().all(|p| p % 16 == 0);
    launch!(gpu, format!("add_row_norm_warp_{}", tname(dt)), vector::cfg_warp_rows(rows);
        ptrs[0], ptrs[1], ptrs[2], gp, bp, ptrs[5], rows as i64, d as i64, eps as f32, vec as i32);
    Ok(Some((s, y)))
}

pub(crate) fn rms_norm(x: &Tensor, gamma: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let dt = x.dtype();
    let d = *x.shape().last().unwrap_or(&1);
    let rows = x.numel() / d.max(1);
    let (_g, gp) = param(gamma, dt)?;
    let y = out(&gpu, x.shape(), dt)?;
    if rows > 0
        && !vector::try_row_norm(
            &gpu,
            dt,
            (ptr(x)?, gp, 0, ptr(&y)?),
            rows,
            d,
            eps as f32,
            false,
        )?
    {
        launch!(gpu, format!("rms_norm_{}", tname(dt)), cfg_rows(rows, 256);
            ptr(x)?, gp, ptr(&y)?, d as i64, eps as f32);
    }
    Ok(y)
}

/// An optional norm parameter (γ or β) in the input's dtype `dt`: the tensor to keep alive until
/// the launch and its device address (0 when absent, which the kernels read as "none").
fn param(t: Option<&Tensor>, dt: DType) -> Result<(Option<Tensor>, u64)> {
    let t = match t {
        Some(t) if t.dtype() != dt => Some(cast(t, dt)?),
        Some(t) => Some(t.clone()),
        None => None,
    };
    let p = match &t {
        Some(t) => ptr(t)?,
        None => 0,
    };
    Ok((t, p))
}

/// A statistics window of the device path (PCPP §2.6 on persistent tables, §7.4): the bands'
/// moments `bands` (F32, `[p, b·groups, 2]` in any shape of that size), their element counts,
/// this band's index `own`, and where this band's fresh moments go: row `fresh_row` of `fresh`
/// (F32 rows of `b·groups·2`). With `corrected` the statistics are corrected as
/// [`crate::Tensor::group_norm_merged`] does with `Some((own, fresh))` (then the fresh row must
/// not lie in `bands`); without, the fresh row must be band `own`'s row of `bands`.
pub struct StatsWindow<'a> {
    pub bands: &'a Tensor,
    pub counts: &'a [f64],
    pub own: usize,
    pub fresh: &'a Tensor,
    pub fresh_row: usize,
    pub corrected: bool,
}

/// [`crate::Tensor::group_norm_merged`] on a statistics window: `x`'s fresh moments computed and
/// stored in the window's fresh row in the same launch as the merge (no separate moments
/// tensor), then applied to `x` (`[b, c, h, w]`, with `gamma`, `beta` and SiLU as there).
/// Device only: the device path's windows are persistent device tensors written in place.
pub fn group_norm_merged_into(
    x: &Tensor,
    groups: usize,
    win: StatsWindow<'_>,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    const OP: &str = "group_norm_merged_into";
    let (mr, (_, c, s)) = merged_stats(OP, x, groups, &win, (gamma, beta), eps, None)?;
    let gpu = gpu_of(x)?;
    let (mp, _s) = cudarc::driver::DevicePtr::device_ptr(&mr, &gpu.stream);
    gn_apply(x, mp, (c, s, groups), gamma, beta, silu)
}

/// [`group_norm_merged_into`] written channels-last to a new `[b, h, w, c]` tensor (the tokens of
/// a transformer's input, or the input of a convolution that reads NHWC).
pub fn group_norm_merged_nhwc(
    x: &Tensor,
    groups: usize,
    win: StatsWindow<'_>,
    ab: (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let s = x.shape();
    if s.len() != 4 {
        return Err(crate::KernelError::invalid(
            "group_norm_merged_nhwc",
            format!("needs [b, c, h, w], got {s:?}"),
        ));
    }
    let y = out(&gpu_of(x)?, &[s[0], s[2], s[3], s[1]], x.dtype())?;
    group_norm_merged_into_nhwc(x, groups, win, ab, eps, silu, (&y, 0))?;
    Ok(y)
}

/// [`group_norm_merged_into`] written channels-last into rows `row0 .. row0 + h` of every image
/// of `dst: [b, H, w, c]` (same dtype, same GPU): the band's rows of a convolution's halo window
/// (`super::rows`), normalised straight into place instead of normalised and then transposed in.
pub fn group_norm_merged_into_nhwc(
    x: &Tensor,
    groups: usize,
    win: StatsWindow<'_>,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    silu: bool,
    (dst, row0): (&Tensor, usize),
) -> Result<()> {
    const OP: &str = "group_norm_merged_into_nhwc";
    super::rows::nhwc_rows_fit(OP, x, dst, row0)?;
    let (xs, ds) = (x.shape(), dst.shape());
    let (mr, (b, c, s)) = merged_stats(OP, x, groups, &win, (gamma, beta), eps, Some(dst))?;
    if b * c * s == 0 {
        return Ok(());
    }
    let gpu = gpu_of(x)?;
    let (mp, _s) = cudarc::driver::DevicePtr::device_ptr(&mr, &gpu.stream);
    let to = ptr(dst)? + (row0 * xs[3] * c * x.dtype().size()) as u64;
    if nhwc_apply_fits(x, (b, c, s), to)? {
        let to = (to, ds[1] * ds[2] * c);
        return gn_apply_nhwc(&gpu, x, mp, ((b, c, s), groups), (gamma, beta), silu, to);
    }
    let y = gn_apply(x, mp, (c, s, groups), gamma, beta, silu)?;
    super::rows::nchw_rows_into_nhwc(&y, dst, row0)
}

/// The checks of [`group_norm_merged_into`] (operands on one GPU, `also` among them) and its
/// statistics: `x`'s fresh moments stored in the window's fresh row and merged into per-(batch,
/// group) `(mean, rstd)` by one launch; returns them with `x`'s `(b, c, s)`.
fn merged_stats(
    op: &'static str,
    x: &Tensor,
    groups: usize,
    win: &StatsWindow<'_>,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    also: Option<&Tensor>,
) -> Result<(CudaSlice<f32>, (usize, usize, usize))> {
    let (b, c, s) = x.nc_s(op, groups)?;
    let rows = b * groups;
    let p = win.counts.len();
    let bad = |msg: String| Err(crate::KernelError::invalid(op, msg));
    let mut ops = vec![x, win.bands, win.fresh];
    ops.extend(gamma.into_iter().chain(beta).chain(also));
    super::rows::same_gpu(op, &ops)?;
    if p == 0 || p > crate::ops::MAX_GN_BANDS || win.own >= p {
        return bad(format!("band {} of {p} (1 to 64 bands)", win.own));
    }
    if let Some(n) = win.counts.iter().find(|n| !n.is_finite() || **n < 0.0) {
        return bad(format!(
            "band count {n} is not a finite non-negative number"
        ));
    }
    if [win.bands, win.fresh]
        .iter()
        .any(|t| t.dtype() != DType::F32)
        || win.bands.numel() != p * rows * 2
        || win.fresh.numel() < (win.fresh_row + 1) * rows * 2
    {
        return bad(format!(
            "bands {:?} {} must hold {p}×{rows}×2 f32 moments and fresh {:?} {} row {} of {rows}×2",
            win.bands.shape(),
            win.bands.dtype(),
            win.fresh.shape(),
            win.fresh.dtype(),
            win.fresh_row
        ));
    }
    x.check_group_norm_affine(op, c, gamma, beta)?;
    let gpu = gpu_of(x)?;
    let _timed = crate::cuda::profile::scope(crate::cpu::profile::Kernel::GroupNorm, x.device());
    let mut cn = GnCounts {
        n: [0.0; crate::ops::MAX_GN_BANDS],
    };
    cn.n[..p].copy_from_slice(win.counts);
    // SAFETY: every element is written by gn_merge_sums before gn_apply reads it.
    let mr =
        unsafe { gpu.stream.alloc::<f32>(2 * rows.max(1)) }.map_err(|e| gpu.err("alloc", e))?;
    if rows > 0 {
        let (mp, _s) = cudarc::driver::DevicePtr::device_ptr(&mr, &gpu.stream);
        let sums = gn_sums(x, (b, c, s), groups)?;
        let fresh = ptr(win.fresh)? + (win.fresh_row * rows * 2 * 4) as u64;
        let n = ((c / groups) * s) as f64;
        launch!(gpu, "gn_merge_sums", Gpu::cfg_elems(rows);
            sums.ptr(&gpu), sums.chunks as i32, n, ptr(win.bands)?, fresh, mp, p as i32,
            rows as i32, cn, win.own as i32, win.corrected as i32, eps);
    }
    Ok((mr, (b, c, s)))
}

#[cfg(test)]
mod tests {
    use super::gn_chunk;

    #[test]
    fn group_norm_chunks_grow_only_for_grids_of_many_waves() {
        // SDXL at 2048², 132 multiprocessors: level 0 (10 channels × 65 536 pixels a group, 32
        // groups) and level 1 (20 × 16 384).
        assert_eq!(gn_chunk(655_360, 32, 132), 32_768);
        assert_eq!(gn_chunk(327_680, 32, 132), 16_384);
        // Level 2 and a 32-row band's level 0 keep 8 192.
        assert_eq!(gn_chunk(163_840, 32, 132), 8_192);
        assert_eq!(gn_chunk(40_960, 32, 132), 8_192);
        // Never more than four times, nor less than one.
        assert_eq!(gn_chunk(1 << 30, 64, 132), 32_768);
        assert_eq!(gn_chunk(0, 0, 0), 8_192);
    }
}
