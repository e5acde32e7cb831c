//! Weight loading from diffusers / transformers safetensors files by their real tensor names.
//!
//! A [`Weights`] store hands out tensors by name with their expected shape, cast to the compute
//! dtype, and remembers what was taken, so that after a model is built any tensor left over is an
//! error ("extra tensor") just like a missing or mis-shaped one. Every error names the file.
//!
//! For benchmarks of configurations whose weights are not at hand (e.g. full SDXL from its
//! `config.json` alone), a store can instead generate seeded random tensors on demand
//! ([`Weights::random_unet`], [`Weights::random_from_manifest`]): each tensor is created only when
//! the model asks for it, so nothing bigger than the model itself is ever materialised.
//!
//! Tensors go straight to the store's [`Device`] ([`Weights::on_device`]), one at a time.
//!
//! LoRA adapters ([`Weights::with_lora`]) are merged into the tensors they target as the model
//! takes them (see [`crate::lora`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pcpp_kernels::shards::WeightFiles;
use pcpp_kernels::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Result, SdxlError};
use crate::lora::{ComponentLora, LoraMerge};
use crate::unet_config::UNetConfig;

/// Picks the weight file of a component folder: the full-precision file if present, else the
/// `.fp16` variant (cast on load), else a shard index (`<stem>.safetensors.index.json`, see
/// [`pcpp_kernels::shards`]), which [`Weights::open`] opens with all its shards.
pub fn find_weight_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    pcpp_kernels::shards::find_weights(dir, stem).ok_or_else(|| SdxlError::Model {
        path: dir.to_path_buf(),
        msg: format!(
            "no weight file: expected {stem}.safetensors, {stem}.fp16.safetensors or {stem}.safetensors.index.json (shards)"
        ),
    })
}

/// Tensor names and shapes of a model component (diffusers' `tensor_manifest.json` layout:
/// `{"name": [d0, d1, ...], ...}`).
pub type Manifest = BTreeMap<String, Vec<usize>>;

/// Where a [`Weights`] store gets its tensors.
enum Source {
    /// A safetensors file, or the shards of an index.
    File(WeightFiles),
    /// Seeded random tensors, created on request.
    Random(RandomSource),
}

/// Which names a random store holds.
enum Presence {
    /// Exactly the names of a manifest, with their shapes.
    Manifest(Manifest),
    /// Every name a model asks for, except the ones diffusers' `UNet2DConditionModel` never has
    /// (the q/k/v projection biases of its attention layers, built with `bias=False`).
    UNetDefaults,
    /// Every name a model asks for.
    Every,
}

struct RandomSource {
    /// The file that describes the component (config or manifest), for error messages.
    origin: PathBuf,
    seed: u64,
    presence: Presence,
}

impl RandomSource {
    fn contains(&self, name: &str) -> bool {
        match &self.presence {
            Presence::Manifest(m) => m.contains_key(name),
            Presence::UNetDefaults => ![".to_q.bias", ".to_k.bias", ".to_v.bias"]
                .iter()
                .any(|s| name.ends_with(s)),
            Presence::Every => true,
        }
    }
}

/// The increment of SplitMix64's state per draw.
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: a small, well-mixed, reproducible generator (the stream depends only on the seed;
/// the state after `i` draws is `seed + i·γ`, so a stream can be entered anywhere).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(SPLITMIX_GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    fn next_signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// FNV-1a of a tensor name, so each tensor's values depend on (seed, name) and not on load order.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Seeded random values for tensor `name` of `shape`, scaled like PyTorch's default initialisation
/// so activations stay in a normal range through a deep model: weight matrices and kernels uniform in
/// `±1/√fan_in`, 1-d `*.weight` (norm scales) `1 ± 0.1`, everything else (biases) `±0.1`.
/// Element `i` is the `i`-th draw of the (seed, name) stream whatever the thread count, so large
/// tensors are filled in parallel.
fn random_values(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let n: usize = shape.iter().product();
    let base = seed ^ name_hash(name);
    let (scale, offset) = if shape.len() >= 2 {
        let fan_in: usize = shape[1..].iter().product();
        (1.0 / (fan_in.max(1) as f32).sqrt(), 0.0)
    } else if name.ends_with(".weight") {
        (0.1, 1.0)
    } else {
        (0.1, 0.0)
    };
    let mut v = vec![0.0f32; n];
    let fill = |(c, chunk): (usize, &mut [f32])| {
        let mut rng =
            SplitMix64(base.wrapping_add(((c * CHUNK) as u64).wrapping_mul(SPLITMIX_GAMMA)));
        for x in chunk {
            *x = offset + scale * rng.next_signed();
        }
    };
    if n > CHUNK {
        v.par_chunks_mut(CHUNK).enumerate().for_each(fill);
    } else {
        v.chunks_mut(CHUNK).enumerate().for_each(fill);
    }
    v
}

/// A weight store for building one model component: a safetensors file (or a set of shards), or
/// seeded random tensors.
pub struct Weights {
    source: Source,
    dtype: DType,
    device: Device,
    used: Mutex<BTreeSet<String>>,
    /// Tensors handed out so far, when the store keeps them ([`Weights::keep_taken`]).
    kept: Option<Mutex<std::collections::HashMap<String, Tensor>>>,
    /// LoRA adapters merged into the tensors they target ([`Weights::with_lora`]).
    lora: Option<LoraMerge>,
}

impl Weights {
    /// A store over `source` handing out `dtype` tensors on the CPU.
    fn from_source(source: Source, dtype: DType) -> Weights {
        Weights {
            source,
            dtype,
            device: Device::Cpu,
            used: Mutex::new(BTreeSet::new()),
            kept: None,
            lora: None,
        }
    }

    /// Opens `path` (a safetensors file, or a shard index `*.safetensors.index.json` with its
    /// shards); tensors will be cast to `dtype`.
    pub fn open(path: &Path, dtype: DType) -> Result<Weights> {
        let file = WeightFiles::open(path).map_err(|e| SdxlError::Model {
            path: path.to_path_buf(),
            msg: e
                .to_string()
                .trim_start_matches(&format!("{}: ", path.display()))
                .to_string(),
        })?;
        Ok(Weights::from_source(Source::File(file), dtype))
    }

    /// Random weights for a diffusers `UNet2DConditionModel`: every tensor the model asks for, in
    /// the shape it asks for, except the attention q/k/v biases that diffusers' UNet never has.
    /// `config` (the UNet's `config.json`) is only named in error messages.
    pub fn random_unet(config: &Path, dtype: DType, seed: u64) -> Weights {
        Weights::from_source(
            Source::Random(RandomSource {
                origin: config.to_path_buf(),
                seed,
                presence: Presence::UNetDefaults,
            }),
            dtype,
        )
    }

    /// Random weights with every tensor a model asks for, in the shape it asks for (e.g. a VAE
    /// of a made-up configuration). `origin` (its config) is only named in error messages.
    pub fn random_every(origin: &Path, dtype: DType, seed: u64) -> Weights {
        Weights::from_source(
            Source::Random(RandomSource {
                origin: origin.to_path_buf(),
                seed,
                presence: Presence::Every,
            }),
            dtype,
        )
    }

    /// Random weights with exactly the names and shapes of a `tensor_manifest.json`
    /// (`{"name": [shape...]}`): missing, extra or mis-shaped tensors are errors as with a file.
    pub fn random_from_manifest(manifest: &Path, dtype: DType, seed: u64) -> Result<Weights> {
        let m: Manifest = read_json(manifest)?;
        Ok(Weights::from_source(
            Source::Random(RandomSource {
                origin: manifest.to_path_buf(),
                seed,
                presence: Presence::Manifest(m),
            }),
            dtype,
        ))
    }

    /// Random weights for the UNet of `config` (its `config.json`): exactly the names and shapes of
    /// the `tensor_manifest.json` next to it when there is one, else every tensor the model asks
    /// for ([`Weights::random_unet`]).
    pub fn random_for_unet_config(config: &Path, dtype: DType, seed: u64) -> Result<Weights> {
        let manifest = config.with_file_name("tensor_manifest.json");
        if manifest.is_file() {
            Weights::random_from_manifest(&manifest, dtype, seed)
        } else {
            Ok(Weights::random_unet(config, dtype, seed))
        }
    }

    /// The file's path (for a random store: the config or manifest it was made from).
    pub fn path(&self) -> &Path {
        match &self.source {
            Source::File(f) => f.path(),
            Source::Random(r) => &r.origin,
        }
    }

    /// Whether the tensors are random rather than read from a file.
    pub fn is_random(&self) -> bool {
        matches!(self.source, Source::Random(_))
    }

    /// Names of the tensors taken so far (or marked ignored), sorted.
    pub fn taken(&self) -> Vec<String> {
        self.used
            .lock()
            .map(|u| u.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The same store, keeping every tensor it hands out, so that building the same model again
    /// (e.g. once per simulated rank) shares the tensors instead of reading or generating them
    /// again.
    pub fn keep_taken(mut self) -> Weights {
        self.kept = Some(Mutex::new(std::collections::HashMap::new()));
        self
    }

    /// The same store, handing out every tensor on `device` (moved there as it is taken).
    pub fn on_device(mut self, device: Device) -> Weights {
        self.device = device;
        self
    }

    /// The same store, merging `lora`'s adapters into the tensors they target as the model takes
    /// them: `W + Σ scale · (α / r) · up @ down`, computed once in f32 on the store's device and
    /// then cast to its dtype. [`Weights::check_all_used`] (or [`Weights::check_lora_consumed`])
    /// then fails on adapters that matched no tensor.
    pub fn with_lora(mut self, lora: ComponentLora) -> Weights {
        self.lora = LoraMerge::new(lora);
        self
    }

    /// Tells the LoRA adapters the UNet configuration, so that kohya keys with the original (SGM)
    /// block names find their modules. [`crate::UNet::build`] calls it.
    pub fn set_lora_unet_config(&self, cfg: &UNetConfig) {
        if let Some(l) = &self.lora {
            l.set_unet_config(cfg);
        }
    }

    /// Errors if a LoRA adapter of [`Weights::with_lora`] matched no tensor the model took (the
    /// error names the adapter's key and file).
    pub fn check_lora_consumed(&self) -> Result<()> {
        self.lora.as_ref().map_or(Ok(()), LoraMerge::check_consumed)
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> Device {
        self.device
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
        match &self.source {
            Source::File(f) => f.contains(name),
            Source::Random(r) => r.contains(name),
        }
    }

    /// Tensor `name`, which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(self.err(name, format!("missing (expected shape {shape:?})")));
        }
        if let Some(t) = self
            .kept
            .as_ref()
            .and_then(|k| k.lock().ok())
            .and_then(|k| k.get(name).cloned())
            .filter(|t| t.shape() == shape)
        {
            return Ok(t);
        }
        let hits = self
            .lora
            .as_ref()
            .map(|l| l.adapters_for(name))
            .unwrap_or_default();
        // a tensor that gets adapters is merged in f32, then cast once
        let dtype = if hits.is_empty() {
            self.dtype
        } else {
            DType::F32
        };
        let t = match &self.source {
            Source::File(f) => f
                .load_on(name, Some(dtype), self.device)
                .map_err(|e| self.err(name, e.to_string()))?,
            Source::Random(r) => {
                let shape = match &r.presence {
                    Presence::Manifest(m) => m.get(name).map_or(shape, |s| s.as_slice()),
                    Presence::UNetDefaults | Presence::Every => shape,
                };
                Tensor::from_f32(shape, random_values(r.seed, name, shape), dtype)
                    .map_err(|e| self.err(name, e.to_string()))?
            }
        };
        if t.shape() != shape {
            return Err(self.err(
                name,
                format!("has shape {:?}, expected {shape:?}", t.shape()),
            ));
        }
        let mut t = t
            .to_device(self.device)
            .map_err(|e| self.err(name, e.to_string()))?;
        if let (Some(l), false) = (&self.lora, hits.is_empty()) {
            t = l
                .merge(name, t, &hits, self.device)?
                .to_dtype(self.dtype)
                .map_err(|e| self.err(name, e.to_string()))?;
        }
        if let Ok(mut u) = self.used.lock() {
            u.insert(name.to_string());
        }
        if let Some(mut k) = self.kept.as_ref().and_then(|k| k.lock().ok()) {
            k.insert(name.to_string(), t.clone());
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

    /// Names of every tensor the store holds (none listed for a random UNet store, which holds
    /// whatever the model asks for).
    pub fn names(&self) -> Vec<String> {
        match &self.source {
            Source::File(f) => f.shapes().into_iter().map(|(n, _)| n).collect(),
            Source::Random(RandomSource {
                presence: Presence::Manifest(m),
                ..
            }) => m.keys().cloned().collect(),
            Source::Random(_) => Vec::new(),
        }
    }

    /// Errors if the file holds tensors that the model did not take, or if a LoRA adapter matched
    /// no tensor ([`Weights::check_lora_consumed`]).
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let names: Vec<String> = match &self.source {
            Source::File(f) => f.shapes().into_iter().map(|(n, _)| n).collect(),
            Source::Random(RandomSource {
                presence: Presence::Manifest(m),
                ..
            }) => m.keys().cloned().collect(),
            Source::Random(_) => Vec::new(),
        };
        let extra: Vec<String> = names.into_iter().filter(|n| !used.contains(n)).collect();
        if extra.is_empty() {
            return self.check_lora_consumed();
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
