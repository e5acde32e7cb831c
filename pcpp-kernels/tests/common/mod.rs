//! Helpers of the CUDA parity tests: random CPU tensors, upload, and the comparison of a GPU
//! result with its CPU twin relative to the output's magnitude per dtype.
#![allow(dead_code)]

use pcpp_kernels::{DType, Device, GroupStats, Tensor};

pub const GPU: Device = Device::Cuda(0);

pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Tolerance on `max|gpu − cpu| / max(1, max|cpu|)`.
pub fn tol(d: DType) -> f32 {
    match d {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        DType::BF16 => 6e-2,
    }
}

pub fn rnd(shape: &[usize], d: DType, seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, d, Device::Cpu, (-1.0, 1.0), seed).unwrap()
}

pub fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

pub fn check(name: &str, d: DType, got: &Tensor, want: &Tensor) {
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

/// Group norm of `x` (8 groups, with and without SiLU, affine `g`, `b`) and its statistics on the
/// GPU against the CPU; returns the CPU's statistics.
pub fn check_group_norm(tag: &str, d: DType, x: &Tensor, g: &Tensor, b: &Tensor) -> GroupStats {
    let gx = gpu(x);
    for silu in [false, true] {
        check(
            &format!("group_norm {tag} silu={silu}"),
            d,
            &gx.group_norm(8, Some(&gpu(g)), Some(&gpu(b)), 1e-5, silu)
                .unwrap(),
            &x.group_norm(8, Some(g), Some(b), 1e-5, silu).unwrap(),
        );
    }
    let (sc, sg) = (x.group_stats(8).unwrap(), gx.group_stats(8).unwrap());
    for (c, g) in sc.sums.iter().zip(&sg.sums) {
        for i in 0..3 {
            assert!(
                (c[i] - g[i]).abs() <= 1e-3 * (1.0 + c[i].abs()),
                "group_stats {tag} {d}: {c:?} vs {g:?}"
            );
        }
    }
    sc
}
