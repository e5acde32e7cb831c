//! LoRA merged on the GPU: the tiny UNet's weights loaded straight to the device with the kohya
//! fixture (`tests/data/lora`) merged there, against diffusers' fused weights, in f32 and f16, and
//! the whole UNet built that way. Ignored by default (needs a GPU):
//! `cargo test --features cuda --test cuda_lora_parity -- --ignored`.
#![cfg(feature = "cuda")]

use pcpp_core::SerialFactory;
use pcpp_kernels::{DType, Device};
use pcpp_sdxl::weights::{find_weight_file, Weights};
use pcpp_sdxl::{LoraComponent, LoraSet, LoraSpec, UNet, UNetConfig};
use pcpp_tests::{data, refs, rel_err, tiny_model, TOL_MODULE};

const GPU: Device = Device::Cuda(0);

#[test]
#[ignore = "needs a CUDA GPU"]
fn lora_merges_on_the_gpu() {
    let set = LoraSet::load(&[LoraSpec {
        path: data("lora/kohya.safetensors"),
        scale: 1.0,
    }])
    .unwrap();
    let r = refs("lora/refs.safetensors");
    let dir = tiny_model().join("unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let file = find_weight_file(&dir, "diffusion_pytorch_model").unwrap();
    let prefix = "kohya.s1.0.fused.unet.";
    for (dtype, tol) in [(DType::F32, TOL_MODULE), (DType::F16, 1e-3)] {
        let w = Weights::open(&file, dtype)
            .unwrap()
            .on_device(GPU)
            .with_lora(set.for_component(LoraComponent::Unet));
        w.set_lora_unet_config(&cfg);
        let mut worst = 0.0f32;
        for (key, want) in r.iter().filter(|(k, _)| k.starts_with(prefix)) {
            let got = w.get(&key[prefix.len()..], want.shape()).unwrap();
            assert_eq!((got.device(), got.dtype()), (GPU, dtype), "{key}");
            let got = got.to_device(Device::Cpu).unwrap();
            let e = rel_err(&got.to_dtype(DType::F32).unwrap(), want);
            assert!(e <= tol, "{key} ({dtype}): rel err {e:e}");
            worst = worst.max(e);
        }
        println!("fused UNet weights merged on the GPU, {dtype}: worst rel err {worst:.2e}");
    }
    let unet = UNet::load_with_lora(
        &dir,
        DType::F32,
        GPU,
        &SerialFactory,
        set.for_component(LoraComponent::Unet),
    )
    .unwrap();
    assert_eq!(unet.device(), GPU);
}
