//! Vectorisable f32 math for the CPU kernels: a polynomial `exp` accurate to a few ulp (the Cephes
//! `expf` scheme, branch-free so that the compiler turns a slice loop into SIMD), softmax rows, and
//! dot products with several accumulators. Used by attention and the activations (the per-step
//! numerics behind every UNet layer of PCPP §2; no parallelism of its own).
//!
//! Each slice function is compiled twice, for the baseline target and with AVX2 + FMA, and picks
//! the variant at run time. The AVX2 variant evaluates `exp`'s polynomial with fused multiply-adds,
//! so the two differ in the last bit of some results (both within the stated accuracy).

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in a part exact in few bits and the remainder (Cody–Waite reduction).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5·2²³`: adding it rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Inputs are clamped to where `exp` is a normal f32.
const EXP_MIN: f32 = -87.336_54;
const EXP_MAX: f32 = 88.0;

/// `eˣ` with a relative error of a few ulp over the normal range; below about −87.3 the result is
/// the smallest normal f32's neighbourhood instead of a subnormal or 0 (irrelevant next to the
/// other terms of a softmax or `1 + e⁻ˣ`), above 88 it saturates at `e⁸⁸ ≈ 1.65·10³⁸`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_k::<false>(x)
}

/// `a·b + c`, fused when `FMA` (true only in code compiled for CPUs with FMA instructions).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`exp`], with fused multiply-adds when `FMA`.
#[inline(always)]
fn exp_k<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    // n = round(x / ln 2), r = x − n·ln 2 ∈ [−ln2/2, ln2/2]
    let t = x * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = madd::<FMA>(1.987_569_2e-4, r, 1.398_199_9e-3);
    let p = madd::<FMA>(p, r, 8.333_452e-3);
    let p = madd::<FMA>(p, r, 4.166_579_6e-2);
    let p = madd::<FMA>(p, r, 0.166_666_65);
    let p = madd::<FMA>(p, r, 0.5);
    let y = madd::<FMA>(p, z, r) + 1.0;
    // 2ⁿ from the low mantissa bits of t, which hold n + 2²² (n ∈ [−126, 128]).
    let bits = (t.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    y * f32::from_bits(bits as u32)
}

/// Defines `pub fn $name` running `$body` through a copy compiled with AVX2 + FMA when the CPU has
/// them, else through the baseline copy. The body sees the const generic `FMA` (true in the AVX2
/// copy) and calls `exp_k::<FMA>`.
macro_rules! dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp<const FMA: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `avx2` is compiled for (checked above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp::<false>($($arg),*)
        }
    };
}

dispatch! {
    /// `row ← exp(scale·row − max(scale·row))` for `scale > 0`; returns the sum of the new row
    /// (the softmax is the row divided by it, which callers may apply to a smaller product).
    fn exp_shifted_in_place(row: &mut [f32], scale: f32) -> f32 {
        // max(scale·x) = scale·max(x) exactly for scale > 0, so the scale is folded into exp's
        // argument; the lanes of `m` keep the loop free of a serial dependency.
        let mut m = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for (mi, &x) in m.iter_mut().zip(c) {
                *mi = if x > *mi { x } else { *mi };
            }
        }
        let mut mx = f32::NEG_INFINITY;
        for &x in chunks.remainder().iter().chain(m.iter()) {
            mx = if x > mx { x } else { mx };
        }
        let mx = mx * scale;
        let mut acc = [0.0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                *x = exp_k::<FMA>(*x * scale - mx);
                *a += *x;
            }
        }
        let mut sum = 0.0f32;
        for x in chunks.into_remainder() {
            *x = exp_k::<FMA>(*x * scale - mx);
            sum += *x;
        }
        sum + acc.iter().sum::<f32>()
    }
}

/// `row ← softmax(scale·row)` for `scale > 0`, max-subtracted like PyTorch.
pub fn softmax_in_place(row: &mut [f32], scale: f32) {
    let inv = 1.0 / exp_shifted_in_place(row, scale);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

dispatch! {
    /// `Σ aᵢ·bᵢ` over the common length, with 8 interleaved partial sums.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0.0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        let mut s = 0.0f32;
        for (x, y) in ra.iter().zip(rb) {
            s += x * y;
        }
        acc.iter().sum::<f32>() + s
    }
}

dispatch! {
    /// `y ← y + α·x` over the common length.
    fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        for (d, s) in y.iter_mut().zip(x) {
            *d += alpha * *s;
        }
    }
}

dispatch! {
    /// `y ← x·σ(x) = x / (1 + e⁻ˣ)` over the common length.
    fn silu_into(x: &[f32], y: &mut [f32]) {
        for (d, &v) in y.iter_mut().zip(x) {
            *d = v / (1.0 + exp_k::<FMA>(-v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_to_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            for got in [exp(x) as f64, exp_k::<true>(x) as f64] {
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.001_37;
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(1000.0) > 1e38 && exp(1000.0).is_finite());
        assert!(exp(88.0).is_finite() && exp(87.9) < exp(88.0));
    }

    #[test]
    fn softmax_sums_to_one_and_matches_f64() {
        for n in [1usize, 5, 8, 77, 200] {
            let row: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
                .collect();
            let mut got = row.clone();
            softmax_in_place(&mut got, 0.5);
            let mx = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(0.5 * x as f64));
            let e: Vec<f64> = row.iter().map(|&x| (0.5 * x as f64 - mx).exp()).collect();
            let s: f64 = e.iter().sum();
            for (g, w) in got.iter().zip(&e) {
                assert!((*g as f64 - w / s).abs() < 1e-6, "n={n}: {g} vs {}", w / s);
            }
        }
    }

    #[test]
    fn dot_axpy_and_silu_match_scalar_code() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
        let mut y = b.clone();
        axpy(2.0, &a, &mut y);
        for i in 0..37 {
            assert_eq!(y[i], b[i] + 2.0 * a[i]);
        }
        let mut s = vec![0.0; 37];
        silu_into(&a, &mut s);
        for i in 0..37 {
            let w = a[i] as f64 / (1.0 + (-(a[i] as f64)).exp());
            assert!((s[i] as f64 - w).abs() < 1e-6);
        }
    }
}
