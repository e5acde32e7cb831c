//! `pcpp-cli generate` on the tiny Flux.1 pipelines (the folder's `model_index.json` picks the
//! family): FLUX.1-dev layout with `--guidance` and a non-square size, and FLUX.1-schnell (guidance
//! ignored with a note), each from diffusers' stored initial noise, with the final latents
//! (`--save-latents`, unpacked, before the VAE's scale/shift) against diffusers'; prompt lists
//! (`--prompts`) equal single runs and resume; and the flags that do not apply to Flux (or apply
//! only to Flux) are errors naming them.

mod common;

use std::path::PathBuf;

use pcpp_kernels::io::{load_all, save};

use common::{cli, data, latents, rel, repo, s, tmp};

fn model(v: &str) -> PathBuf {
    repo().join(format!("models/tiny-flux-{v}"))
}

fn meta_run(key: &str) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("refs-tiny-flux/meta.json")).unwrap())
            .unwrap();
    m["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .unwrap()
        .clone()
}

/// Writes the reference run's noise as `initial_noise` and runs `generate` for it.
fn run_ref(key: &str, extra: &[&str]) -> (std::process::Output, PathBuf, pcpp_kernels::Tensor) {
    let run = meta_run(key);
    let r = load_all(data(&format!("refs-tiny-flux/pipeline_{key}.safetensors"))).unwrap();
    let noise = tmp(&format!("{key}-noise.safetensors"));
    save(&noise, &[("initial_noise", &r["init_noise"])], None).unwrap();
    let (lat, png) = (
        tmp(&format!("{key}-lat.safetensors")),
        tmp(&format!("{key}.png")),
    );
    let model = model(run["variant"].as_str().unwrap());
    let mut args: Vec<String> = vec!["generate".into(), "--model".into(), s(&model).into()];
    for (flag, value) in [
        ("--prompt", run["prompt"].as_str().unwrap().to_string()),
        ("--height", run["height"].to_string()),
        ("--width", run["width"].to_string()),
        ("--steps", run["steps"].to_string()),
        (
            "--max-sequence-length",
            run["max_sequence_length"].to_string(),
        ),
        ("--init-noise", s(&noise).into()),
        ("--save-latents", s(&lat).into()),
        ("--output", s(&png).into()),
    ] {
        args.extend([flag.to_string(), value]);
    }
    args.extend(extra.iter().map(|x| x.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = cli(&args);
    (o, lat, r["latents"].clone())
}

#[test]
fn flux_dev_generate_matches_diffusers() {
    let (o, lat, want) = run_ref("dev_wide", &["--guidance", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = rel(&latents(&lat), &want);
    assert!(e <= 1e-4, "latents: {e:.3e}");
    let img = image::open(tmp("dev_wide.png")).unwrap();
    assert_eq!((img.width(), img.height()), (48, 32));
    // the default guidance (3.5) is not 4: a different image
    let (o, lat, want) = run_ref("dev_wide", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(rel(&latents(&lat), &want) > 1e-3);
}

#[test]
fn flux_schnell_ignores_guidance_with_a_note() {
    let (o, lat, want) = run_ref("schnell_square", &["--guidance", "7"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("--guidance 7 ignored"), "{err}");
    let e = rel(&latents(&lat), &want);
    assert!(e <= 1e-4, "latents: {e:.3e}");
}

#[test]
fn flags_that_do_not_apply_are_errors() {
    let png = tmp("x.png");
    let dev = model("dev");
    let base = [
        "generate",
        "--model",
        s(&dev),
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--output",
        s(&png),
    ];
    for (extra, needle) in [
        (vec!["--negative-prompt", "dog"], "--negative-prompt"),
        (vec!["--gn-mode", "sync"], "--gn-mode"),
        (
            vec!["--ranks", "2", "--parallel", "tensor"],
            "--parallel tensor",
        ),
        (vec!["--scheduler", "ddim"], "--scheduler"),
        (vec!["--control-scale", "0.5"], "--controlnet"),
        (vec!["--height", "30"], "multiples of 4"),
        (
            vec!["--max-sequence-length", "600"],
            "--max-sequence-length 600",
        ),
    ] {
        let mut a = base.to_vec();
        a.extend(extra.iter().copied());
        let o = cli(&a);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(needle), "{extra:?}: {e}");
    }
    // a wrong noise shape names the expected unpacked shape
    let noise = tmp("bad-noise.safetensors");
    let t = pcpp_kernels::Tensor::from_vec(&[1, 4, 8, 8], vec![0.0; 256]).unwrap();
    save(&noise, &[("initial_noise", &t)], None).unwrap();
    let mut a = base.to_vec();
    a.extend(["--height", "32", "--width", "32", "--init-noise", s(&noise)]);
    let o = cli(&a);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("[1, 16, 16, 16]"), "{e}");
    // a Flux-only flag with an SDXL model
    let sdxl = repo().join("models/tiny-sdxl");
    let o = cli(&[
        "generate",
        "--model",
        s(&sdxl),
        "--prompt",
        "a",
        "--steps",
        "1",
        "--output",
        s(&png),
        "--max-sequence-length",
        "64",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("--max-sequence-length"),
        "{e}"
    );
}

/// The RGB pixels of a PNG (the metadata names the ranks, so files of equal images may differ).
fn pixels(p: &std::path::Path) -> Vec<u8> {
    image::open(p).unwrap().to_rgb8().into_raw()
}

/// `--prompts FILE --output-dir DIR` on a Flux folder: one image per non-empty line, line `i` with
/// seed `--seed + i` (the very image of a single run with that seed), the models loaded once; a
/// second run skips what exists; three synchronous ranks give the same pixels; single-file flags
/// are refused by name.
#[test]
fn flux_prompt_lists_match_single_images_and_resume() {
    let prompts = tmp("flux-prompts.txt");
    std::fs::write(&prompts, "a red cube on a table\n\na blue sphere\n").unwrap();
    let dev = model("dev");
    let common = [
        "--model",
        s(&dev),
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "3",
        "--seed",
        "5",
    ];
    let batch = |dir: &std::path::Path, extra: &[&str]| {
        let mut a = vec!["generate", "--prompts", s(&prompts), "--output-dir", s(dir)];
        a.extend_from_slice(&common);
        a.extend_from_slice(extra);
        cli(&a)
    };
    let dir = tmp("flux-batch");
    let o = batch(&dir, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("2 images written, 0 already present"), "{e}");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["00000.png", "00002.png"]);

    let single = tmp("flux-single-line2.png");
    let mut a = vec![
        "generate",
        "--prompt",
        "a blue sphere",
        "--output",
        s(&single),
    ];
    a.extend_from_slice(&common[..8]);
    a.extend(["--seed", "7"]);
    let o = cli(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(pixels(&single), pixels(&dir.join("00002.png")));
    assert_ne!(
        pixels(&dir.join("00000.png")),
        pixels(&dir.join("00002.png"))
    );

    let o = batch(&dir, &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && e.contains("0 images written, 2 already present"),
        "{e}"
    );

    let ranks = tmp("flux-batch-3");
    let o = batch(&ranks, &["--ranks", "3", "--sync-mode", "full"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for n in ["00000.png", "00002.png"] {
        assert_eq!(pixels(&ranks.join(n)), pixels(&dir.join(n)), "{n}");
    }

    let o = batch(&tmp("flux-batch-x"), &["--save-latents", "x.safetensors"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--save-latents"), "{e}");
}
