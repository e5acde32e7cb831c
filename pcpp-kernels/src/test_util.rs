//! Helpers of the crate's unit tests.

use crate::{DType, Device, Tensor};

/// A seeded f32 CPU tensor of uniform values in [-1, 1).
pub(crate) fn rnd(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, DType::F32, Device::Cpu, (-1.0, 1.0), seed).unwrap()
}
