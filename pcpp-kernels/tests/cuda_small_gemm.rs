//! Parity of the small-row GEMMs on Hopper's warpgroup MMAs (`gemm_wg.cu`, `PCPP_SMALL_GEMM`,
//! docs/small-gemm.md) against the CPU twins and against cuBLASLt. Ignored by default (needs a
//! GPU; on one without sm_90a the switch changes nothing and both sides are cuBLASLt). Run one
//! test at a time: they switch the GEMMs for the process.
//! `cargo test -p pcpp-kernels --features cuda --test cuda_small_gemm -- --ignored --test-threads=1`.
#![cfg(feature = "cuda")]

mod common;

use common::{check, gpu, rnd};
use pcpp_kernels::{DType, LayerNormArgs, RowStats, Tensor};

/// The small-row GEMMs on warpgroup MMAs (`PCPP_SMALL_GEMM`, sm_90a) against the CPU and against
/// cuBLASLt (the switch off): linear layers with and without bias, with an accumulator, and the
/// feed-forward's GEGLU in their epilogue. The shapes cover K and N tails (a last chunk of 8
/// columns, a last tile of 8), one row, 77 rows (a block of two warpgroups), K split across
/// clusters of four and eight blocks (a 256-token band's 1280-wide projections and its 5120-deep
/// feed-forward output), row tiles with idle warpgroups (300 rows), the 1 024-row limit, and
/// blocks capped at 64 and 128 rows (`set_small_gemm_rows`). Against cuBLASLt the bound is a few
/// roundings of the output, so a kernel that dropped a chunk, a tile or a peer's partial sum
/// fails it. Also the fused layer norms: a residual sum with its row statistics from the
/// epilogue, and the norm of it applied inside the next GEMM (plain and GEGLU), against the CPU's
/// separate norm and the GPU's separate kernels.
#[test]
#[ignore = "needs a CUDA GPU"]
fn small_gemm_matches_cublaslt_and_cpu() {
    use pcpp_kernels::cuda::{set_small_gemm, set_small_gemm_rows, SmallGemm};
    for d in [DType::F16, DType::BF16] {
        let close = if d == DType::F16 { 2e-3 } else { 1.6e-2 };
        for (m, k, n, rows) in [
            (77usize, 136usize, 520usize, 256usize),
            (1, 64, 64, 256),
            (256, 1280, 1280, 256),
            (256, 5120, 1280, 256),
            (300, 1024, 64, 256),
            (1024, 640, 640, 256),
            (256, 1280, 1280, 64),
            (300, 640, 200, 128),
        ] {
            set_small_gemm_rows(rows);
            let x = rnd(&[1, m, k], d, 1);
            let w = rnd(&[2 * n, k], d, 2)
                .affine(2.0 / (k as f32).sqrt(), 0.0)
                .unwrap();
            let w1 = w.narrow(0, 0, n).unwrap();
            let b = rnd(&[2 * n], d, 3);
            let b1 = b.narrow(0, 0, n).unwrap();
            let acc = rnd(&[1, m, n], d, 4);
            let (gx, gw, gw1, gb, gb1, gacc) =
                (gpu(&x), gpu(&w), gpu(&w1), gpu(&b), gpu(&b1), gpu(&acc));
            let run = |level: SmallGemm| -> Vec<Tensor> {
                set_small_gemm(level);
                let out = vec![
                    gx.linear(&gw1, Some(&gb1)).unwrap(),
                    gx.linear(&gw1, None).unwrap(),
                    gx.linear_add(&gw1, Some(&gb1), &gacc).unwrap(),
                    gx.linear_geglu(&gw, Some(&gb)).unwrap(),
                    gx.linear_geglu(&gw, None).unwrap(),
                ];
                set_small_gemm(SmallGemm::Off);
                out
            };
            let want = [
                x.linear(&w1, Some(&b1)).unwrap(),
                x.linear(&w1, None).unwrap(),
                x.linear_add(&w1, Some(&b1), &acc).unwrap(),
                x.linear_geglu(&w, Some(&b)).unwrap(),
                x.linear_geglu(&w, None).unwrap(),
            ];
            // The residual sum with its row statistics, and the layer norm of it applied inside
            // the next GEMM (statistics from the epilogue), plain and with GEGLU.
            let (g, beta) = (rnd(&[n], d, 5), rnd(&[n], d, 6));
            let (gg, gbeta) = (gpu(&g), gpu(&beta));
            let w2 = rnd(&[2 * n, n], d, 7)
                .affine(2.0 / (n as f32).sqrt(), 0.0)
                .unwrap();
            let w2a = w2.narrow(0, 0, n).unwrap();
            let (gw2, gw2a) = (gpu(&w2), gpu(&w2a));
            let fused = |level: SmallGemm| -> Vec<Tensor> {
                set_small_gemm(level);
                let (s, st) = gx.linear_add_stats(&gw1, Some(&gb1), &gacc).unwrap();
                assert_eq!(
                    st.is_some(),
                    level == SmallGemm::Fused && gx.fused_norms_apply(n),
                    "statistics left iff the small-row kernels apply at the fused level"
                );
                let args = LayerNormArgs {
                    gamma: Some(&gg),
                    beta: Some(&gbeta),
                    eps: 1e-5,
                };
                let out = vec![
                    s.clone(),
                    s.norm_linear(args, &st, &gw2a, None).unwrap(),
                    s.norm_linear_geglu(args, &st, &gw2, None).unwrap(),
                    s.norm_linear(args, &RowStats::none(), &gw2a, None).unwrap(),
                ];
                set_small_gemm(SmallGemm::Off);
                out
            };
            let s_cpu = x.linear_add(&w1, Some(&b1), &acc).unwrap();
            let h_cpu = s_cpu.layer_norm(Some(&g), Some(&beta), 1e-5).unwrap();
            let want_fused = [
                s_cpu.clone(),
                h_cpu.linear(&w2a, None).unwrap(),
                h_cpu.linear_geglu(&w2, None).unwrap(),
                h_cpu.linear(&w2a, None).unwrap(),
            ];
            let (fs, fl) = (fused(SmallGemm::Fused), fused(SmallGemm::Off));
            let fnames = [
                "sum+stats",
                "norm+linear",
                "norm+geglu",
                "norm+linear (no stats)",
            ];
            for i in 0..want_fused.len() {
                let name = format!("small gemm {m}x{k}x{n}/{rows} {}", fnames[i]);
                let other = (&fl[i], "the separate norm", 2.0 * close);
                check_both(&name, d, &fs[i], &want_fused[i], other);
            }
            let names = ["bias", "no bias", "acc", "geglu", "geglu no bias"];
            // The GEMMs alone (GEGLU as its own pass after them), then with GEGLU's epilogue.
            let lt = run(SmallGemm::Off);
            for level in [SmallGemm::Gemm, SmallGemm::Geglu] {
                let small = run(level);
                for i in 0..want.len() {
                    let name = format!("small gemm {m}x{k}x{n}/{rows} {} ({level:?})", names[i]);
                    check_both(&name, d, &small[i], &want[i], (&lt[i], "cuBLASLt", close));
                }
            }
        }
    }
    set_small_gemm_rows(256);
}

/// `got` (GPU) against the CPU twin (`check`'s bound), and against `other`, the same op on the
/// GPU's other kernels (`what`), within `bound` of their largest magnitude (at least 1).
fn check_both(
    name: &str,
    d: DType,
    got: &Tensor,
    cpu: &Tensor,
    (other, what, bound): (&Tensor, &str, f32),
) {
    check(name, d, got, cpu);
    let (a, c) = (
        got.to_device(pcpp_kernels::Device::Cpu).unwrap(),
        other.to_device(pcpp_kernels::Device::Cpu).unwrap(),
    );
    let e = a.max_abs_diff(&c).unwrap() / c.max_abs().unwrap().max(1.0);
    assert!(
        e <= bound,
        "{name} {d}: against {what} rel err {e:e} > {bound}"
    );
}
