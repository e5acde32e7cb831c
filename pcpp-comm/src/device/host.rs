//! [`HostStream`]: a stream whose work runs in order on its own thread and whose "device" memory
//! is host memory, with [`HostStreams`], the [`StreamOps`] over it. It runs the device exchange
//! engine of MPI and UCX (PCPP §7.4's communication stream) without a GPU, so the device-memory
//! conformance cases and the engine's tests run on any machine; a device address is then simply a
//! host address, and a stream's wait on a completion flag is its thread polling the flag.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{Flag, HostFn, StreamOps};
use crate::backoff::Backoff;

type Job = Box<dyn FnOnce() + Send>;

/// Raw pointers handed to a stream's thread; the [`StreamOps`] contracts keep them valid.
struct SendPtr(*mut c_void);
// SAFETY: only moved to the stream's thread, which uses it under the caller's validity promise.
unsafe impl Send for SendPtr {}

/// An in-order work queue on its own thread (the CPU twin of a CUDA stream).
pub struct HostStream {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for HostStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostStream")
    }
}

impl HostStream {
    /// A new stream with its thread.
    pub fn new() -> Arc<HostStream> {
        let (tx, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("pcpp-host-stream".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawning a host stream thread");
        Arc::new(HostStream {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The handle to pass as the `stream` of [`crate::DeviceP2p::enqueue`] (with a transport
    /// whose device streams are [`super::DeviceStreams::Host`]); valid while `self` lives.
    pub fn raw(&self) -> *mut c_void {
        (self as *const HostStream).cast_mut().cast()
    }

    /// Enqueues `job`.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), String> {
        let tx = self.tx.lock().map_err(|_| "host stream poisoned")?;
        tx.as_ref()
            .ok_or("host stream closed")?
            .send(Box::new(job))
            .map_err(|_| "host stream thread ended".to_string())
    }

    /// Waits until everything enqueued so far has run.
    pub fn synchronize(&self) -> Result<(), String> {
        let (tx, rx) = channel();
        self.submit(move || {
            let _ = tx.send(());
        })?;
        rx.recv()
            .map_err(|_| "host stream thread ended".to_string())
    }
}

impl Drop for HostStream {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// [`StreamOps`] on [`HostStream`]s; device addresses are host addresses.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostStreams;

/// The stream behind a raw handle from [`HostStream::raw`].
///
/// # Safety
/// `stream` came from [`HostStream::raw`] of a live stream.
unsafe fn stream<'a>(stream: *mut c_void) -> Result<&'a HostStream, String> {
    if stream.is_null() {
        return Err("null host stream".into());
    }
    // SAFETY: guaranteed by the caller.
    Ok(unsafe { &*(stream as *const HostStream) })
}

impl StreamOps for HostStreams {
    fn device_memory(&self) -> bool {
        false
    }

    unsafe fn launch_host_fn(
        &self,
        s: *mut c_void,
        f: HostFn,
        data: *mut c_void,
    ) -> Result<(), String> {
        let data = SendPtr(data);
        // SAFETY: the caller passes a live stream.
        unsafe { stream(s) }?.submit(move || {
            let d = data;
            // SAFETY: the caller keeps `data` valid until `f` has run.
            unsafe { f(d.0) }
        })
    }

    unsafe fn copy_dtoh(
        &self,
        s: *mut c_void,
        dst: *mut u8,
        src: u64,
        len: usize,
    ) -> Result<(), String> {
        let (d, src) = (SendPtr(dst.cast()), SendPtr(src as *mut c_void));
        // SAFETY: the caller passes a live stream.
        unsafe { stream(s) }?.submit(move || {
            let (d, src) = (d, src);
            // SAFETY: both ranges are valid until the copy has run (the caller's promise), and
            // a device address is a host address here.
            unsafe { std::ptr::copy(src.0.cast::<u8>(), d.0.cast::<u8>(), len) }
        })
    }

    unsafe fn copy_htod(
        &self,
        s: *mut c_void,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: the same copy in the other direction.
        unsafe { self.copy_dtoh(s, dst as *mut u8, src as u64, len) }
    }

    unsafe fn copy_dtod(
        &self,
        s: *mut c_void,
        dst: u64,
        src: u64,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: the same copy, between two "device" (host) addresses.
        unsafe { self.copy_dtoh(s, dst as *mut u8, src, len) }
    }

    unsafe fn ipc_capable(&self, _s: *mut c_void, _ptr: u64) -> bool {
        true
    }

    unsafe fn alloc_device(&self, s: *mut c_void, len: usize) -> Result<u64, String> {
        // SAFETY: "device" memory is host memory here.
        unsafe { self.alloc_pinned(s, len) }.map(|p| p as u64)
    }

    unsafe fn free_device(&self, _ctx: usize, ptr: u64, len: usize) {
        // SAFETY: made by `alloc_device`, i.e. `alloc_pinned`, with `len`.
        unsafe { self.free_pinned(ptr as *mut u8, len) }
    }

    unsafe fn alloc_pinned(&self, _s: *mut c_void, len: usize) -> Result<*mut u8, String> {
        let b = vec![0u8; len].into_boxed_slice();
        Ok(Box::into_raw(b).cast::<u8>())
    }

    unsafe fn free_pinned(&self, ptr: *mut u8, len: usize) {
        // SAFETY: `ptr` is the boxed slice of `len` bytes made by `alloc_pinned`, freed once.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
    }

    unsafe fn alloc_flags(&self, _s: *mut c_void, count: usize) -> Result<Flag, String> {
        let b: Box<[AtomicU32]> = (0..count).map(|_| AtomicU32::new(0)).collect();
        let host = Box::into_raw(b).cast::<u32>();
        Ok(Flag {
            host,
            dev: host as u64,
        })
    }

    unsafe fn free_flags(&self, first: Flag, count: usize) {
        let p = std::ptr::slice_from_raw_parts_mut(first.host.cast::<AtomicU32>(), count);
        // SAFETY: the boxed slice of `count` flags made by `alloc_flags`, freed once.
        drop(unsafe { Box::from_raw(p) });
    }

    unsafe fn wait_flag(&self, s: *mut c_void, flag: Flag) -> Result<(), String> {
        // SAFETY: the caller passes a live stream.
        unsafe { stream(s) }?.submit(move || {
            let flag = flag;
            let mut backoff = Backoff::default();
            // SAFETY: the flag stays allocated until the wait has run (the caller's promise).
            while unsafe { HostStreams.flag_value(flag) } != 1 {
                backoff.snooze();
            }
        })
    }

    unsafe fn finish_flag(&self, s: *mut c_void, flag: Flag) -> Result<(), String> {
        // SAFETY: the caller passes a live stream.
        unsafe { stream(s) }?.submit(move || {
            let flag = flag;
            // SAFETY: allocated until the write has run (the caller's promise); an aligned word
            // only accessed atomically.
            unsafe { AtomicU32::from_ptr(flag.host) }.store(super::FLAG_DONE, Ordering::Release)
        })
    }

    unsafe fn is_capturing(&self, _s: *mut c_void) -> Result<bool, String> {
        Ok(false)
    }

    unsafe fn context_of(&self, s: *mut c_void) -> Result<(usize, usize), String> {
        // SAFETY: the caller passes a live stream.
        unsafe { stream(s) }.map(|_| (0, 0))
    }

    unsafe fn bind_context(&self, _ctx: usize) -> Result<(), String> {
        Ok(())
    }
}
