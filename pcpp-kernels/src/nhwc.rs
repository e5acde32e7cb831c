//! Channels-last (NHWC) hand-offs between a group norm and the convolution after it, the pair at
//! the head of every ResNet branch: `conv(silu(group_norm(x)))`. cuDNN's fast convolutions read
//! NHWC; a group norm that writes NHWC spares the convolution its input transpose, one pass over
//! the activations per convolution. `Tensor::group_norm_nhwc` writes `[b, h, w, c]`,
//! `Tensor::conv2d_add_nhwc` convolves such an input (with [`Tensor::conv2d_add`]'s adds) and
//! returns NCHW. Everywhere else (the CPU, f32, odd extents) they are the NCHW ops and a permute,
//! so the CPU twin is exactly that composition.

use crate::{Conv2dParams, KernelError, Result, Tensor};

impl Tensor {
    /// Whether [`Tensor::conv2d_add_nhwc`] with this filter skips a transpose: a CUDA device, a
    /// 16-bit dtype and NHWC convolutions on. Elsewhere the NHWC hand-off only adds permutes, and
    /// callers should stay in NCHW.
    pub fn conv_takes_nhwc(w: &Tensor) -> bool {
        #[cfg(feature = "cuda")]
        {
            matches!(w.device(), crate::Device::Cuda(_))
                && w.dtype() != crate::DType::F32
                && crate::cuda::conv_nhwc()
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = w;
            false
        }
    }

    /// [`Tensor::group_norm`] written channels-last.
    ///
    /// # Shapes
    /// `self: [b, c, h, w]` → `[b, h, w, c]`.
    pub fn group_norm_nhwc(
        &self,
        groups: usize,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f64,
        silu_after: bool,
    ) -> Result<Tensor> {
        if self.rank() != 4 {
            return Err(KernelError::invalid(
                "group_norm_nhwc",
                format!("expected [b, c, h, w], got {:?}", self.shape()),
            ));
        }
        #[cfg(feature = "cuda")]
        if crate::ops::on_gpu("group_norm_nhwc", &[Some(self), gamma, beta])? {
            let [b, c, h, w] = [0, 1, 2, 3].map(|i| self.shape()[i]);
            let (_, _, s) = self.nc_s("group_norm", groups)?;
            self.check_group_norm_affine("group_norm", c, gamma, beta)?;
            let _timed =
                crate::cuda::profile::scope(crate::cpu::profile::Kernel::GroupNorm, self.device());
            let dims = (b, c, s);
            if let Some(y) =
                crate::cuda::group_norm_nhwc(self, dims, groups, (gamma, beta), eps, silu_after)?
            {
                return y.reshape(&[b, h, w, c]);
            }
        }
        self.group_norm(groups, gamma, beta, eps, silu_after)?
            .permute(&[0, 2, 3, 1])
    }

    /// [`Tensor::conv2d_add`] of a channels-last input; the output is NCHW.
    ///
    /// # Shapes
    /// `self: [b, h, w, ci]`, `w: [co, ci, kh, kw]` → `[b, co, ho, wo]`; `plane: [b, co]`,
    /// `residual`: the output's shape.
    pub fn conv2d_add_nhwc(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        p: Conv2dParams,
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.rank() != 4 || w.rank() != 4 || self.shape()[3] != w.shape()[1] {
            return Err(KernelError::shape(
                "conv2d_add_nhwc",
                self.shape(),
                w.shape(),
            ));
        }
        #[cfg(feature = "cuda")]
        if [plane, residual]
            .into_iter()
            .flatten()
            .all(|t| t.dtype() == self.dtype())
            && crate::ops::on_gpu(
                "conv2d_add_nhwc",
                &[Some(self), Some(w), bias, plane, residual],
            )?
        {
            let [b, h, wd, ci] = [0, 1, 2, 3].map(|i| self.shape()[i]);
            let y = crate::ops::conv2d_out_dims(&[b, ci, h, wd], w, bias, p)?;
            crate::conv_add::check_adds(&y, plane, residual)?;
            let _timed =
                crate::cuda::profile::scope(crate::cpu::profile::Kernel::Conv2d, self.device());
            let adds = crate::cuda::ConvAdds { plane, residual };
            if let Some(y) = crate::cuda::conv2d_nhwc_input(self, w, bias, p, adds)? {
                return Ok(y);
            }
        }
        self.permute(&[0, 3, 1, 2])?
            .conv2d_add(w, bias, p, plane, residual)
    }

    /// `residual + self.from_tokens(h, w)`: tokens back to an image and a residual added, on the
    /// GPU in one pass (the transpose's epilogue adds it).
    ///
    /// # Shapes
    /// `self: [b, h·w, c]`, `residual: [b, c, h, w]` → `[b, c, h, w]`.
    pub fn from_tokens_add(&self, h: usize, w: usize, residual: &Tensor) -> Result<Tensor> {
        let y_shape = match self.shape() {
            [b, s, c] if *s == h * w => [*b, *c, h, w],
            _ => return self.from_tokens(h, w),
        };
        if residual.shape() != y_shape {
            return Err(KernelError::shape(
                "from_tokens_add (residual)",
                &y_shape,
                residual.shape(),
            ));
        }
        #[cfg(feature = "cuda")]
        if crate::ops::on_gpu("from_tokens_add", &[Some(self), Some(residual)])? {
            let _timed = crate::cuda::profile::scope(
                crate::cpu::profile::Kernel::Elementwise,
                self.device(),
            );
            if let Some(y) = crate::cuda::tokens_to_image_add(self, residual)? {
                return y.reshape(&y_shape);
            }
        }
        self.from_tokens(h, w)?.add(residual)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::rnd;
    use crate::{Conv2dParams, Tensor};

    #[test]
    fn nhwc_hand_off_is_the_permuted_nchw_ops() {
        let (x, g, b) = (rnd(&[2, 8, 5, 3], 1), rnd(&[8], 2), rnd(&[8], 3));
        let n = x
            .group_norm_nhwc(4, Some(&g), Some(&b), 1e-5, true)
            .unwrap();
        assert_eq!(n.shape(), [2, 5, 3, 8]);
        let want = x.group_norm(4, Some(&g), Some(&b), 1e-5, true).unwrap();
        let back = n.permute(&[0, 3, 1, 2]).unwrap();
        assert_eq!(back.max_abs_diff(&want).unwrap(), 0.0);
        let (w, t, r) = (
            rnd(&[6, 8, 3, 3], 4),
            rnd(&[2, 6], 5),
            rnd(&[2, 6, 5, 3], 6),
        );
        let p = Conv2dParams::new(1, 1);
        let got = n.conv2d_add_nhwc(&w, None, p, Some(&t), Some(&r)).unwrap();
        let want = want.conv2d_add(&w, None, p, Some(&t), Some(&r)).unwrap();
        assert_eq!(got.max_abs_diff(&want).unwrap(), 0.0);
        assert!(!Tensor::conv_takes_nhwc(&w));
        let e = n.conv2d_add_nhwc(&rnd(&[6, 5, 3, 3], 7), None, p, None, None);
        assert!(e.is_err());
        assert!(x
            .reshape(&[2, 8, 15])
            .unwrap()
            .group_norm_nhwc(4, None, None, 1e-5, false)
            .is_err());
    }
}
