//! Per-op GPU time for profiling (`pcpp-cli bench --device cuda --profile`): every op that
//! launches work on a GPU while [`crate::cpu::profile`] counting is on records a timing event on
//! the device's stream before its launches and another after, and [`flush`] adds the elapsed GPU
//! time between each pair to that op kind's counters. Not part of any paper section: it says where
//! a step's time goes, op kind by op kind.
//!
//! Only for eager steps: a CUDA graph replays launches without running the host code that records
//! the events, so a profiled step must not be captured (and is not: counting is off by default).

use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{sys as drv_sys, CudaEvent};

use super::{gpu, Gpu};
use crate::cpu::profile::{self, Kernel};
use crate::{Device, KernelError, Result};

/// Recorded (kind, start, end) event pairs not yet added to the counters.
static PENDING: Mutex<Vec<(Kernel, CudaEvent, CudaEvent)>> = Mutex::new(Vec::new());

/// Times one op's GPU work from creation to drop.
pub(crate) struct GpuScope {
    kernel: Kernel,
    gpu: Arc<Gpu>,
    start: Option<CudaEvent>,
}

fn timing_event(g: &Gpu) -> Option<CudaEvent> {
    g.stream()
        .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
        .ok()
}

/// Starts timing `kernel` on `device`'s stream if counting is on (and `device` is a GPU).
#[inline]
pub(crate) fn scope(kernel: Kernel, device: Device) -> Option<GpuScope> {
    if !profile::enabled() {
        return None;
    }
    let Device::Cuda(i) = device else {
        return None;
    };
    let g = gpu(i).ok()?;
    let start = timing_event(&g)?;
    Some(GpuScope {
        kernel,
        gpu: g,
        start: Some(start),
    })
}

impl Drop for GpuScope {
    fn drop(&mut self) {
        if let (Some(start), Some(end)) = (self.start.take(), timing_event(&self.gpu)) {
            PENDING
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((self.kernel, start, end));
        }
    }
}

/// Waits for every recorded op and adds its GPU time to its kind's counters.
pub fn flush() -> Result<()> {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(PoisonError::into_inner));
    for (kernel, start, end) in pending {
        let ms = start.elapsed_ms(&end).map_err(|e| KernelError::Device {
            device: "cuda".into(),
            msg: format!("profile: reading a timing event: {e}"),
        })?;
        profile::add(kernel, (f64::from(ms) * 1e6) as u64);
    }
    Ok(())
}
