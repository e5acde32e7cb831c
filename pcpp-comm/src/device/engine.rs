//! The device exchange engine of the MPI and UCX back-ends (PCPP §7.4: exchanges posted when the
//! data exists, completed on the communication stream while the compute stream goes on): an
//! exchange becomes a host function on the caller's stream that hands it to a communication
//! thread and returns, followed by a stream wait on the exchange's completion flag
//! ([`super::flag`]), which the communication thread sets once the exchange has completed (or,
//! with `PCPP_DEVICE_WAIT=host-fn`, a host function that returns only then); the staged path
//! surrounds it with asynchronous copies through pinned buffers. A watchdog thread reports
//! exchanges that stall. See [`super`] for the design.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::flag::{FlagPool, Slot};
use super::{DevicePath, DeviceWait, StreamOps};
use crate::error::CommError;
use crate::transport::DeviceMsg;

/// One message as the library sees it: device memory (CUDA-aware path) or a pinned host buffer
/// (staged path).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WireMsg {
    pub peer: usize,
    pub ptr: u64,
    pub len: usize,
}

/// Nonblocking point-to-point of a back-end on raw memory, on traffic of its own (a duplicated
/// communicator, a reserved tag) so that it never matches [`crate::Transport::exchange`]'s.
pub(crate) trait Wire: Send + Sync + 'static {
    /// An in-flight send or receive.
    type Req: Send;

    /// Posts every send, then every receive (all of non-zero length), appending their requests
    /// to `reqs`; `device` says the addresses are device memory.
    ///
    /// # Safety
    /// Every address is valid for `len` bytes until its request has completed.
    unsafe fn post(
        &self,
        sends: &[WireMsg],
        recvs: &[WireMsg],
        device: bool,
        reqs: &mut Vec<Self::Req>,
    ) -> Result<(), CommError>;

    /// Progresses the library and drops the completed requests of `reqs`; `Ok(true)` once none
    /// is left.
    fn test(&self, reqs: &mut Vec<Self::Req>) -> Result<bool, CommError>;

    /// The requests of `reqs` in words, e.g. `receive from 1 (4096 bytes)`, for the report of a
    /// stalled exchange.
    fn describe(&self, reqs: &[Self::Req]) -> String {
        format!("{} requests", reqs.len())
    }
}

/// Requests in words for [`Wire::describe`]: `(peer, expected length of a receive or None for
/// a send)` each, e.g. `send to 1, receive from 1 (4096 bytes)`.
pub(crate) fn describe_reqs(reqs: impl Iterator<Item = (usize, Option<usize>)>) -> String {
    let all: Vec<String> = reqs
        .map(|(peer, recv)| match recv {
            Some(len) => format!("receive from {peer} ({len} bytes)"),
            None => format!("send to {peer}"),
        })
        .collect();
    if all.is_empty() {
        "no requests".into()
    } else {
        all.join(", ")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often a host function blocked on its exchange (`host-fn` mode) looks at the engine's
/// shutdown flag, and how often the watchdog looks for stalled exchanges.
const PARK_POLL: Duration = Duration::from_millis(50);

/// How long a dropped engine waits for its streams to reach the exchanges still enqueued before
/// it frees their flags and staging buffers (it leaves them allocated after that).
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct OpState {
    /// Times the host function has run (once, or once per graph replay).
    posted: u64,
    /// Times the communication thread has handed the exchange to the library.
    taken: u64,
    /// Times the exchange has completed.
    completed: u64,
    /// Times the exchange has failed (the stream is released all the same in `stream` mode).
    failed: u64,
    /// The requests of the latest run still in flight, in words ([`Wire::describe`]).
    pending: String,
}

/// One enqueued exchange. Kept alive by the stream's host function: released after its one run,
/// or kept for good when it was captured into a CUDA graph (every replay runs it again); and by
/// the communication thread while it is in flight.
struct OpRec {
    queue: Weak<Queue>,
    sends: Vec<WireMsg>,
    recvs: Vec<WireMsg>,
    one_shot: bool,
    /// The flag the communication thread sets at completion: the stream waits on it after the
    /// host function in `stream` mode, and resets it after the receive copies in both modes.
    flag: Arc<Slot>,
    /// `host-fn` mode: the host function blocks until the exchange has completed.
    blocking: bool,
    state: Mutex<OpState>,
    cv: Condvar,
}

/// An exchange handed to the communication thread, watched until it completes or fails.
struct Watched {
    op: Arc<OpRec>,
    /// The run ([`OpState::posted`]) watched.
    gen: u64,
    since: Instant,
    reported: bool,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Arc<OpRec>>,
    shutdown: bool,
}

/// What the host functions and the communication thread share.
struct Queue {
    st: Mutex<QueueState>,
    cv: Condvar,
    /// The first failure, reported by every later enqueue.
    error: Mutex<Option<String>>,
    /// Context of the latest stream (for the communication thread to bind); 0 before any.
    ctx: AtomicUsize,
    label: String,
    /// The library call the communication thread is inside ([`CALL_POST`], [`CALL_TEST`]; 0:
    /// none) and since when (µs after `epoch`): what a stalled exchange's report says.
    call: AtomicU8,
    call_since: AtomicU64,
    epoch: Instant,
    /// How long an exchange may take before the watchdog reports it as stalled.
    stall_after: Duration,
    /// The exchanges handed over and not yet complete, for the watchdog.
    watch: Mutex<Vec<Watched>>,
    /// The stall reports printed so far.
    stalls: Mutex<Vec<String>>,
}

const CALL_POST: u8 = 1;
const CALL_TEST: u8 = 2;

impl Queue {
    /// Hands run `gen` of `op` to the communication thread and the watchdog; false after
    /// shutdown.
    fn push(&self, op: Arc<OpRec>, gen: u64) -> bool {
        {
            let mut st = lock(&self.st);
            if st.shutdown {
                return false;
            }
            st.ready.push_back(op.clone());
            self.cv.notify_all();
        }
        lock(&self.watch).push(Watched {
            op,
            gen,
            since: Instant::now(),
            reported: false,
        });
        true
    }

    fn is_shutdown(&self) -> bool {
        lock(&self.st).shutdown
    }

    /// Runs `f`, a library call of kind `call`, recording it for the stall report.
    fn in_call<T>(&self, call: u8, f: impl FnOnce() -> T) -> T {
        let since = self.epoch.elapsed().as_micros() as u64;
        self.call_since.store(since, Ordering::Relaxed);
        self.call.store(call, Ordering::Release);
        let out = f();
        self.call.store(0, Ordering::Release);
        out
    }

    /// Records a failure: every later enqueue fails. A failed exchange never completes: in
    /// `stream` mode its flag is released all the same ([`OpRec::failed`]); in `host-fn` mode its
    /// host function stays blocked (the stream stalls and the runtime's step timeout reports it).
    fn fail(&self, msg: String) {
        eprintln!("error: {} device exchange failed: {msg}", self.label);
        let mut e = lock(&self.error);
        e.get_or_insert(msg);
    }
}

impl OpRec {
    /// The host function's work: hand the exchange to the communication thread, then return (the
    /// stream waits on the flag) or, in `host-fn` mode, block until it has completed (or the
    /// engine shuts down).
    fn run(self: &Arc<Self>) {
        let Some(q) = self.queue.upgrade() else {
            return;
        };
        let gen = {
            let mut st = lock(&self.state);
            st.posted += 1;
            st.posted
        };
        if !q.push(self.clone(), gen) || !self.blocking {
            return;
        }
        let mut st = lock(&self.state);
        while st.completed < gen && !q.is_shutdown() {
            st = self
                .cv
                .wait_timeout(st, PARK_POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The communication thread has posted the latest run (its requests are described later, if
    /// it turns out slow).
    fn taken(&self) {
        let mut st = lock(&self.state);
        st.taken += 1;
        st.pending.clear();
    }

    /// The exchange has completed: the stream may go on.
    fn complete(&self, ops: &dyn StreamOps) {
        // The flag first: a blocked host function (`host-fn` mode) returns once it sees the
        // completion, and the stream then resets the flag, which must not be set after that.
        self.release(ops);
        lock(&self.state).completed += 1;
        self.cv.notify_all();
    }

    /// The exchange has failed (recorded with [`Queue::fail`]): in `stream` mode the stream goes
    /// on all the same.
    fn failed(&self, ops: &dyn StreamOps) {
        self.release(ops);
        lock(&self.state).failed += 1;
    }

    fn release(&self, ops: &dyn StreamOps) {
        // SAFETY: called by the communication thread, which ends before the engine frees its
        // flags.
        unsafe { self.flag.release(ops) };
    }
}

/// The host function enqueued for every exchange.
///
/// # Safety
/// `data` is `Arc::into_raw` of an [`OpRec`] whose strong count this function may use: one-shot
/// records give their count up here, captured ones keep it for good.
unsafe extern "C" fn run_op(data: *mut c_void) {
    let raw = data as *const OpRec;
    // SAFETY: `raw` came from `Arc::into_raw` and still holds its count (see above), so a clone
    // of it is valid.
    let op = unsafe {
        Arc::increment_strong_count(raw);
        Arc::from_raw(raw)
    };
    op.run();
    let one_shot = op.one_shot;
    drop(op);
    if one_shot {
        // SAFETY: the count given to this one run is released once, here.
        drop(unsafe { Arc::from_raw(raw) });
    }
}

/// Staging buffers, by position in an exchange: the `i`-th staged send (receive) of every
/// exchange goes through `sends[i]` (`recvs[i]`), `(address, length)`. The staged path stages
/// every message through pinned host buffers; the CUDA-aware path stages (bounces) the device
/// buffers CUDA IPC cannot share through device buffers of `cuMemAlloc` (see
/// [`StreamOps::ipc_capable`]).
///
/// One set serves every exchange of the engine because the exchanges of a stream run one after
/// the other: an exchange's send copies start only after the previous exchange's wait on its
/// completion flag (which the communication thread sets once its sends and receives have
/// completed; in `host-fn` mode its host function, which returns only then) and receive copies
/// have finished.
/// A position grows to the largest message seen there; the buffer it replaces is kept (in
/// `retired`) because a captured CUDA graph may still copy through it. A steady step's exchanges
/// thus find their buffers already sized by the eager steps that run before a graph captures
/// one, so a capture allocates nothing.
#[derive(Default)]
struct Staging {
    sends: Vec<(u64, usize)>,
    recvs: Vec<(u64, usize)>,
    retired: Vec<(u64, usize)>,
}

/// Which staging buffers: pinned host memory or (IPC-capable) device memory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mem {
    Pinned,
    Device,
}

/// The device point-to-point engine of one communicator.
pub(crate) struct DeviceEngine<W: Wire> {
    wire: Arc<W>,
    path: DevicePath,
    ops: Arc<dyn StreamOps>,
    queue: Arc<Queue>,
    /// The communication thread and the watchdog.
    threads: Mutex<Vec<JoinHandle<()>>>,
    wait: DeviceWait,
    /// A bad `PCPP_DEVICE_WAIT`, reported by every enqueue.
    setup_error: Option<String>,
    flags: Mutex<FlagPool>,
    /// Whether the engine took a reference on its streams' context (`Some(Some(ordinal))`),
    /// decided at the first exchange.
    held: Mutex<Option<Option<usize>>>,
    pinned: Mutex<Staging>,
    bounce: Mutex<Staging>,
    /// Whether the first bounced buffer has been reported.
    bounce_logged: AtomicBool,
    ordinal: AtomicUsize,
    timeout: Duration,
    rank: usize,
}

impl<W: Wire> DeviceEngine<W> {
    /// An engine over `wire` whose streams wait as `PCPP_DEVICE_WAIT` says (a bad value fails
    /// every exchange, naming it); its communication thread starts with the first exchange.
    pub fn new(
        wire: W,
        path: DevicePath,
        ops: Arc<dyn StreamOps>,
        timeout: Duration,
        rank: usize,
        label: String,
    ) -> Self {
        let wait = DeviceWait::from_env();
        let mode = wait.clone().unwrap_or_default();
        let mut eng = Self::with_wait(wire, path, ops, timeout, rank, label, mode);
        eng.setup_error = wait.err();
        eng
    }

    /// An engine whose streams wait as `wait` says.
    pub fn with_wait(
        wire: W,
        path: DevicePath,
        ops: Arc<dyn StreamOps>,
        timeout: Duration,
        rank: usize,
        label: String,
        wait: DeviceWait,
    ) -> Self {
        DeviceEngine {
            wire: Arc::new(wire),
            path,
            ops,
            queue: Arc::new(Queue {
                st: Mutex::new(QueueState::default()),
                cv: Condvar::new(),
                error: Mutex::new(None),
                ctx: AtomicUsize::new(0),
                label,
                call: AtomicU8::new(0),
                call_since: AtomicU64::new(0),
                epoch: Instant::now(),
                stall_after: timeout / 4,
                stalls: Mutex::new(Vec::new()),
                watch: Mutex::new(Vec::new()),
            }),
            threads: Mutex::new(Vec::new()),
            wait,
            setup_error: None,
            flags: Mutex::new(FlagPool::default()),
            held: Mutex::new(None),
            pinned: Mutex::new(Staging::default()),
            bounce: Mutex::new(Staging::default()),
            bounce_logged: AtomicBool::new(false),
            ordinal: AtomicUsize::new(0),
            timeout,
            rank,
        }
    }

    /// The data path.
    pub fn path(&self) -> DevicePath {
        self.path
    }

    /// The device of the streams used so far (0 before the first exchange).
    pub fn ordinal(&self) -> usize {
        self.ordinal.load(Ordering::Relaxed)
    }

    fn err(&self, peer: usize, detail: impl Into<String>) -> CommError {
        CommError::Backend {
            op: "enqueue",
            peer,
            tag: 0,
            detail: detail.into(),
        }
    }

    /// Starts the communication thread and the watchdog, once.
    fn start_threads(&self) -> Result<(), CommError> {
        let mut t = lock(&self.threads);
        if !t.is_empty() {
            return Ok(());
        }
        let (wire, q, ops) = (self.wire.clone(), self.queue.clone(), self.ops.clone());
        let device = self.path == DevicePath::CudaAware && self.ops.device_memory();
        let timeout = self.timeout;
        let name = q.label.split(' ').next().unwrap_or("comm").to_string();
        let spawn_err = |e| self.err(self.rank, format!("spawning the communication thread: {e}"));
        let q2 = q.clone();
        let h = std::thread::Builder::new()
            .name(format!("pcpp-{name}-dev"))
            .spawn(move || comm_loop(&*wire, &q2, &*ops, device, timeout))
            .map_err(spawn_err)?;
        t.push(h);
        // Without a watchdog the exchanges still run; only stall reports are missing.
        let watchdog = std::thread::Builder::new()
            .name(format!("pcpp-{name}-watch"))
            .spawn(move || watch_loop(&q))
            .map_err(spawn_err)?;
        t.push(watchdog);
        Ok(())
    }

    /// The `mem` staging buffer of the `i`-th staged send (or receive, `recv`) of an exchange,
    /// holding at least `m.len` bytes; allocated or grown on demand.
    ///
    /// # Safety
    /// `stream` is a live stream of the engine's kind.
    unsafe fn staging(
        &self,
        mem: Mem,
        recv: bool,
        i: usize,
        m: &DeviceMsg,
        stream: *mut c_void,
    ) -> Result<u64, CommError> {
        let mut guard = lock(if mem == Mem::Pinned {
            &self.pinned
        } else {
            &self.bounce
        });
        let p = &mut *guard;
        let slots = if recv { &mut p.recvs } else { &mut p.sends };
        if let Some(&(b, len)) = slots.get(i) {
            if len >= m.len {
                return Ok(b);
            }
        }
        // Rounded up to 64 KiB, so that slowly growing messages do not reallocate every time.
        let len = m.len.div_ceil(1 << 16) << 16;
        // SAFETY: live stream (the caller's promise).
        let b = match mem {
            Mem::Pinned => unsafe { self.ops.alloc_pinned(stream, len) }.map(|b| b as u64),
            Mem::Device => unsafe { self.ops.alloc_device(stream, len) },
        }
        .map_err(|e| {
            let what = if mem == Mem::Pinned {
                "pinned staging buffer"
            } else {
                "device bounce buffer (cuMemAlloc)"
            };
            self.err(m.peer, format!("{what} of {len} bytes: {e}"))
        })?;
        if i < slots.len() {
            let old = std::mem::replace(&mut slots[i], (b, len));
            p.retired.push(old);
        } else {
            slots.push((b, len));
        }
        Ok(b)
    }

    /// Whether the CUDA-aware path hands `m`'s buffer to the library as it is, rather than
    /// bouncing it through a device buffer of its own (reported once, by rank 0).
    ///
    /// # Safety
    /// `stream` is a live stream of the engine's kind.
    unsafe fn direct(&self, m: &DeviceMsg, stream: *mut c_void) -> bool {
        // SAFETY: live stream (the caller's promise).
        if unsafe { self.ops.ipc_capable(stream, m.ptr) } {
            return true;
        }
        if self.rank == 0 && !self.bounce_logged.swap(true, Ordering::Relaxed) {
            eprintln!(
                "pcpp-comm: {}: device buffer {:#x} is not CUDA-IPC capable (CUDA's stream-ordered \
                 pool or virtual memory); cuda-aware exchanges copy such buffers through device \
                 buffers of cuMemAlloc on the stream",
                self.queue.label, m.ptr
            );
        }
        false
    }

    /// Enqueues the exchange on `stream` (see [`crate::DeviceP2p::enqueue`]; messages already
    /// validated, counting is the caller's).
    ///
    /// # Safety
    /// As [`crate::DeviceP2p::enqueue`], with `stream` of the engine's kind.
    pub unsafe fn enqueue(
        &self,
        sends: &[DeviceMsg],
        recvs: &[DeviceMsg],
        stream: *mut c_void,
    ) -> Result<(), CommError> {
        if let Some(e) = &self.setup_error {
            return Err(self.err(self.rank, e.clone()));
        }
        if let Some(e) = lock(&self.queue.error).clone() {
            return Err(self.err(self.rank, format!("an earlier device exchange failed: {e}")));
        }
        let sends: Vec<&DeviceMsg> = sends.iter().filter(|m| m.len > 0).collect();
        let recvs: Vec<&DeviceMsg> = recvs.iter().filter(|m| m.len > 0).collect();
        if sends.is_empty() && recvs.is_empty() {
            return Ok(());
        }
        let e = |x: String| self.err(self.rank, x);
        // SAFETY (all stream calls below): `stream` is live, of this engine's kind, and the
        // buffers stay valid until the work completes on it (the caller's promise); pinned
        // buffers live as long as the engine.
        let (ctx, ordinal) = unsafe { self.ops.context_of(stream) }.map_err(e)?;
        self.queue.ctx.store(ctx, Ordering::Relaxed);
        self.ordinal.store(ordinal, Ordering::Relaxed);
        {
            let mut held = lock(&self.held);
            if held.is_none() {
                // SAFETY: from `context_of` just above.
                let took = unsafe { self.ops.hold_context(ctx, ordinal) }.map_err(e)?;
                *held = Some(took.then_some(ordinal));
            }
        }
        self.start_threads()?;
        let capturing = unsafe { self.ops.is_capturing(stream) }.map_err(e)?;
        let staged = self.path == DevicePath::Staged;
        // Copies after the exchange: (device destination, source, length, source is host).
        let mut after: Vec<(u64, u64, usize, bool)> = Vec::new();
        let mut bounced = 0;
        let mut wsends = Vec::with_capacity(sends.len());
        for (i, m) in sends.iter().enumerate() {
            let ptr = if staged {
                let b = unsafe { self.staging(Mem::Pinned, false, i, m, stream) }?;
                unsafe { self.ops.copy_dtoh(stream, b as *mut u8, m.ptr, m.len) }.map_err(e)?;
                b
            } else if unsafe { self.direct(m, stream) } {
                m.ptr
            } else {
                let b = unsafe { self.staging(Mem::Device, false, bounced, m, stream) }?;
                bounced += 1;
                unsafe { self.ops.copy_dtod(stream, b, m.ptr, m.len) }.map_err(e)?;
                b
            };
            wsends.push(WireMsg {
                peer: m.peer,
                ptr,
                len: m.len,
            });
        }
        bounced = 0;
        let mut wrecvs = Vec::with_capacity(recvs.len());
        for (i, m) in recvs.iter().enumerate() {
            let ptr = if staged {
                let b = unsafe { self.staging(Mem::Pinned, true, i, m, stream) }?;
                after.push((m.ptr, b, m.len, true));
                b
            } else if unsafe { self.direct(m, stream) } {
                m.ptr
            } else {
                let b = unsafe { self.staging(Mem::Device, true, bounced, m, stream) }?;
                bounced += 1;
                after.push((m.ptr, b, m.len, false));
                b
            };
            wrecvs.push(WireMsg {
                peer: m.peer,
                ptr,
                len: m.len,
            });
        }
        // Every exchange has a flag: the communication thread sets it at completion and the
        // stream resets it after the receive copies, so that the engine knows when the stream
        // is done with its staging buffers (see `Drop`); in `stream` mode the stream also
        // waits on it.
        let flag = unsafe { lock(&self.flags).lend(&*self.ops, stream, !capturing) }
            .map_err(|x| e(format!("completion flag: {x}")))?;
        let op = Arc::new(OpRec {
            queue: Arc::downgrade(&self.queue),
            sends: wsends,
            recvs: wrecvs,
            one_shot: !capturing,
            flag: flag.clone(),
            blocking: self.wait == DeviceWait::HostFn,
            state: Mutex::new(OpState::default()),
            cv: Condvar::new(),
        });
        let data = Arc::into_raw(op) as *mut c_void;
        let enqueued = unsafe { self.ops.launch_host_fn(stream, run_op, data) };
        if enqueued.is_err() {
            // SAFETY: the host function was not enqueued, so the count is still ours.
            drop(unsafe { Arc::from_raw(data as *const OpRec) });
        }
        let rest = enqueued.and_then(|()| {
            if self.wait == DeviceWait::Stream {
                // The stream goes on once the communication thread sets the flag.
                unsafe { self.ops.wait_flag(stream, flag.flag) }?;
            }
            for &(dst, src, len, host) in &after {
                if host {
                    unsafe { self.ops.copy_htod(stream, dst, src as *const u8, len) }
                } else {
                    unsafe { self.ops.copy_dtod(stream, dst, src, len) }
                }?;
            }
            // Reset for the next graph replay to wait on; also the sign that this exchange's
            // copies through the staging buffers are done.
            unsafe { self.ops.finish_flag(stream, flag.flag) }
        });
        if rest.is_err() {
            lock(&self.flags).abandon(&flag);
        }
        rest.map_err(e)
    }
}

impl<W: Wire> Drop for DeviceEngine<W> {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.queue.st);
            st.shutdown = true;
            self.queue.cv.notify_all();
        }
        for t in std::mem::take(&mut *lock(&self.threads)) {
            let _ = t.join();
        }
        let mut flags = lock(&self.flags);
        // SAFETY: the flags came from `self.ops`, and the communication thread has ended.
        if !unsafe { flags.drain(&*self.ops, DRAIN_LIMIT) } {
            eprintln!(
                "warning: {}: the streams have not reached every enqueued device exchange {:?} \
                 after shutdown; their completion flags and staging buffers stay allocated",
                self.queue.label, DRAIN_LIMIT
            );
            return;
        }
        // SAFETY: drained: no enqueued work of a one-shot exchange uses the flags, and graphs
        // that captured exchanges are not replayed once their transport is gone.
        unsafe { flags.free(&*self.ops) };
        let p = std::mem::take(&mut *lock(&self.pinned));
        for (b, len) in p.sends.into_iter().chain(p.recvs).chain(p.retired) {
            // SAFETY: allocated by `alloc_pinned` with `len`; the transport is going away, so
            // no exchange of it runs any more.
            unsafe { self.ops.free_pinned(b as *mut u8, len) };
        }
        let d = std::mem::take(&mut *lock(&self.bounce));
        let ctx = self.queue.ctx.load(Ordering::Relaxed);
        for (b, len) in d.sends.into_iter().chain(d.recvs).chain(d.retired) {
            // SAFETY: allocated by `alloc_device` with `len` on a stream of context `ctx` (the
            // engine's streams share one device); no exchange runs any more.
            unsafe { self.ops.free_device(ctx, b, len) };
        }
        if let Some(Some(ordinal)) = *lock(&self.held) {
            // SAFETY: the reference `hold_context` took; everything allocated in the context
            // is freed.
            unsafe { self.ops.release_context(ordinal) };
        }
    }
}

#[path = "engine_comm.rs"]
mod comm;
use comm::{comm_loop, watch_loop};

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
