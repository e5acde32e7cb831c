//! `pcpp-cli generate` on the tiny Flux.1 pipelines over several ranks (`--transport local`):
//! synchronous runs (`--sync-mode full`, or a warm-up covering every step) over 2, 3 and 4 ranks
//! give the serial run's latents ≤ 1e-5 (a 7-row packed token grid: uneven bands), a 3-rank run
//! matches diffusers' stored latents, and the stale modes' `--report` bytes of every rank and step
//! equal `pcpp-cli plan --json` on the same folder; the parallel VAE decode equals rank 0's alone
//! and moves the plan's decode bytes; `flux-bench` reports a rank's planned bytes.

mod common;

use std::path::PathBuf;

use common::{cli, data, latents, rel, repo, s, tmp};
use pcpp_kernels::io::{load_all, save};

fn model(v: &str) -> PathBuf {
    repo().join(format!("models/tiny-flux-{v}"))
}

/// Runs `generate` on `variant` at 28 × 12 (seed 3, 3 steps) with `extra` flags; returns the
/// saved latents' path.
fn run(variant: &str, tag: &str, extra: &[&str]) -> PathBuf {
    let (lat, png) = (
        tmp(&format!("{tag}.safetensors")),
        tmp(&format!("{tag}.png")),
    );
    let m = model(variant);
    let mut a = vec![
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "a red cube on a table",
        "--height",
        "28",
        "--width",
        "12",
        "--steps",
        "3",
        "--seed",
        "3",
        "--max-sequence-length",
        "16",
        "--save-latents",
        s(&lat),
        "--output",
        s(&png),
    ];
    a.extend_from_slice(extra);
    let o = cli(&a);
    assert!(
        o.status.success(),
        "{tag}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    lat
}

#[test]
fn flux_synchronous_ranks_equal_serial() {
    for variant in ["dev", "schnell"] {
        let want = latents(&run(variant, &format!("{variant}-serial"), &[]));
        for n in ["2", "3", "4"] {
            for (how, flags) in [
                ("full", vec!["--sync-mode", "full", "--warmup-steps", "1"]),
                ("warmup", vec!["--warmup-steps", "3"]),
            ] {
                let tag = format!("{variant}-{n}-{how}");
                let mut extra = vec!["--ranks", n];
                extra.extend(flags.iter().copied());
                let got = latents(&run(variant, &tag, &extra));
                let e = rel(&got, &want);
                assert!(e <= 1e-5, "{tag}: {e:.3e}");
            }
        }
        // the stale steps differ from serial
        let got = latents(&run(
            variant,
            &format!("{variant}-stale"),
            &["--ranks", "3"],
        ));
        assert!(rel(&got, &want) > 0.0, "{variant}: stale run equals serial");
    }
}

#[test]
fn flux_three_ranks_match_diffusers() {
    let key = "dev_wide";
    let r = load_all(data(&format!("refs-tiny-flux/pipeline_{key}.safetensors"))).unwrap();
    let noise = tmp("par-noise.safetensors");
    save(&noise, &[("initial_noise", &r["init_noise"])], None).unwrap();
    let (lat, png) = (tmp("par-dev-wide.safetensors"), tmp("par-dev-wide.png"));
    let o = cli(&[
        "generate",
        "--model",
        s(&model("dev")),
        "--prompt",
        "a photo of an astronaut riding a horse on mars, 4k, highly detailed!!",
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "3",
        "--guidance",
        "4",
        "--init-noise",
        s(&noise),
        "--save-latents",
        s(&lat),
        "--output",
        s(&png),
        "--ranks",
        "3",
        "--sync-mode",
        "full",
        "--warmup-steps",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = rel(&latents(&lat), &r["latents"]);
    assert!(e <= 1e-4, "latents against diffusers: {e:.3e}");
}

#[test]
fn flux_stale_bytes_equal_plan() {
    for (mode, extra) in [
        ("pcpp", vec!["--portion", "0.5"]),
        ("distrifusion", vec![]),
        ("naive-patch", vec![]),
    ] {
        let report = tmp(&format!("report-{mode}.json"));
        let mut flags = vec![
            "--ranks",
            "3",
            "--parallel",
            mode,
            "--warmup-steps",
            "1",
            "--report",
            s(&report),
        ];
        flags.extend(extra.iter().copied());
        run("dev", &format!("bytes-{mode}"), &flags);
        let rep: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        // the image's stages add up to at most its time
        let secs = |k: &str| rep[k].as_f64().unwrap_or_else(|| panic!("no {k} in {rep}"));
        let stages = secs("encode_seconds") + secs("denoise_seconds") + secs("decode_seconds");
        assert!(
            stages > 0.0 && stages <= secs("generate_seconds") + 1e-6,
            "{rep}"
        );
        let m = model("dev");
        let mut pa = vec![
            "plan",
            "--model",
            s(&m),
            "--height",
            "28",
            "--width",
            "12",
            "--ranks",
            "3",
            "--parallel",
            mode,
            "--dtype",
            "f32",
            "--json",
        ];
        pa.extend(extra.iter().copied());
        let o = cli(&pa);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ranks = rep["per_rank"].as_array().unwrap();
        assert_eq!(ranks.len(), 3);
        for (r, rank) in ranks.iter().enumerate() {
            let steps = rank["steps"].as_array().unwrap();
            assert_eq!(steps.len(), 3, "{mode} rank {r}");
            for st in steps {
                let want = if st["sync"].as_bool().unwrap() {
                    &plan["ranks"][r]["warmup"]
                } else {
                    &plan["ranks"][r]["steady"]
                };
                assert_eq!(&st["traffic"], want, "{mode} rank {r} step {}", st["step"]);
            }
        }
    }
}

/// `flux-bench` on the tiny config: the serial step, and one rank's steady step whose bytes are
/// the plan's for that rank.
#[test]
fn flux_bench_rank_bytes_equal_plan() {
    let cfg = model("dev").join("transformer/config.json");
    let common = [
        "flux-bench",
        "--config",
        s(&cfg),
        "--height",
        "64",
        "--width",
        "32",
        "--vae-scale",
        "2",
        "--tokens",
        "8",
        "--warmup",
        "1",
        "--iters",
        "1",
    ];
    let o = cli(&common);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "serial");
    assert_eq!(v["steady_sent_bytes"], 0);
    let mut a = common.to_vec();
    a.extend(["--ranks", "3", "--rank", "1", "--portion", "0.5"]);
    let o = cli(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = cli(&[
        "plan",
        "--model",
        s(&model("dev")),
        "--height",
        "64",
        "--width",
        "32",
        "--ranks",
        "3",
        "--portion",
        "0.5",
        "--dtype",
        "f32",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["steady_traffic"], plan["ranks"][1]["steady"]);
    assert_eq!(v["band_rows"], plan["ranks"][1]["rows"]);
    let o = cli(&[&common[..], &["--ranks", "2", "--rank", "2"]].concat());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--rank 2"));
    // kernel variants are GPU choices: on the CPU the flag is refused by name, before any work
    let o = cli(&[&common[..], &["--variants", "shared-q64+fused"]].concat());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--variants shared-q64+fused"), "{err}");
}

/// `flux-bench --profile` counts the ops of the timed steps: one attention per double and single
/// block over the joint image + text tokens, with the FLOPs of its two products (4·L²·d per head).
#[test]
fn flux_bench_profile_counts_each_attention_once() {
    let cfg = model("dev").join("transformer/config.json");
    let o = cli(&[
        "flux-bench",
        "--config",
        s(&cfg),
        "--height",
        "64",
        "--width",
        "32",
        "--vae-scale",
        "2",
        "--tokens",
        "8",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--profile",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let n = |k: &str| c[k].as_u64().unwrap() as f64;
    let layers = n("num_layers") + n("num_single_layers");
    let dim = n("num_attention_heads") * n("attention_head_dim");
    // 64 × 32 pixels at scale 2 are 16 × 8 packed tokens, plus 8 text tokens
    let l = 16.0 * 8.0 + 8.0;
    let att = &v["profile"]["attention"];
    assert_eq!(att["calls"].as_f64(), Some(layers), "{}", v["profile"]);
    let gflop = att["gflop"].as_f64().unwrap();
    let want = layers * 4.0 * l * l * dim / 1e9;
    assert!((gflop - want).abs() <= 1e-9 * want, "{gflop} vs {want}");
    assert!(v["profile"]["linear"]["calls"].as_f64().unwrap() > 0.0);
}

/// On a GPU (f32, CUDA graphs on by default): 2 and 3 ranks as threads on GPU 0 with every step
/// synchronous equal the serial GPU run within 1e-4 (cuBLAS may sum a band's products in another
/// order than the whole image's). `cargo test -p pcpp-cli --features cuda --test
/// cli_flux_parallel -- --ignored`.
#[test]
#[ignore = "needs a CUDA GPU"]
fn flux_ranks_on_gpu_equal_serial() {
    let gpu = ["--device", "cuda", "--dtype", "f32"];
    let want = latents(&run("dev", "gpu-serial", &gpu));
    for n in ["2", "3"] {
        let mut extra = gpu.to_vec();
        extra.extend(["--ranks", n, "--sync-mode", "full", "--warmup-steps", "1"]);
        let got = latents(&run("dev", &format!("gpu-{n}"), &extra));
        let e = rel(&got, &want);
        assert!(e <= 1e-4, "{n} ranks on the GPU: {e:.3e}");
    }
    // stale steps replayed from CUDA graphs run and stay close
    let got = latents(&run(
        "dev",
        "gpu-stale",
        &[
            "--device",
            "cuda",
            "--dtype",
            "f32",
            "--ranks",
            "3",
            "--warmup-steps",
            "1",
        ],
    ));
    let e = rel(&got, &want);
    assert!(e > 0.0 && e < 0.5, "stale on the GPU: {e:.3e}");
}

/// The 16-channel VAE decodes in parallel (pcpp-sdxl's decode, unchanged): the image equals the
/// one rank 0 decodes alone (`--serial-decode`), and every rank's decode bytes equal the plan's.
#[test]
fn flux_parallel_decode_equals_serial_decode() {
    let report = tmp("decode-report.json");
    run(
        "dev",
        "decode-par",
        &["--ranks", "3", "--report", s(&report)],
    );
    run("dev", "decode-ser", &["--ranks", "3", "--serial-decode"]);
    let a = image::open(tmp("decode-par.png")).unwrap().to_rgb8();
    let b = image::open(tmp("decode-ser.png")).unwrap().to_rgb8();
    let d = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(d <= 1, "parallel and serial decodes differ by {d} levels");
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let o = cli(&[
        "plan",
        "--model",
        s(&model("dev")),
        "--height",
        "28",
        "--width",
        "12",
        "--ranks",
        "3",
        "--dtype",
        "f32",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for r in 0..3 {
        let got = &rep["per_rank"][r]["decode"];
        assert!(got["recvd"]["halo"].as_u64().unwrap() > 0, "rank {r}");
        assert_eq!(got, &plan["decode"]["ranks"][r]["warmup"], "rank {r}");
    }
}
