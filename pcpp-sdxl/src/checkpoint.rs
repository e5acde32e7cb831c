//! Single-file SDXL checkpoints (`sd_xl_base_1.0.safetensors` style): detection, and conversion
//! to and from a diffusers pipeline folder. Model-format plumbing; no PCPP section.
//!
//! A single file holds the UNet under `model.diffusion_model.` (the original LDM/SGM layout:
//! `input_blocks`, `middle_block`, `output_blocks`), the VAE under `first_stage_model.` (LDM
//! `encoder.down.N.block.M`, `decoder.up.N` counted from the lowest resolution, 1×1-conv attention),
//! the first text encoder under `conditioner.embedders.0.transformer.` (Hugging Face CLIP names) and
//! the second under `conditioner.embedders.1.model.` (OpenCLIP names: fused `in_proj` q/k/v,
//! `resblocks`, a transposed `text_projection`). Tensors keep their dtype (f32, f16, bf16) and bytes.
//!
//! Component configs travel in the safetensors metadata (`pcpp.configs`, written by
//! [`pack_single_file`]); a file without them (a public checkpoint) gets the SDXL-base configs
//! built into the binary, with the CLIP tokenizer (`tokenizer.json`) built in as well.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Result, SdxlError};
use crate::weights::find_weight_file;

mod keys;
use keys::{
    rename, unet_to_diffusers, unet_to_original, vae_to_diffusers, vae_to_original, UnetLayout,
    TE2_LAYER,
};
pub use keys::{
    unet_key_to_diffusers, unet_key_to_original, unet_key_to_original_for, vae_key_to_diffusers,
    vae_key_to_original,
};

/// Metadata key holding the component configs (a JSON object: relative path → file text).
pub const CONFIGS_KEY: &str = "pcpp.configs";

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const TE1: &str = "conditioner.embedders.0.transformer.";
const TE2: &str = "conditioner.embedders.1.model.";

/// The SDXL-base pipeline configs and the CLIP tokenizer, built into the binary (relative path,
/// text).
const BUILTIN_FILES: [(&str, &str); 9] = [
    (
        "model_index.json",
        include_str!("../../models/sdxl-base-1.0-configs/model_index.json"),
    ),
    (
        "scheduler/scheduler_config.json",
        include_str!("../../models/sdxl-base-1.0-configs/scheduler/scheduler_config.json"),
    ),
    (
        "unet/config.json",
        include_str!("../../models/sdxl-base-1.0-configs/unet/config.json"),
    ),
    (
        "vae/config.json",
        include_str!("../../models/sdxl-base-1.0-configs/vae/config.json"),
    ),
    (
        "text_encoder/config.json",
        include_str!("../../models/sdxl-base-1.0-configs/text_encoder/config.json"),
    ),
    (
        "text_encoder_2/config.json",
        include_str!("../../models/sdxl-base-1.0-configs/text_encoder_2/config.json"),
    ),
    (
        "tokenizer/tokenizer_config.json",
        include_str!("../../models/tiny-sdxl/tokenizer/tokenizer_config.json"),
    ),
    (
        "tokenizer_2/tokenizer_config.json",
        include_str!("../../models/tiny-sdxl/tokenizer_2/tokenizer_config.json"),
    ),
    (
        "tokenizer/tokenizer.json",
        include_str!("../../models/tiny-sdxl/tokenizer/tokenizer.json"),
    ),
];

/// The small config files stored in a packed file's metadata.
const CONFIG_FILES: [&str; 8] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
];

fn model_err(path: &Path, msg: impl Into<String>) -> SdxlError {
    SdxlError::Model {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Tensor names and the byte counts of a safetensors file, read from its header only.
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensor names.
    pub names: Vec<String>,
    /// `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Bytes the header says the file has.
    pub expected_len: u64,
    /// Bytes the file has.
    pub actual_len: u64,
}

/// Reads the header of a safetensors file: an error names the file when it is not safetensors,
/// and when it is shorter than its header says (a truncated download).
pub fn read_header(path: &Path) -> Result<Header> {
    let mut f = std::fs::File::open(path).map_err(|e| model_err(path, e.to_string()))?;
    let actual_len = f
        .metadata()
        .map_err(|e| model_err(path, e.to_string()))?
        .len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| model_err(path, format!("not a safetensors file ({actual_len} bytes)")))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > actual_len {
        return Err(model_err(
            path,
            format!(
                "not a safetensors file, or truncated: the header claims {n} bytes, the file has {actual_len}"
            ),
        ));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .map_err(|e| model_err(path, e.to_string()))?;
    let json: serde_json::Value = serde_json::from_slice(&buf)
        .map_err(|e| model_err(path, format!("not a safetensors file (header: {e})")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| model_err(path, "not a safetensors file (header is not an object)"))?;
    let mut names = Vec::new();
    let mut end = 0u64;
    let mut metadata = BTreeMap::new();
    for (k, v) in obj {
        if k == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (mk, mv) in m {
                    metadata.insert(mk.clone(), mv.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        names.push(k.clone());
        if let Some(e) = v["data_offsets"][1].as_u64() {
            end = end.max(e);
        }
    }
    let expected_len = 8 + n + end;
    if actual_len < expected_len {
        return Err(model_err(
            path,
            format!(
                "truncated file: the header lists {} tensors ending at byte {expected_len}, but the file has {actual_len} bytes ({:.1}% present); download it again",
                names.len(),
                100.0 * actual_len as f64 / expected_len as f64
            ),
        ));
    }
    Ok(Header {
        names,
        metadata,
        expected_len,
        actual_len,
    })
}

/// Checks that a header is a complete SDXL (base) single-file checkpoint; the error says what was
/// found instead (SD 1.x/2.x, a LoRA, a refiner, a lone component, a diffusers component file).
pub fn check_sdxl_single_file(path: &Path, header: &Header) -> Result<()> {
    let has = |p: &str| header.names.iter().any(|n| n.starts_with(p));
    let example = |pred: &dyn Fn(&str) -> bool| {
        header
            .names
            .iter()
            .find(|n| pred(n))
            .cloned()
            .unwrap_or_default()
    };
    let expected = "expected an SDXL base checkpoint (`model.diffusion_model.*` with `label_emb`, `first_stage_model.*`, `conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*`)";
    if header.names.iter().any(|n| {
        n.contains("lora_") || n.contains(".lora.") || n.contains("lora_A") || n.contains("hada_")
    }) {
        let e = example(&|n| n.contains("lora") || n.contains("hada_"));
        return Err(model_err(
            path,
            format!("this is a LoRA / adapter file (e.g. tensor `{e}`), not a full checkpoint; {expected}"),
        ));
    }
    if has("cond_stage_model.") || (has(UNET) && !has(&format!("{UNET}label_emb."))) {
        let e = example(&|n| n.starts_with("cond_stage_model.") || n.starts_with(UNET));
        return Err(model_err(
            path,
            format!(
                "this is a Stable Diffusion 1.x/2.x checkpoint (e.g. tensor `{e}`; its UNet has no `label_emb`), which does not fit the SDXL pipeline; {expected}"
            ),
        ));
    }
    if has("conditioner.embedders.0.model.") && !has("conditioner.embedders.1.") {
        return Err(model_err(
            path,
            format!("this is an SDXL refiner checkpoint (one OpenCLIP text encoder); {expected}"),
        ));
    }
    if !has(UNET) {
        if has("down_blocks.") || has("text_model.") || has("encoder.down_blocks.") {
            return Err(model_err(
                path,
                format!(
                    "this is a diffusers component file (e.g. tensor `{}`); pass the pipeline folder instead; {expected}",
                    header.names.first().cloned().unwrap_or_default()
                ),
            ));
        }
        return Err(model_err(
            path,
            format!(
                "no UNet tensors (`model.diffusion_model.*`) among its {} tensors; {expected}",
                header.names.len()
            ),
        ));
    }
    let missing: Vec<&str> = [
        (VAE, "VAE"),
        (TE1, "text encoder 1"),
        (TE2, "text encoder 2"),
    ]
    .iter()
    .filter(|(p, _)| !has(p))
    .map(|(_, what)| *what)
    .collect();
    if !missing.is_empty() {
        return Err(model_err(
            path,
            format!(
                "an SDXL UNet without its {}; the pipeline needs UNet, VAE and both text encoders in one file",
                missing.join(", ")
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// raw tensors
// ---------------------------------------------------------------------------------------------

/// A tensor as raw little-endian bytes of its dtype.
#[derive(Debug, Clone)]
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Raw {
    fn from_view(v: &TensorView<'_>) -> Raw {
        Raw {
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        }
    }

    fn elem(&self) -> usize {
        self.dtype.bitsize() / 8
    }

    /// Rows `[start, start + len)` of dimension 0.
    fn rows(&self, start: usize, len: usize) -> Raw {
        let row: usize = self.shape[1..].iter().product::<usize>() * self.elem();
        let mut shape = self.shape.clone();
        shape[0] = len;
        Raw {
            dtype: self.dtype,
            shape,
            data: self.data[start * row..(start + len) * row].to_vec(),
        }
    }

    fn concat_rows(parts: &[&Raw]) -> Raw {
        let mut shape = parts[0].shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        Raw {
            dtype: parts[0].dtype,
            shape,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        }
    }

    /// Transpose of a 2-d tensor.
    fn transposed(&self) -> Raw {
        let (r, c, e) = (self.shape[0], self.shape[1], self.elem());
        let mut data = vec![0u8; self.data.len()];
        for i in 0..r {
            for j in 0..c {
                let (src, dst) = ((i * c + j) * e, (j * r + i) * e);
                data[dst..dst + e].copy_from_slice(&self.data[src..src + e]);
            }
        }
        Raw {
            dtype: self.dtype,
            shape: vec![c, r],
            data,
        }
    }

    fn reshaped(mut self, shape: Vec<usize>) -> Raw {
        self.shape = shape;
        self
    }
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    if pcpp_kernels::shards::is_index(path) {
        return Err(model_err(
            path,
            "sharded weights cannot be written to a single-file checkpoint (only loaded)",
        ));
    }
    read_header(path)?;
    std::fs::read(path).map_err(|e| model_err(path, e.to_string()))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| model_err(path, e.to_string()))
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| model_err(path, e.to_string()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| model_err(d, e.to_string()))?;
    }
    std::fs::write(path, bytes).map_err(|e| model_err(path, e.to_string()))
}

fn save(
    path: &Path,
    tensors: &BTreeMap<String, Raw>,
    meta: Option<HashMap<String, String>>,
) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| model_err(d, e.to_string()))?;
    }
    let data: Vec<(&str, &Raw)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    safetensors::serialize_to_file(data, meta, path).map_err(|e| model_err(path, e.to_string()))
}

fn json_at(path: &Path, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| model_err(path, format!("invalid JSON: {e}")))
}

// ---------------------------------------------------------------------------------------------
// pack / unpack
// ---------------------------------------------------------------------------------------------

/// Writes a diffusers SDXL pipeline folder `dir` as one safetensors file with the original
/// (Stability) key names, every tensor in its stored dtype, and the component configs in the
/// metadata so that non-standard configs round-trip. Returns the number of tensors written.
pub fn pack_single_file(dir: &Path, out: &Path) -> Result<usize> {
    crate::pipeline::ModelIndex::load(dir)?;
    let mut configs = serde_json::Map::new();
    for rel in CONFIG_FILES {
        let p = dir.join(rel);
        if p.is_file() {
            configs.insert(rel.to_string(), serde_json::Value::String(read_text(&p)?));
        }
    }
    let unet_cfg_path = dir.join("unet/config.json");
    let layout = UnetLayout::from_config(
        &unet_cfg_path,
        &json_at(&unet_cfg_path, &read_text(&unet_cfg_path)?)?,
    )?;
    let vae_cfg_path = dir.join("vae/config.json");
    let vae_blocks = json_at(&vae_cfg_path, &read_text(&vae_cfg_path)?)?["block_out_channels"]
        .as_array()
        .map_or(4, Vec::len);
    let mut out_t: BTreeMap<String, Raw> = BTreeMap::new();

    // UNet
    let f = find_weight_file(&dir.join("unet"), "diffusion_pytorch_model")?;
    let bytes = read_file(&f)?;
    let st = parse(&f, &bytes)?;
    for (k, v) in st.tensors() {
        let o = unet_to_original(&k, &layout)
            .ok_or_else(|| model_err(&f, format!("UNet tensor `{k}` has no single-file name")))?;
        out_t.insert(format!("{UNET}{o}"), Raw::from_view(&v));
    }
    drop(st);
    drop(bytes);

    // VAE
    let f = find_weight_file(&dir.join("vae"), "diffusion_pytorch_model")?;
    let bytes = read_file(&f)?;
    let st = parse(&f, &bytes)?;
    for (k, v) in st.tensors() {
        let (o, proj) = vae_to_original(&k, vae_blocks)
            .ok_or_else(|| model_err(&f, format!("VAE tensor `{k}` has no single-file name")))?;
        let mut r = Raw::from_view(&v);
        if proj && r.shape.len() == 2 {
            let s = vec![r.shape[0], r.shape[1], 1, 1];
            r = r.reshaped(s);
        }
        out_t.insert(format!("{VAE}{o}"), r);
    }
    drop(st);
    drop(bytes);

    // text encoder 1: Hugging Face names under the prefix
    let f = find_weight_file(&dir.join("text_encoder"), "model")?;
    let bytes = read_file(&f)?;
    let st = parse(&f, &bytes)?;
    for (k, v) in st.tensors() {
        let k = if k.starts_with("text_model.") {
            k
        } else {
            format!("text_model.{k}")
        };
        out_t.insert(format!("{TE1}{k}"), Raw::from_view(&v));
    }
    drop(st);
    drop(bytes);

    // text encoder 2: OpenCLIP names
    let f = find_weight_file(&dir.join("text_encoder_2"), "model")?;
    let bytes = read_file(&f)?;
    let st = parse(&f, &bytes)?;
    let mut te2: BTreeMap<String, Raw> = BTreeMap::new();
    for (k, v) in st.tensors() {
        let k = k
            .strip_prefix("text_model.")
            .map_or(k.clone(), str::to_string);
        te2.insert(k, Raw::from_view(&v));
    }
    drop(st);
    drop(bytes);
    for (k, v) in &te2 {
        let o = match k.as_str() {
            "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
            "embeddings.position_embedding.weight" => "positional_embedding".to_string(),
            "embeddings.position_ids" => continue,
            "text_projection.weight" => {
                out_t.insert(format!("{TE2}text_projection"), v.transposed());
                continue;
            }
            _ => {
                if let Some(r) = k.strip_prefix("final_layer_norm.") {
                    format!("ln_final.{r}")
                } else if let Some(r) = k.strip_prefix("encoder.layers.") {
                    let (i, r) = r
                        .split_once('.')
                        .ok_or_else(|| model_err(&f, format!("unexpected tensor `{k}`")))?;
                    if let Some(pb) = r.strip_prefix("self_attn.q_proj.") {
                        let get = |w: &str| {
                            te2.get(&format!("encoder.layers.{i}.self_attn.{w}_proj.{pb}"))
                                .ok_or_else(|| {
                                    model_err(&f, format!("missing {w}_proj.{pb} of layer {i}"))
                                })
                        };
                        let fused = Raw::concat_rows(&[get("q")?, get("k")?, get("v")?]);
                        out_t.insert(
                            format!("{TE2}transformer.resblocks.{i}.attn.in_proj_{pb}"),
                            fused,
                        );
                        continue;
                    }
                    if r.starts_with("self_attn.k_proj.") || r.starts_with("self_attn.v_proj.") {
                        continue;
                    }
                    let m = rename(r, &TE2_LAYER, true)
                        .ok_or_else(|| model_err(&f, format!("unexpected tensor `{k}`")))?;
                    format!("transformer.resblocks.{i}.{m}")
                } else {
                    return Err(model_err(&f, format!("unexpected tensor `{k}`")));
                }
            }
        };
        out_t.insert(format!("{TE2}{o}"), v.clone());
    }

    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        CONFIGS_KEY.to_string(),
        serde_json::Value::Object(configs).to_string(),
    );
    let n = out_t.len();
    save(out, &out_t, Some(meta))?;
    Ok(n)
}

/// Unpacks an SDXL single-file checkpoint into a diffusers pipeline folder `dir` (configs from
/// the file's metadata, else the built-in SDXL-base ones; tokenizers built in). Tensors keep their
/// dtype. Errors name the file and what was found (see [`check_sdxl_single_file`]).
pub fn unpack_single_file(file: &Path, dir: &Path) -> Result<()> {
    let header = read_header(file)?;
    check_sdxl_single_file(file, &header)?;
    let stored: BTreeMap<String, String> = match header.metadata.get(CONFIGS_KEY) {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| model_err(file, format!("metadata `{CONFIGS_KEY}`: {e}")))?,
        None => BTreeMap::new(),
    };
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for (rel, text) in BUILTIN_FILES {
        files.insert(rel.to_string(), text.to_string());
    }
    for (rel, text) in stored {
        if CONFIG_FILES.contains(&rel.as_str()) {
            files.insert(rel, text);
        }
    }
    let tok = files
        .get("tokenizer/tokenizer.json")
        .cloned()
        .unwrap_or_default();
    files.insert("tokenizer_2/tokenizer.json".to_string(), tok);
    for (rel, text) in &files {
        write(&dir.join(rel), text.as_bytes())?;
    }
    let unet_cfg = dir.join("unet/config.json");
    let layout =
        UnetLayout::from_config(&unet_cfg, &json_at(&unet_cfg, &files["unet/config.json"])?)?;
    let vae_cfg = dir.join("vae/config.json");
    let vae_blocks = json_at(&vae_cfg, &files["vae/config.json"])?["block_out_channels"]
        .as_array()
        .map_or(4, Vec::len);

    let bytes = std::fs::read(file).map_err(|e| model_err(file, e.to_string()))?;
    let st = parse(file, &bytes)?;
    let mut unet = BTreeMap::new();
    let mut vae = BTreeMap::new();
    let mut te1 = BTreeMap::new();
    let mut te2_raw: BTreeMap<String, Raw> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (k, v) in st.tensors() {
        // buffers and training state some checkpoints carry: not model weights
        if k.ends_with("position_ids")
            || k.ends_with("logit_scale")
            || k.starts_with("denoiser.")
            || k.starts_with("model_ema.")
        {
            continue;
        }
        if let Some(r) = k.strip_prefix(UNET) {
            match unet_to_diffusers(r, &layout) {
                Some(d) => {
                    unet.insert(d, Raw::from_view(&v));
                }
                None => unknown.push(k.clone()),
            }
        } else if let Some(r) = k.strip_prefix(VAE) {
            match vae_to_diffusers(r, vae_blocks) {
                Some((d, proj)) => {
                    let mut t = Raw::from_view(&v);
                    if proj && t.shape.len() == 4 {
                        let s = vec![t.shape[0], t.shape[1]];
                        t = t.reshaped(s);
                    }
                    vae.insert(d, t);
                }
                None => unknown.push(k.clone()),
            }
        } else if let Some(r) = k.strip_prefix(TE1) {
            te1.insert(r.to_string(), Raw::from_view(&v));
        } else if let Some(r) = k.strip_prefix(TE2) {
            te2_raw.insert(r.to_string(), Raw::from_view(&v));
        } else {
            unknown.push(k.clone());
        }
    }
    drop(st);
    drop(bytes);
    let mut te2 = BTreeMap::new();
    for (k, v) in te2_raw {
        let d = match k.as_str() {
            "token_embedding.weight" => "text_model.embeddings.token_embedding.weight".to_string(),
            "positional_embedding" => "text_model.embeddings.position_embedding.weight".to_string(),
            "text_projection" => {
                te2.insert("text_projection.weight".to_string(), v.transposed());
                continue;
            }
            _ => {
                if let Some(r) = k.strip_prefix("ln_final.") {
                    format!("text_model.final_layer_norm.{r}")
                } else if let Some(r) = k.strip_prefix("transformer.resblocks.") {
                    let Some((i, r)) = r.split_once('.') else {
                        unknown.push(format!("{TE2}{k}"));
                        continue;
                    };
                    let p = format!("text_model.encoder.layers.{i}.self_attn");
                    if let Some(pb) = r.strip_prefix("attn.in_proj_") {
                        let d = v.shape[0] / 3;
                        for (n, w) in ["q", "k", "v"].iter().enumerate() {
                            te2.insert(format!("{p}.{w}_proj.{pb}"), v.rows(n * d, d));
                        }
                        continue;
                    }
                    match rename(r, &TE2_LAYER, false) {
                        Some(m) => format!("text_model.encoder.layers.{i}.{m}"),
                        None => {
                            unknown.push(format!("{TE2}{k}"));
                            continue;
                        }
                    }
                } else {
                    unknown.push(format!("{TE2}{k}"));
                    continue;
                }
            }
        };
        te2.insert(d, v);
    }
    if !unknown.is_empty() {
        return Err(model_err(
            file,
            format!(
                "{} tensors have no diffusers name (first: {})",
                unknown.len(),
                unknown
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    save(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        &unet,
        None,
    )?;
    save(
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
        &vae,
        None,
    )?;
    save(&dir.join("text_encoder/model.safetensors"), &te1, None)?;
    save(&dir.join("text_encoder_2/model.safetensors"), &te2, None)?;
    Ok(())
}

/// A folder to unpack `file` into, under the system temp folder, named after the file's path,
/// size and modification time (so a changed file gets a new folder). Returns the folder and
/// whether a complete unpacked copy is already there.
pub fn cache_dir_for(file: &Path) -> Result<(PathBuf, bool)> {
    let meta = std::fs::metadata(file).map_err(|e| model_err(file, e.to_string()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let abs = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{}|{}|{mtime}", abs.display(), meta.len()).bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let dir = std::env::temp_dir().join(format!("pcpp-single-file-{h:016x}"));
    let done = dir.join(".complete").is_file();
    Ok((dir, done))
}

/// `--model FILE`: unpacks an SDXL single-file checkpoint once into [`cache_dir_for`] and returns
/// the pipeline folder.
pub fn unpack_cached(file: &Path) -> Result<PathBuf> {
    let (dir, done) = cache_dir_for(file)?;
    if done {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    unpack_single_file(file, &tmp)?;
    write(&tmp.join(".complete"), b"")?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // another process finished first: use its copy
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join(".complete").is_file() {
            return Err(model_err(&dir, "cannot create the unpacked model folder"));
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests;
