//! [`MpiTransport`]: the multi-process, multi-node PCPP back-end over MPI
//! (feature `mpi`, crate `mpi` = rsmpi 0.8 over the system OpenMPI).
//!
//! One process per GPU; each process owns one latent patch. Point-to-point
//! halo / K,V traffic uses `MPI_Isend` / `MPI_Irecv`; collectives use the
//! nonblocking `MPI_Iallgather(v)`, `MPI_Igather`, `MPI_Ibcast` and
//! `MPI_Ibarrier`. Every wait polls its requests with `MPI_Test`, so the
//! configured timeout applies to collectives as well as to point-to-point.
//!
//! Design notes:
//! * rsmpi's safe request API ties a request to a borrow of its buffer for a
//!   scope, but a [`Pending`] outlives the call that posted it. The requests
//!   are therefore posted through rsmpi's raw bindings (`mpi::ffi`) on buffers
//!   owned by the pending handle (heap buffers do not move when the handle
//!   does). rsmpi initialises and finalises MPI ([`MpiContext`] holds the
//!   `Universe`) and computes the node-local rank with `split_shared`.
//! * All MPI calls are serialised through one process-wide mutex (never held
//!   while sleeping), so `MPI_THREAD_SERIALIZED` suffices; `MULTIPLE` is
//!   requested.
//! * Error handler `MPI_ERRORS_RETURN` is installed on `MPI_COMM_WORLD` (split
//!   communicators inherit it), so a too-long message is reported as
//!   [`CommError::Truncated`] instead of killing the job.
//! * Dropping an unwaited [`Pending`] cancels its receives; unfinished sends
//!   and collectives cannot be cancelled in MPI, so their requests are released
//!   and their buffers deliberately leaked (with a warning on stderr).
//! * [`Transport::abort`] calls `MPI_Abort` on `MPI_COMM_WORLD`: the whole job
//!   terminates instead of returning [`CommError::Aborted`].
//! * [`Transport::split`] first runs a polled `MPI_Ibarrier` (so a lost peer
//!   times out) and then the blocking `MPI_Comm_split` — the call rsmpi's
//!   `split_by_color_with_key` makes — on the raw communicator.
//! * Device memory ([`crate::DeviceP2p`]) goes through the engine of [`crate::device`] on a
//!   duplicate of the communicator (module `device`): CUDA-aware when `MPIX_Query_cuda_support`
//!   says so, else staged through pinned buffers; chosen when the world is created.
//! * Statistics count the logical payload exactly as the point-to-point
//!   collectives of [`crate::collectives`] would move it (length headers
//!   included), so reports are comparable across back-ends. Barriers count
//!   nothing.

use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mpi::ffi;
use mpi::traits::Communicator;
use mpi::Threading;

use crate::error::CommError;
use crate::stats::{CommKind, CommStats, StatsCounter};
use crate::transport::{
    DeviceP2p, Pending, PendingOp, Transport, TransportOptions, RESERVED_TAG_BASE,
};

mod device;
mod pending;
pub use device::mpi_cuda_support;
use device::{engine_for, MpiWire};
use pending::{Inner, MpiPending, Req, ReqKind};

static MPI_LOCK: Mutex<()> = Mutex::new(());

fn mpi_lock() -> MutexGuard<'static, ()> {
    MPI_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_finalized() -> bool {
    mpi::environment::is_finalized()
}

fn u8_type() -> ffi::MPI_Datatype {
    // SAFETY: reading an immutable handle constant exported by rsmpi's C shim.
    unsafe { ffi::RSMPI_UINT8_T }
}

/// Pointer MPI gets for a send buffer. An empty `Vec` has a dangling pointer
/// equal to 1, which OpenMPI would read as `MPI_IN_PLACE`, so empty buffers
/// are passed as null (with count 0).
fn send_ptr(buf: &[u8]) -> *const c_void {
    if buf.is_empty() {
        std::ptr::null()
    } else {
        buf.as_ptr().cast()
    }
}

/// Receive-buffer counterpart of [`send_ptr`].
fn recv_ptr(buf: &mut [u8]) -> *mut c_void {
    if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    }
}

fn error_string(code: c_int) -> String {
    let mut buf = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
    let mut len: c_int = 0;
    // SAFETY: `buf` has room for MPI_MAX_ERROR_STRING characters as the
    // standard requires; `len` is a valid out-pointer.
    let rc = unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr().cast(), &mut len) };
    if rc != ffi::MPI_SUCCESS as c_int {
        return format!("MPI error code {code}");
    }
    buf.truncate(usize::try_from(len).unwrap_or(0));
    format!("{} (code {code})", String::from_utf8_lossy(&buf))
}

fn error_class(code: c_int) -> c_int {
    let mut class: c_int = 0;
    // SAFETY: `class` is a valid out-pointer.
    unsafe { ffi::MPI_Error_class(code, &mut class) };
    class
}

fn check(code: c_int, op: &'static str, peer: usize, tag: u32) -> Result<(), CommError> {
    if code == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        Err(CommError::Backend {
            op,
            peer,
            tag,
            detail: error_string(code),
        })
    }
}

fn to_c_int(v: usize, op: &'static str, peer: usize, tag: u32) -> Result<c_int, CommError> {
    c_int::try_from(v).map_err(|_| CommError::Backend {
        op,
        peer,
        tag,
        detail: format!("{v} does not fit in an MPI int"),
    })
}

/// An MPI communicator handle; freed on drop when owned and MPI is still up.
#[derive(Debug)]
struct Comm {
    raw: ffi::MPI_Comm,
    owned: bool,
}

// SAFETY: an MPI communicator handle is an opaque identifier valid in every
// thread of the process; all calls using it are serialised by MPI_LOCK.
unsafe impl Send for Comm {}
// SAFETY: see `Send`; the handle is never mutated after construction except in
// `Drop`, which has exclusive access.
unsafe impl Sync for Comm {}

impl Drop for Comm {
    fn drop(&mut self) {
        if self.owned && !is_finalized() {
            let _g = mpi_lock();
            // SAFETY: the communicator was created by MPI_Comm_split, is owned
            // by this handle alone and is freed exactly once.
            unsafe { ffi::MPI_Comm_free(&mut self.raw) };
        }
    }
}

/// What the handle of an [`MpiTransport`] process needs to keep: the MPI
/// environment (MPI is finalised when this is dropped — drop every transport
/// and pending operation first) and where the process sits.
pub struct MpiContext {
    _universe: mpi::environment::Universe,
    /// Rank in `MPI_COMM_WORLD`.
    pub rank: usize,
    /// Size of `MPI_COMM_WORLD`.
    pub size: usize,
    /// Rank among the processes of this node (pick the GPU with it).
    pub local_rank: usize,
    /// Number of processes on this node.
    pub local_size: usize,
    /// Thread support MPI granted.
    pub threading: Threading,
}

impl std::fmt::Debug for MpiContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiContext")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .field("local_size", &self.local_size)
            .field("threading", &self.threading)
            .finish()
    }
}

/// A group of MPI processes (the world or a split of it).
pub struct MpiTransport {
    comm: Arc<Comm>,
    rank: usize,
    size: usize,
    world_rank: usize,
    tag_ub: u32,
    opts: TransportOptions,
    stats: Arc<StatsCounter>,
    /// Device exchanges (`None`: host path only).
    device: Option<Arc<crate::device::engine::DeviceEngine<MpiWire>>>,
}

impl std::fmt::Debug for MpiTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiTransport")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("world_rank", &self.world_rank)
            .finish()
    }
}

fn comm_rank_size(raw: ffi::MPI_Comm) -> Result<(usize, usize), CommError> {
    let (mut rank, mut size): (c_int, c_int) = (0, 0);
    // SAFETY: `raw` is a valid communicator; out-pointers are valid.
    check(unsafe { ffi::MPI_Comm_rank(raw, &mut rank) }, "init", 0, 0)?;
    // SAFETY: as above.
    check(unsafe { ffi::MPI_Comm_size(raw, &mut size) }, "init", 0, 0)?;
    Ok((
        usize::try_from(rank).unwrap_or(0),
        usize::try_from(size).unwrap_or(0),
    ))
}

impl MpiTransport {
    /// Initialises MPI with default [`TransportOptions`]; returns the world
    /// transport and the context that keeps MPI alive.
    pub fn init() -> Result<(Arc<dyn Transport>, MpiContext), CommError> {
        Self::init_with_options(TransportOptions::default())
    }

    /// Like [`MpiTransport::init`] with explicit options.
    pub fn init_with_options(
        opts: TransportOptions,
    ) -> Result<(Arc<dyn Transport>, MpiContext), CommError> {
        let (t, ctx) = Self::init_typed(opts)?;
        Ok((t, ctx))
    }

    /// Like [`MpiTransport::init_with_options`], returning the concrete type
    /// (for [`MpiTransport::with_options`] and [`MpiTransport::tag_ub`]).
    pub fn init_typed(
        opts: TransportOptions,
    ) -> Result<(Arc<MpiTransport>, MpiContext), CommError> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| CommError::Backend {
                op: "init",
                peer: 0,
                tag: 0,
                detail: "MPI was already initialised".into(),
            })?;
        if matches!(threading, Threading::Single | Threading::Funneled) {
            return Err(CommError::Backend {
                op: "init",
                peer: 0,
                tag: 0,
                detail: format!("MPI granted only {threading:?} thread support"),
            });
        }
        let _g = mpi_lock();
        let world = universe.world();
        // SAFETY: reading immutable handle constants exported by rsmpi.
        let (world_raw, errors_return) =
            unsafe { (ffi::RSMPI_COMM_WORLD, ffi::RSMPI_ERRORS_RETURN) };
        // SAFETY: MPI is initialised and both handles are valid.
        check(
            unsafe { ffi::MPI_Comm_set_errhandler(world_raw, errors_return) },
            "init",
            0,
            0,
        )?;
        let (rank, size) = comm_rank_size(world_raw)?;
        let shared = world.split_shared(world.rank());
        let (local_rank, local_size) = (
            usize::try_from(shared.rank()).unwrap_or(0),
            usize::try_from(shared.size()).unwrap_or(1),
        );
        drop(shared);
        let tag_ub = query_tag_ub(world_raw);
        drop(_g);
        let device = engine_for(world_raw, rank, &opts, true)?;
        let transport = MpiTransport {
            comm: Arc::new(Comm {
                raw: world_raw,
                owned: false,
            }),
            rank,
            size,
            world_rank: rank,
            tag_ub,
            opts,
            stats: Arc::new(StatsCounter::new()),
            device,
        };
        let ctx = MpiContext {
            _universe: universe,
            rank,
            size,
            local_rank,
            local_size,
            threading,
        };
        Ok((Arc::new(transport), ctx))
    }

    /// A handle to the same communicator with other options (e.g. a shorter
    /// timeout) and its own statistics.
    pub fn with_options(&self, opts: TransportOptions) -> Arc<dyn Transport> {
        Arc::new(MpiTransport {
            comm: self.comm.clone(),
            rank: self.rank,
            size: self.size,
            world_rank: self.world_rank,
            tag_ub: self.tag_ub,
            opts,
            stats: Arc::new(StatsCounter::new()),
            device: self.device.clone(),
        })
    }

    /// Largest tag MPI accepts (`MPI_TAG_UB`).
    pub fn tag_ub(&self) -> u32 {
        self.tag_ub
    }

    fn new_pending(&self, op: &'static str, kind: CommKind, tag: u32) -> MpiPending {
        MpiPending {
            inner: Mutex::new(Inner {
                reqs: Vec::new(),
                send_bufs: Vec::new(),
                recv_bufs: Vec::new(),
                aux: Vec::new(),
                error: None,
            }),
            op,
            kind,
            tag,
            timeout: self.opts.timeout,
            stats: self.stats.clone(),
        }
    }

    fn check_peer(&self, op: &'static str, peer: usize, tag: u32) -> Result<(), CommError> {
        if peer < self.size {
            Ok(())
        } else {
            Err(CommError::InvalidRank {
                op,
                peer,
                tag,
                size: self.size,
            })
        }
    }

    /// Posts a nonblocking collective through `post` on buffers moved into the
    /// pending handle and waits for it with the timeout.
    fn collective(
        &self,
        op: &'static str,
        kind: CommKind,
        tag: u32,
        bufs: CollBufs,
        post: impl FnOnce(*const c_void, *mut c_void, &[Vec<c_int>], *mut ffi::MPI_Request) -> c_int,
    ) -> Result<MpiPending, CommError> {
        let pending = self.new_pending(op, kind, tag);
        {
            let _g = mpi_lock();
            let mut inner = pending.lock_inner();
            inner.send_bufs.push(bufs.send);
            inner.recv_bufs.push(bufs.recv);
            inner.aux = bufs.aux;
            // SAFETY: REQUEST_NULL is an immutable handle constant.
            let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
            let sptr = send_ptr(&inner.send_bufs[0]);
            let rptr = recv_ptr(&mut inner.recv_bufs[0]);
            let rc = post(sptr, rptr, &inner.aux, &mut req);
            check(rc, op, self.rank, tag)?;
            inner.reqs.push(Req {
                raw: req,
                peer: self.rank,
                kind: ReqKind::Collective,
                done: false,
            });
        }
        Ok(pending)
    }

    fn barrier_with_timeout(&self, op: &'static str) -> Result<(), CommError> {
        let comm = self.comm.raw;
        let p = self.collective(
            op,
            CommKind::Control,
            RESERVED_TAG_BASE + 4,
            bufs(Vec::new(), Vec::new(), Vec::new()),
            // SAFETY: valid communicator and request out-pointer.
            |_, _, _, req| unsafe { ffi::MPI_Ibarrier(comm, req) },
        )?;
        Box::new(p).wait().map(|_| ())
    }
}

/// Buffers of one nonblocking collective, moved into its pending handle.
struct CollBufs {
    send: Vec<u8>,
    recv: Vec<u8>,
    aux: Vec<Vec<c_int>>,
}

fn bufs(send: Vec<u8>, recv: Vec<u8>, aux: Vec<Vec<c_int>>) -> CollBufs {
    CollBufs { send, recv, aux }
}

fn query_tag_ub(comm: ffi::MPI_Comm) -> u32 {
    let mut value: *mut c_int = std::ptr::null_mut();
    let mut flag: c_int = 0;
    // SAFETY: for MPI_TAG_UB the attribute value is a pointer to an int, which
    // MPI stores into `value`; `flag` says whether it was set.
    let rc = unsafe {
        ffi::MPI_Comm_get_attr(
            comm,
            ffi::MPI_TAG_UB as c_int,
            (&mut value as *mut *mut c_int).cast::<c_void>(),
            &mut flag,
        )
    };
    if rc == ffi::MPI_SUCCESS as c_int && flag != 0 && !value.is_null() {
        // SAFETY: MPI guarantees the attribute pointer is valid while MPI is up.
        u32::try_from(unsafe { *value }).unwrap_or(32767)
    } else {
        32767
    }
}

fn decode_lens(buf: &[u8], op: &'static str, tag: u32) -> Result<Vec<usize>, CommError> {
    buf.chunks_exact(8)
        .enumerate()
        .map(|(peer, c)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            usize::try_from(u64::from_le_bytes(a)).map_err(|_| CommError::Protocol {
                op,
                peer,
                tag,
                detail: "length does not fit in usize".into(),
            })
        })
        .collect()
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn options(&self) -> &TransportOptions {
        &self.opts
    }

    fn split(&self, color: u32, key: u32) -> Result<Arc<dyn Transport>, CommError> {
        const OP: &str = "split";
        let color = to_c_int(color as usize, OP, self.rank, 0)?;
        let key = to_c_int(key as usize, OP, self.rank, 0)?;
        self.barrier_with_timeout(OP)?;
        let _g = mpi_lock();
        // SAFETY: COMM_NULL is an immutable handle constant.
        let mut newcomm = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: collective over a valid communicator; `newcomm` is a valid
        // out-pointer.
        check(
            unsafe { ffi::MPI_Comm_split(self.comm.raw, color, key, &mut newcomm) },
            OP,
            self.rank,
            0,
        )?;
        let (rank, size) = comm_rank_size(newcomm).map_err(|e| e.with_op(OP))?;
        drop(_g);
        let device = if self.device.is_some() {
            engine_for(newcomm, rank, &self.opts, false)?
        } else {
            None
        };
        Ok(Arc::new(MpiTransport {
            comm: Arc::new(Comm {
                raw: newcomm,
                owned: true,
            }),
            rank,
            size,
            world_rank: self.world_rank,
            tag_ub: self.tag_ub,
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
        if tag > self.tag_ub {
            return Err(CommError::Backend {
                op: OP,
                peer: self.rank,
                tag,
                detail: format!("tag exceeds MPI_TAG_UB = {}", self.tag_ub),
            });
        }
        let ctag = tag as c_int;
        for &(p, _) in &sends {
            self.check_peer(OP, p, tag)?;
        }
        for &(p, len) in &recvs {
            self.check_peer(OP, p, tag)?;
            to_c_int(len, OP, p, tag)?;
        }
        let pending = self.new_pending(OP, kind, tag);
        {
            let _g = mpi_lock();
            let mut inner = pending.lock_inner();
            for (peer, data) in sends {
                let len = to_c_int(data.len(), OP, peer, tag)?;
                inner.send_bufs.push(data);
                let ptr = inner
                    .send_bufs
                    .last()
                    .map_or(std::ptr::null(), |b| b.as_ptr());
                // SAFETY: REQUEST_NULL is an immutable handle constant.
                let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
                // SAFETY: `ptr` points to `len` bytes owned by the pending
                // handle, which keeps them alive until the request completes
                // (or leaks them if dropped early).
                let rc = unsafe {
                    ffi::MPI_Isend(
                        ptr.cast(),
                        len,
                        u8_type(),
                        peer as c_int,
                        ctag,
                        self.comm.raw,
                        &mut req,
                    )
                };
                check(rc, OP, peer, tag)?;
                self.stats.record_send(kind, len as usize);
                inner.reqs.push(Req {
                    raw: req,
                    peer,
                    kind: ReqKind::Send,
                    done: false,
                });
            }
            for (index, (peer, len)) in recvs.into_iter().enumerate() {
                inner.recv_bufs.push(vec![0u8; len]);
                let ptr = recv_ptr(&mut inner.recv_bufs[index]);
                // SAFETY: REQUEST_NULL is an immutable handle constant.
                let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
                // SAFETY: `ptr` points to `len` writable bytes owned by the
                // pending handle, alive until the request completes or is
                // cancelled and waited in `Drop`.
                let rc = unsafe {
                    ffi::MPI_Irecv(
                        ptr.cast(),
                        len as c_int,
                        u8_type(),
                        peer as c_int,
                        ctag,
                        self.comm.raw,
                        &mut req,
                    )
                };
                check(rc, OP, peer, tag)?;
                inner.reqs.push(Req {
                    raw: req,
                    peer,
                    kind: ReqKind::Recv { expected: len },
                    done: false,
                });
            }
        }
        Ok(Pending::new(Box::new(pending)))
    }

    fn start_all_gather(&self, kind: CommKind, data: &[u8]) -> Result<Pending, CommError> {
        const OP: &str = "all_gather";
        let tag = RESERVED_TAG_BASE;
        let n = self.size;
        let comm = self.comm.raw;
        let header = (data.len() as u64).to_le_bytes().to_vec();
        let lens = self.collective(
            OP,
            kind,
            tag,
            bufs(header, vec![0u8; 8 * n], Vec::new()),
            // SAFETY: send buffer has 8 bytes, receive buffer 8 * size bytes,
            // both owned by the pending handle.
            |s, r, _, req| unsafe {
                ffi::MPI_Iallgather(s, 8, u8_type(), r, 8, u8_type(), comm, req)
            },
        )?;
        let lens = Box::new(lens).wait()?.pop().unwrap_or_default();
        let lens = decode_lens(&lens, OP, tag)?;
        let mut counts = Vec::with_capacity(n);
        let mut displs = Vec::with_capacity(n);
        let mut total = 0usize;
        for (p, &l) in lens.iter().enumerate() {
            counts.push(to_c_int(l, OP, p, tag)?);
            displs.push(to_c_int(total, OP, p, tag)?);
            total += l;
        }
        for (_, &l) in lens.iter().enumerate().filter(|&(p, _)| p != self.rank) {
            self.stats.record_send(kind, 8);
            self.stats.record_send(kind, data.len());
            self.stats.record_recv(kind, 8);
            self.stats.record_recv(kind, l);
        }
        let my_len = to_c_int(data.len(), OP, self.rank, tag)?;
        let pending = self.collective(
            OP,
            kind,
            tag + 1,
            bufs(data.to_vec(), vec![0u8; total], vec![counts, displs]),
            // SAFETY: the send buffer has `my_len` bytes, the receive buffer
            // `total` bytes and aux holds `size` counts and displacements, all
            // owned by the pending handle until completion.
            |s, r, aux, req| unsafe {
                ffi::MPI_Iallgatherv(
                    s,
                    my_len,
                    u8_type(),
                    r,
                    aux[0].as_ptr(),
                    aux[1].as_ptr(),
                    u8_type(),
                    comm,
                    req,
                )
            },
        )?;
        Ok(Pending::new(Box::new(pending)).map(move |mut bufs| {
            let all = bufs.pop().unwrap_or_default();
            let mut out = Vec::with_capacity(lens.len());
            let mut off = 0;
            for l in lens {
                out.push(all[off..off + l].to_vec());
                off += l;
            }
            Ok(out)
        }))
    }

    fn all_reduce_sum_f32(&self, kind: CommKind, data: &mut [f32]) -> Result<(), CommError> {
        const OP: &str = "all_reduce_sum_f32";
        let tag = RESERVED_TAG_BASE + 2;
        let (n, me) = (self.size, self.rank);
        if n == 1 {
            return Ok(());
        }
        let nbytes = std::mem::size_of_val(data);
        let count = to_c_int(nbytes, OP, me, tag)?;
        let comm = self.comm.raw;
        let recv_len = if me == 0 { nbytes * n } else { 0 };
        let gathered = self.collective(
            OP,
            kind,
            tag,
            bufs(
                crate::collectives::f32_to_bytes(data),
                vec![0u8; recv_len],
                Vec::new(),
            ),
            // SAFETY: the send buffer has `count` bytes; on the root the
            // receive buffer has `count * size` bytes (ignored elsewhere).
            |s, r, _, req| unsafe {
                ffi::MPI_Igather(s, count, u8_type(), r, count, u8_type(), 0, comm, req)
            },
        )?;
        let gathered = Box::new(gathered).wait()?.pop().unwrap_or_default();
        let mut result = Vec::new();
        if me == 0 {
            for part in gathered.chunks_exact(nbytes.max(1)).skip(1) {
                for (acc, c) in data.iter_mut().zip(part.chunks_exact(4)) {
                    *acc += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            result = crate::collectives::f32_to_bytes(data);
            for _ in 1..n {
                self.stats.record_recv(kind, nbytes);
                self.stats.record_send(kind, nbytes);
            }
        } else {
            self.stats.record_send(kind, nbytes);
            self.stats.record_recv(kind, nbytes);
            result.resize(nbytes, 0);
        }
        let bcast = self.collective(
            OP,
            kind,
            tag,
            bufs(Vec::new(), result, Vec::new()),
            // SAFETY: the buffer has `count` bytes on every rank.
            |_, r, _, req| unsafe { ffi::MPI_Ibcast(r, count, u8_type(), 0, comm, req) },
        )?;
        let result = Box::new(bcast).wait()?.pop().unwrap_or_default();
        if me != 0 {
            for (dst, c) in data.iter_mut().zip(result.chunks_exact(4)) {
                *dst = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }

    fn broadcast(&self, kind: CommKind, root: usize, data: &mut Vec<u8>) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        let tag = RESERVED_TAG_BASE + 3;
        self.check_peer(OP, root, tag)?;
        let (n, me) = (self.size, self.rank);
        if n == 1 {
            return Ok(());
        }
        let comm = self.comm.raw;
        let croot = root as c_int;
        let header = (data.len() as u64).to_le_bytes().to_vec();
        let hdr = self.collective(
            OP,
            kind,
            tag,
            bufs(Vec::new(), header, Vec::new()),
            // SAFETY: the buffer has 8 bytes on every rank.
            |_, r, _, req| unsafe { ffi::MPI_Ibcast(r, 8, u8_type(), croot, comm, req) },
        )?;
        let hdr = Box::new(hdr).wait()?.pop().unwrap_or_default();
        let len = decode_lens(&hdr, OP, tag)?.first().copied().unwrap_or(0);
        let count = to_c_int(len, OP, root, tag)?;
        let buf = if me == root {
            std::mem::take(data)
        } else {
            vec![0u8; len]
        };
        if me == root {
            for _ in 1..n {
                self.stats.record_send(kind, 8);
                self.stats.record_send(kind, len);
            }
        } else {
            self.stats.record_recv(kind, 8);
            self.stats.record_recv(kind, len);
        }
        let body = self.collective(
            OP,
            kind,
            tag,
            bufs(Vec::new(), buf, Vec::new()),
            // SAFETY: the buffer has `count` bytes on every rank.
            |_, r, _, req| unsafe { ffi::MPI_Ibcast(r, count, u8_type(), croot, comm, req) },
        )?;
        *data = Box::new(body).wait()?.pop().unwrap_or_default();
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.barrier_with_timeout("barrier")
    }

    fn abort(&self, reason: &str) {
        eprintln!(
            "pcpp-comm: world rank {} aborts the MPI job: {reason}",
            self.world_rank
        );
        let deadline = Instant::now() + Duration::from_secs(1);
        let _g = loop {
            match MPI_LOCK.try_lock() {
                Ok(g) => break Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => break None,
            }
        };
        // SAFETY: MPI_Abort on the world communicator terminates every process
        // of the job; it is the documented behaviour of `abort` for MPI.
        unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, 1) };
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
