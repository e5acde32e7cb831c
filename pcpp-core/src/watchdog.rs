//! A progress watchdog for runs whose communication the host cannot time out itself (PCPP §7.4
//! on the device path).
//!
//! With device-resident exchanges (NCCL), the host enqueues communication and never waits for a
//! message: when a peer dies, its partners' communication kernels spin forever and the host can
//! block inside the library (NCCL's queue of pending work fills up) instead of reaching a wait
//! that could time out. The watchdog thread is told of each step's progress; when none comes for
//! the transport's timeout it calls its stall action, which aborts the job, so a lost peer ends
//! the run with an error instead of a hang.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct State {
    last: Instant,
    stop: bool,
}

/// The watchdog of one generation.
pub(crate) struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching: `on_stall(idle)` runs (once, on the watchdog's thread) when no
    /// [`Watchdog::beat`] came for longer than `timeout`.
    pub fn start(timeout: Duration, on_stall: impl FnOnce(Duration) + Send + 'static) -> Watchdog {
        let shared = Arc::new((
            Mutex::new(State {
                last: Instant::now(),
                stop: false,
            }),
            Condvar::new(),
        ));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pcpp-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let Ok(mut st) = lock.lock() else {
                    return;
                };
                loop {
                    if st.stop {
                        return;
                    }
                    let idle = st.last.elapsed();
                    if idle > timeout {
                        drop(st);
                        on_stall(idle);
                        return;
                    }
                    let wait = (timeout - idle).min(Duration::from_millis(200));
                    st = match cv.wait_timeout(st, wait) {
                        Ok((g, _)) => g,
                        Err(_) => return,
                    };
                }
            })
            .ok();
        Watchdog { shared, thread }
    }

    /// Records progress.
    pub fn beat(&self) {
        if let Ok(mut st) = self.shared.0.lock() {
            st.last = Instant::now();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.0.lock() {
            st.stop = true;
        }
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn fires_without_beats_and_not_with_them() {
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let w = Watchdog::start(Duration::from_millis(150), move |_| {
            f.store(true, Ordering::SeqCst)
        });
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(50));
            w.beat();
        }
        assert!(
            !fired.load(Ordering::SeqCst),
            "beats every 50 ms keep it quiet"
        );
        std::thread::sleep(Duration::from_millis(400));
        assert!(
            fired.load(Ordering::SeqCst),
            "400 ms without a beat must fire"
        );
        drop(w);

        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let w = Watchdog::start(Duration::from_millis(100), move |_| {
            f.store(true, Ordering::SeqCst)
        });
        drop(w);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !fired.load(Ordering::SeqCst),
            "a stopped watchdog never fires"
        );
    }
}
