//! Checked layer of the UCX back-end: owning handles for the UCP context,
//! worker, endpoints and requests over the raw [`super::ffi`] bindings.
//!
//! Each handle frees its UCP object exactly once in `Drop`; every UCP status
//! becomes a [`Status`] with UCX's own message. What remains `unsafe` here is
//! what the caller must promise about buffer lifetimes while a request is in
//! flight; [`super::UcxTransport`] (the safe layer carrying PCPP's halo, K/V
//! and statistics traffic, pcpp-algorithm.md §2-§3) keeps that promise.
//!
//! None of these types is thread-safe on its own: the worker runs in
//! `UCS_THREAD_MODE_SERIALIZED` and the safe layer serialises every call
//! through one mutex per world.

use std::ffi::{CStr, CString};
use std::os::raw::c_void;
use std::ptr;
use std::sync::Arc;

use super::ffi;

/// A UCS status code that is not `UCS_OK` / `UCS_INPROGRESS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub ffi::ucs_status_t);

impl Status {
    /// Whether the status means the message was longer than the buffer.
    pub fn is_truncated(self) -> bool {
        self.0 == ffi::UCS_ERR_MESSAGE_TRUNCATED
    }

    /// Whether the operation was cancelled.
    pub fn is_canceled(self) -> bool {
        self.0 == ffi::UCS_ERR_CANCELED
    }

    /// Whether the feature is not supported by the selected transports.
    pub fn is_unsupported(self) -> bool {
        self.0 == ffi::UCS_ERR_UNSUPPORTED
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: ucs_status_string returns a pointer to a static,
        // NUL-terminated string for every status value.
        let msg = unsafe { ucs_str(ffi::ucs_status_string(self.0)) };
        write!(f, "{msg} (UCS status {})", self.0)
    }
}

/// Converts a NUL-terminated C string to an owned `String`.
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string alive for the call.
unsafe fn ucs_str(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return "unknown".into();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn check(s: ffi::ucs_status_t) -> Result<(), Status> {
    if s == ffi::UCS_OK {
        Ok(())
    } else {
        Err(Status(s))
    }
}

/// The version of the UCX library loaded at run time, e.g. `1.13.1`.
pub fn version() -> String {
    // SAFETY: returns a static NUL-terminated string.
    unsafe { ucs_str(ffi::ucp_get_version_string()) }
}

/// The memory type told to UCX for a buffer of host memory or (`cuda`) CUDA device memory.
fn memory_type(cuda: bool) -> ffi::ucs_memory_type_t {
    if cuda {
        ffi::UCS_MEMORY_TYPE_CUDA
    } else {
        ffi::UCS_MEMORY_TYPE_HOST
    }
}

/// Outcome of a nonblocking UCP call (`ucs_status_ptr_t`).
#[derive(Debug)]
pub enum Posted {
    /// Completed immediately; no request was allocated.
    Done,
    /// In flight: poll the request.
    InFlight(Request),
}

fn decode_ptr(p: ffi::ucs_status_ptr_t) -> Result<Posted, Status> {
    let v = p as isize;
    if p.is_null() {
        Ok(Posted::Done)
    } else if v < 0 && v >= ffi::UCS_ERR_LAST as isize {
        // UCS_PTR_IS_ERR: error codes are encoded as small negative pointers.
        Err(Status(v as ffi::ucs_status_t))
    } else {
        Ok(Posted::InFlight(Request { raw: p }))
    }
}

/// A UCP application context with the tag-matching feature.
#[derive(Debug)]
pub struct Context {
    raw: ffi::ucp_context_h,
}

// SAFETY: a UCP context is used only to create workers and to be cleaned up;
// both happen under the safe layer's serialisation.
unsafe impl Send for Context {}
// SAFETY: see `Send`.
unsafe impl Sync for Context {}

impl Context {
    /// Reads the `UCX_*` environment configuration and initialises UCP with
    /// `UCP_FEATURE_TAG`. `tls`, when given, replaces the transport list (`UCX_TLS`'s syntax).
    pub fn new(estimated_eps: usize, tls: Option<&str>) -> Result<Arc<Context>, Status> {
        let mut config: *mut ffi::ucp_config_t = ptr::null_mut();
        // SAFETY: null prefix and file name select the defaults; `config` is a
        // valid out-pointer.
        check(unsafe { ffi::ucp_config_read(ptr::null(), ptr::null(), &mut config) })?;
        if let Some(tls) = tls {
            let value = CString::new(tls).map_err(|_| Status(ffi::UCS_ERR_INVALID_PARAM))?;
            // SAFETY: `config` is live; both strings are NUL-terminated and outlive the call.
            let rc = unsafe { ffi::ucp_config_modify(config, c"TLS".as_ptr(), value.as_ptr()) };
            if rc != ffi::UCS_OK {
                // SAFETY: `config` came from ucp_config_read and is released once.
                unsafe { ffi::ucp_config_release(config) };
                return Err(Status(rc));
            }
        }
        let params = ffi::ucp_params_t {
            field_mask: u64::from(
                ffi::UCP_PARAM_FIELD_FEATURES | ffi::UCP_PARAM_FIELD_ESTIMATED_NUM_EPS,
            ),
            features: u64::from(ffi::UCP_FEATURE_TAG),
            estimated_num_eps: estimated_eps,
            ..Default::default()
        };
        let mut raw: ffi::ucp_context_h = ptr::null_mut();
        // SAFETY: `params` and `config` are valid for the call; `raw` is a
        // valid out-pointer. The API version is the one the bindings were
        // generated from (what the `ucp_init` macro passes).
        let rc = unsafe {
            ffi::ucp_init_version(
                ffi::UCP_API_MAJOR,
                ffi::UCP_API_MINOR,
                &params,
                config,
                &mut raw,
            )
        };
        // SAFETY: `config` came from ucp_config_read and is released once.
        unsafe { ffi::ucp_config_release(config) };
        check(rc)?;
        Ok(Arc::new(Context { raw }))
    }

    /// Whether the transports UCX loaded move CUDA device memory (`UCS_MEMORY_TYPE_CUDA` among
    /// the context's memory types: the `cuda_copy` / `cuda_ipc` modules of a CUDA-enabled build).
    pub fn supports_cuda(&self) -> bool {
        let mut attr = ffi::ucp_context_attr_t {
            field_mask: u64::from(ffi::UCP_ATTR_FIELD_MEMORY_TYPES),
            ..Default::default()
        };
        // SAFETY: live context; `attr` is a valid in/out struct.
        let rc = unsafe { ffi::ucp_context_query(self.raw, &mut attr) };
        rc == ffi::UCS_OK && attr.memory_types & (1u64 << ffi::UCS_MEMORY_TYPE_CUDA) != 0
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context was created by ucp_init_version and every worker
        // holds an `Arc<Context>`, so none is alive any more.
        unsafe { ffi::ucp_cleanup(self.raw) };
    }
}

/// A UCP worker (progress engine and tag-matching queue) in serialised
/// thread mode.
#[derive(Debug)]
pub struct Worker {
    raw: ffi::ucp_worker_h,
    _ctx: Arc<Context>,
}

// SAFETY: the worker is created in UCS_THREAD_MODE_SERIALIZED, which allows
// use from any thread as long as calls do not overlap; the safe layer holds a
// mutex around every call.
unsafe impl Send for Worker {}

impl Worker {
    /// Creates a worker on `ctx`.
    pub fn new(ctx: &Arc<Context>) -> Result<Worker, Status> {
        let params = ffi::ucp_worker_params_t {
            field_mask: u64::from(ffi::UCP_WORKER_PARAM_FIELD_THREAD_MODE),
            thread_mode: ffi::UCS_THREAD_MODE_SERIALIZED,
            ..Default::default()
        };
        let mut raw: ffi::ucp_worker_h = ptr::null_mut();
        // SAFETY: valid context, params and out-pointer.
        check(unsafe { ffi::ucp_worker_create(ctx.raw, &params, &mut raw) })?;
        Ok(Worker {
            raw,
            _ctx: ctx.clone(),
        })
    }

    /// The worker's address, to be given to the peers.
    pub fn address(&self) -> Result<Vec<u8>, Status> {
        let mut addr: *mut ffi::ucp_address_t = ptr::null_mut();
        let mut len: usize = 0;
        // SAFETY: valid worker and out-pointers.
        check(unsafe { ffi::ucp_worker_get_address(self.raw, &mut addr, &mut len) })?;
        // SAFETY: UCP returned `len` readable bytes at `addr`.
        let bytes = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), len) }.to_vec();
        // SAFETY: `addr` came from ucp_worker_get_address on this worker.
        unsafe { ffi::ucp_worker_release_address(self.raw, addr) };
        Ok(bytes)
    }

    /// Runs one round of progress; returns how many events were processed.
    pub fn progress(&self) -> u32 {
        // SAFETY: valid worker.
        unsafe { ffi::ucp_worker_progress(self.raw) }
    }

    /// Posts a tagged send of `len` bytes at `buf` to `ep`.
    ///
    /// # Safety
    /// `buf` must stay valid and unmodified until the returned request
    /// completes (or forever if the request is freed before completion).
    pub unsafe fn tag_send(
        &self,
        ep: &Endpoint,
        buf: *const u8,
        len: usize,
        tag: u64,
    ) -> Result<Posted, Status> {
        // SAFETY: the caller's promise, host memory.
        unsafe { self.tag_send_mem(ep, buf, len, tag, false) }
    }

    /// [`Worker::tag_send`] of host memory or, with `cuda`, of CUDA device memory. The memory
    /// type is always given (`UCS_MEMORY_TYPE_HOST` or `UCS_MEMORY_TYPE_CUDA`), so UCX never
    /// looks the pointer up: with a CUDA-enabled UCX that lookup calls into the CUDA driver
    /// (memory type cache misses, `cuPointerGetAttributes`), which the communication thread of
    /// the staged device path must not do while a host function of its stream waits for it.
    ///
    /// # Safety
    /// As [`Worker::tag_send`]; with `cuda`, `buf` is device memory of the calling thread's
    /// current CUDA context.
    pub unsafe fn tag_send_mem(
        &self,
        ep: &Endpoint,
        buf: *const u8,
        len: usize,
        tag: u64,
        cuda: bool,
    ) -> Result<Posted, Status> {
        let param = ffi::ucp_request_param_t {
            op_attr_mask: ffi::UCP_OP_ATTR_FIELD_MEMORY_TYPE,
            memory_type: memory_type(cuda),
            ..Default::default()
        };
        // SAFETY: valid endpoint; buffer validity is the caller's promise;
        // the params select contiguous bytes and no callback.
        decode_ptr(unsafe { ffi::ucp_tag_send_nbx(ep.raw, buf.cast(), len, tag, &param) })
    }

    /// Posts a tagged receive of up to `len` bytes into `buf` matching
    /// `tag` under `mask`. When it completes immediately, `info` is filled.
    ///
    /// # Safety
    /// `buf` (`len` bytes) and `info` must stay valid and untouched until the
    /// returned request completes or is cancelled and observed complete.
    pub unsafe fn tag_recv(
        &self,
        buf: *mut u8,
        len: usize,
        tag: u64,
        mask: u64,
        info: *mut ffi::ucp_tag_recv_info_t,
    ) -> Result<Posted, Status> {
        // SAFETY: the caller's promise, host memory.
        unsafe { self.tag_recv_mem(buf, len, tag, mask, info, false) }
    }

    /// [`Worker::tag_recv`] into host memory or, with `cuda`, into CUDA device memory (the
    /// memory type always given, as in [`Worker::tag_send_mem`]).
    ///
    /// # Safety
    /// As [`Worker::tag_recv`]; with `cuda`, `buf` is device memory of the calling thread's
    /// current CUDA context.
    pub unsafe fn tag_recv_mem(
        &self,
        buf: *mut u8,
        len: usize,
        tag: u64,
        mask: u64,
        info: *mut ffi::ucp_tag_recv_info_t,
        cuda: bool,
    ) -> Result<Posted, Status> {
        // Immediate completion is denied: UCX 1.13 does not fill `info` on
        // that path, so the length is read from the request instead.
        let mut param = ffi::ucp_request_param_t {
            op_attr_mask: ffi::UCP_OP_ATTR_FIELD_RECV_INFO
                | ffi::UCP_OP_ATTR_FLAG_NO_IMM_CMPL
                | ffi::UCP_OP_ATTR_FIELD_MEMORY_TYPE,
            memory_type: memory_type(cuda),
            ..Default::default()
        };
        param.recv_info.tag_info = info;
        // SAFETY: valid worker; buffer and info validity is the caller's
        // promise.
        decode_ptr(unsafe { ffi::ucp_tag_recv_nbx(self.raw, buf.cast(), len, tag, mask, &param) })
    }

    /// Asks UCP to cancel an in-flight receive; it completes (with
    /// `UCS_ERR_CANCELED` or with data) after further progress.
    pub fn cancel(&self, req: &Request) {
        // SAFETY: `req` is a live request of this worker.
        unsafe { ffi::ucp_request_cancel(self.raw, req.raw) };
    }

    /// Starts flushing every outstanding operation of the worker.
    pub fn flush(&self) -> Result<Posted, Status> {
        let param = ffi::ucp_request_param_t::default();
        // SAFETY: valid worker and params.
        decode_ptr(unsafe { ffi::ucp_worker_flush_nbx(self.raw, &param) })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: created by ucp_worker_create; the safe layer closes every
        // endpoint before dropping the worker.
        unsafe { ffi::ucp_worker_destroy(self.raw) };
    }
}

/// Error-handling mode of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrMode {
    /// Peer failures complete requests with an error and call the handler.
    Peer,
    /// No failure detection (for transports that do not support it).
    None,
}

/// Callback UCP calls (during progress) when an endpoint fails.
pub type ErrHandler =
    unsafe extern "C" fn(arg: *mut c_void, ep: ffi::ucp_ep_h, status: ffi::ucs_status_t);

/// A connection from a worker to one peer worker.
#[derive(Debug)]
pub struct Endpoint {
    raw: ffi::ucp_ep_h,
}

// SAFETY: an endpoint is only used under the safe layer's world mutex.
unsafe impl Send for Endpoint {}

impl Endpoint {
    /// Connects `worker` to the worker whose address is `addr`.
    ///
    /// # Safety
    /// With [`ErrMode::Peer`], `arg` must stay valid until the endpoint is
    /// closed (`handler` may be called with it during any progress call).
    pub unsafe fn create(
        worker: &Worker,
        addr: &[u8],
        mode: ErrMode,
        handler: ErrHandler,
        arg: *mut c_void,
    ) -> Result<Endpoint, Status> {
        let mut params = ffi::ucp_ep_params_t {
            field_mask: u64::from(ffi::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS),
            address: addr.as_ptr().cast(),
            ..Default::default()
        };
        if mode == ErrMode::Peer {
            params.field_mask |= u64::from(
                ffi::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | ffi::UCP_EP_PARAM_FIELD_ERR_HANDLER,
            );
            params.err_mode = ffi::UCP_ERR_HANDLING_MODE_PEER;
            params.err_handler = ffi::ucp_err_handler_t {
                cb: Some(handler),
                arg,
            };
        }
        let mut raw: ffi::ucp_ep_h = ptr::null_mut();
        // SAFETY: valid worker; `addr` is a worker address blob read by UCP
        // during the call; `raw` is a valid out-pointer.
        check(unsafe { ffi::ucp_ep_create(worker.raw, &params, &mut raw) })?;
        Ok(Endpoint { raw })
    }

    /// Starts closing the endpoint (flushing it unless `force`); the caller
    /// progresses the worker until the returned request completes.
    pub fn close(self, force: bool) -> Result<Posted, Status> {
        let mut param = ffi::ucp_request_param_t::default();
        if force {
            param.op_attr_mask = ffi::UCP_OP_ATTR_FIELD_FLAGS;
            param.flags = ffi::UCP_EP_CLOSE_FLAG_FORCE;
        }
        // SAFETY: the endpoint is live and consumed here, so it is closed once.
        decode_ptr(unsafe { ffi::ucp_ep_close_nbx(self.raw, &param) })
    }
}

/// An in-flight UCP request. Dropping it frees it: if it has not completed,
/// UCP keeps running it and releases it on completion, so its buffers must be
/// kept alive by the owner (see [`Worker::tag_send`]).
#[derive(Debug)]
pub struct Request {
    raw: *mut c_void,
}

// SAFETY: a request handle is only used under the safe layer's world mutex.
unsafe impl Send for Request {}

impl Request {
    /// `Ok(true)` when complete, `Ok(false)` while in progress, or the error
    /// the operation completed with.
    pub fn check(&self) -> Result<bool, Status> {
        // SAFETY: the request is live (not yet freed).
        let s = unsafe { ffi::ucp_request_check_status(self.raw) };
        match s {
            ffi::UCS_INPROGRESS => Ok(false),
            ffi::UCS_OK => Ok(true),
            e => Err(Status(e)),
        }
    }

    /// Like [`Request::check`] for a tagged receive, also returning the
    /// received length when complete.
    pub fn check_recv(&self) -> Result<Option<usize>, Status> {
        let mut info = ffi::ucp_tag_recv_info_t::default();
        // SAFETY: the request is a live tagged receive; `info` is valid.
        let s = unsafe { ffi::ucp_tag_recv_request_test(self.raw, &mut info) };
        match s {
            ffi::UCS_INPROGRESS => Ok(None),
            ffi::UCS_OK => Ok(Some(info.length)),
            e => Err(Status(e)),
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // SAFETY: the request was returned by a UCP nbx call and is freed once.
        unsafe { ffi::ucp_request_free(self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_pointers_decode() {
        assert!(matches!(decode_ptr(ptr::null_mut()), Ok(Posted::Done)));
        let e = decode_ptr(ffi::UCS_ERR_MESSAGE_TRUNCATED as isize as *mut c_void).unwrap_err();
        assert!(e.is_truncated());
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn context_worker_and_address() {
        let ctx = Context::new(1, None).unwrap();
        let w = Worker::new(&ctx).unwrap();
        let a = w.address().unwrap();
        assert!(!a.is_empty());
        assert!(version().starts_with('1'), "{}", version());
    }
}
