//! The flags that refine a parallel scheme, through the binary (PCPP §2.1, §2.6, §5): `--sync-mode
//! full` equals the serial output, `--sync-mode none` moves no halo, statistics or attention bytes
//! after the warm-up, the report's bytes equal `plan`'s for every `--gn-mode`, and a flag the
//! scheme has no use for is an error.

use std::path::{Path, PathBuf};
use std::process::Command;

use pcpp_kernels::io::load_all;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcpp-cli-modes-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args(args)
        .output()
        .unwrap()
}

fn run(args: &[&str]) -> String {
    let o = cli(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

const STEPS: &str = "5";

/// Generates from the stored noise with `extra` flags; returns the latents file and the report.
fn generate(tag: &str, extra: &[&str]) -> (PathBuf, serde_json::Value) {
    let noise = repo().join("tests/data/refs-tiny-sdxl/pipeline_euler.safetensors");
    let lat = tmp(&format!("{tag}.safetensors"));
    let png = tmp(&format!("{tag}.png"));
    let report = tmp(&format!("{tag}.json"));
    let mut args = vec![
        "generate",
        "--prompt",
        "A painting of a squirrel eating a burger",
        "--steps",
        STEPS,
        "--height",
        "64",
        "--width",
        "64",
        "--init-noise",
        noise.to_str().unwrap(),
        "--save-latents",
        lat.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args);
    let r = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (lat, r)
}

fn plan(extra: &[&str]) -> serde_json::Value {
    let model = repo().join("models/tiny-sdxl");
    let mut args = vec![
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--height",
        "64",
        "--width",
        "64",
        "--dtype",
        "f32",
        "--json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&run(&args)).unwrap()
}

fn latents(p: &Path) -> pcpp_kernels::Tensor {
    load_all(p).unwrap().remove("latents").unwrap()
}

/// Asserts that every step of every rank moved the bytes `plan` gives for its step type.
fn assert_report_is_plan(what: &str, r: &serde_json::Value, p: &serde_json::Value) {
    for (rank, rep) in r["per_rank"].as_array().unwrap().iter().enumerate() {
        for s in rep["steps"].as_array().unwrap() {
            let odd = s["step"].as_u64().unwrap() % 2 == 1;
            let which = if odd && !p["ranks"][rank]["odd_steps"].is_null() {
                "odd_steps"
            } else if s["sync"].as_bool().unwrap() {
                "warmup"
            } else {
                "steady"
            };
            assert_eq!(
                s["traffic"], p["ranks"][rank][which],
                "{what}: rank {rank} step {}",
                s["step"]
            );
        }
    }
}

#[test]
fn full_sync_equals_serial_and_none_moves_only_the_gather() {
    let (serial, _) = generate("serial", &[]);
    let serial = latents(&serial);
    let (full, r) = generate(
        "full",
        &["--ranks", "3", "--warmup-steps", "1", "--sync-mode", "full"],
    );
    let e = latents(&full).max_abs_diff(&serial).unwrap() / serial.max_abs().unwrap();
    assert!(e <= 1e-5, "--sync-mode full: rel err {e:.3e}");
    let p = plan(&["--ranks", "3", "--sync-mode", "full"]);
    assert_report_is_plan("full", &r, &p);

    let flags = ["--ranks", "4", "--warmup-steps", "2", "--sync-mode", "none"];
    let (none, r) = generate("none", &flags);
    let e = latents(&none).max_abs_diff(&serial).unwrap() / serial.max_abs().unwrap();
    assert!(e > 0.0, "stale steps differ from serial");
    let p = plan(&["--ranks", "4", "--sync-mode", "none"]);
    assert_report_is_plan("none", &r, &p);
    for rep in r["per_rank"].as_array().unwrap() {
        for s in &rep["steps"].as_array().unwrap()[2..] {
            for dir in ["sent", "recvd"] {
                let t = &s["traffic"][dir];
                for kind in ["halo", "attention", "group_norm"] {
                    assert_eq!(t[kind], 0, "{kind} {dir} after warm-up");
                }
                assert!(t["gather"].as_u64().unwrap() > 0);
            }
        }
    }
}

#[test]
fn every_gn_mode_moves_the_planned_bytes() {
    for gn in ["sync", "stale", "corrected", "separate"] {
        let (_, r) = generate(
            &format!("gn-{gn}"),
            &[
                "--ranks",
                "2",
                "--no-cfg-split",
                "--warmup-steps",
                "2",
                "--gn-mode",
                gn,
            ],
        );
        let p = plan(&["--ranks", "2", "--no-cfg-split", "--gn-mode", gn]);
        assert_report_is_plan(gn, &r, &p);
        assert_eq!(r["per_rank"][0]["gn_mode"], gn);
    }
}

#[test]
fn naive_patch_split_schemes_differ_and_move_the_planned_bytes() {
    let mut outs = Vec::new();
    for scheme in ["rows", "cols", "alternate"] {
        let flags = [
            "--ranks",
            "3",
            "--no-cfg-split",
            "--parallel",
            "naive-patch",
            "--split-scheme",
            scheme,
        ];
        let (lat, r) = generate(&format!("split-{scheme}"), &flags);
        let p = plan(&flags);
        assert_report_is_plan(scheme, &r, &p);
        assert_eq!(r["per_rank"][0]["split_scheme"], scheme);
        outs.push(latents(&lat));
    }
    assert!(
        outs[0].max_abs_diff(&outs[1]).unwrap() > 0.0,
        "cols vs rows"
    );
    assert!(
        outs[0].max_abs_diff(&outs[2]).unwrap() > 0.0,
        "alternate vs rows"
    );
    assert!(
        outs[1].max_abs_diff(&outs[2]).unwrap() > 0.0,
        "alternate vs cols"
    );
}

#[test]
fn tensor_parallel_equals_serial_and_moves_the_planned_bytes() {
    let (serial, _) = generate("tp-serial", &[]);
    let serial = latents(&serial);
    for flags in [
        &["--ranks", "2", "--no-cfg-split", "--parallel", "tensor"][..],
        &["--ranks", "4", "--parallel", "tensor"][..],
    ] {
        let (lat, r) = generate(&format!("tp-{}", flags[1]), flags);
        let e = latents(&lat).max_abs_diff(&serial).unwrap() / serial.max_abs().unwrap();
        assert!(e <= 1e-5, "{flags:?}: rel err {e:.3e}");
        let p = plan(flags);
        assert_report_is_plan("tensor", &r, &p);
        let ar = p["ranks"][0]["steady"]["recvd"]["all_reduce"]
            .as_u64()
            .unwrap();
        assert!(ar > 0, "{flags:?}: plan has all-reduce bytes");
    }
}

#[test]
fn distrifusion_runs_over_ranks_and_reports_its_infinite_portion() {
    let flags = [
        "--ranks",
        "2",
        "--no-cfg-split",
        "--parallel",
        "distrifusion",
    ];
    let mut with_warmup = flags.to_vec();
    with_warmup.extend_from_slice(&["--warmup-steps", "2"]);
    let (_, r) = generate("df", &with_warmup);
    assert_report_is_plan("distrifusion", &r, &plan(&flags));
    assert_eq!(r["per_rank"][0]["portion"], serde_json::json!(["inf"]));
}

#[test]
fn flags_that_do_not_apply_are_errors() {
    for (flags, needle) in [
        (
            &["--parallel", "pcpp", "--split-scheme", "cols"][..],
            "--split-scheme",
        ),
        (
            &["--parallel", "naive-patch", "--gn-mode", "sync"][..],
            "--gn-mode",
        ),
        (
            &["--parallel", "serial", "--sync-mode", "none"][..],
            "--sync-mode",
        ),
        (&["--sync-mode", "sometimes"][..], "sometimes"),
    ] {
        let model = repo().join("models/tiny-sdxl");
        let mut args = vec!["plan", "--model", model.to_str().unwrap(), "--ranks", "2"];
        args.extend_from_slice(flags);
        let o = cli(&args);
        assert!(!o.status.success(), "{flags:?} must fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
}

#[test]
fn cuda_graph_flag_needs_a_gpu() {
    let png = tmp("no-graphs.png");
    let o = cli(&[
        "generate",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--no-cuda-graphs",
        "--output",
        png.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--no-cuda-graphs"), "{err}");
    assert!(!png.exists(), "no output file on a user error");
}
