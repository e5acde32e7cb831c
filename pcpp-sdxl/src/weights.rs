//! Weight loading from diffusers / transformers safetensors files by their real tensor names.
//!
//! A [`Weights`] store hands out tensors by name with their expected shape, cast to the compute
//! dtype, and remembers what was taken, so that after a model is built any tensor left over is an
//! error ("extra tensor") just like a missing or mis-shaped one. Every error names the file.
//! Tensors go straight to the store's [`Device`]. A store of random weights for a tensor manifest
//! (name → shape) stands in for a checkpoint in benchmarks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pcpp_kernels::io::SafetensorsFile;
use pcpp_kernels::{DType, Device, Tensor};

use crate::error::{Result, SdxlError};

/// Picks the weight file of a component folder: the full-precision file if present, else the
/// `.fp16` variant (cast on load). Sharded checkpoints are not supported.
pub fn find_weight_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    if dir.join(format!("{stem}.safetensors.index.json")).is_file() {
        return Err(SdxlError::Model {
            path: dir.to_path_buf(),
            msg: format!("sharded weights ({stem}.safetensors.index.json) are not supported; merge the shards into one file"),
        });
    }
    Err(SdxlError::Model {
        path: dir.to_path_buf(),
        msg: format!("no weight file: expected {stem}.safetensors or {stem}.fp16.safetensors"),
    })
}

/// Where the tensors of a [`Weights`] store come from.
enum Source {
    /// A memory-mapped safetensors file.
    File(SafetensorsFile),
    /// Random values for every name of a manifest (see [`Weights::random`]).
    Random {
        path: PathBuf,
        shapes: BTreeMap<String, Vec<usize>>,
        seed: u64,
    },
}

/// A safetensors file (or a random stand-in) opened for building one model component.
pub struct Weights {
    source: Source,
    dtype: DType,
    device: Device,
    used: Mutex<BTreeSet<String>>,
}

impl Weights {
    /// Opens `path`; tensors will be cast to `dtype`.
    pub fn open(path: &Path, dtype: DType) -> Result<Weights> {
        let file = SafetensorsFile::open(path).map_err(|e| SdxlError::Model {
            path: path.to_path_buf(),
            msg: e
                .to_string()
                .trim_start_matches(&format!("{}: ", path.display()))
                .to_string(),
        })?;
        Ok(Weights {
            source: Source::File(file),
            dtype,
            device: Device::Cpu,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// Random weights for every tensor of a manifest `{"name": [shape...], ...}` (the
    /// `tensor_manifest.json` beside a model config), generated on `device` from `seed`: matrices
    /// and kernels uniform in ±1/√fan_in (PyTorch's default initialisation bound), norm scales 1,
    /// biases and other vectors uniform in ±0.01. For benchmarks without a checkpoint.
    pub fn random(manifest: &Path, dtype: DType, device: Device, seed: u64) -> Result<Weights> {
        let shapes: BTreeMap<String, Vec<usize>> = read_json(manifest)?;
        Ok(Weights {
            source: Source::Random {
                path: manifest.to_path_buf(),
                shapes,
                seed,
            },
            dtype,
            device,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// The same store, handing out tensors on `device` (loaded straight there, tensor by tensor).
    pub fn on_device(mut self, device: Device) -> Weights {
        self.device = device;
        self
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The file's path (the manifest's for random weights).
    pub fn path(&self) -> &Path {
        match &self.source {
            Source::File(f) => f.path(),
            Source::Random { path, .. } => path,
        }
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::File(f) => f.contains(name).then(|| Vec::new()),
            Source::Random { shapes, .. } => shapes.get(name).cloned(),
        }
    }

    fn all_names(&self) -> Vec<String> {
        match &self.source {
            Source::File(f) => f.shapes().into_iter().map(|(n, _)| n).collect(),
            Source::Random { shapes, .. } => shapes.keys().cloned().collect(),
        }
    }

    /// The compute dtype tensors are cast to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn err(&self, tensor: &str, msg: impl Into<String>) -> SdxlError {
        SdxlError::Weight {
            path: self.path().to_path_buf(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.shape_of(name).is_some()
    }

    /// Tensor `name`, which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(self.err(name, format!("missing (expected shape {shape:?})")));
        }
        let t = match &self.source {
            Source::File(f) => f
                .load(name, Some(self.dtype))
                .and_then(|t| t.to_device(self.device)),
            Source::Random { shapes, seed, .. } => {
                let s = shapes.get(name).cloned().unwrap_or_default();
                let idx = shapes.keys().position(|k| k == name).unwrap_or(0) as u64;
                let bound = if s.len() >= 2 {
                    1.0 / (s[1..].iter().product::<usize>().max(1) as f32).sqrt()
                } else {
                    0.01
                };
                let range = if s.len() == 1 && name.ends_with(".weight") {
                    (1.0, 1.0)
                } else {
                    (-bound, bound)
                };
                Tensor::rand_uniform(&s, self.dtype, self.device, range, seed ^ (idx << 20))
            }
        }
        .map_err(|e| self.err(name, e.to_string()))?;
        if t.shape() != shape {
            return Err(self.err(
                name,
                format!("has shape {:?}, expected {shape:?}", t.shape()),
            ));
        }
        if let Ok(mut u) = self.used.lock() {
            u.insert(name.to_string());
        }
        Ok(t)
    }

    /// Tensor `name` if present (e.g. an optional bias), checked against `shape`.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Marks `name` as intentionally unused (e.g. `position_ids` buffers).
    pub fn ignore(&self, name: &str) {
        if let Ok(mut u) = self.used.lock() {
            u.insert(name.to_string());
        }
    }

    /// Errors if the file holds tensors that the model did not take.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let extra: Vec<String> = self
            .all_names()
            .into_iter()
            .filter(|n| !used.contains(n))
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        let shown: Vec<_> = extra.iter().take(5).cloned().collect();
        Err(self.err(
            &shown[0],
            format!(
                "unexpected tensor{} not used by this model configuration ({} in all: {}{})",
                if extra.len() > 1 { "s" } else { "" },
                extra.len(),
                shown.join(", "),
                if extra.len() > 5 { ", ..." } else { "" }
            ),
        ))
    }
}

/// Reads and parses a JSON config file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SdxlError::config(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| SdxlError::config(path, format!("invalid config: {e}")))
}
