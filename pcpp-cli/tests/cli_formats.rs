//! The built `pcpp-cli` binary with the newer samplers and image-to-image: `generate
//! --scheduler dpmpp-2m-karras` from stored noise against diffusers, `--init-image` with
//! `--strength` and the micro-conditioning flags against diffusers' img2img pipeline, Euler
//! ancestral reproducible from the seed and identical over 2 ranks (CFG split, no stale context),
//! `convert` to a single file and back with `generate --model FILE` giving the identical image,
//! and the new flags' user errors.

mod common;

use std::path::{Path, PathBuf};

use pcpp_kernels::io::load_all;

use common::{cli, data, rel, repo, s, tmp};

/// Writes the reference init image (`vae_encode.safetensors` `image_u8`) as a PNG.
fn init_png() -> PathBuf {
    let r = load_all(data("samplers/vae_encode.safetensors")).unwrap();
    let t = &r["image_u8"];
    let (h, w) = (t.shape()[0] as u32, t.shape()[1] as u32);
    let bytes: Vec<u8> = t.to_vec_f32().unwrap().iter().map(|&x| x as u8).collect();
    let p = tmp("init.png");
    image::RgbImage::from_raw(w, h, bytes)
        .unwrap()
        .save(&p)
        .unwrap();
    p
}

/// Runs `generate` with `args` from the stored noise of `refs`, checks its final latents against
/// diffusers' (relative error ≤ 1e-4) and returns the written image.
fn generate_matching(refs: &Path, tag: &str, args: &[&str]) -> PathBuf {
    let (out, lat) = (
        tmp(&format!("{tag}.png")),
        tmp(&format!("{tag}.safetensors")),
    );
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    all.extend_from_slice(&[
        "--init-noise",
        s(refs),
        "--save-latents",
        s(&lat),
        "--output",
        s(&out),
    ]);
    let o = cli(&all);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = rel(
        &load_all(&lat).unwrap()["latents"],
        &load_all(refs).unwrap()["final_latents"],
    );
    assert!(e <= 1e-4, "{tag}: latents rel err {e:.3e}");
    out
}

#[test]
fn dpmpp_2m_karras_from_stored_noise_matches_diffusers() {
    let refs = data("samplers/pipeline_dpmpp_2m_karras.safetensors");
    let out = generate_matching(
        &refs,
        "karras",
        &[
            "--prompt",
            "a photo of an astronaut riding a horse on mars, 4k, highly detailed, trending on artstation, 8K UHD!!",
            "--negative-prompt",
            "blurry, low quality",
            "--guidance",
            "7",
            "--steps",
            "5",
            "--height",
            "32",
            "--width",
            "48",
            "--scheduler",
            "dpmpp-2m-karras",
        ],
    );
    let text = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
    assert!(
        text.contains("Sampler: DPM++ 2M Karras"),
        "parameters chunk"
    );
}

#[test]
fn img2img_with_micro_conditioning_matches_diffusers() {
    let refs = data("samplers/img2img_euler.safetensors");
    let init = init_png();
    let out = generate_matching(
        &refs,
        "img2img",
        &[
            "--prompt",
            "A painting of a squirrel eating a burger",
            "--guidance",
            "5",
            "--steps",
            "5",
            "--scheduler",
            "euler",
            "--init-image",
            s(&init),
            "--strength",
            "0.6",
            "--original-size",
            "64,48",
            "--crops-coords-top-left",
            "4,8",
            "--target-size",
            "32,48",
        ],
    );
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (48, 32));
}

#[test]
fn euler_ancestral_is_reproducible_and_rank_independent() {
    let run = |name: &str, seed: &str, ranks: &str| {
        let lat = tmp(name);
        let o = cli(&[
            "generate",
            "--prompt",
            "a fox",
            "--steps",
            "3",
            "--height",
            "32",
            "--width",
            "32",
            "--scheduler",
            "euler-a",
            "--seed",
            seed,
            "--ranks",
            ranks,
            "--parallel",
            "serial",
            "--save-latents",
            s(&lat),
            "--output",
            s(&tmp(&format!("{name}.png"))),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        load_all(&lat).unwrap().remove("latents").unwrap()
    };
    let a = run("ea1.safetensors", "9", "1");
    let b = run("ea2.safetensors", "9", "1");
    let c = run("ea3.safetensors", "10", "1");
    let d = run("ea4.safetensors", "9", "2");
    assert_eq!(a.max_abs_diff(&b).unwrap(), 0.0, "same seed, same latents");
    assert!(a.max_abs_diff(&c).unwrap() > 1e-3, "another seed differs");
    let e = rel(&d, &a);
    assert!(e <= 1e-5, "2 ranks (CFG split) vs 1: rel err {e:.3e}");
}

#[test]
fn img2img_user_errors_name_the_flag() {
    let init = init_png();
    let out = tmp("never.png");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--strength", "0.5"], "--strength"),
        (
            vec!["--init-image", s(&init), "--strength", "0"],
            "--strength",
        ),
        (
            vec!["--init-image", s(&init), "--strength", "1.5"],
            "--strength",
        ),
        (
            vec!["--init-image", s(&init), "--strength", "0.1"],
            "--strength",
        ),
        (vec!["--init-image", s(&init), "--height", "64"], "--height"),
        (vec!["--init-image", "/no/such/image.png"], "--init-image"),
        (vec!["--original-size", "64"], "--original-size"),
        (
            vec!["--crops-coords-top-left", "a,b"],
            "--crops-coords-top-left",
        ),
        (vec!["--target-size", "1,2,3"], "--target-size"),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "generate",
            "--prompt",
            "a fox",
            "--steps",
            "4",
            "--output",
            s(&out),
        ];
        args.extend(extra.iter().copied());
        let o = cli(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.contains(needle), "{extra:?}: no {needle} in: {err}");
        assert!(!err.contains("panicked"), "{extra:?} panicked: {err}");
        assert!(!out.exists(), "{extra:?} left an output file");
    }
}

fn latents_of(model: &str, name: &str) -> pcpp_kernels::Tensor {
    let lat = tmp(name);
    let o = cli(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "a fox",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--save-latents",
        s(&lat),
        "--output",
        s(&tmp(&format!("{name}.png"))),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    load_all(&lat).unwrap().remove("latents").unwrap()
}

#[test]
fn convert_round_trip_and_single_file_model_give_the_identical_image() {
    let tiny = repo().join("models/tiny-sdxl");
    let file = tmp("tiny-single.safetensors");
    let o = cli(&[
        "convert",
        "--model",
        s(&tiny),
        "--to",
        "single-file",
        "--output",
        s(&file),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = tmp("tiny-back");
    let o = cli(&[
        "convert",
        "--model",
        s(&file),
        "--to",
        "diffusers",
        "--output",
        s(&back),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = latents_of(s(&tiny), "conv-a.safetensors");
    let b = latents_of(s(&file), "conv-b.safetensors");
    let c = latents_of(s(&back), "conv-c.safetensors");
    assert_eq!(a.max_abs_diff(&b).unwrap(), 0.0, "--model FILE differs");
    assert_eq!(a.max_abs_diff(&c).unwrap(), 0.0, "converted folder differs");
    let (cache, done) = pcpp_sdxl::checkpoint::cache_dir_for(&file).unwrap();
    assert!(
        done,
        "generate --model FILE unpacked into {}",
        cache.display()
    );
    std::fs::remove_dir_all(cache).unwrap();
    std::fs::remove_dir_all(&back).unwrap();
    // an existing output is refused
    let o = cli(&[
        "convert",
        "--model",
        s(&tiny),
        "--to",
        "single-file",
        "--output",
        s(&file),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn unsupported_checkpoint_files_are_refused_by_name() {
    let comp = data("unet-sd15/unet/diffusion_pytorch_model.safetensors");
    let out = tmp("never2.png");
    let o = cli(&[
        "generate",
        "--model",
        s(&comp),
        "--prompt",
        "a fox",
        "--output",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--model") && err.contains("diffusers component file"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let junk = tmp("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    let o = cli(&[
        "generate",
        "--model",
        s(&junk),
        "--prompt",
        "a fox",
        "--output",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("junk.safetensors"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn img2img_over_four_ranks_with_full_warmup_equals_one_rank() {
    let init = init_png();
    let run = |name: &str, ranks: &str| {
        let lat = tmp(name);
        let o = cli(&[
            "generate",
            "--prompt",
            "a fox",
            "--steps",
            "6",
            "--strength",
            "0.5",
            "--init-image",
            s(&init),
            "--scheduler",
            "dpmpp-2m",
            "--ranks",
            ranks,
            "--parallel",
            "pcpp",
            "--warmup-steps",
            "3",
            "--save-latents",
            s(&lat),
            "--output",
            s(&tmp(&format!("{name}.png"))),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        load_all(&lat).unwrap().remove("latents").unwrap()
    };
    // 3 of the 6 steps run; the warm-up covers all of them, so no stale context is used
    let (a, b) = (run("i2i-1.safetensors", "1"), run("i2i-4.safetensors", "4"));
    let e = rel(&b, &a);
    assert!(e <= 1e-5, "4 ranks vs 1: rel err {e:.3e}");
}

#[test]
fn an_init_image_off_the_size_grid_is_resized_like_diffusers() {
    // 70×53 pixels: diffusers' VaeImageProcessor rounds each side down to a multiple of 8
    // (Lanczos resize), giving a 64×48 output.
    let src = image::open(init_png()).unwrap().to_rgb8();
    let odd = image::imageops::resize(&src, 70, 53, image::imageops::FilterType::Triangle);
    let init = tmp("odd-init.png");
    odd.save(&init).unwrap();
    let out = tmp("odd-out.png");
    let o = cli(&[
        "generate",
        "--prompt",
        "a fox",
        "--steps",
        "4",
        "--init-image",
        s(&init),
        "--strength",
        "0.5",
        "--output",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 48), "{err}");
    assert!(
        !err.contains("--height"),
        "names a flag the user never gave: {err}"
    );
}
