//! The single error type of `pcpp-comm`.
//!
//! Every PCPP communication step (halo exchange of the stale activations,
//! group-norm statistics all-reduce, attention K/V all-gather, final latent
//! gather, control traffic) reports failures through [`CommError`]. Each
//! variant names the operation (`op`), the peer or rank involved and the tag,
//! so a failing layer can be identified from the message alone.

use std::time::Duration;

/// Errors returned by every [`crate::Transport`] operation.
///
/// `peer` and `rank` values are ranks *within the transport the operation was
/// issued on* (a split sub-transport numbers its members from 0), except
/// [`CommError::Aborted::by_rank`], which is the rank in the original world.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// The peer did not deliver within the configured timeout.
    #[error("{op}: timed out after {waited:?} waiting for peer {peer} (tag {tag})")]
    Timeout {
        /// Operation that was waiting.
        op: &'static str,
        /// Peer rank that was waited for.
        peer: usize,
        /// Tag of the message that was waited for.
        tag: u32,
        /// How long the operation waited.
        waited: Duration,
    },
    /// Some rank of the world called [`crate::Transport::abort`].
    #[error("{op} (peer {peer}, tag {tag}): aborted by world rank {by_rank}: {reason}")]
    Aborted {
        /// Operation that was interrupted.
        op: &'static str,
        /// Peer the operation was talking to when interrupted.
        peer: usize,
        /// Tag of the interrupted operation.
        tag: u32,
        /// World rank that called `abort`.
        by_rank: usize,
        /// Reason given to `abort`.
        reason: String,
    },
    /// A received message had a different length than the posted receive.
    #[error("{op}: message from peer {peer} (tag {tag}) has {actual} bytes, expected {expected}")]
    LengthMismatch {
        /// Operation that received the message.
        op: &'static str,
        /// Sending peer.
        peer: usize,
        /// Tag of the message.
        tag: u32,
        /// Length the receive was posted with.
        expected: usize,
        /// Length that arrived.
        actual: usize,
    },
    /// A message was longer than the posted receive and the back-end could not
    /// tell its real length (MPI reports only the truncation).
    #[error(
        "{op}: message from peer {peer} (tag {tag}) is longer than the {expected} bytes expected"
    )]
    Truncated {
        /// Operation that received the message.
        op: &'static str,
        /// Sending peer.
        peer: usize,
        /// Tag of the message.
        tag: u32,
        /// Length the receive was posted with.
        expected: usize,
    },
    /// A peer or root rank outside `0..size`.
    #[error("{op}: rank {peer} (tag {tag}) is out of range for a transport of size {size}")]
    InvalidRank {
        /// Operation that was given the rank.
        op: &'static str,
        /// The offending rank.
        peer: usize,
        /// Tag of the operation.
        tag: u32,
        /// Size of the transport.
        size: usize,
    },
    /// A message had a malformed body (e.g. a length header of the wrong size)
    /// or the ranks disagreed on a collective's arguments.
    #[error("{op}: protocol error with peer {peer} (tag {tag}): {detail}")]
    Protocol {
        /// Operation that detected the problem.
        op: &'static str,
        /// Peer involved.
        peer: usize,
        /// Tag of the message.
        tag: u32,
        /// What was wrong.
        detail: String,
    },
    /// The underlying library (e.g. MPI) reported a failure.
    #[error("{op} (peer {peer}, tag {tag}): back-end error: {detail}")]
    Backend {
        /// Operation that failed.
        op: &'static str,
        /// Peer involved (the own rank when no peer is involved).
        peer: usize,
        /// Tag of the operation.
        tag: u32,
        /// Back-end description of the failure.
        detail: String,
    },
    /// Start-up failed: the launch environment, the rendezvous or the
    /// back-end's initialisation (`rank` is this process's rank, or 0 when it
    /// is not known yet).
    #[error("{op} (rank {rank}): {detail}")]
    Setup {
        /// Start-up step that failed (e.g. `rendezvous`, `ucx init`).
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// What went wrong and how to fix it.
        detail: String,
    },
    /// Ranks disagree on something that must be identical everywhere (e.g.
    /// the hash of model, configuration and arguments checked at start).
    #[error("{op}: ranks {ranks:?} differ from rank 0: {detail}")]
    Mismatch {
        /// Check that failed.
        op: &'static str,
        /// Ranks whose value differs from rank 0's.
        ranks: Vec<usize>,
        /// What was compared.
        detail: String,
    },
}

impl CommError {
    /// The operation the error was raised in.
    pub fn op(&self) -> &'static str {
        match self {
            CommError::Timeout { op, .. }
            | CommError::Aborted { op, .. }
            | CommError::LengthMismatch { op, .. }
            | CommError::Truncated { op, .. }
            | CommError::InvalidRank { op, .. }
            | CommError::Protocol { op, .. }
            | CommError::Backend { op, .. }
            | CommError::Setup { op, .. }
            | CommError::Mismatch { op, .. } => op,
        }
    }

    /// The peer (or rank) the error is about.
    pub fn peer(&self) -> usize {
        match self {
            CommError::Timeout { peer, .. }
            | CommError::Aborted { peer, .. }
            | CommError::LengthMismatch { peer, .. }
            | CommError::Truncated { peer, .. }
            | CommError::InvalidRank { peer, .. }
            | CommError::Protocol { peer, .. }
            | CommError::Backend { peer, .. } => *peer,
            CommError::Setup { rank, .. } => *rank,
            CommError::Mismatch { ranks, .. } => ranks.first().copied().unwrap_or(0),
        }
    }

    /// The tag of the failed operation.
    pub fn tag(&self) -> u32 {
        match self {
            CommError::Timeout { tag, .. }
            | CommError::Aborted { tag, .. }
            | CommError::LengthMismatch { tag, .. }
            | CommError::Truncated { tag, .. }
            | CommError::InvalidRank { tag, .. }
            | CommError::Protocol { tag, .. }
            | CommError::Backend { tag, .. } => *tag,
            CommError::Setup { .. } | CommError::Mismatch { .. } => 0,
        }
    }

    /// Returns a copy of the error with `op` replaced, used when a collective
    /// built on point-to-point wants to report itself rather than `exchange`.
    pub fn with_op(mut self, new_op: &'static str) -> Self {
        match &mut self {
            CommError::Timeout { op, .. }
            | CommError::Aborted { op, .. }
            | CommError::LengthMismatch { op, .. }
            | CommError::Truncated { op, .. }
            | CommError::InvalidRank { op, .. }
            | CommError::Protocol { op, .. }
            | CommError::Backend { op, .. }
            | CommError::Setup { op, .. }
            | CommError::Mismatch { op, .. } => *op = new_op,
        }
        self
    }
}
