//! The [`Transport`] trait: the communication interface of PCPP patch
//! parallelism.
//!
//! Each GPU (rank) owns one spatial patch of the latent. Per denoising step a
//! layer posts its halo / K,V / statistics traffic with [`Transport::exchange`]
//! (or [`Transport::start_all_gather`]) tagged with its layer index, keeps
//! computing on the stale activations, and waits on the returned [`Pending`]
//! only when the fresh data is needed — the asynchronous overlap DistriFusion
//! relies on. Back-ends: [`crate::LocalTransport`] (threads, for tests and
//! single-process runs) and, behind the `mpi` / `ucx` features, `MpiTransport`
//! and `UcxTransport` (started through [`crate::launch`]).

use std::sync::Arc;
use std::time::Duration;

use crate::collectives;
use crate::error::CommError;
use crate::stats::{CommKind, CommStats};

/// Tags at or above this value are reserved for the collectives in
/// [`crate::collectives`]; layers must use smaller tags (e.g. their index).
pub const RESERVED_TAG_BASE: u32 = 0x7FFF_FF00;

/// Options shared by all back-ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOptions {
    /// How long any single blocking wait may take before it fails with
    /// [`CommError::Timeout`]; turns a lost peer into an error instead of a hang.
    pub timeout: Duration,
}

impl TransportOptions {
    /// Default options with a different timeout.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
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
}
