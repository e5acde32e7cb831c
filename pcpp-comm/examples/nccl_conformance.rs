//! Runs the `pcpp_comm::conformance` checks on `NcclTransport` (one GPU per rank, PCPP §7.4's
//! traffic over NCCL), then checks its device-memory path (`DeviceP2p`), started by `mpirun`
//! (unique id over MPI) or by hand with `PCPP_RANK`/`PCPP_WORLD_SIZE`/`PCPP_LOCAL_RANK`/
//! `PCPP_UCX_ROOT` (TCP rendezvous):
//!
//! ```sh
//! cargo build --release -p pcpp-comm --features nccl,mpi --example nccl_conformance
//! mpirun --allow-run-as-root -n 2 target/release/examples/nccl_conformance
//! ```
//!
//! One rank on one GPU works too (every message then goes to the rank itself).
//!
//! NCCL has no tags and cannot see a length mismatch, so `wrong_length` is not run;
//! `byte_accounting` (whose collective counts are back-end specific) and the CUDA-graph capture
//! of a device exchange (which depends on the NCCL version and configuration) are reported but
//! not required. Rank 0
//! prints a `PASS` or `FAIL` line per check, the other ranks only their `FAIL` lines; the exit
//! status is non-zero on every rank where a required check fails.

use std::ffi::c_void;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use pcpp_comm::conformance as c;
use pcpp_comm::launch::{self, ConnectOptions, LaunchEnv};
use pcpp_comm::{
    CommError, CommKind, DeviceMsg, DeviceP2p, KindStats, Transport, TransportKind,
    TransportOptions,
};

type CheckFn = fn(&dyn Transport) -> Result<(), String>;

fn main() -> ExitCode {
    let env = match LaunchEnv::from_env() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("nccl_conformance: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = ConnectOptions {
        transport: TransportOptions::with_timeout(Duration::from_secs(60)),
        ..ConnectOptions::default()
    };
    let conn = match launch::connect(TransportKind::Nccl, &env, &opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nccl_conformance: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t = conn.transport.clone();
    if conn.rank == 0 {
        eprintln!("nccl_conformance: {}", conn.description);
    }
    let required: [(&str, CheckFn); 14] = [
        ("rank_size", c::check_rank_size),
        ("ring_exchange", c::check_ring_exchange),
        ("zero_length", c::check_zero_length),
        ("large_messages", c::check_large_messages),
        ("all_gather", c::check_all_gather),
        ("all_reduce", c::check_all_reduce),
        ("broadcast", c::check_broadcast),
        ("barrier", c::check_barrier),
        ("split", c::check_split),
        ("device_ring", check_device_ring),
        ("device_zero_length", check_device_zero_length),
        ("device_bad_args", check_device_bad_args),
        ("device_repeated", check_device_repeated),
        ("device_split", check_device_split),
    ];
    let optional: [(&str, CheckFn); 2] = [
        ("byte_accounting", c::check_byte_accounting),
        ("device_graph_capture", check_device_graph_capture),
    ];
    let mut failed = 0;
    for (name, check) in required {
        let r = check(t.as_ref());
        report(conn.rank, name, "", &r);
        failed += usize::from(r.is_err());
    }
    for (name, check) in optional {
        let r = check(t.as_ref());
        report(conn.rank, name, " (not required)", &r);
    }
    if conn.rank == 0 {
        println!(
            "nccl_conformance (n = {}): {failed} required checks failed on rank 0",
            conn.world_size
        );
    } else if failed > 0 {
        println!(
            "nccl_conformance: {failed} required checks failed on rank {}",
            conn.rank
        );
    }
    drop(t);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints `PASS` on rank 0, `FAIL` with the reason on any rank.
fn report(rank: usize, name: &str, note: &str, r: &Result<(), String>) {
    match r {
        Ok(()) if rank == 0 => println!("rank {rank} {name}{note}: PASS"),
        Ok(()) => {}
        Err(e) => println!("rank {rank} {name}{note}: FAIL: {e}"),
    }
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// The byte pattern of message `which` from rank `src`, `len` bytes long.
fn pattern(src: usize, which: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i.wrapping_mul(13)
                .wrapping_add(src.wrapping_mul(37))
                .wrapping_add(which.wrapping_mul(101))
                ^ (i >> 8)) as u8
        })
        .collect()
}

/// Length of the message of rank `src` travelling to the right (odd, rank-dependent).
fn right_len(src: usize) -> usize {
    (1 << 20) + 7 * src + 1
}

/// Length of the message of rank `src` travelling to the left.
fn left_len(src: usize) -> usize {
    4093 + 11 * src
}

/// The device-memory interface of `t`, which the NCCL back-end must offer.
fn p2p(t: &dyn Transport) -> Result<&dyn DeviceP2p, String> {
    t.device_p2p()
        .ok_or_else(|| "device_p2p() is None".to_string())
}

/// A fresh stream on the transport's GPU (not the transport's own stream).
fn device_stream(p: &dyn DeviceP2p) -> Result<Arc<CudaStream>, String> {
    let ctx = CudaContext::new(p.device_ordinal())
        .map_err(|e| format!("open GPU {}: {e}", p.device_ordinal()))?;
    ctx.new_stream().map_err(|e| format!("new stream: {e}"))
}

/// Waits for `stream` with a deadline, so a lost peer fails the check instead of hanging it.
fn wait(stream: &CudaStream, timeout: Duration) -> Result<(), String> {
    let ev = stream
        .record_event(None)
        .map_err(|e| format!("record event: {e}"))?;
    let start = Instant::now();
    while !ev.is_complete() {
        ensure!(
            start.elapsed() < timeout,
            "stream not done after {timeout:?}"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
    stream
        .synchronize()
        .map_err(|e| format!("synchronize: {e}"))
}

fn raw(stream: &CudaStream) -> *mut c_void {
    stream.cu_stream() as *mut c_void
}

/// The device buffers of one ring exchange: to the right and to the left, and back.
///
/// The device addresses are taken once, when the buffers are made: everything runs on one
/// stream, so cudarc's cross-stream event tracking is not needed, and nothing of cudarc runs
/// inside a stream capture.
struct Ring {
    right: usize,
    left: usize,
    send_r: CudaSlice<u8>,
    send_l: CudaSlice<u8>,
    recv_l: CudaSlice<u8>,
    recv_r: CudaSlice<u8>,
    sends: [DeviceMsg; 2],
    recvs: [DeviceMsg; 2],
}

/// The device address of `d` (for use on `stream` only).
fn addr(d: &CudaSlice<u8>, stream: &CudaStream) -> u64 {
    let (ptr, _sync) = d.device_ptr(stream);
    ptr
}

impl Ring {
    /// Send buffers filled with this rank's patterns, receive buffers with `0xEE` (a value
    /// the patterns do not consist of), all on `stream`.
    fn new(t: &dyn Transport, stream: &Arc<CudaStream>) -> Result<Ring, String> {
        let (n, r) = (t.size(), t.rank());
        let (right, left) = ((r + 1) % n, (r + n - 1) % n);
        let up = |data: Vec<u8>| {
            stream
                .clone_htod(&data)
                .map_err(|e| format!("host to device copy: {e}"))
        };
        let send_r = up(pattern(r, 0, right_len(r)))?;
        let send_l = up(pattern(r, 1, left_len(r)))?;
        let recv_l = up(vec![0xEE; right_len(left)])?;
        let recv_r = up(vec![0xEE; left_len(right)])?;
        let msg = |peer, d: &CudaSlice<u8>| DeviceMsg {
            peer,
            ptr: addr(d, stream),
            len: d.len(),
        };
        let sends = [msg(right, &send_r), msg(left, &send_l)];
        let recvs = [msg(left, &recv_l), msg(right, &recv_r)];
        Ok(Ring {
            right,
            left,
            send_r,
            send_l,
            recv_l,
            recv_r,
            sends,
            recvs,
        })
    }

    /// Refills the receive buffers with `0xEE` (on `stream`).
    fn clear(&mut self, stream: &Arc<CudaStream>) -> Result<(), String> {
        stream
            .memcpy_htod(&vec![0xEE; self.recv_l.len()], &mut self.recv_l)
            .map_err(|e| format!("clear: {e}"))?;
        stream
            .memcpy_htod(&vec![0xEE; self.recv_r.len()], &mut self.recv_r)
            .map_err(|e| format!("clear: {e}"))
    }

    /// Enqueues the exchange on `stream`: to the right then to the left, from the left then
    /// from the right (with one or two ranks both neighbours are the same rank, and messages
    /// match in posting order).
    fn enqueue(&self, p: &dyn DeviceP2p, stream: &CudaStream) -> Result<(), String> {
        // SAFETY: the four buffers are device memory of the transport's GPU of exactly these
        // lengths, owned by `self`, and touched by no other work until the caller has waited
        // for `stream` (the stream they were made on, of that GPU).
        unsafe { p.enqueue(CommKind::Halo, &self.sends, &self.recvs, raw(stream)) }
            .map_err(|e| format!("enqueue: {e}"))
    }

    /// Compares the received buffers with the neighbours' patterns.
    fn verify(&self, stream: &Arc<CudaStream>) -> Result<(), String> {
        let down = |d: &CudaSlice<u8>| {
            stream
                .clone_dtoh(d)
                .map_err(|e| format!("device to host copy: {e}"))
        };
        let from_left = down(&self.recv_l)?;
        let from_right = down(&self.recv_r)?;
        let exp_left = pattern(self.left, 0, right_len(self.left));
        let exp_right = pattern(self.right, 1, left_len(self.right));
        if let Some(i) = (0..exp_left.len()).find(|&i| from_left[i] != exp_left[i]) {
            return Err(format!(
                "from left rank {}: byte {i} of {} is {:#04x}, expected {:#04x}",
                self.left,
                exp_left.len(),
                from_left[i],
                exp_left[i]
            ));
        }
        if let Some(i) = (0..exp_right.len()).find(|&i| from_right[i] != exp_right[i]) {
            return Err(format!(
                "from right rank {}: byte {i} of {} is {:#04x}, expected {:#04x}",
                self.right,
                exp_right.len(),
                from_right[i],
                exp_right[i]
            ));
        }
        Ok(())
    }

    /// The exact stats one enqueue of this exchange adds under its kind.
    fn expected_stats(&self) -> KindStats {
        KindStats {
            bytes_sent: (self.send_r.len() + self.send_l.len()) as u64,
            bytes_recvd: (self.recv_l.len() + self.recv_r.len()) as u64,
            msgs_sent: 2,
            msgs_recvd: 2,
        }
    }
}

/// Ring exchange of rank-dependent patterns in device memory (to `(r + 1) % n`, from
/// `(r + n - 1) % n`, and back the other way), on a stream other than the transport's; exact
/// byte accounting under the kind given.
fn check_device_ring(t: &dyn Transport) -> Result<(), String> {
    let p = p2p(t)?;
    let stream = device_stream(p)?;
    let ring = Ring::new(t, &stream)?;
    wait(&stream, t.options().timeout)?;
    t.barrier().map_err(|e| format!("barrier: {e}"))?;
    t.reset_stats();
    ring.enqueue(p, &stream)?;
    let s = t.stats();
    wait(&stream, t.options().timeout)?;
    ring.verify(&stream)?;
    ensure!(
        s.get(CommKind::Halo) == ring.expected_stats(),
        "halo stats {:?}, expected {:?}",
        s.get(CommKind::Halo),
        ring.expected_stats()
    );
    ensure!(
        s.total() == ring.expected_stats(),
        "traffic counted under other kinds: total {:?}",
        s.total()
    );
    Ok(())
}

/// Zero-length messages (null pointers allowed) and an empty call complete and are counted as
/// messages of zero bytes; a zero-length message mixed with a real one does not disturb it.
fn check_device_zero_length(t: &dyn Transport) -> Result<(), String> {
    let p = p2p(t)?;
    let stream = device_stream(p)?;
    let (n, r) = (t.size(), t.rank());
    let (right, left) = ((r + 1) % n, (r + n - 1) % n);
    t.reset_stats();
    let zero = |peer| DeviceMsg {
        peer,
        ptr: 0,
        len: 0,
    };
    // SAFETY: no message has bytes; the stream is a live stream of the transport's GPU.
    unsafe { p.enqueue(CommKind::Other, &[zero(right)], &[zero(left)], raw(&stream)) }
        .map_err(|e| format!("zero-length enqueue: {e}"))?;
    // SAFETY: as above.
    unsafe { p.enqueue(CommKind::Other, &[], &[], raw(&stream)) }
        .map_err(|e| format!("empty enqueue: {e}"))?;
    let exp = KindStats {
        bytes_sent: 0,
        bytes_recvd: 0,
        msgs_sent: 1,
        msgs_recvd: 1,
    };
    ensure!(
        t.stats().get(CommKind::Other) == exp,
        "zero-length stats {:?}, expected {exp:?}",
        t.stats().get(CommKind::Other)
    );
    let send = stream
        .clone_htod(&pattern(r, 2, 300 + r))
        .map_err(|e| format!("upload: {e}"))?;
    let mut recv = stream
        .clone_htod(&vec![0xEE; 300 + left])
        .map_err(|e| format!("upload: {e}"))?;
    {
        let recv_len = recv.len();
        let (s, _gs) = send.device_ptr(&stream);
        let (d, _gd) = recv.device_ptr_mut(&stream);
        let sends = [
            zero(right),
            DeviceMsg {
                peer: right,
                ptr: s,
                len: send.len(),
            },
        ];
        let recvs = [
            zero(left),
            DeviceMsg {
                peer: left,
                ptr: d,
                len: recv_len,
            },
        ];
        // SAFETY: `send` and `recv` are device buffers of the transport's GPU of these
        // lengths, untouched by other work until the stream is waited for below.
        unsafe { p.enqueue(CommKind::Other, &sends, &recvs, raw(&stream)) }
            .map_err(|e| format!("mixed enqueue: {e}"))?;
    }
    wait(&stream, t.options().timeout)?;
    let got = stream
        .clone_dtoh(&recv)
        .map_err(|e| format!("download: {e}"))?;
    ensure!(
        got == pattern(left, 2, 300 + left),
        "mixed: wrong {} bytes from left rank {left}",
        got.len()
    );
    Ok(())
}

/// A peer outside `0..size` (as sender and as receiver) and a null pointer with a length are
/// rejected with an error naming the peer, before anything is enqueued or counted.
fn check_device_bad_args(t: &dyn Transport) -> Result<(), String> {
    let p = p2p(t)?;
    let stream = device_stream(p)?;
    let n = t.size();
    let buf = stream
        .alloc_zeros::<u8>(64)
        .map_err(|e| format!("alloc: {e}"))?;
    t.reset_stats();
    let (ptr, _g) = buf.device_ptr(&stream);
    let good = DeviceMsg {
        peer: t.rank(),
        ptr,
        len: 64,
    };
    let bad = DeviceMsg {
        peer: n,
        ptr,
        len: 64,
    };
    // SAFETY: the call must fail before enqueueing anything; the buffer is a live device buffer
    // of the transport's GPU in any case.
    let r = unsafe { p.enqueue(CommKind::Halo, &[good, bad], &[good], raw(&stream)) };
    ensure!(
        matches!(r, Err(CommError::InvalidRank { peer, size, .. }) if peer == n && size == n),
        "send to rank {n} of {n} gave {r:?}"
    );
    // SAFETY: as above.
    let r = unsafe { p.enqueue(CommKind::Halo, &[], &[bad], raw(&stream)) };
    ensure!(
        matches!(r, Err(CommError::InvalidRank { peer, .. }) if peer == n),
        "receive from rank {n} of {n} gave {r:?}"
    );
    let null = DeviceMsg {
        peer: t.rank(),
        ptr: 0,
        len: 16,
    };
    // SAFETY: as above.
    let r = unsafe { p.enqueue(CommKind::Halo, &[null], &[null], raw(&stream)) };
    ensure!(
        matches!(r, Err(CommError::Protocol { .. })),
        "null pointer with 16 bytes gave {r:?}"
    );
    ensure!(
        t.stats().total() == KindStats::default(),
        "rejected calls were counted: {:?}",
        t.stats().total()
    );
    Ok(())
}

/// Three ring exchanges enqueued back to back on one stream before waiting (posting-order
/// matching across calls), then the same buffers again; all complete with the right data.
fn check_device_repeated(t: &dyn Transport) -> Result<(), String> {
    let p = p2p(t)?;
    let stream = device_stream(p)?;
    let mut rings = Vec::new();
    for _ in 0..3 {
        rings.push(Ring::new(t, &stream)?);
    }
    for ring in &rings {
        ring.enqueue(p, &stream)?;
    }
    wait(&stream, t.options().timeout)?;
    for (i, ring) in rings.iter().enumerate() {
        ring.verify(&stream)
            .map_err(|e| format!("exchange {i}: {e}"))?;
    }
    rings[1].clear(&stream)?;
    rings[1].enqueue(p, &stream)?;
    wait(&stream, t.options().timeout)?;
    rings[1]
        .verify(&stream)
        .map_err(|e| format!("repeated exchange: {e}"))
}

/// A sub-transport made by `split` (odd / even ranks) also offers device p2p on the same GPU,
/// with ranks of the sub-group.
fn check_device_split(t: &dyn Transport) -> Result<(), String> {
    let sub = t
        .split((t.rank() % 2) as u32, 0)
        .map_err(|e| format!("split: {e}"))?;
    let sp = p2p(sub.as_ref()).map_err(|e| format!("sub-transport: {e}"))?;
    ensure!(
        sp.device_ordinal() == p2p(t)?.device_ordinal(),
        "sub-transport on GPU {}, parent on GPU {}",
        sp.device_ordinal(),
        p2p(t)?.device_ordinal()
    );
    check_device_ring(sub.as_ref())
        .map_err(|e| format!("sub-transport rank {}/{}: {e}", sub.rank(), sub.size()))?;
    t.barrier().map_err(|e| format!("barrier: {e}"))
}

/// A ring exchange enqueued while its stream is captured into a CUDA graph, the graph launched
/// twice. Ranks agree (over the host path) that every capture succeeded before launching, so
/// a capture failure on one rank does not leave the others waiting.
fn check_device_graph_capture(t: &dyn Transport) -> Result<(), String> {
    let p = p2p(t)?;
    let stream = device_stream(p)?;
    let mut ring = Ring::new(t, &stream)?;
    wait(&stream, t.options().timeout)?;
    t.barrier().map_err(|e| format!("barrier: {e}"))?;
    let captured = (|| -> Result<_, String> {
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| format!("begin capture: {e}"))?;
        let enq = ring.enqueue(p, &stream);
        let graph = stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| format!("end capture: {e}"));
        enq?;
        graph?.ok_or_else(|| "capture produced no graph".to_string())
    })();
    let ok = t
        .all_gather(CommKind::Control, &[u8::from(captured.is_ok())])
        .map_err(|e| format!("agreeing on the capture: {e}"))?;
    let graph = captured?;
    if let Some(q) = ok.iter().position(|v| v.as_slice() != [1]) {
        return Err(format!("capture failed on rank {q}"));
    }
    for launch in 0..2 {
        ring.clear(&stream)?;
        graph
            .launch()
            .map_err(|e| format!("graph launch {launch}: {e}"))?;
        wait(&stream, t.options().timeout)?;
        ring.verify(&stream)
            .map_err(|e| format!("after graph launch {launch}: {e}"))?;
    }
    Ok(())
}
