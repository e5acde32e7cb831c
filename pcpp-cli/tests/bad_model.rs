//! Broken model folders through the built binary: truncated or corrupt safetensors, a missing,
//! mis-shaped or wrongly typed tensor, configs that are not JSON, lack keys or ask for absurd
//! sizes, missing components. Each case must exit ≠ 0 with one message naming the file (and the
//! tensor or key), no panic, and no output file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-sdxl")
}

/// A copy of the tiny model in which every component is a symbolic link except `broken`, which is
/// copied so the case can damage it.
fn model_with(case: &str, broken: &str) -> PathBuf {
    let root = std::env::temp_dir()
        .join(format!("pcpp-bad-model-{}", std::process::id()))
        .join(case);
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    for e in fs::read_dir(tiny()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let dst = root.join(&name);
        if name == broken {
            if e.path().is_dir() {
                fs::create_dir_all(&dst).unwrap();
                for f in fs::read_dir(e.path()).unwrap() {
                    let f = f.unwrap();
                    fs::copy(f.path(), dst.join(f.file_name())).unwrap();
                }
            } else {
                fs::copy(e.path(), &dst).unwrap();
            }
        } else {
            std::os::unix::fs::symlink(e.path().canonicalize().unwrap(), &dst).unwrap();
        }
    }
    root
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrites the JSON header of a safetensors file (data left as is).
fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let b = fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&b[8..8 + n]).unwrap();
    f(&mut h);
    let hb = serde_json::to_vec(&h).unwrap();
    let mut out = (hb.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hb);
    out.extend_from_slice(&b[8 + n..]);
    fs::write(path, out).unwrap();
}

fn key_ending(h: &serde_json::Map<String, serde_json::Value>, suffix: &str) -> String {
    h.keys().find(|k| k.ends_with(suffix)).unwrap().clone()
}

const UNET_W: &str = "unet/diffusion_pytorch_model.safetensors";

#[test]
fn broken_models_fail_cleanly() {
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, &str, Damage, &[&str])> = vec![
        (
            "truncated",
            "unet",
            Box::new(|m| {
                let f = m.join(UNET_W);
                let len = fs::metadata(&f).unwrap().len();
                fs::OpenOptions::new()
                    .write(true)
                    .open(&f)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            }),
            &["diffusion_pytorch_model.safetensors"],
        ),
        (
            "garbage",
            "vae",
            Box::new(|m| {
                let data: Vec<u8> = (0..1000u32)
                    .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                    .collect();
                fs::write(m.join("vae/diffusion_pytorch_model.safetensors"), data).unwrap();
            }),
            &["vae/diffusion_pytorch_model.safetensors"],
        ),
        (
            "missing-tensor",
            "unet",
            Box::new(|m| {
                edit_header(&m.join(UNET_W), |h| {
                    let k = key_ending(h, "conv_out.bias");
                    h.remove(&k);
                });
            }),
            &["diffusion_pytorch_model.safetensors"],
        ),
        (
            "wrong-shape",
            "unet",
            Box::new(|m| {
                edit_header(&m.join(UNET_W), |h| {
                    let k = key_ending(h, "conv_in.bias");
                    let n = h[&k]["shape"][0].as_u64().unwrap();
                    h.get_mut(&k).unwrap()["shape"] = serde_json::json!([1, n]);
                });
            }),
            &["conv_in.bias"],
        ),
        (
            "wrong-dtype",
            "unet",
            Box::new(|m| {
                edit_header(&m.join(UNET_W), |h| {
                    let k = key_ending(h, "conv_in.bias");
                    h.get_mut(&k).unwrap()["dtype"] = serde_json::json!("I8");
                });
            }),
            &["diffusion_pytorch_model.safetensors"],
        ),
        (
            "not-json",
            "unet",
            Box::new(|m| fs::write(m.join("unet/config.json"), "{ not json").unwrap()),
            &["unet/config.json"],
        ),
        (
            "missing-key",
            "unet",
            Box::new(|m| {
                edit_json(&m.join("unet/config.json"), |v| {
                    v.as_object_mut().unwrap().remove("block_out_channels");
                })
            }),
            &["unet/config.json", "block_out_channels"],
        ),
        (
            "absurd-unet",
            "unet",
            Box::new(|m| {
                edit_json(&m.join("unet/config.json"), |v| {
                    v["block_out_channels"] = serde_json::json!([320_000_000u64, 64]);
                })
            }),
            &["unet/config.json", "block_out_channels"],
        ),
        (
            "absurd-vae",
            "vae",
            Box::new(|m| {
                edit_json(&m.join("vae/config.json"), |v| {
                    v["block_out_channels"] = serde_json::json!([1_000_000_000u64, 64]);
                })
            }),
            &["vae/config.json", "block_out_channels"],
        ),
        (
            "absurd-text-encoder",
            "text_encoder",
            Box::new(|m| {
                edit_json(&m.join("text_encoder/config.json"), |v| {
                    v["hidden_size"] = serde_json::json!(100_000_000u64);
                })
            }),
            &["text_encoder/config.json", "hidden_size"],
        ),
        (
            "no-model-index",
            "model_index.json",
            Box::new(|m| fs::remove_file(m.join("model_index.json")).unwrap()),
            &["model_index.json"],
        ),
        (
            "no-tokenizer",
            "tokenizer_2",
            Box::new(|m| fs::remove_dir_all(m.join("tokenizer_2")).unwrap()),
            &["tokenizer_2"],
        ),
        (
            "bad-scheduler",
            "scheduler",
            Box::new(|m| {
                edit_json(&m.join("scheduler/scheduler_config.json"), |v| {
                    v["beta_schedule"] = serde_json::json!("cubic");
                })
            }),
            &["scheduler_config.json", "beta_schedule"],
        ),
    ];
    let out = std::env::temp_dir().join(format!("pcpp-bad-model-out-{}.png", std::process::id()));
    for (name, broken, damage, needles) in cases {
        let m = model_with(name, broken);
        damage(&m);
        let o = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
            .args([
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                "a fox",
                "--steps",
                "1",
            ])
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: succeeded");
        assert!(!err.contains("panicked"), "{name}: panicked: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{name}: expected one message: {err}"
        );
        for n in needles {
            assert!(
                err.contains(n),
                "{name}: message does not name `{n}`: {err}"
            );
        }
        assert!(!out.exists(), "{name}: left an output file");
    }
}

/// Sets the first element of f32 tensor `name` of a safetensors file to NaN.
fn poison(path: &Path, name: &str) {
    let mut b = fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    assert_eq!(h[name]["dtype"], "F32", "{name}");
    let at = 8 + n + h[name]["data_offsets"][0].as_u64().unwrap() as usize;
    b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    fs::write(path, b).unwrap();
}

#[test]
fn non_finite_weights_are_caught_at_their_stage_with_no_output() {
    let cases: [(&str, &str, &str, &[&str]); 3] = [
        (
            "text_encoder",
            "text_encoder/model.safetensors",
            "embeddings.position_embedding.weight",
            &["non-finite", "prompt embeddings"],
        ),
        (
            "unet",
            UNET_W,
            "conv_in.weight",
            &["non-finite", "the latents", "after denoising step 1 of 3"],
        ),
        (
            "vae",
            "vae/diffusion_pytorch_model.safetensors",
            "decoder.conv_out.bias",
            &["non-finite", "decoded image"],
        ),
    ];
    let dir = std::env::temp_dir().join(format!("pcpp-nan-out-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let (out, lat) = (dir.join("nan.png"), dir.join("nan.safetensors"));
    for (component, file, tensor, needles) in cases {
        let m = model_with(&format!("nan-{component}"), component);
        poison(&m.join(file), tensor);
        let o = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
            .args(["generate", "--model", m.to_str().unwrap()])
            .args(["--prompt", "a fox", "--steps", "3"])
            .arg("--output")
            .arg(&out)
            .arg("--save-latents")
            .arg(&lat)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{component}: succeeded: {err}");
        assert!(!err.contains("panicked"), "{component}: panicked: {err}");
        for n in needles {
            assert!(err.contains(n), "{component}: message lacks `{n}`: {err}");
        }
        assert!(!out.exists(), "{component}: wrote an image");
        assert!(!lat.exists(), "{component}: wrote latents");
    }
}
