//! Watching for non-finite values without a host round trip: a one-element f32 *flag* that stays
//! on the tensors' device and keeps the smallest *code* (e.g. a step index) at which a watched
//! tensor held a NaN or an infinity. A pipeline marks its stages as they run and reads the flag
//! once, at the end (one host sync per image instead of one per step).

use crate::{KernelError, Result, Tensor};

/// The value of a flag that has seen nothing non-finite.
pub const FLAG_CLEAR: f32 = f32::MAX;

impl Tensor {
    /// A fresh flag (value [`FLAG_CLEAR`]) on `device`.
    pub fn finite_flag(device: crate::Device) -> Result<Tensor> {
        Tensor::from_vec(&[1], vec![FLAG_CLEAR])?.to_device(device)
    }

    /// The flag `prev` updated with this tensor: `min(prev, code)` when any element is NaN or
    /// ±inf, else `prev`. `code` must be finite and ≥ 0; `prev` an f32 flag on this tensor's
    /// device. On a GPU this enqueues two small kernels and never waits.
    pub fn nonfinite_flag(&self, prev: &Tensor, code: f32) -> Result<Tensor> {
        const OP: &str = "nonfinite_flag";
        if !(code.is_finite() && code >= 0.0) {
            return Err(KernelError::invalid(
                OP,
                format!("code {code} must be finite and ≥ 0"),
            ));
        }
        if prev.shape() != [1] || prev.dtype() != crate::DType::F32 {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "the flag must be one f32, got {} {:?}",
                    prev.dtype(),
                    prev.shape()
                ),
            ));
        }
        if prev.device() != self.device() {
            return Err(KernelError::Device {
                device: format!("{} and {}", self.device(), prev.device()),
                msg: format!(
                    "{OP}: the tensor is on {} but the flag on {}",
                    self.device(),
                    prev.device()
                ),
            });
        }
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            return crate::cuda::nonfinite_flag(self, prev, code);
        }
        let bad = self.as_f32()?.iter().any(|v| !v.is_finite());
        let old = prev.to_scalar()?;
        Tensor::from_vec(&[1], vec![if bad { old.min(code) } else { old }])
    }

    /// The code a flag holds: `None` while it has seen nothing non-finite. Reads the flag back
    /// (on a GPU: waits for the work that marked it).
    pub fn flag_code(&self) -> Result<Option<f32>> {
        let v = self.to_device(crate::Device::Cpu)?.to_scalar()?;
        Ok((v < FLAG_CLEAR).then_some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_keeps_the_smallest_code_of_a_non_finite_tensor() {
        let ok = Tensor::from_vec(&[3], vec![1.0, -2.0, 3.0]).unwrap();
        let nan = Tensor::from_vec(&[3], vec![1.0, f32::NAN, 3.0]).unwrap();
        let inf = Tensor::from_vec(&[2], vec![f32::NEG_INFINITY, 0.0]).unwrap();
        let f = Tensor::finite_flag(crate::Device::Cpu).unwrap();
        let f = ok.nonfinite_flag(&f, 0.0).unwrap();
        assert_eq!(f.flag_code().unwrap(), None);
        let f = nan.nonfinite_flag(&f, 7.0).unwrap();
        let f = inf.nonfinite_flag(&f, 9.0).unwrap();
        assert_eq!(f.flag_code().unwrap(), Some(7.0));
        let f = inf
            .to_dtype(crate::DType::F16)
            .unwrap()
            .nonfinite_flag(&f, 2.0)
            .unwrap();
        assert_eq!(f.flag_code().unwrap(), Some(2.0));
        assert!(ok.nonfinite_flag(&f, f32::NAN).is_err());
        assert!(ok.nonfinite_flag(&ok, 1.0).is_err());
    }
}
