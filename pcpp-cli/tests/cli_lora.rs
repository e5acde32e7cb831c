//! `generate --lora` through the binary against diffusers' `load_lora_weights` + `fuse_lora` on the
//! tiny model (tests/data/lora, written by scripts/regen_lora_reference.py): final latents from the
//! stored noise within 1e-4 of diffusers' for the kohya and the PEFT file at two scales; two ranks
//! with every step synchronous equal one rank; a bad `--lora` value names the flag.

mod common;

use pcpp_kernels::io::load_all;

use common::{cli, rel, repo, s, tmp};

fn lora_run(tag: &str, lora: &str, extra: &[&str]) -> pcpp_kernels::Tensor {
    let data = repo().join("tests/data/lora");
    let lat = tmp(&format!("{tag}.safetensors"));
    let adapter = format!("{}{lora}", data.display());
    let refs = data.join("refs.safetensors");
    let mut args = vec![
        "generate",
        "--prompt",
        "A painting of a squirrel eating a burger",
        "--negative-prompt",
        "blurry, low quality",
        "--guidance",
        "5",
        "--steps",
        "4",
        "--height",
        "32",
        "--width",
        "32",
        "--init-noise",
        s(&refs),
        "--lora",
        &adapter,
        "--save-latents",
        s(&lat),
        "--output",
    ];
    let png = tmp(&format!("{tag}.png"));
    args.push(s(&png));
    args.extend_from_slice(extra);
    let o = cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    load_all(&lat).unwrap().remove("latents").unwrap()
}

#[test]
fn lora_files_through_generate_match_diffusers() {
    let refs = load_all(repo().join("tests/data/lora/refs.safetensors")).unwrap();
    for (file, key, scale) in [
        ("kohya", "kohya", "0.7"),
        ("kohya", "kohya", "1.0"),
        ("peft", "peft", "0.7"),
    ] {
        let got = lora_run(
            &format!("lora-{file}-{scale}"),
            &format!("/{file}.safetensors:{scale}"),
            &[],
        );
        let want = &refs[&format!("{key}.s{scale}.final_latents")];
        let e = rel(&got, want);
        assert!(e <= 1e-4, "{file} at {scale}: rel err {e:.3e}");
        let base = rel(&got, &refs["base.final_latents"]);
        assert!(
            base > 1e-2,
            "{file} at {scale} changed nothing ({base:.3e})"
        );
    }
}

#[test]
fn lora_over_two_synchronous_ranks_equals_one_rank() {
    let one = lora_run("lora-r1", "/kohya.safetensors:0.7", &[]);
    let two = lora_run(
        "lora-r2",
        "/kohya.safetensors:0.7",
        &["--ranks", "2", "--warmup-steps", "4"],
    );
    let e = rel(&two, &one);
    assert!(e <= 1e-5, "2 ranks vs 1 with LoRA: rel err {e:.3e}");
}

#[test]
fn bad_lora_values_name_the_flag() {
    let out = tmp("never-lora.png");
    for (v, needle) in [
        ("/no/such/adapter.safetensors", "adapter.safetensors"),
        ("x.safetensors:abc", "--lora"),
    ] {
        let o = cli(&[
            "generate",
            "--prompt",
            "a fox",
            "--steps",
            "1",
            "--lora",
            v,
            "--output",
            s(&out),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{v}: succeeded");
        assert!(err.contains(needle), "{v}: message lacks {needle}: {err}");
        assert!(!out.exists());
    }
}
