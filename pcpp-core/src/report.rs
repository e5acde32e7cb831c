//! What a patch-parallel run measures (PCPP §3, architecture principle 7): bytes sent and received
//! per layer kind and per step, waits on stale data still in flight, and step times. The CLI writes
//! a [`RunReport`] as JSON with `--report`.

use std::sync::atomic::{AtomicU64, Ordering};

use pcpp_comm::CommKind;
use serde::{Deserialize, Serialize};

/// Bytes per layer kind (the four kinds a patch-parallel model communicates for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindBytes {
    /// Convolution halo rows.
    pub halo: u64,
    /// Group-norm statistics.
    pub group_norm: u64,
    /// Self-attention K/V.
    pub attention: u64,
    /// Output gather.
    pub gather: u64,
}

impl KindBytes {
    /// Sum over kinds.
    pub fn total(&self) -> u64 {
        self.halo + self.group_norm + self.attention + self.gather
    }

    /// The entry of `kind` (`None` for kinds a model layer never uses).
    pub fn get_mut(&mut self, kind: CommKind) -> Option<&mut u64> {
        match kind {
            CommKind::Halo => Some(&mut self.halo),
            CommKind::GroupNorm => Some(&mut self.group_norm),
            CommKind::Attention => Some(&mut self.attention),
            CommKind::Gather => Some(&mut self.gather),
            CommKind::Control | CommKind::Other => None,
        }
    }

    /// The entry of `kind` (0 for kinds a model layer never uses).
    pub fn get(&self, kind: CommKind) -> u64 {
        match kind {
            CommKind::Halo => self.halo,
            CommKind::GroupNorm => self.group_norm,
            CommKind::Attention => self.attention,
            CommKind::Gather => self.gather,
            CommKind::Control | CommKind::Other => 0,
        }
    }

    /// Adds `n` bytes to `kind`.
    pub fn add(&mut self, kind: CommKind, n: u64) {
        if let Some(v) = self.get_mut(kind) {
            *v += n;
        }
    }

    /// Element-wise difference `self − earlier` (counters only grow).
    pub fn since(&self, earlier: &KindBytes) -> KindBytes {
        KindBytes {
            halo: self.halo - earlier.halo,
            group_norm: self.group_norm - earlier.group_norm,
            attention: self.attention - earlier.attention,
            gather: self.gather - earlier.gather,
        }
    }

    /// Element-wise sum.
    pub fn plus(&self, o: &KindBytes) -> KindBytes {
        KindBytes {
            halo: self.halo + o.halo,
            group_norm: self.group_norm + o.group_norm,
            attention: self.attention + o.attention,
            gather: self.gather + o.gather,
        }
    }
}

/// Bytes a rank sends and receives, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Bytes sent.
    pub sent: KindBytes,
    /// Bytes received.
    pub recvd: KindBytes,
}

impl Traffic {
    /// Element-wise sum.
    pub fn plus(&self, o: &Traffic) -> Traffic {
        Traffic {
            sent: self.sent.plus(&o.sent),
            recvd: self.recvd.plus(&o.recvd),
        }
    }
}

/// Lock-free per-kind byte counters, bumped when an exchange is posted (sent bytes, and the
/// lengths of the posted receives), so the bytes of a step are counted in the step that moves them.
#[derive(Debug, Default)]
pub struct ByteCounters {
    // Per kind (halo, group norm, attention, gather): sent, received.
    c: [[AtomicU64; 2]; 4],
}

fn slot(kind: CommKind) -> Option<usize> {
    match kind {
        CommKind::Halo => Some(0),
        CommKind::GroupNorm => Some(1),
        CommKind::Attention => Some(2),
        CommKind::Gather => Some(3),
        CommKind::Control | CommKind::Other => None,
    }
}

impl ByteCounters {
    /// Records one posted exchange.
    pub fn record(&self, kind: CommKind, sent: u64, recvd: u64) {
        if let Some(i) = slot(kind) {
            self.c[i][0].fetch_add(sent, Ordering::Relaxed);
            self.c[i][1].fetch_add(recvd, Ordering::Relaxed);
        }
    }

    /// The totals so far.
    pub fn snapshot(&self) -> Traffic {
        let mut t = Traffic::default();
        for kind in [
            CommKind::Halo,
            CommKind::GroupNorm,
            CommKind::Attention,
            CommKind::Gather,
        ] {
            if let Some(i) = slot(kind) {
                t.sent.add(kind, self.c[i][0].load(Ordering::Relaxed));
                t.recvd.add(kind, self.c[i][1].load(Ordering::Relaxed));
            }
        }
        t
    }
}

/// One denoising step on one rank.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Step index, from 0.
    pub step: usize,
    /// Whether the step was synchronous (warm-up).
    pub sync: bool,
    /// Wall time from this step's start to the next step's (or the generation's end), seconds.
    pub seconds: f64,
    /// Bytes posted in this step, per kind.
    pub traffic: Traffic,
    /// Reads of stale context.
    pub stale_reads: u64,
    /// Stale reads that had to wait for data still in flight.
    pub waits: u64,
    /// Time spent in those waits, seconds.
    pub wait_seconds: f64,
}

/// A whole generation on one rank.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// World rank and size.
    pub world_rank: usize,
    pub world_size: usize,
    /// CFG group of this rank and the ranks that share its image.
    pub group: usize,
    pub group_size: usize,
    /// Band index of this rank within its group.
    pub patch: usize,
    /// Parallel scheme.
    pub mode: crate::ParallelMode,
    /// Partial-conditioning portion per level (PCPP); infinite (full context, DistriFusion) is
    /// written as JSON `null` and read back as infinity.
    #[serde(with = "portion_json")]
    pub portion: Vec<f64>,
    /// Group-norm statistics mode.
    pub gn_mode: crate::GnMode,
    /// Synchronous steps at the start.
    pub warmup_steps: usize,
    /// Per step.
    pub steps: Vec<StepReport>,
    /// Sum over steps.
    pub total: Traffic,
    /// Smallest and largest age (in steps) of any stale read; both 1 when the schedule is right.
    pub min_stale_age: u64,
    pub max_stale_age: u64,
}

/// JSON has no infinity: portions travel as numbers, or `null` for an infinite (full) window.
mod portion_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let o: Vec<Option<f64>> = v.iter().map(|&x| x.is_finite().then_some(x)).collect();
        o.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let o: Vec<Option<f64>> = Vec::deserialize(d)?;
        Ok(o.into_iter().map(|x| x.unwrap_or(f64::INFINITY)).collect())
    }
}

#[cfg(test)]
mod portion_tests {
    use super::*;

    #[test]
    fn infinite_portion_survives_json() {
        let r = RunReport {
            portion: vec![0.3, f64::INFINITY],
            ..RunReport::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"portion\":[0.3,null]"), "{text}");
        let back: RunReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back.portion, r.portion);
    }
}
