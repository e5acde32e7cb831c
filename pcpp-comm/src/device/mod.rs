//! Device-memory point-to-point ([`crate::DeviceP2p`]) for the host-driven back-ends, MPI and
//! UCX: the exchanges of PCPP's patch-parallel layers (§7.4: halo rows, stale K/V windows,
//! group-norm statistics, the output gather) between GPU buffers, ordered on a CUDA stream and
//! overlapped with the computation, as NCCL does it, without host round trips on the compute
//! stream.
//!
//! MPI and UCX are driven from the host, so a stream cannot call them. An exchange enqueued on a
//! stream therefore becomes a *host function* on that stream (`cuLaunchHostFunc`) followed by a
//! *stream wait* on a completion flag. When the stream reaches the host function (everything
//! enqueued before it, e.g. the kernels that wrote the send buffers, has finished: the host
//! function is the "data ready" event), the host function hands the exchange to the transport's
//! communication thread and returns at once. The stream then waits in `cuStreamWaitValue32` until
//! a 32-bit flag in pinned host memory mapped for the device reads 1; the communication thread
//! posts the sends and receives, progresses them, and stores 1 into the flag when they have
//! completed, so later work on that stream sees the received bytes. After the exchange's receive
//! copies the stream writes 2 into the flag (`cuStreamWriteValue32`), which tells the engine the
//! stream is done with the exchange's staging buffers (in both wait modes). A failed or timed-out
//! exchange also sets its flag (the stream goes on, and the failure is reported by the next
//! enqueue), so a lost peer never leaves a stream waiting forever. Each exchange owns its flag,
//! and a graph that captured it waits on and writes the same flag with the same values at every
//! replay.
//!
//! The host function does not wait for the exchange itself because CUDA forbids it: a host
//! function must not make CUDA calls nor wait on work of another thread that does, and UCX's
//! `cuda_copy` / `cuda_ipc` transports and a CUDA-aware MPI call the driver from the
//! communication thread (a blocked host function then deadlocks the driver). That older mode,
//! a host function that blocks until its exchange completes, can still be chosen for comparison
//! with `PCPP_DEVICE_WAIT=host-fn` ([`DeviceWait`]).
//!
//! Only the stream the exchange is enqueued on (the communication stream of the patch-parallel
//! runtime) waits; the compute stream goes on until it joins that stream. Host functions and
//! stream memory operations are captured into CUDA graphs like kernels, so a steady step that
//! contains exchanges can still be replayed as one graph. Two data paths, chosen at start-up
//! ([`DeviceComm`], flag `--device-comm` or `PCPP_DEVICE_COMM`):
//!
//! - **CUDA-aware** ([`DevicePath::CudaAware`]): the communication thread gives the device
//!   pointers to the library (UCX with `UCS_MEMORY_TYPE_CUDA`; an MPI that reports CUDA support
//!   through `MPIX_Query_cuda_support`), which moves device memory itself (`cuda_ipc` between
//!   processes of a node, `cuda_copy` and RDMA where available). Device buffers that CUDA IPC
//!   cannot share (from CUDA's stream-ordered pool, as the runtime's tensors are, or the virtual
//!   memory API; [`StreamOps::ipc_capable`]) are bounced through device buffers of `cuMemAlloc`
//!   by device-to-device copies on the same stream, as the staged path stages through pinned
//!   memory.
//! - **staged** ([`DevicePath::Staged`]): every send is first copied into a pinned host buffer
//!   (`cuMemcpyDtoHAsync` on the same stream, before the host function), the library moves host
//!   memory, and every receive is copied from its pinned buffer into the device buffer after the
//!   stream's wait on the flag. Pinned buffers are allocated once per position in an exchange
//!   (the `i`-th send or receive), grown to the largest message seen there and reused for the
//!   life of the transport: a stream's exchanges run one after the other (the wait on an
//!   exchange's flag orders its receive copies and every later exchange after its completion),
//!   so one set serves them all, and a CUDA graph captured after eager steps of the same traffic
//!   finds its buffers allocated.
//!
//! [`StreamOps`] abstracts the stream operations: [`cuda::CudaStreams`] (feature `cuda`) on real
//! CUDA streams, [`host::HostStreams`] on [`host::HostStream`]s, worker threads that run their
//! work in order and whose "device" memory is host memory. The latter runs the same engine, and so
//! the device-memory conformance cases, on machines without a GPU.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(any(feature = "mpi", feature = "ucx"))]
pub(crate) mod engine;
#[cfg(any(feature = "mpi", feature = "ucx"))]
pub(crate) mod flag;
pub mod host;

use std::ffi::c_void;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// Which data path device exchanges over MPI or UCX take (`--device-comm`, `PCPP_DEVICE_COMM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceComm {
    /// CUDA-aware when the library reports device-memory support, else staged.
    #[default]
    Auto,
    /// Device pointers straight to the library (fails or crashes when it cannot take them).
    CudaAware,
    /// Pinned host buffers and asynchronous copies on the communication stream.
    Staged,
    /// No device point-to-point: activations go through [`crate::Transport::exchange`] (pageable
    /// host copies the compute stream waits for, no CUDA graphs), as before device exchanges.
    Host,
}

/// Environment variable read by [`DeviceComm::from_env`].
pub const DEVICE_COMM_ENV: &str = "PCPP_DEVICE_COMM";

impl DeviceComm {
    /// The flag spelling: `auto`, `cuda-aware`, `staged` or `host`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceComm::Auto => "auto",
            DeviceComm::CudaAware => "cuda-aware",
            DeviceComm::Staged => "staged",
            DeviceComm::Host => "host",
        }
    }

    /// `PCPP_DEVICE_COMM` when set (an error names the variable and the bad value), else `Auto`.
    pub fn from_env() -> Result<DeviceComm, String> {
        match std::env::var(DEVICE_COMM_ENV) {
            Ok(v) if !v.trim().is_empty() => v
                .parse()
                .map_err(|e: String| format!("{DEVICE_COMM_ENV}={v}: {e}")),
            _ => Ok(DeviceComm::Auto),
        }
    }

    /// The path taken when the library does (`library_cuda = true`) or does not move device
    /// memory; `None` for [`DeviceComm::Host`].
    pub fn resolve(self, library_cuda: bool) -> Option<DevicePath> {
        match self {
            DeviceComm::Auto if library_cuda => Some(DevicePath::CudaAware),
            DeviceComm::Auto | DeviceComm::Staged => Some(DevicePath::Staged),
            DeviceComm::CudaAware => Some(DevicePath::CudaAware),
            DeviceComm::Host => None,
        }
    }
}

impl fmt::Display for DeviceComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceComm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceComm::Auto),
            "cuda-aware" | "cuda_aware" | "cudaaware" => Ok(DeviceComm::CudaAware),
            "staged" => Ok(DeviceComm::Staged),
            "host" => Ok(DeviceComm::Host),
            other => Err(format!(
                "unknown device exchange path {other:?} (expected auto, cuda-aware, staged or host)"
            )),
        }
    }
}

/// The data path of a back-end's [`crate::DeviceP2p`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevicePath {
    /// The library reads and writes device memory.
    CudaAware,
    /// Pinned host staging buffers, copied on the stream.
    Staged,
}

impl DevicePath {
    /// `cuda-aware` or `staged`.
    pub fn name(self) -> &'static str {
        match self {
            DevicePath::CudaAware => "cuda-aware",
            DevicePath::Staged => "staged",
        }
    }
}

impl fmt::Display for DevicePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a stream waits for the exchanges enqueued on it (`PCPP_DEVICE_WAIT`; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceWait {
    /// The host function hands the exchange over and returns; the stream then waits on the
    /// exchange's completion flag (`cuStreamWaitValue32`).
    #[default]
    Stream,
    /// The host function blocks until the exchange has completed (the older mode, which CUDA's
    /// rules forbid when the library calls the driver from the communication thread).
    HostFn,
}

/// Environment variable read by [`DeviceWait::from_env`].
pub const DEVICE_WAIT_ENV: &str = "PCPP_DEVICE_WAIT";

impl DeviceWait {
    /// The spelling of `PCPP_DEVICE_WAIT`: `stream` or `host-fn`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceWait::Stream => "stream",
            DeviceWait::HostFn => "host-fn",
        }
    }

    /// `PCPP_DEVICE_WAIT` when set (an error names the variable and the bad value), else
    /// [`DeviceWait::Stream`].
    pub fn from_env() -> Result<DeviceWait, String> {
        Self::from_value(std::env::var(DEVICE_WAIT_ENV).ok().as_deref())
    }

    /// [`DeviceWait::from_env`] for the value `v` of the variable (`None`: not set).
    pub fn from_value(v: Option<&str>) -> Result<DeviceWait, String> {
        match v {
            Some(v) if !v.trim().is_empty() => v
                .parse()
                .map_err(|e: String| format!("{DEVICE_WAIT_ENV}={v}: {e}")),
            _ => Ok(DeviceWait::Stream),
        }
    }

    /// What the transports' start-up line says about the wait: `PCPP_DEVICE_WAIT=stream`, or the
    /// parse error (which every device exchange then reports).
    pub fn log_note() -> String {
        match Self::from_env() {
            Ok(w) => format!("{DEVICE_WAIT_ENV}={w}"),
            Err(e) => e,
        }
    }
}

impl fmt::Display for DeviceWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceWait {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "stream" => Ok(DeviceWait::Stream),
            "host-fn" | "host_fn" | "hostfn" => Ok(DeviceWait::HostFn),
            other => Err(format!(
                "unknown device wait mode {other:?} (expected stream or host-fn)"
            )),
        }
    }
}

/// The value a stream writes into a flag once it is done with the flag's exchange (0: lent, 1:
/// completed, set by the communication thread).
pub(crate) const FLAG_DONE: u32 = 2;

/// A completion flag: a 32-bit word of pinned host memory that the device can read and write,
/// by its host address and its device address ([`StreamOps::alloc_flags`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    /// Host address (aligned to 4 bytes).
    pub host: *mut u32,
    /// Device address of the same word (equal to the host address on the CPU twin).
    pub dev: u64,
}

// SAFETY: a flag is an address; every access goes through atomics (host side) or stream
// operations, under the validity promises of [`StreamOps`].
unsafe impl Send for Flag {}
// SAFETY: as above.
unsafe impl Sync for Flag {}

impl Flag {
    /// The `i`-th flag of a block whose first flag is `self`.
    ///
    /// # Safety
    /// The block holds more than `i` flags.
    pub unsafe fn offset(self, i: usize) -> Flag {
        Flag {
            // SAFETY: inside the block (the caller's promise).
            host: unsafe { self.host.add(i) },
            dev: self.dev + 4 * i as u64,
        }
    }

    /// The flag as an atomic word on the host.
    ///
    /// # Safety
    /// The flag's block is allocated.
    unsafe fn atomic<'a>(self) -> &'a AtomicU32 {
        // SAFETY: an allocated, aligned word, only accessed atomically or by the device.
        unsafe { AtomicU32::from_ptr(self.host) }
    }
}

/// What the streams handed to [`crate::DeviceP2p::enqueue`] are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceStreams {
    /// CUDA streams and device memory (feature `cuda`; without it there is no device path).
    #[default]
    Cuda,
    /// [`host::HostStream`]s, whose "device" memory is host memory: the CPU twin of the device
    /// path, for tests and machines without a GPU.
    Host,
}

/// Host callback run by a stream ([`StreamOps::launch_host_fn`]).
pub type HostFn = unsafe extern "C" fn(*mut c_void);

/// The stream operations the engine needs; implemented for CUDA streams and for
/// [`host::HostStream`]s. Every method taking a `stream` requires a live stream of this kind.
pub trait StreamOps: Send + Sync {
    /// Whether the addresses handed to the exchanges are CUDA device memory (what a CUDA-aware
    /// library is told), rather than host memory standing in for it.
    fn device_memory(&self) -> bool;

    /// Enqueues `f(data)` on `stream`; it runs after everything enqueued before it, and what is
    /// enqueued after it starts only once it has returned.
    ///
    /// # Safety
    /// `stream` is a live stream of this kind; `data` stays valid until `f` has run.
    unsafe fn launch_host_fn(
        &self,
        stream: *mut c_void,
        f: HostFn,
        data: *mut c_void,
    ) -> Result<(), String>;

    /// Enqueues a copy of `len` bytes from device address `src` to host address `dst`.
    ///
    /// # Safety
    /// Both ranges are valid for the copy until it has run on `stream`.
    unsafe fn copy_dtoh(
        &self,
        stream: *mut c_void,
        dst: *mut u8,
        src: u64,
        len: usize,
    ) -> Result<(), String>;

    /// Enqueues a copy of `len` bytes from host address `src` to device address `dst`.
    ///
    /// # Safety
    /// As [`StreamOps::copy_dtoh`].
    unsafe fn copy_htod(
        &self,
        stream: *mut c_void,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), String>;

    /// Enqueues a copy of `len` bytes between device addresses.
    ///
    /// # Safety
    /// As [`StreamOps::copy_dtoh`].
    unsafe fn copy_dtod(
        &self,
        stream: *mut c_void,
        dst: u64,
        src: u64,
        len: usize,
    ) -> Result<(), String>;

    /// Whether a CUDA-aware library can hand the device memory at `ptr` to another process as it
    /// is (CUDA IPC, `cuIpcGetMemHandle`): true for `cuMemAlloc` memory, false for memory of
    /// CUDA's stream-ordered pool (`cuMemAllocAsync`) or of the virtual memory API, which UCX's
    /// `cuda_ipc` refuses (UCX then falls back to protocols that fail between processes sharing a
    /// GPU). A failed query answers false.
    ///
    /// # Safety
    /// `stream` is a live stream of this kind.
    unsafe fn ipc_capable(&self, stream: *mut c_void, ptr: u64) -> bool;

    /// Allocates `len` (> 0) bytes of device memory outside any stream-ordered pool (IPC-capable),
    /// on `stream`'s device.
    ///
    /// # Safety
    /// `stream` is a live stream of this kind.
    unsafe fn alloc_device(&self, stream: *mut c_void, len: usize) -> Result<u64, String>;

    /// Frees memory from [`StreamOps::alloc_device`]; `ctx` is the context of the stream it was
    /// allocated on ([`StreamOps::context_of`]).
    ///
    /// # Safety
    /// `ptr` came from `alloc_device` of this object with `len`, and no enqueued work uses it any
    /// more.
    unsafe fn free_device(&self, ctx: usize, ptr: u64, len: usize);

    /// Allocates `len` (> 0) bytes of pinned host memory usable by copies on `stream`'s device.
    ///
    /// # Safety
    /// `stream` is a live stream of this kind.
    unsafe fn alloc_pinned(&self, stream: *mut c_void, len: usize) -> Result<*mut u8, String>;

    /// Frees memory from [`StreamOps::alloc_pinned`].
    ///
    /// # Safety
    /// `ptr` came from `alloc_pinned` of this object with `len`, and no enqueued work uses it any
    /// more.
    unsafe fn free_pinned(&self, ptr: *mut u8, len: usize);

    /// Allocates `count` (> 0) completion flags, all 0: consecutive 32-bit words of pinned host
    /// memory mapped for `stream`'s device (and usable from every context); returns the first.
    ///
    /// # Safety
    /// `stream` is a live stream of this kind.
    unsafe fn alloc_flags(&self, stream: *mut c_void, count: usize) -> Result<Flag, String>;

    /// Frees flags from [`StreamOps::alloc_flags`].
    ///
    /// # Safety
    /// `first` and `count` came from one `alloc_flags` of this object, and no enqueued work uses
    /// the flags any more.
    unsafe fn free_flags(&self, first: Flag, count: usize);

    /// Enqueues a wait: what is enqueued after it on `stream` starts only once `flag` reads 1.
    ///
    /// # Safety
    /// `stream` is a live stream of this kind; the flag stays allocated until the wait has run.
    unsafe fn wait_flag(&self, stream: *mut c_void, flag: Flag) -> Result<(), String>;

    /// Enqueues a write of [`FLAG_DONE`] into `flag`: the stream has passed everything of the
    /// exchange enqueued before it (its receive copies included).
    ///
    /// # Safety
    /// As [`StreamOps::wait_flag`].
    unsafe fn finish_flag(&self, stream: *mut c_void, flag: Flag) -> Result<(), String>;

    /// Sets `flag` to 1 from the host (a release store followed by a full fence, so that what the
    /// host wrote before, e.g. received bytes, is visible to the work the flag releases).
    ///
    /// # Safety
    /// The flag is allocated.
    unsafe fn signal_flag(&self, flag: Flag) {
        // SAFETY: allocated (the caller's promise).
        unsafe { flag.atomic() }.store(1, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// The value of `flag` as the host reads it.
    ///
    /// # Safety
    /// The flag is allocated.
    unsafe fn flag_value(&self, flag: Flag) -> u32 {
        // SAFETY: allocated (the caller's promise).
        unsafe { flag.atomic() }.load(Ordering::Acquire)
    }

    /// Whether `stream` is being captured into a CUDA graph (its host functions then run once per
    /// replay, long after this call).
    ///
    /// # Safety
    /// `stream` is a live stream of this kind.
    unsafe fn is_capturing(&self, stream: *mut c_void) -> Result<bool, String>;

    /// The context of `stream` (an opaque handle for [`StreamOps::bind_context`]) and its device
    /// ordinal.
    ///
    /// # Safety
    /// `stream` is a live stream of this kind.
    unsafe fn context_of(&self, stream: *mut c_void) -> Result<(usize, usize), String>;

    /// Makes the context (from [`StreamOps::context_of`]) current on the calling thread, so that
    /// a CUDA-aware library called from it finds the device memory's context.
    ///
    /// # Safety
    /// `ctx` came from [`StreamOps::context_of`] of this object and is still alive.
    unsafe fn bind_context(&self, ctx: usize) -> Result<(), String>;

    /// Takes a reference on `ctx` when it is the primary context of device `ordinal`, so that
    /// the context, and the flags and buffers the engine allocated in it, outlive whatever else
    /// releases it first (a program may drop its CUDA context before its transport). True when
    /// a reference was taken; [`StreamOps::release_context`] drops it.
    ///
    /// # Safety
    /// `ctx` and `ordinal` came from [`StreamOps::context_of`] of this object.
    unsafe fn hold_context(&self, _ctx: usize, _ordinal: usize) -> Result<bool, String> {
        Ok(false)
    }

    /// Drops the reference [`StreamOps::hold_context`] took.
    ///
    /// # Safety
    /// Once per reference taken, after the engine freed what it allocated in the context.
    unsafe fn release_context(&self, _ordinal: usize) {}
}

/// The stream operations for `streams`, or `None` when this build has none (CUDA streams without
/// the `cuda` feature).
#[cfg(any(feature = "mpi", feature = "ucx"))]
pub(crate) fn stream_ops(streams: DeviceStreams) -> Option<std::sync::Arc<dyn StreamOps>> {
    match streams {
        DeviceStreams::Host => Some(std::sync::Arc::new(host::HostStreams)),
        #[cfg(feature = "cuda")]
        DeviceStreams::Cuda => Some(std::sync::Arc::new(cuda::CudaStreams)),
        #[cfg(not(feature = "cuda"))]
        DeviceStreams::Cuda => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_spellings_round_trip_and_bad_ones_are_named() {
        for c in [
            DeviceComm::Auto,
            DeviceComm::CudaAware,
            DeviceComm::Staged,
            DeviceComm::Host,
        ] {
            assert_eq!(c.name().parse::<DeviceComm>(), Ok(c));
        }
        assert_eq!(" Staged ".parse::<DeviceComm>(), Ok(DeviceComm::Staged));
        let e = "nvlink".parse::<DeviceComm>().unwrap_err();
        assert!(e.contains("\"nvlink\"") && e.contains("cuda-aware"), "{e}");
    }

    #[test]
    fn wait_modes_parse_and_bad_values_name_the_variable() {
        for w in [DeviceWait::Stream, DeviceWait::HostFn] {
            assert_eq!(w.name().parse::<DeviceWait>(), Ok(w));
            assert_eq!(DeviceWait::from_value(Some(w.name())), Ok(w));
        }
        assert_eq!(DeviceWait::from_value(None), Ok(DeviceWait::Stream));
        assert_eq!(DeviceWait::from_value(Some(" ")), Ok(DeviceWait::Stream));
        assert_eq!(
            DeviceWait::from_value(Some(" Host-Fn ")),
            Ok(DeviceWait::HostFn)
        );
        let e = DeviceWait::from_value(Some("event")).unwrap_err();
        assert!(
            e.starts_with("PCPP_DEVICE_WAIT=event: ") && e.contains("host-fn"),
            "{e}"
        );
    }

    #[test]
    fn auto_follows_the_library_and_forcing_overrides_it() {
        assert_eq!(DeviceComm::Auto.resolve(true), Some(DevicePath::CudaAware));
        assert_eq!(DeviceComm::Auto.resolve(false), Some(DevicePath::Staged));
        assert_eq!(DeviceComm::Staged.resolve(true), Some(DevicePath::Staged));
        assert_eq!(
            DeviceComm::CudaAware.resolve(false),
            Some(DevicePath::CudaAware)
        );
        assert_eq!(DeviceComm::Host.resolve(true), None);
    }
}
