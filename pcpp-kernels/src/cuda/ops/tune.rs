//! Timed choice of library algorithms (cuBLASLt GEMMs, cuDNN convolutions), what TensorRT and
//! `torch.backends.cudnn.benchmark` do: the first call of a shape, outside a graph capture, runs
//! each candidate the library offers on the real operands and keeps the fastest; later calls and
//! captured graphs reuse it. Each timed run starts from a cold L2 (a scratch buffer larger than
//! the cache is written first), as the weights of a whole UNet step are, so a latency-optimised
//! tile that only wins on cache-resident weights is not chosen. Off by default ([`set_autotune`]):
//! on an H200 the SDXL UNet steps it chose ran no faster than the heuristic choice (the first
//! candidate, taken without tuning) and the first image of a process took about a second more
//! (docs/benchmarks.md). With the report on ([`set_autotune_report`]) each shape's candidates
//! and their times are written to stderr.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

static AUTOTUNE: AtomicBool = AtomicBool::new(false);
static REPORT: AtomicBool = AtomicBool::new(false);

/// Whether the first call of a GEMM or convolution shape times the libraries' candidates (off
/// unless [`set_autotune`] turned it on).
pub fn autotune() -> bool {
    AUTOTUNE.load(Ordering::Relaxed)
}

/// Times the candidates of each new GEMM and convolution shape and keeps the fastest, or takes
/// the libraries' heuristic choice (the default), for this process.
pub fn set_autotune(on: bool) {
    AUTOTUNE.store(on, Ordering::Relaxed);
}

/// Whether each tuned shape's candidates and their times are written to stderr (off unless
/// [`set_autotune_report`] turned it on): what the choice was made from, for a user comparing
/// the libraries' heuristic pick (candidate 0) with the fastest.
pub fn set_autotune_report(on: bool) {
    REPORT.store(on, Ordering::Relaxed);
}

/// Timed runs per candidate (after one untimed run that also checks it launches).
const REPS: usize = 3;
/// Bytes written before each timed run to evict the L2 (H100: 50 MB, H200: 60 MB).
const FLUSH_BYTES: usize = 128 << 20;

/// Whether a new shape's choice may be timed now: tuning is on and `gpu`'s stream is not being
/// captured into a graph (a capture cannot be synchronised).
pub(super) fn may_tune(gpu: &Gpu) -> bool {
    autotune()
        && matches!(
            gpu.stream.capture_status(),
            Ok(drv_sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
        )
}

/// The index of the fastest of `n` candidates, each launched by `run(i)` on `gpu`'s stream
/// (work that may be repeated: same operands, same result). A candidate whose launch fails is
/// skipped; `None` when none launched. Synchronises the stream. With the report on, writes
/// `shape` and each candidate's `label` and mean time to stderr.
pub(super) fn fastest(
    gpu: &Gpu,
    n: usize,
    (shape, label): (&str, &dyn Fn(usize) -> String),
    mut run: impl FnMut(usize) -> Result<()>,
) -> Result<Option<usize>> {
    let ev = |what: &str| {
        gpu.ctx
            .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| gpu.err(what, e))
    };
    let (start, end) = (ev("tuning event")?, ev("tuning event")?);
    // SAFETY: scratch bytes, only ever written.
    let mut scratch =
        unsafe { gpu.stream.alloc::<u8>(FLUSH_BYTES) }.map_err(|e| gpu.err("tuning scratch", e))?;
    let mut best: Option<(usize, f32)> = None;
    let report = REPORT.load(Ordering::Relaxed);
    let mut lines = Vec::new();
    for i in 0..n {
        if run(i).is_err() {
            if report {
                lines.push(format!("  {i:2} {}: failed to launch", label(i)));
            }
            continue;
        }
        let mut total = 0.0f32;
        for _ in 0..REPS {
            gpu.stream
                .memset_zeros(&mut scratch)
                .map_err(|e| gpu.err("tuning flush", e))?;
            start
                .record(&gpu.stream)
                .map_err(|e| gpu.err("tuning event", e))?;
            run(i)?;
            end.record(&gpu.stream)
                .map_err(|e| gpu.err("tuning event", e))?;
            total += start
                .elapsed_ms(&end)
                .map_err(|e| gpu.err("tuning time", e))?;
        }
        if report {
            let us = 1e3 * total / REPS as f32;
            lines.push(format!("  {i:2} {}: {us:.1} us", label(i)));
        }
        if !matches!(best, Some((_, t)) if t <= total) {
            best = Some((i, total));
        }
    }
    if report {
        let pick = best.map_or("none".to_string(), |(i, _)| i.to_string());
        eprintln!("autotune {shape}: picked {pick}\n{}", lines.join("\n"));
    }
    Ok(best.map(|(i, _)| i))
}
