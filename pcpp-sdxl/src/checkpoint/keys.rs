//! Tensor-name mapping between the single-file SDXL layout and diffusers' folders (the tables
//! and rules of [`super`]): the UNet's `input_blocks` / `middle_block` / `output_blocks` against
//! `down_blocks` / `mid_block` / `up_blocks`, the LDM VAE against diffusers' VAE, and the OpenCLIP
//! names of the second text encoder. Model-format plumbing; no PCPP section.

use std::path::Path;

use super::model_err;
use crate::error::Result;

/// The UNet layout facts the key mapping needs.
#[derive(Debug, Clone)]
pub(super) struct UnetLayout {
    pub(super) layers: usize,
    pub(super) up_attn: Vec<bool>,
}

impl UnetLayout {
    pub(super) fn from_config(path: &Path, cfg: &serde_json::Value) -> Result<UnetLayout> {
        let layers = cfg["layers_per_block"].as_u64().ok_or_else(|| {
            model_err(
                path,
                "`layers_per_block` must be one integer for single-file conversion",
            )
        })? as usize;
        let kinds = |key: &str| -> Result<Vec<bool>> {
            cfg[key]
                .as_array()
                .ok_or_else(|| model_err(path, format!("`{key}` missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| s.contains("CrossAttn"))
                        .ok_or_else(|| model_err(path, format!("`{key}` entry is not a string")))
                })
                .collect()
        };
        Ok(UnetLayout {
            layers,
            up_attn: kinds("up_block_types")?,
        })
    }
}

/// Splits `a.b.REST` after `n` dot-separated parts: `(parts, rest)`.
pub(super) fn split_parts(key: &str, n: usize) -> Option<(Vec<&str>, &str)> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = key;
    for _ in 0..n {
        let (p, r) = rest.split_once('.')?;
        parts.push(p);
        rest = r;
    }
    Some((parts, rest))
}

pub(super) const RESNET_UNET: [(&str, &str); 6] = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
];

pub(super) const UNET_TOP: [(&str, &str); 7] = [
    ("conv_in.", "input_blocks.0.0."),
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
];

pub(super) fn rename(rest: &str, table: &[(&str, &str)], forward: bool) -> Option<String> {
    table.iter().find_map(|&(d, o)| {
        let (from, to) = if forward { (d, o) } else { (o, d) };
        rest.strip_prefix(from).map(|r| format!("{to}{r}"))
    })
}

pub(super) fn num(s: &str) -> Option<usize> {
    s.parse().ok()
}

/// diffusers UNet key → original key (without `model.diffusion_model.`).
pub(super) fn unet_to_original(key: &str, l: &UnetLayout) -> Option<String> {
    if let Some(k) = rename(key, &UNET_TOP, true) {
        return Some(k);
    }
    let per = l.layers + 1;
    if let Some((p, rest)) = split_parts(key, 3) {
        if p[0] == "mid_block" {
            let j = num(p[2])?;
            return match p[1] {
                "resnets" => Some(format!(
                    "middle_block.{}.{}",
                    2 * j,
                    rename(rest, &RESNET_UNET, true)?
                )),
                "attentions" => Some(format!("middle_block.1.{rest}")),
                _ => None,
            };
        }
    }
    if let Some((p, rest)) = split_parts(key, 4) {
        let i = num(p[1])?;
        let j = num(p[3]).unwrap_or(0);
        match (p[0], p[2]) {
            ("down_blocks", "resnets") => {
                return Some(format!(
                    "input_blocks.{}.0.{}",
                    1 + i * per + j,
                    rename(rest, &RESNET_UNET, true)?
                ))
            }
            ("down_blocks", "attentions") => {
                return Some(format!("input_blocks.{}.1.{rest}", 1 + i * per + j))
            }
            ("down_blocks", "downsamplers") => {
                let r = rest.strip_prefix("conv.")?;
                return Some(format!("input_blocks.{}.0.op.{r}", (i + 1) * per));
            }
            ("up_blocks", "resnets") => {
                return Some(format!(
                    "output_blocks.{}.0.{}",
                    i * per + j,
                    rename(rest, &RESNET_UNET, true)?
                ))
            }
            ("up_blocks", "attentions") => {
                return Some(format!("output_blocks.{}.1.{rest}", i * per + j))
            }
            ("up_blocks", "upsamplers") => {
                let sub = if *l.up_attn.get(i)? { 2 } else { 1 };
                return Some(format!("output_blocks.{}.{sub}.{rest}", i * per + per - 1));
            }
            _ => {}
        }
    }
    None
}

/// Original UNet key (without prefix) → diffusers key.
pub(super) fn unet_to_diffusers(key: &str, l: &UnetLayout) -> Option<String> {
    if let Some(k) = rename(key, &UNET_TOP, false) {
        return Some(k);
    }
    let per = l.layers + 1;
    let (p, rest) = split_parts(key, 3)?;
    let n = num(p[1])?;
    let sub = num(p[2]);
    match p[0] {
        "input_blocks" if n > 0 => {
            if n % per == 0 {
                let r = rest.strip_prefix("op.")?;
                Some(format!(
                    "down_blocks.{}.downsamplers.0.conv.{r}",
                    n / per - 1
                ))
            } else {
                let (i, j) = ((n - 1) / per, (n - 1) % per);
                match sub? {
                    0 => Some(format!(
                        "down_blocks.{i}.resnets.{j}.{}",
                        rename(rest, &RESNET_UNET, false)?
                    )),
                    1 => Some(format!("down_blocks.{i}.attentions.{j}.{rest}")),
                    _ => None,
                }
            }
        }
        "middle_block" => match n {
            0 | 2 => Some(format!(
                "mid_block.resnets.{}.{}",
                n / 2,
                rename(&format!("{}.{rest}", p[2]), &RESNET_UNET, false)?
            )),
            1 => Some(format!("mid_block.attentions.0.{}.{rest}", p[2])),
            _ => None,
        },
        "output_blocks" => {
            let (i, j) = (n / per, n % per);
            let attn = *l.up_attn.get(i)?;
            match sub? {
                0 => Some(format!(
                    "up_blocks.{i}.resnets.{j}.{}",
                    rename(rest, &RESNET_UNET, false)?
                )),
                1 if attn => Some(format!("up_blocks.{i}.attentions.{j}.{rest}")),
                1 | 2 => Some(format!("up_blocks.{i}.upsamplers.0.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The single-file name (without `model.diffusion_model.`) of diffusers UNet tensor `key`, for a
/// UNet with `config` (`unet/config.json`); `None` if it has none.
pub fn unet_key_to_original(config: &serde_json::Value, key: &str) -> Option<String> {
    let l = UnetLayout::from_config(Path::new("unet/config.json"), config).ok()?;
    unet_to_original(key, &l)
}

/// The single-file name (without `model.diffusion_model.`) of diffusers UNet tensor `key`, for a
/// UNet with `layers_per_block` resnets per down block whose up blocks have cross-attention where
/// `up_attn` says so; `None` if it has none.
pub fn unet_key_to_original_for(
    layers_per_block: usize,
    up_attn: &[bool],
    key: &str,
) -> Option<String> {
    let l = UnetLayout {
        layers: layers_per_block,
        up_attn: up_attn.to_vec(),
    };
    unet_to_original(key, &l)
}

/// The diffusers name of single-file UNet tensor `key` (without `model.diffusion_model.`).
pub fn unet_key_to_diffusers(config: &serde_json::Value, key: &str) -> Option<String> {
    let l = UnetLayout::from_config(Path::new("unet/config.json"), config).ok()?;
    unet_to_diffusers(key, &l)
}

/// The single-file name (without `first_stage_model.`) of diffusers VAE tensor `key` for a VAE of
/// `n_blocks` resolution levels.
pub fn vae_key_to_original(n_blocks: usize, key: &str) -> Option<String> {
    vae_to_original(key, n_blocks).map(|(k, _)| k)
}

/// The diffusers name of single-file VAE tensor `key` (without `first_stage_model.`).
pub fn vae_key_to_diffusers(n_blocks: usize, key: &str) -> Option<String> {
    vae_to_diffusers(key, n_blocks).map(|(k, _)| k)
}

pub(super) const VAE_ATTN: [(&str, &str); 5] = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
];

pub(super) const VAE_RESNET: [(&str, &str); 5] = [
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("conv_shortcut.", "nin_shortcut."),
];

/// diffusers VAE key → original key (without `first_stage_model.`); `true` if it is an attention
/// projection weight (Linear `[c, c]` ↔ 1×1 conv `[c, c, 1, 1]`).
pub(super) fn vae_to_original(key: &str, n_blocks: usize) -> Option<(String, bool)> {
    for same in [
        "quant_conv.",
        "post_quant_conv.",
        "encoder.conv_in.",
        "encoder.conv_out.",
    ] {
        if key.starts_with(same) {
            return Some((key.to_string(), false));
        }
    }
    for same in ["decoder.conv_in.", "decoder.conv_out."] {
        if key.starts_with(same) {
            return Some((key.to_string(), false));
        }
    }
    let (side, rest) = key.split_once('.')?;
    if let Some(r) = rest.strip_prefix("conv_norm_out.") {
        return Some((format!("{side}.norm_out.{r}"), false));
    }
    if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        let mapped = rename(r, &VAE_ATTN, true)?;
        let proj = !r.starts_with("group_norm.") && r.ends_with("weight");
        return Some((format!("{side}.mid.attn_1.{mapped}"), proj));
    }
    if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
        let (j, r) = r.split_once('.')?;
        let j = num(j)?;
        return Some((
            format!(
                "{side}.mid.block_{}.{}",
                j + 1,
                rename(r, &VAE_RESNET, true)?
            ),
            false,
        ));
    }
    let (p, r) = split_parts(rest, 3)?;
    let i = num(p[1])?;
    let (blocks, lvl) = match (side, p[0]) {
        ("encoder", "down_blocks") => ("down", i),
        ("decoder", "up_blocks") => ("up", n_blocks.checked_sub(i + 1)?),
        _ => return None,
    };
    match p[2] {
        "resnets" => {
            let (j, r) = r.split_once('.')?;
            Some((
                format!(
                    "{side}.{blocks}.{lvl}.block.{j}.{}",
                    rename(r, &VAE_RESNET, true)?
                ),
                false,
            ))
        }
        "downsamplers" | "upsamplers" => {
            let r = r.strip_prefix("0.conv.")?;
            let what = if blocks == "down" {
                "downsample"
            } else {
                "upsample"
            };
            Some((format!("{side}.{blocks}.{lvl}.{what}.conv.{r}"), false))
        }
        _ => None,
    }
}

/// Original VAE key → (diffusers key, attention projection weight?).
pub(super) fn vae_to_diffusers(key: &str, n_blocks: usize) -> Option<(String, bool)> {
    for same in [
        "quant_conv.",
        "post_quant_conv.",
        "encoder.conv_in.",
        "encoder.conv_out.",
        "decoder.conv_in.",
        "decoder.conv_out.",
    ] {
        if key.starts_with(same) {
            return Some((key.to_string(), false));
        }
    }
    let (side, rest) = key.split_once('.')?;
    if let Some(r) = rest.strip_prefix("norm_out.") {
        return Some((format!("{side}.conv_norm_out.{r}"), false));
    }
    if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let mapped = rename(r, &VAE_ATTN, false)?;
        let proj = !r.starts_with("norm.") && r.ends_with("weight");
        return Some((format!("{side}.mid_block.attentions.0.{mapped}"), proj));
    }
    if let Some(r) = rest.strip_prefix("mid.block_") {
        let (j, r) = r.split_once('.')?;
        let j = num(j)?.checked_sub(1)?;
        return Some((
            format!(
                "{side}.mid_block.resnets.{j}.{}",
                rename(r, &VAE_RESNET, false)?
            ),
            false,
        ));
    }
    let (p, r) = split_parts(rest, 3)?;
    let lvl = num(p[1])?;
    let (blocks, i) = match (side, p[0]) {
        ("encoder", "down") => ("down_blocks", lvl),
        ("decoder", "up") => ("up_blocks", n_blocks.checked_sub(lvl + 1)?),
        _ => return None,
    };
    match p[2] {
        "block" => {
            let (j, r) = r.split_once('.')?;
            Some((
                format!(
                    "{side}.{blocks}.{i}.resnets.{j}.{}",
                    rename(r, &VAE_RESNET, false)?
                ),
                false,
            ))
        }
        "downsample" | "upsample" => {
            let r = r.strip_prefix("conv.")?;
            let what = if p[2] == "downsample" {
                "downsamplers"
            } else {
                "upsamplers"
            };
            Some((format!("{side}.{blocks}.{i}.{what}.0.conv.{r}"), false))
        }
        _ => None,
    }
}

pub(super) const TE2_LAYER: [(&str, &str); 6] = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.", "attn."),
];
