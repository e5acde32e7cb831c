//! The pending handle of [`super::MpiTransport`]'s nonblocking operations: its requests, the
//! buffers they read and write (owned here, so they outlive the call that posted them), the
//! `MPI_Test` progress that checks lengths and records statistics, and the drop that cancels
//! unfinished receives and leaks what MPI cannot cancel (see the module notes of
//! [`super`]).

use std::mem::MaybeUninit;
use std::os::raw::c_int;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mpi::ffi;

use super::{check, error_class, error_string, is_finalized, mpi_lock, u8_type};
use crate::backoff::Backoff;
use crate::error::CommError;
use crate::stats::{CommKind, StatsCounter};
use crate::transport::PendingOp;

#[derive(Debug, Clone, Copy)]
pub(super) enum ReqKind {
    Send,
    Recv { expected: usize },
    Collective,
}

pub(super) struct Req {
    pub(super) raw: ffi::MPI_Request,
    pub(super) peer: usize,
    pub(super) kind: ReqKind,
    pub(super) done: bool,
}

pub(super) struct Inner {
    pub(super) reqs: Vec<Req>,
    /// Buffers read by in-flight sends; untouched until the requests complete.
    pub(super) send_bufs: Vec<Vec<u8>>,
    /// Buffers written by in-flight receives; untouched until completion.
    pub(super) recv_bufs: Vec<Vec<u8>>,
    /// Count / displacement arrays of in-flight collectives.
    pub(super) aux: Vec<Vec<c_int>>,
    /// First error seen by `is_complete`, reported by `wait`.
    pub(super) error: Option<CommError>,
}

// SAFETY: `MPI_Request` handles are opaque identifiers usable from any thread;
// every MPI call on them is serialised by MPI_LOCK.
unsafe impl Send for Inner {}

pub(super) struct MpiPending {
    pub(super) inner: Mutex<Inner>,
    pub(super) op: &'static str,
    pub(super) kind: CommKind,
    pub(super) tag: u32,
    pub(super) timeout: Duration,
    pub(super) stats: Arc<StatsCounter>,
}

impl MpiPending {
    pub(super) fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tests every unfinished request once; `Ok(true)` when all are done.
    /// Must be called with MPI_LOCK held.
    pub(super) fn progress(&self, inner: &mut Inner) -> Result<bool, CommError> {
        if let Some(e) = inner.error.take() {
            return Err(e);
        }
        let mut all_done = true;
        for req in inner.reqs.iter_mut().filter(|r| !r.done) {
            let mut flag: c_int = 0;
            let mut status = MaybeUninit::<ffi::MPI_Status>::zeroed();
            // SAFETY: `req.raw` is an active request whose buffers are owned by
            // `inner` and alive; `flag` and `status` are valid out-pointers.
            let rc = unsafe { ffi::MPI_Test(&mut req.raw, &mut flag, status.as_mut_ptr()) };
            if rc != ffi::MPI_SUCCESS as c_int {
                req.done = true;
                return Err(match req.kind {
                    ReqKind::Recv { expected, .. }
                        if error_class(rc) == ffi::MPI_ERR_TRUNCATE as c_int =>
                    {
                        CommError::Truncated {
                            op: self.op,
                            peer: req.peer,
                            tag: self.tag,
                            expected,
                        }
                    }
                    _ => CommError::Backend {
                        op: self.op,
                        peer: req.peer,
                        tag: self.tag,
                        detail: error_string(rc),
                    },
                });
            }
            if flag == 0 {
                all_done = false;
                continue;
            }
            req.done = true;
            if let ReqKind::Recv { expected, .. } = req.kind {
                let mut count: c_int = 0;
                // SAFETY: `status` was filled by the completed MPI_Test.
                let rc = unsafe { ffi::MPI_Get_count(status.as_ptr(), u8_type(), &mut count) };
                check(rc, self.op, req.peer, self.tag)?;
                let actual = usize::try_from(count).unwrap_or(usize::MAX);
                if actual != expected {
                    return Err(CommError::LengthMismatch {
                        op: self.op,
                        peer: req.peer,
                        tag: self.tag,
                        expected,
                        actual,
                    });
                }
                self.stats.record_recv(self.kind, actual);
            }
        }
        Ok(all_done)
    }
}

impl PendingOp for MpiPending {
    fn wait(self: Box<Self>) -> Result<Vec<Vec<u8>>, CommError> {
        let start = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            let done = {
                let _g = mpi_lock();
                let mut inner = self.lock_inner();
                self.progress(&mut inner)?
            };
            if done {
                let mut inner = self.lock_inner();
                let bufs = std::mem::take(&mut inner.recv_bufs);
                return Ok(bufs);
            }
            let waited = start.elapsed();
            if waited >= self.timeout {
                let inner = self.lock_inner();
                let peer = inner.reqs.iter().find(|r| !r.done).map_or(0, |r| r.peer);
                return Err(CommError::Timeout {
                    op: self.op,
                    peer,
                    tag: self.tag,
                    waited,
                });
            }
            backoff.snooze();
        }
    }

    fn is_complete(&self) -> bool {
        let _g = mpi_lock();
        let mut inner = self.lock_inner();
        match self.progress(&mut inner) {
            Ok(done) => done,
            Err(e) => {
                inner.error = Some(e);
                true
            }
        }
    }
}

impl Drop for MpiPending {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        if inner.reqs.iter().all(|r| r.done) || is_finalized() {
            return;
        }
        let _g = mpi_lock();
        let mut leak_sends = false;
        let mut leak_all = false;
        for req in inner.reqs.iter_mut().filter(|r| !r.done) {
            match req.kind {
                ReqKind::Recv { .. } => {
                    // SAFETY: `req.raw` is an active receive; cancelling and
                    // then waiting completes it (cancelled or matched), after
                    // which its buffer is no longer used by MPI.
                    unsafe {
                        ffi::MPI_Cancel(&mut req.raw);
                        ffi::MPI_Wait(&mut req.raw, ffi::RSMPI_STATUS_IGNORE);
                    }
                }
                ReqKind::Send => {
                    // SAFETY: freeing an active send request is allowed; the
                    // send completes in the background and its buffer is
                    // leaked below so it stays valid.
                    unsafe { ffi::MPI_Request_free(&mut req.raw) };
                    leak_sends = true;
                }
                ReqKind::Collective => leak_all = true,
            }
        }
        if leak_sends || leak_all {
            eprintln!(
                "pcpp-comm: {} (tag {}) dropped before completion; leaking its buffers",
                self.op, self.tag
            );
            std::mem::forget(std::mem::take(&mut inner.send_bufs));
        }
        if leak_all {
            std::mem::forget(std::mem::take(&mut inner.recv_bufs));
            std::mem::forget(std::mem::take(&mut inner.aux));
        }
    }
}
