//! Parity of the vectorised element-wise kernels, the row-broadcast kernel and the
//! one-warp-per-row norms (`PCPP_VECTOR_KERNELS`) against the CPU twins, in f32, f16 and bf16:
//! shapes that take the 16-byte path and shapes that do not (odd extents), both operand orders of
//! a row broadcast (also for the non-commutative sub and div), rows of 128 (Flux's per-head QK
//! norms) and of 3072, the rotary embedding of adjacent pairs and AdaLN's modulated layer norm
//! and gated add (fused and composed), concatenation in one launch, a linear layer with its
//! GELU in cuBLASLt's epilogue, the per-plane kernels (group norm, `[b, c, 1, 1]` broadcasts),
//! the two-element transpose, and convolutions in NHWC (kept filters, bias fused into the output
//! transpose) against the CPU and against cuDNN's NCHW calls, GEMMs and convolutions with timed
//! algorithm choices, convolutions with their time-embedding and residual adds in the output pass,
//! group norm written channels-last for the convolution after it, `1×1` convolutions as GEMMs,
//! layer norms with the row in registers, the residual sum and layer norm in one launch, and
//! attention over column blocks read in place (the small-row GEMMs: `cuda_small_gemm`). Ignored by default (needs a GPU):
//! `cargo test -p pcpp-kernels --features cuda --test cuda_vector_parity -- --ignored`.
#![cfg(feature = "cuda")]

mod common;

use common::{check, check_group_norm, gpu, rnd, DTYPES};
use pcpp_kernels::cuda::{set_conv_nhwc, set_flash128, set_vector_kernels, Flash128};
use pcpp_kernels::{Activation, Conv2dParams, DType, Tensor};

#[test]
#[ignore = "needs a CUDA GPU"]
fn vector_kernels_match_cpu() {
    set_vector_kernels(true);
    for d in DTYPES {
        // Rows of 8, 4.5 (not vectorised), 640 and 1 100 16-byte vectors at 16 bits (SDXL's
        // feed-forward width and a wider one; twice as many at f32).
        for shape in [[2usize, 37, 64], [3, 5, 36], [1, 3, 5120], [2, 2, 8800]] {
            let a = rnd(&shape, d, 1);
            let b = rnd(&shape, d, 2).affine(0.5, 2.0).unwrap();
            let (ga, gb) = (gpu(&a), gpu(&b));
            let tag = format!("{shape:?}");
            check(
                &format!("add {tag}"),
                d,
                &ga.add(&gb).unwrap(),
                &a.add(&b).unwrap(),
            );
            check(
                &format!("div {tag}"),
                d,
                &ga.div(&gb).unwrap(),
                &a.div(&b).unwrap(),
            );
            check(
                &format!("affine {tag}"),
                d,
                &ga.affine(1.5, -0.25).unwrap(),
                &a.affine(1.5, -0.25).unwrap(),
            );
            for act in [Activation::Silu, Activation::GeluTanh] {
                check(
                    &format!("{act:?} {tag}"),
                    d,
                    &ga.act(act).unwrap(),
                    &a.act(act).unwrap(),
                );
            }
            // [P, R, C] against [P, 1, C], and the broadcast operand on the left
            let row = rnd(&[shape[0], 1, shape[2]], d, 3)
                .affine(0.5, 2.0)
                .unwrap();
            let gr = gpu(&row);
            check(
                &format!("mul row {tag}"),
                d,
                &ga.mul(&gr).unwrap(),
                &a.mul(&row).unwrap(),
            );
            check(
                &format!("sub row {tag}"),
                d,
                &ga.sub(&gr).unwrap(),
                &a.sub(&row).unwrap(),
            );
            check(
                &format!("row sub {tag}"),
                d,
                &gr.sub(&ga).unwrap(),
                &row.sub(&a).unwrap(),
            );
            check(
                &format!("row div {tag}"),
                d,
                &gr.div(&gb).unwrap(),
                &row.div(&b).unwrap(),
            );
            // one row for all: [C] against [P, R, C]
            let last = rnd(&[shape[2]], d, 4);
            check(
                &format!("add last {tag}"),
                d,
                &ga.add(&gpu(&last)).unwrap(),
                &a.add(&last).unwrap(),
            );
            let x = rnd(&[shape[0], shape[1], 2 * shape[2]], d, 5);
            check(
                &format!("geglu {tag}"),
                d,
                &gpu(&x).geglu().unwrap(),
                &x.geglu().unwrap(),
            );
        }
        // Enough rows that each GEGLU thread takes four (its next row's loads in flight), the
        // last block's threads fewer.
        let x = rnd(&[20001, 128], d, 5).affine(4.0, 0.0).unwrap();
        check(
            &format!("geglu [20001, 128] {d:?}"),
            d,
            &gpu(&x).geglu().unwrap(),
            &x.geglu().unwrap(),
        );
        for (rows, dim) in [(300, 128), (7, 3072), (33, 36), (5, 48)] {
            let x = rnd(&[rows, dim], d, 6).affine(3.0, 0.5).unwrap();
            let g = rnd(&[dim], d, 7);
            let b = rnd(&[dim], d, 8);
            let gx = gpu(&x);
            let tag = format!("{rows}x{dim}");
            check(
                &format!("layer_norm {tag}"),
                d,
                &gx.layer_norm(Some(&gpu(&g)), Some(&gpu(&b)), 1e-5).unwrap(),
                &x.layer_norm(Some(&g), Some(&b), 1e-5).unwrap(),
            );
            check(
                &format!("layer_norm plain {tag}"),
                d,
                &gx.layer_norm(None, None, 1e-6).unwrap(),
                &x.layer_norm(None, None, 1e-6).unwrap(),
            );
            check(
                &format!("rms_norm {tag}"),
                d,
                &gx.rms_norm(Some(&gpu(&g)), 1e-6).unwrap(),
                &x.rms_norm(Some(&g), 1e-6).unwrap(),
            );
        }
    }
    set_vector_kernels(true);
}

/// The rotary embedding of adjacent pairs: the fused kernel (switch on) and the composition of
/// element-wise ops (off) against the CPU, Flux's 24 heads of 128 on 77 tokens and an odd shape.
#[test]
#[ignore = "needs a CUDA GPU"]
fn rotate_pairs_matches_cpu() {
    for d in DTYPES {
        for (b, len, heads, half) in [(1usize, 77usize, 24usize, 64usize), (2, 5, 3, 3)] {
            let x = rnd(&[b, len, heads * 2 * half], d, 1);
            let cos = rnd(&[len, half], pcpp_kernels::DType::F32, 2);
            let sin = rnd(&[len, half], pcpp_kernels::DType::F32, 3);
            let want = x.rotate_pairs(&cos, &sin).unwrap();
            for on in [true, false] {
                set_vector_kernels(on);
                let got = gpu(&x).rotate_pairs(&gpu(&cos), &gpu(&sin)).unwrap();
                check(
                    &format!("rotate_pairs {len}x{heads}x{half} fused={on}"),
                    d,
                    &got,
                    &want,
                );
            }
            assert!(
                gpu(&x).rotate_pairs(&cos, &sin).is_err(),
                "operands on two devices must be refused"
            );
        }
    }
    set_vector_kernels(true);
}

/// AdaLN's modulated layer norm and gated residual add, fused (switch on) and composed (off),
/// against the CPU: Flux's width 3072 and an odd width.
#[test]
#[ignore = "needs a CUDA GPU"]
fn adaln_ops_match_cpu() {
    for d in DTYPES {
        for (b, l, w) in [(1usize, 77usize, 3072usize), (2, 9, 36)] {
            let x = rnd(&[b, l, w], d, 1).affine(3.0, 0.5).unwrap();
            let y = rnd(&[b, l, w], d, 2);
            let (sc, sh, g) = (rnd(&[b, w], d, 3), rnd(&[b, w], d, 4), rnd(&[b, w], d, 5));
            let want_n = x.modulated_layer_norm(&sc, &sh, 1e-6).unwrap();
            let want_g = x.add_gated(&g, &y).unwrap();
            for on in [true, false] {
                set_vector_kernels(on);
                let tag = format!("{b}x{l}x{w} fused={on}");
                check(
                    &format!("modulated_layer_norm {tag}"),
                    d,
                    &gpu(&x)
                        .modulated_layer_norm(&gpu(&sc), &gpu(&sh), 1e-6)
                        .unwrap(),
                    &want_n,
                );
                check(
                    &format!("add_gated {tag}"),
                    d,
                    &gpu(&x).add_gated(&gpu(&g), &gpu(&y)).unwrap(),
                    &want_g,
                );
            }
        }
    }
    set_vector_kernels(true);
}

/// Concatenation in one launch (switch on) against the CPU: along a middle axis and the last, with
/// aligned and unaligned rows, three inputs and one of them empty.
#[test]
#[ignore = "needs a CUDA GPU"]
fn one_launch_cat_matches_cpu() {
    set_vector_kernels(true);
    for d in DTYPES {
        for (dim, sizes) in [
            (1usize, [3usize, 0, 5]),
            (1, [8, 16, 8]),
            (3, [5, 3, 1]),
            (3, [8, 8, 16]),
        ] {
            let parts: Vec<Tensor> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let mut shape = vec![2, 4, 3, 6];
                    shape[dim] = n;
                    rnd(&shape, d, i as u64 + 1)
                })
                .collect();
            let cpu: Vec<&Tensor> = parts.iter().collect();
            let gp: Vec<Tensor> = parts.iter().map(gpu).collect();
            let g: Vec<&Tensor> = gp.iter().collect();
            check(
                &format!("cat dim {dim} {sizes:?}"),
                d,
                &Tensor::cat(&g, dim).unwrap(),
                &Tensor::cat(&cpu, dim).unwrap(),
            );
        }
    }
    set_vector_kernels(true);
}

/// With the switch off, the same ops still match (the scalar kernels): the switch changes the
/// kernels, not the results beyond rounding.
#[test]
#[ignore = "needs a CUDA GPU"]
fn vector_and_scalar_kernels_agree() {
    let d = pcpp_kernels::DType::BF16;
    let a = gpu(&rnd(&[2, 64, 3072], d, 1));
    let m = gpu(&rnd(&[2, 1, 3072], d, 2));
    let run = |on: bool| -> Tensor {
        set_vector_kernels(on);
        a.layer_norm(None, None, 1e-6)
            .unwrap()
            .mul(&m)
            .unwrap()
            .add(&a)
            .unwrap()
            .act(Activation::GeluTanh)
            .unwrap()
            .to_device(pcpp_kernels::Device::Cpu)
            .unwrap()
    };
    let (v, s) = (run(true), run(false));
    let diff = v.max_abs_diff(&s).unwrap();
    assert!(
        diff <= 2e-2 * s.max_abs().unwrap().max(1.0),
        "vector vs scalar: {diff}"
    );
}

/// A linear layer with cuBLASLt's GELU epilogue (`PCPP_FUSED_EPILOGUES`) against the CPU's linear then
/// tanh GELU, and with an accumulator as its C operand against linear then add, with and without
/// bias, pre-activations over [-4, 4]. In f32 the bound (2e-5 of the
/// output's magnitude) is below the largest gap between the tanh approximation and exact GELU
/// (4.7e-4 at x = -2.7), so an epilogue computing the other GELU fails it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_gelu_epilogue_matches_cpu() {
    use pcpp_kernels::cuda::set_fused_epilogues;
    set_fused_epilogues(true);
    for d in DTYPES {
        for (rows, k, n) in [(77usize, 64usize, 96usize), (256, 128, 520)] {
            let x = rnd(&[1, rows, k], d, 1);
            let w = rnd(&[n, k], d, 2)
                .affine(8.0 / (k as f32).sqrt(), 0.0)
                .unwrap();
            let b = rnd(&[n], d, 3);
            for bias in [Some(&b), None] {
                let want = x
                    .linear(&w, bias)
                    .unwrap()
                    .act(Activation::GeluTanh)
                    .unwrap();
                let gb = bias.map(gpu);
                let got = gpu(&x)
                    .linear_act(&gpu(&w), gb.as_ref(), Activation::GeluTanh)
                    .unwrap();
                let name = format!("linear+gelu {rows}x{k}x{n} bias={}", bias.is_some());
                check(&name, d, &got, &want);
                let acc = rnd(&[1, rows, n], d, 4);
                check(
                    &format!("linear+acc {rows}x{k}x{n} bias={}", bias.is_some()),
                    d,
                    &gpu(&x)
                        .linear_add(&gpu(&w), gb.as_ref(), &gpu(&acc))
                        .unwrap(),
                    &x.linear(&w, bias).unwrap().add(&acc).unwrap(),
                );
                if d == pcpp_kernels::DType::F32 {
                    let diff = got
                        .to_device(pcpp_kernels::Device::Cpu)
                        .unwrap()
                        .max_abs_diff(&want)
                        .unwrap();
                    let scale = want.max_abs().unwrap().max(1.0);
                    assert!(
                        diff / scale <= 2e-5,
                        "{name}: f32 rel err {} > 2e-5",
                        diff / scale
                    );
                }
            }
        }
    }
    set_fused_epilogues(true);
}

/// Group norm, its statistics and `[b, c, 1, 1]` broadcasts on planes whose size is a multiple of
/// the vector (the vectorised per-plane kernels) and on planes that are not (the scalar ones);
/// token transposes with even extents (two elements per access) and odd ones.
#[test]
#[ignore = "needs a CUDA GPU"]
fn plane_kernels_and_transposes_match_cpu() {
    set_vector_kernels(true);
    for d in DTYPES {
        for shape in [[2usize, 32, 8, 16], [2, 32, 9, 7], [1, 64, 2, 4]] {
            let tag = format!("{shape:?}");
            let x = rnd(&shape, d, 1).affine(3.0, 0.5).unwrap();
            let (g, b) = (rnd(&[shape[1]], d, 2), rnd(&[shape[1]], d, 3));
            check_group_norm(&tag, d, &x, &g, &b);
            let gx = gpu(&x);
            let v = rnd(&[shape[0], shape[1], 1, 1], d, 4);
            check(
                &format!("plane add {tag}"),
                d,
                &gx.add(&gpu(&v)).unwrap(),
                &x.add(&v).unwrap(),
            );
            check(
                &format!("plane mul {tag}"),
                d,
                &gx.mul(&gpu(&v)).unwrap(),
                &x.mul(&v).unwrap(),
            );
            let t = x.to_tokens().unwrap();
            let gt = gx.to_tokens().unwrap();
            check(&format!("to_tokens {tag}"), d, &gt, &t);
            check(
                &format!("from_tokens {tag}"),
                d,
                &gt.from_tokens(shape[2], shape[3]).unwrap(),
                &t.from_tokens(shape[2], shape[3]).unwrap(),
            );
        }
    }
}

/// Convolutions in NHWC (f16 and bf16 with even extents): against the CPU and against cuDNN's
/// NCHW calls; a kept filter reused gives the same bits; a new weight tensor of the same shape
/// (possibly at the freed weight's address) is not served the old filter; odd channel counts
/// take the NCHW call.
#[test]
#[ignore = "needs a CUDA GPU"]
fn nhwc_convolutions_match_cpu_and_keep_filters_per_weight() {
    set_conv_nhwc(true);
    for d in [DType::F16, DType::BF16] {
        let x = rnd(&[2, 6, 10, 8], d, 1);
        let gx = gpu(&x);
        let wa = rnd(&[10, 6, 3, 3], d, 2);
        let bias = rnd(&[10], d, 3);
        let gb = gpu(&bias);
        for (name, p) in [
            ("nhwc 3x3", Conv2dParams::new(1, 1)),
            ("nhwc 3x3 stride 2", Conv2dParams::new(2, 1)),
        ] {
            let ga = gpu(&wa);
            let y1 = gx.conv2d(&ga, Some(&gb), p).unwrap();
            check(name, d, &y1, &x.conv2d(&wa, Some(&bias), p).unwrap());
            let y2 = gx.conv2d(&ga, Some(&gb), p).unwrap();
            assert_eq!(
                y1.to_bytes().unwrap(),
                y2.to_bytes().unwrap(),
                "{name} {d}: kept filter"
            );
            set_conv_nhwc(false);
            let nchw = gx.conv2d(&ga, Some(&gb), p).unwrap();
            set_conv_nhwc(true);
            check(
                &format!("{name} vs NCHW"),
                d,
                &y1,
                &nchw.to_device(pcpp_kernels::Device::Cpu).unwrap(),
            );
        }
        for seed in 10..14 {
            let w = rnd(&[10, 6, 3, 3], d, seed);
            let gw = gpu(&w);
            check(
                &format!("new weight {seed}"),
                d,
                &gx.conv2d(&gw, None, Conv2dParams::new(1, 1)).unwrap(),
                &x.conv2d(&w, None, Conv2dParams::new(1, 1)).unwrap(),
            );
        }
        let xo = rnd(&[1, 3, 9, 7], d, 5);
        let wo = rnd(&[5, 3, 3, 3], d, 6);
        let bo = rnd(&[5], d, 7);
        check(
            "odd channels",
            d,
            &gpu(&xo)
                .conv2d(&gpu(&wo), Some(&gpu(&bo)), Conv2dParams::new(1, 1))
                .unwrap(),
            &xo.conv2d(&wo, Some(&bo), Conv2dParams::new(1, 1)).unwrap(),
        );
    }
}

/// The residual sum and its layer norm in one launch: against the CPU's add then layer norm, and
/// bit for bit against the GPU's own add then layer norm (rows whose length is a multiple of the
/// vector and rows that are not).
#[test]
#[ignore = "needs a CUDA GPU"]
fn add_layer_norm_matches_cpu_and_the_two_ops() {
    set_vector_kernels(true);
    for d in DTYPES {
        for shape in [[2usize, 33, 640], [1, 7, 37]] {
            let tag = format!("{shape:?}");
            let a = rnd(&shape, d, 1).affine(3.0, 0.5).unwrap();
            let r = rnd(&shape, d, 2);
            let (g, b) = (rnd(&[shape[2]], d, 3), rnd(&[shape[2]], d, 4));
            let (ga, gr, gg, gb) = (gpu(&a), gpu(&r), gpu(&g), gpu(&b));
            let (s, y) = ga.add_layer_norm(&gr, Some(&gg), Some(&gb), 1e-5).unwrap();
            let (cs, cy) = a.add_layer_norm(&r, Some(&g), Some(&b), 1e-5).unwrap();
            check(&format!("add_layer_norm sum {tag}"), d, &s, &cs);
            check(&format!("add_layer_norm norm {tag}"), d, &y, &cy);
            let s2 = ga.add(&gr).unwrap();
            let y2 = s2.layer_norm(Some(&gg), Some(&gb), 1e-5).unwrap();
            assert_eq!(
                s.to_bytes().unwrap(),
                s2.to_bytes().unwrap(),
                "{tag} {d}: sum bits"
            );
            assert_eq!(
                y.to_bytes().unwrap(),
                y2.to_bytes().unwrap(),
                "{tag} {d}: norm bits"
            );
        }
    }
}

/// Attention over column blocks of wider tensors (a stacked q/k/v projection, a packed `[k | v]`
/// window) against the CPU's attention of the blocks copied out: blocks the warp-specialised
/// kernel reads in place (head sizes 64 and 128, 16-byte-aligned starts and strides), a start that
/// is not aligned (the blocks are copied out), head size 16 and f32 (other kernels).
#[test]
#[ignore = "needs a CUDA GPU"]
fn packed_attention_matches_cpu() {
    use pcpp_kernels::Cols;
    for d in DTYPES {
        for (lq, lk, heads, dh, k0) in [
            (130, 77, 2, 64, 8),
            (200, 300, 3, 128, 8),
            (257, 129, 2, 64, 1),
            (64, 64, 2, 16, 8),
            // a band's attentions (the small-grid kernel by default): its window, the text
            (256, 410, 10, 64, 0),
            (100, 77, 20, 64, 64),
        ] {
            let w = heads * dh;
            let qm = rnd(&[2, lq, 3 * w], d, 1).affine(2.0, 0.0).unwrap();
            let km = rnd(&[2, lk, 2 * w + k0], d, 2).affine(2.0, 0.0).unwrap();
            let want = Tensor::attention(
                &qm.narrow(2, w, w).unwrap(),
                &km.narrow(2, k0, w).unwrap(),
                &km.narrow(2, k0 + w, w).unwrap(),
                heads,
                false,
            )
            .unwrap();
            let (gq, gk) = (gpu(&qm), gpu(&km));
            let packed = |variant: Flash128| {
                set_flash128(variant);
                let y = Tensor::attention_packed(
                    Cols::new(&gq, w),
                    Cols::new(&gk, k0),
                    Cols::new(&gk, k0 + w),
                    w,
                    heads,
                    false,
                )
                .unwrap();
                set_flash128(Flash128::Warpspec);
                y
            };
            for variant in [Flash128::Warpspec, Flash128::WarpspecNoSmall] {
                check(
                    &format!("packed attention {lq}x{lk} h{heads}x{dh} k at {k0} {variant:?}"),
                    d,
                    &packed(variant),
                    &want,
                );
            }
            // Where the small-grid kernel takes the packed blocks in place, its rows without a
            // key split are those of the 128-row `mma.sync` kernel on the copied-out blocks, bit
            // for bit (same per-row arithmetic): it ran, and read the strided rows right.
            let g = pcpp_kernels::cuda::gpu(0).unwrap();
            let dims = (2, lq, lk, heads, dh);
            if g.has_warpspec_attention()
                && pcpp_kernels::cuda::small_grid(Flash128::Warpspec, dims, g.sms())
                && k0 % 8 == 0
            {
                set_flash128(Flash128::RegistersQ);
                let plain = Tensor::attention(
                    &gpu(&qm.narrow(2, w, w).unwrap()),
                    &gpu(&km.narrow(2, k0, w).unwrap()),
                    &gpu(&km.narrow(2, k0 + w, w).unwrap()),
                    heads,
                    false,
                )
                .unwrap()
                .to_vec_f32()
                .unwrap();
                set_flash128(Flash128::Warpspec);
                let was = pcpp_kernels::cuda::small_split();
                pcpp_kernels::cuda::set_small_split(1);
                let small = packed(Flash128::Warpspec).to_vec_f32().unwrap();
                pcpp_kernels::cuda::set_small_split(was);
                assert!(
                    plain
                        .iter()
                        .zip(&small)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "packed attention {lq}x{lk} h{heads}x{dh}: the small-grid kernel's bits"
                );
            }
        }
    }
    let t = gpu(&rnd(&[1, 4, 8], DType::F16, 1));
    let err = Tensor::attention_packed(
        Cols::new(&t, 4),
        Cols::new(&t, 0),
        Cols::new(&t, 0),
        8,
        1,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("columns 4..12"), "{err}");
}

/// The small-grid attention kernel with its key tiles split between two or four groups of warps
/// (`flash_small64s2`, `flash_small64s4`, merged through shared memory) against the CPU, causal
/// and not: a band's window and text tokens, key counts that leave a short last tile or give a
/// group a single tile, causal grids whose first query block leaves a group without a tile, and
/// (`ws-small-wide`) a band's level-1 self-attention.
/// Without a split and without a mask the small-grid kernel gives the 128-row `mma.sync`
/// kernel's bits (same per-row arithmetic).
#[test]
#[ignore = "needs a CUDA GPU"]
fn small_grid_key_splits_match_cpu() {
    use pcpp_kernels::cuda::{set_small_split, small_grid, small_split};
    let was = small_split();
    let g = pcpp_kernels::cuda::gpu(0).unwrap();
    if !g.has_warpspec_attention() {
        println!("skipped: no sm_90a device, no small-grid kernel");
        return;
    }
    assert_eq!(
        g.small_split_available(),
        4,
        "the split kernels' shared memory"
    );
    for d in [DType::F16, DType::BF16] {
        for (b, lq, lk, heads, causal) in [
            (1, 256, 410, 20, false),
            (1, 256, 77, 20, false),
            (2, 100, 130, 6, false),
            (1, 192, 512, 6, false),
            (1, 130, 130, 4, true),
            (2, 256, 256, 8, true),
            // A band's level-1 self-attention (`ws-small-wide` only: 160 tiles, 26 key tiles).
            (1, 1024, 1640, 10, false),
        ] {
            let dims = (b, lq, lk, heads, 64);
            let choice = if small_grid(Flash128::Warpspec, dims, g.sms()) {
                Flash128::Warpspec
            } else {
                Flash128::WarpspecSmallWide
            };
            assert!(small_grid(choice, dims, g.sms()));
            let w = heads * 64;
            let q = rnd(&[b, lq, w], d, 1).affine(2.0, 0.0).unwrap();
            let k = rnd(&[b, lk, w], d, 2).affine(2.0, 0.0).unwrap();
            let v = rnd(&[b, lk, w], d, 3);
            let want = Tensor::attention(&q, &k, &v, heads, causal).unwrap();
            let (gq, gk, gv) = (gpu(&q), gpu(&k), gpu(&v));
            let run = |most: usize| {
                set_flash128(choice);
                set_small_split(most);
                let y = Tensor::attention(&gq, &gk, &gv, heads, causal).unwrap();
                set_small_split(was);
                set_flash128(Flash128::Warpspec);
                y
            };
            for most in [1, 2, 4] {
                let tag = format!("small split {most} {b}x{lq}x{lk} h{heads} causal={causal}");
                check(&tag, d, &run(most), &want);
            }
            if causal {
                // A causal row passes as many fully masked key tiles as its tile height makes,
                // each rescaling it by a factor within an ulp of 1: no bitwise comparison.
                continue;
            }
            set_flash128(Flash128::RegistersQ);
            let plain = Tensor::attention(&gq, &gk, &gv, heads, causal).unwrap();
            set_flash128(Flash128::Warpspec);
            assert_eq!(
                run(1).to_bytes().unwrap(),
                plain.to_bytes().unwrap(),
                "{b}x{lq}x{lk} h{heads} causal={causal} {d}: the unsplit small-grid kernel's bits"
            );
        }
    }
}

/// GEMMs and convolutions whose algorithm was timed at the shape's first call (band-sized
/// operands: few rows, wide weights) against the CPU, and the kept choice giving the same bits
/// at the next call; with tuning off, the heuristic choice against the CPU too.
#[test]
#[ignore = "needs a CUDA GPU"]
fn tuned_algorithms_match_cpu_and_are_kept() {
    use pcpp_kernels::cuda::set_autotune;
    for (tune, rows) in [(true, 256usize), (false, 192)] {
        set_autotune(tune);
        for d in DTYPES {
            let (k, n) = (640usize, 1280usize);
            let x = rnd(&[1, rows, k], d, 1);
            let w = rnd(&[n, k], d, 2)
                .affine(4.0 / (k as f32).sqrt(), 0.0)
                .unwrap();
            let b = rnd(&[n], d, 3);
            let (gx, gw, gb) = (gpu(&x), gpu(&w), gpu(&b));
            let got = gx.linear(&gw, Some(&gb)).unwrap();
            let name = format!("linear {rows}x{k}x{n} tune={tune}");
            check(&name, d, &got, &x.linear(&w, Some(&b)).unwrap());
            let again = gx.linear(&gw, Some(&gb)).unwrap();
            assert_eq!(
                got.to_bytes().unwrap(),
                again.to_bytes().unwrap(),
                "{name} {d}"
            );

            let xc = rnd(&[1, 64, rows / 16, 32], d, 4);
            let wc = rnd(&[96, 64, 3, 3], d, 5).affine(0.2, 0.0).unwrap();
            let p = Conv2dParams::new(1, 1);
            let (gxc, gwc) = (gpu(&xc), gpu(&wc));
            let got = gxc.conv2d(&gwc, None, p).unwrap();
            let name = format!("conv {rows} tune={tune}");
            check(&name, d, &got, &xc.conv2d(&wc, None, p).unwrap());
            let again = gxc.conv2d(&gwc, None, p).unwrap();
            assert_eq!(
                got.to_bytes().unwrap(),
                again.to_bytes().unwrap(),
                "{name} {d}"
            );
        }
    }
    set_autotune(false);
}

/// A convolution with its bias, a `[b, co]` plane term and a residual added in the NHWC output
/// pass: against the CPU, and bit for bit against the GPU's own separate ops (NHWC and NCHW).
#[test]
#[ignore = "needs a CUDA GPU"]
fn conv2d_add_matches_cpu_and_the_separate_ops() {
    for nhwc in [true, false] {
        set_conv_nhwc(nhwc);
        for d in DTYPES {
            let x = rnd(&[2, 8, 12, 10], d, 1);
            let w = rnd(&[16, 8, 3, 3], d, 2).affine(0.3, 0.0).unwrap();
            let (b, t, r) = (
                rnd(&[16], d, 3),
                rnd(&[2, 16], d, 4),
                rnd(&[2, 16, 12, 10], d, 5),
            );
            let p = Conv2dParams::new(1, 1);
            let (gx, gw, gb, gt, gr) = (gpu(&x), gpu(&w), gpu(&b), gpu(&t), gpu(&r));
            let got = gx
                .conv2d_add(&gw, Some(&gb), p, Some(&gt), Some(&gr))
                .unwrap();
            let name = format!("conv2d_add nhwc={nhwc}");
            check(
                &name,
                d,
                &got,
                &x.conv2d_add(&w, Some(&b), p, Some(&t), Some(&r)).unwrap(),
            );
            let sep = gx.conv2d(&gw, Some(&gb), p).unwrap();
            let sep = gr
                .add(&sep.add(&gt.reshape(&[2, 16, 1, 1]).unwrap()).unwrap())
                .unwrap();
            assert_eq!(
                got.to_bytes().unwrap(),
                sep.to_bytes().unwrap(),
                "{name} {d}"
            );
            let only_res = gx.conv2d_add(&gw, None, p, None, Some(&gr)).unwrap();
            let sep = gr.add(&gx.conv2d(&gw, None, p).unwrap()).unwrap();
            assert_eq!(
                only_res.to_bytes().unwrap(),
                sep.to_bytes().unwrap(),
                "{name} {d} residual"
            );
        }
    }
    set_conv_nhwc(true);
}

/// Group norm written channels-last and the convolution that reads it: against the CPU, and bit
/// for bit against the GPU's NCHW group norm plus a permute and its NCHW `conv2d_add` (even
/// extents take the NHWC kernels, odd ones the composed fallback).
#[test]
#[ignore = "needs a CUDA GPU"]
fn nhwc_group_norm_and_conv_match_cpu_and_the_nchw_ops() {
    set_conv_nhwc(true);
    // 96 channels in 32 groups of 3 put a group across the 64-channel tiles.
    for d in DTYPES {
        for (c, h, w, groups) in [
            (32usize, 12usize, 10usize, 8usize),
            (16, 5, 7, 8),
            (96, 6, 8, 32),
        ] {
            let x = rnd(&[2, c, h, w], d, 1);
            let (g, b) = (rnd(&[c], d, 2), rnd(&[c], d, 3));
            let (gx, gg, gb) = (gpu(&x), gpu(&g), gpu(&b));
            let name = format!("group_norm_nhwc {c}x{h}x{w}");
            let n = gx
                .group_norm_nhwc(groups, Some(&gg), Some(&gb), 1e-5, true)
                .unwrap();
            let want = x
                .group_norm_nhwc(groups, Some(&g), Some(&b), 1e-5, true)
                .unwrap();
            check(&name, d, &n, &want);
            let sep = gx
                .group_norm(groups, Some(&gg), Some(&gb), 1e-5, true)
                .unwrap()
                .permute(&[0, 2, 3, 1])
                .unwrap();
            assert_eq!(n.to_bytes().unwrap(), sep.to_bytes().unwrap(), "{name} {d}");

            let wt = rnd(&[24, c, 3, 3], d, 4).affine(0.2, 0.0).unwrap();
            let (bias, t, r) = (
                rnd(&[24], d, 5),
                rnd(&[2, 24], d, 6),
                rnd(&[2, 24, h, w], d, 7),
            );
            let p = Conv2dParams::new(1, 1);
            let (gw, gbias, gt, gr) = (gpu(&wt), gpu(&bias), gpu(&t), gpu(&r));
            let got = n
                .conv2d_add_nhwc(&gw, Some(&gbias), p, Some(&gt), Some(&gr))
                .unwrap();
            let name = format!("conv2d_add_nhwc {c}x{h}x{w}");
            let cpu = want
                .conv2d_add_nhwc(&wt, Some(&bias), p, Some(&t), Some(&r))
                .unwrap();
            check(&name, d, &got, &cpu);
            let nchw = n
                .permute(&[0, 3, 1, 2])
                .unwrap()
                .conv2d_add(&gw, Some(&gbias), p, Some(&gt), Some(&gr))
                .unwrap();
            assert_eq!(
                got.to_bytes().unwrap(),
                nchw.to_bytes().unwrap(),
                "{name} {d}"
            );
        }
    }
}

/// `1×1` convolutions (stride 1, no padding) run as one strided-batched GEMM in NCHW: with and
/// without a bias and the adds, even and odd planes, against the CPU.
#[test]
#[ignore = "needs a CUDA GPU"]
fn conv1x1_gemm_matches_cpu() {
    for d in DTYPES {
        for (ci, co, h, w) in [(24usize, 10usize, 6usize, 5usize), (64, 32, 8, 8)] {
            let x = rnd(&[2, ci, h, w], d, 1);
            let wt = rnd(&[co, ci, 1, 1], d, 2).affine(0.3, 0.0).unwrap();
            let (b, r) = (rnd(&[co], d, 3), rnd(&[2, co, h, w], d, 4));
            let p = Conv2dParams::new(1, 0);
            let (gx, gw, gb, gr) = (gpu(&x), gpu(&wt), gpu(&b), gpu(&r));
            for bias in [false, true] {
                let (bc, bg) = if bias {
                    (Some(&b), Some(&gb))
                } else {
                    (None, None)
                };
                check(
                    &format!("conv1x1 {ci}->{co} {h}x{w} bias={bias}"),
                    d,
                    &gx.conv2d(&gw, bg, p).unwrap(),
                    &x.conv2d(&wt, bc, p).unwrap(),
                );
                check(
                    &format!("conv1x1 + residual bias={bias}"),
                    d,
                    &gx.conv2d_add(&gw, bg, p, None, Some(&gr)).unwrap(),
                    &x.conv2d_add(&wt, bc, p, None, Some(&r)).unwrap(),
                );
            }
        }
    }
}

/// Layer norms holding the row in registers (`PCPP_NORM_REGISTERS`): the same bits as the
/// three-read warp norms, plain and after a residual sum, for rows of 2, 3, 5 and 12 vectors per
/// lane and rows too long for them, in grids of one block and of several waves (8 192 rows);
/// against the CPU too.
#[test]
#[ignore = "needs a CUDA GPU"]
fn register_norms_give_the_warp_norms_bits() {
    use pcpp_kernels::cuda::set_norm_registers;
    let few = [320usize, 640, 1280, 1000, 3072, 4096].map(|w| ([3, 7], w));
    let many = [1280usize, 3072].map(|w| ([1, 8192], w));
    for d in DTYPES {
        for ([n, l], width) in few.into_iter().chain(many) {
            let x = rnd(&[n, l, width], d, 1).affine(2.0, 0.5).unwrap();
            let r = rnd(&[n, l, width], d, 2);
            let (g, b) = (rnd(&[width], d, 3), rnd(&[width], d, 4));
            let (gx, gr, gg, gb) = (gpu(&x), gpu(&r), gpu(&g), gpu(&b));
            let mut runs = Vec::new();
            for on in [true, false] {
                set_norm_registers(on);
                let n = gx.layer_norm(Some(&gg), Some(&gb), 1e-5).unwrap();
                let (s, y) = gx.add_layer_norm(&gr, Some(&gg), Some(&gb), 1e-5).unwrap();
                runs.push([n, s, y].map(|t| t.to_bytes().unwrap()));
            }
            set_norm_registers(true);
            assert_eq!(runs[0], runs[1], "{l} rows of {width} {d}");
            check(
                &format!("layer_norm regs {l} rows of {width}"),
                d,
                &gx.layer_norm(Some(&gg), Some(&gb), 1e-5).unwrap(),
                &x.layer_norm(Some(&g), Some(&b), 1e-5).unwrap(),
            );
        }
    }
}
