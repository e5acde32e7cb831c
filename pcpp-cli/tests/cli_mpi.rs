//! `mpirun -n N pcpp-cli generate --transport mpi` (feature `mpi`): the same latents as
//! `--transport local --ranks N`; ranks started with different arguments refuse to start; an error
//! on the ranks ends the job with exit status ≠ 0 and `rank R:` messages, without hanging.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{latents, tmp};

fn gen_args(tag: &str, extra: &[&str]) -> (Vec<String>, std::path::PathBuf) {
    let mut e = vec!["--warmup-steps", "2"];
    e.extend_from_slice(extra);
    common::gen_args(tag, 5, &e)
}

fn mpirun_available() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn mpirun(np: &[(usize, Vec<String>)]) -> Output {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--allow-run-as-root"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    for (i, (n, args)) in np.iter().enumerate() {
        if i > 0 {
            c.arg(":");
        }
        c.arg("-n")
            .arg(n.to_string())
            .arg(env!("CARGO_BIN_EXE_pcpp-cli"))
            .args(args);
    }
    c.output().unwrap()
}

#[test]
fn mpi_generate_equals_local() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun not found");
        return;
    }
    for n in [2usize, 4] {
        let (args, lat) = gen_args(&format!("mpi{n}"), &["--transport", "mpi"]);
        let o = mpirun(&[(n, args)]);
        assert!(
            o.status.success(),
            "mpirun -n {n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (largs, llat) = gen_args(&format!("mpi-local{n}"), &["--ranks", &n.to_string()]);
        let o = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
            .args(&largs)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (a, b) = (latents(&lat), latents(&llat));
        assert_eq!(
            a.max_abs_diff(&b).unwrap(),
            0.0,
            "{n} ranks: mpi and local differ"
        );
    }
}

#[test]
fn mpi_ranks_with_different_arguments_refuse_to_start() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun not found");
        return;
    }
    let (a, _) = gen_args("mismatch", &["--transport", "mpi"]);
    let (mut b, _) = gen_args("mismatch", &["--transport", "mpi"]);
    b[2] = "a different prompt".into();
    let t0 = Instant::now();
    let o = mpirun(&[(1, a), (1, b)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("different models, configurations or arguments"),
        "{err}"
    );
    assert!(!tmp("mismatch.png").exists());
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn mpi_error_on_ranks_ends_the_job() {
    if !mpirun_available() {
        eprintln!("skipped: mpirun not found");
        return;
    }
    // A --ranks that disagrees with the launcher: every rank fails after connecting.
    let (args, _) = gen_args("toomany", &["--transport", "mpi", "--ranks", "5"]);
    let o = mpirun(&[(3, args)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("rank ") && err.contains("--ranks 5"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
