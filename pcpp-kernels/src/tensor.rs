//! The [`Tensor`] type: an immutable, contiguous, row-major array with a dtype and a device.
//!
//! Storage is reference-counted, so cloning a tensor is cheap and reshaping never copies. Every op
//! returns a new tensor. Integer data read from files (token ids, timesteps) is held as f32, which is
//! exact for the ranges involved (|x| < 2^24).

use std::borrow::Cow;
use std::sync::Arc;

use half::{bf16, f16};

use crate::{DType, Device, KernelError, Result};

/// Host storage in the tensor's dtype.
#[derive(Debug, Clone)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl CpuStorage {
    fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
        }
    }

    fn from_f32(data: Vec<f32>, dtype: DType) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(data),
            DType::F16 => CpuStorage::F16(data.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => CpuStorage::BF16(data.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }
}

/// Where the elements are.
#[derive(Debug)]
pub(crate) enum Storage {
    Cpu(CpuStorage),
    /// Device memory of the CUDA back-end.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage),
}

/// SplitMix64 finaliser (the generator of [`Tensor::rand_uniform`], mirrored in kernels.cu).
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An inference tensor: shape, dtype and shared contiguous storage on a device.
///
/// # Shapes
/// Row-major; image activations are `[B, C, H, W]`, token sequences `[B, L, C]`.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Arc<Storage>,
}

impl Tensor {
    /// A tensor from f32 data, stored as `dtype` on the CPU.
    pub fn from_f32(shape: &[usize], data: Vec<f32>, dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(KernelError::invalid(
                "from_f32",
                format!("shape {shape:?} needs {n} elements, got {}", data.len()),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Arc::new(Storage::Cpu(CpuStorage::from_f32(data, dtype))),
        })
    }

    /// An f32 CPU tensor from a vector; panics never, errors on a size mismatch.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        Tensor::from_f32(shape, data, DType::F32)
    }

    /// Wraps existing host storage.
    pub fn from_cpu_storage(shape: &[usize], storage: CpuStorage) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != storage.len() {
            return Err(KernelError::invalid(
                "from_cpu_storage",
                format!("shape {shape:?} needs {n} elements, got {}", storage.len()),
            ));
        }
        let dtype = match &storage {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Arc::new(Storage::Cpu(storage)),
        })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Arc::new(Storage::Cpu(CpuStorage::from_f32(vec![0.0; n], dtype))),
        }
    }

    /// A tensor of zeros created directly on `device`: on a GPU the memory is cleared on the
    /// device's stream (no host upload, so it can be captured into a CUDA graph); on the CPU the
    /// same as [`Tensor::zeros`].
    pub fn zeros_on(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Ok(Tensor::zeros(shape, dtype)),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::cuda::zeros(i, shape, dtype),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(KernelError::Device {
                device: device.to_string(),
                msg: "zeros_on: this build has no CUDA back-end (rebuild with the `cuda` feature)"
                    .into(),
            }),
        }
    }

    /// Uniform values in `[lo, hi)` from a counter-based generator: element `i` depends only on
    /// `(seed, i)`, so the CPU and the GPU produce the same numbers (random weights for
    /// benchmarks, random inputs for parity tests). Generated where it is stored.
    pub fn rand_uniform(
        shape: &[usize],
        dtype: DType,
        device: Device,
        (lo, hi): (f32, f32),
        seed: u64,
    ) -> Result<Tensor> {
        match device {
            Device::Cpu => {
                let n: usize = shape.iter().product();
                let data = (0..n as u64)
                    .map(|i| {
                        let r = splitmix64(seed.wrapping_mul(0x0100_0000_01B3).wrapping_add(i));
                        let u = (r >> 40) as f32 * (1.0 / 16_777_216.0);
                        lo + (hi - lo) * u
                    })
                    .collect();
                Tensor::from_f32(shape, data, dtype)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::cuda::fill_uniform(i, shape, dtype, (lo, hi), seed),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(KernelError::Device {
                device: device.to_string(),
                msg: "this build has no CUDA back-end (rebuild with the `cuda` feature)".into(),
            }),
        }
    }

    /// A 0-d tensor holding `v`.
    pub fn scalar(v: f32) -> Tensor {
        Tensor {
            shape: vec![],
            dtype: DType::F32,
            storage: Arc::new(Storage::Cpu(CpuStorage::F32(vec![v]))),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size of dimension `d`, with a clear error if out of range.
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.shape.get(d).copied().ok_or_else(|| {
            KernelError::invalid(
                "dim",
                format!("axis {d} out of range for shape {:?}", self.shape),
            )
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Storage dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device holding the storage.
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.device(),
        }
    }

    /// Whether the storage is in GPU memory.
    pub fn is_cuda(&self) -> bool {
        self.device() != Device::Cpu
    }

    /// Device storage, if the tensor is on a CUDA device.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_storage(&self) -> Option<&crate::cuda::CudaStorage> {
        match &*self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    /// The raw device address of a CUDA tensor's storage (e.g. a buffer for NCCL), an error for a
    /// CPU tensor.
    ///
    /// The address is valid while this tensor (or a clone or reshape of it) lives. All compute work
    /// of the device runs on its compute stream, where the memory is also freed when the last
    /// handle drops: work on other streams that uses the address (the comm stream of
    /// [`crate::cuda::Gpu`]) must be joined back to the compute stream
    /// ([`crate::cuda::Gpu::join_comm`]) before the tensor is dropped, and must be ordered after
    /// the compute work that writes it ([`crate::cuda::Gpu::fork_to_comm`]).
    #[cfg(feature = "cuda")]
    pub fn cuda_ptr(&self) -> Result<u64> {
        match &*self.storage {
            Storage::Cuda(s) => Ok(s.ptr()),
            Storage::Cpu(_) => Err(KernelError::invalid(
                "cuda_ptr",
                "the tensor is in host memory; move it with to_device(Device::Cuda(i)) first",
            )),
        }
    }

    /// Whether `other` is this tensor: the same storage, shape and dtype.
    pub(crate) fn same_as(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
            && self.shape == other.shape
            && self.dtype == other.dtype
    }

    /// The identity of this tensor's storage (its address, valid while the weak handle lives:
    /// the handle keeps the address from being reused) and a weak handle on it.
    #[cfg(feature = "cuda")]
    pub(crate) fn storage_id(&self) -> (usize, std::sync::Weak<Storage>) {
        (
            Arc::as_ptr(&self.storage) as usize,
            Arc::downgrade(&self.storage),
        )
    }

    /// Wraps device storage holding `shape`'s elements of `dtype`.
    #[cfg(feature = "cuda")]
    pub(crate) fn from_cuda(shape: &[usize], dtype: DType, s: crate::cuda::CudaStorage) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Arc::new(Storage::Cuda(s)),
        }
    }

    /// Bytes the elements occupy in the storage dtype.
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Host storage, if the tensor is on the CPU.
    pub fn cpu_storage(&self) -> Result<&CpuStorage> {
        match &*self.storage {
            Storage::Cpu(s) => Ok(s),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Err(KernelError::Device {
                device: s.device().to_string(),
                msg: "the tensor is in GPU memory; copy it with to_device(Device::Cpu) first"
                    .into(),
            }),
        }
    }

    /// The elements as f32 (borrowed when the storage is f32 on the CPU; a GPU tensor is copied
    /// back to the host).
    pub fn as_f32(&self) -> Result<Cow<'_, [f32]>> {
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            return Ok(Cow::Owned(crate::cuda::download(self)?.to_vec_f32()?));
        }
        Ok(match self.cpu_storage()? {
            CpuStorage::F32(v) => Cow::Borrowed(v.as_slice()),
            CpuStorage::F16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            CpuStorage::BF16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        })
    }

    /// The elements as an owned f32 vector.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        Ok(self.as_f32()?.into_owned())
    }

    /// The single element of a tensor with one element.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(KernelError::invalid(
                "to_scalar",
                format!("tensor of shape {:?} is not a scalar", self.shape),
            ));
        }
        Ok(self.as_f32()?[0])
    }

    /// Same elements, new dtype (rounding when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed =
                crate::cuda::profile::scope(crate::cpu::profile::Kernel::Copy, self.device());
            return crate::cuda::cast(self, dtype);
        }
        let v = self.to_vec_f32()?;
        Tensor::from_f32(&self.shape, v, dtype)
    }

    /// Same elements on another device.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        #[cfg(feature = "cuda")]
        {
            let host = if self.is_cuda() {
                crate::cuda::download(self)?
            } else {
                self.clone()
            };
            match device {
                Device::Cpu => Ok(host),
                Device::Cuda(i) => crate::cuda::upload(&host, i),
            }
        }
        #[cfg(not(feature = "cuda"))]
        Err(KernelError::Device {
            device: device.to_string(),
            msg: "this build has no CUDA back-end (rebuild with the `cuda` feature)".into(),
        })
    }

    /// Same storage, new shape (same number of elements). One dimension may be `usize::MAX` to infer it.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let mut shape = shape.to_vec();
        let known: usize = shape.iter().filter(|&&d| d != usize::MAX).product();
        if let Some(pos) = shape.iter().position(|&d| d == usize::MAX) {
            if known == 0 || self.numel() % known != 0 {
                return Err(KernelError::shape("reshape", &self.shape, &shape));
            }
            shape[pos] = self.numel() / known;
        }
        if shape.iter().product::<usize>() != self.numel() {
            return Err(KernelError::shape("reshape", &self.shape, &shape));
        }
        Ok(Tensor {
            shape,
            dtype: self.dtype,
            storage: self.storage.clone(),
        })
    }

    /// An f32 CPU result with this tensor's dtype (the common output path of the CPU twin).
    pub(crate) fn like(&self, shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        Tensor::from_f32(shape, data, self.dtype)
    }

    /// Largest absolute element (0 for an empty tensor).
    pub fn max_abs(&self) -> Result<f32> {
        Ok(self.as_f32()?.iter().fold(0.0f32, |m, &x| m.max(x.abs())))
    }

    /// Largest absolute element-wise difference to `other` (same shape required).
    pub fn max_abs_diff(&self, other: &Tensor) -> Result<f32> {
        if self.shape != other.shape {
            return Err(KernelError::shape(
                "max_abs_diff",
                &self.shape,
                &other.shape,
            ));
        }
        let (a, b) = (self.as_f32()?, other.as_f32()?);
        Ok(a.iter()
            .zip(b.iter())
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs())))
    }
}

impl Tensor {
    /// The elements as little-endian bytes of the storage dtype (for transport).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            return crate::cuda::to_bytes(self);
        }
        Ok(match self.cpu_storage()? {
            CpuStorage::F32(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::F16(v) => bytemuck::cast_slice(v).to_vec(),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v).to_vec(),
        })
    }

    /// A CPU tensor from bytes written by [`Tensor::to_bytes`].
    pub fn from_bytes(shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * dtype.size() {
            return Err(KernelError::invalid(
                "from_bytes",
                format!(
                    "shape {shape:?} of {dtype} needs {} bytes, got {}",
                    n * dtype.size(),
                    bytes.len()
                ),
            ));
        }
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
        };
        Tensor::from_cpu_storage(shape, storage)
    }
}
