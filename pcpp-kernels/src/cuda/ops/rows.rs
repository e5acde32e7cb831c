//! Writes into a row range of an existing device tensor: how the device path fills a layer's
//! persistent window (PCPP §7.1, §7.4) in place: the band's own K/V projected straight into its
//! rows of the attention's window, its own rows of a convolution's input transposed into the
//! channels-last halo window, the other bands' parts received into theirs, so that no
//! concatenation copies the whole window every step. Device only, like [`super::copy_into`]:
//! CPU tensors are immutable, and the host path builds its windows by concatenation.

use super::gemm::{lt_linear, wg_norm};
use super::{copy2d, gpu_of, ptr, transpose_pairs, PairsEpilogue};
use crate::{KernelError, LayerNormArgs, Result, RowStats, Tensor};

/// `(b, l, n)` of a `[b, l, n]` tensor, and `L` of `dst: [b, L, n]` with `row0 + l ≤ L`.
fn rows_fit(op: &'static str, src: &[usize], dst: &Tensor, row0: usize) -> Result<[usize; 4]> {
    let d = dst.shape();
    match (src, d) {
        (&[b, l, n], &[db, big, dn]) if db == b && dn == n && row0 + l <= big => Ok([b, l, n, big]),
        _ => Err(KernelError::Shape {
            op,
            lhs: src.to_vec(),
            rhs: d.to_vec(),
            detail: format!(" (rows {row0}.. of the destination)"),
        }),
    }
}

/// Every operand on one GPU: a device-path write has no CPU twin (CPU tensors are immutable).
pub(super) fn same_gpu(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    let all: Vec<Option<&Tensor>> = ts.iter().map(|t| Some(*t)).collect();
    if crate::ops::on_gpu(op, &all)? {
        return Ok(());
    }
    Err(KernelError::invalid(
        op,
        "the operands are in host memory; this in-place write takes GPU tensors only",
    ))
}

/// `x: [b, c, h, w]` fits rows `row0 .. row0 + h` of every image of the channels-last
/// `dst: [b, H, w, c]` in the same dtype.
pub(super) fn nhwc_rows_fit(op: &'static str, x: &Tensor, dst: &Tensor, row0: usize) -> Result<()> {
    let (xs, ds) = (x.shape(), dst.shape());
    let fits = x.dtype() == dst.dtype()
        && xs.len() == 4
        && ds.len() == 4
        && xs[0] == ds[0]
        && xs[1] == ds[3]
        && xs[3] == ds[2]
        && row0 + xs[2] <= ds[1];
    if fits {
        return Ok(());
    }
    Err(KernelError::Shape {
        op,
        lhs: xs.to_vec(),
        rhs: ds.to_vec(),
        detail: format!(
            " ({} rows {row0}.. of a {} destination, channels last)",
            x.dtype(),
            dst.dtype()
        ),
    })
}

/// Copies `src: [b, l, n]` into rows `row0 .. row0 + l` of every batch entry of
/// `dst: [b, L, n]` (same dtype, same GPU).
pub fn copy_rows_into(src: &Tensor, dst: &Tensor, row0: usize) -> Result<()> {
    const OP: &str = "copy_rows_into";
    same_gpu(OP, &[src, dst])?;
    if src.dtype() != dst.dtype() {
        return Err(KernelError::invalid(
            OP,
            format!("{} into {}", src.dtype(), dst.dtype()),
        ));
    }
    let [b, l, n, big] = rows_fit(OP, src.shape(), dst, row0)?;
    let gpu = gpu_of(src)?;
    copy2d(
        &gpu,
        src.dtype(),
        (ptr(src)?, 0, l * n),
        (ptr(dst)?, row0 * n, big * n),
        b,
        l * n,
    )
}

/// `x · wᵀ + bias` written into rows `row0 ..` of `dst: [b, L, n]` (`x: [b, l, k]`, `w: [n, k]`,
/// all on one GPU). With one batch entry, operands of the weight's dtype and a destination
/// offset that keeps cuBLASLt's 256-byte alignment, the GEMM stores there directly; otherwise
/// it runs into a new tensor that is then copied.
pub fn linear_rows_into(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    dst: &Tensor,
    row0: usize,
) -> Result<()> {
    const OP: &str = "linear_rows_into";
    let mut ops = vec![x, w, dst];
    ops.extend(bias);
    same_gpu(OP, &ops)?;
    let k = x.shape().last().copied().unwrap_or(0);
    if x.rank() != 3 || w.rank() != 2 || w.shape()[1] != k {
        return Err(KernelError::shape(OP, x.shape(), w.shape()));
    }
    let n = w.shape()[0];
    if let Some(bb) = bias {
        if bb.shape() != [n] {
            return Err(KernelError::shape(OP, w.shape(), bb.shape()));
        }
    }
    let out = [x.shape()[0], x.shape()[1], n];
    let [b, l, _, _] = rows_fit(OP, &out, dst, row0)?;
    let dt = w.dtype();
    let offset = (row0 * n * dt.size()) as u64;
    let direct = b == 1
        && x.dtype() == dt
        && dst.dtype() == dt
        && bias.map_or(true, |bb| bb.dtype() == dt)
        && (ptr(dst)? + offset) % 256 == 0;
    if !direct {
        return copy_rows_into(&x.linear(w, bias)?, dst, row0);
    }
    if l == 0 || n == 0 {
        return Ok(());
    }
    let gpu = gpu_of(w)?;
    let o = super::gemm_wg::WgOperands::new(x, w, bias, ptr(dst)? + offset)?;
    if super::gemm_wg::try_gemm_wg(&gpu, dt, &o, (l, k, n), false)? {
        return Ok(());
    }
    lt_linear(&gpu, dt, (o.x, o.w, o.bias, None, o.y), (l, k, n), false)
}

/// [`linear_rows_into`] of `layer_norm(x)` (`gamma`, `beta: [k]`), with the bits of
/// [`Tensor::norm_linear`]. Where `stats` describe `x` (a small-row GEMM's epilogue wrote them,
/// [`Tensor::linear_add_stats`]) and the GEMM can store in place (one batch entry, the weight's
/// dtype, a 16-byte-aligned offset), one small-row GEMM normalises `x` as it loads it and writes
/// the rows; with statistics otherwise, `norm_linear` then a copy; without, the norm and then
/// [`linear_rows_into`].
pub fn norm_linear_rows_into(
    x: &Tensor,
    norm: LayerNormArgs<'_>,
    stats: &RowStats,
    (w, bias): (&Tensor, Option<&Tensor>),
    dst: &Tensor,
    row0: usize,
) -> Result<()> {
    const OP: &str = "norm_linear_rows_into";
    let mut ops = vec![x, w, dst];
    ops.extend(bias);
    ops.extend(norm.gamma);
    ops.extend(norm.beta);
    same_gpu(OP, &ops)?;
    let k = x.shape().last().copied().unwrap_or(0);
    if x.rank() != 3 || w.rank() != 2 || w.shape()[1] != k {
        return Err(KernelError::shape(OP, x.shape(), w.shape()));
    }
    for t in [norm.gamma, norm.beta].into_iter().flatten() {
        if t.shape() != [k] {
            return Err(KernelError::shape(OP, x.shape(), t.shape()));
        }
    }
    let n = w.shape()[0];
    if let (Some(p), true) = (stats.of(x), bias.map_or(true, |bb| bb.shape() == [n])) {
        let [b, l, _, _] = rows_fit(OP, &[x.shape()[0], x.shape()[1], n], dst, row0)?;
        let dt = w.dtype();
        let offset = (row0 * n * dt.size()) as u64;
        let direct = b == 1
            && l > 0
            && dst.dtype() == dt
            && bias.map_or(true, |bb| bb.dtype() == dt)
            && (ptr(dst)? + offset) % 16 == 0;
        if direct {
            if let Some(nm) = wg_norm(x, p, (norm.gamma, norm.beta, norm.eps), w)? {
                let o = super::gemm_wg::WgOperands {
                    norm: Some(nm),
                    ..super::gemm_wg::WgOperands::new(x, w, bias, ptr(dst)? + offset)?
                };
                if super::gemm_wg::try_gemm_wg(&*gpu_of(w)?, dt, &o, (l, k, n), false)? {
                    return Ok(());
                }
            }
        }
        // The op the host path runs (so that both give the same bits), then copied.
        return copy_rows_into(&x.norm_linear(norm, stats, w, bias)?, dst, row0);
    }
    let h = x.layer_norm(norm.gamma, norm.beta, norm.eps)?;
    linear_rows_into(&h, w, bias, dst, row0)
}

/// `x: [b, c, h, w]` (NCHW) written channels-last into rows `row0 .. row0 + h` of every batch
/// entry of `dst: [b, H, w, c]` (same dtype, same GPU): one two-element transpose per batch
/// entry where the extents are even, else a permute and a copy.
pub fn nchw_rows_into_nhwc(x: &Tensor, dst: &Tensor, row0: usize) -> Result<()> {
    const OP: &str = "nchw_rows_into_nhwc";
    same_gpu(OP, &[x, dst])?;
    nhwc_rows_fit(OP, x, dst, row0)?;
    let (xs, ds) = (x.shape(), dst.shape());
    let [b, c, h, w] = [xs[0], xs[1], xs[2], xs[3]];
    let big = ds[1];
    if b * c * h * w == 0 {
        return Ok(());
    }
    let gpu = gpu_of(x)?;
    let es = x.dtype().size();
    let (xp, dp) = (ptr(x)?, ptr(dst)?);
    let pair = 2 * es as u64;
    let direct = (0..b).all(|i| {
        let off = ((i * big + row0) * w * c * es) as u64;
        (dp + off) % pair == 0 && (xp + (i * c * h * w * es) as u64) % pair == 0
    }) && c % 2 == 0
        && (h * w) % 2 == 0;
    if direct {
        for i in 0..b {
            let src = xp + (i * c * h * w * es) as u64;
            let to = dp + ((i * big + row0) * w * c * es) as u64;
            let ep = PairsEpilogue::default();
            if !transpose_pairs(&gpu, (src, to), ep, x.dtype(), (1, c, h * w))? {
                return Err(gpu.err(OP, "two-element transpose not launched"));
            }
        }
        return Ok(());
    }
    let xn = x.permute(&[0, 2, 3, 1])?.reshape(&[b, h, w * c])?;
    copy_rows_into(&xn, &dst.reshape(&[b, big, w * c])?, row0)
}
