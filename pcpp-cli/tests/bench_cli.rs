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

    let out = bench(&["--model", "no/such/folder"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/folder"));
}
