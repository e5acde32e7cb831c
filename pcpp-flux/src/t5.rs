//! The T5 encoder (transformers' `T5EncoderModel`, T5 v1.1 as FLUX.1's `text_encoder_2`):
//! token embedding, blocks of RMS-normed self-attention with a shared relative position bias
//! (bucketed, bidirectional, computed once from block 0's table) and an RMS-normed feed-forward
//! (gated GELU for v1.1), then a final RMS norm. No biases, no attention scaling, no attention
//! mask (FluxPipeline does not pass one).

use std::path::Path;

use pcpp_kernels::{Activation, DType, Device, Tensor};
use pcpp_sdxl::weights::{find_weight_file, Weights};

use crate::config::T5Config;
use crate::error::{FluxError, Result};
use crate::nn::{Linear, RmsNorm};

struct Block {
    ln_attn: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln_ff: RmsNorm,
    /// `wi_0` (gated) or `wi`.
    wi0: Linear,
    /// `wi_1` (gated only).
    wi1: Option<Linear>,
    wo: Linear,
}

/// The T5 encoder stack.
pub struct T5Encoder {
    config: T5Config,
    embed: Tensor,
    /// Block 0's `relative_attention_bias` table `[buckets, heads]`.
    rel_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    act: Activation,
}

impl T5Encoder {
    /// Loads `dir` (`config.json` and `model.safetensors`, its `.fp16` variant or shards).
    pub fn load_on(dir: &Path, dtype: DType, device: Device) -> Result<T5Encoder> {
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let w = Weights::open(&find_weight_file(dir, "model")?, dtype)?.on_device(device);
        let m = T5Encoder::build(config, &w)?;
        w.check_all_used()?;
        Ok(m)
    }

    /// Builds the encoder from `w` (names as transformers writes them).
    pub fn build(config: T5Config, w: &Weights) -> Result<T5Encoder> {
        let c = &config;
        let (d, inner) = (c.d_model, c.num_heads * c.d_kv);
        let (gated, act) = c
            .feed_forward()
            .map_err(|m| FluxError::config(w.path(), m))?;
        // the token table is tied: `shared.weight`, `encoder.embed_tokens.weight` or both
        let embed_name = ["shared.weight", "encoder.embed_tokens.weight"]
            .into_iter()
            .find(|n| w.contains(n))
            .unwrap_or("shared.weight");
        let embed = w.get(embed_name, &[c.vocab_size, d])?;
        // a second copy of the tied table is not loaded
        for n in ["shared.weight", "encoder.embed_tokens.weight"] {
            if n != embed_name {
                w.ignore(n);
            }
        }
        let rel_bias = w.get(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &[c.relative_attention_num_buckets, c.num_heads],
        )?;
        let eps = c.layer_norm_epsilon;
        let blocks = (0..c.num_layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                let a = format!("{p}.0.SelfAttention");
                let f = format!("{p}.1.DenseReluDense");
                Ok(Block {
                    ln_attn: RmsNorm::load(w, &format!("{p}.0.layer_norm"), d, eps)?,
                    q: Linear::load(w, &format!("{a}.q"), d, inner, false)?,
                    k: Linear::load(w, &format!("{a}.k"), d, inner, false)?,
                    v: Linear::load(w, &format!("{a}.v"), d, inner, false)?,
                    o: Linear::load(w, &format!("{a}.o"), inner, d, false)?,
                    ln_ff: RmsNorm::load(w, &format!("{p}.1.layer_norm"), d, eps)?,
                    wi0: Linear::load(
                        w,
                        &format!("{f}.{}", if gated { "wi_0" } else { "wi" }),
                        d,
                        c.d_ff,
                        false,
                    )?,
                    wi1: if gated {
                        Some(Linear::load(w, &format!("{f}.wi_1"), d, c.d_ff, false)?)
                    } else {
                        None
                    },
                    wo: Linear::load(w, &format!("{f}.wo"), c.d_ff, d, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = RmsNorm::load(w, "encoder.final_layer_norm", d, eps)?;
        Ok(T5Encoder {
            config,
            embed,
            rel_bias,
            blocks,
            final_norm,
            act,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// Hidden states `[b, s, d_model]` of token ids `[b, s]` (integral values as f32).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, s) = match ids.shape() {
            &[b, s] if b > 0 && s > 0 => (b, s),
            sh => {
                return Err(FluxError::Input(format!(
                    "T5 encoder: input_ids must be [batch, seq], got {sh:?}"
                )))
            }
        };
        let ids = ids.to_device(Device::Cpu)?;
        if let Some(bad) = ids
            .to_vec_f32()?
            .into_iter()
            .find(|&x| !(x >= 0.0 && (x as usize) < c.vocab_size && x.fract() == 0.0))
        {
            return Err(FluxError::Input(format!(
                "T5 encoder: token id {bad} is not an integer in 0..{}",
                c.vocab_size
            )));
        }
        let bias = self.position_bias(s)?;
        // the ids stay on the host: the embedding gathers rows of the device table by them
        let mut x = Tensor::embedding(&ids, &self.embed)?;
        for blk in &self.blocks {
            let h = blk.ln_attn.forward(&x)?;
            let (q, k, v) = (blk.q.forward(&h)?, blk.k.forward(&h)?, blk.v.forward(&h)?);
            let a = self.attention(&q, &k, &v, &bias, b, s)?;
            x = x.add(&blk.o.forward(&a)?)?;
            let h = blk.ln_ff.forward(&x)?;
            let mut f = blk.wi0.forward_act(&h, self.act)?;
            if let Some(wi1) = &blk.wi1 {
                f = f.mul(&wi1.forward(&h)?)?;
            }
            x = x.add(&blk.wo.forward(&f)?)?;
        }
        self.final_norm.forward(&x)
    }

    /// `softmax(q·kᵀ + bias)·v` per head (T5 does not scale the scores).
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        b: usize,
        s: usize,
    ) -> Result<Tensor> {
        let (h, dk) = (self.config.num_heads, self.config.d_kv);
        let heads = |t: &Tensor, i: usize, perm: &[usize]| -> Result<Tensor> {
            Ok(t.narrow(0, i, 1)?.reshape(&[s, h, dk])?.permute(perm)?)
        };
        let outs = (0..b)
            .map(|i| {
                let qh = heads(q, i, &[1, 0, 2])?; // [h, s, dk]
                let kt = heads(k, i, &[1, 2, 0])?; // [h, dk, s]
                let vh = heads(v, i, &[1, 0, 2])?;
                let p = qh.matmul(&kt)?.add(bias)?.softmax()?;
                Ok(p.matmul(&vh)?
                    .permute(&[1, 0, 2])?
                    .reshape(&[1, s, h * dk])?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&outs.iter().collect::<Vec<_>>(), 0)?)
    }

    /// The relative position bias `[heads, s, s]` from block 0's table.
    fn position_bias(&self, s: usize) -> Result<Tensor> {
        let c = &self.config;
        let table = self.rel_bias.to_device(Device::Cpu)?.to_vec_f32()?;
        let h = c.num_heads;
        let mut out = vec![0.0f32; h * s * s];
        for qi in 0..s {
            for ki in 0..s {
                let bucket = relative_bucket(
                    ki as i64 - qi as i64,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                );
                for hi in 0..h {
                    out[(hi * s + qi) * s + ki] = table[bucket * h + hi];
                }
            }
        }
        Ok(Tensor::from_f32(&[h, s, s], out, self.rel_bias.dtype())?
            .to_device(self.rel_bias.device())?)
    }
}

/// transformers' `T5Attention._relative_position_bucket` for a bidirectional encoder: half the
/// buckets for each direction, exact buckets for distances below a quarter of the buckets and
/// logarithmic ones up to `max_distance` (the f32 arithmetic of the original, so that the bucket
/// boundaries agree).
pub fn relative_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let nb = (num_buckets / 2) as i64;
    let mut bucket = if rel > 0 { nb } else { 0 };
    let n = rel.abs();
    let max_exact = nb / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln();
        let scale = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (ratio / scale * (nb - max_exact) as f32) as i64;
        bucket += large.min(nb - 1);
    }
    bucket as usize
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn buckets_match_transformers() {
        // transformers' _relative_position_bucket(bidirectional=True, num_buckets=32,
        // max_distance=128) for these relative positions
        let rel = [
            -200, -128, -64, -20, -9, -8, -7, -1, 0, 1, 7, 8, 9, 20, 64, 128, 200,
        ];
        let want = [
            15, 15, 14, 10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 30, 31, 31,
        ];
        for (r, w) in rel.iter().zip(want) {
            assert_eq!(relative_bucket(*r, 32, 128), w, "relative position {r}");
        }
    }
}
