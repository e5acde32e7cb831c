//! Helpers shared by the CLI integration tests: paths, a per-process scratch folder, the arguments
//! of a `generate` run of the Euler reference prompt from its stored noise, and reading latents.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A path in this test process's scratch folder.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcpp-cli-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Arguments of `generate` for the Euler reference prompt from its stored noise (64×64, `steps`
/// steps, writing `<tag>.png` and `<tag>.safetensors` latents), plus `extra`; returns the latents path.
pub fn gen_args(tag: &str, steps: usize, extra: &[&str]) -> (Vec<String>, PathBuf) {
    let noise = repo().join("tests/data/refs-tiny-sdxl/pipeline_euler.safetensors");
    let lat = tmp(&format!("{tag}.safetensors"));
    let png = tmp(&format!("{tag}.png"));
    let steps = steps.to_string();
    let mut v: Vec<String> = [
        "generate",
        "--prompt",
        "A painting of a squirrel eating a burger",
        "--steps",
        &steps,
        "--height",
        "64",
        "--width",
        "64",
        "--init-noise",
        noise.to_str().unwrap(),
        "--save-latents",
        lat.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    (v, lat)
}

/// The `latents` tensor of a file written by `--save-latents`.
pub fn latents(p: &Path) -> pcpp_kernels::Tensor {
    pcpp_kernels::io::load_all(p)
        .unwrap()
        .remove("latents")
        .unwrap()
}

/// Scale-normalised difference `max|a − b| / max|b|`.
pub fn rel(a: &pcpp_kernels::Tensor, b: &pcpp_kernels::Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.max_abs_diff(b).unwrap() / b.max_abs().unwrap()
}

/// A file of the shipped test data.
pub fn data(rel: &str) -> PathBuf {
    repo().join("tests/data").join(rel)
}

/// Runs the built binary.
pub fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args(args)
        .output()
        .expect("run pcpp-cli")
}

/// A path as `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
