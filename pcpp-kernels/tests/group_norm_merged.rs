//! Patch-parallel group norm on the CPU (the specification): per-band moments
//! ([`Tensor::group_moments`]), their merge ([`Tensor::group_norm_merged`]) with and without the
//! corrected stale-statistics rule (PCPP §2.6), argument checking, and [`Tensor::zeros_on`].

use pcpp_kernels::{DType, Device, Tensor};

fn rnd(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, DType::F32, Device::Cpu, (-1.0, 1.0), seed).unwrap()
}

/// `max|a − b| / max|b|`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    a.max_abs_diff(b).unwrap() / b.max_abs().unwrap().max(f32::MIN_POSITIVE)
}

/// Row bands of `x: [b, c, h, w]` cut along dim 2 at `rows`, their moments stacked as
/// `[p, b·groups, 2]`, and the element count of each band per (batch, group).
fn bands_of(x: &Tensor, groups: usize, rows: &[usize]) -> (Tensor, Vec<f64>) {
    let (c, w) = (x.shape()[1], x.shape()[3]);
    let mut start = 0;
    let mut moments = Vec::new();
    let mut counts = Vec::new();
    for &r in rows {
        let band = x.narrow(2, start, r).unwrap();
        start += r;
        let m = band.group_moments(groups).unwrap();
        let bg = m.shape()[0];
        moments.push(m.reshape(&[1, bg, 2]).unwrap());
        counts.push((c / groups * r * w) as f64);
    }
    assert_eq!(start, x.shape()[2], "bands must cover the rows");
    let refs: Vec<&Tensor> = moments.iter().collect();
    (Tensor::cat(&refs, 0).unwrap(), counts)
}

#[test]
fn group_moments_match_a_direct_f64_computation() {
    for (shape, groups, dtype) in [
        (vec![2, 12, 5, 7], 4, DType::F32),
        (vec![3, 8, 33], 2, DType::F32),
        (vec![1, 6, 4, 4], 6, DType::F16),
    ] {
        let x = rnd(&shape, 11)
            .affine(2.5, 0.75)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let m = x.group_moments(groups).unwrap();
        let (b, c) = (shape[0], shape[1]);
        assert_eq!(m.shape(), [b * groups, 2]);
        assert_eq!(m.dtype(), DType::F32);
        assert_eq!(m.device(), Device::Cpu);
        let xs = x.to_vec_f32().unwrap();
        let got = m.to_vec_f32().unwrap();
        let len = xs.len() / (b * groups);
        for (i, seg) in xs.chunks(len).enumerate() {
            // Two passes in f64: the mean, then the centred sum of squares.
            let mean = seg.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let m2: f64 = seg.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
            let (gm, gm2) = (got[2 * i] as f64, got[2 * i + 1] as f64);
            assert!(
                (gm - mean).abs() <= 1e-6 * (1.0 + mean.abs()),
                "{shape:?} row {i}: mean {gm} vs {mean}"
            );
            assert!(
                (gm2 - m2).abs() <= 1e-6 * m2,
                "{shape:?} row {i}: m2 {gm2} vs {m2}"
            );
        }
        assert_eq!(c % groups, 0);
    }
}

#[test]
fn merged_band_moments_reproduce_the_whole_group_norm() {
    let x = rnd(&[2, 16, 9, 5], 3).affine(3.0, 0.5).unwrap();
    let gamma = rnd(&[16], 4);
    let beta = rnd(&[16], 5);
    for (groups, rows) in [(4, vec![3, 1, 5]), (8, vec![9]), (2, vec![2, 2, 2, 3])] {
        let (bands, counts) = bands_of(&x, groups, &rows);
        for silu in [false, true] {
            let want = x
                .group_norm(groups, Some(&gamma), Some(&beta), 1e-5, silu)
                .unwrap();
            let got = x
                .group_norm_merged(
                    groups,
                    &bands,
                    &counts,
                    None,
                    Some(&gamma),
                    Some(&beta),
                    1e-5,
                    silu,
                )
                .unwrap();
            assert_eq!(got.shape(), want.shape());
            let e = rel_err(&got, &want);
            assert!(e <= 1e-5, "groups {groups} rows {rows:?} silu {silu}: {e}");
        }
    }
    // An f16 input keeps its dtype; a band with no rows (count 0) changes nothing.
    let xh = x.to_dtype(DType::F16).unwrap();
    let (bands, mut counts) = bands_of(&xh, 4, &[4, 5]);
    let empty = Tensor::zeros(&[1, 8, 2], DType::F32);
    let bands = Tensor::cat(&[&bands, &empty], 0).unwrap();
    counts.push(0.0);
    let got = xh
        .group_norm_merged(4, &bands, &counts, None, None, None, 1e-5, false)
        .unwrap();
    assert_eq!(got.dtype(), DType::F16);
    let want = xh.group_norm(4, None, None, 1e-5, false).unwrap();
    assert!(rel_err(&got, &want) <= 1e-3);
}

/// One band's `(n, mean, m2)`.
type Mom = (f64, f64, f64);

/// The expected `(mean, var, fell back)` of the corrected rule, written out independently of the
/// crate: the fallback to `fresh`'s own variance happens where the corrected variance is negative.
fn corrected_by_hand(bands: &[Mom], own: usize, fresh: Mom) -> (f64, f64, bool) {
    let (mut n, mut mean, mut m2) = (0.0f64, 0.0f64, 0.0f64);
    for &(nb, mb, m2b) in bands {
        let nt = n + nb;
        if nt == 0.0 {
            continue;
        }
        let d = mb - mean;
        m2 = m2 + m2b + d * d * n * nb / nt;
        mean += d * nb / nt;
        n = nt;
    }
    let var = |n: f64, m2: f64| if n > 0.0 { m2 / n } else { 0.0 };
    let ex2 = |(n, mean, m2): Mom| var(n, m2) + mean * mean;
    let prev = bands[own];
    let m1 = mean + (fresh.1 - prev.1);
    let e2 = ex2((n, mean, m2)) + (ex2(fresh) - ex2(prev));
    let v = e2 - m1 * m1;
    if v < 0.0 {
        (m1, var(fresh.0, fresh.2), true)
    } else {
        (m1, v, false)
    }
}

/// Runs the corrected rule on one (batch, group) row (`x: [1, 1, 4]`, one group, no affine) and
/// compares `y` with `(x − mean)/√(var + eps)` from [`corrected_by_hand`].
fn check_corrected(bands: &[Mom], own: usize, fresh: Mom, expect_fallback: bool) {
    let eps = 1e-5;
    let x = Tensor::from_vec(&[1, 1, 4], vec![-1.5, 0.25, 2.0, 3.5]).unwrap();
    let flat: Vec<f32> = bands
        .iter()
        .flat_map(|&(_, m, m2)| [m as f32, m2 as f32])
        .collect();
    let bt = Tensor::from_vec(&[bands.len(), 1, 2], flat).unwrap();
    let counts: Vec<f64> = bands.iter().map(|b| b.0).collect();
    let ft = Tensor::from_vec(&[1, 2], vec![fresh.1 as f32, fresh.2 as f32]).unwrap();
    let (mean, var, fell_back) = corrected_by_hand(bands, own, fresh);
    assert_eq!(fell_back, expect_fallback, "test case set-up");
    let got = x
        .group_norm_merged(1, &bt, &counts, Some((own, &ft)), None, None, eps, false)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let rstd = 1.0 / (var + eps).sqrt();
    for (g, v) in got.iter().zip(x.to_vec_f32().unwrap()) {
        let want = (v as f64 - mean) * rstd;
        assert!(
            (*g as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "bands {bands:?} own {own} fresh {fresh:?}: {g} vs {want} (mean {mean}, var {var})"
        );
    }
}

#[test]
fn corrected_stale_statistics_follow_the_formula() {
    // Ordinary case: rank 1's band moved a little.
    check_corrected(
        &[(20.0, 0.5, 30.0), (20.0, -0.25, 18.0), (10.0, 1.0, 5.0)],
        1,
        (20.0, 0.0, 22.0),
        false,
    );
    // Own band first, uneven counts.
    check_corrected(
        &[(6.0, 2.0, 3.0), (14.0, -1.0, 40.0)],
        0,
        (6.0, 1.5, 4.5),
        false,
    );
    // A large own shift with little change of E[x²] gives a negative variance: the fresh band's
    // own variance (m2/n = 2/4) is used. Stale total: mean 0, var 1; corrected mean 2, E[x²] 1.5.
    check_corrected(
        &[(4.0, 1.0, 0.0), (4.0, -1.0, 0.0)],
        1,
        (4.0, 1.0, 2.0),
        true,
    );
    let by_hand = corrected_by_hand(&[(4.0, 1.0, 0.0), (4.0, -1.0, 0.0)], 1, (4.0, 1.0, 2.0));
    assert_eq!(by_hand, (2.0, 0.5, true));
}

#[test]
fn corrected_with_unchanged_moments_equals_uncorrected() {
    let x = rnd(&[2, 8, 6, 3], 21);
    let (bands, counts) = bands_of(&x, 4, &[2, 4]);
    let own_fresh = x.narrow(2, 2, 4).unwrap().group_moments(4).unwrap();
    let plain = x
        .group_norm_merged(4, &bands, &counts, None, None, None, 1e-5, true)
        .unwrap();
    let corr = x
        .group_norm_merged(
            4,
            &bands,
            &counts,
            Some((1, &own_fresh)),
            None,
            None,
            1e-5,
            true,
        )
        .unwrap();
    assert!(rel_err(&corr, &plain) <= 1e-5);
}

#[test]
fn group_norm_merged_rejects_bad_arguments() {
    let x = rnd(&[2, 8, 4, 3], 1);
    let (bands, counts) = bands_of(&x, 4, &[1, 3]);
    let fresh = x.narrow(2, 0, 1).unwrap().group_moments(4).unwrap();
    let g8 = rnd(&[8], 2);
    let g7 = rnd(&[7], 2);
    let err = |r: pcpp_kernels::Result<Tensor>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("group_norm_merged"), "{what}: {e}");
        e
    };
    // Band count and counts disagree.
    err(
        x.group_norm_merged(4, &bands, &counts[..1], None, None, None, 1e-5, false),
        "p mismatch",
    );
    // No bands, too many bands.
    let e = err(
        x.group_norm_merged(4, &bands, &[], None, None, None, 1e-5, false),
        "no bands",
    );
    assert!(e.contains("0 bands"), "{e}");
    let many = vec![1.0; 65];
    let big = Tensor::zeros(&[65, 8, 2], DType::F32);
    err(
        x.group_norm_merged(4, &big, &many, None, None, None, 1e-5, false),
        "65 bands",
    );
    // own out of range.
    let e = err(
        x.group_norm_merged(
            4,
            &bands,
            &counts,
            Some((2, &fresh)),
            None,
            None,
            1e-5,
            false,
        ),
        "own out of range",
    );
    assert!(e.contains("own band 2"), "{e}");
    // Wrong shapes: bands rows, fresh rows, groups, gamma.
    let wrong = Tensor::zeros(&[2, 7, 2], DType::F32);
    err(
        x.group_norm_merged(4, &wrong, &counts, None, None, None, 1e-5, false),
        "bands rows",
    );
    let wrong = Tensor::zeros(&[2, 8, 3], DType::F32);
    err(
        x.group_norm_merged(4, &wrong, &counts, None, None, None, 1e-5, false),
        "bands width",
    );
    let wrong_fresh = Tensor::zeros(&[4, 2], DType::F32);
    err(
        x.group_norm_merged(
            4,
            &bands,
            &counts,
            Some((0, &wrong_fresh)),
            None,
            None,
            1e-5,
            false,
        ),
        "fresh shape",
    );
    err(
        x.group_norm_merged(3, &bands, &counts, None, None, None, 1e-5, false),
        "groups",
    );
    err(
        x.group_norm_merged(4, &bands, &counts, None, Some(&g7), None, 1e-5, false),
        "gamma",
    );
    err(
        x.group_norm_merged(4, &bands, &counts, None, None, Some(&g7), 1e-5, false),
        "beta",
    );
    // Wrong dtype, bad counts.
    let half = bands.to_dtype(DType::F16).unwrap();
    let e = err(
        x.group_norm_merged(4, &half, &counts, None, None, None, 1e-5, false),
        "f16 bands",
    );
    assert!(e.contains("f32"), "{e}");
    err(
        x.group_norm_merged(4, &bands, &[3.0, -1.0], None, None, None, 1e-5, false),
        "negative count",
    );
    err(
        x.group_norm_merged(4, &bands, &[3.0, f64::NAN], None, None, None, 1e-5, false),
        "NaN count",
    );
    // The valid call succeeds.
    x.group_norm_merged(
        4,
        &bands,
        &counts,
        Some((1, &fresh)),
        Some(&g8),
        None,
        1e-5,
        false,
    )
    .unwrap();
    // group_moments checks its shape too.
    let e = rnd(&[5], 1).group_moments(1).unwrap_err().to_string();
    assert!(e.contains("group_moments"), "{e}");
}

#[test]
fn zeros_on_the_cpu_is_zeros() {
    for d in [DType::F32, DType::F16, DType::BF16] {
        let z = Tensor::zeros_on(&[3, 4], d, Device::Cpu).unwrap();
        assert_eq!(z.shape(), [3, 4]);
        assert_eq!(z.dtype(), d);
        assert_eq!(z.device(), Device::Cpu);
        assert_eq!(z.to_bytes().unwrap(), vec![0u8; 12 * d.size()]);
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn zeros_on_a_gpu_without_cuda_is_a_clear_error() {
    let e = Tensor::zeros_on(&[2], DType::F32, Device::Cuda(0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("zeros_on") && e.contains("`cuda` feature"),
        "{e}"
    );
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_ptr_of_a_cpu_tensor_is_an_error() {
    let e = Tensor::zeros(&[2], DType::F32)
        .cuda_ptr()
        .unwrap_err()
        .to_string();
    assert!(e.contains("cuda_ptr"), "{e}");
}
