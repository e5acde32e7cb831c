//! Runs the [`pcpp_comm::conformance`] suite (the communication contract of
//! pcpp-algorithm.md §3) on [`MpiTransport`] under
//! `mpirun -n 2, 3, 4` (with `--oversubscribe`, and `--allow-run-as-root` for
//! Open MPI), plus start-up through [`launch::connect`], the same-arguments
//! check, and the failure paths: `MPI_Abort` from [`launch::abort_job`] and
//! from a panic ends the whole job with a non-zero status and a
//! `rank R: <message>` line instead of a hang. With the `ucx` feature too, UCX
//! is also started under `mpirun` with worker addresses exchanged over MPI.
//!
//! Each test launches `mpirun` on this binary, which re-enters the ignored
//! test `mpi_rank` with the scenario in `PCPP_TEST_ROLE`. Without `mpirun` on
//! the `PATH` the tests print why and pass without running.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{launch_lock, run_all, self_command, Finished, ROLE};
use pcpp_comm::launch::{self, ConnectOptions, LaunchEnv, TransportKind};
use pcpp_comm::{CommError, CommKind, MpiTransport, Transport, TransportOptions};

const HANG_LIMIT: Duration = Duration::from_secs(240);

/// `mpirun` (or `$PCPP_TEST_MPIRUN`, e.g. `mpirun.mpich` for a build against
/// MPICH) with the flags this MPI needs to run `n` ranks on a small machine,
/// or `None` (after saying why) when there is no such launcher.
fn mpirun(n: usize) -> Option<Command> {
    let launcher = std::env::var("PCPP_TEST_MPIRUN").unwrap_or_else(|_| "mpirun".into());
    let version = match Command::new(&launcher).arg("--version").output() {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            eprintln!(
                "SKIPPED: {launcher} not found ({e}); install openmpi-bin or mpich to run the MPI tests"
            );
            return None;
        }
    };
    let mut c = Command::new(&launcher);
    if version.contains("Open MPI") || version.contains("OpenRTE") {
        c.args(["--allow-run-as-root", "--oversubscribe"]);
    }
    c.args(["-n", &n.to_string()]);
    Some(c)
}

fn launch_job(n: usize, role: &str) -> Option<Finished> {
    launch_job_with(n, role, None)
}

/// [`launch_job`] with `PCPP_DEVICE_WAIT=wait` (`None`: unset).
fn launch_job_with(n: usize, role: &str, wait: Option<&str>) -> Option<Finished> {
    let mut c = mpirun(n)?;
    let entry = self_command("mpi_rank");
    c.arg(entry.get_program()).args(entry.get_args());
    c.env(ROLE, role)
        .env_remove("PCPP_RANK")
        .env_remove("PCPP_WORLD_SIZE")
        .env_remove("PCPP_UCX_ROOT")
        // MPICH's ch4:ucx device hangs intermittently when UCX is limited to
        // tcp (it loses shared memory): leave UCX's transport choice alone.
        .env_remove("UCX_TLS")
        .env("UCX_LOG_LEVEL", "error");
    match wait {
        Some(w) => c.env("PCPP_DEVICE_WAIT", w),
        None => c.env_remove("PCPP_DEVICE_WAIT"),
    };
    let _g = launch_lock();
    run_all(vec![c], HANG_LIMIT).pop()
}

fn assert_job_passed(n: usize, role: &str) {
    let Some(out) = launch_job(n, role) else {
        return;
    };
    assert!(out.ok(), "mpirun -n {n} ({role}) failed:\n{}", out.all());
    for r in 0..n {
        let marker = format!("rank {r}/{n}: {role} passed");
        assert!(
            out.stdout.contains(&marker),
            "no {marker:?}:\n{}",
            out.all()
        );
    }
}

#[test]
fn conformance_n2() {
    assert_job_passed(2, "conformance");
}

#[test]
fn conformance_n3() {
    assert_job_passed(3, "conformance");
}

#[test]
fn conformance_n4() {
    assert_job_passed(4, "conformance");
}

/// The device-memory cases on the CPU twin of the device streams, with the path forced (or
/// chosen), and rank 0's start-up line naming it.
fn assert_device_job(n: usize, role: &str, path: &str) {
    assert_device_job_waiting(n, role, path, None);
}

/// [`assert_device_job`] with the streams waiting as `PCPP_DEVICE_WAIT=wait` says (`None`:
/// unset, the default `stream`), which the start-up line names too.
fn assert_device_job_waiting(n: usize, role: &str, path: &str, wait: Option<&str>) {
    let Some(out) = launch_job_with(n, role, wait) else {
        return;
    };
    assert!(out.ok(), "mpirun -n {n} ({role}) failed:\n{}", out.all());
    for r in 0..n {
        let marker = format!("rank {r}/{n}: {role} passed");
        assert!(
            out.stdout.contains(&marker),
            "no {marker:?}:\n{}",
            out.all()
        );
    }
    let line = format!("pcpp-comm: mpi device exchanges: {path}");
    let printed = out.stderr.lines().find(|l| l.contains(&line));
    let Some(printed) = printed else {
        panic!("no {line:?}:\n{}", out.all());
    };
    let mode = format!("PCPP_DEVICE_WAIT={}", wait.unwrap_or("stream"));
    assert!(printed.contains(&mode), "{printed:?} does not name {mode}");
}

#[test]
fn device_staged_n2() {
    assert_device_job(2, "device-staged", "staged");
}

#[test]
fn device_staged_n4() {
    assert_device_job(4, "device-staged", "staged");
}

#[test]
fn device_cuda_aware_n2() {
    assert_device_job(2, "device-cuda-aware", "cuda-aware");
}

/// The older wait, a host function that blocks until its exchange completes.
#[test]
fn device_staged_n2_host_fn_wait() {
    assert_device_job_waiting(2, "device-staged", "staged", Some("host-fn"));
}

#[test]
fn device_cuda_aware_n2_host_fn_wait() {
    assert_device_job_waiting(2, "device-cuda-aware", "cuda-aware", Some("host-fn"));
}

#[test]
fn device_cuda_aware_n4() {
    assert_device_job(4, "device-cuda-aware", "cuda-aware");
}

#[test]
fn device_auto_follows_the_mpi_cuda_query_n3() {
    // The rank checks the path against `mpi_cuda_support`; the line names either path.
    assert_device_job(3, "device-auto", "");
}

#[test]
fn connect_and_same_arguments_check() {
    assert_job_passed(3, "launch");
}

/// UCX under `mpirun` with 4 ranks, the shape of the GPU runs (`device_groups` then splits
/// them into two groups of 2).
#[cfg(feature = "ucx")]
#[test]
fn ucx_bootstrapped_over_mpi() {
    assert_job_passed(4, "ucx");
}

fn assert_job_aborted(role: &str) {
    let Some(out) = launch_job(3, role) else {
        return;
    };
    assert!(
        out.code.is_some(),
        "the job hung and was killed:\n{}",
        out.all()
    );
    assert!(!out.ok(), "the job should fail:\n{}", out.all());
    assert!(
        out.stderr.contains("rank 1: "),
        "no rank-prefixed message:\n{}",
        out.all()
    );
    assert!(
        out.stderr.contains("failed on purpose"),
        "the reason is missing:\n{}",
        out.all()
    );
    assert!(
        !out.stdout.contains(&format!("{role} passed")),
        "a rank got past the failure:\n{}",
        out.all()
    );
}

#[test]
fn abort_job_ends_every_rank() {
    assert_job_aborted("abort");
}

#[test]
fn panic_ends_every_rank() {
    assert_job_aborted("panic");
}

#[test]
fn rank_killed_by_a_signal_ends_the_job() {
    let Some(out) = launch_job(3, "killed") else {
        return;
    };
    assert!(
        out.code.is_some(),
        "the job hung and was killed:\n{}",
        out.all()
    );
    assert!(!out.ok(), "the job should fail:\n{}", out.all());
    assert!(
        !out.stdout.contains("killed passed"),
        "a rank got past the failure:\n{}",
        out.all()
    );
}

/// A receive nobody sends to fails with a timeout naming the peer, and the
/// world keeps working.
fn timeout_check(world: &MpiTransport) -> Result<(), String> {
    let short = world.with_options(TransportOptions::with_timeout(Duration::from_millis(300)));
    if short.rank() == 0 {
        let peer = 1 % short.size();
        let res = short
            .exchange(CommKind::Control, 99, Vec::new(), vec![(peer, 4)])
            .map_err(|e| format!("post: {e}"))?
            .wait();
        match res {
            Err(CommError::Timeout {
                peer: p, tag: 99, ..
            }) if p == peer => {}
            other => return Err(format!("expected a timeout, got {other:?}")),
        }
    }
    world.barrier().map_err(|e| format!("barrier: {e}"))
}

fn wait_forever_on(t: &dyn Transport, peer: usize) -> Result<Vec<Vec<u8>>, CommError> {
    t.exchange(CommKind::Halo, 7, vec![], vec![(peer, 8)])?
        .wait()
}

/// Rank entry point: runs the scenario named by `PCPP_TEST_ROLE`.
#[test]
#[ignore = "rank entry point, launched under mpirun by the other tests"]
fn mpi_rank() {
    let role = std::env::var(ROLE).expect("PCPP_TEST_ROLE is set by the launching test");
    let env = LaunchEnv::from_env().unwrap();
    assert!(env.under_mpi, "not started by an MPI launcher: {env:?}");
    let (rank, n) = match role.as_str() {
        "conformance" => {
            let opts = TransportOptions::with_timeout(Duration::from_secs(120));
            let (world, ctx) = MpiTransport::init_typed(opts).unwrap();
            assert_eq!(Some(ctx.rank), env.rank);
            assert_eq!(Some(ctx.size), env.world_size);
            // The launcher's local rank agrees with the communicator's.
            if let Some(l) = env.local_rank {
                assert_eq!(l, ctx.local_rank);
            }
            let res = pcpp_comm::conformance::run_all(world.as_ref())
                .and_then(|()| timeout_check(&world));
            if let Err(e) = res {
                launch::abort_job(world.as_ref(), &e);
            }
            (ctx.rank, ctx.size)
        }
        "launch" => {
            let opts = ConnectOptions {
                transport: TransportOptions::with_timeout(Duration::from_secs(120)),
                ..ConnectOptions::default()
            };
            let conn = launch::connect(TransportKind::Auto, &env, &opts).unwrap();
            assert_eq!(conn.kind, TransportKind::Mpi);
            assert!(
                conn.description.starts_with("mpi ("),
                "{}",
                conn.description
            );
            let t = conn.transport.clone();
            let same = launch::fingerprint(&[b"model", b"--steps 20"]);
            launch::check_same_everywhere(t.as_ref(), &same).unwrap();
            let args: &[u8] = if conn.rank == 1 {
                b"--steps 30"
            } else {
                b"--steps 20"
            };
            match launch::check_same_everywhere(t.as_ref(), &launch::fingerprint(&[b"model", args]))
            {
                Err(CommError::Mismatch { ranks, .. }) => assert_eq!(ranks, vec![1]),
                other => panic!("expected a mismatch, got {other:?}"),
            }
            (conn.rank, conn.world_size)
        }
        "ucx" => ucx_role(&env),
        "device-staged" | "device-cuda-aware" | "device-auto" => device_role(&role),
        "abort" | "panic" | "killed" => {
            let conn =
                launch::connect(TransportKind::Mpi, &env, &ConnectOptions::default()).unwrap();
            let t = conn.transport.clone();
            launch::abort_on_panic(t.clone());
            t.barrier().unwrap();
            if conn.rank == 1 {
                if role == "killed" {
                    // SIGABRT, without MPI_Abort: only the launcher can notice.
                    std::process::abort();
                }
                if role == "abort" {
                    launch::abort_job(t.as_ref(), "rank 1 failed on purpose");
                }
                panic!("rank 1 failed on purpose");
            }
            let started = Instant::now();
            let res = wait_forever_on(t.as_ref(), 1);
            panic!(
                "rank {} returned from the wait after {:?}: {res:?}",
                conn.rank,
                started.elapsed()
            );
        }
        other => panic!("unknown role {other}"),
    };
    println!("rank {rank}/{n}: {role} passed");
}

/// The device cases on host streams with the path of `role`, plus the host suite afterwards (the
/// device traffic must leave the host traffic untouched).
fn device_role(role: &str) -> (usize, usize) {
    use pcpp_comm::{DeviceComm, DevicePath, DeviceStreams};
    let forced = match role {
        "device-staged" => DeviceComm::Staged,
        "device-cuda-aware" => DeviceComm::CudaAware,
        _ => DeviceComm::Auto,
    };
    let opts = TransportOptions::with_timeout(Duration::from_secs(120))
        .with_device(forced, DeviceStreams::Host);
    let (world, ctx) = MpiTransport::init_typed(opts).unwrap();
    let want = match forced {
        DeviceComm::Staged => DevicePath::Staged,
        DeviceComm::CudaAware => DevicePath::CudaAware,
        _ if pcpp_comm::mpi_cuda_support().0 => DevicePath::CudaAware,
        _ => DevicePath::Staged,
    };
    assert_eq!(world.device_path(), Some(want));
    let dev = pcpp_comm::conformance::HostDevice::new();
    let res = pcpp_comm::conformance::run_device(world.as_ref(), &dev)
        .and_then(|()| pcpp_comm::conformance::run_all(world.as_ref()));
    if let Err(e) = res {
        launch::abort_job(world.as_ref(), &e);
    }
    (ctx.rank, ctx.size)
}

/// UCX started under `mpirun` as `generate` starts it, with UCX's own transport choice: the host
/// suite, and the device cases on host streams over the staged path.
#[cfg(feature = "ucx")]
fn ucx_role(env: &LaunchEnv) -> (usize, usize) {
    use pcpp_comm::{DeviceComm, DeviceStreams};
    let opts = ConnectOptions {
        transport: TransportOptions::with_timeout(Duration::from_secs(120))
            .with_device(DeviceComm::Staged, DeviceStreams::Host),
        ..ConnectOptions::default()
    };
    let conn = launch::connect(TransportKind::Ucx, env, &opts).unwrap();
    assert!(
        conn.description.contains("bootstrap: mpi"),
        "{}",
        conn.description
    );
    assert!(conn.mpi_context().is_some());
    let t = conn.transport.as_ref();
    pcpp_comm::conformance::run_all(t).unwrap();
    let dev = pcpp_comm::conformance::HostDevice::new();
    pcpp_comm::conformance::run_device(t, &dev).unwrap();
    (conn.rank, conn.world_size)
}

#[cfg(not(feature = "ucx"))]
fn ucx_role(_: &LaunchEnv) -> (usize, usize) {
    panic!("role ucx needs the ucx feature");
}
