//! [`LocalTransport`]: N PCPP ranks as threads of one process.
//!
//! Used to test the patch-parallel pipeline (halo exchange, group-norm
//! all-reduce, attention all-gather) without MPI or several GPUs, and to run
//! several patches in one process. All ranks of a world share one mailbox
//! table keyed by `(context, source, destination, tag)` behind a `Mutex` and a
//! `Condvar`. Sends are eager (the payload is moved into the mailbox, never
//! copied) and complete at once; receives get a sequence number per mailbox
//! when posted, so messages match in posting order no matter in which order the
//! [`Pending`] handles are waited on. Every [`Transport::split`] gets a fresh
//! context id, so sub-group traffic never matches parent traffic.
//! Collectives come from [`crate::collectives`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::collectives;
use crate::error::CommError;
use crate::stats::{CommKind, CommStats, StatsCounter};
use crate::transport::{Pending, PendingOp, Transport, TransportOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MailboxKey {
    ctx: u64,
    src: usize,
    dst: usize,
    tag: u32,
}

#[derive(Debug, Default)]
struct Mailbox {
    next_send: u64,
    next_recv: u64,
    msgs: HashMap<u64, Vec<u8>>,
    /// Sequence numbers of receives dropped unwaited whose message has not
    /// arrived yet; the message is discarded on arrival.
    cancelled: HashSet<u64>,
}

#[derive(Debug, Default)]
struct State {
    mailboxes: HashMap<MailboxKey, Mailbox>,
    abort: Option<(usize, String)>,
    /// `(parent context, split sequence number, colour)` -> context id.
    contexts: HashMap<(u64, u64, u32), u64>,
    next_ctx: u64,
}

#[derive(Debug, Default)]
struct World {
    state: Mutex<State>,
    cv: Condvar,
}

impl World {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One rank of an in-process world. Create a world with
/// [`LocalTransport::create`].
pub struct LocalTransport {
    world: Arc<World>,
    ctx: u64,
    rank: usize,
    size: usize,
    /// World rank of every member of this (sub-)group, indexed by group rank.
    world_ranks: Arc<Vec<usize>>,
    opts: TransportOptions,
    stats: Arc<StatsCounter>,
    splits: AtomicU64,
}

impl std::fmt::Debug for LocalTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTransport")
            .field("ctx", &self.ctx)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl LocalTransport {
    /// Creates a world of `n` ranks; element `r` of the result is rank `r`, to
    /// be moved into its own thread.
    pub fn create(n: usize, opts: TransportOptions) -> Vec<Arc<dyn Transport>> {
        let world = Arc::new(World::default());
        let world_ranks = Arc::new((0..n).collect::<Vec<_>>());
        (0..n)
            .map(|rank| {
                Arc::new(LocalTransport {
                    world: world.clone(),
                    ctx: 0,
                    rank,
                    size: n,
                    world_ranks: world_ranks.clone(),
                    opts: opts.clone(),
                    stats: Arc::new(StatsCounter::new()),
                    splits: AtomicU64::new(0),
                }) as Arc<dyn Transport>
            })
            .collect()
    }

    /// Runs `f` on every rank of a fresh `n`-rank world, each in its own thread, and returns the
    /// results in rank order.
    ///
    /// A rank that returns an error (or panics) aborts the world, so ranks blocked on it fail at
    /// once instead of waiting for the timeout; the error returned is the one that happened
    /// first, not the "aborted" errors it caused on the other ranks.
    pub fn run<T, E, F>(n: usize, opts: TransportOptions, f: F) -> Result<Vec<T>, RankError<E>>
    where
        T: Send,
        E: Send,
        F: Fn(Arc<dyn Transport>) -> Result<T, E> + Sync,
    {
        let world = LocalTransport::create(n, opts);
        let order = AtomicU64::new(0);
        let f = &f;
        let order = &order;
        let outcomes: Vec<Result<T, (u64, RankError<E>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = world
                .into_iter()
                .enumerate()
                .map(|(rank, t)| {
                    s.spawn(move || {
                        let fail = |t: &dyn Transport, e: RankError<E>| {
                            let seq = order.fetch_add(1, Ordering::SeqCst);
                            t.abort(&format!("rank {rank} failed"));
                            Err((seq, e))
                        };
                        let res =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(t.clone())));
                        match res {
                            Ok(Ok(v)) => Ok(v),
                            Ok(Err(e)) => fail(t.as_ref(), RankError::Failed { rank, source: e }),
                            Err(p) => {
                                let msg = p
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| p.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "panic".into());
                                fail(t.as_ref(), RankError::Panicked { rank, msg })
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err((
                            u64::MAX,
                            RankError::Panicked {
                                rank,
                                msg: "thread could not be joined".into(),
                            },
                        ))
                    })
                })
                .collect()
        });
        let mut values = Vec::with_capacity(n);
        let mut first: Option<(u64, RankError<E>)> = None;
        for o in outcomes {
            match o {
                Ok(v) => values.push(v),
                Err((seq, e)) => {
                    let earlier = match &first {
                        Some((s, _)) => seq < *s,
                        None => true,
                    };
                    if earlier {
                        first = Some((seq, e));
                    }
                }
            }
        }
        match first {
            Some((_, e)) => Err(e),
            None => Ok(values),
        }
    }

    fn world_rank(&self) -> usize {
        self.world_ranks[self.rank]
    }

    fn check_peer(&self, peer: usize, tag: u32) -> Result<(), CommError> {
        if peer < self.size {
            Ok(())
        } else {
            Err(CommError::InvalidRank {
                op: "exchange",
                peer,
                tag,
                size: self.size,
            })
        }
    }
}

/// The first failure of a [`LocalTransport::run`] world.
#[derive(Debug)]
pub enum RankError<E> {
    /// Rank `rank` returned an error.
    Failed {
        /// World rank that failed.
        rank: usize,
        /// Its error.
        source: E,
    },
    /// Rank `rank` panicked.
    Panicked {
        /// World rank that panicked.
        rank: usize,
        /// The panic message.
        msg: String,
    },
}

impl<E> RankError<E> {
    /// The rank that failed.
    pub fn rank(&self) -> usize {
        match self {
            RankError::Failed { rank, .. } | RankError::Panicked { rank, .. } => *rank,
        }
    }
}

impl<E: std::fmt::Display> std::fmt::Display for RankError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RankError::Failed { rank, source } => write!(f, "rank {rank}: {source}"),
            RankError::Panicked { rank, msg } => write!(f, "rank {rank} panicked: {msg}"),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for RankError<E> {}

struct RecvSlot {
    peer: usize,
    len: usize,
    key: MailboxKey,
    seq: u64,
    done: bool,
}

struct LocalPending {
    world: Arc<World>,
    stats: Arc<StatsCounter>,
    kind: CommKind,
    tag: u32,
    timeout: Duration,
    slots: Vec<RecvSlot>,
    results: Vec<Vec<u8>>,
}

impl LocalPending {
    fn first_outstanding_peer(&self) -> usize {
        self.slots.iter().find(|s| !s.done).map_or(0, |s| s.peer)
    }

    fn aborted(&self, by_rank: usize, reason: &str) -> CommError {
        CommError::Aborted {
            op: "exchange",
            peer: self.first_outstanding_peer(),
            tag: self.tag,
            by_rank,
            reason: reason.to_string(),
        }
    }

    /// Takes every message that has arrived. Returns `Ok(true)` when all
    /// receives are done.
    fn harvest(&mut self, state: &mut State) -> Result<bool, CommError> {
        let mut all_done = true;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.done {
                continue;
            }
            let msg = state
                .mailboxes
                .get_mut(&slot.key)
                .and_then(|mb| mb.msgs.remove(&slot.seq));
            match msg {
                Some(msg) => {
                    slot.done = true;
                    if msg.len() != slot.len {
                        return Err(CommError::LengthMismatch {
                            op: "exchange",
                            peer: slot.peer,
                            tag: self.tag,
                            expected: slot.len,
                            actual: msg.len(),
                        });
                    }
                    self.stats.record_recv(self.kind, msg.len());
                    self.results[i] = msg;
                }
                None => all_done = false,
            }
        }
        Ok(all_done)
    }
}

impl PendingOp for LocalPending {
    fn wait(mut self: Box<Self>) -> Result<Vec<Vec<u8>>, CommError> {
        let world = self.world.clone();
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut guard = world.lock();
        loop {
            if self.harvest(&mut guard)? {
                return Ok(std::mem::take(&mut self.results));
            }
            if let Some((by, reason)) = &guard.abort {
                return Err(self.aborted(*by, reason));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    op: "exchange",
                    peer: self.first_outstanding_peer(),
                    tag: self.tag,
                    waited: now - start,
                });
            }
            guard = world
                .cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn is_complete(&self) -> bool {
        let state = self.world.lock();
        state.abort.is_some()
            || self.slots.iter().filter(|s| !s.done).all(|s| {
                state
                    .mailboxes
                    .get(&s.key)
                    .is_some_and(|mb| mb.msgs.contains_key(&s.seq))
            })
    }
}

impl Drop for LocalPending {
    fn drop(&mut self) {
        if self.slots.iter().all(|s| s.done) {
            return;
        }
        let mut state = self.world.lock();
        for slot in self.slots.iter().filter(|s| !s.done) {
            let mb = state.mailboxes.entry(slot.key).or_default();
            if mb.msgs.remove(&slot.seq).is_none() {
                mb.cancelled.insert(slot.seq);
            }
        }
    }
}

impl Transport for LocalTransport {
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
        let layout = collectives::split_layout(self, color, key)?;
        let seq = self.splits.fetch_add(1, Ordering::Relaxed);
        let ctx = {
            let mut state = self.world.lock();
            let id = (self.ctx, seq, color);
            match state.contexts.get(&id) {
                Some(&c) => c,
                None => {
                    state.next_ctx += 1;
                    let c = state.next_ctx;
                    state.contexts.insert(id, c);
                    c
                }
            }
        };
        let world_ranks: Vec<usize> = layout
            .members
            .iter()
            .map(|&m| self.world_ranks[m])
            .collect();
        Ok(Arc::new(LocalTransport {
            world: self.world.clone(),
            ctx,
            rank: layout.new_rank,
            size: layout.members.len(),
            world_ranks: Arc::new(world_ranks),
            opts: self.opts.clone(),
            stats: Arc::new(StatsCounter::new()),
            splits: AtomicU64::new(0),
        }))
    }

    fn exchange(
        &self,
        kind: CommKind,
        tag: u32,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: Vec<(usize, usize)>,
    ) -> Result<Pending, CommError> {
        for &(peer, _) in &sends {
            self.check_peer(peer, tag)?;
        }
        for &(peer, _) in &recvs {
            self.check_peer(peer, tag)?;
        }
        let mut slots = Vec::with_capacity(recvs.len());
        {
            let mut state = self.world.lock();
            if let Some((by, reason)) = &state.abort {
                let peer = sends
                    .first()
                    .map(|s| s.0)
                    .or_else(|| recvs.first().map(|r| r.0))
                    .unwrap_or(self.rank);
                return Err(CommError::Aborted {
                    op: "exchange",
                    peer,
                    tag,
                    by_rank: *by,
                    reason: reason.clone(),
                });
            }
            let any_sends = !sends.is_empty();
            for (peer, data) in sends {
                self.stats.record_send(kind, data.len());
                let key = MailboxKey {
                    ctx: self.ctx,
                    src: self.rank,
                    dst: peer,
                    tag,
                };
                let mb = state.mailboxes.entry(key).or_default();
                let seq = mb.next_send;
                mb.next_send += 1;
                if !mb.cancelled.remove(&seq) {
                    mb.msgs.insert(seq, data);
                }
            }
            for (peer, len) in recvs {
                let key = MailboxKey {
                    ctx: self.ctx,
                    src: peer,
                    dst: self.rank,
                    tag,
                };
                let mb = state.mailboxes.entry(key).or_default();
                let seq = mb.next_recv;
                mb.next_recv += 1;
                slots.push(RecvSlot {
                    peer,
                    len,
                    key,
                    seq,
                    done: false,
                });
            }
            if any_sends {
                self.world.cv.notify_all();
            }
        }
        let results = vec![Vec::new(); slots.len()];
        Ok(Pending::new(Box::new(LocalPending {
            world: self.world.clone(),
            stats: self.stats.clone(),
            kind,
            tag,
            timeout: self.opts.timeout,
            slots,
            results,
        })))
    }

    fn abort(&self, reason: &str) {
        let mut state = self.world.lock();
        if state.abort.is_none() {
            state.abort = Some((self.world_rank(), reason.to_string()));
        }
        self.world.cv.notify_all();
    }

    fn stats(&self) -> CommStats {
        self.stats.snapshot()
    }

    fn reset_stats(&self) {
        self.stats.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_returns_results_in_rank_order() {
        let out = LocalTransport::run(3, TransportOptions::default(), |t| {
            Ok::<_, CommError>(t.rank() * 10)
        })
        .unwrap();
        assert_eq!(out, vec![0, 10, 20]);
    }

    #[test]
    fn run_reports_the_root_failure_not_the_aborts_it_causes() {
        let err = LocalTransport::run(
            3,
            TransportOptions::with_timeout(Duration::from_secs(30)),
            |t| {
                if t.rank() == 1 {
                    return Err("bad input on rank 1".to_string());
                }
                // The others wait for a message rank 1 never sends; the abort frees them.
                t.exchange(CommKind::Other, 1, Vec::new(), vec![(1, 4)])
                    .and_then(Pending::wait)
                    .map_err(|e| e.to_string())?;
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(err.rank(), 1);
        assert_eq!(err.to_string(), "rank 1: bad input on rank 1");
    }

    #[test]
    fn run_turns_a_panic_into_an_error() {
        let err = LocalTransport::run(2, TransportOptions::default(), |t| {
            if t.rank() == 0 {
                panic!("boom");
            }
            Ok::<_, String>(())
        })
        .unwrap_err();
        assert!(matches!(err, RankError::Panicked { rank: 0, .. }), "{err}");
    }
}
