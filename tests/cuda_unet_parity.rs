//! The tiny SDXL UNet on the GPU against diffusers' reference outputs: weights loaded straight to
//! the device, f32 at the pipeline tolerance, f16 and bf16 at their storage precision. Ignored by
//! default (needs a GPU): `cargo test --features cuda --test cuda_unet_parity -- --ignored`.
//! Run them one at a time (`--test-threads=1`): one switches the small-row GEMMs on for the
//! process.
#![cfg(feature = "cuda")]

use pcpp_core::{SerialFactory, StepCtx};
use pcpp_kernels::{DType, Device};
use pcpp_sdxl::weights::{find_weight_file, Weights};
use pcpp_sdxl::{UNet, UNetCond, UNetConfig};
use pcpp_tests::{refs, rel_err, tiny_model, TOL_PIPELINE};

const GPU: Device = Device::Cuda(0);

fn run(dtype: DType) -> f32 {
    let dir = tiny_model().join("unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let w = Weights::open(
        &find_weight_file(&dir, "diffusion_pytorch_model").unwrap(),
        dtype,
    )
    .unwrap()
    .on_device(GPU);
    let unet = UNet::build(cfg, &w, &SerialFactory).unwrap();
    let r = refs("refs-tiny-sdxl/unet_forward.safetensors");
    let dev = |n: &str| r[n].to_dtype(dtype).unwrap().to_device(GPU).unwrap();
    let cond = UNetCond::new(
        dev("encoder_hidden_states"),
        Some(dev("text_embeds")),
        Some(dev("time_ids")),
    );
    let out = unet
        .forward(
            &StepCtx::serial(),
            &dev("sample"),
            &dev("timestep"),
            &cond,
            None,
        )
        .unwrap();
    assert_eq!(out.device(), GPU, "UNet output left the GPU");
    let e = rel_err(
        &out.to_device(Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
        &r["out"],
    );
    println!("tiny UNet on the GPU, {dtype}: rel err {e:.2e}");
    e
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_unet_f32_on_gpu_matches_diffusers() {
    let e = run(DType::F32);
    assert!(e <= TOL_PIPELINE, "rel err {e:e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_unet_half_on_gpu_matches_diffusers() {
    let e16 = run(DType::F16);
    assert!(e16 <= 2e-2, "f16 rel err {e16:e}");
    let ebf = run(DType::BF16);
    assert!(ebf <= 8e-2, "bf16 rel err {ebf:e}");
}

/// The same with the small-row GEMMs on (`PCPP_SMALL_GEMM`: on sm_90a every linear layer of the
/// tiny UNet, the feed-forward's GEGLU and the transformer blocks' second and third layer norms
/// run inside them; elsewhere this is the test above again).
#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_unet_half_with_small_gemms_matches_diffusers() {
    pcpp_kernels::cuda::set_small_gemm(pcpp_kernels::cuda::SmallGemm::Fused);
    let (e16, ebf) = (run(DType::F16), run(DType::BF16));
    pcpp_kernels::cuda::set_small_gemm(pcpp_kernels::cuda::SmallGemm::Off);
    assert!(e16 <= 2e-2, "f16 rel err {e16:e}");
    assert!(ebf <= 8e-2, "bf16 rel err {ebf:e}");
}
