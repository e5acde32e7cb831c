//! Fuzz target for the model-folder loader: the input is split into a `config.json` and a
//! safetensors file of a VAE component folder; loading must return `Ok` or an error, never panic
//! or allocate without bound. Run with `cargo fuzz run model_loader` from `fuzz/` (see
//! `docs/robustness.md`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (config, weights) = data.split_at(split);
    let dir = std::env::temp_dir().join(format!("pcpp-fuzz-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let _ = std::fs::write(dir.join("config.json"), config);
    let _ = std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), weights.get(1..).unwrap_or(&[]));
    let _ = pcpp_sdxl::VaeDecoder::load(&dir, pcpp_kernels::DType::F32);
});
