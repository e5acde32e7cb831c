//! Runs the `pcpp_comm::conformance` suite on `MpiTransport` (the multi-process
//! PCPP back-end), plus a timeout check, under `mpirun`:
//!
//! ```sh
//! apt-get install -y libopenmpi-dev openmpi-bin libclang-dev clang
//! cargo build -p pcpp-comm --features mpi --example mpi_conformance
//! for n in 1 2 3 4; do
//!   mpirun --allow-run-as-root --oversubscribe -n $n \
//!     target/debug/examples/mpi_conformance || exit 1
//! done
//! ```
//!
//! Rank 0 prints `mpi_conformance: 1 passed, 0 failed` on success; any failure
//! is printed and aborts the job with a non-zero exit status.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use pcpp_comm::{CommError, CommKind, MpiTransport, Transport, TransportOptions};

fn timeout_check(world: &MpiTransport) -> Result<(), String> {
    let short = world.with_options(TransportOptions::with_timeout(Duration::from_millis(300)));
    if short.rank() == 0 {
        let peer = 1 % short.size();
        let start = Instant::now();
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
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("timeout took {:?}", start.elapsed()));
        }
    }
    world.barrier().map_err(|e| format!("barrier: {e}"))
}

fn main() -> ExitCode {
    let opts = TransportOptions::with_timeout(Duration::from_secs(60));
    let (world, ctx) = match MpiTransport::init_typed(opts) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("mpi_conformance: init failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("mpi_conformance: {ctx:?}");
    let result = pcpp_comm::conformance::run_all(world.as_ref()).and_then(|()| {
        timeout_check(&world).map_err(|e| format!("rank {}: timeout: {e}", ctx.rank))
    });
    match result {
        Ok(()) => {
            if ctx.rank == 0 {
                println!(
                    "mpi_conformance (n = {}): stats {}",
                    ctx.size,
                    world.stats().to_json()
                );
                println!("mpi_conformance: 1 passed, 0 failed");
            }
            drop(world);
            drop(ctx);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mpi_conformance: FAILED: {e}");
            println!("mpi_conformance: 0 passed, 1 failed");
            world.abort(&e);
            ExitCode::FAILURE
        }
    }
}
