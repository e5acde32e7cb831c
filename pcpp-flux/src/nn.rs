//! Small building blocks shared by the T5 encoder and the Flux transformer: PyTorch `Linear` and
//! `RMSNorm` over pcpp-kernels ops, loaded by their diffusers / transformers tensor names.

use pcpp_kernels::{Activation, Tensor};
use pcpp_sdxl::weights::Weights;

use crate::error::Result;

/// `y = x·Wᵀ + b` (PyTorch `nn.Linear`).
pub struct Linear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
}

impl Linear {
    /// `{prefix}.weight` `[out, inp]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn load(w: &Weights, prefix: &str, inp: usize, out: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            w: w.get(&format!("{prefix}.weight"), &[out, inp])?,
            b: if bias {
                Some(w.get(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
        })
    }

    /// Applies the layer to the last axis of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.linear(&self.w, self.b.as_ref())?)
    }

    /// `acc + forward(x)`, fused where the kernels can (`Tensor::linear_add`).
    pub fn forward_add(&self, x: &Tensor, acc: &Tensor) -> Result<Tensor> {
        Ok(x.linear_add(&self.w, self.b.as_ref(), acc)?)
    }

    /// The layer restricted to input features `start..start + len` (`w[:, start..]`), without
    /// the bias: `forward(cat[a, b])` = `split(0, la)(a)` + `split(la, lb)(b)` + bias.
    pub fn input_slice(&self, start: usize, len: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            w: self.w.narrow(1, start, len)?,
            b: if bias { self.b.clone() } else { None },
        })
    }

    /// `act(forward(x))`, fused where the kernels can (`Tensor::linear_act`).
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        Ok(x.linear_act(&self.w, self.b.as_ref(), act)?)
    }
}

/// RMS normalisation with a learned scale (PyTorch `nn.RMSNorm`, T5's `T5LayerNorm`).
pub struct RmsNorm {
    g: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `{prefix}.weight` `[d]`.
    pub fn load(w: &Weights, prefix: &str, d: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            g: w.get(&format!("{prefix}.weight"), &[d])?,
            eps,
        })
    }

    /// Normalises the last axis of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.rms_norm(Some(&self.g), self.eps)?)
    }
}
