//! Transport-agnostic collectives built on [`Transport::exchange`].
//!
//! PCPP needs all-gather (attention K/V of all patches, final latent),
//! deterministic all-reduce (group-norm statistics, which must be bit-identical
//! on every rank so the patches stay consistent), broadcast (seed / schedule)
//! and barrier. A back-end that only offers point-to-point messaging (the
//! in-process [`crate::LocalTransport`], a future UCX back-end) gets all of them
//! from this module; the default methods of [`Transport`] call these helpers.
//!
//! Algorithms are linear (every rank talks to every other rank, or to a root),
//! which is cheapest in latency for the small rank counts of one node. All
//! traffic uses tags at or above [`RESERVED_TAG_BASE`], so it never matches a
//! layer's own exchanges, and relies on posting-order matching, so collectives
//! must be called in the same order on every rank.

use crate::error::CommError;
use crate::stats::CommKind;
use crate::transport::{Pending, Transport, RESERVED_TAG_BASE};

/// Tag of the length phase of [`start_all_gather_via_p2p`].
pub const TAG_ALL_GATHER_LEN: u32 = RESERVED_TAG_BASE;
/// Tag of the data phase of [`start_all_gather_via_p2p`].
pub const TAG_ALL_GATHER_DATA: u32 = RESERVED_TAG_BASE + 1;
/// Tag of [`all_reduce_sum_f32_via_p2p`].
pub const TAG_ALL_REDUCE: u32 = RESERVED_TAG_BASE + 2;
/// Tag of [`broadcast_via_p2p`].
pub const TAG_BROADCAST: u32 = RESERVED_TAG_BASE + 3;
/// Tag of [`barrier_via_p2p`].
pub const TAG_BARRIER: u32 = RESERVED_TAG_BASE + 4;

fn encode_len(len: usize) -> Vec<u8> {
    (len as u64).to_le_bytes().to_vec()
}

fn decode_len(op: &'static str, peer: usize, tag: u32, buf: &[u8]) -> Result<usize, CommError> {
    let arr: [u8; 8] = buf.try_into().map_err(|_| CommError::Protocol {
        op,
        peer,
        tag,
        detail: format!("length header has {} bytes, expected 8", buf.len()),
    })?;
    usize::try_from(u64::from_le_bytes(arr)).map_err(|_| CommError::Protocol {
        op,
        peer,
        tag,
        detail: "length header does not fit in usize".into(),
    })
}

fn check_rank(op: &'static str, rank: usize, tag: u32, size: usize) -> Result<(), CommError> {
    if rank < size {
        Ok(())
    } else {
        Err(CommError::InvalidRank {
            op,
            peer: rank,
            tag,
            size,
        })
    }
}

/// Blocking all-gather with variable lengths over point-to-point messages.
pub fn all_gather_via_p2p<T: Transport + ?Sized>(
    t: &T,
    kind: CommKind,
    data: &[u8],
) -> Result<Vec<Vec<u8>>, CommError> {
    start_all_gather_via_p2p(t, kind, data)?.wait()
}

/// Nonblocking all-gather with variable lengths over point-to-point messages.
///
/// The lengths are exchanged first (synchronously, 8 bytes per peer); the data
/// phase is left in flight in the returned [`Pending`], whose result is one
/// buffer per rank in rank order. Traffic is counted under `kind`, headers
/// included.
pub fn start_all_gather_via_p2p<T: Transport + ?Sized>(
    t: &T,
    kind: CommKind,
    data: &[u8],
) -> Result<Pending, CommError> {
    const OP: &str = "all_gather";
    let (n, me) = (t.size(), t.rank());
    if n == 1 {
        return Ok(Pending::ready(Ok(vec![data.to_vec()])));
    }
    let peers: Vec<usize> = (0..n).filter(|&p| p != me).collect();
    let sends = peers.iter().map(|&p| (p, encode_len(data.len()))).collect();
    let recvs = peers.iter().map(|&p| (p, 8)).collect();
    let headers = t
        .exchange(kind, TAG_ALL_GATHER_LEN, sends, recvs)
        .and_then(Pending::wait)
        .map_err(|e| e.with_op(OP))?;
    let mut recvs = Vec::with_capacity(peers.len());
    for (&p, h) in peers.iter().zip(headers.iter()) {
        recvs.push((p, decode_len(OP, p, TAG_ALL_GATHER_LEN, h)?));
    }
    let sends = peers.iter().map(|&p| (p, data.to_vec())).collect();
    let own = data.to_vec();
    let pending = t
        .exchange(kind, TAG_ALL_GATHER_DATA, sends, recvs)
        .map_err(|e| e.with_op(OP))?;
    Ok(pending.map(move |mut bufs| {
        bufs.insert(me, own);
        Ok(bufs)
    }))
}

/// Deterministic all-reduce (sum) of `f32` over point-to-point messages.
///
/// Rank 0 receives every contribution, adds them in rank order
/// (`((x0 + x1) + x2) + ...`) and sends the result back, so every rank holds
/// the bit-identical sum.
pub fn all_reduce_sum_f32_via_p2p<T: Transport + ?Sized>(
    t: &T,
    kind: CommKind,
    data: &mut [f32],
) -> Result<(), CommError> {
    const OP: &str = "all_reduce_sum_f32";
    let (n, me) = (t.size(), t.rank());
    if n == 1 {
        return Ok(());
    }
    let nbytes = std::mem::size_of_val(data);
    if me == 0 {
        let recvs = (1..n).map(|p| (p, nbytes)).collect();
        let parts = t
            .exchange(kind, TAG_ALL_REDUCE, Vec::new(), recvs)
            .and_then(Pending::wait)
            .map_err(|e| e.with_op(OP))?;
        for part in &parts {
            for (acc, chunk) in data.iter_mut().zip(part.chunks_exact(4)) {
                *acc += f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        let bytes = f32_to_bytes(data);
        let sends = (1..n).map(|p| (p, bytes.clone())).collect();
        t.exchange(kind, TAG_ALL_REDUCE, sends, Vec::new())
            .and_then(Pending::wait)
            .map_err(|e| e.with_op(OP))?;
    } else {
        let sends = vec![(0, f32_to_bytes(data))];
        let mut result = t
            .exchange(kind, TAG_ALL_REDUCE, sends, vec![(0, nbytes)])
            .and_then(Pending::wait)
            .map_err(|e| e.with_op(OP))?;
        let buf = result.pop().unwrap_or_default();
        for (dst, chunk) in data.iter_mut().zip(buf.chunks_exact(4)) {
            *dst = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
    }
    Ok(())
}

/// Little-endian bytes of a slice of `f32`.
pub fn f32_to_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Broadcast of a byte buffer of any length from `root` over point-to-point
/// messages (root sends a length header and then the data to every rank).
pub fn broadcast_via_p2p<T: Transport + ?Sized>(
    t: &T,
    kind: CommKind,
    root: usize,
    data: &mut Vec<u8>,
) -> Result<(), CommError> {
    const OP: &str = "broadcast";
    let (n, me) = (t.size(), t.rank());
    check_rank(OP, root, TAG_BROADCAST, n)?;
    if n == 1 {
        return Ok(());
    }
    if me == root {
        let mut sends = Vec::with_capacity(2 * (n - 1));
        for p in (0..n).filter(|&p| p != root) {
            sends.push((p, encode_len(data.len())));
            sends.push((p, data.clone()));
        }
        t.exchange(kind, TAG_BROADCAST, sends, Vec::new())
            .and_then(Pending::wait)
            .map_err(|e| e.with_op(OP))?;
    } else {
        let header = t
            .exchange(kind, TAG_BROADCAST, Vec::new(), vec![(root, 8)])
            .and_then(Pending::wait)
            .map_err(|e| e.with_op(OP))?;
        let len = decode_len(OP, root, TAG_BROADCAST, &header[0])?;
        let mut body = t
            .exchange(kind, TAG_BROADCAST, Vec::new(), vec![(root, len)])
            .and_then(Pending::wait)
            .map_err(|e| e.with_op(OP))?;
        *data = body.pop().unwrap_or_default();
    }
    Ok(())
}

/// Dissemination barrier (ceil(log2 n) rounds of empty messages), counted
/// under [`CommKind::Control`].
pub fn barrier_via_p2p<T: Transport + ?Sized>(t: &T) -> Result<(), CommError> {
    const OP: &str = "barrier";
    let (n, me) = (t.size(), t.rank());
    let mut k = 1;
    while k < n {
        let to = (me + k) % n;
        let from = (me + n - k) % n;
        t.exchange(
            CommKind::Control,
            TAG_BARRIER,
            vec![(to, Vec::new())],
            vec![(from, 0)],
        )
        .and_then(Pending::wait)
        .map_err(|e| e.with_op(OP))?;
        k *= 2;
    }
    Ok(())
}

/// Result of [`split_layout`]: the members of this rank's new group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitLayout {
    /// Ranks (in the parent transport) of the new group, in new-rank order.
    pub members: Vec<usize>,
    /// This rank's position in `members`.
    pub new_rank: usize,
}

/// Collective part of `split` for back-ends without a native one: all-gathers
/// `(color, key)` under [`CommKind::Control`] and returns the group of this
/// rank, ordered by key then parent rank.
pub fn split_layout<T: Transport + ?Sized>(
    t: &T,
    color: u32,
    key: u32,
) -> Result<SplitLayout, CommError> {
    let mut mine = color.to_le_bytes().to_vec();
    mine.extend_from_slice(&key.to_le_bytes());
    let all = t
        .all_gather(CommKind::Control, &mine)
        .map_err(|e| e.with_op("split"))?;
    let mut entries = Vec::with_capacity(all.len());
    for (r, b) in all.iter().enumerate() {
        if b.len() != 8 {
            return Err(CommError::Protocol {
                op: "split",
                peer: r,
                tag: TAG_ALL_GATHER_DATA,
                detail: format!("split entry has {} bytes, expected 8", b.len()),
            });
        }
        let c = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let k = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        entries.push((c, k));
    }
    Ok(layout_from_entries(&entries, t.rank()))
}

/// Pure part of [`split_layout`]: `entries[r] = (color, key)` of parent rank `r`.
pub fn layout_from_entries(entries: &[(u32, u32)], me: usize) -> SplitLayout {
    let color = entries[me].0;
    let mut members: Vec<usize> = (0..entries.len())
        .filter(|&r| entries[r].0 == color)
        .collect();
    members.sort_by_key(|&r| (entries[r].1, r));
    let new_rank = members.iter().position(|&r| r == me).unwrap_or(0);
    SplitLayout { members, new_rank }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_orders_by_key_then_rank() {
        let entries = [(0, 5), (1, 0), (0, 1), (1, 0), (0, 1)];
        let l = layout_from_entries(&entries, 4);
        assert_eq!(l.members, vec![2, 4, 0]);
        assert_eq!(l.new_rank, 1);
        let l = layout_from_entries(&entries, 3);
        assert_eq!(l.members, vec![1, 3]);
        assert_eq!(l.new_rank, 1);
    }

    #[test]
    fn length_header_roundtrip_and_error() {
        assert_eq!(decode_len("t", 0, 0, &encode_len(12345)).unwrap(), 12345);
        let e = decode_len("t", 3, 9, &[1, 2]).unwrap_err();
        assert_eq!((e.peer(), e.tag()), (3, 9));
    }
}
