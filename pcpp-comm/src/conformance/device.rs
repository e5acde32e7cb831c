//! Device-memory cases of the conformance suite: the contract of [`DeviceP2p`] that the PCPP
//! runtime's device path relies on (§7.4: exchanges between device buffers enqueued on the
//! communication stream), for every back-end that offers it (NCCL, MPI, UCX).
//!
//! Cases: a ring in both directions with per-direction lengths and a host exchange in flight at
//! the same time, zero-length messages, repeated exchanges through the same persistent buffers
//! (new contents each time) and many exchanges enqueued back to back, exchanges on split
//! sub-groups, the traffic of CFG-split denoising steps (two sub-groups with engines of their
//! own, a world all-to-all among their exchanges, host collectives meanwhile), exact byte
//! accounting and rejected arguments. [`run_device`] is collective; it
//! runs on any [`TestDevice`]: [`HostDevice`] (the CPU twin: [`HostStream`] and host memory, for
//! transports created with [`crate::DeviceStreams::Host`]) or, with the `cuda` feature, [`CudaDevice`].

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use super::{ce, neighbours, pattern, Check};
use crate::device::host::{HostStream, HostStreams};
use crate::device::StreamOps;
use crate::stats::{CommKind, KindStats};
use crate::transport::{DeviceMsg, DeviceP2p, Transport};
use crate::CommError;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// Device memory and one stream, for the device cases.
pub trait TestDevice {
    /// For messages, e.g. `cuda:0` or `host`.
    fn name(&self) -> String;
    /// The stream to enqueue on.
    fn stream(&self) -> *mut c_void;
    /// The operations on [`TestDevice::stream`].
    fn ops(&self) -> &dyn StreamOps;
    /// `len` zeroed bytes of device memory, alive as long as `self`.
    fn alloc(&self, len: usize) -> Result<u64, String>;
    /// Waits until everything enqueued on the stream has run.
    fn synchronize(&self) -> Result<(), String>;

    /// Writes `data` at `ptr` with a copy on the stream (after everything enqueued before it),
    /// and waits for it.
    ///
    /// The copy must be ordered on the stream the exchanges are enqueued on: a synchronous
    /// `cuMemcpyHtoD` runs on CUDA's legacy default stream, which a non-blocking stream does
    /// not wait for, and returns before its DMA from pageable memory has landed, so an exchange
    /// enqueued right after it could send the old contents.
    fn upload(&self, ptr: u64, data: &[u8]) -> Result<(), String> {
        // SAFETY: `ptr` is an allocation of this device with at least `data.len()` bytes (the
        // caller's promise); `data` outlives the copy, which is waited for below.
        unsafe {
            self.ops()
                .copy_htod(self.stream(), ptr, data.as_ptr(), data.len())
        }?;
        self.synchronize()
    }

    /// Reads `len` bytes at `ptr` with a copy on the stream (after everything enqueued before
    /// it, exchanges included), waiting for it.
    fn download(&self, ptr: u64, len: usize) -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; len];
        // SAFETY: as `upload`, the other way.
        unsafe {
            self.ops()
                .copy_dtoh(self.stream(), out.as_mut_ptr(), ptr, len)
        }?;
        self.synchronize()?;
        Ok(out)
    }
}

/// The CPU twin: a [`HostStream`] and host memory.
pub struct HostDevice {
    stream: Arc<HostStream>,
    bufs: Mutex<Vec<Box<[u8]>>>,
}

impl HostDevice {
    /// A new stream and an empty heap.
    pub fn new() -> HostDevice {
        HostDevice {
            stream: HostStream::new(),
            bufs: Mutex::new(Vec::new()),
        }
    }
}

impl Default for HostDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDevice for HostDevice {
    fn name(&self) -> String {
        "host".into()
    }
    fn stream(&self) -> *mut c_void {
        self.stream.raw()
    }
    fn ops(&self) -> &dyn StreamOps {
        &HostStreams
    }
    fn alloc(&self, len: usize) -> Result<u64, String> {
        let mut b = vec![0u8; len.max(1)].into_boxed_slice();
        let p = b.as_mut_ptr() as u64;
        self.bufs.lock().map_err(|_| "heap poisoned")?.push(b);
        Ok(p)
    }
    fn synchronize(&self) -> Result<(), String> {
        self.stream.synchronize()
    }
}

/// A CUDA device: its own (non-blocking) stream and device allocations (feature `cuda`), from
/// CUDA's stream-ordered pool as the runtime's tensors are (`cuMemAllocAsync` through cudarc,
/// where the device has pools), or with `legacy` from `cuMemAlloc`, which CUDA IPC can share.
#[cfg(feature = "cuda")]
pub struct CudaDevice {
    ordinal: usize,
    stream: Arc<cudarc::driver::CudaStream>,
    bufs: Mutex<Vec<cudarc::driver::CudaSlice<u8>>>,
    legacy: Option<Mutex<Vec<(u64, usize)>>>,
}

#[cfg(feature = "cuda")]
impl CudaDevice {
    /// Opens GPU `ordinal` and creates a stream on it; allocations from the stream-ordered pool.
    pub fn new(ordinal: usize) -> Result<CudaDevice, String> {
        Self::with_alloc(ordinal, false)
    }

    /// As [`CudaDevice::new`], allocating with `cuMemAlloc` when `legacy`.
    pub fn with_alloc(ordinal: usize, legacy: bool) -> Result<CudaDevice, String> {
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| format!("open GPU {ordinal}: {e}"))?;
        let stream = ctx.new_stream().map_err(|e| format!("stream: {e}"))?;
        Ok(CudaDevice {
            ordinal,
            stream,
            bufs: Mutex::new(Vec::new()),
            legacy: legacy.then(|| Mutex::new(Vec::new())),
        })
    }
}

#[cfg(feature = "cuda")]
impl Drop for CudaDevice {
    fn drop(&mut self) {
        let Some(legacy) = &self.legacy else {
            return;
        };
        let _ = self.stream.synchronize();
        let ctx = self.stream.context().cu_ctx() as usize;
        for (p, len) in legacy
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
        {
            // SAFETY: allocated by `alloc_device` in this context; the stream is idle.
            unsafe { self.ops().free_device(ctx, p, len) };
        }
    }
}

#[cfg(feature = "cuda")]
impl TestDevice for CudaDevice {
    fn name(&self) -> String {
        let how = if self.legacy.is_some() {
            "cuMemAlloc"
        } else {
            "pool"
        };
        format!("cuda:{} ({how} memory)", self.ordinal)
    }
    fn stream(&self) -> *mut c_void {
        self.stream.cu_stream() as *mut c_void
    }
    fn ops(&self) -> &dyn StreamOps {
        &crate::device::cuda::CudaStreams
    }
    fn alloc(&self, len: usize) -> Result<u64, String> {
        use cudarc::driver::DevicePtr;
        if let Some(legacy) = &self.legacy {
            let len = len.max(1);
            // SAFETY: the stream is live.
            let p = unsafe { self.ops().alloc_device(self.stream(), len) }?;
            legacy.lock().map_err(|_| "heap poisoned")?.push((p, len));
            self.upload(p, &vec![0u8; len])?;
            return Ok(p);
        }
        let b = self
            .stream
            .alloc_zeros::<u8>(len.max(1))
            .map_err(|e| format!("cuMemAlloc of {len} bytes: {e}"))?;
        self.synchronize()?;
        let p = {
            let (p, _sync) = b.device_ptr(&self.stream);
            p
        };
        self.bufs.lock().map_err(|_| "heap poisoned")?.push(b);
        Ok(p)
    }
    fn synchronize(&self) -> Result<(), String> {
        self.stream
            .synchronize()
            .map_err(|e| format!("stream synchronize: {e}"))
    }
}

fn p2p(t: &dyn Transport) -> Result<&dyn DeviceP2p, String> {
    t.device_p2p()
        .ok_or_else(|| "the transport offers no device point-to-point".to_string())
}

/// Enqueues on `dev`'s stream.
fn enqueue(
    t: &dyn Transport,
    dev: &dyn TestDevice,
    kind: CommKind,
    sends: &[DeviceMsg],
    recvs: &[DeviceMsg],
) -> Result<(), CommError> {
    let p = t.device_p2p().ok_or(CommError::Protocol {
        op: "enqueue",
        peer: t.rank(),
        tag: 0,
        detail: "no device point-to-point".into(),
    })?;
    // SAFETY: every pointer is an allocation of `dev` with at least `len` bytes that lives as
    // long as `dev`; the cases read or rewrite the buffers only after synchronising the stream.
    unsafe { p.enqueue(kind, sends, recvs, dev.stream()) }
}

/// Buffers of one exchange: device copies of what goes out, where it comes in.
struct Staged {
    sends: Vec<DeviceMsg>,
    recvs: Vec<DeviceMsg>,
    expect: Vec<Vec<u8>>,
}

/// Allocates and fills the buffers of `sends` (`(peer, payload)`) and of receives
/// `(peer, expected payload)`.
fn stage(
    dev: &dyn TestDevice,
    sends: &[(usize, Vec<u8>)],
    recvs: &[(usize, Vec<u8>)],
) -> Result<Staged, String> {
    let mut s = Vec::new();
    for (peer, data) in sends {
        let ptr = dev.alloc(data.len())?;
        dev.upload(ptr, data)?;
        s.push(DeviceMsg {
            peer: *peer,
            ptr,
            len: data.len(),
        });
    }
    let mut r = Vec::new();
    for (peer, data) in recvs {
        r.push(DeviceMsg {
            peer: *peer,
            ptr: dev.alloc(data.len())?,
            len: data.len(),
        });
    }
    Ok(Staged {
        sends: s,
        recvs: r,
        expect: recvs.iter().map(|x| x.1.clone()).collect(),
    })
}

fn verify(dev: &dyn TestDevice, st: &Staged, what: &str) -> Check {
    for (i, (m, want)) in st.recvs.iter().zip(&st.expect).enumerate() {
        let got = dev.download(m.ptr, m.len)?;
        if &got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!(
                "{what}: receive {i} from rank {} ({} bytes) differs at byte {at}",
                m.peer, m.len
            ));
        }
    }
    Ok(())
}

/// Length of the device ring message from `src` in direction `dir` (0 right, 1 left), round `k`.
fn dlen(src: usize, dir: usize, k: usize) -> usize {
    [4096, 1, 65_536 + 3, 3 << 20][k % 4] + 17 * src + 5 * dir
}

/// Ring in both directions, three rounds enqueued back to back before one synchronisation, with
/// a host exchange posted in between (device traffic must not match it).
pub fn check_device_ring(t: &dyn Transport, dev: &dyn TestDevice) -> Check {
    let (n, r) = (t.size(), t.rank());
    let (left, right) = neighbours(t);
    let mut rounds = Vec::new();
    for k in 0..3 {
        let sends = vec![
            (right, pattern(r, right, 1000 + k as u32, dlen(r, 0, k))),
            (left, pattern(r, left, 2000 + k as u32, dlen(r, 1, k))),
        ];
        let recvs = vec![
            (left, pattern(left, r, 1000 + k as u32, dlen(left, 0, k))),
            (right, pattern(right, r, 2000 + k as u32, dlen(right, 1, k))),
        ];
        rounds.push(stage(dev, &sends, &recvs)?);
    }
    let host = t
        .exchange(
            CommKind::Halo,
            0,
            vec![(right, pattern(r, right, 0, 333))],
            vec![(left, 333)],
        )
        .map_err(ce("host exchange"))?;
    for (k, st) in rounds.iter().enumerate() {
        enqueue(t, dev, CommKind::Halo, &st.sends, &st.recvs)
            .map_err(ce(&format!("enqueue round {k}")))?;
    }
    let got = host.wait().map_err(ce("host exchange wait"))?;
    ensure!(
        got.len() == 1 && got[0] == pattern(left, r, 0, 333),
        "the host exchange in flight with device traffic received wrong data"
    );
    dev.synchronize()?;
    for (k, st) in rounds.iter().enumerate() {
        verify(dev, st, &format!("ring round {k} (n = {n})"))?;
    }
    Ok(())
}

/// Zero-length messages beside non-empty ones, and an exchange of nothing but zero-length ones.
pub fn check_device_zero_length(t: &dyn Transport, dev: &dyn TestDevice) -> Check {
    let r = t.rank();
    let (left, right) = neighbours(t);
    let empty = DeviceMsg {
        peer: right,
        ptr: 0,
        len: 0,
    };
    enqueue(
        t,
        dev,
        CommKind::Attention,
        &[empty],
        &[DeviceMsg {
            peer: left,
            ..empty
        }],
    )
    .map_err(ce("zero-length only"))?;
    let st = stage(
        dev,
        &[(right, Vec::new()), (right, pattern(r, right, 7, 999))],
        &[(left, Vec::new()), (left, pattern(left, r, 7, 999))],
    )?;
    enqueue(t, dev, CommKind::Attention, &st.sends, &st.recvs).map_err(ce("mixed"))?;
    dev.synchronize()?;
    verify(dev, &st, "zero-length beside data")
}

/// The same persistent buffers for many exchanges with new contents each time (the runtime's
/// per-slot buffers), then many exchanges enqueued back to back.
pub fn check_device_repeated(t: &dyn Transport, dev: &dyn TestDevice) -> Check {
    let r = t.rank();
    let (left, right) = neighbours(t);
    let len = 40_000;
    let send = dev.alloc(len)?;
    let recv = dev.alloc(len)?;
    for k in 0..6u32 {
        dev.upload(send, &pattern(r, right, 300 + k, len))?;
        enqueue(
            t,
            dev,
            CommKind::GroupNorm,
            &[DeviceMsg {
                peer: right,
                ptr: send,
                len,
            }],
            &[DeviceMsg {
                peer: left,
                ptr: recv,
                len,
            }],
        )
        .map_err(ce(&format!("exchange {k}")))?;
        let got = dev.download(recv, len)?;
        ensure!(
            got == pattern(left, r, 300 + k, len),
            "exchange {k} through the same buffers received stale or wrong data"
        );
    }
    let mut all = Vec::new();
    for k in 0..24u32 {
        let l = 1 + (k as usize * 977) % 20_000;
        all.push(stage(
            dev,
            &[(right, pattern(r, right, 400 + k, l))],
            &[(left, pattern(left, r, 400 + k, l))],
        )?);
    }
    for (k, st) in all.iter().enumerate() {
        enqueue(t, dev, CommKind::GroupNorm, &st.sends, &st.recvs)
            .map_err(ce(&format!("back-to-back exchange {k}")))?;
    }
    dev.synchronize()?;
    for (k, st) in all.iter().enumerate() {
        verify(dev, st, &format!("back-to-back exchange {k}"))?;
    }
    Ok(())
}

/// Split sub-groups (by parity, reversed order) exchange on their own, interleaved with world
/// traffic.
pub fn check_device_split(t: &dyn Transport, dev: &dyn TestDevice) -> Check {
    let r = t.rank();
    let sub = t
        .split((r % 2) as u32, (t.size() - r) as u32)
        .map_err(ce("split"))?;
    p2p(sub.as_ref())?;
    let (sl, sr) = neighbours(sub.as_ref());
    let sb = sub.rank();
    let in_sub = stage(
        dev,
        &[(sr, pattern(sb, sr, 500, 5000 + sb))],
        &[(sl, pattern(sl, sb, 500, 5000 + sl))],
    )?;
    let (left, right) = neighbours(t);
    let in_world = stage(
        dev,
        &[(right, pattern(r, right, 501, 7000))],
        &[(left, pattern(left, r, 501, 7000))],
    )?;
    enqueue(
        sub.as_ref(),
        dev,
        CommKind::Attention,
        &in_sub.sends,
        &in_sub.recvs,
    )
    .map_err(ce("sub-group exchange"))?;
    enqueue(
        t,
        dev,
        CommKind::Attention,
        &in_world.sends,
        &in_world.recvs,
    )
    .map_err(ce("world exchange"))?;
    dev.synchronize()?;
    verify(dev, &in_sub, "sub-group exchange")?;
    verify(dev, &in_world, "world exchange beside the sub-group's")?;
    t.barrier().map_err(ce("barrier"))
}

/// Length of message `j` of group exchange `k` from group rank `src` to `dst` in
/// [`check_device_groups`]: rendezvous-sized (the UNet's K/V windows and halos at 256²) beside
/// small ones, different per direction.
fn glen(k: usize, j: usize, src: usize, dst: usize) -> usize {
    [200_000, 2048, 333_333, 70_000][(k + 2 * j) % 4] + 64 * src + 8 * dst + j
}

/// Tag (payload seed) of message `j` of exchange `k` of step `step` ([`check_device_groups`]).
fn gtag(step: usize, k: usize, j: usize) -> u32 {
    (7000 + 100 * step + 10 * k + j) as u32
}

/// The traffic of a CFG-split `generate` step (PCPP §1.4, §7.4), for several steps: the world
/// split into two contiguous groups (one device engine each, besides the world's), per step
/// several group exchanges to the neighbours above and below (no wrap), two messages per
/// neighbour in each (K and V), enqueued back to back on one stream and not waited for, with an
/// all-to-all of the world (the output gather) among them, while the host runs collectives on the
/// world and the group; every step rewrites the same persistent buffers. The first group posts
/// the all-to-all earlier in its sequence than the second, so world messages reach ranks of the
/// second group while their group exchanges are in flight (traffic of different groups must never
/// match, whichever arrives first).
pub fn check_device_groups(t: &dyn Transport, dev: &dyn TestDevice) -> Check {
    const STEPS: usize = 4;
    const EXCHANGES: usize = 5;
    let (n, r) = (t.size(), t.rank());
    let second = r >= n.div_ceil(2);
    // Position of the world all-to-all among the group exchanges.
    let gather_at = if second { 3 } else { 1 };
    let g = t.split(u32::from(second), r as u32).map_err(ce("split"))?;
    p2p(g.as_ref())?;
    let (gn, gr) = (g.size(), g.rank());
    let nbrs: Vec<usize> = [gr.checked_sub(1), (gr + 1 < gn).then_some(gr + 1)]
        .into_iter()
        .flatten()
        .collect();
    // (peer, j): two messages to each neighbour, in this order on both sides.
    let msgs: Vec<(usize, usize)> = nbrs
        .iter()
        .flat_map(|&p| (0..2).map(move |j| (p, j)))
        .collect();
    let others: Vec<usize> = (0..n).filter(|&p| p != r).collect();
    let wlen = |src: usize| 150_000 + 1000 * src;
    // Persistent buffers: per group exchange one send and one receive per (peer, j); per world
    // peer one of each.
    let mut gbufs = Vec::new();
    for k in 0..EXCHANGES {
        let mut s = Vec::new();
        let mut rv = Vec::new();
        for &(p, j) in &msgs {
            s.push(DeviceMsg {
                peer: p,
                ptr: dev.alloc(glen(k, j, gr, p))?,
                len: glen(k, j, gr, p),
            });
            rv.push(DeviceMsg {
                peer: p,
                ptr: dev.alloc(glen(k, j, p, gr))?,
                len: glen(k, j, p, gr),
            });
        }
        gbufs.push((s, rv));
    }
    let mut wsends = Vec::new();
    let mut wrecvs = Vec::new();
    for &p in &others {
        wsends.push(DeviceMsg {
            peer: p,
            ptr: dev.alloc(wlen(r))?,
            len: wlen(r),
        });
        wrecvs.push(DeviceMsg {
            peer: p,
            ptr: dev.alloc(wlen(p))?,
            len: wlen(p),
        });
    }
    for step in 0..STEPS {
        for (k, (s, _)) in gbufs.iter().enumerate() {
            for (m, &(p, j)) in s.iter().zip(&msgs) {
                dev.upload(m.ptr, &pattern(gr, p, gtag(step, k, j), m.len))?;
            }
        }
        for m in &wsends {
            dev.upload(m.ptr, &pattern(r, m.peer, 9000 + step as u32, m.len))?;
        }
        for (k, (s, rv)) in gbufs.iter().enumerate() {
            if k == gather_at {
                enqueue(t, dev, CommKind::Gather, &wsends, &wrecvs)
                    .map_err(ce(&format!("step {step}: world all-to-all")))?;
            }
            enqueue(g.as_ref(), dev, CommKind::Attention, s, rv)
                .map_err(ce(&format!("step {step}: group exchange {k}")))?;
        }
        // Host collectives while the stream still moves the step's device traffic.
        let mine = pattern(r, n, 8000 + step as u32, 100 + r);
        let all = t
            .all_gather(CommKind::Control, &mine)
            .map_err(ce(&format!("step {step}: world all-gather")))?;
        for (p, got) in all.iter().enumerate() {
            ensure!(
                *got == pattern(p, n, 8000 + step as u32, 100 + p),
                "step {step}: the world all-gather beside device traffic got wrong bytes from rank {p}"
            );
        }
        let mut b = if gr == 0 {
            pattern(gn, gn, 8500 + step as u32, 5000)
        } else {
            Vec::new()
        };
        g.broadcast(CommKind::Control, 0, &mut b)
            .map_err(ce(&format!("step {step}: group broadcast")))?;
        ensure!(
            b == pattern(gn, gn, 8500 + step as u32, 5000),
            "step {step}: the group broadcast beside device traffic got wrong bytes"
        );
        dev.synchronize()?;
        for (k, (_, rv)) in gbufs.iter().enumerate() {
            for (m, &(p, j)) in rv.iter().zip(&msgs) {
                let got = dev.download(m.ptr, m.len)?;
                ensure!(
                    got == pattern(p, gr, gtag(step, k, j), m.len),
                    "step {step}: group exchange {k}, message {j} from group rank {p} ({} bytes) is wrong",
                    m.len
                );
            }
        }
        for m in &wrecvs {
            let got = dev.download(m.ptr, m.len)?;
            ensure!(
                got == pattern(m.peer, r, 9000 + step as u32, m.len),
                "step {step}: world all-to-all message from rank {} is wrong",
                m.peer
            );
        }
    }
    t.barrier().map_err(ce("barrier"))
}

/// Every message is counted at enqueue time, zero-length ones included; rejected calls count
/// nothing.
pub fn check_device_accounting(t: &dyn Transport, dev: &dyn TestDevice) -> Check {
    let r = t.rank();
    let (left, right) = neighbours(t);
    t.barrier().map_err(ce("barrier"))?;
    t.reset_stats();
    let st = stage(
        dev,
        &[
            (right, pattern(r, right, 600, 1000 + r)),
            (left, Vec::new()),
        ],
        &[
            (left, pattern(left, r, 600, 1000 + left)),
            (right, Vec::new()),
        ],
    )?;
    enqueue(t, dev, CommKind::Halo, &st.sends, &st.recvs).map_err(ce("exchange"))?;
    let bad = DeviceMsg {
        peer: t.size(),
        ptr: st.sends[0].ptr,
        len: 4,
    };
    match enqueue(t, dev, CommKind::Halo, &[bad], &[]) {
        Err(CommError::InvalidRank { peer, .. }) if peer == t.size() => {}
        other => {
            return Err(format!(
                "a peer outside the world: expected InvalidRank, got {other:?}"
            ))
        }
    }
    let null = DeviceMsg {
        peer: right,
        ptr: 0,
        len: 4,
    };
    match enqueue(t, dev, CommKind::Halo, &[], &[null]) {
        Err(CommError::Protocol { .. }) => {}
        other => {
            return Err(format!(
                "a null receive buffer: expected Protocol, got {other:?}"
            ))
        }
    }
    dev.synchronize()?;
    verify(dev, &st, "counted exchange")?;
    let s = t.stats().get(CommKind::Halo);
    let want = KindStats {
        bytes_sent: 1000 + r as u64,
        bytes_recvd: 1000 + left as u64,
        msgs_sent: 2,
        msgs_recvd: 2,
    };
    ensure!(s == want, "halo stats {s:?}, expected {want:?}");
    t.barrier().map_err(ce("barrier"))
}

/// Runs every device case on this rank; collective over all ranks of `t`.
pub fn run_device(t: &dyn Transport, dev: &dyn TestDevice) -> Result<(), String> {
    type Case = (&'static str, fn(&dyn Transport, &dyn TestDevice) -> Check);
    let cases: [Case; 6] = [
        ("device_ring", check_device_ring),
        ("device_zero_length", check_device_zero_length),
        ("device_repeated", check_device_repeated),
        ("device_split", check_device_split),
        ("device_groups", check_device_groups),
        ("device_accounting", check_device_accounting),
    ];
    p2p(t).map_err(|e| format!("rank {}/{}: {e}", t.rank(), t.size()))?;
    for (name, case) in cases {
        case(t, dev).map_err(|e| {
            format!(
                "rank {}/{} on {}: {name}: {e}",
                t.rank(),
                t.size(),
                dev.name()
            )
        })?;
        t.barrier()
            .map_err(|e| format!("rank {}/{}: barrier after {name}: {e}", t.rank(), t.size()))?;
    }
    Ok(())
}
