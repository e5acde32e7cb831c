//! The built `pcpp-cli` binary end to end: `generate` from stored noise against diffusers'
//! pipeline, `unet` on a differently shaped UNet against diffusers, `compare`, and user errors
//! (exit status ≠ 0, one message naming the flag or file, no panic, no output file).

mod common;

use std::os::unix::ffi::OsStrExt;
use std::process::Command;

use pcpp_kernels::io::load_all;

use common::{cli, data, rel, s, tmp};

#[test]
fn generate_from_stored_noise_matches_diffusers() {
    let refs = data("refs-tiny-sdxl/pipeline_ddim.safetensors");
    let out = tmp("ddim.png");
    let lat = tmp("ddim-latents.safetensors");
    let o = cli(&[
        "generate",
        "--prompt",
        "a photo of an astronaut riding a horse on mars, 4k, highly detailed, trending on artstation, 8K UHD!!",
        "--negative-prompt",
        "blurry, low quality",
        "--guidance",
        "7",
        "--steps",
        "4",
        "--height",
        "64",
        "--width",
        "96",
        "--scheduler",
        "ddim",
        "--init-noise",
        s(&refs),
        "--save-latents",
        s(&lat),
        "--output",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = load_all(&lat).unwrap();
    let want = load_all(&refs).unwrap();
    let e = rel(&got["latents"], &want["final_latents"]);
    assert!(e <= 1e-4, "latents rel err {e:.3e}");
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (96, 64));
    // The PNG matches diffusers' image to within one 8-bit level.
    let np = want["image_np"].to_vec_f32().unwrap();
    let max = img
        .as_raw()
        .iter()
        .zip(&np)
        .map(|(&g, &w)| (g as f32 - w * 255.0).abs())
        .fold(0.0f32, f32::max);
    assert!(max <= 1.0, "image differs by {max} levels");
    let bytes = std::fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("parameters") && text.contains("Sampler: DDIM"),
        "PNG has the parameters chunk"
    );
}

#[test]
fn unet_command_matches_diffusers_on_another_config() {
    for dir in ["unet-alt", "unet-sd15"] {
        let out = tmp(&format!("{dir}-out.safetensors"));
        let inputs = data(&format!("{dir}/unet_forward.safetensors"));
        let o = cli(&[
            "unet",
            "--model",
            s(&data(dir)),
            "--inputs",
            s(&inputs),
            "--output",
            s(&out),
        ]);
        assert!(
            o.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let got = load_all(&out).unwrap();
        let want = load_all(&inputs).unwrap();
        let e = rel(&got["out"], &want["out"]);
        assert!(e <= 1e-5, "{dir}: rel err {e:.3e}");
    }
}

#[test]
fn compare_reports_json() {
    let a = tmp("cmp-a.png");
    let o = cli(&[
        "generate",
        "--prompt",
        "a fox",
        "--steps",
        "2",
        "--output",
        s(&a),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cli(&["compare", s(&a), s(&a), "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["psnr"], "inf");
    assert_eq!(v["ssim"].as_f64(), Some(1.0));
}

#[test]
fn user_errors_exit_nonzero_with_a_message_and_no_output() {
    let out = tmp("never.png");
    let bad_noise = data("refs-tiny-sdxl/pipeline_ddim.safetensors");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", "/no/such/model"], "--model"),
        (vec!["--height", "60"], "--height"),
        (vec!["--width", "0"], "--width"),
        (vec!["--steps", "0"], "--steps"),
        (vec!["--warmup-steps", "9"], "--warmup-steps"),
        (vec!["--portion=-1"], "--portion"),
        (vec!["--portion", "abc"], "--portion"),
        (
            vec![
                "--init-noise",
                s(&bad_noise),
                "--height",
                "64",
                "--width",
                "64",
            ],
            "--init-noise",
        ),
        (
            vec!["--init-noise", "/no/such/noise.safetensors"],
            "--init-noise",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "generate",
            "--prompt",
            "a fox",
            "--steps",
            "2",
            "--output",
            s(&out),
        ];
        args.extend(extra.iter().copied());
        let o = cli(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(
            err.contains(needle),
            "{extra:?}: message does not name {needle}: {err}"
        );
        assert!(!err.contains("panicked"), "{extra:?} panicked: {err}");
        assert!(!out.exists(), "{extra:?} left an output file");
    }
    let o = cli(&["generate", "--prompt", "  ", "--output", s(&out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--prompt is empty"),
        "{err}"
    );
    let bad = std::ffi::OsStr::from_bytes(b"\xff\xfe fox");
    let o = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args(["generate", "--output", s(&out), "--prompt"])
        .arg(bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--prompt") && err.contains("UTF-8"),
        "{err}"
    );
    let o = cli(&[
        "generate",
        "--prompt",
        "a fox",
        "--output",
        "/no/such/dir/x.png",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--output"));
}
