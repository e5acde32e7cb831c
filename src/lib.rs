//! Shared helpers for the cross-crate integration tests in `tests/`: where the shipped test data
//! and the embedded tiny model live, reference loading, and the project's tolerances in one place.

pub mod dit;

use std::collections::HashMap;
use std::path::PathBuf;

use pcpp_kernels::Tensor;

/// Per-module parity against diffusers (f32 CPU): max|Δ| ≤ this × max|ref|.
pub const TOL_MODULE: f32 = 1e-5;
/// Sub-modules deep inside a chain compared with the chained reference: max|Δ| ≤ this × max|ref|.
pub const TOL_CHAIN: f32 = 3e-5;
/// Whole-pipeline latents and images against diffusers: max|Δ| ≤ this × max|ref|.
pub const TOL_PIPELINE: f32 = 1e-4;
/// N ranks with every step synchronous against one rank: max|Δ| ≤ this × max|serial|.
pub const TOL_RANKS: f32 = 1e-5;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The embedded tiny SDXL pipeline (random weights).
pub fn tiny_model() -> PathBuf {
    repo().join("models/tiny-sdxl")
}

/// A file of the shipped test data.
pub fn data(rel: &str) -> PathBuf {
    repo().join("tests/data").join(rel)
}

/// All tensors of a reference file, as f32.
pub fn refs(rel: &str) -> HashMap<String, Tensor> {
    let p = data(rel);
    pcpp_kernels::io::load_all(&p).unwrap_or_else(|e| panic!("cannot load {}: {e}", p.display()))
}

/// Scale-normalised error `max|got − want| / max|want|` (shapes must match).
pub fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.shape(), want.shape(), "shape mismatch");
    let d = got.max_abs_diff(want).expect("diff");
    let m = want.max_abs().expect("max");
    if m == 0.0 {
        d
    } else {
        d / m
    }
}

/// Asserts `rel_err(got, want) ≤ tol`, naming the tensor.
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(
        got.shape(),
        want.shape(),
        "{name}: shape {:?} vs reference {:?}",
        got.shape(),
        want.shape()
    );
    let e = rel_err(got, want);
    assert!(e <= tol, "{name}: max|Δ|/max|ref| = {e:.3e} > {tol:.0e}");
}

/// The arguments of a diffusers pipeline call recorded in the reference data (`meta.json`:
/// `call` holds the call's keyword arguments, `height` / `width` the image size).
#[derive(Debug, Clone)]
pub struct RefCall {
    pub prompt: String,
    pub negative: Option<String>,
    pub guidance: f32,
    pub steps: usize,
    pub height: usize,
    pub width: usize,
}

impl RefCall {
    /// Reads the call of one `meta.json` entry; panics (a broken test fixture) on a missing key.
    pub fn from_meta(m: &serde_json::Value) -> RefCall {
        let call = &m["call"];
        let int =
            |v: &serde_json::Value, k: &str| v.as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
        RefCall {
            prompt: call["prompt"].as_str().expect("prompt").to_string(),
            negative: call["negative_prompt"].as_str().map(str::to_string),
            guidance: call["guidance_scale"].as_f64().expect("guidance_scale") as f32,
            steps: int(&call["num_inference_steps"], "num_inference_steps"),
            height: int(&m["height"], "height"),
            width: int(&m["width"], "width"),
        }
    }
}
