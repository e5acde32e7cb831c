//! The small-grid attention with the query projection and the layer norm inside the kernel
//! (`Tensor::attention_norm_q`, `flash_small64p4`): against the CPU's composition (layer norm,
//! linear, attention) and against the GPU's own composed ops, in f16 and bf16, for a band's
//! self-attention over a packed K/V window, its text cross-attention with a layer norm, rows and
//! keys that are not whole tiles, rows with a large mean (the norm's two passes), and a
//! projection width whose chunks do not split evenly between the kernel's four groups; a captured
//! graph holds the fused kernel exactly when it is on and the grid is small. Ignored by default
//! (needs a GPU): `cargo test -p pcpp-kernels --features cuda --test cuda_attn_proj -- --ignored`.
#![cfg(feature = "cuda")]

mod common;

use common::{check, gpu, rnd};
use pcpp_kernels::cuda::{capture_graph, set_fused_q};
use pcpp_kernels::{Cols, DType, LayerNormArgs, Tensor};

/// One case: `x: [1, lq, cin]`, K/V from `kv: [1, lk, n]` at columns `k0` and `v0`, `heads` of
/// 64, with or without the layer norm, the rows offset by `mean`.
struct Case {
    name: &'static str,
    lq: usize,
    cin: usize,
    lk: usize,
    kv_cols: usize,
    k0: usize,
    v0: usize,
    heads: usize,
    norm: bool,
    mean: f32,
}

const CASES: [Case; 5] = [
    Case {
        name: "self-attention over a window",
        lq: 256,
        cin: 1280,
        lk: 410,
        kv_cols: 2560,
        k0: 0,
        v0: 1280,
        heads: 20,
        norm: false,
        mean: 0.0,
    },
    Case {
        name: "cross-attention with its norm",
        lq: 256,
        cin: 1280,
        lk: 77,
        kv_cols: 2560,
        k0: 0,
        v0: 1280,
        heads: 20,
        norm: true,
        mean: 0.0,
    },
    Case {
        name: "part tiles, large mean",
        lq: 200,
        cin: 640,
        lk: 130,
        kv_cols: 1280,
        k0: 640,
        v0: 0,
        heads: 10,
        norm: true,
        mean: 40.0,
    },
    Case {
        name: "five chunks over four groups",
        lq: 64,
        cin: 320,
        lk: 64,
        kv_cols: 640,
        k0: 0,
        v0: 320,
        heads: 5,
        norm: true,
        mean: 1.0,
    },
    Case {
        name: "one key",
        lq: 70,
        cin: 128,
        lk: 1,
        kv_cols: 256,
        k0: 0,
        v0: 128,
        heads: 2,
        norm: false,
        mean: 0.0,
    },
];

/// The layer norm of a case's `(gamma, beta)`, where it has one.
fn args(n: &Option<(Tensor, Tensor)>) -> Option<LayerNormArgs<'_>> {
    n.as_ref().map(|(g, b)| LayerNormArgs {
        gamma: Some(g),
        beta: Some(b),
        eps: 1e-5,
    })
}

/// The fused kernels in a graph of `f`.
fn fused_nodes(f: impl Fn() -> pcpp_kernels::Result<()>) -> usize {
    f().unwrap();
    let step = capture_graph(0, f).unwrap();
    step.node_kinds()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("flash_small64p4_"))
        .map(|(_, n)| n)
        .sum()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn projected_small_grid_attention_matches_cpu_and_the_composed_ops() {
    for d in [DType::F16, DType::BF16] {
        for (i, c) in CASES.iter().enumerate() {
            let seed = 10 * i as u64;
            let width = c.heads * 64;
            let x = rnd(&[1, c.lq, c.cin], d, seed + 1)
                .affine(1.0, c.mean)
                .unwrap();
            let scale = 1.0 / (c.cin as f32).sqrt();
            let wq = rnd(&[width, c.cin], d, seed + 2)
                .affine(scale, 0.0)
                .unwrap();
            let kv = rnd(&[1, c.lk, c.kv_cols], d, seed + 3)
                .affine(2.0, 0.0)
                .unwrap();
            let (g, b) = (
                rnd(&[c.cin], d, seed + 4).affine(0.5, 1.0).unwrap(),
                rnd(&[c.cin], d, seed + 5),
            );
            let norm = |g: &Tensor, b: &Tensor| -> Option<(Tensor, Tensor)> {
                c.norm.then(|| (g.clone(), b.clone()))
            };
            let cpu_norm = norm(&g, &b);
            let want = Tensor::attention_norm_q(
                &x,
                args(&cpu_norm),
                &wq,
                (Cols::new(&kv, c.k0), Cols::new(&kv, c.v0)),
                width,
                c.heads,
            )
            .unwrap();
            let (gx, gw, gkv) = (gpu(&x), gpu(&wq), gpu(&kv));
            let gpu_norm = norm(&gpu(&g), &gpu(&b));
            let run = || {
                Tensor::attention_norm_q(
                    &gx,
                    args(&gpu_norm),
                    &gw,
                    (Cols::new(&gkv, c.k0), Cols::new(&gkv, c.v0)),
                    width,
                    c.heads,
                )
            };
            set_fused_q(true);
            let fused = run().unwrap();
            check(&format!("{} fused", c.name), d, &fused, &want);
            assert_eq!(
                fused_nodes(|| run().map(|_| ())),
                1,
                "{} {d}: fused kernels",
                c.name
            );
            set_fused_q(false);
            let composed = run().unwrap();
            check(&format!("{} composed", c.name), d, &composed, &want);
            assert_eq!(fused_nodes(|| run().map(|_| ())), 0, "{} {d}: off", c.name);
            check(
                &format!("{} fused vs composed", c.name),
                d,
                &fused,
                &composed.to_device(pcpp_kernels::Device::Cpu).unwrap(),
            );
            set_fused_q(true);
        }
    }
}

/// A layer norm over rows wider than the kernel holds (1 344 > 1 280) takes the composed ops; the
/// same projection without the norm stays fused.
#[test]
#[ignore = "needs a CUDA GPU"]
fn wide_normed_rows_compose_the_ops() {
    set_fused_q(true);
    let d = DType::F16;
    let x = rnd(&[1, 128, 1344], d, 1);
    let wq = rnd(&[128, 1344], d, 2).affine(0.03, 0.0).unwrap();
    let kv = rnd(&[1, 77, 256], d, 3);
    let (g, b) = (rnd(&[1344], d, 4), rnd(&[1344], d, 5));
    let (gg, gb, gx, gw, gkv) = (gpu(&g), gpu(&b), gpu(&x), gpu(&wq), gpu(&kv));
    for normed in [true, false] {
        let n = |g, b| {
            normed.then_some(LayerNormArgs {
                gamma: Some(g),
                beta: Some(b),
                eps: 1e-5,
            })
        };
        let kvc = (Cols::new(&kv, 0), Cols::new(&kv, 128));
        let want = Tensor::attention_norm_q(&x, n(&g, &b), &wq, kvc, 128, 2).unwrap();
        let run = || {
            let kvc = (Cols::new(&gkv, 0), Cols::new(&gkv, 128));
            Tensor::attention_norm_q(&gx, n(&gg, &gb), &gw, kvc, 128, 2)
        };
        check(
            &format!("1344 wide, norm {normed}"),
            d,
            &run().unwrap(),
            &want,
        );
        let fused = usize::from(!normed);
        assert_eq!(fused_nodes(|| run().map(|_| ())), fused, "norm {normed}");
    }
}

/// Grids that are not small (more 64-row tiles than multiprocessors) and f32 take the composed
/// ops, with the same result as the CPU.
#[test]
#[ignore = "needs a CUDA GPU"]
fn large_grids_and_f32_compose_the_ops() {
    set_fused_q(true);
    for (d, lq) in [(DType::F16, 64 * 200), (DType::F32, 256)] {
        let x = rnd(&[1, lq, 128], d, 1);
        let wq = rnd(&[128, 128], d, 2).affine(0.1, 0.0).unwrap();
        let kv = rnd(&[1, 96, 256], d, 3);
        let kvc = (Cols::new(&kv, 0), Cols::new(&kv, 128));
        let want = Tensor::attention_norm_q(&x, None, &wq, kvc, 128, 2).unwrap();
        let (gx, gw, gkv) = (gpu(&x), gpu(&wq), gpu(&kv));
        let run = || {
            Tensor::attention_norm_q(
                &gx,
                None,
                &gw,
                (Cols::new(&gkv, 0), Cols::new(&gkv, 128)),
                128,
                2,
            )
        };
        check(&format!("{lq} rows"), d, &run().unwrap(), &want);
        assert_eq!(fused_nodes(|| run().map(|_| ())), 0, "{lq} rows {d}");
    }
}
