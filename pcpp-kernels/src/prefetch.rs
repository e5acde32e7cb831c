//! Weights asked into the GPU's L2 cache ahead of the layers that read them (see
//! `cuda/prefetch.rs`): a hint with no result, the same outputs with it or without it, nothing on
//! the CPU.

use crate::{Result, Tensor};

impl Tensor {
    /// Hints the bytes of `tensors` into the L2 cache of their GPU beside the work already
    /// enqueued, so that a GEMM enqueued later finds its weights there
    /// (`pcpp_kernels::cuda::set_l2_prefetch` turns it on). Nothing on the CPU or with the hint
    /// off. Tensors on different devices are an error.
    pub fn prefetch_l2(tensors: &[&Tensor]) -> Result<()> {
        if let Some(other) = tensors.iter().find(|t| t.device() != tensors[0].device()) {
            return Err(crate::KernelError::Device {
                device: format!("{} and {}", tensors[0].device(), other.device()),
                msg: format!(
                    "prefetch_l2: tensors live on different devices ({} and {})",
                    tensors[0].device(),
                    other.device()
                ),
            });
        }
        #[cfg(feature = "cuda")]
        if let Some(s) = tensors.first().and_then(|t| t.cuda_storage()) {
            s.gpu().prefetch_l2(tensors)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};

    #[test]
    fn prefetch_is_nothing_on_the_cpu() {
        let a = Tensor::from_f32(&[2, 3], vec![1.0; 6], DType::F16).unwrap();
        let before = a.to_vec_f32().unwrap();
        Tensor::prefetch_l2(&[&a, &a]).unwrap();
        Tensor::prefetch_l2(&[]).unwrap();
        assert_eq!(a.to_vec_f32().unwrap(), before);
    }
}
