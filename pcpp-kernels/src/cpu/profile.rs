//! Opt-in counters for the CPU kernels: calls, wall time and floating-point operations per kernel
//! kind, for benchmarks and profiling (not part of any paper section; it measures the CPU twin).
//!
//! Off by default; when off, each kernel pays one relaxed atomic load. The counters are process-wide
//! because they describe the process's use of the CPU, not any model's state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The kernel families that are timed separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Stand-alone matrix products (`matmul`, direct `gemm` calls).
    Gemm,
    /// `linear` (GEMM plus bias).
    Linear,
    /// Convolution (im2col and GEMM).
    Conv2d,
    /// Group-norm statistics and normalisation.
    GroupNorm,
    /// Layer normalisation.
    LayerNorm,
    /// Multi-head attention (scores, softmax, weighted sum).
    Attention,
    /// Element-wise maps (activations, scalar affine) and binary zips of equal shapes.
    Elementwise,
    /// Nearest up-sampling.
    Upsample,
    /// Copies that move or convert data: concatenation, narrowing, permutation, dtype casts (GPU).
    Copy,
}

impl Kernel {
    /// Every kind, in report order.
    pub const ALL: [Kernel; 9] = [
        Kernel::Gemm,
        Kernel::Linear,
        Kernel::Conv2d,
        Kernel::GroupNorm,
        Kernel::LayerNorm,
        Kernel::Attention,
        Kernel::Elementwise,
        Kernel::Upsample,
        Kernel::Copy,
    ];

    /// Short lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Gemm => "gemm",
            Kernel::Linear => "linear",
            Kernel::Conv2d => "conv2d",
            Kernel::GroupNorm => "group_norm",
            Kernel::LayerNorm => "layer_norm",
            Kernel::Attention => "attention",
            Kernel::Elementwise => "elementwise",
            Kernel::Upsample => "upsample",
            Kernel::Copy => "copy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

struct Counter {
    calls: AtomicU64,
    nanos: AtomicU64,
    flops: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: Counter = Counter {
    calls: AtomicU64::new(0),
    nanos: AtomicU64::new(0),
    flops: AtomicU64::new(0),
};

static ENABLED: AtomicBool = AtomicBool::new(false);
static COUNTERS: [Counter; Kernel::ALL.len()] = [ZERO; Kernel::ALL.len()];
/// Multiply-add operations ×2 of the GEMMs run while enabled (whatever kernel they belong to).
static GEMM_FLOPS: AtomicU64 = AtomicU64::new(0);

/// Totals of one kernel kind since the last [`reset`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelStats {
    /// Which kernel.
    pub kernel: Kernel,
    /// Number of calls.
    pub calls: u64,
    /// Wall time inside the kernel, in seconds.
    pub seconds: f64,
    /// Floating-point operations of its GEMMs (2·m·n·k each).
    pub flops: u64,
}

/// Turns counting on or off.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether counting is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Zeroes every counter.
pub fn reset() {
    for c in &COUNTERS {
        c.calls.store(0, Ordering::Relaxed);
        c.nanos.store(0, Ordering::Relaxed);
        c.flops.store(0, Ordering::Relaxed);
    }
    GEMM_FLOPS.store(0, Ordering::Relaxed);
}

/// The counters of every kernel kind, in [`Kernel::ALL`] order.
pub fn snapshot() -> Vec<KernelStats> {
    Kernel::ALL
        .iter()
        .map(|&k| {
            let c = &COUNTERS[k.index()];
            KernelStats {
                kernel: k,
                calls: c.calls.load(Ordering::Relaxed),
                seconds: c.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
                flops: c.flops.load(Ordering::Relaxed),
            }
        })
        .collect()
}

/// Total GEMM floating-point operations since the last [`reset`].
pub fn gemm_flops() -> u64 {
    GEMM_FLOPS.load(Ordering::Relaxed)
}

/// Adds `2·m·n·k` to the GEMM total (when enabled).
#[inline]
pub(crate) fn count_gemm(m: usize, n: usize, k: usize) {
    if enabled() {
        GEMM_FLOPS.fetch_add(2 * (m * n * k) as u64, Ordering::Relaxed);
    }
}

/// Adds one call of `kernel` taking `nanos` (measured elsewhere, e.g. GPU time between two
/// events).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn add(kernel: Kernel, nanos: u64) {
    let c = &COUNTERS[kernel.index()];
    c.calls.fetch_add(1, Ordering::Relaxed);
    c.nanos.fetch_add(nanos, Ordering::Relaxed);
}

/// Times a kernel call from creation to drop (when enabled); GEMM work done meanwhile is
/// attributed to it.
pub(crate) struct Scope {
    kernel: Kernel,
    start: Instant,
    flops0: u64,
}

/// Starts timing `kernel` if counting is on.
#[inline]
pub(crate) fn scope(kernel: Kernel) -> Option<Scope> {
    if enabled() {
        Some(Scope {
            kernel,
            start: Instant::now(),
            flops0: gemm_flops(),
        })
    } else {
        None
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let c = &COUNTERS[self.kernel.index()];
        c.calls.fetch_add(1, Ordering::Relaxed);
        c.nanos
            .fetch_add(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        c.flops
            .fetch_add(gemm_flops().saturating_sub(self.flops0), Ordering::Relaxed);
    }
}
