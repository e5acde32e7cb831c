//! The in-place row writes of the device path's windows (`copy_rows_into`, `linear_rows_into`,
//! `nchw_rows_into_nhwc`, and the group norm on a statistics window): the rows written equal the
//! GPU's own `linear` / the source / its channels-last permute / `group_moments` bit for bit, the
//! merged group norm equals `group_norm_merged` bit for bit (written channels-last into a window's
//! rows, its permute),
//! every other row of the destination keeps its bytes, the direct GEMM (one batch entry) and the
//! fallback (two entries, a mixed dtype, an unaligned offset) both, on cuBLASLt and on the
//! small-row GEMMs, the layer norm applied inside the row-writing GEMM, and shape or device
//! errors name the op. Ignored by default (needs a GPU; one test switches the small-row GEMMs
//! for the process, so one thread):
//! `cargo test -p pcpp-kernels --features cuda --test cuda_rows_into -- --ignored --test-threads=1`.
#![cfg(feature = "cuda")]

mod common;

use common::{gpu, rnd};
use pcpp_kernels::cuda::{
    copy_rows_into, group_norm_merged_into, group_norm_merged_into_nhwc, group_norm_merged_nhwc,
    linear_rows_into, nchw_rows_into_nhwc, norm_linear_rows_into, StatsWindow,
};
use pcpp_kernels::{DType, Device, LayerNormArgs, RowStats, Tensor};

/// F32 values in [0, 1): moments with a non-negative m2.
fn positive(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, DType::F32, Device::Cpu, (0.0, 1.0), seed).unwrap()
}

fn host_f32(t: &Tensor) -> Vec<f32> {
    t.to_device(Device::Cpu)
        .unwrap()
        .as_f32()
        .unwrap()
        .into_owned()
}

/// Rows `row0 .. row0 + l` of every batch entry of `win: [b, L, n]` equal `part: [b, l, n]`
/// exactly, and every other row equals `before`.
fn assert_rows(name: &str, win: &Tensor, before: &[f32], part: &Tensor, row0: usize) {
    let (w, p) = (host_f32(win), host_f32(part));
    let (b, big, n) = (win.shape()[0], win.shape()[1], win.shape()[2]);
    let l = part.shape()[1];
    for bi in 0..b {
        for r in 0..big {
            for c in 0..n {
                let i = (bi * big + r) * n + c;
                let want = if (row0..row0 + l).contains(&r) {
                    p[(bi * l + r - row0) * n + c]
                } else {
                    before[i]
                };
                assert_eq!(
                    w[i].to_bits(),
                    want.to_bits(),
                    "{name}: batch {bi}, row {r}, column {c}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn row_writes_equal_the_ops_they_replace() {
    // cuBLASLt, then the small-row GEMMs (on sm_90a they write the rows in place; the rows
    // around them must keep their bits).
    use pcpp_kernels::cuda::{set_small_gemm, SmallGemm};
    for small in [SmallGemm::Off, SmallGemm::Fused] {
        set_small_gemm(small);
        row_writes_equal_the_ops_they_replace_now();
    }
    set_small_gemm(SmallGemm::Off);
}

fn row_writes_equal_the_ops_they_replace_now() {
    for d in [DType::F16, DType::BF16, DType::F32] {
        // (batch, own rows, window rows, first row, k, n): direct GEMMs at 256-byte-aligned
        // offsets, an unaligned offset and two batch entries (copied).
        for (b, l, big, row0, k, n) in [
            (1, 256, 410, 77, 320, 128),
            (1, 64, 96, 0, 64, 256),
            (1, 10, 40, 3, 48, 72),
            (2, 33, 70, 20, 64, 128),
        ] {
            let name = format!("{d:?} b={b} l={l} L={big} row0={row0} {k}→{n}");
            let x = gpu(&rnd(&[b, l, k], d, 1));
            let w = gpu(&rnd(&[n, k], d, 2));
            let bias = gpu(&rnd(&[n], d, 3));
            let win = gpu(&rnd(&[b, big, n], d, 4));
            let before = host_f32(&win);
            linear_rows_into(&x, &w, Some(&bias), &win, row0).unwrap();
            assert_rows(
                &name,
                &win,
                &before,
                &x.linear(&w, Some(&bias)).unwrap(),
                row0,
            );
            let part = gpu(&rnd(&[b, l, n], d, 5));
            let before = host_f32(&win);
            copy_rows_into(&part, &win, big - l).unwrap();
            assert_rows(&format!("copy {name}"), &win, &before, &part, big - l);
        }
    }
    // The layer norm applied inside the GEMM that writes the rows (statistics of x from the
    // small-row GEMM that made it, where it ran) equals the norm-then-linear the same kernels
    // compute into a tensor of its own; without statistics, layer norm then the row write.
    for d in [DType::F16, DType::BF16] {
        let (l, big, row0, k, n) = (256, 410, 77, 320, 128);
        let name = format!("norm {d:?} l={l} L={big} row0={row0} {k}→{n}");
        let src = gpu(&rnd(&[1, l, 64], d, 8));
        let wx = gpu(&rnd(&[k, 64], d, 9));
        let (x, stats) = src.linear_stats(&wx, None).unwrap();
        let (g, beta) = (gpu(&rnd(&[k], d, 10)), gpu(&rnd(&[k], d, 11)));
        let norm = LayerNormArgs {
            gamma: Some(&g),
            beta: Some(&beta),
            eps: 1e-5,
        };
        let w = gpu(&rnd(&[n, k], d, 12));
        let bias = gpu(&rnd(&[n], d, 13));
        for st in [&stats, &RowStats::none()] {
            let win = gpu(&rnd(&[1, big, n], d, 4));
            let before = host_f32(&win);
            norm_linear_rows_into(&x, norm, st, (&w, Some(&bias)), &win, row0).unwrap();
            let want = x.norm_linear(norm, st, &w, Some(&bias)).unwrap();
            assert_rows(&name, &win, &before, &want, row0);
        }
    }
    // A mixed dtype takes the fallback (linear in the weight's dtype, cast, copied).
    let x = gpu(&rnd(&[1, 16, 32], DType::F32, 6));
    let w = gpu(&rnd(&[64, 32], DType::F16, 7));
    let win = Tensor::zeros_on(&[1, 40, 64], DType::F32, x.device()).unwrap();
    let before = host_f32(&win);
    linear_rows_into(&x, &w, None, &win, 8).unwrap();
    assert_rows("mixed", &win, &before, &x.linear(&w, None).unwrap(), 8);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn channels_last_rows_equal_the_permute() {
    // (b, c, h, w, window rows, first row): two-element transposes per batch entry, and odd
    // channel counts (permute and copy).
    for d in [DType::F16, DType::BF16, DType::F32] {
        for (b, c, h, w, big, row0) in [
            (1, 320, 16, 64, 20, 2),
            (2, 64, 8, 32, 12, 1),
            (1, 3, 5, 6, 9, 4),
        ] {
            let name = format!("{d:?} [{b}, {c}, {h}, {w}] into {big} rows at {row0}");
            let x = gpu(&rnd(&[b, c, h, w], d, 8));
            let win = gpu(&rnd(&[b, big, w, c], d, 9));
            let before = host_f32(&win);
            nchw_rows_into_nhwc(&x, &win, row0).unwrap();
            let want = x.permute(&[0, 2, 3, 1]).unwrap().reshape(&[b, h, w * c]);
            let flat = win.reshape(&[b, big, w * c]).unwrap();
            assert_rows(&name, &flat, &before, &want.unwrap(), row0);
        }
    }
    let x = gpu(&rnd(&[1, 4, 6, 8], DType::F16, 1));
    let win = Tensor::zeros_on(&[1, 6, 8, 4], DType::F16, x.device()).unwrap();
    let e = nchw_rows_into_nhwc(&x, &win, 1).unwrap_err().to_string();
    assert!(
        e.contains("nchw_rows_into_nhwc") && e.contains("rows 1"),
        "{e}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn stats_window_equals_the_tensor_ops() {
    let (groups, p, own) = (8usize, 4usize, 2usize);
    for d in [DType::F16, DType::BF16, DType::F32] {
        let x = gpu(&rnd(&[2, 32, 6, 10], d, 11));
        let rows = 2 * groups;
        let (gamma, beta) = (gpu(&rnd(&[32], d, 12)), gpu(&rnd(&[32], d, 13)));
        let counts = [240.0, 200.0, 240.0, 160.0];
        // Moments with m2 ≥ 0, as a table of p bands.
        let bands = gpu(&positive(&[p, rows, 2], 14));
        let fresh_want = x.group_moments(groups).unwrap();
        let ab = (Some(&gamma), Some(&beta));
        // Corrected: the fresh moments go to another table's row.
        let next = Tensor::zeros_on(&[1, p, rows * 2], DType::F32, x.device()).unwrap();
        let win = StatsWindow {
            bands: &bands,
            counts: &counts,
            own,
            fresh: &next,
            fresh_row: own,
            corrected: true,
        };
        let got = group_norm_merged_into(&x, groups, win, ab, 1e-5, true).unwrap();
        let want = x
            .group_norm_merged(
                groups,
                &bands,
                &counts,
                Some((own, &fresh_want)),
                ab.0,
                ab.1,
                1e-5,
                true,
            )
            .unwrap();
        let tag = format!("{d:?} corrected");
        assert_eq!(host_f32(&got), host_f32(&want), "{tag}: output");
        let row = host_f32(&next)[own * rows * 2..(own + 1) * rows * 2].to_vec();
        assert_eq!(row, host_f32(&fresh_want), "{tag}: fresh row");
        // Stale: the fresh moments replace the band's own row of the table merged.
        let table = gpu(&positive(&[1, p, rows * 2], 15));
        let win = StatsWindow {
            bands: &table,
            counts: &counts,
            own,
            fresh: &table,
            fresh_row: own,
            corrected: false,
        };
        let got = group_norm_merged_into(&x, groups, win, (None, None), 1e-6, false).unwrap();
        let after = table.reshape(&[p, rows, 2]).unwrap();
        let want = x
            .group_norm_merged(groups, &after, &counts, None, None, None, 1e-6, false)
            .unwrap();
        assert_eq!(host_f32(&got), host_f32(&want), "{d:?} stale: output");
        let row = host_f32(&table)[own * rows * 2..(own + 1) * rows * 2].to_vec();
        assert_eq!(row, host_f32(&fresh_want), "{d:?} stale: fresh row");
    }
    // A fresh row past the table's end, and a band out of range.
    let x = gpu(&rnd(&[1, 8, 4, 4], DType::F16, 1));
    let t = Tensor::zeros_on(&[2, 4, 2], DType::F32, x.device()).unwrap();
    let win = |own, fresh_row| StatsWindow {
        bands: &t,
        counts: &[16.0, 16.0],
        own,
        fresh: &t,
        fresh_row,
        corrected: false,
    };
    for (own, row) in [(0, 2), (2, 0)] {
        let e = group_norm_merged_into(&x, 4, win(own, row), (None, None), 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("group_norm_merged_into"), "{e}");
    }
}

/// The statistics-window norm of `x` (`[b, c, h, w]`, eps 1e-5) written channels-last through
/// window `into` into rows `row0 ..` of a random `[b, big, w, c]` destination (seed `seed`) equals
/// the NCHW norm through window `reference`, permuted, bit for bit, and every other row keeps its
/// bytes; returns that reference as `[b, h, w·c]`.
fn check_into_rows(
    name: &str,
    x: &Tensor,
    groups: usize,
    (reference, into): (StatsWindow<'_>, StatsWindow<'_>),
    (ab, silu): ((Option<&Tensor>, Option<&Tensor>), bool),
    (big, row0, seed): (usize, usize, u64),
) -> Tensor {
    let &[b, c, h, w] = x.shape() else {
        panic!("{name}: expected [b, c, h, w], got {:?}", x.shape())
    };
    let want = group_norm_merged_into(x, groups, reference, ab, 1e-5, silu)
        .unwrap()
        .permute(&[0, 2, 3, 1])
        .unwrap()
        .reshape(&[b, h, w * c])
        .unwrap();
    let dst = gpu(&rnd(&[b, big, w, c], x.dtype(), seed));
    let before = host_f32(&dst);
    group_norm_merged_into_nhwc(x, groups, into, ab, 1e-5, silu, (&dst, row0)).unwrap();
    let flat = dst.reshape(&[b, big, w * c]).unwrap();
    assert_rows(name, &flat, &before, &want, row0);
    want
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn stats_window_writes_channels_last_rows() {
    // (b, c, groups, h, w, window rows, first row): the tiled NHWC apply (even channels and
    // planes; 96 and 320 channels in 32 groups put groups across its 64-channel tiles), and an
    // odd plane (normalised, then transposed in).
    for d in [DType::F16, DType::BF16, DType::F32] {
        for (b, c, groups, h, w, big, row0) in [
            (1, 64, 8, 8, 32, 12, 2),
            (2, 32, 8, 6, 10, 10, 4),
            (1, 6, 3, 3, 5, 7, 1),
            (1, 96, 32, 4, 6, 6, 1),
            (2, 320, 32, 4, 8, 7, 2),
        ] {
            let name = format!("{d:?} [{b}, {c}, {h}, {w}] into {big} rows at {row0}");
            let x = gpu(&rnd(&[b, c, h, w], d, 21));
            let (gamma, beta) = (gpu(&rnd(&[c], d, 22)), gpu(&rnd(&[c], d, 23)));
            let ab = (Some(&gamma), Some(&beta));
            let (p, own, rows) = (3usize, 1usize, b * groups);
            let bands = gpu(&positive(&[p, rows, 2], 24));
            let n = ((c / groups) * h * w) as f64;
            let counts = [n, n, 2.0 * n];
            let tables = [0, 1]
                .map(|_| Tensor::zeros_on(&[1, p, rows * 2], DType::F32, x.device()).unwrap());
            let win = |fresh| StatsWindow {
                bands: &bands,
                counts: &counts,
                own,
                fresh,
                fresh_row: own,
                corrected: true,
            };
            let wins = (win(&tables[0]), win(&tables[1]));
            let want = check_into_rows(&name, &x, groups, wins, (ab, true), (big, row0, 25));
            let [t0, t1] = [&tables[0], &tables[1]].map(host_f32);
            assert_eq!(t0, t1, "{name}: fresh moments");
            // A new channels-last tensor: the same bits as the permute.
            let next = Tensor::zeros_on(&[1, p, rows * 2], DType::F32, x.device()).unwrap();
            let own_nhwc = group_norm_merged_nhwc(&x, groups, win(&next), ab, 1e-5, true).unwrap();
            assert_eq!(own_nhwc.shape(), &[b, h, w, c], "{name}");
            let flat = own_nhwc.reshape(&[b, h, w * c]).unwrap();
            assert_eq!(host_f32(&flat), host_f32(&want), "{name}: new NHWC tensor");
            // Stale: the fresh moments replace the band's own row of the table they are merged
            // from, in the same launch.
            let tables = [0, 1].map(|_| gpu(&positive(&[1, p, rows * 2], 26)));
            let stale = |i: usize| StatsWindow {
                bands: &tables[i],
                counts: &counts,
                own,
                fresh: &tables[i],
                fresh_row: own,
                corrected: false,
            };
            let wins = (stale(0), stale(1));
            let stale_name = format!("{name} stale");
            check_into_rows(&stale_name, &x, groups, wins, (ab, false), (big, row0, 27));
            let [t0, t1] = [&tables[0], &tables[1]].map(host_f32);
            assert_eq!(t0, t1, "{name} stale: table with the fresh moments");
        }
    }
    // Rows past the destination's end, and channels that are not the destination's last axis.
    let x = gpu(&rnd(&[1, 8, 4, 6], DType::F16, 1));
    let t = Tensor::zeros_on(&[2, 4, 2], DType::F32, x.device()).unwrap();
    let win = || StatsWindow {
        bands: &t,
        counts: &[96.0, 96.0],
        own: 0,
        fresh: &t,
        fresh_row: 0,
        corrected: false,
    };
    for (shape, row0) in [([1, 6, 6, 8], 3), ([1, 8, 6, 4], 0)] {
        let dst = Tensor::zeros_on(&shape, DType::F16, x.device()).unwrap();
        let e = group_norm_merged_into_nhwc(&x, 4, win(), (None, None), 1e-5, false, (&dst, row0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("group_norm_merged_into_nhwc"), "{e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn row_writes_reject_bad_operands() {
    let d = DType::F16;
    let x = gpu(&rnd(&[1, 16, 32], d, 1));
    let w = gpu(&rnd(&[64, 32], d, 2));
    let win = Tensor::zeros_on(&[1, 20, 64], d, x.device()).unwrap();
    // Past the end of the window, a wrong width, another batch, a host operand, another dtype.
    let e = linear_rows_into(&x, &w, None, &win, 5)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("linear_rows_into") && e.contains("rows 5"),
        "{e}"
    );
    let narrow = Tensor::zeros_on(&[1, 20, 32], d, x.device()).unwrap();
    let e = linear_rows_into(&x, &w, None, &narrow, 0).unwrap_err();
    assert!(e.to_string().contains("linear_rows_into"), "{e}");
    let two = Tensor::zeros_on(&[2, 20, 64], d, x.device()).unwrap();
    let e = copy_rows_into(&x.linear(&w, None).unwrap(), &two, 0).unwrap_err();
    assert!(e.to_string().contains("copy_rows_into"), "{e}");
    let host = rnd(&[1, 16, 64], d, 3);
    let e = copy_rows_into(&host, &win, 0).unwrap_err().to_string();
    assert!(e.contains("copy_rows_into") && e.contains("cpu"), "{e}");
    let f32s = Tensor::zeros_on(&[1, 16, 64], DType::F32, x.device()).unwrap();
    let e = copy_rows_into(&f32s, &win, 0).unwrap_err().to_string();
    assert!(e.contains("copy_rows_into"), "{e}");
}
