//! Element-wise linear combinations of same-shape tensors in `f32`, the one primitive every
//! scheduler update is written in (so the update runs on whatever device the latents live on).

use pcpp_kernels::{DType, Tensor};

use super::SchedulerError;

/// `Σ cᵢ·tᵢ`, summed left to right in `f32` (each term rounded once, as the scalar expression);
/// the result is `f32` on the terms' device. A coefficient of 1 takes the term as it is.
pub(crate) fn lin(terms: &[(&Tensor, f32)]) -> Result<Tensor, SchedulerError> {
    let mut acc: Option<Tensor> = None;
    for &(t, c) in terms {
        let t = t.to_dtype(DType::F32)?;
        let term = if c == 1.0 { t } else { t.affine(c, 0.0)? };
        acc = Some(match acc {
            None => term,
            Some(a) => a.add(&term)?,
        });
    }
    acc.ok_or(SchedulerError::LengthMismatch {
        what: "linear combination",
        actual: 0,
        expected: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combines_in_f32_whatever_the_input_dtype() {
        let a = Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0]).unwrap();
        let b = Tensor::from_vec(&[3], vec![0.5, -1.0, 4.0])
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let y = lin(&[(&a, 2.0), (&b, -1.0), (&a, 1.0)]).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        assert_eq!(y.to_vec_f32().unwrap(), vec![2.5, 7.0, 5.0]);
        assert!(lin(&[]).is_err());
    }
}
