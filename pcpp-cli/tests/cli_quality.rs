//! The quality workflow through the binary (PCPP paper §5): `generate --prompts FILE --output-dir
//! DIR` writes one image per prompt line with a per-line seed, skips images already written, and
//! works with several ranks; `compare DIR_A DIR_B` gives per-image and mean PSNR / SSIM.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcpp-cli-quality-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn run(args: &[&str]) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

const COMMON: [&str; 8] = [
    "--steps", "3", "--height", "64", "--width", "64", "--seed", "7",
];

fn batch(prompts: &Path, dir: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--prompts",
        prompts.to_str().unwrap(),
        "--output-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(&COMMON);
    args.extend_from_slice(extra);
    run(&args).1
}

fn compare_json(a: &Path, b: &Path) -> serde_json::Value {
    let out = run(&[
        "compare",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--json",
    ])
    .0;
    serde_json::from_str(&out).unwrap()
}

#[test]
fn prompt_folders_are_resumable_and_compared() {
    let prompts = tmp("prompts.txt");
    std::fs::write(
        &prompts,
        "a red fox in the snow\n\na lighthouse at dusk\na bowl of ramen\n",
    )
    .unwrap();
    let serial = tmp("serial");
    let pcpp = tmp("pcpp");
    batch(&prompts, &serial, &[]);
    batch(&prompts, &pcpp, &["--ranks", "4", "--warmup-steps", "1"]);
    let names = ["00000.png", "00002.png", "00003.png"];
    for d in [&serial, &pcpp] {
        let mut got: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        assert_eq!(got, names, "{}", d.display());
    }

    // Line 2 uses seed 7 + 2 and is the same image as a single generation with that seed.
    let single = tmp("single.png");
    let mut args = vec![
        "generate",
        "--prompt",
        "a lighthouse at dusk",
        "--output",
        single.to_str().unwrap(),
    ];
    args.extend_from_slice(&COMMON[..6]);
    args.extend_from_slice(&["--seed", "9"]);
    run(&args);
    let same = compare_json(&single, &serial.join("00002.png"));
    assert_eq!(same["psnr"], "inf", "{same}");

    // Resuming skips what exists and fills the gap.
    let kept = std::fs::read(serial.join("00000.png")).unwrap();
    std::fs::remove_file(serial.join("00003.png")).unwrap();
    let msg = batch(&prompts, &serial, &[]);
    assert!(msg.contains("1 images written, 2 already present"), "{msg}");
    assert_eq!(std::fs::read(serial.join("00000.png")).unwrap(), kept);
    assert!(serial.join("00003.png").is_file());

    // Folder comparison: identical folders are perfect; pcpp vs serial is close but not equal.
    let self_cmp = compare_json(&serial, &serial);
    assert_eq!(self_cmp["count"], 3);
    assert_eq!(self_cmp["mean_psnr"], "inf");
    assert_eq!(self_cmp["mean_ssim"], 1.0);
    let c = compare_json(&serial, &pcpp);
    assert_eq!(c["count"], 3);
    let imgs = c["images"].as_array().unwrap();
    let (mut sp, mut ss) = (0.0, 0.0);
    for (i, n) in imgs.iter().zip(names) {
        assert_eq!(i["name"], n);
        let p = i["psnr"].as_f64().expect("finite PSNR: stale steps differ");
        let s = i["ssim"].as_f64().unwrap();
        assert!(p > 10.0 && s > 0.0 && s < 1.0, "{i}");
        sp += p;
        ss += s;
    }
    assert!((c["mean_psnr"].as_f64().unwrap() - sp / 3.0).abs() < 1e-9);
    assert!((c["mean_ssim"].as_f64().unwrap() - ss / 3.0).abs() < 1e-12);
    // Each per-image figure is what comparing the two files gives.
    let one = compare_json(&serial.join("00003.png"), &pcpp.join("00003.png"));
    assert_eq!(one["psnr"], imgs[2]["psnr"]);
    assert_eq!(one["ssim"], imgs[2]["ssim"]);

    // A file missing on one side is listed, not compared.
    std::fs::remove_file(pcpp.join("00000.png")).unwrap();
    let c = compare_json(&serial, &pcpp);
    assert_eq!(c["count"], 2);
    assert_eq!(c["missing"], serde_json::json!(["00000.png"]));
}

#[test]
fn prompts_refuses_single_file_flags() {
    let prompts = tmp("p2.txt");
    std::fs::write(&prompts, "a cat\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args([
            "generate",
            "--prompts",
            prompts.to_str().unwrap(),
            "--output-dir",
            tmp("d2").to_str().unwrap(),
            "--report",
            tmp("r.json").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--report"));
}
