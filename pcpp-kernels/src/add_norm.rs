//! A residual sum and the layer norm of it in one op, `Tensor::add_layer_norm`: a transformer
//! block's `x = x + attn(…); h = LayerNorm(x)`. On the GPU (vectorised kernels on) one launch
//! writes both, with the bits of the two ops; everywhere else it is `add` then `layer_norm`, so the
//! CPU twin is exactly the composition.

use crate::{KernelError, Result, Tensor};

impl Tensor {
    /// `(s, layer_norm(s))` with `s = self + r`.
    ///
    /// # Shapes
    /// `self, r: [..., d]`, `gamma, beta: [d]` → both `[..., d]`.
    pub fn add_layer_norm(
        &self,
        r: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        let d = *self.shape().last().unwrap_or(&0);
        for t in [gamma, beta].into_iter().flatten() {
            if t.shape() != [d] {
                return Err(KernelError::shape(
                    "add_layer_norm",
                    self.shape(),
                    t.shape(),
                ));
            }
        }
        #[cfg(feature = "cuda")]
        if self.shape() == r.shape()
            && crate::ops::on_gpu("add_layer_norm", &[Some(self), Some(r), gamma, beta])?
        {
            let _timed =
                crate::cuda::profile::scope(crate::cpu::profile::Kernel::LayerNorm, self.device());
            if let Some(both) = crate::cuda::add_layer_norm(self, r, gamma, beta, eps)? {
                return Ok(both);
            }
        }
        let s = self.add(r)?;
        let y = s.layer_norm(gamma, beta, eps)?;
        Ok((s, y))
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::rnd;

    #[test]
    fn sum_and_norm_of_the_sum() {
        let (a, r, g) = (rnd(&[2, 3, 6], 1), rnd(&[2, 3, 6], 2), rnd(&[6], 3));
        let (s, y) = a.add_layer_norm(&r, Some(&g), None, 1e-5).unwrap();
        let want = a.add(&r).unwrap();
        assert_eq!(s.max_abs_diff(&want).unwrap(), 0.0);
        let norm = want.layer_norm(Some(&g), None, 1e-5).unwrap();
        assert_eq!(y.max_abs_diff(&norm).unwrap(), 0.0);
        let err = a
            .add_layer_norm(&r, Some(&rnd(&[5], 4)), None, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("add_layer_norm"), "{err}");
    }
}
