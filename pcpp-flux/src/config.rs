//! Configs of a diffusers Flux.1 folder: `transformer/config.json` (diffusers'
//! `FluxTransformer2DModel`), `text_encoder_2/config.json` (transformers' `T5EncoderModel`) and
//! `scheduler/scheduler_config.json` (diffusers' `FlowMatchEulerDiscreteScheduler`). Every value is
//! checked on load; errors name the file and the key.

use std::path::Path;

use pcpp_kernels::Activation;
use serde::Deserialize;

use crate::error::{FluxError, Result};

/// Largest accepted size of one dimension (guards against absurd configs).
const MAX_DIM: usize = 1 << 20;

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| FluxError::config(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| FluxError::config(path, format!("invalid config: {e}")))
}

fn check_dims(path: &Path, dims: &[(&str, usize)]) -> Result<()> {
    for &(key, v) in dims {
        if v == 0 || v > MAX_DIM {
            return Err(FluxError::config(
                path,
                format!("`{key}` = {v} is out of range (1..={MAX_DIM})"),
            ));
        }
    }
    Ok(())
}

/// `transformer/config.json` (diffusers `FluxTransformer2DModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct FluxTransformerConfig {
    /// Side of the square patches of `x_embedder` (1 for FLUX.1: the pipeline packs 2×2 itself).
    #[serde(default = "one")]
    pub patch_size: usize,
    /// Channels of a packed latent token (4 × the VAE's latent channels).
    pub in_channels: usize,
    /// Output channels (`null`: `in_channels`).
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    /// Width of the T5 hidden states.
    pub joint_attention_dim: usize,
    /// Width of the pooled CLIP output.
    pub pooled_projection_dim: usize,
    /// Whether the model embeds the guidance scale (FLUX.1-dev) or not (FLUX.1-schnell).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Split of a head's dimensions among the three RoPE axes (text/index, row, column).
    pub axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}

impl FluxTransformerConfig {
    /// Reads and checks `path`.
    pub fn from_file(path: &Path) -> Result<FluxTransformerConfig> {
        let c: FluxTransformerConfig = read_json(path)?;
        c.validate(path)?;
        Ok(c)
    }

    /// Checks ranges and consistency; `path` is only named in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_dims(
            path,
            &[
                ("patch_size", self.patch_size),
                ("in_channels", self.in_channels),
                ("out_channels", self.out_channels()),
                ("attention_head_dim", self.attention_head_dim),
                ("num_attention_heads", self.num_attention_heads),
                ("joint_attention_dim", self.joint_attention_dim),
                ("pooled_projection_dim", self.pooled_projection_dim),
            ],
        )?;
        if self.patch_size != 1 {
            return Err(FluxError::config(
                path,
                format!(
                    "`patch_size` = {} is not supported (FLUX.1 uses 1)",
                    self.patch_size
                ),
            ));
        }
        if self.num_layers > 1024 || self.num_single_layers > 1024 {
            return Err(FluxError::config(path, "too many blocks (more than 1024)"));
        }
        let sum: usize = self.axes_dims_rope.iter().sum();
        if self.axes_dims_rope.len() != 3
            || sum != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 != 0)
        {
            return Err(FluxError::config(
                path,
                format!(
                    "`axes_dims_rope` = {:?} must be three even sizes summing to `attention_head_dim` = {}",
                    self.axes_dims_rope, self.attention_head_dim
                ),
            ));
        }
        Ok(())
    }

    /// Output channels (`out_channels`, else `in_channels`).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Model width: heads × head size.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Number of parameters of the model this config describes (every tensor the loader takes).
    pub fn parameter_count(&self) -> u64 {
        let d = self.inner_dim() as u64;
        let dh = self.attention_head_dim as u64;
        let lin = |i: u64, o: u64| i * o + o;
        let mlp = 4 * d;
        let time = lin(256, d) + lin(d, d);
        let embed = lin(self.in_channels as u64, d)
            + lin(self.joint_attention_dim as u64, d)
            + time
            + if self.guidance_embeds { time } else { 0 }
            + lin(self.pooled_projection_dim as u64, d)
            + lin(d, d);
        let double = 2 * lin(d, 6 * d) + 8 * lin(d, d) + 4 * dh + 2 * (lin(d, mlp) + lin(mlp, d));
        let single = lin(d, 3 * d) + lin(d, mlp) + lin(d + mlp, d) + 3 * lin(d, d) + 2 * dh;
        let p = self.patch_size as u64;
        let out = lin(d, 2 * d) + lin(d, p * p * self.out_channels() as u64);
        embed + self.num_layers as u64 * double + self.num_single_layers as u64 * single + out
    }
}

/// `text_encoder_2/config.json` (transformers `T5EncoderModel`, T5 v1.1 layout).
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Size of one attention head.
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    #[serde(default = "t5_eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (T5 v1.1, FLUX), `gated-silu`, `relu` or `gelu`.
    #[serde(default = "t5_ff")]
    pub feed_forward_proj: String,
    /// The activation of the feed-forward (`gelu_new` for `gated-gelu`).
    #[serde(default)]
    pub dense_act_fn: Option<String>,
}

fn t5_eps() -> f64 {
    1e-6
}

fn t5_ff() -> String {
    "relu".into()
}

impl T5Config {
    /// Reads and checks `path`.
    pub fn from_file(path: &Path) -> Result<T5Config> {
        let c: T5Config = read_json(path)?;
        c.validate(path)?;
        Ok(c)
    }

    /// Checks ranges; `path` is only named in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_dims(
            path,
            &[
                ("vocab_size", self.vocab_size),
                ("d_model", self.d_model),
                ("d_kv", self.d_kv),
                ("d_ff", self.d_ff),
                ("num_layers", self.num_layers),
                ("num_heads", self.num_heads),
                (
                    "relative_attention_num_buckets",
                    self.relative_attention_num_buckets,
                ),
                (
                    "relative_attention_max_distance",
                    self.relative_attention_max_distance,
                ),
            ],
        )?;
        if self.relative_attention_num_buckets < 4 {
            return Err(FluxError::config(
                path,
                "`relative_attention_num_buckets` must be at least 4",
            ));
        }
        self.feed_forward()
            .map(|_| ())
            .map_err(|m| FluxError::config(path, m))
    }

    /// `(gated, activation)` of the feed-forward block, from `feed_forward_proj` and
    /// `dense_act_fn` as transformers reads them.
    pub fn feed_forward(&self) -> std::result::Result<(bool, Activation), String> {
        let (gated, act) = match self.feed_forward_proj.split_once('-') {
            Some(("gated", a)) => (true, a),
            None => (false, self.feed_forward_proj.as_str()),
            Some(_) => {
                return Err(format!(
                    "`feed_forward_proj` = `{}` is not `gated-ACT` or `ACT`",
                    self.feed_forward_proj
                ))
            }
        };
        // transformers maps `gated-gelu` to `gelu_new` (tanh approximation)
        let act = match (act, self.dense_act_fn.as_deref()) {
            (_, Some(explicit)) => explicit,
            ("gelu", None) if gated => "gelu_new",
            (a, None) => a,
        };
        let a = Activation::from_config_name(act)
            .ok_or_else(|| format!("activation `{act}` of the T5 feed-forward is not supported"))?;
        Ok((gated, a))
    }
}

/// `scheduler/scheduler_config.json` (diffusers `FlowMatchEulerDiscreteScheduler`).
#[derive(Debug, Clone, Deserialize)]
pub struct FlowMatchConfig {
    #[serde(default = "d_train")]
    pub num_train_timesteps: usize,
    /// Fixed shift, used without dynamic shifting.
    #[serde(default = "d_shift")]
    pub shift: f64,
    /// Shift by `mu`, computed from the image's token count (FLUX.1-dev).
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "d_base_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "d_max_len")]
    pub max_image_seq_len: usize,
    #[serde(default = "d_base_shift")]
    pub base_shift: f64,
    #[serde(default = "d_max_shift")]
    pub max_shift: f64,
    /// `exponential` (default) or `linear`.
    #[serde(default = "d_shift_type")]
    pub time_shift_type: String,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
}

fn d_train() -> usize {
    1000
}
fn d_shift() -> f64 {
    1.0
}
fn d_base_len() -> usize {
    256
}
fn d_max_len() -> usize {
    4096
}
fn d_base_shift() -> f64 {
    0.5
}
fn d_max_shift() -> f64 {
    1.15
}
fn d_shift_type() -> String {
    "exponential".into()
}

impl FlowMatchConfig {
    /// Reads and checks `path`.
    pub fn from_file(path: &Path) -> Result<FlowMatchConfig> {
        let c: FlowMatchConfig = read_json(path)?;
        c.validate(path)?;
        Ok(c)
    }

    /// Checks the options this implementation follows; others are errors naming the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |m: String| Err(FluxError::config(path, m));
        for (key, on) in [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("invert_sigmas", self.invert_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
            ("shift_terminal", self.shift_terminal.is_some()),
        ] {
            if on {
                return err(format!("`{key}` is not supported"));
            }
        }
        if !matches!(self.time_shift_type.as_str(), "exponential" | "linear") {
            return err(format!(
                "`time_shift_type` = `{}` is not `exponential` or `linear`",
                self.time_shift_type
            ));
        }
        if self.num_train_timesteps == 0 || !(self.shift.is_finite() && self.shift > 0.0) {
            return err("`num_train_timesteps` and `shift` must be positive".into());
        }
        if self.use_dynamic_shifting && self.max_image_seq_len == self.base_image_seq_len {
            return err("`max_image_seq_len` must differ from `base_image_seq_len`".into());
        }
        Ok(())
    }
}

/// `model_index.json`: which pipeline a folder holds.
#[derive(Debug, Clone, Deserialize)]
pub struct PipelineKind {
    /// `FluxPipeline`, `StableDiffusionXLPipeline`, ...
    #[serde(rename = "_class_name")]
    pub class_name: String,
}

impl PipelineKind {
    /// Reads `dir/model_index.json`.
    pub fn of_folder(dir: &Path) -> Result<PipelineKind> {
        read_json(&dir.join("model_index.json"))
    }

    /// Whether the folder is a Flux.1 pipeline.
    pub fn is_flux(&self) -> bool {
        self.class_name == "FluxPipeline"
    }
}
