//! Rotary position embedding of adjacent pairs (`Tensor::rotate_pairs`): the rotation of
//! diffusers' `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`, which Flux.1 and other
//! DiTs apply to q and k. Pair `(2i, 2i+1)` of every head of token `l` becomes
//! `(x₀·cos − x₁·sin, x₁·cos + x₀·sin)` with `cos`, `sin` of `(l, i)`, computed in f32 and stored
//! in the input's dtype. One pass over the tensor (the CUDA kernel `rotate_pairs`) instead of the
//! casts, strided slices, broadcasts and concatenation of the composition, which stays as the GPU
//! path when the vectorised kernels are turned off (`PCPP_VECTOR_KERNELS=0`).

use crate::{DType, KernelError, Result, Tensor};

impl Tensor {
    /// Rotates the adjacent pairs of `self: [b, L, heads·2·half]` by the angles whose cosines and
    /// sines are `cos`, `sin` (f32, `L·half` values, e.g. `[L, half]`): see the module doc.
    pub fn rotate_pairs(&self, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        const OP: &str = "rotate_pairs";
        let &[_, len, width] = self.shape() else {
            return Err(KernelError::invalid(
                OP,
                format!("input {:?} is not [batch, tokens, width]", self.shape()),
            ));
        };
        let half = cos.numel() / len.max(1);
        if cos.dtype() != DType::F32
            || sin.dtype() != DType::F32
            || cos.numel() != sin.numel()
            || half * len != cos.numel()
            || half == 0
            || width % (2 * half) != 0
        {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "cos {:?} / sin {:?} ({} / {}) must be f32 with {len}·half values, half dividing {}",
                    cos.shape(),
                    sin.shape(),
                    cos.dtype(),
                    sin.dtype(),
                    width / 2
                ),
            ));
        }
        #[cfg(feature = "cuda")]
        if crate::ops::on_gpu(OP, &[Some(self), Some(cos), Some(sin)])? {
            let dims = (self.shape()[0], len, width / (2 * half), half);
            if crate::cuda::vector_kernels() {
                let _timed = crate::cuda::profile::scope(
                    crate::cpu::profile::Kernel::Elementwise,
                    self.device(),
                );
                return crate::cuda::rotate_pairs(self, cos, sin, dims);
            }
            return self.rotate_pairs_composed(cos, sin, dims);
        }
        let (x, c, s) = (self.as_f32()?, cos.as_f32()?, sin.as_f32()?);
        let mut out = vec![0f32; x.len()];
        for (r, (xr, yr)) in x.chunks(width).zip(out.chunks_mut(width)).enumerate() {
            let l = r % len;
            let (cr, sr) = (&c[l * half..(l + 1) * half], &s[l * half..(l + 1) * half]);
            for (p, (xp, yp)) in xr.chunks(2).zip(yr.chunks_mut(2)).enumerate() {
                let (co, si) = (cr[p % half], sr[p % half]);
                yp[0] = xp[0] * co - xp[1] * si;
                yp[1] = xp[1] * co + xp[0] * si;
            }
        }
        self.like(self.shape(), out)
    }

    /// The same rotation composed of element-wise ops (f32 casts, strided slices, broadcasts).
    #[cfg(feature = "cuda")]
    fn rotate_pairs_composed(
        &self,
        cos: &Tensor,
        sin: &Tensor,
        (b, len, heads, half): (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let (cos, sin) = (
            cos.reshape(&[len, 1, half, 1])?,
            sin.reshape(&[len, 1, half, 1])?,
        );
        let x = self
            .to_dtype(DType::F32)?
            .reshape(&[b, len, heads, half, 2])?;
        let (re, im) = (x.narrow(4, 0, 1)?, x.narrow(4, 1, 1)?);
        let out_re = re.mul(&cos)?.sub(&im.mul(&sin)?)?;
        let out_im = im.mul(&cos)?.add(&re.mul(&sin)?)?;
        Tensor::cat(&[&out_re, &out_im], 4)?
            .reshape(self.shape())?
            .to_dtype(self.dtype())
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    #[test]
    fn rotate_pairs_rotates_each_pair_by_its_token_angle() {
        // 2 tokens, 2 heads of 2 pairs; angle of (token l, pair i) = 0.3·(l + 1)·(i + 1)
        let (len, half, heads) = (2, 2, 2);
        let ang: Vec<f32> = (0..len * half)
            .map(|k| 0.3 * ((k / half) + 1) as f32 * ((k % half) + 1) as f32)
            .collect();
        let cos = Tensor::from_vec(&[len, half], ang.iter().map(|a| a.cos()).collect()).unwrap();
        let sin = Tensor::from_vec(&[len, half], ang.iter().map(|a| a.sin()).collect()).unwrap();
        let x = Tensor::rand_uniform(
            &[1, len, heads * 2 * half],
            DType::F32,
            Device::Cpu,
            (-1.0, 1.0),
            3,
        )
        .unwrap();
        let y = x.rotate_pairs(&cos, &sin).unwrap();
        let (xv, yv) = (x.to_vec_f32().unwrap(), y.to_vec_f32().unwrap());
        for l in 0..len {
            for h in 0..heads {
                for i in 0..half {
                    let k = l * heads * 2 * half + h * 2 * half + 2 * i;
                    let a = ang[l * half + i];
                    let (x0, x1) = (xv[k], xv[k + 1]);
                    assert!((yv[k] - (x0 * a.cos() - x1 * a.sin())).abs() < 1e-6);
                    assert!((yv[k + 1] - (x1 * a.cos() + x0 * a.sin())).abs() < 1e-6);
                    // a rotation keeps the pair's length
                    let n0 = x0.hypot(x1);
                    assert!((yv[k].hypot(yv[k + 1]) - n0).abs() < 1e-5);
                }
            }
        }
        // wrong table sizes are refused with the op's name
        let bad = Tensor::from_vec(&[3], vec![0.0; 3]).unwrap();
        let e = x.rotate_pairs(&bad, &bad).unwrap_err().to_string();
        assert!(e.contains("rotate_pairs"), "{e}");
    }
}
