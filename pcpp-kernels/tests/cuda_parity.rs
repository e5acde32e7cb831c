//! Parity of every CUDA op against its CPU twin on random inputs, in f32, f16 and bf16. Ignored by
//! default (needs a GPU): `cargo test -p pcpp-kernels --features cuda --test cuda_parity -- --ignored`.
//! Both sides start from the same rounded inputs; the GPU may only differ by accumulation order
//! and intermediate rounding, bounded relative to the output's magnitude per dtype.
#![cfg(feature = "cuda")]

use pcpp_kernels::{Activation, Conv2dParams, DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Tolerance on `max|gpu − cpu| / max(1, max|cpu|)`.
fn tol(d: DType) -> f32 {
    match d {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        DType::BF16 => 6e-2,
    }
}

fn rnd(shape: &[usize], d: DType, seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, d, Device::Cpu, (-1.0, 1.0), seed).unwrap()
}

fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

fn check(name: &str, d: DType, got: &Tensor, want: &Tensor) {
    assert_eq!(got.device(), GPU, "{name}: result not on the GPU");
    assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
    let got = got.to_device(Device::Cpu).unwrap();
    assert_eq!(got.shape(), want.shape(), "{name}: shape");
    let diff = got.max_abs_diff(want).unwrap();
    let scale = want.max_abs().unwrap().max(1.0);
    let g = got.to_vec_f32().unwrap();
    assert!(
        g.iter().all(|x| x.is_finite()),
        "{name} {d}: non-finite output"
    );
    let e = diff / scale;
    println!("{name:<28} {d:<5} rel err {e:.2e}");
    assert!(e <= tol(d), "{name} {d}: rel err {e:e} > {}", tol(d));
}

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
        check(
            "mixed-device add",
            d,
            &ga.add(&col).unwrap(),
            &a.add(&col).unwrap(),
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
        let gx = gpu(&x);
        for silu in [false, true] {
            check(
                &format!("group_norm silu={silu}"),
                d,
                &gx.group_norm(8, Some(&gpu(&g)), Some(&gpu(&b)), 1e-5, silu)
                    .unwrap(),
                &x.group_norm(8, Some(&g), Some(&b), 1e-5, silu).unwrap(),
            );
        }
        let (sc, sg) = (x.group_stats(8).unwrap(), gx.group_stats(8).unwrap());
        for (c, g) in sc.sums.iter().zip(&sg.sums) {
            for i in 0..3 {
                assert!(
                    (c[i] - g[i]).abs() <= 1e-3 * (1.0 + c[i].abs()),
                    "group_stats {d}: {c:?} vs {g:?}"
                );
            }
        }
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
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_matches_cpu() {
    for d in DTYPES {
        // Head size 16 takes the cuBLAS path, 64 the fused kernel (f16/bf16); odd lengths test
        // the tile edges.
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
        ] {
            let q = rnd(&[2, lq, heads * dh], d, 1).affine(2.0, 0.0).unwrap();
            let k = rnd(&[2, lk, heads * dh], d, 2).affine(2.0, 0.0).unwrap();
            let v = rnd(&[2, lk, heads * dh], d, 3);
            let got = Tensor::attention(&gpu(&q), &gpu(&k), &gpu(&v), heads, causal).unwrap();
            let want = Tensor::attention(&q, &k, &v, heads, causal).unwrap();
            check(
                &format!("attention {lq}x{lk} h{heads}x{dh} c={causal}"),
                d,
                &got,
                &want,
            );
        }
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
