//! Random-weight UNets for benchmarks: the default names of a random store must be exactly the
//! tensors diffusers writes (checked against the shipped weight files of three differently shaped
//! configurations), a `tensor_manifest.json` is honoured strictly, and the weights are seeded.

use std::collections::BTreeMap;
use std::path::Path;

use pcpp_core::{SerialFactory, StepCtx};
use pcpp_kernels::io::SafetensorsFile;
use pcpp_kernels::{DType, Tensor};
use pcpp_sdxl::weights::Weights;
use pcpp_sdxl::{UNet, UNetCond, UNetConfig};
use pcpp_tests::{data, repo, tiny_model};

fn file_manifest(unet_dir: &Path) -> BTreeMap<String, Vec<usize>> {
    let f = SafetensorsFile::open(unet_dir.join("diffusion_pytorch_model.safetensors"))
        .expect("open weights");
    f.shapes().into_iter().collect()
}

/// Builds `dir`'s config from a random store and returns the names and shapes it took.
fn random_names(dir: &Path) -> BTreeMap<String, Vec<usize>> {
    let config = dir.join("config.json");
    let cfg = UNetConfig::from_file(&config).expect("config");
    let w = Weights::random_unet(&config, DType::F32, 7);
    UNet::build(cfg, &w, &SerialFactory).expect("build random");
    let real = file_manifest(dir);
    w.taken()
        .into_iter()
        .map(|n| {
            let shape = real.get(&n).cloned().unwrap_or_default();
            (n, shape)
        })
        .collect()
}

#[test]
fn random_unet_takes_exactly_the_diffusers_tensors() {
    for dir in [
        tiny_model().join("unet"),
        data("unet-alt/unet"),
        data("unet-sd15/unet"),
    ] {
        let want = file_manifest(&dir);
        let got = random_names(&dir);
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{}: random store missed {missing:?}, invented {extra:?}",
            dir.display()
        );
    }
}

#[test]
fn sdxl_manifest_has_no_names_the_default_rule_drops() {
    let p = repo().join("models/sdxl-base-1.0-configs/unet/tensor_manifest.json");
    let m: BTreeMap<String, Vec<usize>> =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read manifest")).expect("json");
    assert_eq!(m.len(), 1680, "SDXL base UNet has 1680 tensors");
    let w = Weights::random_unet(&p, DType::F32, 0);
    let dropped: Vec<_> = m.keys().filter(|n| !w.contains(n)).collect();
    assert!(dropped.is_empty(), "default rule drops {dropped:?}");
}

fn tiny_inputs(b: usize) -> (Tensor, Tensor, UNetCond) {
    let sample = Tensor::from_vec(
        &[b, 4, 8, 8],
        (0..b * 256)
            .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
            .collect(),
    )
    .unwrap();
    let t = Tensor::from_vec(&[b], vec![500.0; b]).unwrap();
    let e = Tensor::from_vec(
        &[b, 77, 64],
        (0..b * 77 * 64)
            .map(|i| ((i % 13) as f32 - 6.0) / 6.0)
            .collect(),
    )
    .unwrap();
    let te = Tensor::from_vec(&[b, 32], vec![0.5; b * 32]).unwrap();
    let ti = Tensor::from_vec(&[b, 6], vec![64.0; b * 6]).unwrap();
    (sample, t, UNetCond::new(e, Some(te), Some(ti)))
}

#[test]
fn random_unet_is_seeded_and_runs() {
    let config = tiny_model().join("unet/config.json");
    let run = |seed: u64| {
        let unet = UNet::random(&config, DType::F32, &SerialFactory, seed).expect("random unet");
        let (s, t, c) = tiny_inputs(1);
        unet.forward(&StepCtx::serial(), &s, &t, &c, None)
            .expect("forward")
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a.shape(), [1, 4, 8, 8]);
    assert!(a.to_vec_f32().unwrap().iter().all(|x| x.is_finite()));
    assert_eq!(a.max_abs_diff(&b).unwrap(), 0.0, "same seed, same output");
    assert!(
        a.max_abs_diff(&c).unwrap() > 1e-3,
        "another seed changes it"
    );
}

#[test]
fn manifest_next_to_the_config_is_enforced() {
    let dir = std::env::temp_dir().join(format!("pcpp-random-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.json");
    std::fs::copy(tiny_model().join("unet/config.json"), &config).unwrap();
    let mut m = file_manifest(&tiny_model().join("unet"));
    let write = |m: &BTreeMap<String, Vec<usize>>| {
        std::fs::write(
            dir.join("tensor_manifest.json"),
            serde_json::to_string(m).unwrap(),
        )
        .unwrap()
    };
    write(&m);
    assert!(UNet::random(&config, DType::F32, &SerialFactory, 0).is_ok());

    m.insert("conv_in.weight".into(), vec![2, 4, 3, 5]);
    write(&m);
    let err = UNet::random(&config, DType::F32, &SerialFactory, 0)
        .err()
        .expect("mis-shaped manifest entry must fail")
        .to_string();
    assert!(err.contains("conv_in.weight"), "{err}");

    m.insert("conv_in.weight".into(), vec![2, 4, 3, 3]);
    m.insert("extra.weight".into(), vec![3]);
    write(&m);
    let err = UNet::random(&config, DType::F32, &SerialFactory, 0)
        .err()
        .expect("extra manifest entry must fail")
        .to_string();
    assert!(err.contains("extra.weight"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
