//! The threads of the device exchange engine ([`super`], PCPP §7.4's communication stream): the
//! communication thread, which posts the exchanges the host functions hand over and progresses
//! them until they complete (then sets their completion flags), fail or time out, and the
//! watchdog, which reports the exchanges that stall.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use super::{lock, OpRec, OpState, Queue, StreamOps, Wire, CALL_POST, CALL_TEST, PARK_POLL};

impl Queue {
    /// What the communication thread is doing, in words.
    fn activity(&self) -> String {
        let call = self.call.load(Ordering::Acquire);
        let since = Duration::from_micros(self.call_since.load(Ordering::Relaxed));
        let name = match call {
            CALL_POST => "posting",
            CALL_TEST => "progress/test",
            _ => return "between transport calls".into(),
        };
        format!(
            "inside the transport's {name} call for {:.1} s",
            self.epoch.elapsed().saturating_sub(since).as_secs_f64()
        )
    }

    /// The report of `op`'s run, handed over `waited` ago; `st` is its state.
    fn stall_report(&self, op: &OpRec, st: &OpState, waited: Duration) -> String {
        let mut peers: Vec<usize> = op.sends.iter().chain(&op.recvs).map(|m| m.peer).collect();
        peers.sort_unstable();
        peers.dedup();
        let where_ = if st.taken < st.posted {
            "the communication thread has not handed it to the library yet".to_string()
        } else if st.pending.is_empty() {
            "posted, its requests not yet described".to_string()
        } else {
            format!("still in flight: {}", st.pending)
        };
        format!(
            "{} device exchange stalled: the stream has waited {:.1} s for an exchange of {} sends \
             and {} receives (peers {peers:?}); {where_}; the communication thread is {} (a call \
             that does not return: the transport or the library under it blocks; requests in \
             flight: a peer has not answered)",
            self.label,
            waited.as_secs_f64(),
            op.sends.len(),
            op.recvs.len(),
            self.activity()
        )
    }
}

/// An exchange the communication thread has posted.
struct InFlight<R> {
    op: Arc<OpRec>,
    reqs: Vec<R>,
    /// How many requests `op`'s `pending` describes (`None`: not described yet).
    described: Option<usize>,
    since: Instant,
}

/// The communication thread: posts the exchanges the host functions hand over, in order, and
/// progresses them until they complete, fail or time out.
pub(super) fn comm_loop<W: Wire>(
    wire: &W,
    q: &Queue,
    ops: &dyn StreamOps,
    device: bool,
    timeout: Duration,
) {
    let mut bound = 0usize;
    let mut active: Vec<InFlight<W::Req>> = Vec::new();
    let mut idle = 0u32;
    loop {
        let new: Vec<Arc<OpRec>> = {
            let mut st = lock(&q.st);
            while active.is_empty() && st.ready.is_empty() && !st.shutdown {
                st = q.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            if st.shutdown {
                return;
            }
            st.ready.drain(..).collect()
        };
        for op in new {
            let ctx = q.ctx.load(Ordering::Relaxed);
            if device && ctx != 0 && ctx != bound {
                // SAFETY: the context of a live stream the engine was given.
                match unsafe { ops.bind_context(ctx) } {
                    Ok(()) => bound = ctx,
                    Err(e) => {
                        q.fail(format!("binding the device context: {e}"));
                        op.failed(ops);
                        continue;
                    }
                }
            }
            let mut reqs = Vec::with_capacity(op.sends.len() + op.recvs.len());
            // SAFETY: the buffers stay valid until the exchange completes: the stream waits on
            // the flag (or in the host function) until then.
            let posted = q.in_call(CALL_POST, || unsafe {
                wire.post(&op.sends, &op.recvs, device, &mut reqs)
            });
            match posted {
                Ok(()) => {
                    op.taken();
                    active.push(InFlight {
                        op,
                        reqs,
                        described: None,
                        since: Instant::now(),
                    });
                }
                Err(e) => {
                    q.fail(e.to_string());
                    op.failed(ops);
                }
            }
        }
        let before = active.len();
        active.retain_mut(
            |InFlight {
                 op,
                 reqs,
                 described,
                 since: t0,
             }| {
                match q.in_call(CALL_TEST, || wire.test(reqs)) {
                    Ok(true) => {
                        op.complete(ops);
                        false
                    }
                    // Described only once it is slow (before the watchdog reports
                    // it), and again when requests complete: nothing on the common path.
                    Ok(false)
                        if t0.elapsed() >= q.stall_after / 2 && *described != Some(reqs.len()) =>
                    {
                        *described = Some(reqs.len());
                        lock(&op.state).pending = wire.describe(reqs);
                        true
                    }
                    Ok(false) if t0.elapsed() > timeout => {
                        q.fail(format!(
                            "{} sends and {} receives not complete after {:?}; is a peer gone?",
                            op.sends.len(),
                            op.recvs.len(),
                            t0.elapsed()
                        ));
                        op.failed(ops);
                        false
                    }
                    Ok(false) => true,
                    Err(e) => {
                        q.fail(e.to_string());
                        op.failed(ops);
                        false
                    }
                }
            },
        );
        if active.len() < before {
            idle = 0;
        } else if !active.is_empty() {
            idle += 1;
            if idle > 256 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// The watchdog: reports every exchange handed over more than [`Queue::stall_after`] ago that
/// has neither completed nor failed, once, with what the communication thread is doing (it may be
/// stuck inside a library call, so it cannot report itself).
pub(super) fn watch_loop(q: &Queue) {
    loop {
        {
            let st = lock(&q.st);
            if st.shutdown {
                return;
            }
            drop(q.cv.wait_timeout(st, PARK_POLL));
        }
        lock(&q.watch).retain_mut(|w| {
            let st = lock(&w.op.state);
            if st.completed + st.failed >= w.gen {
                return false;
            }
            if !w.reported && w.since.elapsed() >= q.stall_after {
                w.reported = true;
                let report = q.stall_report(&w.op, &st, w.since.elapsed());
                eprintln!("warning: {report}");
                lock(&q.stalls).push(report);
            }
            true
        });
    }
}
