//! [`UcxTransport`]: the PCPP back-end over UCX's UCP tag-matching API
//! (feature `ucx`), for clusters with neither NCCL nor a usable MPI.
//!
//! Carries the per-step traffic of patch parallelism (pcpp-algorithm.md §2-§3:
//! halo rows, stale K/V windows, group-norm statistics, the final gather) as
//! nonblocking tagged messages; the collectives (all-gather, deterministic
//! all-reduce, broadcast, barrier) come from [`crate::collectives`], built once
//! on point-to-point for every back-end.
//!
//! Layering: [`ffi`] is the raw `bindgen` output, [`checked`] owns UCP handles
//! and turns statuses into errors, and this module is the safe layer: it owns
//! every buffer a request touches, so no request can outlive its memory.
//!
//! Design notes:
//! * One UCP context, one worker (serialised thread mode) and one endpoint per
//!   world rank (including itself) per process. Every UCP call happens under
//!   one mutex per world, which is never held while sleeping.
//! * 64-bit UCP tags are `context (16 bits) | source rank (16) | layer tag
//!   (32)`. The world uses context 0; [`Transport::split`] agrees on a context
//!   id fresh on every member, so sub-group traffic never matches the parent's.
//!   Context `0xFFFF` carries abort notices.
//! * Waits poll `ucp_worker_progress` and fail with [`CommError::Timeout`]
//!   after the configured timeout. Endpoints use peer error handling where
//!   the transports support it, so a dead peer fails the waits on it at once
//!   instead of at the timeout.
//! * A dropped, unwaited [`Pending`] cancels its receives; its unfinished
//!   sends keep their buffers in the world's orphan list until UCX completes
//!   them.
//! * [`Transport::abort`] sends an abort notice to every rank; their blocked
//!   and future operations fail with [`CommError::Aborted`].
//! * Device memory ([`crate::DeviceP2p`]) goes through the engine of [`crate::device`] (module
//!   `device`): CUDA-aware when the UCX context lists the CUDA memory type, else staged through
//!   pinned buffers; chosen when the world is created.
//! * Start-up ([`UcxTransport::init_with`]) exchanges worker addresses through
//!   any all-gather: an MPI world under `mpirun`, or the TCP
//!   [`crate::rendezvous`] ([`UcxTransport::init_rendezvous`]).

pub mod checked;
mod device;
pub mod ffi;
mod pending;

use pending::{Inner, Op, OpKind, UcxPending};

use std::os::raw::c_void;
use std::sync::atomic::{AtomicBool, AtomicI8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use self::checked::{Context, Endpoint, ErrMode, Posted, Request, Status, Worker};
use crate::collectives::layout_from_entries;
use crate::error::CommError;
use crate::stats::{CommKind, CommStats, StatsCounter};
use crate::transport::{DeviceP2p, Pending, Transport, TransportOptions};

/// Context id of abort notices.
const ABORT_CTX: u64 = 0xFFFF;
/// Largest context id a split may allocate.
const MAX_CTX: u32 = 0xFFFE;
/// Largest world size (source ranks have 16 bits in the tag).
pub const MAX_RANKS: usize = 0xFFFF;
/// Size of the abort notice buffer (world rank + reason).
const ABORT_MSG_MAX: usize = 4096;
/// How long shutdown, cancellation and abort notices may progress.
const CLEANUP_LIMIT: Duration = Duration::from_secs(2);

fn make_tag(ctx: u16, src: usize, tag: u32) -> u64 {
    (u64::from(ctx) << 48) | ((src as u64 & 0xFFFF) << 32) | u64::from(tag)
}

/// Endpoint error handler: records the failure status of the peer whose
/// `AtomicI8` cell is `arg`.
unsafe extern "C" fn on_peer_failure(
    arg: *mut c_void,
    _ep: ffi::ucp_ep_h,
    status: ffi::ucs_status_t,
) {
    // SAFETY: `arg` points to an AtomicI8 of the world's boxed slice, which
    // outlives every endpoint (they are closed first).
    let cell = unsafe { &*(arg as *const AtomicI8) };
    cell.store(status, Ordering::SeqCst);
}

/// A send UCX still runs after its [`Pending`] was dropped.
struct Orphan {
    req: Request,
    buf: Vec<u8>,
}

/// The standing receive for abort notices.
struct AbortSlot {
    req: Option<Request>,
    buf: Vec<u8>,
    info: Box<ffi::ucp_tag_recv_info_t>,
}

/// Everything that must only be touched under the world mutex. Field order is
/// drop order: requests, then endpoints, then the worker.
struct State {
    orphans: Vec<Orphan>,
    abort_slot: Option<AbortSlot>,
    eps: Vec<Endpoint>,
    worker: Worker,
}

struct World {
    state: Mutex<State>,
    /// One cell per world rank, written by [`on_peer_failure`]; 0 = healthy.
    /// Never resized, so the cells' addresses stay valid for UCX.
    peer_status: Box<[AtomicI8]>,
    aborted_flag: AtomicBool,
    aborted: Mutex<Option<(usize, String)>>,
    next_ctx: AtomicU32,
    world_rank: usize,
    err_mode: ErrMode,
    /// Whether the UCX context moves CUDA memory.
    cuda_memory: bool,
}

impl World {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drives UCX and the world's own requests (abort notices, orphans).
    fn progress(&self, st: &mut State) {
        for _ in 0..64 {
            if st.worker.progress() == 0 {
                break;
            }
        }
        let notice = match &st.abort_slot {
            Some(slot) => match &slot.req {
                Some(req) => match req.check_recv() {
                    Ok(Some(len)) => Some(len),
                    Ok(None) => None,
                    Err(_) => Some(0),
                },
                None => Some(slot.info.length),
            },
            None => None,
        };
        if let Some(len) = notice {
            if let Some(slot) = st.abort_slot.take() {
                let body = &slot.buf[..len.min(slot.buf.len())];
                let (by, reason) = decode_abort(body);
                self.set_aborted(by, reason);
            }
        }
        st.orphans.retain(|o| matches!(o.req.check(), Ok(false)));
    }

    fn set_aborted(&self, by: usize, reason: String) {
        let mut a = self.aborted.lock().unwrap_or_else(PoisonError::into_inner);
        if a.is_none() {
            *a = Some((by, reason));
        }
        self.aborted_flag.store(true, Ordering::SeqCst);
    }

    fn aborted_err(&self, op: &'static str, peer: usize, tag: u32) -> Option<CommError> {
        if !self.aborted_flag.load(Ordering::SeqCst) {
            return None;
        }
        let a = self.aborted.lock().unwrap_or_else(PoisonError::into_inner);
        a.as_ref().map(|(by, reason)| CommError::Aborted {
            op,
            peer,
            tag,
            by_rank: *by,
            reason: reason.clone(),
        })
    }

    fn peer_failed(&self, world_peer: usize) -> Option<Status> {
        let s = self.peer_status.get(world_peer)?.load(Ordering::SeqCst);
        (s != 0).then_some(Status(s))
    }

    /// Progresses until `done` or the cleanup limit; returns whether done.
    fn progress_until(&self, st: &mut State, mut done: impl FnMut(&State) -> bool) -> bool {
        let deadline = Instant::now() + CLEANUP_LIMIT;
        loop {
            self.progress(st);
            if done(st) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
    }
}

fn decode_abort(body: &[u8]) -> (usize, String) {
    if body.len() < 4 {
        return (usize::MAX, "abort notice without a sender".into());
    }
    let by = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
    (by, String::from_utf8_lossy(&body[4..]).into_owned())
}

/// Progresses the worker and the orphan list until `done` or the cleanup
/// limit; returns whether `done` held.
fn drive(st: &mut State, mut done: impl FnMut(&State) -> bool) -> bool {
    let deadline = Instant::now() + CLEANUP_LIMIT;
    loop {
        for _ in 0..64 {
            if st.worker.progress() == 0 {
                break;
            }
        }
        st.orphans.retain(|o| matches!(o.req.check(), Ok(false)));
        if done(st) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Deliver everything this rank sent before disconnecting.
        if let Ok(Posted::InFlight(req)) = st.worker.flush() {
            drive(st, |_| !matches!(req.check(), Ok(false)));
        }
        if let Some(req) = st.abort_slot.as_ref().and_then(|a| a.req.as_ref()) {
            st.worker.cancel(req);
        }
        let abort_done = drive(st, |s| {
            s.abort_slot
                .as_ref()
                .and_then(|a| a.req.as_ref())
                .filter(|r| matches!(r.check(), Ok(false)))
                .is_none()
        });
        if let Some(slot) = st.abort_slot.take() {
            if !abort_done {
                // UCX still owns the buffer: keep it alive for good.
                std::mem::forget(slot.buf);
                std::mem::forget(slot.info);
            }
        }
        drive(st, |s| s.orphans.is_empty());
        for o in st.orphans.drain(..) {
            std::mem::forget(o.buf);
        }
        let closing: Vec<Request> = st
            .eps
            .drain(..)
            .filter_map(|ep| match ep.close(false) {
                Ok(Posted::InFlight(r)) => Some(r),
                _ => None,
            })
            .collect();
        drive(st, |_| {
            closing.iter().all(|r| !matches!(r.check(), Ok(false)))
        });
        // Endpoints whose close did not finish are released by UCX when the
        // worker is destroyed (next, by field drop order).
    }
}

/// A group of processes talking over UCX (the world or a split of it).
pub struct UcxTransport {
    world: Arc<World>,
    ctx: u16,
    /// World rank of each rank of this group.
    members: Vec<usize>,
    rank: usize,
    opts: TransportOptions,
    stats: Arc<StatsCounter>,
    /// Device exchanges (`None`: host path only).
    device: Option<Arc<crate::device::engine::DeviceEngine<device::UcxWire>>>,
}

impl std::fmt::Debug for UcxTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxTransport")
            .field("rank", &self.rank)
            .field("size", &self.members.len())
            .field("world_rank", &self.world.world_rank)
            .field("context", &self.ctx)
            .finish()
    }
}

/// Environment variable that turns UCX's peer-failure detection off (`0`; default `1`).
pub const PEER_FAILURE_ENV: &str = "PCPP_UCX_PEER_FAILURE";

/// Whether endpoints ask UCX to detect failed peers (`UCP_ERR_HANDLING_MODE_PEER`). UCX 1.22 has
/// no failure detection on its shared-memory transports, so with it ranks of one node talk over
/// TCP or the NIC's loopback; `PCPP_UCX_PEER_FAILURE=0` lets them use shared memory, and a failed
/// peer is then noticed by the exchange timeouts alone.
fn peer_failure_detection() -> Result<bool, String> {
    match std::env::var(PEER_FAILURE_ENV)
        .ok()
        .as_deref()
        .map(str::trim)
    {
        None | Some("") | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(v) => Err(format!("{PEER_FAILURE_ENV}={v}: expected 1 or 0")),
    }
}

fn setup(op: &'static str, rank: usize, detail: String) -> CommError {
    CommError::Setup { op, rank, detail }
}

impl UcxTransport {
    /// Creates the UCX world: initialises UCP, gives this rank's worker
    /// address to `exchange` (an all-gather over some bootstrap, returning one
    /// address per rank in rank order), connects to every rank and runs a
    /// barrier over UCX.
    pub fn init_with<F>(
        rank: usize,
        size: usize,
        opts: TransportOptions,
        exchange: F,
    ) -> Result<Arc<UcxTransport>, CommError>
    where
        F: FnOnce(&[u8]) -> Result<Vec<Vec<u8>>, CommError>,
    {
        const OP: &str = "ucx init";
        if size == 0 || size > MAX_RANKS || rank >= size {
            return Err(setup(
                OP,
                rank,
                format!("rank {rank} / world size {size} out of range (at most {MAX_RANKS} ranks)"),
            ));
        }
        let ucx_err = |what: &str, s: Status| {
            setup(
                OP,
                rank,
                format!("{what}: {s}; check UCX_TLS / UCX_NET_DEVICES (`ucx_info -d` lists them)"),
            )
        };
        let tls = device::context_tls(&opts);
        let ctx = Context::new(size, tls).map_err(|s| ucx_err("ucp_init", s))?;
        let cuda_memory = ctx.supports_cuda();
        let worker = Worker::new(&ctx).map_err(|s| ucx_err("ucp_worker_create", s))?;
        let address = worker
            .address()
            .map_err(|s| ucx_err("ucp_worker_get_address", s))?;
        let mut slot = AbortSlot {
            req: None,
            buf: vec![0u8; ABORT_MSG_MAX],
            info: Box::default(),
        };
        // SAFETY: the buffer and info are owned by the slot, which lives in the
        // world state until the request completes or is cancelled in Drop.
        let posted = unsafe {
            worker.tag_recv(
                slot.buf.as_mut_ptr(),
                slot.buf.len(),
                ABORT_CTX << 48,
                0xFFFF << 48,
                &mut *slot.info,
            )
        }
        .map_err(|s| ucx_err("posting the abort receive", s))?;
        if let Posted::InFlight(r) = posted {
            slot.req = Some(r);
        }
        let addrs = exchange(&address)?;
        if addrs.len() != size {
            return Err(setup(
                OP,
                rank,
                format!(
                    "address exchange returned {} addresses for {size} ranks",
                    addrs.len()
                ),
            ));
        }
        let peer_status: Box<[AtomicI8]> = (0..size).map(|_| AtomicI8::new(0)).collect();
        let connect = |mode: ErrMode| -> Result<Vec<Endpoint>, (usize, Status)> {
            let mut eps = Vec::with_capacity(size);
            for (p, addr) in addrs.iter().enumerate() {
                let arg = (&peer_status[p] as *const AtomicI8)
                    .cast_mut()
                    .cast::<c_void>();
                // SAFETY: `arg` points into the boxed slice of cells, whose
                // heap storage moves into the world unchanged; the world
                // closes every endpoint before dropping the cells.
                match unsafe { Endpoint::create(&worker, addr, mode, on_peer_failure, arg) } {
                    Ok(ep) => eps.push(ep),
                    Err(s) => {
                        for ep in eps {
                            // Nothing was sent on them; the close requests
                            // are released by UCX with the worker.
                            let _ = ep.close(true);
                        }
                        return Err((p, s));
                    }
                }
            }
            Ok(eps)
        };
        let peer_mode = if peer_failure_detection().map_err(|d| setup(OP, rank, d))? {
            connect(ErrMode::Peer)
        } else {
            Err((rank, Status(ffi::UCS_ERR_UNSUPPORTED)))
        };
        let (eps, err_mode) = match peer_mode {
            Ok(eps) => (eps, ErrMode::Peer),
            // Shared-memory transports lack peer failure detection and
            // report the peer as unreachable in that mode: fall back to
            // timeouts alone (every rank does, as they share UCX_TLS).
            Err(_) => {
                let eps = connect(ErrMode::None)
                    .map_err(|(p, s)| ucx_err(&format!("ucp_ep_create to rank {p}"), s))?;
                (eps, ErrMode::None)
            }
        };
        let world = Arc::new(World {
            state: Mutex::new(State {
                orphans: Vec::new(),
                abort_slot: Some(slot),
                eps,
                worker,
            }),
            peer_status,
            aborted_flag: AtomicBool::new(false),
            aborted: Mutex::new(None),
            next_ctx: AtomicU32::new(1),
            world_rank: rank,
            err_mode,
            cuda_memory,
        });
        let members: Vec<usize> = (0..size).collect();
        let device = device::engine_for(&world, 0, rank, &members, &opts, true);
        let t = Arc::new(UcxTransport {
            world,
            ctx: 0,
            members,
            rank,
            opts,
            stats: Arc::new(StatsCounter::new()),
            device,
        });
        t.barrier().map_err(|e| {
            setup(
                OP,
                rank,
                format!("first barrier over UCX failed: {e}; check UCX_TLS and that every rank can reach the others"),
            )
        })?;
        t.reset_stats();
        Ok(t)
    }

    /// Creates the UCX world with the TCP [`crate::rendezvous`]: rank 0
    /// listens on `root` (`host:port`), the others connect to it. The
    /// rendezvous fails after `rendezvous_timeout`.
    pub fn init_rendezvous(
        root: &str,
        rank: usize,
        size: usize,
        opts: TransportOptions,
        rendezvous_timeout: Duration,
    ) -> Result<Arc<UcxTransport>, CommError> {
        Self::init_with(rank, size, opts, |addr| {
            crate::rendezvous::all_gather(root, rank, size, addr, rendezvous_timeout)
        })
    }

    /// Creates the UCX world with worker addresses exchanged over an existing
    /// transport (an `MpiTransport` world under `mpirun`); collective over it.
    pub fn init_over(
        bootstrap: &dyn Transport,
        opts: TransportOptions,
    ) -> Result<Arc<UcxTransport>, CommError> {
        Self::init_with(bootstrap.rank(), bootstrap.size(), opts, |addr| {
            bootstrap
                .all_gather(CommKind::Control, addr)
                .map_err(|e| e.with_op("ucx address exchange"))
        })
    }

    /// Version of the UCX library in use, e.g. `1.13.1`.
    pub fn ucx_version() -> String {
        checked::version()
    }

    /// Whether endpoints detect dead peers (`true`) or rely on the timeout
    /// alone (the selected UCX transports lack peer error handling).
    pub fn detects_peer_failure(&self) -> bool {
        self.world.err_mode == ErrMode::Peer
    }

    /// Rank of this process in the world.
    pub fn world_rank(&self) -> usize {
        self.world.world_rank
    }

    fn check_peer(&self, op: &'static str, peer: usize, tag: u32) -> Result<(), CommError> {
        if peer < self.members.len() {
            Ok(())
        } else {
            Err(CommError::InvalidRank {
                op,
                peer,
                tag,
                size: self.members.len(),
            })
        }
    }
}

impl Transport for UcxTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn options(&self) -> &TransportOptions {
        &self.opts
    }

    fn split(&self, color: u32, key: u32) -> Result<Arc<dyn Transport>, CommError> {
        const OP: &str = "split";
        let next = self.world.next_ctx.load(Ordering::SeqCst);
        let mut mine = color.to_le_bytes().to_vec();
        mine.extend_from_slice(&key.to_le_bytes());
        mine.extend_from_slice(&next.to_le_bytes());
        let all = self
            .all_gather(CommKind::Control, &mine)
            .map_err(|e| e.with_op(OP))?;
        let mut entries = Vec::with_capacity(all.len());
        let mut ctx = 0u32;
        for (r, b) in all.iter().enumerate() {
            let word = |i: usize| {
                b.get(4 * i..4 * i + 4)
                    .and_then(|s| s.try_into().ok())
                    .map(u32::from_le_bytes)
            };
            match (b.len(), word(0), word(1), word(2)) {
                (12, Some(c), Some(k), Some(n)) => {
                    entries.push((c, k));
                    ctx = ctx.max(n);
                }
                _ => {
                    return Err(CommError::Protocol {
                        op: OP,
                        peer: r,
                        tag: 0,
                        detail: format!("split entry has {} bytes, expected 12", b.len()),
                    })
                }
            }
        }
        if ctx > MAX_CTX {
            return Err(CommError::Backend {
                op: OP,
                peer: self.rank,
                tag: 0,
                detail: format!("more than {MAX_CTX} splits in one process"),
            });
        }
        self.world.next_ctx.fetch_max(ctx + 1, Ordering::SeqCst);
        let layout = layout_from_entries(&entries, self.rank);
        let members: Vec<usize> = layout.members.iter().map(|&r| self.members[r]).collect();
        let device = self.device.as_ref().and_then(|_| {
            device::engine_for(
                &self.world,
                ctx as u16,
                layout.new_rank,
                &members,
                &self.opts,
                false,
            )
        });
        Ok(Arc::new(UcxTransport {
            world: self.world.clone(),
            ctx: ctx as u16,
            members,
            rank: layout.new_rank,
            opts: self.opts.clone(),
            stats: Arc::new(StatsCounter::new()),
            device,
        }))
    }

    fn exchange(
        &self,
        kind: CommKind,
        tag: u32,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: Vec<(usize, usize)>,
    ) -> Result<Pending, CommError> {
        const OP: &str = "exchange";
        for &(p, _) in &sends {
            self.check_peer(OP, p, tag)?;
        }
        for &(p, _) in &recvs {
            self.check_peer(OP, p, tag)?;
        }
        let first = sends.first().map(|s| s.0).or(recvs.first().map(|r| r.0));
        if let Some(e) = self.world.aborted_err(OP, first.unwrap_or(self.rank), tag) {
            return Err(e);
        }
        let pending = UcxPending {
            world: self.world.clone(),
            inner: Mutex::new(Inner {
                ops: Vec::with_capacity(sends.len() + recvs.len()),
                send_bufs: Vec::with_capacity(sends.len()),
                recv_bufs: Vec::with_capacity(recvs.len()),
                infos: Vec::with_capacity(recvs.len()),
                error: None,
            }),
            members: self.members.clone(),
            op: OP,
            kind,
            tag,
            timeout: self.opts.timeout,
            stats: self.stats.clone(),
        };
        let mut failure = None;
        {
            let st = self.world.lock();
            let mut inner = pending.lock_inner();
            let stag = make_tag(self.ctx, self.rank, tag);
            for (peer, data) in sends {
                let ep = &st.eps[self.members[peer]];
                // SAFETY: the buffer is owned by the pending handle (moved into
                // `send_bufs`, whose heap storage never moves) until the
                // request completes; an unfinished send is handed to the
                // world's orphan list together with its buffer on drop.
                let posted = unsafe { st.worker.tag_send(ep, data.as_ptr(), data.len(), stag) };
                let len = data.len();
                inner.send_bufs.push(data);
                match posted {
                    Ok(p) => {
                        self.stats.record_send(kind, len);
                        let buf = inner.send_bufs.len() - 1;
                        let req = match p {
                            Posted::Done => None,
                            Posted::InFlight(r) => Some(r),
                        };
                        inner.ops.push(Op {
                            done: req.is_none(),
                            req,
                            peer,
                            kind: OpKind::Send { buf },
                        });
                    }
                    Err(s) => {
                        failure = Some(CommError::Backend {
                            op: OP,
                            peer,
                            tag,
                            detail: format!("ucp_tag_send_nbx: {s}"),
                        });
                        break;
                    }
                }
            }
            let recvs = if failure.is_some() { Vec::new() } else { recvs };
            for (peer, len) in recvs {
                let index = inner.recv_bufs.len();
                inner.recv_bufs.push(vec![0u8; len]);
                inner.infos.push(Box::default());
                let rtag = make_tag(self.ctx, peer, tag);
                let Inner {
                    recv_bufs, infos, ..
                } = &mut *inner;
                // SAFETY: buffer and info are owned by the pending handle
                // (heap storage that never moves) until the request completes
                // or, on drop, is cancelled and observed complete (or leaked).
                let posted = unsafe {
                    st.worker.tag_recv(
                        recv_bufs[index].as_mut_ptr(),
                        len,
                        rtag,
                        u64::MAX,
                        &mut *infos[index],
                    )
                };
                match posted {
                    Ok(p) => inner.ops.push(Op {
                        req: match p {
                            Posted::Done => None,
                            Posted::InFlight(r) => Some(r),
                        },
                        peer,
                        kind: OpKind::Recv {
                            buf: index,
                            expected: len,
                        },
                        done: false,
                    }),
                    Err(s) if s.is_truncated() => {
                        inner.ops.push(Op {
                            req: None,
                            peer,
                            kind: OpKind::Recv {
                                buf: index,
                                expected: len,
                            },
                            done: true,
                        });
                        if inner.error.is_none() {
                            inner.error = Some(CommError::Truncated {
                                op: OP,
                                peer,
                                tag,
                                expected: len,
                            });
                        }
                    }
                    Err(s) => {
                        failure = Some(CommError::Backend {
                            op: OP,
                            peer,
                            tag,
                            detail: format!("ucp_tag_recv_nbx: {s}"),
                        });
                        break;
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(Pending::new(Box::new(pending))),
        }
    }

    fn abort(&self, reason: &str) {
        let me = self.world.world_rank;
        eprintln!("pcpp-comm: world rank {me} aborts the UCX job: {reason}");
        self.world.set_aborted(me, reason.to_string());
        let mut msg = (me as u32).to_le_bytes().to_vec();
        let mut cut = reason.len().min(ABORT_MSG_MAX - 4);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.extend_from_slice(&reason.as_bytes()[..cut]);
        // Never block for long here: abort may run in a panic hook on a thread
        // that already holds the world lock.
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut st = loop {
            match self.world.state.try_lock() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => return,
            }
        };
        let tag = (ABORT_CTX << 48) | ((me as u64 & 0xFFFF) << 32);
        for p in (0..st.eps.len()).filter(|&p| p != me) {
            let buf = msg.clone();
            // SAFETY: the buffer moves into the orphan list with the request
            // and stays alive until UCX completes the send.
            let posted = unsafe { st.worker.tag_send(&st.eps[p], buf.as_ptr(), buf.len(), tag) };
            if let Ok(Posted::InFlight(req)) = posted {
                st.orphans.push(Orphan { req, buf });
            }
        }
        self.world.progress_until(&mut st, |s| s.orphans.is_empty());
    }

    fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    fn reset_stats(&self) {
        self.stats.reset();
    }

    fn device_p2p(&self) -> Option<&dyn DeviceP2p> {
        self.device.as_ref().map(|_| self as &dyn DeviceP2p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_layout_separates_context_source_and_tag() {
        let t = make_tag(3, 7, 0xDEAD_BEEF);
        assert_eq!(t >> 48, 3);
        assert_eq!((t >> 32) & 0xFFFF, 7);
        assert_eq!(t & 0xFFFF_FFFF, 0xDEAD_BEEF);
        assert_ne!(make_tag(1, 0, 5), make_tag(0, 1, 5));
    }

    #[test]
    fn abort_notice_roundtrip() {
        let mut m = 5u32.to_le_bytes().to_vec();
        m.extend_from_slice(b"out of memory");
        assert_eq!(decode_abort(&m), (5, "out of memory".to_string()));
        assert_eq!(decode_abort(&[1]).0, usize::MAX);
    }

    #[test]
    fn single_rank_world_passes_the_conformance_suite() {
        let opts = TransportOptions::with_timeout(Duration::from_secs(30));
        let t = UcxTransport::init_with(0, 1, opts, |a| Ok(vec![a.to_vec()])).unwrap();
        crate::conformance::run_all(t.as_ref()).unwrap();
    }
}
