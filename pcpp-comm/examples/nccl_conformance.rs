//! Runs the `pcpp_comm::conformance` checks on `NcclTransport` (one GPU per rank, PCPP §7.4's
//! traffic over NCCL), started by `mpirun` (unique id over MPI) or by hand with
//! `PCPP_RANK`/`PCPP_WORLD_SIZE`/`PCPP_LOCAL_RANK`/`PCPP_UCX_ROOT` (TCP rendezvous):
//!
//! ```sh
//! cargo build --release -p pcpp-comm --features nccl,mpi --example nccl_conformance
//! mpirun --allow-run-as-root -n 2 target/release/examples/nccl_conformance
//! ```
//!
//! NCCL has no tags and cannot see a length mismatch, so `wrong_length` (and any check that
//! relies on tags to reorder messages) is reported but not required. Rank 0 prints one line per
//! check; the exit status is non-zero if a required check fails.

use std::process::ExitCode;
use std::time::Duration;

use pcpp_comm::conformance as c;
use pcpp_comm::launch::{self, ConnectOptions, LaunchEnv};
use pcpp_comm::{Transport, TransportKind, TransportOptions};

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
    let required: [(&str, CheckFn); 9] = [
        ("rank_size", c::check_rank_size),
        ("ring_exchange", c::check_ring_exchange),
        ("zero_length", c::check_zero_length),
        ("large_messages", c::check_large_messages),
        ("all_gather", c::check_all_gather),
        ("all_reduce", c::check_all_reduce),
        ("broadcast", c::check_broadcast),
        ("barrier", c::check_barrier),
        ("split", c::check_split),
    ];
    let optional: [(&str, CheckFn); 1] = [("byte_accounting", c::check_byte_accounting)];
    let mut failed = 0;
    for (name, check) in required {
        let r = check(t.as_ref());
        if conn.rank == 0 || r.is_err() {
            println!("rank {} {name}: {:?}", conn.rank, r);
        }
        failed += usize::from(r.is_err());
    }
    for (name, check) in optional {
        let r = check(t.as_ref());
        if conn.rank == 0 {
            println!("rank {} {name} (not required): {:?}", conn.rank, r);
        }
    }
    if conn.rank == 0 {
        println!(
            "nccl_conformance (n = {}): {failed} required checks failed on rank 0",
            conn.world_size
        );
    }
    drop(t);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
