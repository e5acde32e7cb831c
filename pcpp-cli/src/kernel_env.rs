//! Kernel choices for comparison runs, taken from the environment before any GPU work:
//! `PCPP_FLASH128=shared-q|shared-q64|registers-q` (the head-size-128 flash-attention kernel, Flux.1) and
//! `PCPP_VECTOR_KERNELS=1|0` (vectorised element-wise kernels, row-broadcast kernel, one warp per
//! norm row, fused rotary embedding), `PCPP_FUSED_EPILOGUES=1|0` (a linear layer's tanh GELU in
//! cuBLASLt's epilogue, being measured). Unset means the measured defaults (`shared-q`, `1`, `0`). Without the `cuda`
//! feature there is nothing to choose and the variables are ignored.

use anyhow::Result;

/// Applies the variables; an unknown value is an error naming the variable.
#[cfg(feature = "cuda")]
pub fn apply() -> Result<()> {
    use anyhow::bail;
    use pcpp_kernels::cuda::{set_flash128, set_fused_epilogues, set_vector_kernels, Flash128};
    match std::env::var("PCPP_FLASH128").ok().as_deref() {
        None | Some("") | Some("shared-q") => set_flash128(Flash128::SharedQ),
        Some("registers-q") => set_flash128(Flash128::RegistersQ),
        Some("shared-q64") => set_flash128(Flash128::SharedQ64),
        Some(v) => bail!("PCPP_FLASH128={v}: expected shared-q, shared-q64 or registers-q"),
    }
    match std::env::var("PCPP_FUSED_EPILOGUES").ok().as_deref() {
        None | Some("") | Some("0") => set_fused_epilogues(false),
        Some("1") => set_fused_epilogues(true),
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
