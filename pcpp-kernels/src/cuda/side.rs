//! A second compute stream per device, for independent work inside one layer: [`concurrently`]
//! forks it from the compute stream, runs one closure's kernels and cuBLASLt GEMMs on it and the
//! other closure's on the compute stream, and joins it back, so that a captured CUDA graph holds
//! the two as parallel branches (PCPP §7.1's graphs; the band's self-attention runs its own
//! key/value projection into the stale window beside its query projection, §2.3). Small band
//! GEMMs each fill less than the GPU; side by side their blocks share it.
//!
//! The side branch launches kernels and cuBLASLt GEMMs into tensors that exist before the fork;
//! it may not allocate device memory (inside a capture its kernels would not be ordered after the
//! allocation) nor call cuBLAS or cuDNN (their handles are bound to the compute stream): those
//! are errors, not silent reorderings. Off unless [`set_side_streams`] (the `PCPP_SIDE_STREAM`
//! knob of the benches) turned it on; then [`concurrently`] runs the two closures in order on the
//! compute stream, with the same results.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::Gpu;
use crate::{KernelError, Result};

static SIDE_STREAMS: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread is inside the side branch of [`concurrently`].
    static ON_SIDE: Cell<bool> = const { Cell::new(false) };
}

/// Whether [`concurrently`] runs its side closure on the side stream (off unless
/// [`set_side_streams`] turned it on).
pub fn side_streams() -> bool {
    SIDE_STREAMS.load(Ordering::Relaxed)
}

/// Runs [`concurrently`]'s side closures on each device's side stream, or in order on the compute
/// stream, for this process. Same results either way.
pub fn set_side_streams(on: bool) {
    SIDE_STREAMS.store(on, Ordering::Relaxed);
}

/// Whether this thread is enqueueing the side branch of [`concurrently`] now.
pub(crate) fn on_side() -> bool {
    ON_SIDE.with(Cell::get)
}

/// Turns the thread's side flag off again when the side closure ends, also on an error.
struct SideScope;

impl Drop for SideScope {
    fn drop(&mut self) {
        ON_SIDE.with(|s| s.set(false));
    }
}

impl Gpu {
    /// The stream this thread's kernels and cuBLASLt GEMMs go to: the side stream inside
    /// [`concurrently`]'s side closure, else the compute stream.
    pub(crate) fn exec_stream(&self) -> &Arc<CudaStream> {
        if on_side() {
            &self.side
        } else {
            &self.stream
        }
    }

    /// The cuBLASLt workspace of [`Gpu::exec_stream`] (one per stream: two GEMMs side by side
    /// must not share one).
    pub(crate) fn lt_workspace(&self) -> &CudaSlice<u8> {
        if on_side() {
            &self.lt.side_workspace
        } else {
            &self.lt.workspace
        }
    }

    /// An error for `op` where it would run inside a side branch, which only launches kernels
    /// and cuBLASLt GEMMs into existing tensors.
    pub(crate) fn not_on_side(&self, op: &str) -> Result<()> {
        if on_side() {
            return Err(self.err(
                op,
                "not allowed in a side-stream branch (kernels and cuBLASLt GEMMs into existing tensors only)",
            ));
        }
        Ok(())
    }
}

/// Runs `side` and `main` and returns both results. With side streams on and a GPU `device`,
/// `side`'s kernels go to the device's side stream (forked from the compute stream before it and
/// joined back after `main`) while `main`'s go to the compute stream, so that the two run side by
/// side. `side` must only launch kernels and cuBLASLt GEMMs into tensors that exist before the
/// call; everything else it tries is an error. Otherwise (the CPU, side streams off, or already
/// inside a side branch) `side` then `main`, in order.
pub fn concurrently<A, B, E: From<KernelError>>(
    device: crate::Device,
    side: impl FnOnce() -> std::result::Result<A, E>,
    main: impl FnOnce() -> std::result::Result<B, E>,
) -> std::result::Result<(A, B), E> {
    let crate::Device::Cuda(ordinal) = device else {
        return Ok((side()?, main()?));
    };
    if !side_streams() || on_side() {
        return Ok((side()?, main()?));
    }
    let gpu = super::gpu(ordinal)?;
    gpu.order(
        &gpu.side_fork,
        (&gpu.stream, &gpu.side),
        "fork to the side stream",
    )?;
    let r = (|| {
        let a = {
            ON_SIDE.with(|s| s.set(true));
            let _scope = SideScope;
            side()?
        };
        Ok((a, main()?))
    })();
    // Joined also after an error, so that the compute stream (and a capture) stays whole.
    gpu.order(
        &gpu.side_join,
        (&gpu.side, &gpu.stream),
        "join the side stream",
    )?;
    r
}
