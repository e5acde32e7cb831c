//! Flux's rotary position embedding (diffusers' `FluxPosEmbed(theta=10000, axes_dim)` with
//! `get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True)` and `apply_rotary_emb`).
//!
//! Every token has three coordinates: text tokens `(0, 0, 0)`, the image token of packed row `r`
//! and column `c` `(0, r, c)` (FluxPipeline's `txt_ids` / `_prepare_latent_image_ids`). Head
//! dimensions are split among the axes (`axes_dims_rope`, e.g. 16 + 56 + 56); pair `(2i, 2i+1)`
//! of an axis of size `n` is rotated by `pos · θ^(−2i/n)`. Positions are an explicit input, built
//! from `(row, col)`, so a band of image rows gets its true rows from the band's offset (the
//! patch-parallel core's band locator, PCPP §2.3 for DiTs) and a column band its true columns.

use pcpp_kernels::{Device, Tensor};

use crate::error::{FluxError, Result};

/// The RoPE base of FLUX.1.
pub const THETA: f64 = 10000.0;

/// Coordinates of `n` text tokens (all zero).
pub fn text_ids(n: usize) -> Vec<[f32; 3]> {
    vec![[0.0; 3]; n]
}

/// Coordinates of the packed image tokens of rows `row_offset..row_offset + rows` of a grid
/// `cols` wide, in row-major order.
pub fn image_ids(rows: usize, cols: usize, row_offset: usize) -> Vec<[f32; 3]> {
    band_ids((row_offset, 0), (rows, cols))
}

/// Coordinates of the packed image tokens of a `rows × cols` band whose first token sits at
/// packed row `top` and column `left`, in row-major order.
pub fn band_ids((top, left): (usize, usize), (rows, cols): (usize, usize)) -> Vec<[f32; 3]> {
    (top..top + rows)
        .flat_map(|r| (left..left + cols).map(move |c| [0.0, r as f32, c as f32]))
        .collect()
}

/// cos and sin of every (token, rotated pair), ready to apply to `[b, L, heads·dh]`.
#[derive(Clone)]
pub struct RopeTables {
    /// `[L, dh/2]`.
    cos: Tensor,
    /// `[L, dh/2]`.
    sin: Tensor,
    len: usize,
    half: usize,
}

impl RopeTables {
    /// The tables for tokens at `ids`, for heads of `sum(axes_dim)` dimensions, computed in f64
    /// as diffusers does and kept in f32 on `device` (the rotation runs in f32 whatever the
    /// activations' dtype, as diffusers' `apply_rotary_emb`).
    pub fn new(ids: &[[f32; 3]], axes_dim: &[usize], device: Device) -> Result<Self> {
        if axes_dim.len() != 3 || axes_dim.iter().any(|d| d % 2 != 0 || *d == 0) {
            return Err(FluxError::Input(format!(
                "RoPE axes {axes_dim:?} must be three non-zero even sizes"
            )));
        }
        let half: usize = axes_dim.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(ids.len() * half);
        let mut sin = Vec::with_capacity(ids.len() * half);
        for id in ids {
            for (axis, &n) in axes_dim.iter().enumerate() {
                let pos = id[axis] as f64;
                for i in 0..n / 2 {
                    let freq = 1.0 / THETA.powf((2 * i) as f64 / n as f64);
                    let a = pos * freq;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let shape = [ids.len(), half];
        Ok(RopeTables {
            cos: Tensor::from_vec(&shape, cos)?.to_device(device)?,
            sin: Tensor::from_vec(&shape, sin)?.to_device(device)?,
            len: ids.len(),
            half,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rotates `x: [b, L, heads·dh]` (pairs of adjacent dimensions are rotated together), in f32;
    /// the result has `x`'s dtype ([`Tensor::rotate_pairs`]).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match x.shape() {
            &[_, l, w] if l == self.len && w % (2 * self.half) == 0 => {
                Ok(x.rotate_pairs(&self.cos, &self.sin)?)
            }
            sh => Err(FluxError::Input(format!(
                "RoPE: {sh:?} is not [b, {}, heads·{}]",
                self.len,
                2 * self.half
            ))),
        }
    }
}
