//! `pcpp-cli decode-bench` end to end: each rank's bytes, measured through the decode library call
//! `generate` makes, equal `plan`'s decode section for the same image (uneven bands included), and
//! inconsistent flags give clear errors.

use std::path::PathBuf;
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .current_dir(repo())
        .args(args)
        .output()
        .expect("run pcpp-cli")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "pcpp-cli failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn per_rank_decode_bytes_equal_the_plan() {
    let size = ["--height", "64", "--width", "48"];
    for ranks in ["2", "3"] {
        let mut args = vec!["decode-bench", "--warmup", "0", "--iters", "1", "--json"];
        args.extend(size);
        args.extend(["--ranks", ranks]);
        let lines: Vec<serde_json::Value> = ok(&cli(&args))
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        let mut args = vec!["plan", "--model", "models/tiny-sdxl", "--dtype", "f32"];
        args.extend(size);
        args.extend(["--ranks", ranks, "--json"]);
        let plan: serde_json::Value = serde_json::from_str(&ok(&cli(&args))).expect("plan JSON");
        let n: usize = ranks.parse().unwrap();
        assert_eq!(lines.len(), n, "one line per rank");
        let rows: Vec<u64> = lines
            .iter()
            .map(|l| l["latent_rows"].as_u64().unwrap())
            .collect();
        assert_eq!(
            rows.iter().sum::<u64>(),
            32,
            "bands cover the latent: {rows:?}"
        );
        for (r, line) in lines.iter().enumerate() {
            assert_eq!(line["rank"], r);
            assert!(line["decode_ms"].as_f64().unwrap() > 0.0);
            let planned = &plan["decode"]["ranks"][r]["warmup"];
            for dir in ["sent", "recvd"] {
                for kind in ["halo", "group_norm", "attention"] {
                    assert_eq!(
                        line["traffic"][dir][kind], planned[dir][kind],
                        "rank {r} of {n}: {dir} {kind}"
                    );
                }
                assert!(line["traffic"][dir]["halo"].as_u64().unwrap() > 0);
            }
        }
    }
}

#[test]
fn decode_bench_rejects_bad_flags() {
    let too_many = cli(&[
        "decode-bench",
        "--height",
        "16",
        "--width",
        "16",
        "--ranks",
        "9",
    ]);
    assert!(!too_many.status.success());
    let err = String::from_utf8_lossy(&too_many.stderr);
    assert!(err.contains("--ranks 9"), "{err}");
    let odd = cli(&["decode-bench", "--height", "63", "--width", "48"]);
    assert!(!odd.status.success());
    assert!(String::from_utf8_lossy(&odd.stderr).contains("--height 63"));
    let rank = cli(&["decode-bench", "--ranks", "2", "--rank", "2"]);
    assert!(!rank.status.success());
    assert!(String::from_utf8_lossy(&rank.stderr).contains("--rank 2"));
}
