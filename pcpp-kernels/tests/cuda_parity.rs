//! Parity of every CUDA op against its CPU twin on random inputs, in f32, f16 and bf16. Ignored by
//! default (needs a GPU): `cargo test -p pcpp-kernels --features cuda --test cuda_parity -- --ignored`.
//! Both sides start from the same rounded inputs; the GPU may only differ by accumulation order
//! and intermediate rounding, bounded relative to the output's magnitude per dtype.
#![cfg(feature = "cuda")]

mod common;

use common::{check, check_group_norm, gpu, rnd, DTYPES, GPU};
use pcpp_kernels::cuda::{set_flash128, set_flash_persistent, Flash128};
use pcpp_kernels::{Activation, Conv2dParams, DType, Device, Tensor};

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_round_trip_is_exact() {
    for d in DTYPES {
        let x = rnd(&[3, 5, 7], d, 1);
        let back = gpu(&x).to_device(Device::Cpu).unwrap();
        assert_eq!(back.to_bytes().unwrap(), x.to_bytes().unwrap());
        for d2 in DTYPES {
            check(
                "to_dtype",
                d2,
                &gpu(&x).to_dtype(d2).unwrap(),
                &x.to_dtype(d2).unwrap(),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rand_uniform_matches_cpu() {
    for d in DTYPES {
        let c = Tensor::rand_uniform(&[1000], d, Device::Cpu, (-2.0, 3.0), 7).unwrap();
        let g = Tensor::rand_uniform(&[1000], d, GPU, (-2.0, 3.0), 7).unwrap();
        check("rand_uniform", d, &g, &c);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn elementwise_ops_match_cpu() {
    for d in DTYPES {
        let a = rnd(&[2, 8, 5, 6], d, 1);
        let b = rnd(&[2, 8, 5, 6], d, 2);
        let col = rnd(&[1, 8, 1, 1], d, 3);
        let row = rnd(&[6], d, 4);
        let (ga, gb) = (gpu(&a), gpu(&b));
        check("add", d, &ga.add(&gb).unwrap(), &a.add(&b).unwrap());
        check(
            "sub bcast",
            d,
            &ga.sub(&gpu(&col)).unwrap(),
            &a.sub(&col).unwrap(),
        );
        check(
            "mul bcast",
            d,
            &ga.mul(&gpu(&row)).unwrap(),
            &a.mul(&row).unwrap(),
        );
        let bp = b.affine(0.5, 2.0).unwrap();
        check("div", d, &ga.div(&gpu(&bp)).unwrap(), &a.div(&bp).unwrap());
        assert!(
            ga.add(&col).is_err(),
            "{d}: an add of a GPU and a CPU tensor must be refused, not copied"
        );
        check(
            "affine",
            d,
            &ga.affine(1.5, -0.25).unwrap(),
            &a.affine(1.5, -0.25).unwrap(),
        );
        check(
            "clamp",
            d,
            &ga.clamp(-0.3, 0.4).unwrap(),
            &a.clamp(-0.3, 0.4).unwrap(),
        );
        for act in [
            Activation::Silu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::QuickGelu,
            Activation::Relu,
        ] {
            check(
                &format!("act {act:?}"),
                d,
                &ga.act(act).unwrap(),
                &a.act(act).unwrap(),
            );
        }
        let x = rnd(&[3, 4, 10], d, 5);
        check("geglu", d, &gpu(&x).geglu().unwrap(), &x.geglu().unwrap());
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_ops_match_cpu() {
    for d in DTYPES {
        let x = rnd(&[2, 77, 96], d, 1);
        let w = rnd(&[80, 96], d, 2);
        let bias = rnd(&[80], d, 3);
        check(
            "linear+bias",
            d,
            &gpu(&x).linear(&gpu(&w), Some(&gpu(&bias))).unwrap(),
            &x.linear(&w, Some(&bias)).unwrap(),
        );
        check(
            "linear",
            d,
            &gpu(&x).linear(&gpu(&w), None).unwrap(),
            &x.linear(&w, None).unwrap(),
        );
        let a = rnd(&[3, 17, 24], d, 4);
        let b = rnd(&[3, 24, 9], d, 5);
        check(
            "matmul",
            d,
            &gpu(&a).matmul(&gpu(&b)).unwrap(),
            &a.matmul(&b).unwrap(),
        );
    }
    // A computed in another dtype than its weights (f32 activations, f16 weights).
    let x = rnd(&[4, 32], DType::F32, 6);
    let w = rnd(&[16, 32], DType::F16, 7);
    let want = x.linear(&w, None).unwrap();
    let got = gpu(&x).linear(&gpu(&w), None).unwrap();
    check("linear f32 x f16 w", DType::F16, &got, &want);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conv2d_matches_cpu() {
    for d in DTYPES {
        let x = rnd(&[2, 16, 12, 10], d, 1);
        let w3 = rnd(&[24, 16, 3, 3], d, 2);
        let w1 = rnd(&[8, 16, 1, 1], d, 3);
        let b = rnd(&[24], d, 4);
        for (name, w, bias, p) in [
            ("conv3x3 pad1", &w3, Some(&b), Conv2dParams::new(1, 1)),
            ("conv3x3 stride2", &w3, Some(&b), Conv2dParams::new(2, 1)),
            ("conv1x1", &w1, None, Conv2dParams::new(1, 0)),
            (
                "conv3x3 halo pads",
                &w3,
                Some(&b),
                Conv2dParams {
                    stride: 1,
                    pad_top: 0,
                    pad_bottom: 1,
                    pad_left: 1,
                    pad_right: 1,
                },
            ),
        ] {
            let bg = bias.map(gpu);
            let got = gpu(&x).conv2d(&gpu(w), bg.as_ref(), p).unwrap();
            check(name, d, &got, &x.conv2d(w, bias, p).unwrap());
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn norms_match_cpu() {
    for d in DTYPES {
        let x = rnd(&[2, 32, 9, 7], d, 1).affine(3.0, 0.5).unwrap();
        let g = rnd(&[32], d, 2);
        let b = rnd(&[32], d, 3);
        let sc = check_group_norm("", d, &x, &g, &b);
        let gx = gpu(&x);
        check(
            "group_norm_with_stats",
            d,
            &gx.group_norm_with_stats(&sc, Some(&gpu(&g)), None, 1e-6, true)
                .unwrap(),
            &x.group_norm_with_stats(&sc, Some(&g), None, 1e-6, true)
                .unwrap(),
        );
        let t = rnd(&[2, 5, 48], d, 4).affine(2.0, 1.0).unwrap();
        let lg = rnd(&[48], d, 5);
        let lb = rnd(&[48], d, 6);
        check(
            "layer_norm",
            d,
            &gpu(&t)
                .layer_norm(Some(&gpu(&lg)), Some(&gpu(&lb)), 1e-5)
                .unwrap(),
            &t.layer_norm(Some(&lg), Some(&lb), 1e-5).unwrap(),
        );
        check(
            "rms_norm",
            d,
            &gpu(&t).rms_norm(Some(&gpu(&lg)), 1e-6).unwrap(),
            &t.rms_norm(Some(&lg), 1e-6).unwrap(),
        );
        check(
            "softmax",
            d,
            &gpu(&t).softmax().unwrap(),
            &t.softmax().unwrap(),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_matches_cpu() {
    for d in DTYPES {
        // Head size 16 takes the cuBLAS path, 64 and 128 the fused kernels (f16/bf16); odd
        // lengths test the tile edges.
        for (lq, lk, heads, dh, causal) in [
            (64, 64, 4, 16, false),
            (50, 77, 2, 16, false),
            (33, 33, 3, 16, true),
            (300, 300, 2, 16, false),
            (64, 64, 1, 64, false),
            (130, 77, 2, 64, false),
            (200, 200, 3, 64, true),
            (77, 77, 2, 64, true),
            (1024, 1024, 2, 64, false),
            (64, 64, 1, 128, false),
            (130, 77, 2, 128, false),
            (200, 200, 3, 128, true),
            (33, 47, 2, 128, true),
            (1100, 1100, 2, 128, false),
            (257, 700, 3, 64, false),
            (257, 700, 3, 128, false),
            (640, 256, 2, 128, true),
            (129, 2000, 1, 64, false),
            (384, 2000, 1, 128, true),
            (385, 385, 2, 64, true),
            (3000, 3000, 10, 64, false),
            // more query tiles than multiprocessors: the persistent grid, with a causal mask,
            // partial tiles and both head sizes
            (385, 385, 40, 64, true),
            (300, 700, 24, 128, false),
            // rows split between 192- and 128-row tiles on 132 multiprocessors (384 and 149 of
            // 533: 108 and 108 blocks), with and without the causal mask
            (533, 8192, 27, 64, false),
            (533, 8192, 27, 64, true),
        ] {
            let q = rnd(&[2, lq, heads * dh], d, 1).affine(2.0, 0.0).unwrap();
            let k = rnd(&[2, lk, heads * dh], d, 2).affine(2.0, 0.0).unwrap();
            let v = rnd(&[2, lk, heads * dh], d, 3);
            let want = Tensor::attention(&q, &k, &v, heads, causal).unwrap();
            // every kernel: Q in registers, Q in shared memory, that with 64-key tiles (head size
            // 128), and Hopper's warpgroup MMAs (head sizes 64 and 128; the default, and with the
            // intra-warpgroup overlap, three MMA warpgroups at head size 64)
            for variant in [
                Flash128::RegistersQ,
                Flash128::SharedQ,
                Flash128::SharedQ64,
                Flash128::Hopper,
                Flash128::Warpspec,
                Flash128::Warpspec2,
                Flash128::WarpspecWhole,
                Flash128::WarpspecPingpong,
                Flash128::WarpspecOverlap,
                Flash128::Warpspec3,
                Flash128::Warpspec3Overlap,
                Flash128::WarpspecNoSmall,
            ] {
                set_flash128(variant);
                let got = Tensor::attention(&gpu(&q), &gpu(&k), &gpu(&v), heads, causal).unwrap();
                check(
                    &format!("attention {lq}x{lk} h{heads}x{dh} c={causal} {variant:?}"),
                    d,
                    &got,
                    &want,
                );
            }
            // Every row goes through the same MMAs and softmax whether its tile is persistent or
            // not, 128 or 192 rows high, or in the first or the second launch of a split grid:
            // same bits. With a causal mask the tile height changes how many masked key tiles
            // a row passes (each rescales by the rounding residue of its maximum), so there only
            // the persistent and the per-tile grid of one height are compared.
            let run = |variant: Flash128, persistent: bool| {
                set_flash128(variant);
                set_flash_persistent(persistent);
                let y = Tensor::attention(&gpu(&q), &gpu(&k), &gpu(&v), heads, causal)
                    .unwrap()
                    .to_vec_f32()
                    .unwrap();
                set_flash_persistent(true);
                y
            };
            // The warp-specialised grids only: the default takes a band's small grids to the
            // small-grid kernel (other MMAs), which `cuda_vector_parity` compares bit for bit
            // with the 128-row `mma.sync` kernel.
            let base = run(Flash128::WarpspecNoSmall, true);
            let others = [
                (Flash128::WarpspecNoSmall, false),
                (Flash128::WarpspecWhole, true),
                (Flash128::Warpspec3, true),
                (Flash128::Warpspec3, false),
                (Flash128::Warpspec2, false),
            ];
            let compared = if causal { 1 } else { others.len() };
            for (variant, persistent) in others.into_iter().take(compared) {
                let got = run(variant, persistent);
                assert!(
                    base.iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "attention {lq}x{lk} h{heads}x{dh} c={causal}: {variant:?} (persistent \
                     {persistent}) differs from the warp-specialised grid's bits"
                );
            }
            set_flash128(Flash128::Warpspec);
        }
    }
}

/// The Hopper kernels must be the ones tested on a Hopper GPU, not a silent fallback.
#[test]
#[ignore = "needs a CUDA GPU"]
fn hopper_attention_is_taken_on_hopper() {
    let g = pcpp_kernels::cuda::gpu(0).unwrap();
    if g.arch() == "sm_90a" {
        assert!(
            g.has_hopper_attention() && g.has_warpspec_attention() && g.has_warpspec3_attention(),
            "sm_90a device without the Hopper attention kernels"
        );
    } else {
        assert!(
            !g.has_hopper_attention()
                && !g.has_warpspec_attention()
                && !g.has_warpspec3_attention(),
            "{}: Hopper kernels on a non-sm_90a device",
            g.arch()
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn layout_ops_match_cpu() {
    for d in DTYPES {
        let x = rnd(&[2, 3, 4, 5], d, 1);
        let y = rnd(&[2, 2, 4, 5], d, 2);
        let (gx, gy) = (gpu(&x), gpu(&y));
        check(
            "upsample2x",
            d,
            &gx.upsample_nearest2x().unwrap(),
            &x.upsample_nearest2x().unwrap(),
        );
        check(
            "cat dim1",
            d,
            &Tensor::cat(&[&gx, &gy], 1).unwrap(),
            &Tensor::cat(&[&x, &y], 1).unwrap(),
        );
        check(
            "cat dim3",
            d,
            &Tensor::cat(&[&gx, &gx], 3).unwrap(),
            &Tensor::cat(&[&x, &x], 3).unwrap(),
        );
        // Rows of whole 16-byte words take the vectorised copy.
        let big = rnd(&[2, 16, 8, 8], d, 9);
        let gb = gpu(&big);
        check(
            "cat aligned",
            d,
            &Tensor::cat(&[&gb, &gb], 1).unwrap(),
            &Tensor::cat(&[&big, &big], 1).unwrap(),
        );
        check(
            "narrow aligned",
            d,
            &gb.narrow(1, 8, 8).unwrap(),
            &big.narrow(1, 8, 8).unwrap(),
        );
        check(
            "narrow dim2",
            d,
            &gx.narrow(2, 1, 2).unwrap(),
            &x.narrow(2, 1, 2).unwrap(),
        );
        check(
            "permute",
            d,
            &gx.permute(&[0, 2, 3, 1]).unwrap(),
            &x.permute(&[0, 2, 3, 1]).unwrap(),
        );
        check(
            "to_tokens",
            d,
            &gx.to_tokens().unwrap(),
            &x.to_tokens().unwrap(),
        );
        let tok = x.to_tokens().unwrap();
        check(
            "from_tokens",
            d,
            &gpu(&tok).from_tokens(4, 5).unwrap(),
            &tok.from_tokens(4, 5).unwrap(),
        );
        let table = rnd(&[10, 6], d, 3);
        let ids = Tensor::from_vec(&[2, 3], vec![0.0, 9.0, 3.0, 3.0, 1.0, 7.0]).unwrap();
        check(
            "embedding",
            d,
            &Tensor::embedding(&ids, &gpu(&table)).unwrap(),
            &Tensor::embedding(&ids, &table).unwrap(),
        );
        let t = Tensor::from_vec(&[3], vec![0.0, 500.0, 999.0])
            .unwrap()
            .to_dtype(d)
            .unwrap();
        for (flip, shift) in [(true, 0.0), (false, 1.0)] {
            check(
                "timestep_embedding",
                d,
                &gpu(&t).timestep_embedding(320, flip, shift).unwrap(),
                &t.timestep_embedding(320, flip, shift).unwrap(),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn missing_gpu_is_an_error_not_a_panic() {
    let err = Tensor::scalar(1.0).to_device(Device::Cuda(99)).unwrap_err();
    assert!(err.to_string().contains("cuda:99"), "{err}");
}

/// Moments of the row bands of `x: [b, c, h, w]` (cut along dim 2 at `rows`), stacked as
/// `[p, b·groups, 2]` on `x`'s device, and each band's element count per (batch, group).
fn band_moments(x: &Tensor, groups: usize, rows: &[usize]) -> (Tensor, Vec<f64>) {
    let (c, w) = (x.shape()[1], x.shape()[3]);
    let mut start = 0;
    let mut ms = Vec::new();
    let mut counts = Vec::new();
    for &r in rows {
        let m = x
            .narrow(2, start, r)
            .unwrap()
            .group_moments(groups)
            .unwrap();
        start += r;
        let bg = m.shape()[0];
        ms.push(m.reshape(&[1, bg, 2]).unwrap());
        counts.push((c / groups * r * w) as f64);
    }
    let refs: Vec<&Tensor> = ms.iter().collect();
    (Tensor::cat(&refs, 0).unwrap(), counts)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn group_moments_match_cpu() {
    for d in DTYPES {
        // The second shape has groups longer than one gn_sums chunk (8192 elements); the third
        // a grid of more than four blocks per multiprocessor of those, which takes longer
        // chunks, the last of them partial.
        for (shape, groups) in [
            (vec![2, 32, 9, 7], 8),
            (vec![1, 8, 64, 80], 2),
            (vec![2, 32, 512, 512], 32),
        ] {
            let x = rnd(&shape, d, 1).affine(3.0, 0.5).unwrap();
            let want = x.group_moments(groups).unwrap();
            let got = gpu(&x).group_moments(groups).unwrap();
            assert_eq!(got.device(), GPU, "group_moments: result not on the GPU");
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(got.shape(), want.shape());
            let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
            for (i, (gv, wv)) in g.iter().zip(&w).enumerate() {
                assert!(
                    (gv - wv).abs() <= 1e-4 * (1.0 + wv.abs()),
                    "group_moments {d} {shape:?} [{i}]: {gv} vs {wv}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn group_norm_merged_matches_cpu() {
    for d in DTYPES {
        let x = rnd(&[2, 32, 9, 7], d, 1).affine(3.0, 0.5).unwrap();
        let x_new = rnd(&[2, 32, 9, 7], d, 7).affine(2.0, 0.25).unwrap();
        let g = rnd(&[32], d, 2);
        let b = rnd(&[32], d, 3);
        let gx = gpu(&x);
        let rows = [3, 1, 5];
        // The same band moments on both sides (computed on the GPU, copied to the host).
        let (gbands, counts) = band_moments(&gx, 8, &rows);
        let bands = gbands.to_device(Device::Cpu).unwrap();
        // Rank 1's current moments (of another input) for the corrected rule.
        let gfresh = gpu(&x_new)
            .narrow(2, 3, 1)
            .unwrap()
            .group_moments(8)
            .unwrap();
        let fresh = gfresh.to_device(Device::Cpu).unwrap();
        for silu in [false, true] {
            check(
                &format!("group_norm_merged silu={silu}"),
                d,
                &gx.group_norm_merged(
                    8,
                    &gbands,
                    &counts,
                    None,
                    Some(&gpu(&g)),
                    Some(&gpu(&b)),
                    1e-5,
                    silu,
                )
                .unwrap(),
                &x.group_norm_merged(8, &bands, &counts, None, Some(&g), Some(&b), 1e-5, silu)
                    .unwrap(),
            );
            check(
                &format!("group_norm_merged corrected silu={silu}"),
                d,
                &gx.group_norm_merged(
                    8,
                    &gbands,
                    &counts,
                    Some((1, &gfresh)),
                    Some(&gpu(&g)),
                    None,
                    1e-5,
                    silu,
                )
                .unwrap(),
                &x.group_norm_merged(
                    8,
                    &bands,
                    &counts,
                    Some((1, &fresh)),
                    Some(&g),
                    None,
                    1e-5,
                    silu,
                )
                .unwrap(),
            );
        }
        // Merged band moments reproduce the whole-tensor group norm on the GPU too.
        check(
            "group_norm_merged vs group_norm",
            d,
            &gx.group_norm_merged(8, &gbands, &counts, None, None, None, 1e-5, false)
                .unwrap(),
            &x.group_norm(8, None, None, 1e-5, false).unwrap(),
        );
        // The corrected rule's negative-variance fallback (one group, bands set by hand: stale
        // total mean 0, var 1; corrected mean 2, E[x²] 1.5 < 4, so fresh's variance 0.5 is used).
        let xs = rnd(&[1, 4, 3], d, 9);
        let hb = Tensor::from_vec(&[2, 1, 2], vec![1.0, 0.0, -1.0, 0.0]).unwrap();
        let hf = Tensor::from_vec(&[1, 2], vec![1.0, 2.0]).unwrap();
        let hc = [4.0, 4.0];
        check(
            "group_norm_merged fallback",
            d,
            &gpu(&xs)
                .group_norm_merged(
                    1,
                    &gpu(&hb),
                    &hc,
                    Some((1, &gpu(&hf))),
                    None,
                    None,
                    1e-5,
                    false,
                )
                .unwrap(),
            &xs.group_norm_merged(1, &hb, &hc, Some((1, &hf)), None, None, 1e-5, false)
                .unwrap(),
        );
    }
    // Bands on another device than the input are an error, not a silent copy.
    let x = rnd(&[1, 4, 2, 2], DType::F32, 1);
    let bands = x.group_moments(2).unwrap().reshape(&[1, 2, 2]).unwrap();
    let e = gpu(&x)
        .group_norm_merged(2, &bands, &[8.0], None, None, None, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("group_norm_merged") && e.contains("cpu"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn zeros_on_matches_cpu() {
    for d in DTYPES {
        // Fill the memory pool with non-zeros first, so that reused memory must be cleared.
        drop(Tensor::rand_uniform(&[4096], d, GPU, (1.0, 2.0), 3).unwrap());
        for shape in [vec![4096], vec![3, 5, 7], vec![0]] {
            let z = Tensor::zeros_on(&shape, d, GPU).unwrap();
            assert_eq!(z.device(), GPU);
            assert_eq!(z.dtype(), d);
            assert_eq!(z.shape(), &shape[..]);
            let n: usize = shape.iter().product();
            assert_eq!(
                z.to_bytes().unwrap(),
                vec![0u8; n * d.size()],
                "zeros_on {d} {shape:?}"
            );
        }
    }
}

/// `cuMemcpyDtoDAsync` of all of `src` into `dst` on the comm stream of `g` (as NCCL would use
/// the raw pointers and stream).
fn copy_on_comm(
    g: &pcpp_kernels::cuda::Gpu,
    src: &Tensor,
    dst: &Tensor,
) -> pcpp_kernels::Result<()> {
    assert_eq!(src.size_in_bytes(), dst.size_in_bytes());
    let err = |e: cudarc::driver::DriverError| pcpp_kernels::KernelError::Device {
        device: "cuda:0".into(),
        msg: format!("cuMemcpyDtoDAsync: {e:?}"),
    };
    g.comm_stream().context().bind_to_thread().map_err(err)?;
    // SAFETY: both addresses are live device allocations of `size_in_bytes` bytes; the stream is
    // the device's comm stream.
    unsafe {
        cudarc::driver::result::memcpy_dtod_async(
            dst.cuda_ptr()?,
            src.cuda_ptr()?,
            src.size_in_bytes(),
            g.comm_stream_raw() as cudarc::driver::sys::CUstream,
        )
    }
    .map_err(err)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn comm_stream_fork_join_orders_work() {
    let g = pcpp_kernels::cuda::gpu(0).unwrap();
    assert_ne!(
        g.comm_stream_raw(),
        g.stream().cu_stream() as *mut std::ffi::c_void
    );
    assert_eq!(
        g.comm_stream_raw(),
        g.comm_stream().cu_stream() as *mut std::ffi::c_void
    );
    assert!(Tensor::scalar(1.0).cuda_ptr().is_err());
    // Large enough that a copy racing the producing kernel or the consuming one would be seen.
    let n = 1 << 24;
    let x = Tensor::rand_uniform(&[n], DType::F32, GPU, (-1.0, 1.0), 5).unwrap();
    for round in 0..3 {
        let y = x.affine(2.0, round as f32).unwrap();
        let dst = Tensor::zeros_on(&[n], DType::F32, GPU).unwrap();
        g.fork_to_comm().unwrap();
        copy_on_comm(&g, &y, &dst).unwrap();
        g.join_comm().unwrap();
        let z = dst.affine(1.0, 0.0).unwrap();
        assert_eq!(
            z.to_vec_f32().unwrap(),
            y.to_vec_f32().unwrap(),
            "round {round}: the comm-stream copy was not ordered between compute work"
        );
    }
    g.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn capture_graph_records_forked_comm_work() {
    let g = pcpp_kernels::cuda::gpu(0).unwrap();
    let n = 1 << 20;
    let src = Tensor::zeros_on(&[n], DType::F32, GPU).unwrap();
    let mid = Tensor::zeros_on(&[n], DType::F32, GPU).unwrap();
    let dst = Tensor::zeros_on(&[n], DType::F32, GPU).unwrap();
    let out = Tensor::zeros_on(&[n], DType::F32, GPU).unwrap();
    // compute: mid = 2·src + 1 → comm: dst = mid → compute: out = dst + 3.
    let step = pcpp_kernels::cuda::capture_graph(0, || {
        let t = src.affine(2.0, 1.0)?;
        pcpp_kernels::cuda::copy_into(&t, &mid)?;
        g.fork_to_comm()?;
        copy_on_comm(&g, &mid, &dst)?;
        g.join_comm()?;
        let u = dst.affine(1.0, 3.0)?;
        pcpp_kernels::cuda::copy_into(&u, &out)
    })
    .unwrap();
    // Capturing ran nothing.
    assert!(dst.to_vec_f32().unwrap().iter().all(|&v| v == 0.0));
    for seed in [11, 12] {
        let fresh = Tensor::rand_uniform(&[n], DType::F32, GPU, (-1.0, 1.0), seed).unwrap();
        pcpp_kernels::cuda::copy_into(&fresh, &src).unwrap();
        step.replay().unwrap();
        let want_mid = fresh.affine(2.0, 1.0).unwrap();
        let want_out = want_mid.affine(1.0, 3.0).unwrap();
        assert_eq!(
            dst.to_bytes().unwrap(),
            want_mid.to_bytes().unwrap(),
            "seed {seed}: dst"
        );
        assert_eq!(
            out.to_bytes().unwrap(),
            want_out.to_bytes().unwrap(),
            "seed {seed}: out"
        );
    }
    // Comm work left unjoined in the closure is joined back by capture_graph.
    let step = pcpp_kernels::cuda::capture_graph(0, || {
        g.fork_to_comm()?;
        copy_on_comm(&g, &src, &dst)
    })
    .unwrap();
    step.replay().unwrap();
    g.synchronize().unwrap();
    assert_eq!(dst.to_bytes().unwrap(), src.to_bytes().unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_nodes_switch_off_and_back_on() {
    let n = 1 << 16;
    let src = Tensor::rand_uniform(&[n], DType::F32, GPU, (-1.0, 1.0), 5).unwrap();
    let out = Tensor::zeros_on(&[n], DType::F32, GPU).unwrap();
    let step = pcpp_kernels::cuda::capture_graph(0, || {
        let t = src.affine(2.0, 1.0)?;
        pcpp_kernels::cuda::copy_into(&t, &out)
    })
    .unwrap();
    let kinds = step.node_kinds().unwrap();
    let kernels: usize = kinds
        .iter()
        .filter(|(k, _)| !k.starts_with('('))
        .map(|(_, n)| n)
        .sum();
    assert!(kernels >= 1, "no kernel node among {kinds:?}");
    assert!(
        kinds.keys().all(|k| !k.starts_with("_Z")),
        "unshortened names in {kinds:?}"
    );
    // Everything off: the replay leaves `out` as it was.
    let off = step.set_kinds_enabled(&|_| true, false).unwrap();
    assert_eq!(off, (kinds.values().sum::<usize>(), 0));
    step.replay().unwrap();
    assert!(out.to_vec_f32().unwrap().iter().all(|&v| v == 0.0));
    // Back on: the captured work again.
    assert_eq!(step.set_kinds_enabled(&|_| true, true).unwrap(), off);
    step.replay().unwrap();
    assert_eq!(
        out.to_bytes().unwrap(),
        src.affine(2.0, 1.0).unwrap().to_bytes().unwrap()
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn patch_parallel_group_norm_captures_into_a_graph() {
    // group_moments + group_norm_merged (corrected) inside a capture: no host round trip.
    let x = Tensor::rand_uniform(&[2, 32, 8, 6], DType::F16, GPU, (-1.0, 1.0), 3).unwrap();
    let (bands, counts) = band_moments(&x, 8, &[3, 5]);
    let y = Tensor::zeros_on(&[2, 32, 8, 6], DType::F16, GPU).unwrap();
    let step = pcpp_kernels::cuda::capture_graph(0, || {
        let fresh = x.narrow(2, 3, 5)?.group_moments(8)?;
        let r = x.group_norm_merged(
            8,
            &bands,
            &counts,
            Some((1, &fresh)),
            None,
            None,
            1e-5,
            true,
        )?;
        pcpp_kernels::cuda::copy_into(&r, &y)
    })
    .unwrap();
    step.replay().unwrap();
    let fresh = x.narrow(2, 3, 5).unwrap().group_moments(8).unwrap();
    let want = x
        .group_norm_merged(
            8,
            &bands,
            &counts,
            Some((1, &fresh)),
            None,
            None,
            1e-5,
            true,
        )
        .unwrap();
    check(
        "captured group_norm_merged",
        DType::F16,
        &y,
        &want.to_device(Device::Cpu).unwrap(),
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn nonfinite_flag_matches_the_cpu_and_keeps_the_smallest_code() {
    for d in DTYPES {
        let mut v = vec![0.5f32; 100_003];
        let clean = Tensor::from_vec(&[100_003], v.clone())
            .unwrap()
            .to_dtype(d)
            .unwrap();
        v[77_777] = f32::INFINITY;
        let bad = Tensor::from_vec(&[100_003], v)
            .unwrap()
            .to_dtype(d)
            .unwrap();
        let f = Tensor::finite_flag(GPU).unwrap();
        let f = gpu(&clean).nonfinite_flag(&f, 0.0).unwrap();
        assert_eq!(f.flag_code().unwrap(), None, "{d}: clean tensor flagged");
        let f = gpu(&bad).nonfinite_flag(&f, 12.0).unwrap();
        let f = gpu(&bad).nonfinite_flag(&f, 30.0).unwrap();
        assert_eq!(f.device(), GPU);
        assert_eq!(f.flag_code().unwrap(), Some(12.0), "{d}");
        let c = bad
            .nonfinite_flag(&Tensor::finite_flag(Device::Cpu).unwrap(), 12.0)
            .unwrap();
        assert_eq!(c.flag_code().unwrap(), Some(12.0), "{d}: CPU twin");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn an_op_with_operands_on_two_devices_is_an_error_naming_both() {
    let a = rnd(&[4, 8], DType::F32, 1);
    let w = rnd(&[3, 8], DType::F32, 2);
    for (name, r) in [
        ("add", gpu(&a).add(&a).map(|_| ())),
        ("linear", a.linear(&gpu(&w), None).map(|_| ())),
        ("cat", Tensor::cat(&[&gpu(&a), &a], 0).map(|_| ())),
    ] {
        let e = r.expect_err(name).to_string();
        assert!(e.contains("cuda:0") && e.contains("cpu"), "{name}: {e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn convolutions_too_large_for_cudnn_run_in_bands_with_the_same_result() {
    use pcpp_kernels::cuda::conv2d_in_bands;
    let x = gpu(&rnd(&[2, 8, 37, 21], DType::F32, 5));
    let w = gpu(&rnd(&[6, 8, 3, 3], DType::F32, 6));
    let bias = gpu(&rnd(&[6], DType::F32, 7));
    for (stride, pad) in [(1, 1), (2, 1), (1, 0)] {
        let p = Conv2dParams::new(stride, pad);
        let whole = x.conv2d(&w, Some(&bias), p).unwrap();
        // A limit of a few rows forces many bands, the first and last padded on one side only.
        let banded = conv2d_in_bands(&x, &w, Some(&bias), p, 4 * 2 * 8 * 21 * 4).unwrap();
        assert_eq!(banded.shape(), whole.shape(), "stride {stride} pad {pad}");
        let d = banded
            .to_device(Device::Cpu)
            .unwrap()
            .max_abs_diff(&whole.to_device(Device::Cpu).unwrap())
            .unwrap();
        assert!(d <= 1e-5, "stride {stride} pad {pad}: max|Δ| {d:e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_profile_times_each_op_kind_and_only_while_on() {
    use pcpp_kernels::cpu::profile::{self, Kernel};
    let x = gpu(&rnd(&[1, 64, 64, 64], DType::F16, 1));
    let w = gpu(&rnd(&[64, 64, 3, 3], DType::F16, 2));
    let p = Conv2dParams::new(1, 1);
    x.conv2d(&w, None, p).unwrap();
    profile::reset();
    profile::enable(true);
    for _ in 0..3 {
        x.conv2d(&w, None, p).unwrap();
    }
    x.act(Activation::Silu).unwrap();
    profile::enable(false);
    x.conv2d(&w, None, p).unwrap();
    pcpp_kernels::flush_gpu_profile().unwrap();
    let stats = profile::snapshot();
    let of = |k: Kernel| stats.iter().find(|s| s.kernel == k).copied().unwrap();
    assert_eq!(
        of(Kernel::Conv2d).calls,
        3,
        "only the convolutions run while on"
    );
    assert!(of(Kernel::Conv2d).seconds > 0.0);
    assert_eq!(of(Kernel::Elementwise).calls, 1);
    assert_eq!(of(Kernel::Attention).calls, 0);
}
