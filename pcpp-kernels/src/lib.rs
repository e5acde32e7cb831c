//! pcpp-kernels: the inference tensor layer of pcpp.
//!
//! A small, immutable, contiguous [`Tensor`] (shape, [`DType`], storage on a [`Device`]) and every op
//! that the diffusion models of this project need: GEMM/linear, conv2d, group/layer norm, softmax
//! attention, activations, nearest up-sampling, element-wise arithmetic with broadcasting, concat and
//! slicing along any axis, sinusoidal embeddings.
//!
//! Ops are methods on [`Tensor`] that dispatch on the storage's device. The CPU implementation in
//! [`cpu`] computes in f32 (whatever the storage dtype) and is the specification of every op: a GPU
//! back-end adds a storage variant and a twin for each op, and model code does not change.
//! Patch parallelism (PCPP, arXiv 2412.02962 §3) needs row-band slicing, explicit padding per side
//! for halo convolutions and split group-norm statistics; those entry points are here too.

mod adaln;
mod add_norm;
mod conv_add;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dtype;
mod error;
mod finite;
mod group_norm;
pub mod io;
mod linear_act;
mod nhwc;
mod norm_linear;
mod ops;
mod packed_attention;
mod rotary;
pub mod shards;
mod tensor;
#[cfg(test)]
mod test_util;

pub use dtype::{DType, Device};
pub use error::{KernelError, Result};
pub use finite::FLAG_CLEAR;
pub use group_norm::GroupStats;
pub use norm_linear::{LayerNormArgs, RowStats};
pub use ops::{Activation, Conv2dParams};
pub use packed_attention::Cols;
pub use tensor::Tensor;

/// Peak memory of a device since the last [`reset_memory_high_water`]: `(allocated, reserved)`
/// bytes of the GPU's memory pool (PyTorch's `max_memory_allocated` / `max_memory_reserved`), or
/// `None` for the CPU.
pub fn memory_high_water(device: Device) -> Result<Option<(u64, u64)>> {
    match device {
        Device::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => cuda::gpu(i)?.pool_high_water().map(Some),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Ok(None),
    }
}

/// Restarts the high-water marks of [`memory_high_water`] (nothing on the CPU).
pub fn reset_memory_high_water(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => cuda::gpu(i)?.reset_pool_high_water(),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Ok(()),
    }
}

/// Waits until everything queued on the device has run (nothing on the CPU).
pub fn synchronize(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => cuda::gpu(i)?.synchronize(),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Ok(()),
    }
}

/// Adds the GPU time of every op recorded while [`cpu::profile`] counting was on (CUDA events
/// around each op's launches, see `cuda::profile`) to the counters of its kind, waiting for those
/// ops first. Nothing to do without CUDA.
pub fn flush_gpu_profile() -> Result<()> {
    #[cfg(feature = "cuda")]
    cuda::profile::flush()?;
    Ok(())
}

/// Lets f32 convolutions and GEMMs on `device` use TF32 tensor cores (nothing on the CPU). See `cuda::Gpu::set_tf32` (feature `cuda`).
pub fn set_tf32(device: Device, on: bool) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            cuda::gpu(i)?.set_tf32(on);
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = on;
            Ok(())
        }
    }
}
