//! Runs the [`pcpp_comm::conformance`] suite (the communication contract of
//! pcpp-algorithm.md §3) on [`pcpp_comm::UcxTransport`]
//! with 1 to 4 ranks as child processes over loopback (`UCX_TLS=tcp,self`,
//! and shared memory), started through the TCP rendezvous
//! (`PCPP_UCX_ROOT`, `PCPP_RANK`, `PCPP_WORLD_SIZE`) exactly as on a cluster
//! without MPI; plus the failure paths PCPP relies on to never hang: abort,
//! a dead peer, and ranks started with different arguments.
//!
//! Each test re-enters this binary once per rank, running the ignored test
//! `ucx_rank` with the scenario in `PCPP_TEST_ROLE`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{free_port, launch_lock, run_all, self_command, Finished, ROLE};
use pcpp_comm::launch::{self, ConnectOptions, LaunchEnv, TransportKind};
use pcpp_comm::{CommError, CommKind, DeviceComm, DeviceStreams, TransportOptions};

const HANG_LIMIT: Duration = Duration::from_secs(240);

fn rank_commands(n: usize, role: &str, tls: &str) -> Vec<Command> {
    let root = format!("127.0.0.1:{}", free_port());
    (0..n)
        .map(|r| {
            let mut c = self_command("ucx_rank");
            // An empty `tls` leaves UCX_TLS unset: UCX's default, or pcpp-comm's choice.
            if tls.is_empty() {
                c.env_remove("UCX_TLS");
            } else {
                c.env("UCX_TLS", tls);
            }
            c.env(ROLE, role)
                .env("PCPP_RANK", r.to_string())
                .env("PCPP_WORLD_SIZE", n.to_string())
                .env_remove("PCPP_LOCAL_RANK")
                .env_remove("SLURM_LOCALID")
                .env("PCPP_UCX_ROOT", &root)
                .env("UCX_LOG_LEVEL", "error")
                .env_remove("PCPP_DEVICE_WAIT")
                .env_remove("SLURM_PROCID")
                .env_remove("OMPI_COMM_WORLD_SIZE")
                .env_remove("PMI_SIZE")
                .env_remove("PMIX_RANK");
            c
        })
        .collect()
}

fn launch_ranks(n: usize, role: &str, tls: &str) -> Vec<Finished> {
    let _g = launch_lock();
    run_all(rank_commands(n, role, tls), HANG_LIMIT)
}

fn assert_all_passed(n: usize, role: &str, tls: &str) {
    let out = launch_ranks(n, role, tls);
    for (r, f) in out.iter().enumerate() {
        assert!(
            f.ok(),
            "rank {r} of {n} ({role}, UCX_TLS={tls}) failed:\n{}",
            f.all()
        );
        let marker = format!("rank {r}/{n}: {role} passed");
        assert!(
            f.stdout.contains(&marker),
            "rank {r}: no {marker:?}:\n{}",
            f.all()
        );
    }
}

#[test]
fn conformance_n1_tcp() {
    assert_all_passed(1, "conformance", "tcp,self");
}

#[test]
fn conformance_n2_tcp() {
    assert_all_passed(2, "conformance", "tcp,self");
}

#[test]
fn conformance_n3_tcp() {
    assert_all_passed(3, "conformance", "tcp,self");
}

#[test]
fn conformance_n4_tcp() {
    assert_all_passed(4, "conformance", "tcp,self");
}

#[test]
fn conformance_n2_shared_memory() {
    assert_all_passed(2, "conformance", "sm,self");
}

/// The device-memory cases on the CPU twin of the device streams with the path forced, the
/// streams waiting as `PCPP_DEVICE_WAIT=wait` says (`None`: unset, the default `stream`); rank 0
/// names both at start-up.
fn assert_device_ranks(n: usize, role: &str, path: &str, wait: Option<&str>) {
    let mut cmds = rank_commands(n, role, "tcp,self");
    if let Some(w) = wait {
        for c in &mut cmds {
            c.env("PCPP_DEVICE_WAIT", w);
        }
    }
    let out = {
        let _g = launch_lock();
        run_all(cmds, HANG_LIMIT)
    };
    for (r, f) in out.iter().enumerate() {
        assert!(f.ok(), "rank {r} of {n} ({role}) failed:\n{}", f.all());
        let marker = format!("rank {r}/{n}: {role} passed");
        assert!(
            f.stdout.contains(&marker),
            "rank {r}: no {marker:?}:\n{}",
            f.all()
        );
    }
    let line = format!("pcpp-comm: ucx device exchanges: {path}");
    let printed = out[0].stderr.lines().find(|l| l.contains(&line));
    assert_eq!(
        printed.is_some(),
        path != "host",
        "start-up line {line:?} (printed for every path but host):\n{}",
        out[0].all()
    );
    if let Some(l) = printed {
        let mode = format!("PCPP_DEVICE_WAIT={}", wait.unwrap_or("stream"));
        assert!(l.contains(&mode), "{l:?} does not name {mode}");
    }
}

#[test]
fn device_staged_n2() {
    assert_device_ranks(2, "device-staged", "staged", None);
}

#[test]
fn device_staged_n4() {
    assert_device_ranks(4, "device-staged", "staged", None);
}

#[test]
fn device_cuda_aware_n2() {
    assert_device_ranks(2, "device-cuda-aware", "cuda-aware", None);
}

#[test]
fn device_cuda_aware_n4() {
    assert_device_ranks(4, "device-cuda-aware", "cuda-aware", None);
}

/// The older wait, a host function that blocks until its exchange completes.
#[test]
fn device_staged_n2_host_fn_wait() {
    assert_device_ranks(2, "device-staged", "staged", Some("host-fn"));
}

#[test]
fn device_cuda_aware_n2_host_fn_wait() {
    assert_device_ranks(2, "device-cuda-aware", "cuda-aware", Some("host-fn"));
}

/// A bad `PCPP_DEVICE_WAIT` is named on the start-up line and by every device exchange.
#[test]
fn device_bad_wait_mode_is_named() {
    assert_device_ranks(1, "device-bad-wait", "staged", Some("bogus"));
}

/// Without UCX_TLS, the staged path's context leaves UCX's CUDA transports out (a transport list
/// UCX must accept whether or not it was built with CUDA) and says so.
#[test]
fn device_staged_without_ucx_tls_leaves_cuda_transports_out() {
    let out = launch_ranks(2, "device-staged", "");
    for (r, f) in out.iter().enumerate() {
        assert!(f.ok(), "rank {r} of 2 failed:\n{}", f.all());
        assert!(
            f.stdout
                .contains(&format!("rank {r}/2: device-staged passed")),
            "rank {r}:\n{}",
            f.all()
        );
    }
    assert!(
        out[0]
            .stderr
            .contains("ucx device exchanges: staged (UCX's CUDA transports left out"),
        "{}",
        out[0].all()
    );
}

#[test]
fn device_host_path_offers_no_device_p2p() {
    assert_device_ranks(2, "device-host", "host", None);
}

#[test]
fn same_arguments_check_names_the_odd_rank() {
    assert_all_passed(3, "mismatch", "tcp,self");
}

#[test]
fn abort_reaches_every_rank() {
    assert_all_passed(3, "abort", "tcp,self");
}

#[test]
fn dead_peer_fails_the_wait_naming_it() {
    let out = launch_ranks(2, "die", "tcp,self");
    assert_eq!(
        out[1].code,
        Some(3),
        "rank 1 should exit with 3:\n{}",
        out[1].all()
    );
    assert!(out[0].ok(), "rank 0 failed:\n{}", out[0].all());
    assert!(
        out[0].stdout.contains("rank 0/2: die passed"),
        "{}",
        out[0].all()
    );
}

#[test]
fn missing_rank_fails_the_rendezvous() {
    // Rank 1 of 3 never starts: ranks 0 and 2 must fail (not hang) and say so.
    let _g = launch_lock();
    let mut cmds = rank_commands(3, "rendezvous_timeout", "tcp,self");
    cmds.remove(1);
    let out = run_all(cmds, HANG_LIMIT);
    assert!(out[0].ok(), "{}", out[0].all());
    assert!(out[0].stdout.contains("ranks [1]"), "{}", out[0].all());
    assert!(out[1].ok(), "{}", out[1].all());
}

fn options(timeout: Duration) -> ConnectOptions {
    ConnectOptions {
        transport: TransportOptions::with_timeout(timeout),
        rendezvous_timeout: Duration::from_secs(60),
    }
}

/// Rank entry point: runs the scenario named by `PCPP_TEST_ROLE`.
#[test]
#[ignore = "rank entry point, launched as a child process by the other tests"]
fn ucx_rank() {
    let role = std::env::var(ROLE).expect("PCPP_TEST_ROLE is set by the launching test");
    let env = LaunchEnv::from_env().unwrap();
    let (rank, n) = env.rank_and_size().unwrap();
    if role == "rendezvous_timeout" {
        let opts = ConnectOptions {
            rendezvous_timeout: Duration::from_secs(3),
            ..options(Duration::from_secs(60))
        };
        let err = launch::connect(TransportKind::Ucx, &env, &opts).unwrap_err();
        println!("rank {rank}: {err}");
        assert!(matches!(err, CommError::Setup { .. }), "{err:?}");
        println!("rank {rank}/{n}: {role} passed");
        return;
    }
    // Short enough that a dead peer the back-end failed to detect still ends
    // the "die" scenario, long enough for 4 busy-polling ranks on 2 cores.
    let timeout = if role == "die" { 20 } else { 120 };
    let mut opts = options(Duration::from_secs(timeout));
    let forced = match role.as_str() {
        "device-staged" | "device-bad-wait" => Some(DeviceComm::Staged),
        "device-cuda-aware" => Some(DeviceComm::CudaAware),
        "device-host" => Some(DeviceComm::Host),
        _ => None,
    };
    if let Some(f) = forced {
        opts.transport = opts.transport.with_device(f, DeviceStreams::Host);
    }
    let conn = launch::connect(TransportKind::Auto, &env, &opts).unwrap();
    assert_eq!(conn.kind, TransportKind::Ucx);
    // No launcher variable gives the local rank: it is derived from the host
    // names, and every rank runs on this host.
    assert_eq!(
        (conn.rank, conn.world_size, conn.local_rank),
        (rank, n, rank)
    );
    assert!(
        conn.description.starts_with("ucx 1."),
        "{}",
        conn.description
    );
    let t = conn.transport.clone();
    match role.as_str() {
        "conformance" => {
            if let Err(e) = pcpp_comm::conformance::run_all(t.as_ref()) {
                t.abort(&e);
                panic!("{e}");
            }
        }
        "device-staged" | "device-cuda-aware" => {
            let want = if role == "device-staged" {
                "staged"
            } else {
                "cuda-aware"
            };
            let p = t.device_p2p().expect("device point-to-point");
            assert_eq!(p.data_path(), want);
            assert!(
                conn.description
                    .ends_with(&format!("device exchanges {want}")),
                "{}",
                conn.description
            );
            let dev = pcpp_comm::conformance::HostDevice::new();
            let res = pcpp_comm::conformance::run_device(t.as_ref(), &dev)
                .and_then(|()| pcpp_comm::conformance::run_all(t.as_ref()));
            if let Err(e) = res {
                t.abort(&e);
                panic!("{e}");
            }
        }
        "device-bad-wait" => {
            let p = t.device_p2p().expect("device point-to-point");
            let stream = pcpp_comm::device::host::HostStream::new();
            let mut buf = [0u8; 8];
            let m = pcpp_comm::DeviceMsg {
                peer: 0,
                ptr: buf.as_mut_ptr() as u64,
                len: buf.len(),
            };
            // SAFETY: refused before anything is enqueued.
            let err = unsafe { p.enqueue(CommKind::Halo, &[m], &[m], stream.raw()) }.unwrap_err();
            assert!(
                err.to_string().contains("PCPP_DEVICE_WAIT=bogus: unknown"),
                "{err}"
            );
        }
        "device-host" => {
            assert!(t.device_p2p().is_none());
            assert!(
                conn.description.ends_with("device exchanges host"),
                "{}",
                conn.description
            );
            assert!(
                conn.description.ends_with("device exchanges host"),
                "{}",
                conn.description
            );
            pcpp_comm::conformance::run_all(t.as_ref()).unwrap();
        }
        "mismatch" => {
            let same = launch::fingerprint(&[b"model", b"--steps 20"]);
            launch::check_same_everywhere(t.as_ref(), &same).unwrap();
            let args: &[u8] = if rank == 2 {
                b"--steps 30"
            } else {
                b"--steps 20"
            };
            let err =
                launch::check_same_everywhere(t.as_ref(), &launch::fingerprint(&[b"model", args]))
                    .unwrap_err();
            match &err {
                CommError::Mismatch { ranks, .. } => assert_eq!(ranks, &vec![2]),
                other => panic!("expected a mismatch, got {other:?}"),
            }
        }
        "abort" => {
            // No barrier first: rank 1 may abort while the others are still
            // in it, which is correct behaviour but not what is checked here.
            if rank == 1 {
                t.abort("rank 1 failed on purpose");
            } else {
                // Wait for a message nobody sends: only the abort can end it
                // (already at posting, when the notice arrived before).
                let err = t
                    .exchange(CommKind::Halo, 5, vec![], vec![(1, 16)])
                    .and_then(|p| p.wait())
                    .unwrap_err();
                match err {
                    CommError::Aborted {
                        by_rank, reason, ..
                    } => {
                        assert_eq!(by_rank, 1);
                        assert_eq!(reason, "rank 1 failed on purpose");
                    }
                    other => panic!("expected an abort, got {other:?}"),
                }
                assert!(matches!(t.barrier(), Err(CommError::Aborted { .. })));
            }
        }
        "die" => {
            t.barrier().unwrap();
            if rank == 1 {
                std::process::exit(3);
            }
            let err = t
                .exchange(CommKind::Halo, 6, vec![], vec![(1, 16)])
                .and_then(|p| p.wait())
                .unwrap_err();
            println!("rank 0 saw: {err}");
            assert_eq!(err.peer(), 1, "{err:?}");
            match err {
                CommError::Backend { .. } | CommError::Timeout { .. } => {}
                other => panic!("unexpected error {other:?}"),
            }
        }
        other => panic!("unknown role {other}"),
    }
    println!("rank {rank}/{n}: {role} passed");
}
