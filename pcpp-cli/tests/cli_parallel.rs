//! Patch parallelism through the binary (`--transport local --ranks N`): with every step
//! synchronous, N ranks give the serial latents; in stale steps PCPP stays closer to serial than
//! naive patch splitting; the report's bytes are those of `plan`; and `plan` on the real SDXL
//! configs shows PCPP moving ≤ 0.2× DistriFusion's bytes at 8 ranks, 1024².

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{latents, rel, repo, tmp};

fn run(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Generates the Euler reference prompt from the stored noise (6 steps); returns the latents file.
fn generate(tag: &str, extra: &[&str]) -> PathBuf {
    let (args, lat) = common::gen_args(tag, 6, extra);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run(&args);
    lat
}

/// `plan --json` of the tiny model at 64×64 over `ranks` ranks, in f32.
fn plan_json(ranks: &str) -> serde_json::Value {
    let model = repo().join("models/tiny-sdxl");
    let args = [
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--height",
        "64",
        "--width",
        "64",
        "--ranks",
        ranks,
        "--dtype",
        "f32",
        "--json",
    ];
    serde_json::from_str(&run(&args)).unwrap()
}

#[test]
fn synchronous_ranks_equal_serial_and_stale_pcpp_beats_naive() {
    let serial = latents(&generate("serial", &[]));
    for (r, split) in [("2", true), ("3", false), ("4", true)] {
        let mut extra = vec!["--ranks", r, "--warmup-steps", "6"];
        if !split {
            extra.push("--no-cfg-split");
        }
        let got = latents(&generate(&format!("sync{r}"), &extra));
        let e = rel(&got, &serial);
        assert!(
            e <= 1e-5,
            "{r} ranks, all steps synchronous: rel err {e:.3e}"
        );
    }
    let pcpp = rel(
        &latents(&generate("pcpp4", &["--ranks", "4", "--warmup-steps", "2"])),
        &serial,
    );
    let naive = rel(
        &latents(&generate(
            "naive4",
            &["--ranks", "4", "--parallel", "naive-patch"],
        )),
        &serial,
    );
    assert!(pcpp > 0.0, "stale steps must differ from serial");
    assert!(
        pcpp < naive,
        "pcpp {pcpp:.3e} should be closer to serial than naive patch {naive:.3e}"
    );
}

#[test]
fn report_bytes_match_plan() {
    let report = tmp("report.json");
    generate(
        "report",
        &[
            "--ranks",
            "4",
            "--warmup-steps",
            "2",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let plan: serde_json::Value = plan_json("4");
    let per_rank = r["per_rank"].as_array().unwrap();
    assert_eq!(per_rank.len(), 4);
    for (rank, rep) in per_rank.iter().enumerate() {
        let steps = rep["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 6);
        for s in steps {
            let which = if s["sync"].as_bool().unwrap() {
                "warmup"
            } else {
                "steady"
            };
            for kind in ["halo", "attention", "group_norm"] {
                assert_eq!(
                    s["traffic"]["recvd"][kind], plan["ranks"][rank][which]["recvd"][kind],
                    "rank {rank} step {} {kind}",
                    s["step"]
                );
            }
        }
        assert_eq!(rep["min_stale_age"], 1);
        assert_eq!(rep["max_stale_age"], 1);
    }
}

#[test]
fn plan_pcpp_moves_a_fifth_of_distrifusion_on_sdxl() {
    let cfgs = repo().join("models/sdxl-base-1.0-configs");
    let bytes = |mode: &str| -> f64 {
        let v: serde_json::Value = serde_json::from_str(&run(&[
            "plan",
            "--model",
            cfgs.to_str().unwrap(),
            "--ranks",
            "8",
            "--parallel",
            mode,
            "--json",
        ]))
        .unwrap();
        v["bytes_per_step"].as_f64().unwrap()
    };
    let (p, d) = (bytes("pcpp"), bytes("distrifusion"));
    assert!(p > 0.0 && p <= 0.2 * d, "pcpp {p} vs distrifusion {d}");
}

#[test]
fn distrifusion_report_records_unbounded_portion() {
    let report = tmp("df-report.json");
    generate(
        "df",
        &[
            "--ranks",
            "4",
            "--parallel",
            "distrifusion",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["per_rank"][0]["portion"][0], "inf");
    assert_eq!(r["per_rank"][0]["mode"], "distrifusion");
}

/// Every rank decodes its band of the image (the default with several ranks): the PNG equals the
/// one decoded on rank 0 alone, and each rank's decode bytes are those `plan` gives for the decode.
#[test]
fn parallel_decode_through_generate_equals_the_serial_decode_and_the_plan() {
    let serial_png = tmp("sdec-serial.png");
    let (args, _) = common::gen_args("sdec-serial", 2, &["--ranks", "3", "--serial-decode"]);
    run(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let want = image::open(&serial_png).unwrap().to_rgb8();
    for ranks in ["2", "3", "4"] {
        let (png, report) = (
            tmp(&format!("pdec{ranks}.png")),
            tmp(&format!("pdec{ranks}.json")),
        );
        let (mut args, _) = common::gen_args(&format!("pdec{ranks}"), 2, &["--ranks", ranks]);
        args.extend(["--report".into(), report.to_str().unwrap().into()]);
        run(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let got = image::open(&png).unwrap().to_rgb8();
        let worst = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        if ranks == "3" {
            // Same denoising (3 ranks either way): only the decode differs.
            assert!(worst <= 1, "{ranks} ranks: PNG differs by {worst} levels");
        }
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let plan: serde_json::Value = plan_json(ranks);
        for (rank, rep) in r["per_rank"].as_array().unwrap().iter().enumerate() {
            let want = &plan["decode"]["ranks"][rank]["warmup"];
            for dir in ["sent", "recvd"] {
                for kind in ["halo", "attention", "group_norm", "gather"] {
                    assert_eq!(
                        rep["decode"][dir][kind], want[dir][kind],
                        "{ranks} ranks, rank {rank}, decode {dir} {kind}"
                    );
                }
            }
            assert!(rep["decode"]["recvd"]["halo"].as_u64().unwrap() > 0);
            assert!(rep["decode_seconds"].as_f64().unwrap() > 0.0, "rank {rank}");
        }
    }
}
