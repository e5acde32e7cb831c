//! The two element-wise steps of adaptive layer norm (AdaLN-Zero, DiT §3.2; diffusers'
//! `AdaLayerNormZero` and the gated residuals of Flux.1's blocks) as single ops:
//! [`Tensor::modulated_layer_norm`] (`LayerNorm(x)·(1 + scale) + shift`) and
//! [`Tensor::add_gated`] (`x + gate·y`), with `scale`, `shift`, `gate` one row per batch element
//! broadcast over the tokens. The CPU twins compute exactly what the composition of layer norm,
//! affine, multiply and add computes in f32; on a GPU each is one pass when the vectorised
//! kernels are on (`cuda::set_vector_kernels`), else that composition.

use crate::{KernelError, Result, Tensor};

/// `(rows per batch element, d)` of `x: [b, .., d]` against a `[b, d]` modulation.
fn rows_of(op: &'static str, x: &Tensor, m: &[&Tensor]) -> Result<(usize, usize)> {
    let (b, d) = (
        x.shape().first().copied().unwrap_or(0),
        *x.shape().last().unwrap_or(&0),
    );
    if x.shape().len() < 2 {
        return Err(KernelError::invalid(
            op,
            format!("input {:?} is not [b, .., d]", x.shape()),
        ));
    }
    for t in m {
        if t.shape() != [b, d] {
            return Err(KernelError::shape(op, x.shape(), t.shape()));
        }
    }
    Ok((x.numel() / (b * d).max(1), d))
}

impl Tensor {
    /// `LayerNorm(self)·(1 + scale) + shift` over the last axis (no affine of its own), with
    /// `scale, shift: [b, d]` for `self: [b, .., d]`.
    pub fn modulated_layer_norm(&self, scale: &Tensor, shift: &Tensor, eps: f64) -> Result<Tensor> {
        const OP: &str = "modulated_layer_norm";
        let (per, d) = rows_of(OP, self, &[scale, shift])?;
        #[cfg(feature = "cuda")]
        if crate::ops::on_gpu(OP, &[Some(self), Some(scale), Some(shift)])? {
            let fused = {
                let _timed = crate::cuda::profile::scope(
                    crate::cpu::profile::Kernel::LayerNorm,
                    self.device(),
                );
                crate::cuda::modulated_layer_norm(self, scale, shift, eps)?
            };
            if let Some(y) = fused {
                return Ok(y);
            }
            let b = scale.shape()[0];
            let n = self.layer_norm(None, None, eps)?;
            return n
                .mul(&scale.affine(1.0, 1.0)?.reshape(&[b, 1, d])?)?
                .add(&shift.reshape(&[b, 1, d])?);
        }
        let n = crate::cpu::layer_norm(&self.as_f32()?, d, None, None, eps);
        let (s, t) = (scale.as_f32()?, shift.as_f32()?);
        let mut out = n;
        for (r, row) in out.chunks_mut(d.max(1)).enumerate() {
            let k = r / per.max(1);
            let (sr, tr) = (&s[k * d..(k + 1) * d], &t[k * d..(k + 1) * d]);
            for ((v, sc), sh) in row.iter_mut().zip(sr).zip(tr) {
                *v = *v * (sc * 1.0 + 1.0) + sh;
            }
        }
        self.like(self.shape(), out)
    }

    /// `self + gate·y` with `gate: [b, d]` broadcast over the tokens of `self, y: [b, .., d]`.
    pub fn add_gated(&self, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_gated";
        if y.shape() != self.shape() {
            return Err(KernelError::shape(OP, self.shape(), y.shape()));
        }
        let (per, d) = rows_of(OP, self, &[gate])?;
        #[cfg(feature = "cuda")]
        if crate::ops::on_gpu(OP, &[Some(self), Some(gate), Some(y)])? {
            let fused = {
                let _timed = crate::cuda::profile::scope(
                    crate::cpu::profile::Kernel::Elementwise,
                    self.device(),
                );
                crate::cuda::add_gated(self, gate, y)?
            };
            if let Some(o) = fused {
                return Ok(o);
            }
            return self.add(&gate.reshape(&[gate.shape()[0], 1, d])?.mul(y)?);
        }
        let (x, g, yv) = (self.as_f32()?, gate.as_f32()?, y.as_f32()?);
        let mut out = Vec::with_capacity(x.len());
        for (r, (xr, yr)) in x.chunks(d.max(1)).zip(yv.chunks(d.max(1))).enumerate() {
            let k = r / per.max(1);
            let gr = &g[k * d..(k + 1) * d];
            out.extend(xr.iter().zip(gr).zip(yr).map(|((a, g), y)| a + g * y));
        }
        self.like(self.shape(), out)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::rnd;

    #[test]
    fn adaln_ops_equal_their_composition_exactly() {
        let (b, l, d) = (2, 5, 12);
        let x = rnd(&[b, l, d], 1).affine(3.0, 0.5).unwrap();
        let (s, t, g, y) = (
            rnd(&[b, d], 2),
            rnd(&[b, d], 3),
            rnd(&[b, d], 4),
            rnd(&[b, l, d], 5),
        );
        let want = x
            .layer_norm(None, None, 1e-6)
            .unwrap()
            .mul(&s.affine(1.0, 1.0).unwrap().reshape(&[b, 1, d]).unwrap())
            .unwrap()
            .add(&t.reshape(&[b, 1, d]).unwrap())
            .unwrap();
        let got = x.modulated_layer_norm(&s, &t, 1e-6).unwrap();
        assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        let want = x
            .add(&g.reshape(&[b, 1, d]).unwrap().mul(&y).unwrap())
            .unwrap();
        let got = x.add_gated(&g, &y).unwrap();
        assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        // shapes that do not fit are refused with the op's name
        let e = x
            .add_gated(&rnd(&[b, d + 1], 6), &y)
            .unwrap_err()
            .to_string();
        assert!(e.contains("add_gated"), "{e}");
        let e = x
            .modulated_layer_norm(&s, &rnd(&[1, d], 7), 1e-6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("modulated_layer_norm"), "{e}");
    }
}
