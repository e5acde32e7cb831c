//! A convolution with the adds that follow it in a ResNet block, `Tensor::conv2d_add`:
//! `h = conv1(x) + temb[:, :, None, None]` and `out = skip + conv2(h)`. On the GPU the NHWC
//! convolution's output transpose adds them with the bias in the same pass, rounding after each
//! add as the separate ops do; everywhere else it is `conv2d` then the adds, so the CPU twin is
//! exactly the composition.

use crate::{Conv2dParams, KernelError, Result, Tensor};

impl Tensor {
    /// `residual + (conv2d(self, w, bias) + plane[:, :, None, None])`, each term optional.
    ///
    /// # Shapes
    /// As [`Tensor::conv2d`]; `plane: [b, co]`, `residual: [b, co, ho, wo]` (the output's shape).
    /// Terms of another dtype than `self` are added as the separate ops would (in f32, then
    /// rounded), without the fused pass.
    pub fn conv2d_add(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        p: Conv2dParams,
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let y = self.conv2d_out_shape(w, bias, p)?;
        check_adds(&y, plane, residual)?;
        #[cfg(feature = "cuda")]
        if [plane, residual]
            .into_iter()
            .flatten()
            .all(|t| t.dtype() == self.dtype())
            && crate::ops::on_gpu("conv2d_add", &[Some(self), Some(w), bias, plane, residual])?
        {
            let _timed =
                crate::cuda::profile::scope(crate::cpu::profile::Kernel::Conv2d, self.device());
            let adds = crate::cuda::ConvAdds { plane, residual };
            return crate::cuda::conv2d(self, w, bias, p, adds);
        }
        let y = self.conv2d(w, bias, p)?;
        let y = match plane {
            Some(t) => y.add(&t.reshape(&[t.shape()[0], t.shape()[1], 1, 1])?)?,
            None => y,
        };
        match residual {
            Some(r) => r.add(&y),
            None => Ok(y),
        }
    }
}

/// The shapes of [`Tensor::conv2d_add`]'s terms against the output shape `y`.
pub(crate) fn check_adds(
    y: &[usize; 4],
    plane: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<()> {
    if let Some(t) = plane {
        if t.shape() != &y[..2] {
            return Err(KernelError::shape("conv2d_add (plane)", y, t.shape()));
        }
    }
    if let Some(r) = residual {
        if r.shape() != y {
            return Err(KernelError::shape("conv2d_add (residual)", y, r.shape()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::test_util::rnd;
    use crate::{Conv2dParams, DType};

    #[test]
    fn conv_then_plane_then_residual() {
        let (x, w, b) = (rnd(&[2, 3, 5, 4], 1), rnd(&[6, 3, 3, 3], 2), rnd(&[6], 3));
        let (t, r) = (rnd(&[2, 6], 4), rnd(&[2, 6, 5, 4], 5));
        let p = Conv2dParams::new(1, 1);
        let got = x.conv2d_add(&w, Some(&b), p, Some(&t), Some(&r)).unwrap();
        let y = x.conv2d(&w, Some(&b), p).unwrap();
        let want = r
            .add(&y.add(&t.reshape(&[2, 6, 1, 1]).unwrap()).unwrap())
            .unwrap();
        assert_eq!(got.max_abs_diff(&want).unwrap(), 0.0);
        let plain = x.conv2d_add(&w, None, p, None, None).unwrap();
        let want = x.conv2d(&w, None, p).unwrap();
        assert_eq!(plain.max_abs_diff(&want).unwrap(), 0.0);
        assert!(plain.max_abs().unwrap() > 0.0);
    }

    #[test]
    fn shape_errors_name_the_term_and_other_dtypes_compose() {
        let (x, w) = (rnd(&[2, 3, 5, 4], 1), rnd(&[6, 3, 3, 3], 2));
        let p = Conv2dParams::new(1, 1);
        let e = x
            .conv2d_add(&w, None, p, Some(&rnd(&[2, 5], 3)), None)
            .unwrap_err();
        assert!(e.to_string().contains("plane"), "{e}");
        let e = x
            .conv2d_add(&w, None, p, None, Some(&rnd(&[2, 6, 4, 4], 3)))
            .unwrap_err();
        assert!(e.to_string().contains("residual"), "{e}");
        let half = rnd(&[2, 6], 3).to_dtype(DType::F16).unwrap();
        let got = x.conv2d_add(&w, None, p, Some(&half), None).unwrap();
        let y = x.conv2d(&w, None, p).unwrap();
        let want = y.add(&half.reshape(&[2, 6, 1, 1]).unwrap()).unwrap();
        assert_eq!(got.max_abs_diff(&want).unwrap(), 0.0);
    }
}
