//! Device exchanges of the MPI and UCX back-ends on a GPU (PCPP §7.4's communication-stream
//! traffic), started by `mpirun` (UCX bootstraps over MPI). Several ranks may share one GPU
//! (rank `r` uses GPU `local_rank % GPUs`).
//!
//! ```sh
//! cargo build --release -p pcpp-comm --features mpi,ucx,cuda --example device_comm
//! # the device-memory conformance cases, path forced or chosen (and checked with --expect):
//! mpirun -n 4 device_comm conformance --transport ucx --device-comm auto --expect cuda-aware
//! # the same on buffers of cuMemAlloc (CUDA-IPC capable) instead of the stream-ordered pool, and
//! # a device exchange timeout of 20 s instead of 120 s:
//! mpirun -n 2 device_comm conformance --transport ucx --device-comm cuda-aware --alloc legacy \
//!     --timeout 20
//! # per-step exchange time of a traffic pattern: BYTES per rank per step in EXCHANGES
//! # exchanges, each a ring to both neighbours (halo-like):
//! mpirun -n 4 device_comm bench --transport mpi --device-comm staged --bytes 52428800 \
//!     --exchanges 120 --steps 20
//! # any of these with the older blocking host function instead of the stream's flag wait:
//! mpirun -n 4 -x PCPP_DEVICE_WAIT=host-fn device_comm conformance --transport mpi
//! ```
//!
//! `--device-comm host` in `bench` times the old host path: per exchange a pageable device-to-host
//! copy, [`Transport::exchange`], its wait and a pageable host-to-device copy, all blocking. Rank
//! 0 prints one line `device_comm ...` (`bench`: median ms per step over the steps after the
//! first); failures abort the job with a non-zero status.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use pcpp_comm::conformance::{run_device, CudaDevice, TestDevice};
use pcpp_comm::launch::{self, ConnectOptions, LaunchEnv, TransportKind};
use pcpp_comm::{CommKind, DeviceComm, DeviceMsg, DeviceStreams, Transport, TransportOptions};

struct Args {
    mode: String,
    transport: TransportKind,
    comm: DeviceComm,
    expect: Option<String>,
    bytes: usize,
    exchanges: usize,
    steps: usize,
    legacy_alloc: bool,
    timeout: Duration,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: device_comm conformance|bench [flags]")?;
    if mode != "conformance" && mode != "bench" {
        return Err(format!("unknown mode {mode:?} (conformance or bench)"));
    }
    let mut a = Args {
        mode,
        transport: TransportKind::Mpi,
        comm: DeviceComm::Auto,
        expect: None,
        bytes: 8 << 20,
        exchanges: 100,
        steps: 20,
        legacy_alloc: false,
        timeout: Duration::from_secs(120),
    };
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--transport" => {
                a.transport = match v.as_str() {
                    "mpi" => TransportKind::Mpi,
                    "ucx" => TransportKind::Ucx,
                    o => return Err(format!("--transport {o}: mpi or ucx")),
                }
            }
            "--device-comm" => a.comm = v.parse().map_err(|e| format!("--device-comm: {e}"))?,
            "--expect" => a.expect = Some(v),
            "--bytes" => a.bytes = num(&v)?,
            "--exchanges" => a.exchanges = num(&v)?.max(1),
            "--steps" => a.steps = num(&v)?.max(2),
            "--alloc" => {
                a.legacy_alloc = match v.as_str() {
                    "pool" => false,
                    "legacy" => true,
                    o => return Err(format!("--alloc {o}: pool or legacy")),
                }
            }
            "--timeout" => a.timeout = Duration::from_secs(num(&v)?.max(1) as u64),
            o => return Err(format!("unknown flag {o}")),
        }
    }
    Ok(a)
}

fn gpu_for(local: usize) -> Result<usize, String> {
    let n = cudarc::driver::CudaContext::device_count().map_err(|e| format!("CUDA: {e}"))?;
    if n <= 0 {
        return Err("no CUDA device".into());
    }
    Ok(local % n as usize)
}

/// One step of the pattern: `exchanges` rings to both neighbours of `bytes / (2 exchanges)`
/// bytes per message, enqueued back to back, then one synchronisation.
fn device_step(
    t: &dyn Transport,
    dev: &CudaDevice,
    bufs: &[(u64, u64, u64, u64)],
    len: usize,
) -> Result<(), String> {
    let (n, r) = (t.size(), t.rank());
    let (left, right) = ((r + n - 1) % n, (r + 1) % n);
    let p = t.device_p2p().ok_or("no device point-to-point")?;
    for &(s0, s1, r0, r1) in bufs {
        let m = |peer, ptr| DeviceMsg { peer, ptr, len };
        // SAFETY: the buffers are allocations of `dev` of `len` bytes, alive for the run; the
        // stream is synchronised before any of them is reused by the host.
        unsafe {
            p.enqueue(
                CommKind::Halo,
                &[m(right, s0), m(left, s1)],
                &[m(left, r0), m(right, r1)],
                dev.stream(),
            )
        }
        .map_err(|e| e.to_string())?;
    }
    dev.synchronize()
}

/// The old host path for the same pattern.
fn host_step(
    t: &dyn Transport,
    dev: &CudaDevice,
    bufs: &[(u64, u64, u64, u64)],
    len: usize,
) -> Result<(), String> {
    let (n, r) = (t.size(), t.rank());
    let (left, right) = ((r + n - 1) % n, (r + 1) % n);
    for (i, &(s0, s1, r0, r1)) in bufs.iter().enumerate() {
        let a = dev.download(s0, len)?;
        let b = dev.download(s1, len)?;
        let got = t
            .exchange(
                CommKind::Halo,
                i as u32 % 1000,
                vec![(right, a), (left, b)],
                vec![(left, len), (right, len)],
            )
            .and_then(|p| p.wait())
            .map_err(|e| e.to_string())?;
        dev.upload(r0, &got[0])?;
        dev.upload(r1, &got[1])?;
    }
    Ok(())
}

fn bench(a: &Args, t: &dyn Transport, dev: &CudaDevice) -> Result<Option<String>, String> {
    let len = (a.bytes / (2 * a.exchanges)).max(1);
    let mut bufs = Vec::with_capacity(a.exchanges);
    for _ in 0..a.exchanges {
        bufs.push((
            dev.alloc(len)?,
            dev.alloc(len)?,
            dev.alloc(len)?,
            dev.alloc(len)?,
        ));
    }
    let host = t.device_p2p().is_none();
    let mut times = Vec::with_capacity(a.steps);
    for _ in 0..a.steps {
        t.barrier().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        if host {
            host_step(t, dev, &bufs, len)?;
        } else {
            device_step(t, dev, &bufs, len)?;
        }
        t.barrier().map_err(|e| e.to_string())?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let mut steady = times[1..].to_vec();
    steady.sort_by(f64::total_cmp);
    let med = steady[steady.len() / 2];
    Ok((t.rank() == 0).then(|| {
        format!(
            "{{\"bytes_per_step\": {}, \"exchanges\": {}, \"message_bytes\": {len}, \"step_ms\": {med:.3}, \"gbps\": {:.3}}}",
            2 * len * a.exchanges,
            a.exchanges,
            (2 * len * a.exchanges) as f64 / (med * 1e-3) / 1e9
        )
    }))
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("device_comm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = ConnectOptions {
        transport: TransportOptions::with_timeout(a.timeout)
            .with_device(a.comm, DeviceStreams::Cuda),
        ..ConnectOptions::default()
    };
    let conn = match LaunchEnv::from_env().and_then(|env| launch::connect(a.transport, &env, &opts))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("device_comm: start-up failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t = conn.transport.clone();
    let fail = |e: String| -> ExitCode {
        launch::abort_job(
            t.as_ref(),
            &format!("device_comm: rank {}: FAILED: {e}", conn.rank),
        )
    };
    let dev = match gpu_for(conn.local_rank).and_then(|g| CudaDevice::with_alloc(g, a.legacy_alloc))
    {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let path = t.device_p2p().map_or("host", |p| p.data_path());
    if let Some(want) = &a.expect {
        if want != path {
            return fail(format!(
                "device exchanges took the {path} path, expected {want}"
            ));
        }
    }
    let what = format!(
        "{} ({}), {} ranks, path {path}, {}",
        a.mode,
        a.transport,
        conn.world_size,
        dev.name()
    );
    let res = if a.mode == "conformance" {
        run_device(t.as_ref(), &dev).map(|()| None)
    } else {
        bench(&a, t.as_ref(), &dev)
    };
    match res {
        Ok(line) => {
            println!(
                "device_comm: rank {}/{}: {what} passed",
                conn.rank, conn.world_size
            );
            if let Some(l) = line {
                println!(
                    "device_comm bench {} {} {path}: {l}",
                    a.transport, conn.world_size
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
