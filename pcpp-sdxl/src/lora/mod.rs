//! LoRA adapters for SDXL: reading adapter files, and merging them into the weights when a model
//! is loaded (as diffusers' `StableDiffusionXLPipeline.load_lora_weights(file)` followed by
//! `fuse_lora(lora_scale=s)`): every adapter pair that targets a module's `weight` adds
//! `s · (α / r) · up @ down` to it once, so a step costs the same as without LoRA.
//!
//! Two file formats are read (`docs/formats.md` lists the key mappings):
//!
//! - **kohya / A1111**: `lora_unet_<module>`, `lora_te1_<module>`, `lora_te2_<module>` with
//!   `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha` (none: α = rank). Module names
//!   have `_` for `.`; UNet modules in SDXL's original (SGM) layout (`input_blocks_4_1_…`) or in
//!   diffusers' (`down_blocks_1_attentions_0_…`); text-encoder modules in the transformers 4 layout
//!   (`text_model_encoder_layers_0_self_attn_q_proj`). LoCon adapters on convolutions have
//!   `down [r, cin, kh, kw]`, `up [cout, r, 1, 1]`.
//! - **diffusers / PEFT**: `unet.<module>`, `text_encoder.<module>`, `text_encoder_2.<module>` with
//!   `.lora_A.weight` (down) and `.lora_B.weight` (up). α comes from the safetensors metadata
//!   `lora_adapter_metadata` (`<component>.lora_alpha`, `<component>.alpha_pattern`,
//!   `<component>.use_rslora`: α / √r), as diffusers reads it; without metadata α = rank.
//!
//! The loader reads the files into a [`LoraSet`], hands each component its [`ComponentLora`], and
//! builds the component from a [`Weights`](crate::weights::Weights) store made with
//! [`Weights::with_lora`](crate::weights::Weights::with_lora). After the model is built,
//! [`Weights::check_all_used`](crate::weights::Weights::check_all_used) also fails on any adapter
//! that matched no module (naming the key and the file).

mod merge;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pcpp_kernels::io::SafetensorsFile;
use pcpp_kernels::Tensor;

use crate::error::{Result, SdxlError};

pub(crate) use merge::LoraMerge;

/// One `--lora FILE[:SCALE]` value: an adapter file and the strength it is applied with.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The safetensors file.
    pub path: PathBuf,
    /// The strength `s` in `W + s · (α / r) · up @ down` (diffusers' `lora_scale`).
    pub scale: f32,
}

impl LoraSpec {
    /// Parses `FILE[:SCALE]` (scale 1.0 when absent). The text after the last `:` is the scale
    /// when it reads as a number; otherwise the `:` belongs to the path, unless the part before it
    /// names a `.safetensors` file, when the scale is an error naming the value.
    pub fn parse(arg: &str) -> Result<LoraSpec> {
        let bad = |msg: String| {
            SdxlError::Input(format!(
                "--lora {arg:?}: {msg} (expected FILE[:SCALE], e.g. style.safetensors:0.8)"
            ))
        };
        if arg.trim().is_empty() {
            return Err(bad("no file given".into()));
        }
        if let Some((path, scale)) = arg.rsplit_once(':') {
            match scale.trim().parse::<f32>() {
                Ok(s) if !s.is_finite() => {
                    return Err(bad(format!("scale {scale:?} is not a finite number")))
                }
                Ok(s) if path.is_empty() => {
                    return Err(bad(format!("no file before the scale {s}")))
                }
                Ok(s) => {
                    return Ok(LoraSpec {
                        path: PathBuf::from(path),
                        scale: s,
                    })
                }
                Err(_) if scale.trim().is_empty() => {
                    return Err(bad("the scale after ':' is empty".into()))
                }
                Err(_) if path.to_ascii_lowercase().ends_with(".safetensors") => {
                    return Err(bad(format!("scale {scale:?} is not a number")))
                }
                Err(_) => {}
            }
        }
        Ok(LoraSpec {
            path: PathBuf::from(arg),
            scale: 1.0,
        })
    }
}

/// The model component an adapter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraComponent {
    /// The UNet (`lora_unet_*`, `unet.*`).
    Unet,
    /// The first CLIP text encoder (`lora_te1_*`, `text_encoder.*`).
    TextEncoder,
    /// The second CLIP text encoder (`lora_te2_*`, `text_encoder_2.*`).
    TextEncoder2,
}

impl LoraComponent {
    /// Every component.
    pub const ALL: [LoraComponent; 3] = [
        LoraComponent::Unet,
        LoraComponent::TextEncoder,
        LoraComponent::TextEncoder2,
    ];

    /// How messages name the component.
    pub fn describe(self) -> &'static str {
        match self {
            LoraComponent::Unet => "UNet",
            LoraComponent::TextEncoder => "text encoder 1",
            LoraComponent::TextEncoder2 => "text encoder 2",
        }
    }

    fn kohya_prefix(self) -> &'static str {
        match self {
            LoraComponent::Unet => "lora_unet_",
            LoraComponent::TextEncoder => "lora_te1_",
            LoraComponent::TextEncoder2 => "lora_te2_",
        }
    }

    /// The PEFT key prefix without its trailing `.` (also the prefix of the metadata keys).
    fn peft_name(self) -> &'static str {
        match self {
            LoraComponent::Unet => "unet",
            LoraComponent::TextEncoder => "text_encoder",
            LoraComponent::TextEncoder2 => "text_encoder_2",
        }
    }

    fn is_text(self) -> bool {
        self != LoraComponent::Unet
    }
}

/// How an adapter names its module (text-encoder modules without the `text_model` level).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    /// kohya: the module path with `_` for `.` (UNet: SGM or diffusers names).
    Flat(String),
    /// PEFT: the dotted module path (diffusers names).
    Dotted(String),
}

/// One adapter pair of one file.
#[derive(Debug, Clone)]
pub(crate) struct Adapter {
    /// The file it came from.
    pub(crate) file: Arc<PathBuf>,
    /// Its key in the file, up to the `.lora_down` / `.lora_A` part.
    pub(crate) key: String,
    /// Full name of its down tensor in the file (for shape errors).
    pub(crate) down_key: String,
    pub(crate) target: Target,
    /// `[r, in]` or `[r, cin, kh, kw]`, in the file's dtype, on the CPU.
    pub(crate) down: Tensor,
    /// `[out, r]` or `[cout, r, 1, 1]`.
    pub(crate) up: Tensor,
    /// `scale · α / r` (`scale · α / √r` for rsLoRA).
    pub(crate) factor: f32,
}

/// The adapters of every loaded file that belong to one component, handed to
/// [`Weights::with_lora`](crate::weights::Weights::with_lora).
#[derive(Debug, Clone)]
pub struct ComponentLora {
    component: LoraComponent,
    adapters: Vec<Adapter>,
}

impl ComponentLora {
    /// No adapters (loading with it is loading without LoRA).
    pub fn empty(component: LoraComponent) -> ComponentLora {
        ComponentLora {
            component,
            adapters: Vec::new(),
        }
    }

    /// The component the adapters are for.
    pub fn component(&self) -> LoraComponent {
        self.component
    }

    /// Number of adapter pairs (over all files).
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    /// Whether there is no adapter.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }
}

struct LoraFile {
    path: Arc<PathBuf>,
    scale: f32,
    /// Hash of the file's tensor names, shapes, dtypes and bytes.
    hash: u64,
    adapters: Vec<(LoraComponent, Adapter)>,
}

/// Every `--lora` file, read and checked (formats, pairs, ranks), ready to be merged at load.
pub struct LoraSet {
    files: Vec<LoraFile>,
}

impl LoraSet {
    /// Reads every file of `specs`; errors name the file (and the key at fault).
    pub fn load(specs: &[LoraSpec]) -> Result<LoraSet> {
        let files = specs.iter().map(read_file).collect::<Result<Vec<_>>>()?;
        Ok(LoraSet { files })
    }

    /// Whether no file was given.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The files and their scales, in the order given.
    pub fn files(&self) -> Vec<(PathBuf, f32)> {
        self.files
            .iter()
            .map(|f| (f.path.as_ref().clone(), f.scale))
            .collect()
    }

    /// Number of adapter pairs for component `c` over all files.
    pub fn count(&self, c: LoraComponent) -> usize {
        self.files
            .iter()
            .flat_map(|f| &f.adapters)
            .filter(|(k, _)| *k == c)
            .count()
    }

    /// The adapters of every file for component `c`, in file order (their deltas are summed).
    pub fn for_component(&self, c: LoraComponent) -> ComponentLora {
        ComponentLora {
            component: c,
            adapters: self
                .files
                .iter()
                .flat_map(|f| &f.adapters)
                .filter(|(k, _)| *k == c)
                .map(|(_, a)| a.clone())
                .collect(),
        }
    }

    /// Identifies the set for a start-up check across ranks: the number of files, then per file
    /// its scale (f32 bits) and a 64-bit hash of its tensor names, shapes, dtypes and contents
    /// (not its path, which may differ between machines). Little-endian.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut out = (self.files.len() as u64).to_le_bytes().to_vec();
        for f in &self.files {
            out.extend_from_slice(&f.scale.to_bits().to_le_bytes());
            out.extend_from_slice(&f.hash.to_le_bytes());
        }
        out
    }
}

fn file_err(path: &Path, msg: impl Into<String>) -> SdxlError {
    SdxlError::Model {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn key_err(path: &Path, key: &str, msg: impl Into<String>) -> SdxlError {
    SdxlError::Weight {
        path: path.to_path_buf(),
        tensor: key.to_string(),
        msg: msg.into(),
    }
}

/// 64-bit FNV-1a over 8-byte words (a fingerprint, not a cryptographic hash).
#[derive(Clone, Copy)]
struct Hasher(u64);

impl Hasher {
    fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01B3);
        }
        for &x in chunks.remainder() {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01B3);
        }
        self.0 = (self.0 ^ b.len() as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
}

/// What a tensor of a LoRA file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// A tensor name split into component, the adapter's key, its target and its part.
struct Classified {
    component: LoraComponent,
    key: String,
    target: Target,
    part: Part,
}

const SD1_HINT: &str = "this is an SD 1.x LoRA (one text encoder, `lora_te_` keys); SDXL LoRAs name their text encoders `lora_te1_` and `lora_te2_`";

/// Splits tensor `name`; `Err` holds the reason it is not an SDXL LoRA tensor this reader takes.
fn classify(name: &str) -> std::result::Result<Classified, String> {
    if name.starts_with("lora_te_") {
        return Err(SD1_HINT.to_string());
    }
    for c in LoraComponent::ALL {
        let Some(rest) = name.strip_prefix(c.kohya_prefix()) else {
            continue;
        };
        let (raw, suffix) = rest.split_once('.').ok_or_else(|| {
            "a kohya key without a `.lora_down` / `.lora_up` / `.alpha` part".to_string()
        })?;
        let part = match suffix {
            "lora_down.weight" => Part::Down,
            "lora_up.weight" => Part::Up,
            "alpha" => Part::Alpha,
            s => return Err(unsupported(s)),
        };
        let module = if c.is_text() {
            raw.strip_prefix("text_model_").unwrap_or(raw)
        } else {
            raw
        };
        return Ok(Classified {
            component: c,
            key: format!("{}{raw}", c.kohya_prefix()),
            target: Target::Flat(module.to_string()),
            part,
        });
    }
    // PEFT: longest prefix first (`text_encoder_2.` before `text_encoder.`)
    for c in [
        LoraComponent::TextEncoder2,
        LoraComponent::TextEncoder,
        LoraComponent::Unet,
    ] {
        let Some(rest) = name
            .strip_prefix(c.peft_name())
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        let (raw, part) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, Part::Down)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, Part::Up)
        } else if let Some(m) = rest.strip_suffix(".alpha") {
            (m, Part::Alpha)
        } else if rest.contains("lora.down.")
            || rest.contains("lora.up.")
            || rest.contains("lora_linear_layer.")
        {
            return Err("the old diffusers LoRA format (`lora.down` / `lora.up` / `lora_linear_layer`) is not supported; convert the file with diffusers (`load_lora_weights`, then `save_lora_weights`)".to_string());
        } else {
            let tail = rest.rsplitn(3, '.').take(2).collect::<Vec<_>>();
            return Err(unsupported(&format!(
                "{}.{}",
                tail.last().unwrap_or(&""),
                tail[0]
            )));
        };
        let module = if c.is_text() {
            raw.strip_prefix("text_model.").unwrap_or(raw)
        } else {
            raw
        };
        return Ok(Classified {
            component: c,
            key: format!("{}.{raw}", c.peft_name()),
            target: Target::Dotted(module.to_string()),
            part,
        });
    }
    Err("not an SDXL LoRA key: expected `lora_unet_`, `lora_te1_`, `lora_te2_` (kohya) or `unet.`, `text_encoder.`, `text_encoder_2.` (diffusers / PEFT)".to_string())
}

fn unsupported(suffix: &str) -> String {
    let what = if suffix.contains("dora_scale") || suffix.contains("magnitude") {
        "DoRA adapters are"
    } else if suffix.contains("hada_") || suffix.contains("lokr_") {
        "LyCORIS LoHa / LoKr adapters are"
    } else if suffix.contains("lora_mid") {
        "LoCon adapters with a Tucker `lora_mid` are"
    } else {
        "this kind of tensor is"
    };
    format!("{what} not supported (`.{suffix}`); only plain LoRA / LoCon down-up pairs are")
}

/// α of the PEFT adapters of component `c`, from the file's `lora_adapter_metadata`.
struct PeftAlpha {
    lora_alpha: Option<f32>,
    alpha_pattern: BTreeMap<String, f32>,
    rslora: bool,
}

impl PeftAlpha {
    fn read(path: &Path, meta: &serde_json::Value, c: LoraComponent) -> Result<PeftAlpha> {
        let p = c.peft_name();
        let get = |k: &str| meta.get(format!("{p}.{k}"));
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(file_err(
                path,
                format!("metadata `{p}.use_dora`: DoRA adapters are not supported"),
            ));
        }
        let alpha_pattern = match get("alpha_pattern") {
            Some(serde_json::Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_f64().map(|a| (k.clone(), a as f32)).ok_or_else(|| {
                        file_err(
                            path,
                            format!("metadata `{p}.alpha_pattern.{k}` is not a number"),
                        )
                    })
                })
                .collect::<Result<_>>()?,
            _ => BTreeMap::new(),
        };
        Ok(PeftAlpha {
            lora_alpha: get("lora_alpha").and_then(|v| v.as_f64()).map(|a| a as f32),
            alpha_pattern,
            rslora: get("use_rslora").and_then(|v| v.as_bool()) == Some(true),
        })
    }

    /// α of `module` (a pattern naming the module or a trailing part of it, else `lora_alpha`,
    /// else the rank), and whether the scale is α / √r.
    fn alpha(&self, module: &str, rank: usize) -> (f32, bool) {
        let hit = self
            .alpha_pattern
            .iter()
            .filter(|(k, _)| {
                module == k.as_str()
                    || module
                        .strip_suffix(k.as_str())
                        .is_some_and(|r| r.ends_with('.'))
                    || format!("text_model.{module}") == **k
            })
            .max_by_key(|(k, _)| k.len())
            .map(|(_, a)| *a);
        (hit.or(self.lora_alpha).unwrap_or(rank as f32), self.rslora)
    }
}

struct Pending {
    component: LoraComponent,
    target: Target,
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

fn read_file(spec: &LoraSpec) -> Result<LoraFile> {
    let path = &spec.path;
    let f = SafetensorsFile::open(path).map_err(|e| {
        file_err(
            path,
            format!(
                "cannot read the LoRA file: {}",
                e.to_string()
                    .trim_start_matches(&format!("{}: ", path.display()))
            ),
        )
    })?;
    let shapes = f.shapes();
    if shapes.is_empty() {
        return Err(file_err(path, "the LoRA file holds no tensors"));
    }
    let meta: serde_json::Value = match f.metadata().get("lora_adapter_metadata") {
        Some(text) => serde_json::from_str(text).map_err(|e| {
            file_err(
                path,
                format!("metadata `lora_adapter_metadata` is not JSON: {e}"),
            )
        })?,
        None => serde_json::Value::Null,
    };
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    let mut hash = Hasher(0xCBF2_9CE4_8422_2325);
    for (name, shape) in &shapes {
        let c = classify(name).map_err(|msg| key_err(path, name, msg))?;
        let p = pending.entry(c.key).or_insert_with(|| Pending {
            component: c.component,
            target: c.target,
            down: None,
            up: None,
            alpha: None,
        });
        let slot = match c.part {
            Part::Down => &mut p.down,
            Part::Up => &mut p.up,
            Part::Alpha => &mut p.alpha,
        };
        *slot = Some(name.clone());
        hash.bytes(name.as_bytes());
        for d in shape {
            hash.bytes(&(*d as u64).to_le_bytes());
        }
    }
    let path = Arc::new(path.clone());
    let load = |name: &str| -> Result<Tensor> {
        f.load(name, None)
            .map_err(|e| key_err(&path, name, e.to_string()))
    };
    let mut alphas: BTreeMap<LoraComponent, PeftAlpha> = BTreeMap::new();
    let mut adapters = Vec::new();
    for (key, p) in pending {
        let (component, target) = (p.component, p.target);
        let missing = |what: &str| key_err(&path, &key, format!("has no {what} tensor"));
        let down_key = p
            .down
            .ok_or_else(|| missing("down (`lora_down.weight` / `lora_A.weight`)"))?;
        let up_key =
            p.up.ok_or_else(|| missing("up (`lora_up.weight` / `lora_B.weight`)"))?;
        let (down, up) = (load(&down_key)?, load(&up_key)?);
        for t in [&down, &up] {
            hash.bytes(&t.to_bytes()?);
        }
        let (ds, us) = (down.shape(), up.shape());
        let rank = ds.first().copied().unwrap_or(0);
        let rank_ok = ds.len() >= 2
            && rank > 0
            && (us.len() == 2 || (us.len() == 4 && us[2] == 1 && us[3] == 1))
            && us[1] == rank;
        if !rank_ok {
            return Err(key_err(
                &path,
                &key,
                format!("down {ds:?} and up {us:?} are not a LoRA pair (down [r, in, ...], up [out, r] or [out, r, 1, 1])"),
            ));
        }
        let (alpha, rslora) = match &p.alpha {
            Some(a) => {
                let t = load(a)?;
                hash.bytes(&t.to_bytes()?);
                let v = t.to_vec_f32()?;
                match v.as_slice() {
                    [x] if x.is_finite() => (*x, false),
                    _ => return Err(key_err(&path, a, "alpha must be one finite number")),
                }
            }
            None => match &target {
                Target::Dotted(m) => {
                    let a = match alphas.entry(component) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(PeftAlpha::read(&path, &meta, component)?)
                        }
                    };
                    a.alpha(m, rank)
                }
                Target::Flat(_) => (rank as f32, false),
            },
        };
        let per_rank = if rslora {
            alpha / (rank as f32).sqrt()
        } else {
            alpha / rank as f32
        };
        adapters.push((
            component,
            Adapter {
                file: path.clone(),
                key,
                down_key,
                target,
                down,
                up,
                factor: spec.scale * per_rank,
            },
        ));
    }
    Ok(LoraFile {
        path,
        scale: spec.scale,
        hash: hash.0,
        adapters,
    })
}

#[cfg(test)]
mod tests;
