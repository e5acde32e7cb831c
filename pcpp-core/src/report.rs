//! What a patch-parallel run measures (PCPP §3, architecture principle 7): bytes sent and received
//! per layer kind and per step, waits on stale data still in flight, and step times. The CLI writes
//! a [`RunReport`] as JSON with `--report`.

use std::sync::atomic::{AtomicU64, Ordering};

use pcpp_comm::CommKind;
use serde::{Deserialize, Serialize};

/// Bytes per layer kind (the four kinds a patch-parallel model communicates for, and the
/// all-reduces of tensor parallelism).
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
    /// All-reduces of tensor parallelism.
    #[serde(default)]
    pub all_reduce: u64,
}

impl KindBytes {
    /// Sum over kinds.
    pub fn total(&self) -> u64 {
        self.halo + self.group_norm + self.attention + self.gather + self.all_reduce
    }

    /// The entry of `kind` (`None` for kinds a model layer never uses).
    pub fn get_mut(&mut self, kind: CommKind) -> Option<&mut u64> {
        match kind {
            CommKind::Halo => Some(&mut self.halo),
            CommKind::GroupNorm => Some(&mut self.group_norm),
            CommKind::Attention => Some(&mut self.attention),
            CommKind::Gather => Some(&mut self.gather),
            CommKind::Other => Some(&mut self.all_reduce),
            CommKind::Control => None,
        }
    }

    /// The entry of `kind` (0 for kinds a model layer never uses).
    pub fn get(&self, kind: CommKind) -> u64 {
        match kind {
            CommKind::Halo => self.halo,
            CommKind::GroupNorm => self.group_norm,
            CommKind::Attention => self.attention,
            CommKind::Gather => self.gather,
            CommKind::Other => self.all_reduce,
            CommKind::Control => 0,
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
            all_reduce: self.all_reduce - earlier.all_reduce,
        }
    }

    /// Element-wise sum.
    pub fn plus(&self, o: &KindBytes) -> KindBytes {
        KindBytes {
            halo: self.halo + o.halo,
            group_norm: self.group_norm + o.group_norm,
            attention: self.attention + o.attention,
            gather: self.gather + o.gather,
            all_reduce: self.all_reduce + o.all_reduce,
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
    // Per kind (halo, group norm, attention, gather, all-reduce): sent, received.
    c: [[AtomicU64; 2]; 5],
}

fn slot(kind: CommKind) -> Option<usize> {
    match kind {
        CommKind::Halo => Some(0),
        CommKind::GroupNorm => Some(1),
        CommKind::Attention => Some(2),
        CommKind::Gather => Some(3),
        CommKind::Other => Some(4),
        CommKind::Control => None,
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
            CommKind::Other,
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
    /// Partial-conditioning portion per level (PCPP).
    #[serde(with = "portions_serde")]
    pub portion: Vec<f64>,
    /// Group-norm statistics mode.
    pub gn_mode: crate::GnMode,
    /// Synchronous steps at the start.
    pub warmup_steps: usize,
    /// What happens after the warm-up.
    #[serde(default)]
    pub sync_mode: crate::SyncMode,
    /// How `naive-patch` cuts the image.
    #[serde(default)]
    pub split_scheme: crate::SplitScheme,
    /// Per step.
    pub steps: Vec<StepReport>,
    /// Sum over steps.
    pub total: Traffic,
    /// Smallest and largest age (in steps) of any stale read; both 1 when the schedule is right.
    pub min_stale_age: u64,
    pub max_stale_age: u64,
    /// Bytes of the decode that followed the generation (one synchronous pass over the whole
    /// world, e.g. a patch-parallel VAE decode), per kind, when the caller adds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<Traffic>,
    /// Seconds this rank spent in that decode (its band, the exchanges and the gather), when the
    /// caller adds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_seconds: Option<f64>,
}

/// Serde for portion lists: DistriFusion's unbounded portion (`+∞`) is written as the string
/// `"inf"` (JSON has no infinity) and read back from it.
pub mod portions_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Portion {
        Finite(f64),
        Text(String),
    }

    /// Writes finite values as numbers and `+∞` as `"inf"`.
    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|&p| {
                if p.is_finite() {
                    Portion::Finite(p)
                } else {
                    Portion::Text("inf".into())
                }
            })
            .collect::<Vec<_>>()
            .serialize(s)
    }

    /// Reads numbers and `"inf"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Vec::<Portion>::deserialize(d)?
            .into_iter()
            .map(|p| match p {
                Portion::Finite(x) => Ok(x),
                Portion::Text(t) if t == "inf" => Ok(f64::INFINITY),
                Portion::Text(t) => Err(serde::de::Error::custom(format!(
                    "portion `{t}` is not a number or \"inf\""
                ))),
            })
            .collect()
    }

    #[cfg(test)]
    mod tests {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct P(#[serde(with = "super")] Vec<f64>);

        #[test]
        fn infinite_portion_round_trips() {
            let p = P(vec![0.3, f64::INFINITY]);
            let j = serde_json::to_string(&p).unwrap();
            assert_eq!(j, r#"[0.3,"inf"]"#);
            assert_eq!(serde_json::from_str::<P>(&j).unwrap(), p);
        }
    }
}

impl crate::PatchRuntime {
    /// The bytes the transports themselves counted (the group's and, when it is another one, the
    /// world's), per kind: what a report's own counts are checked against.
    pub fn transport_traffic(&self) -> Traffic {
        let mut stats = self.group_transport().stats();
        if !std::sync::Arc::ptr_eq(self.group_transport(), self.world_transport()) {
            stats.merge(&self.world_transport().stats());
        }
        let mut t = Traffic::default();
        for k in [
            CommKind::Halo,
            CommKind::GroupNorm,
            CommKind::Attention,
            CommKind::Gather,
            CommKind::Other,
        ] {
            let (s, r) = stats.bytes(k);
            t.sent.add(k, s);
            t.recvd.add(k, r);
        }
        t
    }
}
