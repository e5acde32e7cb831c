//! CLIP text encoders as transformers writes them (`CLIPTextModel` for SDXL's first encoder,
//! `CLIPTextModelWithProjection` for the second), read from `text_encoder{,_2}/`.
//!
//! Pre-LayerNorm transformer with a causal mask and no padding mask; the forward returns the
//! embeddings, the penultimate layer output (what SDXL conditions on), the final-LayerNorm'd last
//! hidden state, the pooled token (first EOS) and, with a projection, the projected text embeds.

use std::path::Path;

use serde::Deserialize;

use pcpp_kernels::{Activation, DType, Device, Tensor};

use crate::error::{Result, SdxlError};
use crate::lora::ComponentLora;
use crate::weights::{find_weight_file, read_json, Weights};

/// The fields of transformers' `CLIPTextConfig` (`config.json`) this engine reads; defaults are
/// transformers' own.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Width of the residual stream.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    /// Attention heads per layer.
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Number of encoder layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Number of learned positions (the longest accepted sequence).
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// MLP activation name (`quick_gelu`, `gelu`, ...).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// Output width of `text_projection` (with-projection models only).
    #[serde(default = "d_projection")]
    pub projection_dim: usize,
    /// Rows of the token embedding table.
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// EOS id; the legacy value 2 means "pool at argmax(ids)", as transformers does.
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
}

fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_heads() -> usize {
    8
}
fn d_layers() -> usize {
    12
}
fn d_positions() -> usize {
    77
}
fn d_eps() -> f64 {
    1e-5
}
fn d_act() -> String {
    "quick_gelu".to_string()
}
fn d_projection() -> usize {
    512
}
fn d_vocab() -> usize {
    49408
}
fn d_eos() -> i64 {
    2
}

/// Largest value any size key may take; beyond it a config is rejected before allocating.
const MAX_DIM: usize = 1 << 20;

impl ClipTextConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<ClipTextConfig> {
        let c: ClipTextConfig = read_json(path)?;
        c.validate(path)?;
        Ok(c)
    }

    /// Checks ranges; `path` is only used in error messages.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |m: String| Err(SdxlError::config(path, m));
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
            ("projection_dim", self.projection_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 || v > MAX_DIM {
                return err(format!("`{key}` = {v} is out of range (1..={MAX_DIM})"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return err(format!(
                "`hidden_size` = {} does not split into `num_attention_heads` = {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return err(format!(
                "`layer_norm_eps` = {} must be positive",
                self.layer_norm_eps
            ));
        }
        if Activation::from_config_name(&self.hidden_act).is_none() {
            return err(format!(
                "`hidden_act` = {:?} is not supported",
                self.hidden_act
            ));
        }
        Ok(())
    }

    /// The MLP activation.
    pub fn activation(&self) -> Activation {
        Activation::from_config_name(&self.hidden_act).unwrap_or(Activation::QuickGelu)
    }
}

/// Everything [`ClipTextModel::forward`] returns (batch `b`, sequence `s`, width `d`).
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// Token + position embeddings `[b, s, d]` (`hidden_states[0]`).
    pub embeddings: Tensor,
    /// Output of the second-to-last layer `[b, s, d]` (`hidden_states[-2]`, before the final
    /// LayerNorm): SDXL's `prompt_embeds` part.
    pub penultimate_hidden_state: Tensor,
    /// Output of the last layer after `final_layer_norm` `[b, s, d]`.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at the first EOS of each row `[b, d]`.
    pub pooled: Tensor,
    /// `text_projection(pooled)` `[b, projection_dim]` (with-projection models only).
    pub text_embeds: Option<Tensor>,
}

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn load(w: &Weights, prefix: &str, inp: usize, out: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            w: w.get(&format!("{prefix}.weight"), &[out, inp])?,
            b: if bias {
                Some(w.get(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.linear(&self.w, self.b.as_ref())?)
    }
}

struct LayerNorm {
    g: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(w: &Weights, prefix: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            g: w.get(&format!("{prefix}.weight"), &[d])?,
            b: w.get(&format!("{prefix}.bias"), &[d])?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.layer_norm(Some(&self.g), Some(&self.b), self.eps)?)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(w: &Weights, p: &str, c: &ClipTextConfig) -> Result<EncoderLayer> {
        let (d, m, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let a = format!("{p}.self_attn");
        Ok(EncoderLayer {
            ln1: LayerNorm::load(w, &format!("{p}.layer_norm1"), d, eps)?,
            q: Linear::load(w, &format!("{a}.q_proj"), d, d, true)?,
            k: Linear::load(w, &format!("{a}.k_proj"), d, d, true)?,
            v: Linear::load(w, &format!("{a}.v_proj"), d, d, true)?,
            out: Linear::load(w, &format!("{a}.out_proj"), d, d, true)?,
            ln2: LayerNorm::load(w, &format!("{p}.layer_norm2"), d, eps)?,
            fc1: Linear::load(w, &format!("{p}.mlp.fc1"), d, m, true)?,
            fc2: Linear::load(w, &format!("{p}.mlp.fc2"), m, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor, heads: usize, act: Activation) -> Result<Tensor> {
        let h = self.ln1.forward(x)?;
        let (q, k, v) = (
            self.q.forward(&h)?,
            self.k.forward(&h)?,
            self.v.forward(&h)?,
        );
        let a = self
            .out
            .forward(&Tensor::attention(&q, &k, &v, heads, true)?)?;
        let x = x.add(&a)?;
        let h = self.ln2.forward(&x)?;
        let h = self.fc2.forward(&self.fc1.forward(&h)?.act(act)?)?;
        Ok(x.add(&h)?)
    }
}

/// A CLIP text encoder (`CLIPTextModel` or `CLIPTextModelWithProjection`).
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Loads `dir/config.json` and `dir/model{,.fp16}.safetensors`, casting weights to `dtype`.
    ///
    /// Tensor names may carry transformers' `text_model.` prefix or not; a `text_projection.weight`
    /// makes it the with-projection model. `position_ids` buffers are ignored; any other tensor
    /// the model does not use is an error.
    pub fn load(dir: &Path, dtype: DType) -> Result<ClipTextModel> {
        Self::load_on(dir, dtype, Device::Cpu)
    }

    /// [`ClipTextModel::load`] with the weights loaded straight to `device`.
    pub fn load_on(dir: &Path, dtype: DType, device: Device) -> Result<ClipTextModel> {
        let none = ComponentLora::empty(crate::lora::LoraComponent::TextEncoder);
        Self::load_with_lora(dir, dtype, device, none)
    }

    /// [`ClipTextModel::load_on`] with LoRA adapters merged into the weights as they load (an
    /// error names any adapter that matches no module, or does not fit its module).
    pub fn load_with_lora(
        dir: &Path,
        dtype: DType,
        device: Device,
        lora: ComponentLora,
    ) -> Result<ClipTextModel> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::open(&find_weight_file(dir, "model")?, dtype)?
            .on_device(device)
            .with_lora(lora);
        Self::build(config, &weights)
    }

    /// Builds the model of `config` from an opened weight store (every tensor must be used, and
    /// every LoRA adapter of the store must find its module).
    pub fn build(config: ClipTextConfig, weights: &Weights) -> Result<ClipTextModel> {
        let w = weights;
        let root = if w.contains("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let d = config.hidden_size;
        let pos_ids = format!("{root}embeddings.position_ids");
        if w.contains(&pos_ids) {
            w.ignore(&pos_ids);
        }
        let model = ClipTextModel {
            token_embedding: w.get(
                &format!("{root}embeddings.token_embedding.weight"),
                &[config.vocab_size, d],
            )?,
            position_embedding: w.get(
                &format!("{root}embeddings.position_embedding.weight"),
                &[config.max_position_embeddings, d],
            )?,
            layers: (0..config.num_hidden_layers)
                .map(|i| EncoderLayer::load(w, &format!("{root}encoder.layers.{i}"), &config))
                .collect::<Result<_>>()?,
            final_layer_norm: LayerNorm::load(
                w,
                &format!("{root}final_layer_norm"),
                d,
                config.layer_norm_eps,
            )?,
            text_projection: if w.contains("text_projection.weight") {
                Some(Linear::load(
                    w,
                    "text_projection",
                    d,
                    config.projection_dim,
                    false,
                )?)
            } else {
                None
            },
            config,
        };
        w.check_all_used()?;
        Ok(model)
    }

    /// The model's config.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Whether the model has a `text_projection` (so [`ClipOutput::text_embeds`] is set).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Encodes token ids `[b, s]` (integral values stored as f32, `s ≤ max_position_embeddings`).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        let c = &self.config;
        let (b, s) = match ids.shape() {
            &[b, s] if b > 0 && s > 0 && s <= c.max_position_embeddings => (b, s),
            sh => {
                return Err(SdxlError::Input(format!(
                    "text encoder: input_ids must be [batch, seq] with 1 ≤ seq ≤ {}, got {sh:?}",
                    c.max_position_embeddings
                )))
            }
        };
        let id_vals = ids.to_vec_f32()?;
        let vocab = c.vocab_size as f32;
        if let Some(bad) = id_vals
            .iter()
            .find(|&&x| !(x >= 0.0 && x < vocab && x.fract() == 0.0))
        {
            return Err(SdxlError::Input(format!(
                "text encoder: token id {bad} is not an integer in 0..{}",
                c.vocab_size
            )));
        }

        let tok = Tensor::embedding(ids, &self.token_embedding)?;
        let pos = self.position_embedding.narrow(0, 0, s)?;
        let embeddings = tok.add(&pos)?;

        let act = c.activation();
        let n = self.layers.len();
        let mut x = embeddings.clone();
        let mut penultimate = embeddings.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, c.num_attention_heads, act)?;
            if i + 2 == n {
                penultimate = x.clone();
            }
        }
        let last = self.final_layer_norm.forward(&x)?;

        let d = c.hidden_size;
        let rows = (0..b)
            .map(|r| {
                let row = &id_vals[r * s..(r + 1) * s];
                let idx = pool_index(row, c.eos_token_id);
                last.narrow(0, r, 1)?.narrow(1, idx, 1)?.reshape(&[1, d])
            })
            .collect::<pcpp_kernels::Result<Vec<_>>>()?;
        let pooled = Tensor::cat(&rows.iter().collect::<Vec<_>>(), 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput {
            embeddings,
            penultimate_hidden_state: penultimate,
            last_hidden_state: last,
            pooled,
            text_embeds,
        })
    }
}

/// transformers' pooling position: with the legacy `eos_token_id == 2`, the first maximum of the
/// ids (the first EOS, which has the largest id); otherwise the first `eos_token_id` (0 if none).
fn pool_index(row: &[f32], eos: i64) -> usize {
    if eos == 2 {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        best
    } else {
        row.iter().position(|&v| v == eos as f32).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::pool_index;

    #[test]
    fn pools_at_first_maximum() {
        assert_eq!(pool_index(&[49406.0, 5.0, 49407.0, 49407.0], 2), 2);
        assert_eq!(pool_index(&[49406.0, 5.0, 49407.0, 0.0], 2), 2);
        assert_eq!(pool_index(&[1.0, 7.0, 7.0], 7), 1);
        assert_eq!(pool_index(&[1.0, 3.0], 7), 0);
    }
}
