//! The CPU twin: f32 kernels on plain slices. This is the numerical specification of every op; a
//! GPU kernel is tested against the function of the same name here.
//!
//! GEMM goes through the `gemm` crate (blocked, SIMD, multi-threaded with rayon); convolution is
//! im2col + GEMM; attention is blocked over query rows so the score matrix never exceeds a block.
//! Reductions that decide numerics (group-norm statistics) accumulate in f64.

mod attention;
pub mod profile;
pub mod vecmath;

pub use attention::attention;

use gemm::Parallelism;
use profile::Kernel;
use rayon::prelude::*;

/// Work below this many multiply-adds runs on one thread (thread start-up costs more than it saves).
const PAR_GEMM_FLOPS: usize = 1 << 18;
/// Element-wise work below this many elements runs on one thread.
const PAR_ELEMS: usize = 1 << 15;

/// `c = (accumulate ? c : 0) + a·b` for strided row/column-major operands.
///
/// Strides are in elements: `a[i][p] = a[i·a_rs + p·a_cs]`, etc.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
) {
    let _p = profile::scope(Kernel::Gemm);
    gemm_raw(
        m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, c, c_rs, c_cs, accumulate, true,
    );
}

/// [`gemm`] without its own profiling scope (for kernels built on it); `allow_par = false` keeps it
/// on the calling thread (inside work that is already parallel).
#[allow(clippy::too_many_arguments)]
fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
    allow_par: bool,
) {
    profile::count_gemm(m, n, k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * c_rs + j * c_cs] = 0.0;
                }
            }
        }
        return;
    }
    // Bounds: the largest index each operand is read or written at must be inside its slice.
    assert!(
        (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "gemm: lhs too short"
    );
    assert!(
        (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
        "gemm: rhs too short"
    );
    assert!(
        (m - 1) * c_rs + (n - 1) * c_cs < c.len(),
        "gemm: dst too short"
    );
    let par = if allow_par && m * n * k >= PAR_GEMM_FLOPS && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above guarantee every element addressed by (m, n, k) and the strides lies
    // inside the slices; `c` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `y[r, :] = x[r, :] · wᵀ + bias` with `x: [rows, k]`, `w: [n, k]` (PyTorch `Linear` layout).
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    let _p = profile::scope(Kernel::Linear);
    let mut y = match bias {
        Some(b) => {
            let mut y = Vec::with_capacity(rows * n);
            for _ in 0..rows {
                y.extend_from_slice(b);
            }
            y
        }
        None => vec![0.0; rows * n],
    };
    gemm_raw(
        rows,
        n,
        k,
        x,
        k,
        1,
        w,
        1,
        k,
        &mut y,
        n,
        1,
        bias.is_some(),
        true,
    );
    y
}

/// 2-D convolution, NCHW, with explicit padding per side (halo convolutions pad 0 at band edges that
/// receive neighbour rows instead).
///
/// # Shapes
/// `x: [b, ci, h, w]`, `wt: [co, ci, kh, kw]` → `[b, co, ho, wo]`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &[f32],
    (b, ci, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    (co, kh, kw): (usize, usize, usize),
    bias: Option<&[f32]>,
    stride: usize,
    (pt, pb, pl, pr): (usize, usize, usize, usize),
) -> (Vec<f32>, usize, usize) {
    let _p = profile::scope(Kernel::Conv2d);
    let ho = (h + pt + pb - kh) / stride + 1;
    let wo = (w + pl + pr - kw) / stride + 1;
    let hw_o = ho * wo;
    let kk = ci * kh * kw;
    let mut out = vec![0.0f32; b * co * hw_o];
    let direct = kh == 1 && kw == 1 && stride == 1 && pt + pb + pl + pr == 0;
    let mut cols = if direct {
        Vec::new()
    } else {
        vec![0.0f32; kk * hw_o]
    };
    for bi in 0..b {
        let xb = &x[bi * ci * h * w..(bi + 1) * ci * h * w];
        let src: &[f32] = if direct {
            xb
        } else {
            let fill = |(row, col): (usize, &mut [f32])| {
                let c = row / (kh * kw);
                let ky = (row / kw) % kh;
                let kx = row % kw;
                let xc = &xb[c * h * w..(c + 1) * h * w];
                // Output columns whose input column `ox·stride + kx − pl` lies inside the image.
                let ox_lo = pl.saturating_sub(kx).div_ceil(stride).min(wo);
                let ox_hi = if w + pl > kx {
                    ((w + pl - kx - 1) / stride + 1).clamp(ox_lo, wo)
                } else {
                    ox_lo
                };
                for oy in 0..ho {
                    let iy = (oy * stride + ky) as isize - pt as isize;
                    let dst = &mut col[oy * wo..(oy + 1) * wo];
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let xrow = &xc[iy as usize * w..(iy as usize + 1) * w];
                    dst[..ox_lo].fill(0.0);
                    dst[ox_hi..].fill(0.0);
                    if ox_hi > ox_lo {
                        let ix0 = ox_lo * stride + kx - pl;
                        let inner = &mut dst[ox_lo..ox_hi];
                        if stride == 1 {
                            inner.copy_from_slice(&xrow[ix0..ix0 + inner.len()]);
                        } else {
                            for (j, d) in inner.iter_mut().enumerate() {
                                *d = xrow[ix0 + j * stride];
                            }
                        }
                    }
                }
            };
            if kk * hw_o >= PAR_ELEMS {
                cols.par_chunks_mut(hw_o).enumerate().for_each(fill);
            } else {
                cols.chunks_mut(hw_o).enumerate().for_each(fill);
            }
            &cols
        };
        let ob = &mut out[bi * co * hw_o..(bi + 1) * co * hw_o];
        if let Some(bias) = bias {
            for (o, &bv) in ob.chunks_mut(hw_o).zip(bias) {
                o.fill(bv);
            }
        }
        gemm_raw(
            co,
            hw_o,
            kk,
            wt,
            kk,
            1,
            src,
            hw_o,
            1,
            ob,
            hw_o,
            1,
            bias.is_some(),
            true,
        );
    }
    (out, ho, wo)
}

/// Per-(batch, group) sums `(Σx, Σx², count)` in f64 over `[b, c, s]` data (s = spatial size).
pub fn group_sums(x: &[f32], b: usize, c: usize, s: usize, groups: usize) -> Vec<[f64; 3]> {
    let _p = profile::scope(Kernel::GroupNorm);
    let cg = c / groups;
    let run = |idx: usize| {
        let (bi, g) = (idx / groups, idx % groups);
        let start = (bi * c + g * cg) * s;
        let seg = &x[start..start + cg * s];
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for &v in seg {
            let v = v as f64;
            s1 += v;
            s2 += v * v;
        }
        [s1, s2, (cg * s) as f64]
    };
    if b * c * s >= PAR_ELEMS {
        (0..b * groups).into_par_iter().map(run).collect()
    } else {
        (0..b * groups).map(run).collect()
    }
}

/// Element count, mean and centred sum of squares `m2 = Σ(x − mean)²` of a set of values (one
/// band of one (batch, group), or several merged), in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moments {
    /// Number of elements.
    pub n: f64,
    /// Mean (0 when `n` is 0).
    pub mean: f64,
    /// Centred sum of squares.
    pub m2: f64,
}

impl Moments {
    /// The moments of no elements, the start of a merge.
    pub const EMPTY: Moments = Moments {
        n: 0.0,
        mean: 0.0,
        m2: 0.0,
    };

    /// Moments of the union of two disjoint sets (Chan, Golub & LeVeque's pairwise update):
    /// `n = na + nb`, `d = mb − ma`, `mean = ma + d·nb/n`, `m2 = m2a + m2b + d²·na·nb/n`; `self`
    /// unchanged when `n` is 0.
    pub fn merge(self, other: Moments) -> Moments {
        let n = self.n + other.n;
        if n == 0.0 {
            return self;
        }
        let d = other.mean - self.mean;
        Moments {
            n,
            mean: self.mean + d * other.n / n,
            m2: self.m2 + other.m2 + d * d * self.n * other.n / n,
        }
    }

    /// Biased variance `m2/n` (0 when `n` is 0).
    pub fn var(self) -> f64 {
        if self.n > 0.0 {
            self.m2 / self.n
        } else {
            0.0
        }
    }

    /// `E[x²] = var + mean²`.
    pub fn ex2(self) -> f64 {
        self.var() + self.mean * self.mean
    }
}

/// `[mean, m2]` per (batch, group) from the sums of [`group_sums`], rounded to f32:
/// `mean = Σx/n`, `m2 = max(Σx² − Σx·mean, 0)` (both 0 for an empty group).
pub fn group_moments(sums: &[[f64; 3]]) -> Vec<f32> {
    sums.iter()
        .flat_map(|&[s, s2, n]| {
            if n > 0.0 {
                let mean = s / n;
                [mean as f32, (s2 - s * mean).max(0.0) as f32]
            } else {
                [0.0, 0.0]
            }
        })
        .collect()
}

/// Per-(batch, group) mean and variance merged from per-band moments (patch-parallel group norm,
/// PCPP §2.6).
///
/// `bands` is `[p, rows, 2]` (band `j`'s `(mean, m2)` per (batch, group) row, band `j` holding
/// `counts[j]` elements per row). The bands are folded in order `0..p` into [`Moments::EMPTY`] with
/// [`Moments::merge`]; the result is `(mean, m2/n)`.
///
/// With `corrected = Some((own, fresh))` (`fresh: [rows, 2]`), band `own` holds this rank's previous
/// moments and `fresh` its current ones (both of `counts[own]` elements), and the stale total is
/// corrected by this rank's change: `mean = total.mean + (fresh.mean − prev.mean)`,
/// `var = E[x²]_total + (E[x²]_fresh − E[x²]_prev) − mean²`, or `fresh.var()` where that is
/// negative.
pub fn merge_group_moments(
    bands: &[f32],
    counts: &[f64],
    rows: usize,
    corrected: Option<(usize, &[f32])>,
) -> Vec<(f64, f64)> {
    let band = |j: usize, i: usize| Moments {
        n: counts[j],
        mean: bands[(j * rows + i) * 2] as f64,
        m2: bands[(j * rows + i) * 2 + 1] as f64,
    };
    (0..rows)
        .map(|i| {
            let total = (0..counts.len()).fold(Moments::EMPTY, |t, j| t.merge(band(j, i)));
            match corrected {
                None => (total.mean, total.var()),
                Some((own, fresh)) => {
                    let prev = band(own, i);
                    let cur = Moments {
                        n: counts[own],
                        mean: fresh[i * 2] as f64,
                        m2: fresh[i * 2 + 1] as f64,
                    };
                    let mean = total.mean + (cur.mean - prev.mean);
                    let e2 = total.ex2() + (cur.ex2() - prev.ex2());
                    let var = e2 - mean * mean;
                    (mean, if var < 0.0 { cur.var() } else { var })
                }
            }
        })
        .collect()
}

/// Applies group normalisation with given per-(batch, group) mean and variance, then the per-channel
/// affine, and optionally SiLU.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_apply(
    x: &[f32],
    (b, c, s): (usize, usize, usize),
    groups: usize,
    mean_var: &[(f64, f64)],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f64,
    silu_after: bool,
) -> Vec<f32> {
    let _p = profile::scope(Kernel::GroupNorm);
    let cg = c / groups;
    let mut out = vec![0.0f32; x.len()];
    let run = |(idx, o): (usize, &mut [f32])| {
        let (bi, ch) = (idx / c, idx % c);
        let (mean, var) = mean_var[bi * groups + ch / cg];
        let rstd = 1.0 / (var.max(0.0) + eps).sqrt();
        let g = gamma.map_or(1.0, |g| g[ch] as f64);
        let bt = beta.map_or(0.0, |b| b[ch] as f64);
        let scale = (rstd * g) as f32;
        let shift = (bt - mean * rstd * g) as f32;
        let xi = &x[idx * s..(idx + 1) * s];
        for (d, &v) in o.iter_mut().zip(xi) {
            let y = v * scale + shift;
            *d = if silu_after { silu(y) } else { y };
        }
    };
    if x.len() >= PAR_ELEMS {
        out.par_chunks_mut(s.max(1)).enumerate().for_each(run);
    } else {
        out.chunks_mut(s.max(1)).enumerate().for_each(run);
    }
    let _ = b;
    out
}

/// Layer normalisation over the last axis of `[rows, d]`.
pub fn layer_norm(
    x: &[f32],
    d: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f64,
) -> Vec<f32> {
    let _p = profile::scope(Kernel::LayerNorm);
    let mut out = vec![0.0f32; x.len()];
    let run = |(r, o): (usize, &mut [f32])| {
        let xr = &x[r * d..(r + 1) * d];
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for (i, (dst, &v)) in o.iter_mut().zip(xr).enumerate() {
            let mut y = ((v as f64 - mean) * rstd) as f32;
            if let Some(g) = gamma {
                y *= g[i];
            }
            if let Some(b) = beta {
                y += b[i];
            }
            *dst = y;
        }
    };
    if x.len() >= PAR_ELEMS {
        out.par_chunks_mut(d.max(1)).enumerate().for_each(run);
    } else {
        out.chunks_mut(d.max(1)).enumerate().for_each(run);
    }
    out
}

/// RMS normalisation of rows of `d`: `x / √(mean(x²) + eps) · gamma` (PyTorch `RMSNorm`, T5's
/// `T5LayerNorm`).
pub fn rms_norm(x: &[f32], d: usize, gamma: Option<&[f32]>, eps: f64) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let run = |(r, o): (usize, &mut [f32])| {
        let xr = &x[r * d..(r + 1) * d];
        let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
        let rstd = (1.0 / (ms + eps).sqrt()) as f32;
        for (i, (dst, &v)) in o.iter_mut().zip(xr).enumerate() {
            *dst = v * rstd * gamma.map_or(1.0, |g| g[i]);
        }
    };
    if x.len() >= PAR_ELEMS {
        out.par_chunks_mut(d.max(1)).enumerate().for_each(run);
    } else {
        out.chunks_mut(d.max(1)).enumerate().for_each(run);
    }
    out
}

/// Softmax of rows of `d` (max-subtracted, f64 sums).
pub fn softmax_rows(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let run = |(r, o): (usize, &mut [f32])| {
        let xr = &x[r * d..(r + 1) * d];
        let m = xr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0.0f64;
        for (dst, &v) in o.iter_mut().zip(xr) {
            *dst = (v - m).exp();
            sum += *dst as f64;
        }
        let inv = (1.0 / sum) as f32;
        o.iter_mut().for_each(|v| *v *= inv);
    };
    if x.len() >= PAR_ELEMS {
        out.par_chunks_mut(d.max(1)).enumerate().for_each(run);
    } else {
        out.chunks_mut(d.max(1)).enumerate().for_each(run);
    }
    out
}

/// SiLU, `x·σ(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + vecmath::exp(-x))
}

/// GELU, `x·Φ(x) = ½·x·(1 + erf(x/√2))`, in f32 with erfc from Abramowitz & Stegun 7.1.26
/// (absolute error ≤ 1.5·10⁻⁷ in `1 + erf`), evaluated without cancellation for negative `x`.
#[inline]
pub fn gelu(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    // erfc(|x|/√2)
    let erfc = poly * vecmath::exp(-z * z);
    let one_plus_erf = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}

/// GELU with the tanh approximation.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    let x = x as f64;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    (0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())) as f32
}

/// CLIP's quick GELU, `x·σ(1.702x)`.
#[inline]
pub fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + (-1.702 * x).exp())
}

/// Maps `f` over `x`, in parallel for large inputs.
pub fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let _p = profile::scope(Kernel::Elementwise);
    if x.len() >= PAR_ELEMS {
        x.par_iter().map(|&v| f(v)).collect()
    } else {
        x.iter().map(|&v| f(v)).collect()
    }
}

/// Zips `a` and `b` (same length) through `f`, in parallel for large inputs.
pub fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let _p = profile::scope(Kernel::Elementwise);
    if a.len() >= PAR_ELEMS {
        a.par_iter()
            .zip(b.par_iter())
            .map(|(&x, &y)| f(x, y))
            .collect()
    } else {
        a.iter().zip(b.iter()).map(|(&x, &y)| f(x, y)).collect()
    }
}

/// Nearest-neighbour ×2 up-sampling of `[n, h, w]` planes.
pub fn upsample_nearest2x(x: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
    let _p = profile::scope(Kernel::Upsample);
    let mut out = vec![0.0f32; n * 4 * h * w];
    let run = |(p, o): (usize, &mut [f32])| {
        let xp = &x[p * h * w..(p + 1) * h * w];
        for y in 0..2 * h {
            let src = &xp[(y / 2) * w..(y / 2 + 1) * w];
            let dst = &mut o[y * 2 * w..(y + 1) * 2 * w];
            for (xx, d) in dst.iter_mut().enumerate() {
                *d = src[xx / 2];
            }
        }
    };
    if out.len() >= PAR_ELEMS {
        out.par_chunks_mut(4 * h * w).enumerate().for_each(run);
    } else {
        out.chunks_mut(4 * h * w).enumerate().for_each(run);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rms_norm_and_softmax_rows() {
        // rows [3, 4] and [0, 0]: rms 3.5355 and 0
        let y = rms_norm(&[3.0, 4.0, 0.0, 0.0], 2, Some(&[1.0, 2.0]), 0.0);
        let r = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 8.0 / r).abs() < 1e-6);
        let z = rms_norm(&[0.0, 0.0], 2, None, 1e-6);
        assert_eq!(z, [0.0, 0.0]);
        let p = softmax_rows(&[0.0, 0.0, 1000.0, 0.0], 2);
        assert!((p[0] - 0.5).abs() < 1e-7 && (p[1] - 0.5).abs() < 1e-7);
        assert!((p[2] - 1.0).abs() < 1e-7 && p[3] == 0.0);
    }

    use super::*;

    /// Direct-loop convolution in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive_conv(
        x: &[f32],
        (b, ci, h, w): (usize, usize, usize, usize),
        wt: &[f32],
        (co, kh, kw): (usize, usize, usize),
        bias: Option<&[f32]>,
        stride: usize,
        (pt, pb, pl, pr): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let ho = (h + pt + pb - kh) / stride + 1;
        let wo = (w + pl + pr - kw) / stride + 1;
        let mut out = Vec::with_capacity(b * co * ho * wo);
        for bi in 0..b {
            for o in 0..co {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = bias.map_or(0.0, |bv| bv[o] as f64);
                        for c in 0..ci {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * stride + ky) as isize - pt as isize;
                                    let ix = (ox * stride + kx) as isize - pl as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((bi * ci + c) * h + iy as usize) * w + ix as usize];
                                    let wv = wt[((o * ci + c) * kh + ky) * kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out.push(acc as f32);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = x as f64;
            let want = 0.5 * xd * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
            let got = gelu(x) as f64;
            assert!(
                (got - want).abs() <= 2e-7 * xd.abs().max(1.0),
                "gelu({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(gelu(0.0), 0.0);
    }

    #[test]
    fn conv2d_matches_direct_loops() {
        // (b, ci, h, w, co, k, stride, pads): same padding, stride 2, 1×1, asymmetric halo padding,
        // an image narrower than the kernel's reach.
        let cases = [
            (2, 3, 9, 7, 4, 3, 1, (1, 1, 1, 1)),
            (1, 2, 8, 6, 3, 3, 2, (1, 1, 1, 1)),
            (1, 2, 9, 7, 3, 3, 2, (0, 1, 0, 1)),
            (2, 5, 4, 3, 2, 1, 1, (0, 0, 0, 0)),
            (1, 2, 6, 5, 2, 3, 1, (0, 0, 1, 1)),
            (1, 1, 5, 2, 2, 3, 1, (2, 2, 2, 2)),
        ];
        for &(b, ci, h, w, co, k, stride, pads) in &cases {
            let x: Vec<f32> = (0..b * ci * h * w)
                .map(|i| ((i * 37 % 19) as f32 - 9.0) / 9.0)
                .collect();
            let wt: Vec<f32> = (0..co * ci * k * k)
                .map(|i| ((i * 11 % 7) as f32 - 3.0) / 5.0)
                .collect();
            let bias: Vec<f32> = (0..co).map(|i| i as f32 * 0.1).collect();
            let (got, _, _) = conv2d(
                &x,
                (b, ci, h, w),
                &wt,
                (co, k, k),
                Some(&bias),
                stride,
                pads,
            );
            let want = naive_conv(
                &x,
                (b, ci, h, w),
                &wt,
                (co, k, k),
                Some(&bias),
                stride,
                pads,
            );
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-5,
                    "case {:?}: {g} vs {w}",
                    (b, ci, h, w, co, k, stride, pads)
                );
            }
        }
    }
}
