//! `generate --controlnet` through the binary against diffusers'
//! `StableDiffusionXLControlNetPipeline` on the tiny model (tests/data/controlnet, written by
//! scripts/regen_controlnet_reference.py): final latents from the stored noise within 1e-4 of
//! diffusers' for a scale-0.6 run with a 0.2–0.8 window and for two nets with their own scales and
//! windows; the PNG records the nets; two synchronous ranks equal one; bad flags name the flag.

mod common;

use pcpp_kernels::io::load_all;

use common::{cli, rel, repo, s, tmp};

fn cn_run(tag: &str, extra: &[&str]) -> (pcpp_kernels::Tensor, std::path::PathBuf) {
    let data = repo().join("tests/data/controlnet");
    let lat = tmp(&format!("{tag}.safetensors"));
    let png = tmp(&format!("{tag}.png"));
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
        "64",
        "--width",
        "64",
        "--init-noise",
        s(&refs),
        "--save-latents",
        s(&lat),
        "--output",
        s(&png),
    ];
    args.extend_from_slice(extra);
    let o = cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (load_all(&lat).unwrap().remove("latents").unwrap(), png)
}

fn fixture(name: &str) -> String {
    repo()
        .join("tests/data/controlnet")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn controlnets_through_generate_match_diffusers() {
    let refs = load_all(repo().join("tests/data/controlnet/refs.safetensors")).unwrap();
    let (net, net_b, img) = (
        fixture("controlnet"),
        fixture("controlnet_b"),
        fixture("control.png"),
    );
    let (got, png) = cn_run(
        "cn-window",
        &[
            "--controlnet",
            &net,
            "--control-image",
            &img,
            "--control-scale",
            "0.6",
            "--control-start",
            "0.2",
            "--control-end",
            "0.8",
        ],
    );
    let e = rel(&got, &refs["window.final_latents"]);
    assert!(e <= 1e-4, "window run: rel err {e:.3e}");
    let text = String::from_utf8_lossy(&std::fs::read(&png).unwrap()).into_owned();
    assert!(
        text.contains("ControlNet: ") && text.contains("scale 0.6, start 0.2, end 0.8"),
        "PNG parameters name the ControlNet"
    );
    let (got, _) = cn_run(
        "cn-multi",
        &[
            "--controlnet",
            &net,
            "--controlnet",
            &net_b,
            "--control-image",
            &img,
            "--control-scale",
            "0.8",
            "--control-scale",
            "0.5",
            "--control-end",
            "1",
            "--control-end",
            "0.5",
        ],
    );
    let e = rel(&got, &refs["multi.final_latents"]);
    assert!(e <= 1e-4, "two nets: rel err {e:.3e}");
}

#[test]
fn controlnet_over_two_synchronous_ranks_equals_one_rank() {
    let (net, img) = (fixture("controlnet"), fixture("control.png"));
    let flags = ["--controlnet", &net, "--control-image", &img];
    let (one, _) = cn_run("cn-r1", &flags);
    let mut two_flags = flags.to_vec();
    two_flags.extend_from_slice(&["--ranks", "2", "--warmup-steps", "4", "--no-cfg-split"]);
    let (two, _) = cn_run("cn-r2", &two_flags);
    let e = rel(&two, &one);
    assert!(e <= 1e-5, "2 ranks vs 1 with a ControlNet: rel err {e:.3e}");
}

#[test]
fn bad_controlnet_flags_name_the_flag() {
    let out = tmp("never-cn.png");
    let (net, img) = (fixture("controlnet"), fixture("control.png"));
    let bad_png = tmp("not-an-image.png");
    std::fs::write(&bad_png, b"not a png").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--control-image", &img],
            "--control-image needs --controlnet",
        ),
        (
            vec!["--control-scale", "0.5"],
            "--control-scale needs --controlnet",
        ),
        (
            vec![
                "--controlnet",
                "/no/such/controlnet",
                "--control-image",
                &img,
            ],
            "/no/such/controlnet",
        ),
        (
            vec!["--controlnet", &net],
            "--controlnet needs --control-image",
        ),
        (
            vec!["--controlnet", &net, "--control-image", s(&bad_png)],
            "not-an-image.png",
        ),
        (
            vec![
                "--controlnet",
                &net,
                "--control-image",
                &img,
                "--control-scale",
                "1",
                "--control-scale",
                "2",
            ],
            "--control-scale is given 2 times",
        ),
        (
            vec![
                "--controlnet",
                &net,
                "--control-image",
                &img,
                "--control-start",
                "0.9",
                "--control-end",
                "0.5",
            ],
            "0 ≤ start < end ≤ 1",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "generate",
            "--prompt",
            "a fox",
            "--steps",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "--output",
            s(&out),
        ];
        args.extend_from_slice(&extra);
        let o = cli(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?}: succeeded");
        assert!(
            err.contains(needle),
            "{extra:?}: message lacks `{needle}`: {err}"
        );
        assert!(!out.exists());
    }
}
