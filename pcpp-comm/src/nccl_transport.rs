//! [`NcclTransport`]: the [`Transport`] trait over NCCL, one GPU per rank (PCPP §7.4: the halo,
//! group-norm, K/V and gather traffic of the patch-parallel layers).
//!
//! The communicator is bootstrapped from a unique id that rank 0 creates and sends to the others
//! over another transport (MPI under `mpirun`, see [`NcclTransport::init_over`]) or through the TCP
//! rendezvous of [`crate::rendezvous`] ([`NcclTransport::init_rendezvous`]). It is driven through
//! cudarc's raw `result` API (the handle is owned here), so that any stream can be used.
//!
//! Two data paths:
//!
//! - Device data goes through [`DeviceP2p`] ([`Transport::device_p2p`] is `Some`, also for
//!   communicators made by [`Transport::split`]): [`DeviceP2p::enqueue`] posts the caller's
//!   device buffers as one NCCL group of `ncclSend` / `ncclRecv` (bytes, `ncclUint8`) on the
//!   caller's stream and returns at once, with no host staging and no synchronisation, so
//!   communication overlaps computation and the call may be captured into a CUDA graph
//!   (NCCL >= 2.9).
//! - Host data keeps the host-staged [`Transport::exchange`]: `Vec<u8>` → device buffers on this
//!   rank's GPU → the same NCCL group on the transport's own stream → `Vec<u8>`, completed before
//!   the call returns (the returned [`Pending`] is already complete). Correct for host data, but
//!   without overlap.
//!
//! Matching: NCCL has no tags. Messages between two ranks match in posting order, which is what
//! the patch-parallel layers produce (every rank runs the layers in the same order, and every
//! exchange is symmetric). Different tags posted in different orders on two ranks would
//! mismatch, and a receive whose length differs from the matching send is undefined in NCCL
//! rather than a [`CommError::LengthMismatch`]. Zero-length messages are not sent at all (but
//! are counted as messages in [`Transport::stats`]). A message to this rank itself is allowed
//! (NCCL copies it) and must be received in the same group.
//!
//! Collectives: all-gather (lengths gathered first, then one padded NCCL all-gather), all-reduce
//! as an all-gather summed on the host in rank order (bit-identical on every rank, as the trait
//! requires), broadcast (length, then data), barrier (a one-byte all-reduce), split (a new
//! communicator per colour from ids all-gathered on the parent).
//!
//! Every use of the communicator (a group of point-to-point calls, a collective) holds a mutex,
//! so calls from several threads are serialised; NCCL groups are per thread, so a group is
//! started and ended under one lock.

use std::ffi::{c_int, c_void};
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result, sys};

use crate::error::CommError;
use crate::stats::{CommKind, CommStats, StatsCounter};
use crate::transport::{
    check_device_msgs, count_device_msgs, DeviceMsg, DeviceP2p, Pending, Transport,
    TransportOptions,
};

/// Bytes: every message is a run of `ncclUint8`.
const BYTES: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint8;

/// An owned NCCL communicator handle that may move between threads.
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not run
// concurrently; every use goes through the `Mutex` in `NcclTransport::comm`, which serialises them.
unsafe impl Send for RawComm {}
// SAFETY: as above, shared references only reach the communicator through the `Mutex`.
unsafe impl Sync for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: the handle was initialised by a successful `ncclCommInitRank` and is released
        // only here, once. Abort (like cudarc's own `Comm`) does not wait for peers that may be
        // gone; a failure cannot be reported from `drop` and leaves nothing to clean up.
        let _ = unsafe { result::comm_abort(self.0) };
    }
}

/// The NCCL back-end of one rank: a communicator on GPU `ordinal` and its stream.
pub struct NcclTransport {
    comm: Mutex<RawComm>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    rank: usize,
    size: usize,
    /// This transport's members as ranks of the world it was split from.
    world_ranks: Vec<usize>,
    opts: TransportOptions,
    stats: StatsCounter,
}

fn backend(op: &'static str, peer: usize, detail: impl std::fmt::Display) -> CommError {
    CommError::Backend {
        op,
        peer,
        tag: 0,
        detail: detail.to_string(),
    }
}

fn setup(rank: usize, detail: impl std::fmt::Display) -> CommError {
    CommError::Setup {
        op: "nccl init",
        rank,
        detail: detail.to_string(),
    }
}

fn new_id(op: &'static str, rank: usize) -> Result<sys::ncclUniqueId, CommError> {
    result::get_uniqueid().map_err(|e| backend(op, rank, format!("ncclGetUniqueId: {e:?}")))
}

fn id_bytes(id: &sys::ncclUniqueId) -> Vec<u8> {
    id.internal.iter().map(|&c| c as u8).collect()
}

fn id_from(rank: usize, b: &[u8]) -> Result<sys::ncclUniqueId, CommError> {
    if b.len() != 128 {
        return Err(setup(
            rank,
            format!("NCCL unique id of {} bytes, expected 128", b.len()),
        ));
    }
    let mut internal = [0 as std::ffi::c_char; 128];
    for (d, &s) in internal.iter_mut().zip(b) {
        *d = s as std::ffi::c_char;
    }
    Ok(sys::ncclUniqueId { internal })
}

/// The NCCL form of a peer rank (every rank is below the communicator size, an `i32`).
fn peer_int(op: &'static str, peer: usize) -> Result<c_int, CommError> {
    c_int::try_from(peer).map_err(|_| backend(op, peer, "rank does not fit in an NCCL int"))
}

impl NcclTransport {
    /// Creates the communicator of `rank` of `size` on GPU `ordinal` from the unique id `id`
    /// (collective: every rank calls it with the same id).
    fn from_id(
        id: sys::ncclUniqueId,
        ordinal: usize,
        rank: usize,
        size: usize,
        world_ranks: Vec<usize>,
        opts: TransportOptions,
        stream: Option<Arc<CudaStream>>,
    ) -> Result<Arc<NcclTransport>, CommError> {
        let stream = match stream {
            Some(s) => s,
            None => {
                let ctx = CudaContext::new(ordinal)
                    .map_err(|e| setup(rank, format!("cannot open GPU {ordinal}: {e}")))?;
                ctx.new_stream()
                    .map_err(|e| setup(rank, format!("GPU {ordinal}: stream: {e}")))?
            }
        };
        // ncclCommInitRank joins on the calling thread's current device.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| setup(rank, format!("GPU {ordinal}: bind context: {e}")))?;
        let nranks = c_int::try_from(size)
            .map_err(|_| setup(rank, format!("{size} ranks do not fit in an NCCL int")))?;
        let me = c_int::try_from(rank)
            .map_err(|_| setup(rank, format!("rank {rank} does not fit in an NCCL int")))?;
        let mut handle = MaybeUninit::<sys::ncclComm_t>::uninit();
        // SAFETY: `handle` is a valid place for the communicator handle NCCL writes.
        unsafe { result::comm_init_rank(handle.as_mut_ptr(), nranks, id, me) }.map_err(|e| {
            setup(
                rank,
                format!("ncclCommInitRank (rank {rank} of {size}, GPU {ordinal}): {e:?}"),
            )
        })?;
        // SAFETY: the successful `ncclCommInitRank` above initialised the handle.
        let comm = RawComm(unsafe { handle.assume_init() });
        Ok(Arc::new(NcclTransport {
            comm: Mutex::new(comm),
            stream,
            ordinal,
            rank,
            size,
            world_ranks,
            opts,
            stats: StatsCounter::new(),
        }))
    }

    /// Collective over `bootstrap` (e.g. the MPI world): rank 0 creates the NCCL unique id and
    /// broadcasts it; every rank opens GPU `ordinal` (its node-local rank) and joins.
    pub fn init_over(
        bootstrap: &dyn Transport,
        ordinal: usize,
        opts: TransportOptions,
    ) -> Result<Arc<NcclTransport>, CommError> {
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let mut blob = if rank == 0 {
            id_bytes(
                &result::get_uniqueid()
                    .map_err(|e| setup(rank, format!("ncclGetUniqueId: {e:?}")))?,
            )
        } else {
            Vec::new()
        };
        bootstrap
            .broadcast(CommKind::Control, 0, &mut blob)
            .map_err(|e| e.with_op("nccl bootstrap"))?;
        let id = id_from(rank, &blob)?;
        Self::from_id(id, ordinal, rank, size, (0..size).collect(), opts, None)
    }

    /// Collective over `size` processes without MPI: rank 0 listens on `root` (`host:port`) and
    /// hands its unique id to the others through [`crate::rendezvous::all_gather`].
    pub fn init_rendezvous(
        root: &str,
        rank: usize,
        size: usize,
        ordinal: usize,
        opts: TransportOptions,
        timeout: Duration,
    ) -> Result<Arc<NcclTransport>, CommError> {
        let blob = if rank == 0 {
            id_bytes(
                &result::get_uniqueid()
                    .map_err(|e| setup(rank, format!("ncclGetUniqueId: {e:?}")))?,
            )
        } else {
            Vec::new()
        };
        let all = crate::rendezvous::all_gather(root, rank, size, &blob, timeout)?;
        let id = id_from(rank, &all[0])?;
        Self::from_id(id, ordinal, rank, size, (0..size).collect(), opts, None)
    }

    /// The GPU this rank communicates from.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The NCCL version of the loaded library, e.g. `2.28.3`.
    pub fn nccl_version() -> String {
        match result::get_nccl_version() {
            Ok(v) => format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
            Err(e) => format!("unknown ({e:?})"),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, RawComm>, CommError> {
        self.comm
            .lock()
            .map_err(|_| backend("nccl", self.rank, "communicator lock poisoned"))
    }

    /// The transport's own stream in NCCL's type.
    fn own_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// Waits for the stream's work, failing with [`CommError::Timeout`] after the transport's
    /// timeout (a lost peer leaves NCCL waiting forever otherwise).
    fn finish(&self, op: &'static str) -> Result<(), CommError> {
        let ev = self
            .stream
            .record_event(None)
            .map_err(|e| backend(op, self.rank, format!("event: {e}")))?;
        let start = Instant::now();
        while !ev.is_complete() {
            if start.elapsed() > self.opts.timeout {
                return Err(CommError::Timeout {
                    op,
                    peer: self.rank,
                    tag: 0,
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        self.stream
            .synchronize()
            .map_err(|e| backend(op, self.rank, format!("stream: {e}")))
    }

    fn upload(&self, op: &'static str, data: &[u8]) -> Result<CudaSlice<u8>, CommError> {
        self.stream
            .clone_htod(data)
            .map_err(|e| backend(op, self.rank, format!("host to device copy: {e}")))
    }

    fn alloc(&self, op: &'static str, n: usize) -> Result<CudaSlice<u8>, CommError> {
        self.stream.alloc_zeros::<u8>(n).map_err(|e| {
            backend(
                op,
                self.rank,
                format!("device allocation of {n} bytes: {e}"),
            )
        })
    }

    fn download(&self, op: &'static str, d: &CudaSlice<u8>) -> Result<Vec<u8>, CommError> {
        self.stream
            .clone_dtoh(d)
            .map_err(|e| backend(op, self.rank, format!("device to host copy: {e}")))
    }

    fn check_peer(&self, op: &'static str, peer: usize) -> Result<(), CommError> {
        if peer >= self.size {
            return Err(CommError::InvalidRank {
                op,
                peer,
                tag: 0,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Posts the non-empty messages of `sends` and `recvs` (peers already validated) as one NCCL
    /// group on `stream`, under the communicator lock. Neither waits for nor queries `stream`.
    ///
    /// # Safety
    ///
    /// As [`DeviceP2p::enqueue`]: the pointers address `len` bytes of this device's memory,
    /// valid and otherwise untouched until the work completes on `stream`, a stream of this
    /// device.
    unsafe fn post_group(
        &self,
        op: &'static str,
        sends: &[DeviceMsg],
        recvs: &[DeviceMsg],
        stream: sys::cudaStream_t,
    ) -> Result<(), CommError> {
        let sends: Vec<(c_int, &DeviceMsg)> = sends
            .iter()
            .filter(|m| m.len > 0)
            .map(|m| Ok((peer_int(op, m.peer)?, m)))
            .collect::<Result<_, CommError>>()?;
        let recvs: Vec<(c_int, &DeviceMsg)> = recvs
            .iter()
            .filter(|m| m.len > 0)
            .map(|m| Ok((peer_int(op, m.peer)?, m)))
            .collect::<Result<_, CommError>>()?;
        if sends.is_empty() && recvs.is_empty() {
            return Ok(());
        }
        let comm = self.lock()?;
        result::group_start()
            .map_err(|e| backend(op, self.rank, format!("ncclGroupStart: {e:?}")))?;
        let mut failed = None;
        for (peer, m) in &sends {
            // SAFETY: the caller guarantees `m.ptr` addresses `m.len` readable bytes of this
            // device until the group completes on `stream`; `comm.0` is a live communicator.
            let r = unsafe {
                result::send(m.ptr as *const c_void, m.len, BYTES, *peer, comm.0, stream)
            };
            if let Err(e) = r {
                failed.get_or_insert((m.peer, format!("ncclSend of {} bytes: {e:?}", m.len)));
            }
        }
        for (peer, m) in &recvs {
            // SAFETY: as above, `m.ptr` addresses `m.len` writable bytes nothing else touches.
            let r =
                unsafe { result::recv(m.ptr as *mut c_void, m.len, BYTES, *peer, comm.0, stream) };
            if let Err(e) = r {
                failed.get_or_insert((m.peer, format!("ncclRecv of {} bytes: {e:?}", m.len)));
            }
        }
        // The group is always closed, also after a failed call, so the thread leaves group mode.
        let end = result::group_end();
        if let Some((peer, msg)) = failed {
            return Err(backend(op, peer, msg));
        }
        end.map_err(|e| backend(op, self.rank, format!("ncclGroupEnd: {e:?}")))?;
        Ok(())
    }

    /// Equal-length NCCL all-gather of `data` (every rank passes the same length).
    fn all_gather_equal(&self, op: &'static str, data: &[u8]) -> Result<Vec<u8>, CommError> {
        let n = data.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let src = self.upload(op, data)?;
        let mut dst = self.alloc(op, n * self.size)?;
        {
            let comm = self.lock()?;
            let (s, _s_sync) = src.device_ptr(&self.stream);
            let (d, _d_sync) = dst.device_ptr_mut(&self.stream);
            // SAFETY: `src` holds `n` bytes and `dst` `n * size` bytes of this device, both
            // allocated on the transport's stream and kept alive until `finish` below.
            unsafe {
                result::all_gather(
                    s as *const c_void,
                    d as *mut c_void,
                    n,
                    BYTES,
                    comm.0,
                    self.own_stream(),
                )
            }
            .map_err(|e| backend(op, self.rank, format!("ncclAllGather: {e:?}")))?;
        }
        self.finish(op)?;
        self.download(op, &dst)
    }
}

impl DeviceP2p for NcclTransport {
    fn device_ordinal(&self) -> usize {
        self.ordinal
    }

    unsafe fn enqueue(
        &self,
        kind: CommKind,
        sends: &[DeviceMsg],
        recvs: &[DeviceMsg],
        stream: *mut c_void,
    ) -> Result<(), CommError> {
        const OP: &str = "enqueue";
        check_device_msgs(OP, self.size, sends, recvs)?;
        // SAFETY: the caller upholds `DeviceP2p::enqueue`'s contract, which is `post_group`'s.
        unsafe { self.post_group(OP, sends, recvs, stream as sys::cudaStream_t) }?;
        count_device_msgs(&self.stats, kind, sends, recvs);
        Ok(())
    }
}

impl Transport for NcclTransport {
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
        let op = "split";
        // Every rank offers a fresh id; each group uses the id of its first member.
        let id = new_id(op, self.rank)?;
        let mut mine = Vec::with_capacity(136);
        mine.extend_from_slice(&color.to_le_bytes());
        mine.extend_from_slice(&key.to_le_bytes());
        mine.extend_from_slice(&id_bytes(&id));
        let all = self.all_gather_equal(op, &mine)?;
        let entries: Vec<(u32, u32, usize, &[u8])> = all
            .chunks_exact(136)
            .enumerate()
            .map(|(r, c)| {
                (
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                    r,
                    &c[8..],
                )
            })
            .collect();
        let mut members: Vec<&(u32, u32, usize, &[u8])> =
            entries.iter().filter(|e| e.0 == color).collect();
        members.sort_by_key(|e| (e.1, e.2));
        let new_rank = members
            .iter()
            .position(|e| e.2 == self.rank)
            .ok_or_else(|| backend(op, self.rank, "own rank missing from its colour"))?;
        let leader = members
            .iter()
            .min_by_key(|e| e.2)
            .ok_or_else(|| backend(op, self.rank, "empty colour"))?;
        let gid = id_from(self.rank, leader.3)?;
        let world_ranks = members.iter().map(|e| self.world_ranks[e.2]).collect();
        let t = NcclTransport::from_id(
            gid,
            self.ordinal,
            new_rank,
            members.len(),
            world_ranks,
            self.opts.clone(),
            Some(self.stream.clone()),
        )?;
        Ok(t)
    }

    fn exchange(
        &self,
        kind: CommKind,
        _tag: u32,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: Vec<(usize, usize)>,
    ) -> Result<Pending, CommError> {
        let op = "exchange";
        for &(p, _) in &sends {
            self.check_peer(op, p)?;
        }
        for &(p, _) in &recvs {
            self.check_peer(op, p)?;
        }
        let send_bufs = sends
            .iter()
            .filter(|s| !s.1.is_empty())
            .map(|(p, d)| Ok((*p, self.upload(op, d)?)))
            .collect::<Result<Vec<_>, CommError>>()?;
        let mut recv_bufs = recvs
            .iter()
            .filter(|r| r.1 > 0)
            .map(|&(p, n)| Ok((p, self.alloc(op, n)?)))
            .collect::<Result<Vec<_>, CommError>>()?;
        {
            let mut syncs = Vec::with_capacity(send_bufs.len() + recv_bufs.len());
            let mut send_msgs = Vec::with_capacity(send_bufs.len());
            for (p, buf) in &send_bufs {
                let (ptr, sync) = buf.device_ptr(&self.stream);
                syncs.push(sync);
                send_msgs.push(DeviceMsg {
                    peer: *p,
                    ptr,
                    len: buf.len(),
                });
            }
            let mut recv_msgs = Vec::with_capacity(recv_bufs.len());
            for (p, buf) in recv_bufs.iter_mut() {
                let len = buf.len();
                let (ptr, sync) = buf.device_ptr_mut(&self.stream);
                syncs.push(sync);
                recv_msgs.push(DeviceMsg { peer: *p, ptr, len });
            }
            // SAFETY: the buffers were allocated on this device for exactly these lengths, are
            // used by nothing else and live until after `finish` below; the stream is the
            // transport's own.
            unsafe { self.post_group(op, &send_msgs, &recv_msgs, self.own_stream()) }?;
        }
        self.finish(op)?;
        for (_, d) in &sends {
            self.stats.record_send(kind, d.len());
        }
        let mut it = recv_bufs.iter();
        let mut out = Vec::with_capacity(recvs.len());
        for &(_, n) in &recvs {
            if n == 0 {
                out.push(Vec::new());
            } else {
                let (_, buf) = it
                    .next()
                    .ok_or_else(|| backend(op, self.rank, "receive buffer missing"))?;
                out.push(self.download(op, buf)?);
            }
            self.stats.record_recv(kind, n);
        }
        Ok(Pending::ready(Ok(out)))
    }

    fn all_gather(&self, kind: CommKind, data: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        let op = "all_gather";
        let lens = self.all_gather_equal(op, &(data.len() as u64).to_le_bytes())?;
        let lens: Vec<usize> = lens
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as usize)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(0);
        let mut padded = data.to_vec();
        padded.resize(max, 0);
        let all = self.all_gather_equal(op, &padded)?;
        let out: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(r, &n)| all[r * max..r * max + n].to_vec())
            .collect();
        self.stats
            .record_send(kind, data.len() * (self.size.saturating_sub(1)));
        let others: usize = lens
            .iter()
            .enumerate()
            .filter(|&(r, _)| r != self.rank)
            .map(|(_, &n)| n)
            .sum();
        self.stats.record_recv(kind, others);
        Ok(out)
    }

    fn start_all_gather(&self, kind: CommKind, data: &[u8]) -> Result<Pending, CommError> {
        Ok(Pending::ready(self.all_gather(kind, data)))
    }

    fn all_reduce_sum_f32(&self, kind: CommKind, data: &mut [f32]) -> Result<(), CommError> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.all_gather(kind, &bytes)?;
        for (r, b) in all.iter().enumerate() {
            if b.len() != bytes.len() {
                return Err(CommError::Protocol {
                    op: "all_reduce_sum_f32",
                    peer: r,
                    tag: 0,
                    detail: format!(
                        "rank {r} contributed {} values, this rank {}",
                        b.len() / 4,
                        data.len()
                    ),
                });
            }
        }
        for (i, v) in data.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for b in &all {
                acc += f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
            }
            *v = acc;
        }
        Ok(())
    }

    fn broadcast(&self, kind: CommKind, root: usize, data: &mut Vec<u8>) -> Result<(), CommError> {
        let op = "broadcast";
        self.check_peer(op, root)?;
        let root_int = peer_int(op, root)?;
        let mut len = (data.len() as u64).to_le_bytes().to_vec();
        let run = |buf: &mut Vec<u8>| -> Result<(), CommError> {
            if buf.is_empty() {
                return Ok(());
            }
            let mut d = self.upload(op, buf)?;
            {
                let comm = self.lock()?;
                let (p, _sync) = d.device_ptr_mut(&self.stream);
                // SAFETY: `d` holds `buf.len()` bytes of this device, allocated on the
                // transport's stream and kept alive until `finish` below.
                unsafe {
                    result::broadcast(
                        p as *const c_void,
                        p as *mut c_void,
                        buf.len(),
                        BYTES,
                        root_int,
                        comm.0,
                        self.own_stream(),
                    )
                }
                .map_err(|e| backend(op, root, format!("ncclBroadcast: {e:?}")))?;
            }
            self.finish(op)?;
            *buf = self.download(op, &d)?;
            Ok(())
        };
        run(&mut len)?;
        let n = u64::from_le_bytes(
            len.as_slice()
                .try_into()
                .map_err(|_| backend(op, root, "length header of the wrong size"))?,
        ) as usize;
        data.resize(n, 0);
        run(data)?;
        if self.rank == root {
            self.stats
                .record_send(kind, n * self.size.saturating_sub(1));
        } else {
            self.stats.record_recv(kind, n);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let op = "barrier";
        let mut d = self.upload(op, &[1])?;
        {
            let comm = self.lock()?;
            let (p, _sync) = d.device_ptr_mut(&self.stream);
            // SAFETY: `d` holds one byte of this device, allocated on the transport's stream
            // and kept alive until `finish` below.
            unsafe {
                result::all_reduce(
                    p as *const c_void,
                    p as *mut c_void,
                    1,
                    BYTES,
                    sys::ncclRedOp_t::ncclMax,
                    comm.0,
                    self.own_stream(),
                )
            }
            .map_err(|e| backend(op, self.rank, format!("ncclAllReduce: {e:?}")))?;
        }
        self.finish(op)
    }

    fn abort(&self, reason: &str) {
        // NCCL cannot fail other ranks' blocked calls from here: like MPI, end the job (the
        // launcher takes the other ranks down; without one they fail on their timeouts).
        eprintln!(
            "error: world rank {} aborts the NCCL job: {reason}",
            self.world_ranks
                .get(self.rank)
                .copied()
                .unwrap_or(self.rank)
        );
        // `_exit`, not `exit`: the exit handlers tear down CUDA and NCCL, which waits for
        // communication kernels that may never finish when a peer is gone (seen on H100s: a
        // process stuck in `exit` after the error above).
        extern "C" {
            fn _exit(status: std::ffi::c_int) -> !;
        }
        // SAFETY: `_exit` ends the process at once; nothing of this process runs afterwards.
        unsafe { _exit(1) }
    }

    fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    fn reset_stats(&self) {
        self.stats.reset()
    }

    fn device_p2p(&self) -> Option<&dyn DeviceP2p> {
        Some(self)
    }
}
