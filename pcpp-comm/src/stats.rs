//! Per-layer-kind traffic accounting.
//!
//! PCPP / DistriFusion trade communication volume for latency: the report of
//! how many bytes each kind of layer (halo exchange for convolutions,
//! group-norm statistics, attention K/V, final gather, control) moves is how
//! the patch-parallel schedule is evaluated. [`CommKind`] labels every call and
//! [`CommStats`] is the snapshot returned by [`crate::Transport::stats`].

use std::sync::atomic::{AtomicU64, Ordering};

/// The kind of call site a message belongs to, for the per-kind byte report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommKind {
    /// Halo rows of convolution inputs exchanged between neighbouring patches.
    Halo,
    /// Group-norm partial statistics (sums / sums of squares).
    GroupNorm,
    /// Self-attention keys / values gathered from all patches.
    Attention,
    /// Gathering the final latent (or other full tensors).
    Gather,
    /// Control traffic: barriers, splits, schedule agreement.
    Control,
    /// Anything else.
    Other,
}

impl CommKind {
    /// All kinds, in report order.
    pub const ALL: [CommKind; 6] = [
        CommKind::Halo,
        CommKind::GroupNorm,
        CommKind::Attention,
        CommKind::Gather,
        CommKind::Control,
        CommKind::Other,
    ];

    /// Stable lower-case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            CommKind::Halo => "halo",
            CommKind::GroupNorm => "group_norm",
            CommKind::Attention => "attention",
            CommKind::Gather => "gather",
            CommKind::Control => "control",
            CommKind::Other => "other",
        }
    }

    /// Position of the kind in [`CommKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            CommKind::Halo => 0,
            CommKind::GroupNorm => 1,
            CommKind::Attention => 2,
            CommKind::Gather => 3,
            CommKind::Control => 4,
            CommKind::Other => 5,
        }
    }
}

/// Traffic counters of one [`CommKind`] (or of all of them, for totals).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindStats {
    /// Payload bytes sent by this rank.
    pub bytes_sent: u64,
    /// Payload bytes received by this rank.
    pub bytes_recvd: u64,
    /// Messages sent by this rank.
    pub msgs_sent: u64,
    /// Messages received by this rank.
    pub msgs_recvd: u64,
}

impl KindStats {
    fn add(&mut self, o: &KindStats) {
        self.bytes_sent += o.bytes_sent;
        self.bytes_recvd += o.bytes_recvd;
        self.msgs_sent += o.msgs_sent;
        self.msgs_recvd += o.msgs_recvd;
    }
}

/// Snapshot of a transport's traffic, per [`CommKind`].
///
/// Each transport object counts only its own traffic: a sub-transport created
/// by [`crate::Transport::split`] starts at zero and its traffic is *not* added
/// to the parent's counters. Sum the snapshots yourself for a combined report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommStats {
    per_kind: [KindStats; 6],
}

impl CommStats {
    /// Counters of one kind.
    pub fn get(&self, kind: CommKind) -> KindStats {
        self.per_kind[kind.index()]
    }

    /// `(bytes sent, bytes received)` of one kind.
    pub fn bytes(&self, kind: CommKind) -> (u64, u64) {
        let k = self.get(kind);
        (k.bytes_sent, k.bytes_recvd)
    }

    /// Counters summed over all kinds.
    pub fn total(&self) -> KindStats {
        let mut t = KindStats::default();
        for k in &self.per_kind {
            t.add(k);
        }
        t
    }

    /// Adds another snapshot (e.g. of a split sub-transport) into this one.
    pub fn merge(&mut self, other: &CommStats) {
        for (a, b) in self.per_kind.iter_mut().zip(other.per_kind.iter()) {
            a.add(b);
        }
    }

    /// Export rows `(kind name, bytes sent, bytes received)` in
    /// [`CommKind::ALL`] order, followed by a `"total"` row.
    pub fn rows(&self) -> Vec<(&'static str, u64, u64)> {
        let mut rows: Vec<(&'static str, u64, u64)> = CommKind::ALL
            .iter()
            .map(|&k| {
                let (s, r) = self.bytes(k);
                (k.name(), s, r)
            })
            .collect();
        let t = self.total();
        rows.push(("total", t.bytes_sent, t.bytes_recvd));
        rows
    }

    /// The same rows as [`CommStats::rows`] rendered as a JSON object
    /// `{"halo":{"sent":..,"recvd":..,"msgs_sent":..,"msgs_recvd":..},...}`.
    pub fn to_json(&self) -> String {
        let mut parts: Vec<String> = CommKind::ALL
            .iter()
            .map(|&k| json_entry(k.name(), &self.get(k)))
            .collect();
        parts.push(json_entry("total", &self.total()));
        format!("{{{}}}", parts.join(","))
    }
}

fn json_entry(name: &str, k: &KindStats) -> String {
    format!(
        "\"{name}\":{{\"sent\":{},\"recvd\":{},\"msgs_sent\":{},\"msgs_recvd\":{}}}",
        k.bytes_sent, k.bytes_recvd, k.msgs_sent, k.msgs_recvd
    )
}

/// Lock-free counters a back-end embeds to implement `stats` / `reset_stats`.
#[derive(Debug, Default)]
pub struct StatsCounter {
    // Per kind: bytes sent, bytes received, messages sent, messages received.
    counters: [[AtomicU64; 4]; 6],
}

impl StatsCounter {
    /// New counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one sent message of `bytes` payload bytes.
    pub fn record_send(&self, kind: CommKind, bytes: usize) {
        let c = &self.counters[kind.index()];
        c[0].fetch_add(bytes as u64, Ordering::Relaxed);
        c[2].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one received message of `bytes` payload bytes.
    pub fn record_recv(&self, kind: CommKind, bytes: usize) {
        let c = &self.counters[kind.index()];
        c[1].fetch_add(bytes as u64, Ordering::Relaxed);
        c[3].fetch_add(1, Ordering::Relaxed);
    }

    /// Current values.
    pub fn snapshot(&self) -> CommStats {
        let mut s = CommStats::default();
        for (dst, c) in s.per_kind.iter_mut().zip(self.counters.iter()) {
            dst.bytes_sent = c[0].load(Ordering::Relaxed);
            dst.bytes_recvd = c[1].load(Ordering::Relaxed);
            dst.msgs_sent = c[2].load(Ordering::Relaxed);
            dst.msgs_recvd = c[3].load(Ordering::Relaxed);
        }
        s
    }

    /// Sets every counter back to zero.
    pub fn reset(&self) {
        for c in self.counters.iter().flatten() {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_kind_and_total() {
        let c = StatsCounter::new();
        c.record_send(CommKind::Halo, 10);
        c.record_send(CommKind::Halo, 5);
        c.record_recv(CommKind::Attention, 7);
        let s = c.snapshot();
        assert_eq!(s.bytes(CommKind::Halo), (15, 0));
        assert_eq!(s.get(CommKind::Halo).msgs_sent, 2);
        assert_eq!(s.bytes(CommKind::Attention), (0, 7));
        assert_eq!(s.total().bytes_sent, 15);
        assert_eq!(s.total().msgs_recvd, 1);
        let rows = s.rows();
        assert_eq!(rows.len(), 7);
        assert_eq!(rows[0], ("halo", 15, 0));
        assert_eq!(rows[6], ("total", 15, 7));
        assert!(s.to_json().starts_with("{\"halo\":{\"sent\":15,"));
        c.reset();
        assert_eq!(c.snapshot(), CommStats::default());
    }

    #[test]
    fn names_and_indices_are_consistent() {
        for (i, k) in CommKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert!(!k.name().is_empty());
        }
    }
}
