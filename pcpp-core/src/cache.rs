//! The stale-activation cache (PCPP §2.1, §3; §7 items 1 and 12): one slot per communicating layer,
//! registered at model construction and keyed by the layer's path, in the same order on every rank
//! (the slot index is the message tag). Each slot is double-buffered by step parity: step `t`
//! publishes into buffer `t mod 2` and reads buffer `(t−1) mod 2`, and every entry is stamped with
//! the step it was produced at, so staleness is checked, not assumed. Buffers are owned by the
//! cache for the whole generation (never re-allocated under a captured graph).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pcpp_comm::CommKind;
use pcpp_kernels::{Device, Tensor};

use crate::exchange::{Inflight, RecvSpec};
use crate::layers::{CoreError, Result};

/// Data a layer published at some step: what it received (or will receive) and its own part.
pub(crate) enum Entry {
    /// Nothing published yet in this buffer.
    Empty,
    /// Exchange in flight.
    InFlight {
        step: usize,
        pending: Inflight,
        local: Option<Tensor>,
    },
    /// Exchange complete.
    Ready {
        step: usize,
        recvd: Vec<Tensor>,
        local: Option<Tensor>,
    },
}

/// One registered slot.
pub struct Slot {
    /// The layer's path.
    pub id: String,
    /// Index of registration (also the message tag).
    pub index: u32,
    /// Kind of layer, for byte accounting.
    pub kind: CommKind,
    bufs: [Mutex<Entry>; 2],
    /// Device buffers per parity that receives (and a kept local part) land in on the device
    /// path: allocated once, reused every step, so a captured graph keeps reading fresh data.
    persistent: [Mutex<Vec<Tensor>>; 2],
}

impl Slot {
    /// The persistent buffers of parity `step mod 2` for `specs` on `device`, allocated (zeroed) on
    /// first use or when the shapes change.
    pub(crate) fn persistent(
        &self,
        step: usize,
        specs: &[RecvSpec],
        device: Device,
    ) -> Result<Vec<Tensor>> {
        let mut p = self.persistent[step % 2]
            .lock()
            .map_err(|_| CoreError::Config(format!("slot `{}` poisoned", self.id)))?;
        let fits = p.len() == specs.len()
            && p.iter().zip(specs).all(|(t, s)| {
                t.shape() == s.shape.as_slice() && t.dtype() == s.dtype && t.device() == device
            });
        if !fits {
            *p = specs
                .iter()
                .map(|s| Tensor::zeros_on(&s.shape, s.dtype, device))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| CoreError::Config(format!("layer `{}`: {e}", self.id)))?;
        }
        Ok(p.clone())
    }
}

/// Counters of cache use, for the report and the staleness tests.
#[derive(Debug, Default)]
pub struct CacheStats {
    reads: AtomicU64,
    waits: AtomicU64,
    wait_ns: AtomicU64,
    min_age: AtomicU64,
    max_age: AtomicU64,
}

/// A snapshot of [`CacheStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Stale reads.
    pub reads: u64,
    /// Stale reads that had to wait for data still in flight.
    pub waits: u64,
    /// Time spent in those waits.
    pub wait: Duration,
    /// Smallest and largest `step − stamp` seen by a stale read (0 if none).
    pub min_age: u64,
    pub max_age: u64,
}

/// All slots of one model on one rank.
#[derive(Default)]
pub struct StaleCache {
    slots: Mutex<Vec<Arc<Slot>>>,
    stats: CacheStats,
}

impl StaleCache {
    /// A new empty cache.
    pub fn new() -> StaleCache {
        let c = StaleCache::default();
        c.stats.min_age.store(u64::MAX, Ordering::Relaxed);
        c
    }

    /// Registers a slot for layer `id` (model construction; same order on every rank).
    pub fn register(&self, id: &str, kind: CommKind) -> Result<Arc<Slot>> {
        let mut slots = self
            .slots
            .lock()
            .map_err(|_| CoreError::Config("stale cache poisoned".into()))?;
        if slots.iter().any(|s| s.id == id) {
            return Err(CoreError::Config(format!(
                "layer `{id}` registered twice in the stale cache"
            )));
        }
        let slot = Arc::new(Slot {
            id: id.to_string(),
            index: slots.len() as u32,
            kind,
            bufs: [Mutex::new(Entry::Empty), Mutex::new(Entry::Empty)],
            persistent: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
        });
        slots.push(slot.clone());
        Ok(slot)
    }

    /// Ids of the registered slots, in registration order.
    pub fn ids(&self) -> Vec<String> {
        self.slots
            .lock()
            .map(|s| s.iter().map(|s| s.id.clone()).collect())
            .unwrap_or_default()
    }

    /// Empties every slot (start of a generation) and resets the counters.
    pub fn clear(&self) -> Result<()> {
        for s in self
            .slots
            .lock()
            .map_err(|_| CoreError::Config("stale cache poisoned".into()))?
            .iter()
        {
            for b in &s.bufs {
                let old = std::mem::replace(
                    &mut *b
                        .lock()
                        .map_err(|_| CoreError::Config("slot poisoned".into()))?,
                    Entry::Empty,
                );
                if let Entry::InFlight { pending, .. } = old {
                    // Complete what is still in flight so that peers are not left waiting on us.
                    let _ = pending.wait(CoreError::Config);
                }
            }
        }
        self.stats.reads.store(0, Ordering::Relaxed);
        self.stats.waits.store(0, Ordering::Relaxed);
        self.stats.wait_ns.store(0, Ordering::Relaxed);
        self.stats.min_age.store(u64::MAX, Ordering::Relaxed);
        self.stats.max_age.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// The counters so far.
    pub fn counters(&self) -> CacheCounters {
        let s = &self.stats;
        let reads = s.reads.load(Ordering::Relaxed);
        CacheCounters {
            reads,
            waits: s.waits.load(Ordering::Relaxed),
            wait: Duration::from_nanos(s.wait_ns.load(Ordering::Relaxed)),
            min_age: if reads == 0 {
                0
            } else {
                s.min_age.load(Ordering::Relaxed)
            },
            max_age: s.max_age.load(Ordering::Relaxed),
        }
    }

    /// Stores what `slot` published at `step` (into buffer `step mod 2`).
    pub(crate) fn publish(
        &self,
        slot: &Slot,
        step: usize,
        entry_fn: impl FnOnce() -> Result<Entry>,
    ) -> Result<()> {
        let e = entry_fn()?;
        let mut b = slot.bufs[step % 2]
            .lock()
            .map_err(|_| CoreError::Config(format!("slot `{}` poisoned", slot.id)))?;
        if let Entry::InFlight { pending, .. } = std::mem::replace(&mut *b, Entry::Empty) {
            let _ = pending.wait(CoreError::Config);
        }
        *b = e;
        Ok(())
    }

    /// Reads what `slot` published at step `step − 1`, waiting for it if still in flight. Errors if the
    /// entry is missing or from another step (a broken schedule).
    pub(crate) fn read_previous(
        &self,
        slot: &Slot,
        step: usize,
        rank: usize,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let prev = step.checked_sub(1).ok_or_else(|| {
            CoreError::Config(format!("layer `{}`: a stale read at step 0", slot.id))
        })?;
        let mut b = slot.bufs[prev % 2]
            .lock()
            .map_err(|_| CoreError::Config(format!("slot `{}` poisoned", slot.id)))?;
        let entry = std::mem::replace(&mut *b, Entry::Empty);
        let (stamp, recvd, local) = match entry {
            Entry::Empty => {
                return Err(CoreError::Config(format!(
                    "layer `{}`: nothing was published at step {prev}",
                    slot.id
                )));
            }
            Entry::Ready { step, recvd, local } => (step, recvd, local),
            Entry::InFlight {
                step,
                pending,
                local,
            } => {
                let t0 = Instant::now();
                let done = pending.is_complete();
                let recvd = pending.wait(|msg| CoreError::Comm {
                    rank,
                    layer: slot.id.clone(),
                    msg,
                })?;
                if !done {
                    self.stats.waits.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .wait_ns
                        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                (step, recvd, local)
            }
        };
        let age = (step - stamp.min(step)) as u64;
        if stamp > step {
            return Err(CoreError::Config(format!(
                "layer `{}`: entry of step {stamp} read at step {step}",
                slot.id
            )));
        }
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats.min_age.fetch_min(age, Ordering::Relaxed);
        self.stats.max_age.fetch_max(age, Ordering::Relaxed);
        Ok((recvd, local))
    }

    /// Reads, without consuming it, what `slot` stored at the last synchronous step `stamp` (the
    /// frozen context of `SyncMode::None`), for a stale read at `step`. Errors if that entry is
    /// missing.
    pub(crate) fn read_frozen(
        &self,
        slot: &Slot,
        stamp: usize,
        step: usize,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let b = slot.bufs[stamp % 2]
            .lock()
            .map_err(|_| CoreError::Config(format!("slot `{}` poisoned", slot.id)))?;
        match &*b {
            Entry::Ready {
                step: s,
                recvd,
                local,
            } if *s == stamp && stamp < step => {
                let age = (step - stamp) as u64;
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats.min_age.fetch_min(age, Ordering::Relaxed);
                self.stats.max_age.fetch_max(age, Ordering::Relaxed);
                Ok((recvd.clone(), local.clone()))
            }
            _ => Err(CoreError::Config(format!(
                "layer `{}`: no context frozen at step {stamp} for step {step}",
                slot.id
            ))),
        }
    }
}
