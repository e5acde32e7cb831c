//! Shared helpers of the multi-process transport tests (MPI and UCX back-ends
//! of PCPP's patch-parallel communication, pcpp-algorithm.md §3): launching ranks as child
//! processes that re-enter this test binary, and collecting their output.

#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Environment variable telling a re-entered test binary which scenario to run.
pub const ROLE: &str = "PCPP_TEST_ROLE";

/// Only one multi-process scenario runs at a time (the ranks busy-poll, and
/// CI machines have few cores).
static LAUNCH: Mutex<()> = Mutex::new(());

/// Serialises launches within this test binary.
pub fn launch_lock() -> MutexGuard<'static, ()> {
    LAUNCH.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The command that re-enters this test binary and runs only the ignored
/// rank entry point `entry`.
pub fn self_command(entry: &str) -> Command {
    let exe = std::env::current_exe().expect("test binary path");
    let mut c = Command::new(exe);
    c.args([
        entry,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    c
}

/// Output of one finished rank (or launcher).
#[derive(Debug)]
pub struct Finished {
    /// Exit status (`None`: killed after the hang limit).
    pub code: Option<i32>,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
}

impl Finished {
    /// Whether the process exited with status 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Stdout and stderr together, for assertion messages.
    pub fn all(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }
}

fn finish(out: Output, killed: bool) -> Finished {
    Finished {
        code: if killed { None } else { out.status.code() },
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Spawns every command with piped output and waits for all of them; a
/// process still running after `hang_limit` is killed and reported with
/// `code: None` (a hang is a test failure, never a stuck CI job).
pub fn run_all(cmds: Vec<Command>, hang_limit: Duration) -> Vec<Finished> {
    let mut children: Vec<Child> = cmds
        .into_iter()
        .map(|mut c| {
            c.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawning a rank process")
        })
        .collect();
    let deadline = Instant::now() + hang_limit;
    let mut killed = vec![false; children.len()];
    loop {
        let mut running = false;
        for (i, c) in children.iter_mut().enumerate() {
            if c.try_wait().expect("polling a rank process").is_none() {
                running = true;
                if Instant::now() >= deadline {
                    let _ = c.kill();
                    killed[i] = true;
                }
            }
        }
        if !running {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .zip(killed)
        .map(|(c, k)| finish(c.wait_with_output().expect("collecting rank output"), k))
        .collect()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}
