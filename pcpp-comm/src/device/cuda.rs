//! [`CudaStreams`]: the [`StreamOps`] of the MPI / UCX device exchanges (PCPP §7.4's
//! communication stream) on real CUDA streams, through the driver API of `cudarc` (loaded at run
//! time, so building needs no CUDA toolkit).

use std::ffi::c_void;

use cudarc::driver::sys;

use super::{Flag, HostFn, StreamOps};

/// [`StreamOps`] on CUDA streams (`CUstream`) and device memory (`CUdeviceptr`).
#[derive(Debug, Default, Clone, Copy)]
pub struct CudaStreams;

fn ok(what: &str, r: sys::CUresult) -> Result<(), String> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

/// Runs `f` with `stream`'s context pushed on the calling thread.
///
/// # Safety
/// `stream` is a live CUDA stream.
unsafe fn in_context<T>(
    stream: *mut c_void,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: live stream, valid out-pointer.
    ok("cuStreamGetCtx", unsafe {
        sys::cuStreamGetCtx(stream as sys::CUstream, &mut ctx)
    })?;
    // SAFETY: `ctx` is the live context of the stream.
    ok("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(ctx) })?;
    let r = f();
    let mut popped: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: pops the context pushed above.
    let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    r
}

impl StreamOps for CudaStreams {
    fn device_memory(&self) -> bool {
        true
    }

    unsafe fn launch_host_fn(
        &self,
        s: *mut c_void,
        f: HostFn,
        data: *mut c_void,
    ) -> Result<(), String> {
        // SAFETY: live stream; `data` stays valid until `f` has run (the caller's promise).
        unsafe {
            in_context(s, || {
                ok(
                    "cuLaunchHostFunc",
                    sys::cuLaunchHostFunc(s as sys::CUstream, Some(f), data),
                )
            })
        }
    }

    unsafe fn copy_dtoh(
        &self,
        s: *mut c_void,
        dst: *mut u8,
        src: u64,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: both ranges valid until the copy has run (the caller's promise); with a
        // pinned `dst` the copy is asynchronous and may be captured. Every stream operation runs
        // with the stream's context pushed, so callers need not have it current.
        unsafe {
            in_context(s, || {
                ok(
                    "cuMemcpyDtoHAsync",
                    sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, len, s as sys::CUstream),
                )
            })
        }
    }

    unsafe fn copy_htod(
        &self,
        s: *mut c_void,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: as `copy_dtoh`.
        unsafe {
            in_context(s, || {
                ok(
                    "cuMemcpyHtoDAsync",
                    sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), len, s as sys::CUstream),
                )
            })
        }
    }

    unsafe fn copy_dtod(
        &self,
        s: *mut c_void,
        dst: u64,
        src: u64,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: as `copy_dtoh`.
        unsafe {
            in_context(s, || {
                ok(
                    "cuMemcpyDtoDAsync",
                    sys::cuMemcpyDtoDAsync_v2(dst, src, len, s as sys::CUstream),
                )
            })
        }
    }

    unsafe fn ipc_capable(&self, s: *mut c_void, ptr: u64) -> bool {
        // SAFETY: live stream; the attribute is an int written through a valid out-pointer.
        unsafe {
            in_context(s, || {
                let mut v: std::ffi::c_int = 0;
                ok(
                    "cuPointerGetAttribute",
                    sys::cuPointerGetAttribute(
                        (&mut v as *mut std::ffi::c_int).cast(),
                        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                        ptr,
                    ),
                )?;
                Ok(v != 0)
            })
        }
        .unwrap_or(false)
    }

    unsafe fn alloc_device(&self, s: *mut c_void, len: usize) -> Result<u64, String> {
        // SAFETY: live stream; cuMemAlloc (not the stream-ordered pool), so CUDA IPC can share it.
        unsafe {
            in_context(s, || {
                let mut p: sys::CUdeviceptr = 0;
                ok(
                    &format!("cuMemAlloc of {len} bytes"),
                    sys::cuMemAlloc_v2(&mut p, len),
                )?;
                Ok(p)
            })
        }
    }

    unsafe fn free_device(&self, ctx: usize, ptr: u64, _len: usize) {
        // SAFETY: `ctx` is the live context `ptr` was allocated in, and `ptr` came from
        // cuMemAlloc and is freed once.
        unsafe {
            if ctx != 0
                && sys::cuCtxPushCurrent_v2(ctx as sys::CUcontext) == sys::CUresult::CUDA_SUCCESS
            {
                let _ = sys::cuMemFree_v2(ptr);
                let mut popped: sys::CUcontext = std::ptr::null_mut();
                let _ = sys::cuCtxPopCurrent_v2(&mut popped);
            } else {
                let _ = sys::cuMemFree_v2(ptr);
            }
        }
    }

    unsafe fn alloc_pinned(&self, s: *mut c_void, len: usize) -> Result<*mut u8, String> {
        // SAFETY: live stream.
        unsafe {
            in_context(s, || {
                let mut p: *mut c_void = std::ptr::null_mut();
                ok(
                    &format!("cuMemHostAlloc of {len} bytes"),
                    sys::cuMemHostAlloc(&mut p, len, sys::CU_MEMHOSTALLOC_PORTABLE),
                )?;
                Ok(p.cast::<u8>())
            })
        }
    }

    unsafe fn free_pinned(&self, ptr: *mut u8, _len: usize) {
        // SAFETY: `ptr` came from cuMemHostAlloc and is freed once.
        let _ = unsafe { sys::cuMemFreeHost(ptr.cast()) };
    }

    unsafe fn alloc_flags(&self, s: *mut c_void, count: usize) -> Result<Flag, String> {
        let len = count * std::mem::size_of::<u32>();
        // SAFETY: live stream; the block is mapped into the device's address space (DEVICEMAP)
        // for every context (PORTABLE), and zeroed before its device address is handed out.
        unsafe {
            in_context(s, || {
                let mut p: *mut c_void = std::ptr::null_mut();
                ok(
                    &format!("cuMemHostAlloc of {count} completion flags"),
                    sys::cuMemHostAlloc(
                        &mut p,
                        len,
                        sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
                    ),
                )?;
                std::ptr::write_bytes(p.cast::<u8>(), 0, len);
                let mut dev: sys::CUdeviceptr = 0;
                let r = ok(
                    "cuMemHostGetDevicePointer of the completion flags",
                    sys::cuMemHostGetDevicePointer_v2(&mut dev, p, 0),
                );
                if let Err(e) = r {
                    let _ = sys::cuMemFreeHost(p);
                    return Err(e);
                }
                Ok(Flag {
                    host: p.cast::<u32>(),
                    dev,
                })
            })
        }
    }

    unsafe fn free_flags(&self, first: Flag, _count: usize) {
        // SAFETY: `first.host` is the start of a block from cuMemHostAlloc, freed once.
        let _ = unsafe { sys::cuMemFreeHost(first.host.cast()) };
    }

    unsafe fn wait_flag(&self, s: *mut c_void, flag: Flag) -> Result<(), String> {
        // SAFETY: live stream; the flag stays allocated until the wait has run (the caller's
        // promise). A stream memory operation, legal during capture (a graph replays it).
        unsafe {
            in_context(s, || {
                ok(
                    "cuStreamWaitValue32",
                    sys::cuStreamWaitValue32_v2(
                        s as sys::CUstream,
                        flag.dev,
                        1,
                        sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_EQ as u32,
                    ),
                )
            })
        }
    }

    unsafe fn finish_flag(&self, s: *mut c_void, flag: Flag) -> Result<(), String> {
        // SAFETY: as `wait_flag`.
        unsafe {
            in_context(s, || {
                ok(
                    "cuStreamWriteValue32",
                    sys::cuStreamWriteValue32_v2(
                        s as sys::CUstream,
                        flag.dev,
                        super::FLAG_DONE,
                        sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
                    ),
                )
            })
        }
    }

    unsafe fn is_capturing(&self, s: *mut c_void) -> Result<bool, String> {
        let mut st = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: live stream, valid out-pointer; legal during capture.
        ok("cuStreamIsCapturing", unsafe {
            sys::cuStreamIsCapturing(s as sys::CUstream, &mut st)
        })?;
        Ok(st != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    unsafe fn context_of(&self, s: *mut c_void) -> Result<(usize, usize), String> {
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: live stream, valid out-pointer.
        ok("cuStreamGetCtx", unsafe {
            sys::cuStreamGetCtx(s as sys::CUstream, &mut ctx)
        })?;
        // SAFETY: live stream.
        let dev = unsafe {
            in_context(s, || {
                let mut d: sys::CUdevice = 0;
                ok("cuCtxGetDevice", sys::cuCtxGetDevice(&mut d))?;
                Ok(d)
            })
        }?;
        Ok((ctx as usize, usize::try_from(dev).unwrap_or(0)))
    }

    unsafe fn hold_context(&self, ctx: usize, ordinal: usize) -> Result<bool, String> {
        let dev = i32::try_from(ordinal).map_err(|_| format!("device ordinal {ordinal}"))?;
        let mut primary: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-pointer; a retain is paired with a release below or in
        // `release_context`.
        ok("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut primary, dev)
        })?;
        if primary as usize == ctx {
            return Ok(true);
        }
        // SAFETY: the reference just taken; the stream's context is not the primary one, which
        // the caller then owns itself.
        let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(dev) };
        Ok(false)
    }

    unsafe fn release_context(&self, ordinal: usize) {
        if let Ok(dev) = i32::try_from(ordinal) {
            // SAFETY: a reference from `hold_context` (the caller's promise).
            let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(dev) };
        }
    }

    unsafe fn bind_context(&self, ctx: usize) -> Result<(), String> {
        // SAFETY: `ctx` is a live context from `context_of`.
        ok("cuCtxSetCurrent", unsafe {
            sys::cuCtxSetCurrent(ctx as sys::CUcontext)
        })
    }
}
