//! Kernel choices for comparison runs, taken from the environment before any GPU work:
//! `PCPP_FLASH128=shared-q64|shared-q|registers-q` (the head-size-128 flash-attention kernel,
//! Flux.1), `PCPP_VECTOR_KERNELS=1|0` (vectorised element-wise kernels, row-broadcast kernel, one
//! warp per norm row, fused rotary embedding) and `PCPP_FUSED_EPILOGUES=1|0` (a linear layer's
//! tanh GELU or accumulator in cuBLASLt's epilogue). Unset means the measured defaults
//! (`shared-q64`, `1`, `1`); benchmarks' `--variants` items ([`parse_variant`]) set all three.
//! Without the `cuda` feature there is nothing to choose and the variables are ignored.

use anyhow::{bail, Result};
use pcpp_kernels::Device;

/// Applies the variables; an unknown value is an error naming the variable.
#[cfg(feature = "cuda")]
pub fn apply() -> Result<()> {
    use pcpp_kernels::cuda::{set_flash128, set_fused_epilogues, set_vector_kernels, Flash128};
    match std::env::var("PCPP_FLASH128").ok().as_deref() {
        None | Some("") | Some("shared-q64") => set_flash128(Flash128::SharedQ64),
        Some("shared-q") => set_flash128(Flash128::SharedQ),
        Some("registers-q") => set_flash128(Flash128::RegistersQ),
        Some(v) => bail!("PCPP_FLASH128={v}: expected shared-q, shared-q64 or registers-q"),
    }
    match std::env::var("PCPP_FUSED_EPILOGUES").ok().as_deref() {
        None | Some("") | Some("1") => set_fused_epilogues(true),
        Some("0") => set_fused_epilogues(false),
        Some(v) => bail!("PCPP_FUSED_EPILOGUES={v}: expected 1 or 0"),
    }
    match std::env::var("PCPP_VECTOR_KERNELS").ok().as_deref() {
        None | Some("") | Some("1") => set_vector_kernels(true),
        Some("0") => set_vector_kernels(false),
        Some(v) => bail!("PCPP_VECTOR_KERNELS={v}: expected 1 or 0"),
    }
    Ok(())
}

/// Nothing to choose without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn apply() -> Result<()> {
    Ok(())
}

/// One `--variants` item of a benchmark (read only by a `cuda` build).
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct Variant {
    flash: String,
    fused: bool,
    vector: bool,
}

/// Parses one `--variants` item: `shared-q`, `shared-q64` or `registers-q`, then optional
/// `+fused` (GEMM epilogues on; without it they are off) and `+scalar` (vectorised kernels
/// off; without it on). GPU runs of a `cuda` build only.
pub fn parse_variant(spec: &str, device: Device) -> Result<Variant> {
    if device == Device::Cpu || !cfg!(feature = "cuda") {
        bail!("--variants {spec}: kernel variants exist only for --device cuda");
    }
    let mut parts = spec.split('+');
    let flash = parts.next().unwrap_or_default().to_string();
    if !matches!(flash.as_str(), "shared-q" | "shared-q64" | "registers-q") {
        bail!("--variants {spec}: `{flash}` is not shared-q, shared-q64 or registers-q");
    }
    let (mut fused, mut vector) = (false, true);
    for p in parts {
        match p {
            "fused" => fused = true,
            "scalar" => vector = false,
            _ => bail!("--variants {spec}: unknown part `{p}` (expected fused or scalar)"),
        }
    }
    Ok(Variant {
        flash,
        fused,
        vector,
    })
}

impl Variant {
    /// Puts the variant's choices in force (later kernel launches and graph captures use them).
    pub fn apply(&self) {
        #[cfg(feature = "cuda")]
        {
            use pcpp_kernels::cuda::{
                set_flash128, set_fused_epilogues, set_vector_kernels, Flash128,
            };
            set_flash128(match self.flash.as_str() {
                "shared-q64" => Flash128::SharedQ64,
                "registers-q" => Flash128::RegistersQ,
                _ => Flash128::SharedQ,
            });
            set_fused_epilogues(self.fused);
            set_vector_kernels(self.vector);
        }
    }
}

/// The kernel choices in force, for a benchmark's JSON line (empty on the CPU).
pub fn choices(device: Device) -> serde_json::Value {
    #[cfg(feature = "cuda")]
    if device != Device::Cpu {
        return serde_json::json!({
            "flash128": format!("{:?}", pcpp_kernels::cuda::flash128()),
            "vector_kernels": pcpp_kernels::cuda::vector_kernels(),
            "fused_epilogues": pcpp_kernels::cuda::fused_epilogues(),
        });
    }
    let _ = device;
    serde_json::json!({})
}
