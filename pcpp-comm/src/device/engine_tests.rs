//! Tests of the device exchange engine ([`super`]) on host memory, in both wait modes (the
//! stream waits on a completion flag, or the host function blocks): CUDA graph capture and
//! replay, staging through pinned and bounce buffers, exchanges that complete late, a lost peer,
//! stall reports (PCPP §7.4's communication stream without a GPU).

use super::*;
use crate::device::host::{HostStream, HostStreams};
use crate::device::{Flag, HostFn, FLAG_DONE};
use std::collections::VecDeque;
use std::sync::atomic::AtomicU32;

/// Both ways a stream can wait for its exchanges.
const MODES: [DeviceWait; 2] = [DeviceWait::Stream, DeviceWait::HostFn];

/// One rank talking to itself: a send is copied into the next receive posted, `late` after the
/// post (when the library is next progressed after that). Every address the library is given
/// is recorded in `seen`.
#[derive(Default)]
struct Loopback {
    sent: Mutex<VecDeque<(u64, usize)>>,
    seen: Arc<Mutex<Vec<u64>>>,
    late: Duration,
}

/// A receive of [`Loopback`]: (source, destination, length, due).
type Copy = (u64, u64, usize, Instant);

impl Wire for Loopback {
    type Req = Copy;
    unsafe fn post(
        &self,
        sends: &[WireMsg],
        recvs: &[WireMsg],
        _device: bool,
        reqs: &mut Vec<Copy>,
    ) -> Result<(), CommError> {
        lock(&self.seen).extend(sends.iter().chain(recvs).map(|m| m.ptr));
        let mut q = lock(&self.sent);
        q.extend(sends.iter().map(|m| (m.ptr, m.len)));
        for r in recvs {
            let (p, n) = q.pop_front().expect("a send for every receive");
            assert_eq!(n, r.len);
            reqs.push((p, r.ptr, n, Instant::now() + self.late));
        }
        Ok(())
    }
    fn test(&self, reqs: &mut Vec<Copy>) -> Result<bool, CommError> {
        reqs.retain(|&(p, r, n, due)| {
            if Instant::now() < due {
                return true;
            }
            // SAFETY: both are live buffers of `n` bytes until the request completes (here).
            unsafe { std::ptr::copy_nonoverlapping(p as *const u8, r as *mut u8, n) };
            false
        });
        Ok(reqs.is_empty())
    }
}

type Node = Box<dyn Fn() + Send>;

/// Streams that are always being captured: the work is recorded as graph nodes, and
/// `replay` runs them in order, as a CUDA graph launch would.
#[derive(Default)]
struct Graph {
    nodes: Mutex<Vec<Node>>,
}

impl Graph {
    fn replay(&self) {
        for n in lock(&self.nodes).iter() {
            n();
        }
    }
}

impl StreamOps for Graph {
    fn device_memory(&self) -> bool {
        false
    }
    unsafe fn launch_host_fn(
        &self,
        _s: *mut c_void,
        f: HostFn,
        data: *mut c_void,
    ) -> Result<(), String> {
        let d = data as usize;
        // SAFETY: the record behind `data` is kept for good by a captured exchange.
        lock(&self.nodes).push(Box::new(move || unsafe { f(d as *mut c_void) }));
        Ok(())
    }
    unsafe fn copy_dtoh(
        &self,
        _s: *mut c_void,
        dst: *mut u8,
        src: u64,
        len: usize,
    ) -> Result<(), String> {
        let d = dst as usize;
        // SAFETY: test buffers outlive the replays.
        lock(&self.nodes).push(Box::new(move || unsafe {
            std::ptr::copy_nonoverlapping(src as *const u8, d as *mut u8, len)
        }));
        Ok(())
    }
    unsafe fn copy_htod(
        &self,
        s: *mut c_void,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: the same copy the other way.
        unsafe { self.copy_dtoh(s, dst as *mut u8, src as u64, len) }
    }
    unsafe fn copy_dtod(
        &self,
        s: *mut c_void,
        dst: u64,
        src: u64,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: the same copy between two test buffers.
        unsafe { self.copy_dtoh(s, dst as *mut u8, src, len) }
    }
    unsafe fn ipc_capable(&self, _s: *mut c_void, _ptr: u64) -> bool {
        // Every buffer bounces, so that replays also go through the device bounce copies.
        false
    }
    unsafe fn alloc_device(&self, s: *mut c_void, len: usize) -> Result<u64, String> {
        // SAFETY: test "device" memory is host memory.
        unsafe { self.alloc_pinned(s, len) }.map(|p| p as u64)
    }
    unsafe fn free_device(&self, _ctx: usize, ptr: u64, len: usize) {
        // SAFETY: made by `alloc_device` with `len`.
        unsafe { self.free_pinned(ptr as *mut u8, len) }
    }
    unsafe fn alloc_pinned(&self, _s: *mut c_void, len: usize) -> Result<*mut u8, String> {
        Ok(Box::into_raw(vec![0u8; len].into_boxed_slice()).cast::<u8>())
    }
    unsafe fn free_pinned(&self, ptr: *mut u8, len: usize) {
        // SAFETY: made by `alloc_pinned` with `len`.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) });
    }
    unsafe fn alloc_flags(&self, s: *mut c_void, count: usize) -> Result<Flag, String> {
        // SAFETY: host flags need no stream.
        unsafe { HostStreams.alloc_flags(s, count) }
    }
    unsafe fn free_flags(&self, first: Flag, count: usize) {
        // SAFETY: made by `alloc_flags` with `count`.
        unsafe { HostStreams.free_flags(first, count) }
    }
    unsafe fn wait_flag(&self, _s: *mut c_void, flag: Flag) -> Result<(), String> {
        lock(&self.nodes).push(Box::new(move || {
            let t0 = Instant::now();
            // SAFETY: the engine keeps a captured exchange's flag until it drops.
            while unsafe { HostStreams.flag_value(flag) } != 1 {
                assert!(t0.elapsed() < Duration::from_secs(20), "flag never set");
                std::thread::yield_now();
            }
        }));
        Ok(())
    }
    unsafe fn finish_flag(&self, _s: *mut c_void, flag: Flag) -> Result<(), String> {
        lock(&self.nodes).push(Box::new(move || {
            let flag = flag;
            // SAFETY: as above.
            unsafe { AtomicU32::from_ptr(flag.host) }.store(FLAG_DONE, Ordering::Release)
        }));
        Ok(())
    }
    unsafe fn is_capturing(&self, _s: *mut c_void) -> Result<bool, String> {
        Ok(true)
    }
    unsafe fn context_of(&self, _s: *mut c_void) -> Result<(usize, usize), String> {
        Ok((0, 0))
    }
    unsafe fn bind_context(&self, _ctx: usize) -> Result<(), String> {
        Ok(())
    }
}

/// A captured exchange runs nothing at capture time and moves the buffers' current contents
/// at every replay, on both paths and in both wait modes (a captured exchange keeps its flag, so
/// the replays wait on and reset the same flag).
#[test]
fn captured_exchanges_move_fresh_data_at_every_replay() {
    for (path, mode) in [DevicePath::Staged, DevicePath::CudaAware]
        .into_iter()
        .flat_map(|p| MODES.map(|m| (p, m)))
    {
        let graph = Arc::new(Graph::default());
        let eng = DeviceEngine::with_wait(
            Loopback {
                late: Duration::from_millis(2),
                ..Loopback::default()
            },
            path,
            graph.clone(),
            Duration::from_secs(10),
            0,
            "test".into(),
            mode,
        );
        let len = 1000;
        let mut send = vec![0u8; len];
        let mut recv = vec![0u8; len];
        let msg = |ptr: u64| DeviceMsg { peer: 0, ptr, len };
        let (sp, rp) = (send.as_mut_ptr() as u64, recv.as_mut_ptr() as u64);
        // SAFETY: both buffers live until the end of the test; the "stream" is never used.
        unsafe { eng.enqueue(&[msg(sp)], &[msg(rp)], std::ptr::null_mut()) }.unwrap();
        assert!(recv.iter().all(|&b| b == 0), "{path}: capture moved data");
        for k in 1..=3u8 {
            // SAFETY: nothing else touches the buffer between replays.
            unsafe { std::ptr::write_bytes(sp as *mut u8, k, len) };
            graph.replay();
            // SAFETY: the replay has completed (its nodes wait until the exchange is done).
            let got = unsafe { std::slice::from_raw_parts(rp as *const u8, len) };
            assert!(
                got.iter().all(|&b| b == k),
                "{path} {mode}: replay {k} moved stale data"
            );
        }
        let blocks = lock(&eng.flags).blocks();
        assert_eq!(
            blocks, 1,
            "{mode}: one block of flags for the captured exchange"
        );
        drop(eng);
        drop((send, recv));
    }
}

/// Whether everything enqueued on `stream` so far runs within `limit`.
fn synchronized_within(stream: &HostStream, limit: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    stream
        .submit(move || {
            let _ = tx.send(());
        })
        .unwrap();
    rx.recv_timeout(limit).is_ok()
}

/// A peer that never answers.
struct Silent;

impl Wire for Silent {
    type Req = ();
    unsafe fn post(
        &self,
        _sends: &[WireMsg],
        _recvs: &[WireMsg],
        _device: bool,
        reqs: &mut Vec<()>,
    ) -> Result<(), CommError> {
        reqs.push(());
        Ok(())
    }
    fn test(&self, reqs: &mut Vec<()>) -> Result<bool, CommError> {
        Ok(reqs.is_empty())
    }
}

/// An exchange that does not complete within the timeout fails and later exchanges are refused
/// naming the failure. In `stream` mode the failed exchange's flag is set all the same, so the
/// stream goes on (and reaches the later exchanges, which fail in turn); in `host-fn` mode the
/// stream stays blocked (the runtime's step timeout reports it) until dropping the engine
/// releases it.
#[test]
fn a_lost_peer_fails_later_exchanges_and_never_leaves_the_stream_waiting() {
    for mode in MODES {
        let stream = HostStream::new();
        let eng = DeviceEngine::with_wait(
            Silent,
            DevicePath::Staged,
            Arc::new(HostStreams),
            Duration::from_millis(200),
            0,
            "test rank 0".into(),
            mode,
        );
        let mut buf = vec![0u8; 64];
        let m = DeviceMsg {
            peer: 0,
            ptr: buf.as_mut_ptr() as u64,
            len: 64,
        };
        // SAFETY: `buf` outlives the stream's work (the stream is synchronised below).
        unsafe { eng.enqueue(&[], &[m], stream.raw()) }.unwrap();
        let t0 = Instant::now();
        let err = loop {
            // SAFETY: as above.
            match unsafe { eng.enqueue(&[], &[m], stream.raw()) } {
                Err(e) => break e,
                Ok(()) => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(20),
                        "{mode}: no failure reported"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        assert!(err.to_string().contains("not complete after"), "{err}");
        if mode == DeviceWait::Stream {
            assert!(
                synchronized_within(&stream, Duration::from_secs(20)),
                "the stream still waits on failed exchanges"
            );
        }
        drop(eng);
        stream.synchronize().unwrap();
        drop(buf);
    }
}

/// A library whose receives complete only once `release` is set, and whose progress call
/// blocks until then when `block_in_test` (a library stuck inside a call, as a CUDA-enabled UCX
/// calling the CUDA driver while the stream waits would be).
struct Held {
    release: Arc<AtomicBool>,
    block_in_test: bool,
}

impl Wire for Held {
    type Req = (usize, Option<usize>);
    unsafe fn post(
        &self,
        sends: &[WireMsg],
        recvs: &[WireMsg],
        _device: bool,
        reqs: &mut Vec<(usize, Option<usize>)>,
    ) -> Result<(), CommError> {
        reqs.extend(sends.iter().map(|m| (m.peer, None)));
        reqs.extend(recvs.iter().map(|m| (m.peer, Some(m.len))));
        Ok(())
    }
    fn test(&self, reqs: &mut Vec<(usize, Option<usize>)>) -> Result<bool, CommError> {
        while self.block_in_test && !self.release.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let released = self.release.load(Ordering::SeqCst);
        reqs.retain(|r| r.1.is_some() && !released);
        Ok(reqs.is_empty())
    }
    fn describe(&self, reqs: &[(usize, Option<usize>)]) -> String {
        describe_reqs(reqs.iter().copied())
    }
}

/// Runs one exchange (a send to and a receive from peer 1) over [`Held`] and returns the first
/// stall report, after which the library is released and the exchange must complete.
fn stall_report_of(block_in_test: bool, mode: DeviceWait) -> String {
    let release = Arc::new(AtomicBool::new(false));
    let stream = HostStream::new();
    let eng = DeviceEngine::with_wait(
        Held {
            release: release.clone(),
            block_in_test,
        },
        DevicePath::Staged,
        Arc::new(HostStreams),
        Duration::from_secs(2),
        0,
        "test rank 0".into(),
        mode,
    );
    let mut bufs = vec![vec![1u8; 48], vec![0u8; 64]];
    let send = DeviceMsg {
        peer: 1,
        ptr: bufs[0].as_mut_ptr() as u64,
        len: 48,
    };
    let recv = DeviceMsg {
        peer: 1,
        ptr: bufs[1].as_mut_ptr() as u64,
        len: 64,
    };
    // SAFETY: the buffers outlive the stream's work (synchronised below).
    unsafe { eng.enqueue(&[send], &[recv], stream.raw()) }.unwrap();
    let t0 = Instant::now();
    let report = loop {
        if let Some(r) = lock(&eng.queue.stalls).first() {
            break r.clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no stall report");
        std::thread::sleep(Duration::from_millis(10));
    };
    release.store(true, Ordering::SeqCst);
    stream.synchronize().unwrap();
    assert!(
        lock(&eng.queue.error).is_none(),
        "the exchange failed instead of completing once released"
    );
    drop(eng);
    drop(bufs);
    report
}

/// An exchange that has waited a quarter of the timeout is reported with what it waits for: a
/// library call that does not return, named with how long it has run (the watchdog reports it,
/// as the communication thread is stuck).
#[test]
fn a_stall_inside_the_library_is_reported_as_such() {
    for mode in MODES {
        let r = stall_report_of(true, mode);
        assert!(r.contains("test rank 0 device exchange stalled"), "{r}");
        assert!(r.contains("1 sends and 1 receives (peers [1])"), "{r}");
        assert!(
            r.contains("inside the transport's progress/test call for"),
            "{r}"
        );
    }
}

/// ... or the requests still in flight when the library returns but a peer has not answered.
#[test]
fn a_stall_on_a_peer_names_the_requests_in_flight() {
    for mode in MODES {
        let r = stall_report_of(false, mode);
        assert!(
            r.contains("still in flight: receive from 1 (64 bytes)"),
            "{r}"
        );
        assert!(!r.contains("send to 1"), "the send completed: {r}");
    }
}

/// [`HostStreams`] that count the host functions that have returned, and whose buffers CUDA IPC
/// can share or not (`ipc: false`, as memory of CUDA's stream-ordered pool, `cuMemAllocAsync`).
#[derive(Default)]
struct Twin {
    ipc: bool,
    returned: Arc<AtomicUsize>,
    /// Context calls and frees, in order ("hold", "free flags", "free pinned", "release").
    log: Arc<Mutex<Vec<&'static str>>>,
}

impl StreamOps for Twin {
    fn device_memory(&self) -> bool {
        false
    }
    unsafe fn launch_host_fn(
        &self,
        s: *mut c_void,
        f: HostFn,
        d: *mut c_void,
    ) -> Result<(), String> {
        let (returned, d) = (self.returned.clone(), d as usize);
        // SAFETY: `s` is a live host stream (the caller's promise).
        let stream = unsafe { &*(s as *const HostStream) };
        stream.submit(move || {
            // SAFETY: `d` stays valid until `f` has run (the caller's promise).
            unsafe { f(d as *mut c_void) };
            returned.fetch_add(1, Ordering::SeqCst);
        })
    }
    unsafe fn copy_dtoh(
        &self,
        s: *mut c_void,
        dst: *mut u8,
        src: u64,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.copy_dtoh(s, dst, src, len) }
    }
    unsafe fn copy_htod(
        &self,
        s: *mut c_void,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.copy_htod(s, dst, src, len) }
    }
    unsafe fn copy_dtod(
        &self,
        s: *mut c_void,
        dst: u64,
        src: u64,
        len: usize,
    ) -> Result<(), String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.copy_dtod(s, dst, src, len) }
    }
    unsafe fn ipc_capable(&self, _s: *mut c_void, _ptr: u64) -> bool {
        self.ipc
    }
    unsafe fn alloc_device(&self, s: *mut c_void, len: usize) -> Result<u64, String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.alloc_device(s, len) }
    }
    unsafe fn free_device(&self, ctx: usize, ptr: u64, len: usize) {
        // SAFETY: forwarded.
        unsafe { HostStreams.free_device(ctx, ptr, len) }
    }
    unsafe fn alloc_pinned(&self, s: *mut c_void, len: usize) -> Result<*mut u8, String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.alloc_pinned(s, len) }
    }
    unsafe fn free_pinned(&self, ptr: *mut u8, len: usize) {
        lock(&self.log).push("free pinned");
        // SAFETY: forwarded.
        unsafe { HostStreams.free_pinned(ptr, len) }
    }
    unsafe fn alloc_flags(&self, s: *mut c_void, count: usize) -> Result<Flag, String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.alloc_flags(s, count) }
    }
    unsafe fn free_flags(&self, first: Flag, count: usize) {
        lock(&self.log).push("free flags");
        // SAFETY: forwarded.
        unsafe { HostStreams.free_flags(first, count) }
    }
    unsafe fn hold_context(&self, _ctx: usize, _ordinal: usize) -> Result<bool, String> {
        lock(&self.log).push("hold");
        Ok(true)
    }
    unsafe fn release_context(&self, _ordinal: usize) {
        lock(&self.log).push("release");
    }
    unsafe fn wait_flag(&self, s: *mut c_void, flag: Flag) -> Result<(), String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.wait_flag(s, flag) }
    }
    unsafe fn finish_flag(&self, s: *mut c_void, flag: Flag) -> Result<(), String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.finish_flag(s, flag) }
    }
    unsafe fn is_capturing(&self, s: *mut c_void) -> Result<bool, String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.is_capturing(s) }
    }
    unsafe fn context_of(&self, s: *mut c_void) -> Result<(usize, usize), String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.context_of(s) }
    }
    unsafe fn bind_context(&self, ctx: usize) -> Result<(), String> {
        // SAFETY: forwarded.
        unsafe { HostStreams.bind_context(ctx) }
    }
}

/// Byte `j` of the message of exchange `k`.
fn fill(k: usize, j: usize) -> u8 {
    (k * 31 + j * 7 + j / 251) as u8
}

/// Many exchanges through the same staging positions enqueued while the stream is held, so
/// that every copy and host function runs long after all the enqueues (as on a busy GPU), and
/// whose receives complete only some time after they were posted: each exchange must still move
/// its own data, for the staged path, the CUDA-aware path on buffers CUDA IPC can share (given to
/// the library as they are) and on buffers it cannot (bounced through buffers of the engine,
/// which the library sees instead, never the caller's), in both wait modes (the receive copies
/// and the next exchange's send copies must wait for the completion). Sizes grow past the first
/// allocation, so positions are reallocated while earlier exchanges still wait to copy through
/// the old buffers.
#[test]
fn exchanges_enqueued_ahead_of_the_stream_move_their_own_data() {
    let cases = [
        (DevicePath::Staged, true, false),
        (DevicePath::CudaAware, true, true),
        (DevicePath::CudaAware, false, false),
    ];
    for ((path, ipc, direct), mode) in cases.into_iter().flat_map(|c| MODES.map(|m| (c, m))) {
        let what = format!("{path} {mode} (library sees the caller's buffers: {direct})");
        let stream = HostStream::new();
        let wire = Loopback {
            late: Duration::from_millis(2),
            ..Loopback::default()
        };
        let seen = wire.seen.clone();
        let ops = Arc::new(Twin {
            ipc,
            ..Twin::default()
        });
        let eng = DeviceEngine::with_wait(
            wire,
            path,
            ops,
            Duration::from_secs(10),
            0,
            "test".into(),
            mode,
        );
        let lens: Vec<usize> = (0..16).map(|k| 1 + k * 9001).collect();
        let sends: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|j| fill(k, j)).collect())
            .collect();
        let mut recvs: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        stream
            .submit(move || {
                let _ = gate_rx.recv();
            })
            .unwrap();
        for (k, (s, r)) in sends.iter().zip(recvs.iter_mut()).enumerate() {
            let m = |ptr: *const u8| DeviceMsg {
                peer: 0,
                ptr: ptr as u64,
                len: lens[k],
            };
            // SAFETY: the buffers outlive the stream's work (synchronised below).
            unsafe { eng.enqueue(&[m(s.as_ptr())], &[m(r.as_ptr())], stream.raw()) }.unwrap();
        }
        assert!(
            recvs.iter().all(|r| r.iter().all(|&b| b == 0)),
            "{what}: data moved before the stream ran"
        );
        gate_tx.send(()).unwrap();
        stream.synchronize().unwrap();
        for (k, r) in recvs.iter().enumerate() {
            assert!(r == &sends[k], "{what}: exchange {k} received wrong data");
        }
        let own = |p: u64| {
            sends
                .iter()
                .map(|b| b.as_ptr() as u64)
                .chain(recvs.iter().map(|b| b.as_ptr() as u64))
                .any(|b| b == p)
        };
        let seen = lock(&seen).clone();
        assert_eq!(seen.len(), 2 * lens.len(), "{what}");
        assert!(
            seen.iter().all(|&p| own(p) == direct),
            "{what}: the library was given the wrong buffers"
        );
        drop(eng);
    }
}

/// A library that completes an exchange only once every host function that handed one over has
/// returned: a CUDA-aware library whose progress needs the CUDA driver, which a host function
/// still running holds up. In `stream` mode the exchange completes; a host function that blocked
/// until completion (`host-fn` mode) would never return, and the exchange times out.
struct AfterReturn {
    returned: Arc<AtomicUsize>,
    posted: AtomicUsize,
    inner: Loopback,
}

impl Wire for AfterReturn {
    type Req = Copy;
    unsafe fn post(
        &self,
        sends: &[WireMsg],
        recvs: &[WireMsg],
        device: bool,
        reqs: &mut Vec<Copy>,
    ) -> Result<(), CommError> {
        self.posted.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwarded with the caller's promises.
        unsafe { self.inner.post(sends, recvs, device, reqs) }
    }
    fn test(&self, reqs: &mut Vec<Copy>) -> Result<bool, CommError> {
        if self.returned.load(Ordering::SeqCst) < self.posted.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.inner.test(reqs)
    }
}

/// The host function returns before its exchange completes (`stream` mode), so a library that
/// needs it to has the exchange complete, with its data; the blocking host function of
/// `host-fn` mode does not, and its exchange times out.
#[test]
fn the_host_function_returns_before_its_exchange_completes() {
    for mode in MODES {
        let stream = HostStream::new();
        let ops = Arc::new(Twin {
            ipc: true,
            ..Twin::default()
        });
        let returned = ops.returned.clone();
        let wire = AfterReturn {
            returned: returned.clone(),
            posted: AtomicUsize::new(0),
            inner: Loopback::default(),
        };
        let timeout = match mode {
            DeviceWait::Stream => Duration::from_secs(20),
            DeviceWait::HostFn => Duration::from_millis(300),
        };
        let eng = DeviceEngine::with_wait(
            wire,
            DevicePath::Staged,
            ops,
            timeout,
            0,
            "test".into(),
            mode,
        );
        let send: Vec<u8> = (0..4096).map(|j| fill(3, j)).collect();
        let recv = vec![0u8; send.len()];
        let m = |p: *const u8| DeviceMsg {
            peer: 0,
            ptr: p as u64,
            len: send.len(),
        };
        for _ in 0..3 {
            // SAFETY: the buffers outlive the stream's work (synchronised below).
            unsafe { eng.enqueue(&[m(send.as_ptr())], &[m(recv.as_ptr())], stream.raw()) }.unwrap();
        }
        if mode == DeviceWait::Stream {
            assert!(
                synchronized_within(&stream, Duration::from_secs(30)),
                "{mode}: the stream never got past the exchanges"
            );
            assert_eq!(recv, send, "{mode}: wrong data");
            assert_eq!(returned.load(Ordering::SeqCst), 3);
            assert!(
                lock(&eng.queue.error).is_none(),
                "{mode}: an exchange failed"
            );
        } else {
            let t0 = Instant::now();
            while lock(&eng.queue.error).is_none() {
                assert!(t0.elapsed() < Duration::from_secs(20), "no timeout");
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(returned.load(Ordering::SeqCst), 0);
            drop(eng);
            stream.synchronize().unwrap();
        }
    }
}

/// An eagerly enqueued exchange's flag returns to the engine once the stream has reset it: many
/// exchanges one after the other use one block of flags.
#[test]
fn completion_flags_are_reused() {
    let stream = HostStream::new();
    let eng = DeviceEngine::with_wait(
        Loopback::default(),
        DevicePath::CudaAware,
        Arc::new(HostStreams),
        Duration::from_secs(10),
        0,
        "test".into(),
        DeviceWait::Stream,
    );
    let mut buf = [0u8; 8];
    for k in 0..2 * super::super::flag::BLOCK + 1 {
        let send = [k as u8; 8];
        let m = |p: *const u8| DeviceMsg {
            peer: 0,
            ptr: p as u64,
            len: 8,
        };
        // SAFETY: both buffers outlive the exchange (synchronised below).
        unsafe { eng.enqueue(&[m(send.as_ptr())], &[m(buf.as_mut_ptr())], stream.raw()) }.unwrap();
        stream.synchronize().unwrap();
        assert_eq!(buf, send);
    }
    assert_eq!(lock(&eng.flags).blocks(), 1);
}

/// The engine holds its streams' context from its first exchange until it has freed its flags
/// and staging buffers (a program may release its own CUDA context before the transport): one
/// hold, then the frees, then one release, whatever the number of exchanges.
#[test]
fn the_context_outlives_the_engines_memory() {
    let stream = HostStream::new();
    let ops = Arc::new(Twin {
        ipc: true,
        ..Twin::default()
    });
    let log = ops.log.clone();
    let eng = DeviceEngine::with_wait(
        Loopback::default(),
        DevicePath::Staged,
        ops,
        Duration::from_secs(10),
        0,
        "test".into(),
        DeviceWait::Stream,
    );
    let send = [7u8; 64];
    let mut recv = [0u8; 64];
    let m = |p: *const u8| DeviceMsg {
        peer: 0,
        ptr: p as u64,
        len: 64,
    };
    for _ in 0..3 {
        // SAFETY: both buffers outlive the exchange (synchronised below).
        unsafe { eng.enqueue(&[m(send.as_ptr())], &[m(recv.as_mut_ptr())], stream.raw()) }.unwrap();
    }
    stream.synchronize().unwrap();
    assert_eq!(recv, send);
    assert_eq!(*lock(&log), ["hold"]);
    drop(eng);
    let log = lock(&log).clone();
    assert_eq!(log.first(), Some(&"hold"));
    assert_eq!(log.last(), Some(&"release"));
    assert_eq!(log.iter().filter(|e| **e == "release").count(), 1);
    assert!(
        log.contains(&"free flags") && log.contains(&"free pinned"),
        "{log:?}"
    );
}
