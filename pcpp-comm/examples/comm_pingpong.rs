//! Ping-pong between rank 0 and rank 1 over any `pcpp_comm` transport: the
//! one-way time and bandwidth of the message sizes PCPP moves per layer
//! (pcpp-algorithm.md §3.3: a few KiB of group-norm statistics, hundreds of
//! KiB of halo rows, MiB of attention K/V). Started like the CLI:
//!
//! ```sh
//! cargo run --release -p pcpp-comm --example comm_pingpong                      # 2 threads, local
//! mpirun -n 2 target/release/examples/comm_pingpong                             # --features mpi
//! for r in 0 1; do PCPP_RANK=$r PCPP_WORLD_SIZE=2 PCPP_UCX_ROOT=127.0.0.1:29500 \
//!   target/release/examples/comm_pingpong & done; wait                          # --features ucx
//! ```
//!
//! Rank 0 prints one line per size: bytes, one-way microseconds, MB/s.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use pcpp_comm::launch::{self, ConnectOptions, LaunchEnv, TransportKind};
use pcpp_comm::{CommError, CommKind, LocalTransport, Transport, TransportOptions};

const SIZES: [usize; 6] = [8, 4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];

fn iterations(size: usize) -> usize {
    (((64usize << 20) / size.max(1024)).clamp(10, 2000) / 2).max(10)
}

fn pingpong(t: &dyn Transport, label: &str) -> Result<(), CommError> {
    let me = t.rank();
    if t.size() < 2 {
        eprintln!("comm_pingpong: needs at least 2 ranks");
        return Ok(());
    }
    if me == 0 {
        println!("{label}: bytes, one-way us, MB/s");
    }
    for (i, &size) in SIZES.iter().enumerate() {
        let tag = i as u32;
        let iters = iterations(size);
        t.barrier()?;
        let mut start = Instant::now();
        for it in 0..iters + 5 {
            if it == 5 {
                start = Instant::now();
            }
            match me {
                0 => {
                    t.exchange(CommKind::Other, tag, vec![(1, vec![1; size])], vec![])?
                        .wait()?;
                    t.exchange(CommKind::Other, tag, vec![], vec![(1, size)])?
                        .wait()?;
                }
                1 => {
                    t.exchange(CommKind::Other, tag, vec![], vec![(0, size)])?
                        .wait()?;
                    t.exchange(CommKind::Other, tag, vec![(0, vec![2; size])], vec![])?
                        .wait()?;
                }
                _ => {}
            }
        }
        let one_way = start.elapsed().as_secs_f64() / (2 * iters) as f64;
        if me == 0 {
            println!(
                "{label}: {size:>9} {:>10.1} {:>10.1}",
                one_way * 1e6,
                size as f64 / one_way / 1e6
            );
        }
    }
    t.barrier()
}

fn main() -> ExitCode {
    let env = match LaunchEnv::from_env() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("comm_pingpong: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kind = launch::resolve(TransportKind::Auto, &env);
    let result = if kind == TransportKind::Local {
        let world = LocalTransport::create(2, TransportOptions::default());
        std::thread::scope(|s| {
            let hs: Vec<_> = world
                .iter()
                .map(|t| {
                    let t: Arc<dyn Transport> = t.clone();
                    s.spawn(move || pingpong(t.as_ref(), "local"))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or(Ok(())))
                .collect::<Result<Vec<()>, CommError>>()
                .map(|_| ())
        })
    } else {
        match launch::connect(kind, &env, &ConnectOptions::default()) {
            Ok(conn) => {
                if conn.rank == 0 {
                    eprintln!("comm_pingpong: {}", conn.description);
                }
                pingpong(conn.transport.as_ref(), kind.name())
            }
            Err(e) => Err(e),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("comm_pingpong: {e}");
            ExitCode::FAILURE
        }
    }
}
