//! Runs the `pcpp_comm::conformance` suite on `UcxTransport` (the PCPP
//! back-end for clusters without NCCL or MPI) across real processes or
//! nodes, started the way `pcpp-cli --transport ucx` starts:
//!
//! ```sh
//! cargo build --release -p pcpp-comm --features ucx --example ucx_conformance
//! # without MPI: rank 0 listens on PCPP_UCX_ROOT
//! export PCPP_UCX_ROOT=$(hostname):29500
//! srun -n 4 target/release/examples/ucx_conformance          # Slurm sets the ranks
//! # or by hand on one machine:
//! for r in 0 1 2 3; do
//!   PCPP_RANK=$r PCPP_WORLD_SIZE=4 target/release/examples/ucx_conformance &
//! done; wait
//! ```
//!
//! Under `mpirun` (with the `mpi` feature too) the worker addresses are
//! exchanged over MPI instead. Every rank prints its result; the exit status
//! is non-zero on failure, and a failing rank aborts the others.

use std::process::ExitCode;
use std::time::Duration;

use pcpp_comm::launch::{self, ConnectOptions, LaunchEnv, TransportKind};
use pcpp_comm::TransportOptions;

fn main() -> ExitCode {
    let opts = ConnectOptions {
        transport: TransportOptions::with_timeout(Duration::from_secs(60)),
        ..ConnectOptions::default()
    };
    let conn = match LaunchEnv::from_env()
        .and_then(|env| launch::connect(TransportKind::Ucx, &env, &opts))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ucx_conformance: start-up failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("ucx_conformance: {}", conn.description);
    let t = conn.transport.clone();
    match pcpp_comm::conformance::run_all(t.as_ref()) {
        Ok(()) => {
            println!(
                "ucx_conformance: rank {}/{} passed; stats {}",
                conn.rank,
                conn.world_size,
                t.stats().to_json()
            );
            ExitCode::SUCCESS
        }
        Err(e) => launch::abort_job(t.as_ref(), &format!("ucx_conformance: FAILED: {e}")),
    }
}
