//! The [`Transport`] trait: the communication interface of PCPP patch
//! parallelism.
//!
//! Each GPU (rank) owns one spatial patch of the latent. Per denoising step a
//! layer posts its halo / K,V / statistics traffic with [`Transport::exchange`]
//! (or [`Transport::start_all_gather`]) tagged with its layer index, keeps
//! computing on the stale activations, and waits on the returned [`Pending`]
//! only when the fresh data is needed — the asynchronous overlap DistriFusion
//! relies on. Back-ends: [`crate::LocalTransport`] (threads, for tests and
//! single-process runs), [`crate::SoloTransport`] (one rank of a world whose
//! other ranks do not exist, for measuring one rank's computation) and, behind
//! the `mpi` / `ucx` / `nccl` features, `MpiTransport`, `UcxTransport` and
//! `NcclTransport` (started through [`crate::launch`]).
//!
//! [`Transport::exchange`] moves host memory. Back-ends that can move device
//! (GPU) buffers themselves, without staging them through the host, also offer
//! [`DeviceP2p`] through [`Transport::device_p2p`].

use std::sync::Arc;
use std::time::Duration;

use crate::collectives;
use crate::device::{DeviceComm, DeviceStreams};
use crate::error::CommError;
use crate::stats::{CommKind, CommStats, StatsCounter};

/// Tags at or above this value are reserved for the collectives in
/// [`crate::collectives`]; layers must use smaller tags (e.g. their index).
pub const RESERVED_TAG_BASE: u32 = 0x7FFF_FF00;

/// Options shared by all back-ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOptions {
    /// How long any single blocking wait may take before it fails with
    /// [`CommError::Timeout`]; turns a lost peer into an error instead of a hang.
    pub timeout: Duration,
    /// Data path of device exchanges over MPI and UCX ([`DeviceComm::Auto`]: CUDA-aware when the
    /// library moves device memory, else staged through pinned buffers). Read when the world is
    /// created (and inherited by splits).
    pub device_comm: DeviceComm,
    /// What the streams of device exchanges over MPI and UCX are: CUDA streams, or the
    /// [`crate::device::host::HostStream`]s of the CPU twin.
    pub device_streams: DeviceStreams,
}

impl TransportOptions {
    /// Default options with a different timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            ..Self::default()
        }
    }

    /// These options with another device exchange path and kind of stream.
    pub fn with_device(mut self, comm: DeviceComm, streams: DeviceStreams) -> Self {
        self.device_comm = comm;
        self.device_streams = streams;
        self
    }
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            device_comm: DeviceComm::Auto,
            device_streams: DeviceStreams::Cuda,
        }
    }
}

/// Back-end side of a [`Pending`] operation.
///
/// Implementations must clean up (cancel or drain) in their `Drop` without
/// panicking when they are dropped before [`PendingOp::wait`] is called.
pub trait PendingOp: Send {
    /// Blocks until every receive of the operation has completed and returns
    /// the received buffers in posting order.
    fn wait(self: Box<Self>) -> Result<Vec<Vec<u8>>, CommError>;
    /// Whether [`PendingOp::wait`] would return without blocking.
    fn is_complete(&self) -> bool;
}

/// Handle of an in-flight nonblocking operation.
///
/// It must be completed with [`Pending::wait`]; dropping it unwaited cancels
/// its outstanding receives (data arriving for them later is discarded) and
/// never panics.
#[must_use = "a Pending operation must be waited on"]
pub struct Pending {
    op: Box<dyn PendingOp>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("complete", &self.op.is_complete())
            .finish()
    }
}

struct Ready(Result<Vec<Vec<u8>>, CommError>);

impl PendingOp for Ready {
    fn wait(self: Box<Self>) -> Result<Vec<Vec<u8>>, CommError> {
        self.0
    }
    fn is_complete(&self) -> bool {
        true
    }
}

type MapFn = Box<dyn FnOnce(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CommError> + Send>;

struct Mapped {
    inner: Box<dyn PendingOp>,
    f: MapFn,
}

impl PendingOp for Mapped {
    fn wait(self: Box<Self>) -> Result<Vec<Vec<u8>>, CommError> {
        let Mapped { inner, f } = *self;
        f(inner.wait()?)
    }
    fn is_complete(&self) -> bool {
        self.inner.is_complete()
    }
}

impl Pending {
    /// Wraps a back-end operation.
    pub fn new(op: Box<dyn PendingOp>) -> Self {
        Self { op }
    }

    /// An operation that has already completed with `result`.
    pub fn ready(result: Result<Vec<Vec<u8>>, CommError>) -> Self {
        Self::new(Box::new(Ready(result)))
    }

    /// Blocks until the operation completes; returns the received buffers in
    /// the order of the posted receives.
    pub fn wait(self) -> Result<Vec<Vec<u8>>, CommError> {
        self.op.wait()
    }

    /// Whether [`Pending::wait`] would return without blocking.
    pub fn is_complete(&self) -> bool {
        self.op.is_complete()
    }

    /// Post-processes the result of the operation when it is waited on.
    pub fn map<F>(self, f: F) -> Pending
    where
        F: FnOnce(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CommError> + Send + 'static,
    {
        Pending::new(Box::new(Mapped {
            inner: self.op,
            f: Box::new(f),
        }))
    }
}

/// One message in device memory: the peer rank (in this transport), the device address and the
/// length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMsg {
    /// The rank (in the transport the message is posted on) to send to or receive from.
    pub peer: usize,
    /// Device address of the first byte (a `CUdeviceptr` of the transport's device).
    pub ptr: u64,
    /// Length of the message in bytes.
    pub len: usize,
}

/// Point-to-point on GPU memory: NCCL natively; MPI and UCX through the engine of
/// [`crate::device`] (CUDA-aware or staged through pinned buffers, see there).
///
/// Obtained from [`Transport::device_p2p`]; the ranks are those of that transport.
pub trait DeviceP2p: Send + Sync {
    /// The CUDA device ordinal this communicator runs on.
    fn device_ordinal(&self) -> usize;

    /// How the data moves, for logs: `native` (NCCL, the solo back-end), or the path of the MPI /
    /// UCX engine, `cuda-aware` or `staged`.
    fn data_path(&self) -> &'static str {
        "native"
    }

    /// Enqueues every send and receive as one group on `stream` (a raw `CUstream` of that
    /// device) and returns without waiting; completion is ordered on `stream`: work enqueued on
    /// `stream` afterwards sees the received bytes, and the send buffers may be reused by such
    /// work. Synchronise on `stream` (or an event recorded on it) before reading the receive
    /// buffers from the host or from another stream.
    ///
    /// Messages between a pair of ranks match in posting order (sends of one rank to a peer
    /// with that peer's receives from it, across calls and within one call); there are no tags,
    /// so every rank must post its messages to a given peer in the same order as that peer
    /// posts the matching receives, with the same lengths (a length mismatch is not detected).
    /// A send only completes together with its matching receive, so post each exchange
    /// symmetrically in one call on every rank involved. A message to this rank itself is
    /// allowed; it must be received (from this rank) in the same call.
    /// Zero-length messages are not posted (they need no partner), but are counted as messages.
    /// Every message is counted in [`Transport::stats`] under `kind`: sends as sent, receives
    /// as received, at enqueue time.
    ///
    /// Nothing is enqueued and nothing counted when an argument is invalid (a peer outside
    /// `0..size`, a null pointer with a non-zero length): the error is
    /// [`CommError::InvalidRank`] or [`CommError::Protocol`] naming the peer. The call does not
    /// synchronise with or query `stream`, so it may be issued while `stream` is being
    /// captured into a CUDA graph (where the back-end supports capture: NCCL >= 2.9, and MPI and
    /// UCX, whose exchanges become host functions of the stream).
    ///
    /// # Safety
    ///
    /// Every pointer addresses `len` bytes of device memory of this device, valid, and not
    /// touched by other work (receive buffers neither read nor written, send buffers not
    /// written), until the enqueued work has completed on `stream`; `stream` is a valid
    /// `CUstream` of this device.
    unsafe fn enqueue(
        &self,
        kind: CommKind,
        sends: &[DeviceMsg],
        recvs: &[DeviceMsg],
        stream: *mut std::ffi::c_void,
    ) -> Result<(), CommError>;
}

/// Validates the messages of a [`DeviceP2p::enqueue`] on a transport of `size` ranks: every
/// peer in `0..size`, and no null pointer with a non-zero length.
pub(crate) fn check_device_msgs(
    op: &'static str,
    size: usize,
    sends: &[DeviceMsg],
    recvs: &[DeviceMsg],
) -> Result<(), CommError> {
    for m in sends.iter().chain(recvs) {
        if m.peer >= size {
            return Err(CommError::InvalidRank {
                op,
                peer: m.peer,
                tag: 0,
                size,
            });
        }
        if m.len > 0 && m.ptr == 0 {
            return Err(CommError::Protocol {
                op,
                peer: m.peer,
                tag: 0,
                detail: format!("null device pointer for a message of {} bytes", m.len),
            });
        }
    }
    Ok(())
}

/// Counts the messages of a [`DeviceP2p::enqueue`] under `kind`, zero-length ones included.
pub(crate) fn count_device_msgs(
    stats: &StatsCounter,
    kind: CommKind,
    sends: &[DeviceMsg],
    recvs: &[DeviceMsg],
) {
    for m in sends {
        stats.record_send(kind, m.len);
    }
    for m in recvs {
        stats.record_recv(kind, m.len);
    }
}

/// A group of ranks that can talk to each other. Object safe; shared as
/// `Arc<dyn Transport>`.
///
/// Collective operations (`split`, `all_gather`, `start_all_gather`,
/// `all_reduce_sum_f32`, `broadcast`, `barrier`) must be called by every rank
/// of the transport in the same order. The provided implementations run on top
/// of [`Transport::exchange`] through [`crate::collectives`]; back-ends with
/// native collectives override them.
pub trait Transport: Send + Sync {
    /// This rank, in `0..size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn size(&self) -> usize;

    /// The options the transport was created with.
    fn options(&self) -> &TransportOptions;

    /// Collective: partitions the ranks by `color`; in each new group ranks are
    /// ordered by `key`, then by rank in this transport (like `MPI_Comm_split`).
    /// Traffic on the sub-transport never matches traffic on this one.
    fn split(&self, color: u32, key: u32) -> Result<Arc<dyn Transport>, CommError>;

    /// Posts all `sends` (`(peer, payload)`) and receives (`(peer, length)`) at
    /// once and returns without waiting. [`Pending::wait`] yields the received
    /// buffers in the order of `recvs`.
    ///
    /// Messages between the same pair of ranks with the same tag match in
    /// posting order; different tags never match each other. A message whose
    /// length differs from the posted length is a [`CommError::LengthMismatch`].
    fn exchange(
        &self,
        kind: CommKind,
        tag: u32,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: Vec<(usize, usize)>,
    ) -> Result<Pending, CommError>;

    /// Collective: every rank contributes `data` (lengths may differ); returns
    /// one buffer per rank in rank order.
    fn all_gather(&self, kind: CommKind, data: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        self.start_all_gather(kind, data)?.wait()
    }

    /// Nonblocking [`Transport::all_gather`]; waiting yields one buffer per rank.
    fn start_all_gather(&self, kind: CommKind, data: &[u8]) -> Result<Pending, CommError> {
        collectives::start_all_gather_via_p2p(self, kind, data)
    }

    /// Collective: element-wise sum over all ranks, in place. Every rank gets a
    /// bit-identical result (contributions are added in rank order).
    fn all_reduce_sum_f32(&self, kind: CommKind, data: &mut [f32]) -> Result<(), CommError> {
        collectives::all_reduce_sum_f32_via_p2p(self, kind, data)
    }

    /// Collective: after the call every rank's `data` equals the root's.
    fn broadcast(&self, kind: CommKind, root: usize, data: &mut Vec<u8>) -> Result<(), CommError> {
        collectives::broadcast_via_p2p(self, kind, root, data)
    }

    /// Collective: returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<(), CommError> {
        collectives::barrier_via_p2p(self)
    }

    /// Makes every blocked and future operation on every rank of the world
    /// (including split sub-transports) fail with [`CommError::Aborted`]. A
    /// back-end that cannot do that in-process (MPI) terminates the job.
    fn abort(&self, reason: &str);

    /// Traffic of this transport object since creation or the last
    /// [`Transport::reset_stats`]. Sub-transports count separately.
    fn stats(&self) -> CommStats;

    /// Sets this transport's counters back to zero.
    fn reset_stats(&self);

    /// Point-to-point on device memory: `Some` for back-ends that move device memory without
    /// host round trips on the compute stream (NCCL; MPI and UCX unless their device path is
    /// [`DeviceComm::Host`]), `None` (the default) for the others, whose data must go through
    /// [`Transport::exchange`].
    fn device_p2p(&self) -> Option<&dyn DeviceP2p> {
        None
    }
}
