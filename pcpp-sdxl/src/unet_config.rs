//! `UNet2DConditionModel` configuration as diffusers writes it (`unet/config.json`), resolved into
//! per-block values the way diffusers resolves them (ints broadcast to lists, the historical
//! `attention_head_dim` = head count convention, reversed lists for the up path).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Result, SdxlError};
use crate::weights::read_json;

/// The raw JSON config (fields this engine reads; others are ignored unless they change the model).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfigJson {
    /// The native latent size (diffusers' default image size is this times the VAE's factor).
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default = "d_in")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: Value,
    #[serde(default = "d_one")]
    pub transformer_layers_per_block: Value,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Value>,
    #[serde(default = "d_head")]
    pub attention_head_dim: Value,
    #[serde(default)]
    pub num_attention_heads: Option<Value>,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: Value,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f32,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_one_f")]
    pub downsample_padding: Value,
    #[serde(default = "d_conv_k")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_conv_k")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub only_cross_attention: Option<Value>,
    #[serde(default)]
    pub dual_cross_attention: Option<bool>,
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default)]
    pub mid_block_scale_factor: Option<f64>,
    #[serde(default)]
    pub resnet_out_scale_factor: Option<f64>,
    #[serde(default)]
    pub center_input_sample: Option<bool>,
    #[serde(default)]
    pub attention_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub class_embeddings_concat: Option<bool>,
    #[serde(default)]
    pub resnet_skip_time_act: Option<bool>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
}

fn d_in() -> usize {
    4
}
fn d_layers() -> Value {
    Value::from(2)
}
fn d_one() -> Value {
    Value::from(1)
}
fn d_one_f() -> Value {
    Value::from(1)
}
fn d_head() -> Value {
    Value::from(8)
}
fn d_cross() -> Value {
    Value::from(1280)
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}
fn d_conv_k() -> usize {
    3
}

/// The kind of a down or up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// ResNets only (`DownBlock2D` / `UpBlock2D`).
    Plain,
    /// ResNets each followed by a `Transformer2DModel` (`CrossAttn*Block2D`).
    CrossAttn,
}

/// One resolved down or up block.
#[derive(Debug, Clone)]
pub struct BlockSpec {
    pub kind: BlockKind,
    pub in_channels: usize,
    pub out_channels: usize,
    /// For up blocks: the previous block's output channels.
    pub prev_out_channels: usize,
    pub layers: usize,
    pub transformer_layers: Vec<usize>,
    pub heads: usize,
    pub cross_attention_dim: usize,
    /// Down blocks: add a stride-2 conv at the end; up blocks: add an up-sampler.
    pub resample: bool,
}

/// Added conditioning of SDXL (`addition_embed_type = "text_time"`).
#[derive(Debug, Clone, Copy)]
pub struct TextTime {
    pub time_embed_dim: usize,
    pub projection_input_dim: usize,
}

/// The resolved configuration of a UNet.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    /// The native latent size (`sample_size`, 128 when the config has none).
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down: Vec<BlockSpec>,
    pub up: Vec<BlockSpec>,
    /// Mid block: transformer depth, heads, cross-attention dim; `None` for no mid block.
    pub mid: Option<(usize, usize, usize)>,
    pub use_linear_projection: bool,
    pub groups: usize,
    pub eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub time_embed_dim: usize,
    pub text_time: Option<TextTime>,
    pub downsample_padding: usize,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
}

fn per_block(v: &Value, n: usize, key: &str, path: &Path) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) if a.len() == n => Ok(a.clone()),
        Value::Array(a) => Err(SdxlError::config(
            path,
            format!(
                "`{key}` has {} entries, expected one per block ({n})",
                a.len()
            ),
        )),
        Value::Null => Err(SdxlError::config(path, format!("`{key}` is null"))),
        other => Ok(vec![other.clone(); n]),
    }
}

fn as_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.as_u64().map(|x| x as usize).ok_or_else(|| {
        SdxlError::config(
            path,
            format!("`{key}` must be a non-negative integer, got {v}"),
        )
    })
}

/// Largest value any size key may take; beyond it a config is rejected before allocating.
const MAX_DIM: usize = 1 << 16;

impl UNetConfig {
    /// Reads and resolves `config.json`.
    pub fn from_file(path: &Path) -> Result<UNetConfig> {
        let raw: UNetConfigJson = read_json(path)?;
        UNetConfig::resolve(&raw, path)
    }

    /// Resolves a parsed config; `path` is only used in error messages.
    pub fn resolve(c: &UNetConfigJson, path: &Path) -> Result<UNetConfig> {
        let err = |m: String| SdxlError::config(path, m);
        let n = c.down_block_types.len();
        if n == 0 || c.block_out_channels.len() != n || c.up_block_types.len() != n {
            return Err(err(format!(
                "`down_block_types` ({n}), `up_block_types` ({}) and `block_out_channels` ({}) must have the same non-zero length",
                c.up_block_types.len(),
                c.block_out_channels.len()
            )));
        }
        let unsupported = |key: &str, v: &dyn std::fmt::Debug| {
            err(format!("`{key}` = {v:?} is not supported by this engine"))
        };
        if let Some(t) = &c.class_embed_type {
            return Err(unsupported("class_embed_type", t));
        }
        if let Some(t) = &c.encoder_hid_dim_type {
            return Err(unsupported("encoder_hid_dim_type", t));
        }
        if let Some(t) = c
            .time_embedding_type
            .as_deref()
            .filter(|t| *t != "positional")
        {
            return Err(unsupported("time_embedding_type", &t));
        }
        if let Some(t) = c
            .resnet_time_scale_shift
            .as_deref()
            .filter(|t| *t != "default")
        {
            return Err(unsupported("resnet_time_scale_shift", &t));
        }
        if c.dual_cross_attention == Some(true) {
            return Err(unsupported("dual_cross_attention", &true));
        }
        if c.upcast_attention == Some(true) {
            // Upcasting changes nothing for f32 compute; accepted.
        }
        if let Some(v) = c.only_cross_attention.as_ref().filter(|v| {
            v.as_bool() == Some(true)
                || v.as_array()
                    .is_some_and(|a| a.iter().any(|x| x.as_bool() == Some(true)))
        }) {
            return Err(unsupported("only_cross_attention", v));
        }
        if let Some(t) = c.attention_type.as_deref().filter(|t| *t != "default") {
            return Err(unsupported("attention_type", &t));
        }
        for (k, v) in [
            ("mid_block_scale_factor", c.mid_block_scale_factor),
            ("resnet_out_scale_factor", c.resnet_out_scale_factor),
        ] {
            if let Some(v) = v.filter(|v| *v != 1.0) {
                return Err(unsupported(k, &v));
            }
        }
        if c.center_input_sample == Some(true) {
            return Err(unsupported("center_input_sample", &true));
        }
        if c.time_cond_proj_dim.is_some() {
            return Err(unsupported("time_cond_proj_dim", &c.time_cond_proj_dim));
        }
        if c.act_fn != "silu" {
            return Err(unsupported("act_fn", &c.act_fn));
        }
        if let Some(a) = &c.time_embedding_act_fn {
            return Err(unsupported("time_embedding_act_fn", a));
        }
        if let Some(a) = &c.timestep_post_act {
            return Err(unsupported("timestep_post_act", a));
        }
        if c.cross_attention_norm.is_some() {
            return Err(unsupported("cross_attention_norm", &c.cross_attention_norm));
        }
        for &ch in &c.block_out_channels {
            if ch == 0 || ch > MAX_DIM {
                return Err(err(format!(
                    "`block_out_channels` entry {ch} is out of range (1..={MAX_DIM})"
                )));
            }
            if ch % c.norm_num_groups.max(1) != 0 || c.norm_num_groups == 0 {
                return Err(err(format!("`block_out_channels` entry {ch} does not split into `norm_num_groups` = {} groups", c.norm_num_groups)));
            }
        }
        for (k, v) in [
            ("in_channels", c.in_channels),
            ("out_channels", c.out_channels),
        ] {
            if v == 0 || v > MAX_DIM {
                return Err(err(format!("`{k}` = {v} is out of range")));
            }
        }
        for (k, v) in [
            ("conv_in_kernel", c.conv_in_kernel),
            ("conv_out_kernel", c.conv_out_kernel),
        ] {
            if v % 2 == 0 || v > 7 {
                return Err(err(format!("`{k}` = {v} must be odd and at most 7")));
            }
        }

        let layers: Vec<usize> = per_block(&c.layers_per_block, n, "layers_per_block", path)?
            .iter()
            .map(|v| as_usize(v, "layers_per_block", path))
            .collect::<Result<_>>()?;
        let heads_src = c
            .num_attention_heads
            .as_ref()
            .filter(|v| !v.is_null())
            .unwrap_or(&c.attention_head_dim);
        let heads: Vec<usize> = per_block(heads_src, n, "attention_head_dim", path)?
            .iter()
            .map(|v| as_usize(v, "attention_head_dim", path))
            .collect::<Result<_>>()?;
        let cross: Vec<usize> = per_block(&c.cross_attention_dim, n, "cross_attention_dim", path)?
            .iter()
            .map(|v| as_usize(v, "cross_attention_dim", path))
            .collect::<Result<_>>()?;
        let tlayers_of = |v: &Value, key: &str| -> Result<Vec<Vec<usize>>> {
            per_block(v, n, key, path)?
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::Array(a) => a.iter().map(|y| as_usize(y, key, path)).collect(),
                    other => {
                        let d = as_usize(other, key, path)?;
                        Ok(vec![d; layers[i]])
                    }
                })
                .collect()
        };
        let tl = tlayers_of(
            &c.transformer_layers_per_block,
            "transformer_layers_per_block",
        )?;
        for (i, l) in layers.iter().enumerate() {
            if *l == 0 || *l > 64 {
                return Err(err(format!(
                    "`layers_per_block` entry {l} is out of range (1..=64)"
                )));
            }
            if heads[i] == 0 || c.block_out_channels[i] % heads[i] != 0 {
                return Err(err(format!(
                    "block {i}: {} channels do not split into {} attention heads (`attention_head_dim`/`num_attention_heads`)",
                    c.block_out_channels[i], heads[i]
                )));
            }
            if cross[i] == 0 || cross[i] > MAX_DIM {
                return Err(err(format!(
                    "`cross_attention_dim` entry {} is out of range",
                    cross[i]
                )));
            }
        }
        let down_padding = as_usize(&c.downsample_padding, "downsample_padding", path)?;

        let kind_of = |t: &str, up: bool| -> Result<BlockKind> {
            match (t, up) {
                ("DownBlock2D", false) | ("UpBlock2D", true) => Ok(BlockKind::Plain),
                ("CrossAttnDownBlock2D", false) | ("CrossAttnUpBlock2D", true) => {
                    Ok(BlockKind::CrossAttn)
                }
                _ => Err(err(format!(
                    "block type `{t}` is not supported in `{}`",
                    if up {
                        "up_block_types"
                    } else {
                        "down_block_types"
                    }
                ))),
            }
        };
        let mut down = Vec::new();
        let mut out_ch = c.block_out_channels[0];
        for i in 0..n {
            let in_ch = out_ch;
            out_ch = c.block_out_channels[i];
            let kind = kind_of(&c.down_block_types[i], false)?;
            if kind == BlockKind::CrossAttn && tl[i].len() != layers[i] {
                return Err(err(format!(
                    "`transformer_layers_per_block` for down block {i} has {} entries, expected {}",
                    tl[i].len(),
                    layers[i]
                )));
            }
            down.push(BlockSpec {
                kind,
                in_channels: in_ch,
                out_channels: out_ch,
                prev_out_channels: in_ch,
                layers: layers[i],
                transformer_layers: tl[i].clone(),
                heads: heads[i],
                cross_attention_dim: cross[i],
                resample: i + 1 < n,
            });
        }
        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rch, rlayers, rheads, rcross) = (
            rev(&c.block_out_channels),
            rev(&layers),
            rev(&heads),
            rev(&cross),
        );
        let rtl: Vec<Vec<usize>> = match &c.reverse_transformer_layers_per_block {
            Some(v) if !v.is_null() => tlayers_of(v, "reverse_transformer_layers_per_block")?,
            _ => tl.iter().rev().cloned().collect(),
        };
        let mut up = Vec::new();
        let mut out_ch = rch[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rch[i];
            let in_ch = rch[(i + 1).min(n - 1)];
            let kind = kind_of(&c.up_block_types[i], true)?;
            let nl = rlayers[i] + 1;
            let t = if rtl[i].len() == nl {
                rtl[i].clone()
            } else {
                vec![*rtl[i].first().unwrap_or(&1); nl]
            };
            up.push(BlockSpec {
                kind,
                in_channels: in_ch,
                out_channels: out_ch,
                prev_out_channels: prev,
                layers: nl,
                transformer_layers: t,
                heads: rheads[i],
                cross_attention_dim: rcross[i],
                resample: i + 1 < n,
            });
        }
        let mid = match c.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {
                Some((*tl[n - 1].last().unwrap_or(&1), heads[n - 1], cross[n - 1]))
            }
            Some(other) => return Err(err(format!("`mid_block_type` `{other}` is not supported"))),
        };
        let time_embed_dim = c.time_embedding_dim.unwrap_or(c.block_out_channels[0] * 4);
        let text_time = match c.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => Some(TextTime {
                time_embed_dim: c
                    .addition_time_embed_dim
                    .ok_or_else(|| err("`addition_embed_type` is text_time but `addition_time_embed_dim` is missing".into()))?,
                projection_input_dim: c
                    .projection_class_embeddings_input_dim
                    .ok_or_else(|| err("`addition_embed_type` is text_time but `projection_class_embeddings_input_dim` is missing".into()))?,
            }),
            Some(other) => return Err(err(format!("`addition_embed_type` `{other}` is not supported"))),
        };
        Ok(UNetConfig {
            sample_size: c.sample_size.unwrap_or(128),
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            block_out_channels: c.block_out_channels.clone(),
            down,
            up,
            mid,
            use_linear_projection: c.use_linear_projection,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
            time_embed_dim,
            text_time,
            downsample_padding: down_padding,
            conv_in_kernel: c.conv_in_kernel,
            conv_out_kernel: c.conv_out_kernel,
        })
    }

    /// Number of spatial halvings (down-samplers) in the UNet: the latent height and width must be
    /// multiples of `2^levels`.
    pub fn downsample_factor(&self) -> usize {
        1 << self.down.iter().filter(|b| b.resample).count()
    }

    /// Width of the text conditioning the cross-attentions read (the widest of the blocks; 1 for
    /// a UNet without cross-attention).
    pub fn text_dim(&self) -> usize {
        self.down
            .iter()
            .map(|b| b.cross_attention_dim)
            .chain(self.mid.map(|m| m.2))
            .max()
            .unwrap_or(1)
    }
}
