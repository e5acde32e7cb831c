//! Reading and writing safetensors files. Every error names the file, and the tensor where one is
//! at fault. Files are memory-mapped; f16/bf16 data is kept in its dtype unless a cast is asked for,
//! integer data (token ids, timesteps) becomes f32.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

use crate::tensor::CpuStorage;
use crate::{DType, KernelError, Result, Tensor};

fn file_err(path: &Path, msg: impl Into<String>) -> KernelError {
    KernelError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A memory-mapped safetensors file whose header is parsed once, at open.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// The parsed header (names, dtypes, shapes, offsets).
    meta: Metadata,
    /// Where the data section starts (8 + header length).
    data_start: usize,
}

impl SafetensorsFile {
    /// Opens and validates the header of `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| KernelError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the file is opened read-only and mapped privately; like every reader of model files
        // we assume it is not truncated by another process while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| KernelError::Io {
            path: path.clone(),
            source,
        })?;
        SafeTensors::deserialize(&mmap)
            .map_err(|e| file_err(&path, format!("not a valid safetensors file: {e}")))?;
        let (header, meta) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| file_err(&path, format!("not a valid safetensors file: {e}")))?;
        Ok(SafetensorsFile {
            path,
            mmap,
            meta,
            data_start: 8 + header,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names and shapes of all tensors, sorted by name.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<_> = self
            .meta
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.shape.clone()))
            .collect();
        v.sort();
        v
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }

    /// The file's `__metadata__` map.
    pub fn metadata(&self) -> HashMap<String, String> {
        self.meta.metadata().clone().unwrap_or_default()
    }

    /// Loads tensor `name`, cast to `dtype` if given (floating data keeps its dtype otherwise).
    /// The bytes are read straight from the mapping (validated at open), one copy into the
    /// tensor's storage.
    pub fn load(&self, name: &str, dtype: Option<DType>) -> Result<Tensor> {
        let info = self
            .meta
            .info(name)
            .ok_or_else(|| file_err(&self.path, format!("tensor `{name}` is missing")))?;
        let shape = info.shape.clone();
        let (a, b) = info.data_offsets;
        let data = &self.mmap[self.data_start + a..self.data_start + b];
        let bad = |msg: String| file_err(&self.path, format!("tensor `{name}`: {msg}"));
        let storage = match info.dtype {
            Dtype::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec::<u8, f32>(data)),
            Dtype::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec::<u8, f16>(data)),
            Dtype::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec::<u8, bf16>(data)),
            Dtype::F64 => CpuStorage::F32(
                bytemuck::pod_collect_to_vec::<u8, f64>(data)
                    .iter()
                    .map(|&x| x as f32)
                    .collect(),
            ),
            Dtype::I64 => CpuStorage::F32(
                bytemuck::pod_collect_to_vec::<u8, i64>(data)
                    .iter()
                    .map(|&x| x as f32)
                    .collect(),
            ),
            Dtype::I32 => CpuStorage::F32(
                bytemuck::pod_collect_to_vec::<u8, i32>(data)
                    .iter()
                    .map(|&x| x as f32)
                    .collect(),
            ),
            Dtype::BOOL | Dtype::U8 => CpuStorage::F32(data.iter().map(|&x| x as f32).collect()),
            other => return Err(bad(format!("unsupported dtype {other:?}"))),
        };
        let t = Tensor::from_cpu_storage(&shape, storage).map_err(|e| bad(e.to_string()))?;
        match dtype {
            Some(d) => t.to_dtype(d),
            None => Ok(t),
        }
    }
}

impl SafetensorsFile {
    /// Tensor `name` on `device`, cast to `dtype` if given. On a GPU, floating data already in the
    /// wanted dtype is copied from the mapped file straight to the device (no host copy);
    /// anything else is converted on the host first.
    pub fn load_on(
        &self,
        name: &str,
        dtype: Option<DType>,
        device: crate::Device,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let crate::Device::Cuda(ordinal) = device {
            if let Some(info) = self.meta.info(name) {
                let stored = match info.dtype {
                    Dtype::F32 => Some(DType::F32),
                    Dtype::F16 => Some(DType::F16),
                    Dtype::BF16 => Some(DType::BF16),
                    _ => None,
                };
                if let Some(d) = stored.filter(|&d| dtype.map_or(true, |w| w == d)) {
                    let (a, b) = info.data_offsets;
                    let bytes = &self.mmap[self.data_start + a..self.data_start + b];
                    return crate::cuda::upload_bytes(&info.shape, d, bytes, ordinal)
                        .map_err(|e| file_err(&self.path, format!("tensor `{name}`: {e}")));
                }
            }
        }
        self.load(name, dtype)?.to_device(device)
    }
}

/// Loads every tensor of a file as f32.
pub fn load_all(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let f = SafetensorsFile::open(path)?;
    f.shapes()
        .into_iter()
        .map(|(n, _)| Ok((n.clone(), f.load(&n, Some(DType::F32))?)))
        .collect()
}

/// Writes tensors (in their dtypes) to `path` atomically: a temporary file in the same folder is
/// written, then renamed, so a failure never leaves a partial file.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut bufs = Vec::new();
    for (name, t) in tensors {
        let (dtype, bytes): (Dtype, Vec<u8>) = match t.cpu_storage()? {
            CpuStorage::F32(v) => (Dtype::F32, bytemuck::cast_slice(v).to_vec()),
            CpuStorage::F16(v) => (Dtype::F16, bytemuck::cast_slice(v).to_vec()),
            CpuStorage::BF16(v) => (Dtype::BF16, bytemuck::cast_slice(v).to_vec()),
        };
        bufs.push((name.to_string(), dtype, t.shape().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| file_err(path, format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::serialize(views, metadata).map_err(|e| file_err(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let io = |source| KernelError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}
