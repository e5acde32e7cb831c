//! Element types and devices.

use std::fmt;
use std::str::FromStr;

/// Storage element type. CPU compute is always f32; f16/bf16 storage is rounded on write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(format!("unknown dtype `{s}` (expected f32, f16 or bf16)")),
        }
    }
}

/// Where a tensor's storage lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory; ops run on the CPU twin.
    Cpu,
    /// A CUDA GPU by ordinal (the CUDA back-end is a separate feature).
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if s == "cuda" {
            return Ok(Device::Cuda(0));
        }
        if let Some(i) = s.strip_prefix("cuda:") {
            return i
                .parse()
                .map(Device::Cuda)
                .map_err(|_| format!("bad device ordinal in `{s}`"));
        }
        Err(format!(
            "unknown device `{s}` (expected cpu, cuda or cuda:N)"
        ))
    }
}

impl Device {
    /// Opens the device (loads the CUDA libraries and compiles the kernels on first use) and
    /// returns an error saying why it cannot be used — no CUDA driver, no such GPU, or a build
    /// without the `cuda` feature. Call this at start-up before building a model on the device.
    pub fn open(self) -> crate::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::cuda::gpu(i).map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(crate::KernelError::Device {
                device: self.to_string(),
                msg: "this build has no CUDA back-end (rebuild with the `cuda` feature)".into(),
            }),
        }
    }

    /// Waits until all work queued on the device has finished (a no-op on the CPU, where ops
    /// complete before they return). Timing a GPU step needs this.
    pub fn synchronize(self) -> crate::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => crate::cuda::gpu(i)?.synchronize(),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => self.open(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_device_opens_and_synchronises() {
        assert!(Device::Cpu.open().is_ok());
        assert!(Device::Cpu.synchronize().is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let e = Device::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("cuda:0") && e.contains("`cuda` feature"), "{e}");
    }
}
