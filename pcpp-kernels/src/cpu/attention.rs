//! Multi-head softmax attention on the CPU (the inner math of the self- and cross-attention layers
//! of PCPP §2.5; the patch-parallel wrappers in pcpp-core call it on their local queries and
//! gathered keys).
//!
//! K (and V for small heads) are first repacked per (batch, head) into contiguous transposed
//! planes, then query rows are processed in blocks, in parallel over (batch, block): each block
//! owns a contiguous slice of the output, so results are written in place. Small heads
//! (`dh ≤ SMALL_HEAD`, e.g. the tiny test models) use a direct row kernel (scores by `axpy` over
//! the head dimension, vectorised softmax, output by dot products); larger heads use two GEMMs
//! per block. The score buffer never exceeds `BLOCK × keys`.

use rayon::prelude::*;

use super::profile::{self, Kernel};
use super::{gemm_raw, vecmath, PAR_GEMM_FLOPS};

/// Query rows per block (the unit of parallel work).
const BLOCK: usize = 64;
/// Head sizes up to this use the direct row kernel instead of GEMMs.
const SMALL_HEAD: usize = 16;

/// Multi-head scaled-dot-product attention with scale `1/√dh`.
///
/// # Shapes
/// `q: [b, lq, heads·dh]`, `k, v: [b, lk, heads·dh]` → `[b, lq, heads·dh]`. With `causal`, query `i`
/// sees keys `0..=i` (CLIP's text encoder).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    dh: usize,
    causal: bool,
) -> Vec<f32> {
    let _p = profile::scope(Kernel::Attention);
    let dm = heads * dh;
    let mut out = vec![0.0f32; b * lq * dm];
    if out.is_empty() || lk == 0 {
        return out;
    }
    let scale = 1.0 / (dh as f32).sqrt();
    let small = dh <= SMALL_HEAD;
    // Scores cost about as much as a multiply-add per head component plus an `exp`.
    let work = b * heads * lq * lk * (dh + 8);
    let parallel = work >= PAR_GEMM_FLOPS && rayon::current_num_threads() > 1;
    // [b·heads, dh, lk]: plane (bi, h) holds row d = component d of every key (or value).
    let transpose = |x: &[f32]| -> Vec<f32> {
        let mut t = vec![0.0f32; b * heads * dh * lk];
        let fill = |(bh, plane): (usize, &mut [f32])| {
            let (bi, h) = (bh / heads, bh % heads);
            for j in 0..lk {
                let src = &x[(bi * lk + j) * dm + h * dh..][..dh];
                for (d, &val) in src.iter().enumerate() {
                    plane[d * lk + j] = val;
                }
            }
        };
        if parallel {
            t.par_chunks_mut(dh * lk).enumerate().for_each(fill);
        } else {
            t.chunks_mut(dh * lk).enumerate().for_each(fill);
        }
        t
    };
    let kt = transpose(k);
    let vt = if small { transpose(v) } else { Vec::new() };
    if small {
        // the two products of the direct kernel, as GEMMs would count them
        profile::count_gemm(b * heads * lq, lk, dh);
        profile::count_gemm(b * heads * lq, dh, lk);
    }

    let run = |bi: usize, blk: usize, o: &mut [f32]| {
        let r0 = blk * BLOCK;
        let rows = o.len() / dm;
        if small {
            let mut s = vec![0.0f32; lk];
            for h in 0..heads {
                let plane = (bi * heads + h) * dh * lk;
                let (kp, vp) = (&kt[plane..plane + dh * lk], &vt[plane..plane + dh * lk]);
                for i in 0..rows {
                    let limit = if causal { (r0 + i + 1).min(lk) } else { lk };
                    let s = &mut s[..limit];
                    let qrow = &q[(bi * lq + r0 + i) * dm + h * dh..][..dh];
                    s.fill(0.0);
                    for (d, &qd) in qrow.iter().enumerate() {
                        vecmath::axpy(qd, &kp[d * lk..d * lk + limit], s);
                    }
                    let inv = 1.0 / vecmath::exp_shifted_in_place(s, scale);
                    let orow = &mut o[i * dm + h * dh..][..dh];
                    for (d, od) in orow.iter_mut().enumerate() {
                        *od = vecmath::dot(s, &vp[d * lk..d * lk + limit]) * inv;
                    }
                }
            }
        } else {
            let mut s = vec![0.0f32; rows * lk];
            for h in 0..heads {
                let plane = (bi * heads + h) * dh * lk;
                let qo = (bi * lq + r0) * dm + h * dh;
                gemm_raw(
                    rows,
                    lk,
                    dh,
                    &q[qo..],
                    dm,
                    1,
                    &kt[plane..],
                    lk,
                    1,
                    &mut s,
                    lk,
                    1,
                    false,
                    false,
                );
                for (i, row) in s.chunks_mut(lk).enumerate() {
                    let limit = if causal { (r0 + i + 1).min(lk) } else { lk };
                    vecmath::softmax_in_place(&mut row[..limit], scale);
                    row[limit..].fill(0.0);
                }
                gemm_raw(
                    rows,
                    dh,
                    lk,
                    &s,
                    lk,
                    1,
                    &v[bi * lk * dm + h * dh..],
                    dm,
                    1,
                    &mut o[h * dh..],
                    dm,
                    1,
                    false,
                    false,
                );
            }
        }
    };
    if parallel {
        out.par_chunks_mut(lq * dm)
            .enumerate()
            .flat_map(|(bi, ob)| {
                ob.par_chunks_mut(BLOCK * dm)
                    .enumerate()
                    .map(move |(blk, o)| (bi, blk, o))
            })
            .for_each(|(bi, blk, o)| run(bi, blk, o));
    } else {
        for (bi, ob) in out.chunks_mut(lq * dm).enumerate() {
            for (blk, o) in ob.chunks_mut(BLOCK * dm).enumerate() {
                run(bi, blk, o);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward f64 attention.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        lq: usize,
        lk: usize,
        heads: usize,
        dh: usize,
        causal: bool,
    ) -> Vec<f32> {
        let dm = heads * dh;
        let mut out = vec![0.0f32; b * lq * dm];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..lq {
                    let limit = if causal { (i + 1).min(lk) } else { lk };
                    let s: Vec<f64> = (0..limit)
                        .map(|j| {
                            (0..dh)
                                .map(|d| {
                                    q[(bi * lq + i) * dm + h * dh + d] as f64
                                        * k[(bi * lk + j) * dm + h * dh + d] as f64
                                })
                                .sum::<f64>()
                                / (dh as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..dh {
                        let o: f64 = (0..limit)
                            .map(|j| e[j] / sum * v[(bi * lk + j) * dm + h * dh + d] as f64)
                            .sum();
                        out[(bi * lq + i) * dm + h * dh + d] = o as f32;
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0 - 1.0) * 1.5)
            .collect()
    }

    #[test]
    fn matches_naive_attention_for_small_and_large_heads() {
        // (b, lq, lk, heads, dh, causal): direct kernel, GEMM kernel, partial blocks, causal.
        let cases = [
            (2, 192, 192, 4, 1, false),
            (2, 150, 77, 2, 3, false),
            (1, 77, 77, 4, 8, true),
            (2, 130, 77, 2, 40, false),
            (1, 70, 70, 2, 64, true),
            (1, 3, 200, 1, 17, false),
        ];
        for &(b, lq, lk, heads, dh, causal) in &cases {
            let dm = heads * dh;
            let (q, k, v) = (
                data(b * lq * dm, 1),
                data(b * lk * dm, 2),
                data(b * lk * dm, 3),
            );
            let want = naive(&q, &k, &v, b, lq, lk, heads, dh, causal);
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| attention(&q, &k, &v, b, lq, lk, heads, dh, causal));
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
                let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
                assert!(
                    err <= 2e-6 * scale,
                    "case {:?}, {threads} threads: max|Δ| {err:e} (scale {scale})",
                    (b, lq, lk, heads, dh, causal)
                );
            }
        }
    }
}
