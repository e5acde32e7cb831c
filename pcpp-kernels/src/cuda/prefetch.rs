//! Weights hinted into the L2 cache ahead of the GEMMs that read them, on a stream of their own
//! (the band step's latency, PCPP §7.1: at a band's 256 rows a GEMM's weights are read from
//! device memory while its few blocks wait on them).
//!
//! [`Gpu::prefetch_l2`] forks the prefetch stream from the compute stream, launches `l2_prefetch`
//! (`kernels.cu`) there over the given tensors' bytes and returns at once: the compute stream
//! goes on with the kernels before those GEMMs while the weights travel into L2 beside them. The
//! prefetch stream is joined back into the compute stream at the next prefetch (by then its
//! kernel has long finished) and before a CUDA-graph capture ends, so a captured step holds each
//! prefetch as a side branch. A prefetch only moves data into the cache: every result is the same
//! with it or without it. Off unless [`set_l2_prefetch`] (the `PCPP_L2_PREFETCH` knob of the CLI)
//! turned it on.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use cudarc::driver::{
    sys as drv_sys, CudaContext, CudaEvent, CudaStream, DriverError, LaunchConfig,
};

use super::Gpu;
use crate::{KernelError, Result, Tensor};

/// How [`Gpu::prefetch_l2`] asks for the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Prefetch {
    /// No prefetch (the default until a run measures it faster).
    Off,
    /// Bulk prefetches by the TMA unit (`cp.async.bulk.prefetch.L2`, sm_90 and later; per line
    /// before).
    Bulk,
    /// One `prefetch.global.L2::evict_last` per 128-byte line.
    Lines,
}

impl L2Prefetch {
    /// The name `PCPP_L2_PREFETCH` takes.
    pub fn name(self) -> &'static str {
        match self {
            L2Prefetch::Off => "off",
            L2Prefetch::Bulk => "bulk",
            L2Prefetch::Lines => "lines",
        }
    }

    /// The mode named `name`, if any.
    pub fn parse(name: &str) -> Option<L2Prefetch> {
        [L2Prefetch::Off, L2Prefetch::Bulk, L2Prefetch::Lines]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// The prefetch mode in force for this process.
pub fn l2_prefetch() -> L2Prefetch {
    match MODE.load(Ordering::Relaxed) {
        1 => L2Prefetch::Bulk,
        2 => L2Prefetch::Lines,
        _ => L2Prefetch::Off,
    }
}

/// Sets the prefetch mode for this process. Same results in every mode.
pub fn set_l2_prefetch(mode: L2Prefetch) {
    let v = match mode {
        L2Prefetch::Off => 0,
        L2Prefetch::Bulk => 1,
        L2Prefetch::Lines => 2,
    };
    MODE.store(v, Ordering::Relaxed);
}

/// The most byte ranges one `l2_prefetch` launch takes (one grid row each).
const MAX_RANGES: usize = 8;

/// The kernel's by-value argument (`PrefetchRanges` in `kernels.cu`).
#[repr(C)]
struct Ranges {
    ptr: [u64; MAX_RANGES],
    bytes: [u64; MAX_RANGES],
}

impl Gpu {
    /// Hints the bytes of `tensors` (CUDA tensors of this device) into L2 on the prefetch stream,
    /// after everything enqueued so far on the compute stream; nothing when the mode is
    /// [`L2Prefetch::Off`]. Only enqueues: the compute stream does not wait for it.
    pub(crate) fn prefetch_l2(&self, tensors: &[&Tensor]) -> Result<()> {
        let mode = l2_prefetch();
        if mode == L2Prefetch::Off {
            return Ok(());
        }
        let mut ranges = Vec::with_capacity(tensors.len());
        for t in tensors {
            let s = t.cuda_storage().ok_or_else(|| {
                KernelError::invalid(
                    "prefetch_l2",
                    format!("a tensor on {} given to cuda:{}", t.device(), self.ordinal),
                )
            })?;
            if s.gpu().ordinal() != self.ordinal {
                return Err(KernelError::invalid(
                    "prefetch_l2",
                    format!(
                        "a tensor on cuda:{} given to cuda:{}",
                        s.gpu().ordinal(),
                        self.ordinal
                    ),
                ));
            }
            // Whole 16-byte words inside the tensor (the bulk form's unit).
            let start = s.ptr();
            let end = start + (t.numel() * t.dtype().size()) as u64;
            let lo = (start + 15) & !15;
            let hi = end & !15;
            if hi > lo {
                ranges.push((lo, hi - lo));
            }
        }
        let f = self.func("l2_prefetch")?;
        self.join_prefetch()?;
        self.order(
            &self.prefetch.fork,
            (&self.stream, &self.prefetch.stream),
            "fork to the prefetch stream",
        )?;
        for chunk in ranges.chunks(MAX_RANGES) {
            let mut r = Ranges {
                ptr: [0; MAX_RANGES],
                bytes: [0; MAX_RANGES],
            };
            for (i, &(p, n)) in chunk.iter().enumerate() {
                r.ptr[i] = p;
                r.bytes[i] = n;
            }
            let code: i32 = match mode {
                L2Prefetch::Lines => 2,
                _ => 1,
            };
            let cfg = LaunchConfig {
                grid_dim: (16, chunk.len() as u32, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut params = [
                &mut r as *mut Ranges as *mut std::ffi::c_void,
                &code as *const i32 as *mut std::ffi::c_void,
            ];
            self.ctx
                .bind_to_thread()
                .map_err(|e| self.err("prefetch_l2", e))?;
            // SAFETY: the parameters match `l2_prefetch(PrefetchRanges, int)` and live through
            // the call; every range lies inside a live allocation of this device (the tensors'
            // storage), and the kernel only prefetches, never loads or stores.
            unsafe {
                drv_sys::cuLaunchKernel(
                    f.cu_function(),
                    cfg.grid_dim.0,
                    cfg.grid_dim.1,
                    cfg.grid_dim.2,
                    cfg.block_dim.0,
                    cfg.block_dim.1,
                    cfg.block_dim.2,
                    0,
                    self.prefetch.stream.cu_stream(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
                .result()
                .map_err(|e| self.err("prefetch_l2: l2_prefetch", e))?;
            }
        }
        self.prefetch.pending.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the compute stream wait for the prefetch stream's last kernel, if one was launched
    /// since the last join (inside a capture: joins that branch back into the graph).
    pub(crate) fn join_prefetch(&self) -> Result<()> {
        if self.prefetch.pending.swap(false, Ordering::Relaxed) {
            self.order(
                &self.prefetch.join,
                (&self.prefetch.stream, &self.stream),
                "join the prefetch stream",
            )?;
        }
        Ok(())
    }
}

/// The prefetch stream of a device and its fork and join events.
pub(crate) struct PrefetchStream {
    stream: Arc<CudaStream>,
    fork: CudaEvent,
    join: CudaEvent,
    /// Whether a prefetch was launched since the last [`Gpu::join_prefetch`].
    pending: AtomicBool,
}

impl PrefetchStream {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> std::result::Result<Self, DriverError> {
        let no_timing = Some(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        Ok(PrefetchStream {
            stream: ctx.new_stream()?,
            fork: ctx.new_event(no_timing)?,
            join: ctx.new_event(no_timing)?,
            pending: AtomicBool::new(false),
        })
    }

    /// Waits for the stream's queued prefetches; nothing is left to join after it (a capture that
    /// begins next must not wait on work from before it).
    pub(crate) fn synchronize(&self) -> std::result::Result<(), DriverError> {
        self.stream.synchronize()?;
        self.pending.store(false, Ordering::Relaxed);
        Ok(())
    }
}
