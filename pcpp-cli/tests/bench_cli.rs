//! `pcpp-cli bench` end to end: JSON output, the FLOP count of the loaded and of the random-weight
//! tiny UNet (same structure, so the same count), and clear errors for inconsistent flags.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .current_dir(repo())
        .arg("bench")
        .args(["--warmup", "0", "--iters", "2", "--threads", "1", "--json"])
        .args(args)
        .output()
        .expect("run pcpp-cli")
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "pcpp-cli bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn bench_reports_time_and_flops_for_loaded_and_random_weights() {
    let loaded = json(&bench(&[]));
    assert_eq!(loaded["threads"], 1);
    assert_eq!(loaded["batch"], 2);
    assert_eq!(loaded["latent_hw"], serde_json::json!([32, 24]));
    let ms = loaded["pcpp_cpu_unet_ms"].as_f64().expect("ms");
    let min = loaded["min_ms"].as_f64().expect("min");
    assert!(ms > 0.0 && min > 0.0 && min <= ms);
    let gflop = loaded["gflop"].as_f64().expect("gflop");
    assert!(gflop > 0.0);

    let random = json(&bench(&[
        "--config",
        "models/tiny-sdxl/unet/config.json",
        "--random-weights",
    ]));
    assert_eq!(
        random["gflop"].as_f64(),
        Some(gflop),
        "same structure, same work"
    );

    let bigger = json(&bench(&["--height", "64", "--width", "48", "--batch", "1"]));
    assert!(bigger["gflop"].as_f64().expect("gflop") > gflop);
}

#[test]
fn bench_rejects_inconsistent_flags() {
    let out = bench(&["--config", "models/tiny-sdxl/unet/config.json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--random-weights"));

    let out = bench(&["--height", "31"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiples"));

    let out = bench(&["--dtype", "f16"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dtype"));

    let out = bench(&["--model", "no/such/folder"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/folder"));

    // Attention kernels and small-row GEMMs are GPU choices: refused on the CPU, serial or per
    // rank.
    for extra in [&[][..], &["--parallel", "pcpp", "--ranks", "2"][..]] {
        for (flag, list) in [("--attention", "ws,ws2"), ("--small-gemm", "1,0,geglu/128")] {
            let mut args = vec![flag, list];
            args.extend_from_slice(extra);
            let out = bench(&args);
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).contains(flag));
        }
        // The in-graph kernel costs need a replayed CUDA graph.
        let mut args = vec!["--kernel-costs"];
        args.extend_from_slice(extra);
        let out = bench(&args);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--kernel-costs"));
    }
}

/// One JSON value per line of stdout.
fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "pcpp-cli bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn per_rank_bench_counts_the_bytes_of_a_real_run() {
    // Every rank's steady step measured alone (nothing delivered) must post exactly what the
    // same rank posts in a steady step of a real 4-rank run of the same image (the tiny model's
    // VAE halves the image: 32 pixels are 16 latent rows).
    let ranks = json_lines(&bench(&[
        "--parallel",
        "pcpp",
        "--ranks",
        "4",
        "--height",
        "16",
        "--width",
        "16",
    ]));
    assert_eq!(ranks.len(), 4);
    let dir = std::env::temp_dir().join(format!("pcpp-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .current_dir(repo())
        .args([
            "generate",
            "--prompt",
            "a squirrel",
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "32",
            "--ranks",
            "4",
            "--parallel",
            "pcpp",
            "--warmup-steps",
            "1",
            "--output",
            dir.join("x.png").to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ])
        .output()
        .expect("run pcpp-cli generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for (rank, b) in ranks.iter().enumerate() {
        assert_eq!(b["rank"], rank);
        assert_eq!(b["group_size"], 2, "CFG split: two bands per branch");
        assert!(b["steady_step_ms"].as_f64().unwrap() > 0.0);
        let steps = r["per_rank"][rank]["steps"].as_array().unwrap();
        let steady = steps
            .iter()
            .find(|s| !s["sync"].as_bool().unwrap())
            .expect("a steady step");
        assert_eq!(b["steady_traffic"], steady["traffic"], "rank {rank}");
        // Partial windows: a steady step moves less K/V than a synchronous one.
        let sync = steps.iter().find(|s| s["sync"].as_bool().unwrap()).unwrap();
        assert!(
            steady["traffic"]["sent"]["attention"].as_u64().unwrap()
                < sync["traffic"]["sent"]["attention"].as_u64().unwrap()
        );
        assert!(b["steady_sent_bytes"].as_u64().unwrap() > 0);
    }
    let _ = std::fs::remove_dir_all(&dir);

    // Naive patch sends nothing but the output gather; the serial step sends nothing.
    let naive = json_lines(&bench(&[
        "--parallel",
        "naive-patch",
        "--ranks",
        "2",
        "--rank",
        "1",
        "--height",
        "8",
        "--width",
        "8",
    ]));
    assert_eq!(naive.len(), 1);
    let t = &naive[0]["steady_traffic"]["sent"];
    assert_eq!(t["halo"], 0);
    assert_eq!(t["attention"], 0);
    assert!(t["gather"].as_u64().unwrap() > 0);
}

#[test]
fn per_rank_bench_rejects_bad_ranks() {
    let out = bench(&["--parallel", "pcpp", "--ranks", "4", "--rank", "4"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rank 4"));
    let out = bench(&["--device", "cuda", "--ranks", "2", "--parallel", "pcpp"]);
    if !cfg!(feature = "cuda") {
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--features cuda"));
    }
}
