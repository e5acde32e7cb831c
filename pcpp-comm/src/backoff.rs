//! The polling of host-side waits (pending MPI and UCX operations, the host streams' flag
//! waits): the first polls only yield the thread, later ones sleep 50 µs, so that a short wait
//! answers at once and a long one does not keep a core busy.

use std::time::Duration;

/// Polls before the waiting thread starts to sleep between polls.
const YIELDS: u32 = 200;

/// The pause between two polls of one wait.
#[derive(Default)]
pub(crate) struct Backoff {
    polls: u32,
}

impl Backoff {
    /// Pauses before the next poll.
    pub(crate) fn snooze(&mut self) {
        self.polls = self.polls.saturating_add(1);
        if self.polls < YIELDS {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
