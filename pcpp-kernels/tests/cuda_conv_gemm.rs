//! Convolutions with few output pixels as im2col and one cuBLASLt GEMM
//! (`pcpp_kernels::cuda::set_conv_gemm_rows`): against the CPU twin and against cuDNN's kernel
//! on the same GPU, in f16 and bf16, for NCHW inputs (stride 1 and 2, a band's halo padding, a
//! long filter chain) and for a group norm's channels-last output with the time-embedding and
//! residual adds; a captured graph of the call holds the im2col kernel exactly when the cap takes
//! the convolution, and channel counts that are not whole 16-byte vectors stay with cuDNN.
//! Ignored by default (needs a GPU):
//! `cargo test -p pcpp-kernels --features cuda --test cuda_conv_gemm -- --ignored`.
#![cfg(feature = "cuda")]

mod common;

use common::{check, gpu, rnd};
use pcpp_kernels::cuda::{
    capture_graph, set_conv_gemm_rows, set_conv_nhwc, CONV_GEMM_ROWS_DEFAULT,
};
use pcpp_kernels::{Conv2dParams, DType, Tensor};

const IM2COL: &str = "im2col_nhwc_u128";

/// How many im2col kernels a graph of `f` holds.
fn im2col_nodes(f: impl Fn() -> pcpp_kernels::Result<()>) -> usize {
    f().unwrap();
    let step = capture_graph(0, f).unwrap();
    step.node_kinds().unwrap().get(IM2COL).copied().unwrap_or(0)
}

/// The convolution of `x` by `w` (+ `bias`) with `p` on the GPU under row cap `rows`, and how
/// many im2col kernels its graph holds.
fn conv_under(
    rows: usize,
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    p: Conv2dParams,
) -> (Tensor, usize) {
    set_conv_gemm_rows(rows);
    let (gx, gw, gb) = (gpu(x), gpu(w), gpu(bias));
    let y = gx.conv2d(&gw, Some(&gb), p).unwrap();
    let nodes = im2col_nodes(|| gx.conv2d(&gw, Some(&gb), p).map(|_| ()));
    (y, nodes)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn small_convolutions_as_one_gemm_match_cpu_and_cudnn() {
    set_conv_nhwc(true);
    let halo = Conv2dParams {
        stride: 1,
        pad_top: 0,
        pad_bottom: 1,
        pad_left: 1,
        pad_right: 1,
    };
    let cases: [(&str, [usize; 4], [usize; 4], Conv2dParams); 5] = [
        (
            "3x3, 256 pixels",
            [1, 64, 8, 32],
            [48, 64, 3, 3],
            Conv2dParams::new(1, 1),
        ),
        (
            "3x3 stride 2, batch 2",
            [2, 16, 9, 7],
            [24, 16, 3, 3],
            Conv2dParams::new(2, 1),
        ),
        ("3x3 halo padding", [1, 32, 6, 10], [16, 32, 3, 3], halo),
        (
            "3x3 over 320 channels",
            [1, 320, 4, 16],
            [64, 320, 3, 3],
            Conv2dParams::new(1, 1),
        ),
        (
            "1x1 padded",
            [1, 24, 5, 6],
            [8, 24, 1, 1],
            Conv2dParams::new(1, 1),
        ),
    ];
    for d in [DType::F16, DType::BF16] {
        for (i, (name, xs, ws, p)) in cases.into_iter().enumerate() {
            let seed = 10 * i as u64;
            let x = rnd(&xs, d, seed + 1);
            let w = rnd(&ws, d, seed + 2).affine(0.3, 0.0).unwrap();
            let bias = rnd(&ws[..1], d, seed + 3);
            let want = x.conv2d(&w, Some(&bias), p).unwrap();
            let (gemm, n_gemm) = conv_under(1 << 20, &x, &w, &bias, p);
            check(&format!("{name} gemm"), d, &gemm, &want);
            assert_eq!(
                n_gemm, 1,
                "{name} {d}: im2col kernels under a cap of 2^20 pixels"
            );
            let (cudnn, n_cudnn) = conv_under(0, &x, &w, &bias, p);
            check(&format!("{name} cudnn"), d, &cudnn, &want);
            assert_eq!(n_cudnn, 0, "{name} {d}: im2col kernels with the path off");
            check(
                &format!("{name} gemm vs cudnn"),
                d,
                &gemm,
                &cudnn.to_device(pcpp_kernels::Device::Cpu).unwrap(),
            );
            // A cap below the convolution's output pixels leaves it to cuDNN.
            let pixels = want.shape()[0] * want.shape()[2] * want.shape()[3];
            let (_, n_below) = conv_under(pixels - 1, &x, &w, &bias, p);
            assert_eq!(
                n_below,
                0,
                "{name} {d}: cap {} below {pixels} pixels",
                pixels - 1
            );
        }
        // 12 channels are not whole 16-byte vectors: cuDNN takes it, with the same result.
        let x = rnd(&[1, 12, 6, 6], d, 90);
        let w = rnd(&[16, 12, 3, 3], d, 91);
        let bias = rnd(&[16], d, 92);
        let p = Conv2dParams::new(1, 1);
        let (y, n) = conv_under(1 << 20, &x, &w, &bias, p);
        check("12 channels", d, &y, &x.conv2d(&w, Some(&bias), p).unwrap());
        assert_eq!(n, 0, "12 channels {d}: no im2col kernel");
    }
    set_conv_gemm_rows(CONV_GEMM_ROWS_DEFAULT);
}

/// A group norm's channels-last output convolved with the time-embedding and residual adds in
/// the output pass (a resnet's second convolution in a band): the GEMM path against the CPU and
/// against cuDNN's.
#[test]
#[ignore = "needs a CUDA GPU"]
fn channels_last_convolution_with_adds_as_one_gemm_matches_cpu_and_cudnn() {
    set_conv_nhwc(true);
    for d in [DType::F16, DType::BF16] {
        let (c, h, w) = (64usize, 8usize, 16usize);
        let x = rnd(&[2, c, h, w], d, 1);
        let (g, b) = (rnd(&[c], d, 2), rnd(&[c], d, 3));
        let n_cpu = x
            .group_norm_nhwc(32, Some(&g), Some(&b), 1e-5, true)
            .unwrap();
        let n_gpu = gpu(&x)
            .group_norm_nhwc(32, Some(&gpu(&g)), Some(&gpu(&b)), 1e-5, true)
            .unwrap();
        let wt = rnd(&[32, c, 3, 3], d, 4).affine(0.2, 0.0).unwrap();
        let (bias, t, r) = (
            rnd(&[32], d, 5),
            rnd(&[2, 32], d, 6),
            rnd(&[2, 32, h, w], d, 7),
        );
        let p = Conv2dParams::new(1, 1);
        let want = n_cpu
            .conv2d_add_nhwc(&wt, Some(&bias), p, Some(&t), Some(&r))
            .unwrap();
        let (gw, gbias, gt, gr) = (gpu(&wt), gpu(&bias), gpu(&t), gpu(&r));
        let run = || n_gpu.conv2d_add_nhwc(&gw, Some(&gbias), p, Some(&gt), Some(&gr));
        set_conv_gemm_rows(1 << 20);
        let gemm = run().unwrap();
        check("conv2d_add_nhwc gemm", d, &gemm, &want);
        assert_eq!(im2col_nodes(|| run().map(|_| ())), 1, "{d}: im2col kernels");
        set_conv_gemm_rows(0);
        let cudnn = run().unwrap();
        check("conv2d_add_nhwc cudnn", d, &cudnn, &want);
        check(
            "conv2d_add_nhwc gemm vs cudnn",
            d,
            &gemm,
            &cudnn.to_device(pcpp_kernels::Device::Cpu).unwrap(),
        );
    }
    set_conv_gemm_rows(CONV_GEMM_ROWS_DEFAULT);
}
