//! Layout passes on the GPU: strided 2-D copies, concatenation and narrowing, permutes (adjacent
//! axes merged, so that the image ↔ tokens transposes take the tiled kernels), and the
//! two-element transpose with its epilogue adds (a convolution's NHWC output turned back into
//! NCHW with its bias, time embedding and residual; tokens back into an image with a residual).

use std::sync::Arc;

use cudarc::driver::{DeviceRepr, LaunchConfig};

use super::{cast, gpu_of, out, ptr, rank_fits, tname, vector, word, Gpu, MAX_GRID_Y};
use crate::{DType, Result, Tensor};

/// A permute's merged shape and source strides (`struct Perm` of kernels.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct Perm {
    rank: i32,
    shape: [i64; 6],
    stride: [i64; 6],
}
// SAFETY: plain-old-data with the layout of `struct Perm` in kernels.cu.
unsafe impl DeviceRepr for Perm {}

/// Copies `rows` rows of `cols` elements between strided layouts (element offsets).
#[allow(clippy::too_many_arguments)]
pub(super) fn copy2d(
    gpu: &Gpu,
    dt: DType,
    (src, soff, spitch): (u64, usize, usize),
    (dst, doff, dpitch): (u64, usize, usize),
    rows: usize,
    cols: usize,
) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let es = dt.size() as u64;
    let (s0, d0) = (src + soff as u64 * es, dst + doff as u64 * es);
    let aligned = [
        s0,
        d0,
        (cols * dt.size()) as u64,
        (spitch * dt.size()) as u64,
        (dpitch * dt.size()) as u64,
    ]
    .iter()
    .all(|v| v % 16 == 0);
    if aligned {
        // Whole rows of 16-byte words.
        let f = 16 / dt.size();
        launch!(gpu, "copy2d_u128", Gpu::cfg_elems(rows * cols / f);
            s0, d0, rows as i64, (cols / f) as i64, (spitch / f) as i64, (dpitch / f) as i64);
        return Ok(());
    }
    // Move 16-bit words: an f32 element is two of them.
    let f = dt.size() / 2;
    launch!(gpu, "copy2d_u16", Gpu::cfg_elems(rows * cols * f);
        src + soff as u64 * es, dst + doff as u64 * es, rows as i64, (cols * f) as i64,
        (spitch * f) as i64, (dpitch * f) as i64);
    Ok(())
}

pub(crate) fn cat(ts: &[&Tensor], dim: usize, out_shape: &[usize]) -> Result<Tensor> {
    let first = ts[0];
    let gpu = gpu_of(first)?;
    let dt = first.dtype();
    let y = out(&gpu, out_shape, dt)?;
    let outer: usize = out_shape[..dim].iter().product();
    let inner: usize = out_shape[dim + 1..].iter().product();
    let total = out_shape[dim];
    if vector::try_cat(&gpu, ts, &y, (outer, inner, dim))? {
        return Ok(y);
    }
    let yp = ptr(&y)?;
    let mut off = 0;
    for t in ts {
        let t = if t.dtype() != dt {
            cast(t, dt)?
        } else {
            (*t).clone()
        };
        let len = t.shape()[dim] * inner;
        copy2d(
            &gpu,
            dt,
            (ptr(&t)?, 0, len),
            (yp, off, total * inner),
            outer,
            len,
        )?;
        off += len;
    }
    Ok(y)
}

pub(crate) fn narrow(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let size = x.shape()[dim];
    let outer: usize = x.shape()[..dim].iter().product();
    let inner: usize = x.shape()[dim + 1..].iter().product();
    let mut shape = x.shape().to_vec();
    shape[dim] = len;
    let y = out(&gpu, &shape, x.dtype())?;
    copy2d(
        &gpu,
        x.dtype(),
        (ptr(x)?, start * inner, size * inner),
        (ptr(&y)?, 0, len * inner),
        outer,
        len * inner,
    )?;
    Ok(y)
}

/// Gather with the output shape and the source stride of each output axis. Output axes that are
/// also adjacent in the source are read as one, so that `[b, c, h, w] → [b, h, w, c]` and back
/// are the tiled image ↔ tokens transposes.
pub(crate) fn permute(x: &Tensor, out_shape: &[usize], src_strides: &[usize]) -> Result<Tensor> {
    let (shape, strides) = merge_axes(out_shape, src_strides);
    let y = permute_merged(x, &shape, &strides)?;
    y.reshape(out_shape)
}

/// `(shape, source strides)` with each run of output axes that are contiguous in the source
/// (`stride[i] = stride[i + 1] · shape[i + 1]`) merged into one axis, and size-1 axes dropped; two
/// axes left get a leading axis of one matrix (so `[n, r, c] → [n, c, r]` sees every transpose).
pub(super) fn merge_axes(shape: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(shape.len());
    for (&n, &st) in shape.iter().zip(strides) {
        if n == 1 {
            continue;
        }
        match out.last_mut() {
            Some((m, ms)) if *ms == st * n => {
                *m *= n;
                *ms = st;
            }
            _ => out.push((n, st)),
        }
    }
    // A lone transpose is the batched one with one matrix.
    match out.len() {
        0 => out.push((1, 1)),
        2 => out.insert(0, (1, out[0].0 * out[1].0)),
        _ => {}
    }
    out.into_iter().unzip()
}

pub(super) fn permute_merged(
    x: &Tensor,
    out_shape: &[usize],
    src_strides: &[usize],
) -> Result<Tensor> {
    let gpu = gpu_of(x)?;
    let rank = out_shape.len();
    rank_fits("permute (cuda)", rank)?;
    let mut p = Perm {
        rank: rank as i32,
        shape: [1; 6],
        stride: [0; 6],
    };
    for i in 0..rank {
        p.shape[i] = out_shape[i] as i64;
        p.stride[i] = src_strides[i] as i64;
    }
    let y = out(&gpu, out_shape, x.dtype())?;
    let n = y.numel();
    if rank == 3 && n > 0 {
        // [n, r, c] -> [n, c, r] (image <-> tokens): a tiled transpose.
        let (c, r) = (out_shape[1], out_shape[2]);
        if src_strides == [r * c, 1, c] {
            if transpose_pairs(
                &gpu,
                (ptr(x)?, ptr(&y)?),
                PairsEpilogue::default(),
                x.dtype(),
                (out_shape[0], r, c),
            )? {
                return Ok(y);
            }
            let cfg = LaunchConfig {
                grid_dim: (
                    c.div_ceil(32) as u32,
                    r.div_ceil(32) as u32,
                    out_shape[0] as u32,
                ),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            };
            launch!(gpu, format!("transpose_{}", word(x.dtype())), cfg;
                ptr(x)?, ptr(&y)?, r as i64, c as i64);
            return Ok(y);
        }
    }
    if n > 0 {
        launch!(gpu, format!("permute_{}", word(x.dtype())), Gpu::cfg_elems(n);
            ptr(x)?, ptr(&y)?, n as i64, p);
    }
    Ok(y)
}

/// Whether [`transpose_pairs`] takes `n` matrices of `rows` × `cols` (given aligned pointers):
/// even extents within its grid.
pub(super) fn pairs_fit(n: usize, rows: usize, cols: usize) -> bool {
    rows % 2 == 0 && cols % 2 == 0 && n <= MAX_GRID_Y && rows.div_ceil(64) <= MAX_GRID_Y
}

/// What the NHWC → NCHW transpose of a convolution's output adds, in this order, each rounded
/// like the separate op: a per-channel bias `[cols]`, a per-image-and-channel `[n, cols]` term
/// (a `[b, c, 1, 1]` add) and a residual shaped like the output.
#[derive(Clone, Copy, Default)]
pub(super) struct PairsEpilogue {
    pub(super) bias: Option<u64>,
    pub(super) plane: Option<u64>,
    pub(super) res: Option<u64>,
}

/// `dst[n, cols, rows] = src[n, rows, cols]` (+ the [`PairsEpilogue`] terms where given) with
/// two elements per access, where `rows` and `cols` are even and the pointers aligned to two
/// elements; returns whether it launched.
pub(super) fn transpose_pairs(
    gpu: &Arc<Gpu>,
    (src, dst): (u64, u64),
    ep: PairsEpilogue,
    dt: DType,
    (n, rows, cols): (usize, usize, usize),
) -> Result<bool> {
    let pair = 2 * dt.size() as u64;
    let aligned = [Some(src), Some(dst), ep.res]
        .iter()
        .flatten()
        .all(|p| p % pair == 0);
    if !pairs_fit(n, rows, cols) || !aligned {
        return Ok(false);
    }
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(64) as u32, rows.div_ceil(64) as u32, n as u32),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    launch!(gpu, format!("transpose_pairs_{}", tname(dt)), cfg;
        src, dst, rows as i64, cols as i64, ep.bias.unwrap_or(0), ep.plane.unwrap_or(0),
        ep.res.unwrap_or(0));
    Ok(true)
}

/// `residual + t` with the tokens `t: [b, s, c]` turned back into an image `[b, c, s]` in the
/// same pass (a transpose with the residual in its epilogue), or `None` where the two-element
/// transpose does not take the shape or the dtypes differ (the caller then composes the ops).
pub(crate) fn tokens_to_image_add(t: &Tensor, residual: &Tensor) -> Result<Option<Tensor>> {
    let (b, s, c) = (t.shape()[0], t.shape()[1], t.shape()[2]);
    let dt = t.dtype();
    if residual.dtype() != dt || b * s * c == 0 {
        return Ok(None);
    }
    let gpu = gpu_of(t)?;
    let y = out(&gpu, &[b, c, s], dt)?;
    let ep = PairsEpilogue {
        res: Some(ptr(residual)?),
        ..PairsEpilogue::default()
    };
    Ok(transpose_pairs(&gpu, (ptr(t)?, ptr(&y)?), ep, dt, (b, s, c))?.then_some(y))
}

#[cfg(test)]
mod tests {
    use super::merge_axes;

    #[test]
    fn permutes_merge_the_axes_that_stay_together() {
        // [2, 3, 4, 5] → [2, 4, 5, 3] (NCHW → NHWC): the tokens transpose [2, 20, 3] of [2, 3, 20].
        assert_eq!(
            merge_axes(&[2, 4, 5, 3], &[60, 5, 1, 20]),
            (vec![2, 20, 3], vec![60, 1, 20])
        );
        // And back, [2, 4, 5, 3] → [2, 3, 4, 5].
        assert_eq!(
            merge_axes(&[2, 3, 4, 5], &[60, 1, 15, 3]),
            (vec![2, 3, 20], vec![60, 1, 3])
        );
        // One image: a plain transpose, given a batch of one.
        assert_eq!(
            merge_axes(&[1, 4, 5, 3], &[60, 5, 1, 20]),
            (vec![1, 20, 3], vec![60, 1, 20])
        );
        // Nothing merges in a reversal, and an identity is one axis.
        assert_eq!(
            merge_axes(&[4, 3, 2], &[1, 4, 12]),
            (vec![4, 3, 2], vec![1, 4, 12])
        );
        assert_eq!(merge_axes(&[2, 3], &[3, 1]), (vec![6], vec![1]));
        assert_eq!(merge_axes(&[1, 1], &[1, 1]), (vec![1], vec![1]));
    }
}
