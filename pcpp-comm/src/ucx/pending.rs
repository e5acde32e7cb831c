//! The pending handle of [`super::UcxTransport`]'s nonblocking operations: its tagged sends and
//! receives, the buffers they read and write (owned here, so they outlive the call that posted
//! them), the progress that checks lengths and records statistics, and the drop that cancels
//! unfinished receives and leaves unfinished sends' buffers to the world's orphan list (see the
//! module notes of [`super`]).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::checked::{Request, Status};
use super::{ffi, Orphan, World};
use crate::backoff::Backoff;
use crate::error::CommError;
use crate::stats::{CommKind, StatsCounter};
use crate::transport::PendingOp;

#[derive(Debug, Clone, Copy)]
pub(super) enum OpKind {
    Send { buf: usize },
    Recv { buf: usize, expected: usize },
}

pub(super) struct Op {
    pub(super) req: Option<Request>,
    pub(super) peer: usize,
    pub(super) kind: OpKind,
    pub(super) done: bool,
}

pub(super) struct Inner {
    pub(super) ops: Vec<Op>,
    pub(super) send_bufs: Vec<Vec<u8>>,
    pub(super) recv_bufs: Vec<Vec<u8>>,
    /// Boxed so their addresses, given to UCX, survive the vector growing.
    #[allow(clippy::vec_box)]
    pub(super) infos: Vec<Box<ffi::ucp_tag_recv_info_t>>,
    pub(super) error: Option<CommError>,
}

pub(super) struct UcxPending {
    pub(super) world: Arc<World>,
    pub(super) inner: Mutex<Inner>,
    /// World rank of each rank of the issuing transport.
    pub(super) members: Vec<usize>,
    pub(super) op: &'static str,
    pub(super) kind: CommKind,
    pub(super) tag: u32,
    pub(super) timeout: Duration,
    pub(super) stats: Arc<StatsCounter>,
}

impl UcxPending {
    pub(super) fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks every unfinished request once (world state locked by caller);
    /// `Ok(true)` when all are done.
    pub(super) fn poll(&self, inner: &mut Inner) -> Result<bool, CommError> {
        if let Some(e) = inner.error.take() {
            return Err(e);
        }
        let mut all_done = true;
        for i in 0..inner.ops.len() {
            let op = &mut inner.ops[i];
            if op.done {
                continue;
            }
            let peer = op.peer;
            let backend = |what: &str, s: Status| CommError::Backend {
                op: self.op,
                peer,
                tag: self.tag,
                detail: format!("{what}: {s}"),
            };
            match op.kind {
                OpKind::Send { .. } => match op.req.as_ref().map_or(Ok(true), Request::check) {
                    Ok(false) => all_done = false,
                    Ok(true) => {
                        op.done = true;
                        op.req = None;
                    }
                    Err(s) => {
                        op.done = true;
                        op.req = None;
                        return Err(backend("tagged send", s));
                    }
                },
                OpKind::Recv { buf, expected } => {
                    let state = match &op.req {
                        Some(r) => r.check_recv(),
                        None => Ok(Some(inner.infos[buf].length)),
                    };
                    match state {
                        Ok(None) => all_done = false,
                        Ok(Some(actual)) => {
                            op.done = true;
                            op.req = None;
                            if actual != expected {
                                return Err(CommError::LengthMismatch {
                                    op: self.op,
                                    peer,
                                    tag: self.tag,
                                    expected,
                                    actual,
                                });
                            }
                            self.stats.record_recv(self.kind, actual);
                        }
                        Err(s) => {
                            op.done = true;
                            op.req = None;
                            if s.is_truncated() {
                                return Err(CommError::Truncated {
                                    op: self.op,
                                    peer,
                                    tag: self.tag,
                                    expected,
                                });
                            }
                            return Err(backend("tagged receive", s));
                        }
                    }
                }
            }
        }
        Ok(all_done)
    }

    /// The first unfinished operation's peer whose endpoint has failed.
    pub(super) fn failed_peer(&self, inner: &Inner) -> Option<(usize, Status)> {
        inner.ops.iter().filter(|o| !o.done).find_map(|o| {
            let w = *self.members.get(o.peer)?;
            self.world.peer_failed(w).map(|s| (o.peer, s))
        })
    }
}

impl PendingOp for UcxPending {
    fn wait(self: Box<Self>) -> Result<Vec<Vec<u8>>, CommError> {
        let start = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            let done = {
                let mut st = self.world.lock();
                self.world.progress(&mut st);
                let mut inner = self.lock_inner();
                self.poll(&mut inner)?
            };
            if done {
                let mut inner = self.lock_inner();
                return Ok(std::mem::take(&mut inner.recv_bufs));
            }
            let inner = self.lock_inner();
            let first_peer = inner.ops.iter().find(|o| !o.done).map_or(0, |o| o.peer);
            if let Some(e) = self.world.aborted_err(self.op, first_peer, self.tag) {
                return Err(e);
            }
            if let Some((peer, s)) = self.failed_peer(&inner) {
                return Err(CommError::Backend {
                    op: self.op,
                    peer,
                    tag: self.tag,
                    detail: format!(
                        "the connection to peer {peer} failed ({s}): that rank died or the network failed"
                    ),
                });
            }
            drop(inner);
            let waited = start.elapsed();
            if waited >= self.timeout {
                return Err(CommError::Timeout {
                    op: self.op,
                    peer: first_peer,
                    tag: self.tag,
                    waited,
                });
            }
            backoff.snooze();
        }
    }

    fn is_complete(&self) -> bool {
        let mut st = self.world.lock();
        self.world.progress(&mut st);
        let mut inner = self.lock_inner();
        match self.poll(&mut inner) {
            Ok(done) => done,
            Err(e) => {
                inner.error = Some(e);
                true
            }
        }
    }
}

impl Drop for UcxPending {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        if inner.ops.iter().all(|o| o.req.is_none()) {
            return;
        }
        let world = self.world.clone();
        let mut st = world.lock();
        let mut recvs = Vec::new();
        for op in inner.ops.iter_mut() {
            let Some(req) = op.req.take() else { continue };
            match op.kind {
                OpKind::Send { buf } => st.orphans.push(Orphan {
                    req,
                    buf: std::mem::take(&mut inner.send_bufs[buf]),
                }),
                OpKind::Recv { buf, .. } => {
                    st.worker.cancel(&req);
                    recvs.push((req, buf));
                }
            }
        }
        let finished = world.progress_until(&mut st, |_| {
            recvs.iter().all(|(r, _)| !matches!(r.check(), Ok(false)))
        });
        if !finished {
            // UCX still owns the receive buffers: keep them alive for good.
            for (_, buf) in &recvs {
                std::mem::forget(std::mem::take(&mut inner.recv_bufs[*buf]));
                std::mem::forget(std::mem::take(&mut inner.infos[*buf]));
            }
        }
        drop(recvs);
    }
}
