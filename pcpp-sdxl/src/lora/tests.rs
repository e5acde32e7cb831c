//! Unit tests of the LoRA reader and merge: key classification, α rules, the merge arithmetic
//! against a direct loop, dtype handling, and the errors.

use std::collections::HashMap;
use std::path::PathBuf;

use pcpp_kernels::{DType, Tensor};

use super::*;
use crate::weights::Weights;

fn tmp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcpp-lora-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(format!("{tag}.safetensors"))
}

/// Deterministic values in about ±1 for a tensor of `shape`, different per `seed`.
fn values(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|i| (((i + 3) * (seed + 5) * 7919 % 211) as f32 - 105.0) / 105.0)
        .collect();
    Tensor::from_vec(shape, v).expect("tensor")
}

fn write(tag: &str, tensors: &[(&str, Tensor)], meta: Option<&str>) -> PathBuf {
    let path = tmp(tag);
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (*k, t)).collect();
    let meta = meta.map(|m| {
        HashMap::from([
            ("lora_adapter_metadata".to_string(), m.to_string()),
            ("format".to_string(), "pt".to_string()),
        ])
    });
    pcpp_kernels::io::save(&path, &refs, meta).expect("write");
    path
}

fn load(path: &std::path::Path, scale: f32) -> Result<LoraSet> {
    LoraSet::load(&[LoraSpec {
        path: path.to_path_buf(),
        scale,
    }])
}

fn flat_of(name: &str) -> std::result::Result<(LoraComponent, Target, Part), String> {
    classify(name).map(|c| (c.component, c.target, c.part))
}

#[test]
fn lora_keys_are_classified() {
    use LoraComponent::*;
    let flat = |s: &str| Target::Flat(s.to_string());
    let dotted = |s: &str| Target::Dotted(s.to_string());
    assert_eq!(
        flat_of("lora_unet_input_blocks_4_1_proj_in.lora_down.weight"),
        Ok((Unet, flat("input_blocks_4_1_proj_in"), Part::Down))
    );
    assert_eq!(
        flat_of("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"),
        Ok((
            TextEncoder,
            flat("encoder_layers_0_self_attn_q_proj"),
            Part::Up
        ))
    );
    assert_eq!(
        flat_of("lora_te2_text_projection.alpha"),
        Ok((TextEncoder2, flat("text_projection"), Part::Alpha))
    );
    assert_eq!(
        flat_of("text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora_A.weight"),
        Ok((TextEncoder2, dotted("encoder.layers.3.mlp.fc1"), Part::Down))
    );
    assert_eq!(
        flat_of("text_encoder.encoder.layers.3.mlp.fc2.lora_B.weight"),
        Ok((TextEncoder, dotted("encoder.layers.3.mlp.fc2"), Part::Up))
    );
    assert_eq!(
        flat_of("unet.mid_block.attentions.0.proj_out.lora_B.weight"),
        Ok((Unet, dotted("mid_block.attentions.0.proj_out"), Part::Up))
    );
    let c = classify("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight").unwrap();
    assert_eq!(c.key, "text_encoder.text_model.encoder.layers.0.mlp.fc1");
    let c = classify("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap();
    assert_eq!(c.key, "lora_te1_text_model_encoder_layers_0_mlp_fc1");
}

#[test]
fn foreign_keys_are_refused_with_a_reason() {
    for (key, why) in [
        (
            "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha",
            "SD 1.x",
        ),
        ("lora_unet_input_blocks_4_1_proj_in.dora_scale", "DoRA"),
        ("lora_unet_input_blocks_4_1_proj_in.hada_w1_a", "LoHa"),
        (
            "lora_unet_input_blocks_1_0_in_layers_2.lora_mid.weight",
            "Tucker",
        ),
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector",
            "DoRA",
        ),
        (
            "transformer.single_blocks.0.linear1.lora_A.weight",
            "not an SDXL LoRA key",
        ),
        ("lora_unet_input_blocks_4_1_proj_in", "without"),
    ] {
        let e = classify(key)
            .err()
            .unwrap_or_else(|| panic!("{key} accepted"));
        assert!(e.contains(why), "{key}: {e}");
    }
}

#[test]
fn peft_alpha_comes_from_metadata_patterns_or_rank() {
    let meta: serde_json::Value = serde_json::json!({
        "unet.lora_alpha": 8.0,
        "unet.alpha_pattern": {"attentions.0.proj_in": 2.0, "down_blocks.1.attentions.0.proj_in": 3.0},
        "text_encoder.use_rslora": true,
        "text_encoder.lora_alpha": 4.0,
    });
    let p = std::path::Path::new("x.safetensors");
    let u = PeftAlpha::read(p, &meta, LoraComponent::Unet).unwrap();
    assert_eq!(
        u.alpha("down_blocks.1.attentions.0.proj_in", 4),
        (3.0, false)
    );
    assert_eq!(u.alpha("up_blocks.0.attentions.0.proj_in", 4), (2.0, false));
    // a pattern matches whole trailing module names only
    assert_eq!(
        u.alpha("up_blocks.0.attentions.10.proj_in", 4),
        (8.0, false)
    );
    let t = PeftAlpha::read(p, &meta, LoraComponent::TextEncoder).unwrap();
    assert_eq!(t.alpha("encoder.layers.0.mlp.fc1", 16), (4.0, true));
    let none = PeftAlpha::read(p, &serde_json::Value::Null, LoraComponent::TextEncoder2).unwrap();
    assert_eq!(none.alpha("encoder.layers.0.mlp.fc1", 16), (16.0, false));
    let dora = serde_json::json!({"unet.use_dora": true});
    assert!(PeftAlpha::read(p, &dora, LoraComponent::Unet).is_err());
}

#[test]
fn spec_parsing() {
    let s = LoraSpec::parse("C:\\loras\\x.safetensors:0.25").unwrap();
    assert_eq!(s.path, PathBuf::from("C:\\loras\\x.safetensors"));
    assert_eq!(s.scale, 0.25);
    let s = LoraSpec::parse("C:\\loras\\x.safetensors").unwrap();
    assert_eq!(
        (s.path.to_str().unwrap(), s.scale),
        ("C:\\loras\\x.safetensors", 1.0)
    );
    let s = LoraSpec::parse("x.safetensors: 1e-1 ").unwrap();
    assert_eq!(s.scale, 0.1);
    let e = LoraSpec::parse("x.SAFETENSORS:strong")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"strong\"") && e.contains("x.SAFETENSORS:strong"),
        "{e}"
    );
}

/// A base store with a linear `[3, 5]` and a conv `[3, 2, 3, 3]` weight, and a bias.
fn base_file(dtype: DType, test: &str) -> PathBuf {
    let path = tmp(&format!("base-{test}"));
    let lin = values(&[3, 5], 1).to_dtype(dtype).unwrap();
    let conv = values(&[3, 2, 3, 3], 2).to_dtype(dtype).unwrap();
    let bias = values(&[3], 3).to_dtype(dtype).unwrap();
    pcpp_kernels::io::save(
        &path,
        &[
            ("a.lin.weight", &lin),
            ("a.conv.weight", &conv),
            ("a.lin.bias", &bias),
        ],
        None,
    )
    .unwrap();
    path
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `w + factor · up @ down` by loops.
fn merged_by_hand(w: &Tensor, up: &Tensor, down: &Tensor, factor: f32) -> Vec<f32> {
    let (w, u, d) = (
        w.to_vec_f32().unwrap(),
        up.to_vec_f32().unwrap(),
        down.to_vec_f32().unwrap(),
    );
    let (out, r) = (up.shape()[0], up.shape()[1]);
    let rest = w.len() / out;
    let mut m = w.clone();
    for o in 0..out {
        for j in 0..rest {
            let s: f32 = (0..r).map(|k| u[o * r + k] * d[k * rest + j]).sum();
            m[o * rest + j] += factor * s;
        }
    }
    m
}

#[test]
fn linear_and_conv_adapters_merge_as_up_times_down() {
    let base = base_file(DType::F32, "merge");
    let (ld, lu) = (values(&[2, 5], 4), values(&[3, 2], 5));
    let (cd, cu) = (values(&[2, 2, 3, 3], 6), values(&[3, 2, 1, 1], 7));
    let lora = write(
        "merge",
        &[
            ("lora_unet_a_lin.lora_down.weight", ld.clone()),
            ("lora_unet_a_lin.lora_up.weight", lu.clone()),
            (
                "lora_unet_a_lin.alpha",
                Tensor::from_vec(&[], vec![3.0]).unwrap(),
            ),
            ("unet.a.conv.lora_A.weight", cd.clone()),
            ("unet.a.conv.lora_B.weight", cu.clone()),
        ],
        Some(r#"{"unet.lora_alpha": 1.0}"#),
    );
    let set = load(&lora, 0.5).unwrap();
    assert_eq!(set.count(LoraComponent::Unet), 2);
    let w = Weights::open(&base, DType::F32)
        .unwrap()
        .with_lora(set.for_component(LoraComponent::Unet));
    let plain = Weights::open(&base, DType::F32).unwrap();
    // kohya: alpha 3, rank 2; PEFT: metadata alpha 1, rank 2; scale 0.5
    for (name, shape, up, down, factor) in [
        ("a.lin.weight", &[3, 5][..], &lu, &ld, 0.5 * 3.0 / 2.0),
        (
            "a.conv.weight",
            &[3, 2, 3, 3][..],
            &cu,
            &cd,
            0.5 * 1.0 / 2.0,
        ),
    ] {
        let before = plain.get(name, shape).unwrap();
        let want = merged_by_hand(&before, up, down, factor);
        let got = w.get(name, shape).unwrap().to_vec_f32().unwrap();
        assert!(
            max_diff(&got, &want) < 1e-6,
            "{name}: off by {}",
            max_diff(&got, &want)
        );
        assert!(
            max_diff(&got, &before.to_vec_f32().unwrap()) > 0.1,
            "{name} changed"
        );
    }
    // biases are never targeted
    assert_eq!(
        w.get("a.lin.bias", &[3]).unwrap().to_vec_f32().unwrap(),
        plain.get("a.lin.bias", &[3]).unwrap().to_vec_f32().unwrap()
    );
    w.check_all_used().unwrap();
}

#[test]
fn half_precision_stores_merge_in_f32_and_round_once() {
    let base = base_file(DType::F16, "f16");
    let (ld, lu) = (values(&[1, 5], 8), values(&[3, 1], 9));
    let lora = write(
        "merge-f16",
        &[
            ("unet.a.lin.lora_A.weight", ld.to_dtype(DType::F16).unwrap()),
            (
                "unet.a.lin.lora_B.weight",
                lu.to_dtype(DType::BF16).unwrap(),
            ),
        ],
        None,
    );
    let set = load(&lora, 1.0).unwrap();
    let store = |dtype| {
        Weights::open(&base, dtype)
            .unwrap()
            .with_lora(set.for_component(LoraComponent::Unet))
    };
    let got = store(DType::F16).get("a.lin.weight", &[3, 5]).unwrap();
    assert_eq!(got.dtype(), DType::F16);
    // the f32 merge of the f16 weight, rounded once
    let merged32 = store(DType::F32).get("a.lin.weight", &[3, 5]).unwrap();
    assert_eq!(
        got.to_bytes().unwrap(),
        merged32.to_dtype(DType::F16).unwrap().to_bytes().unwrap()
    );
    let plain = Weights::open(&base, DType::F32).unwrap();
    let f32_of = |t: Tensor, d: DType| t.to_dtype(d).unwrap().to_dtype(DType::F32).unwrap();
    let want = merged_by_hand(
        &plain.get("a.lin.weight", &[3, 5]).unwrap(),
        &f32_of(lu, DType::BF16),
        &f32_of(ld, DType::F16),
        1.0,
    );
    assert!(max_diff(&merged32.to_vec_f32().unwrap(), &want) < 1e-6);
}

#[test]
fn kept_stores_merge_once() {
    let base = base_file(DType::F32, "kept");
    let lora = write(
        "kept",
        &[
            ("unet.a.lin.lora_A.weight", values(&[2, 5], 10)),
            ("unet.a.lin.lora_B.weight", values(&[3, 2], 11)),
        ],
        None,
    );
    let set = load(&lora, 1.0).unwrap();
    let w = Weights::open(&base, DType::F32)
        .unwrap()
        .keep_taken()
        .with_lora(set.for_component(LoraComponent::Unet));
    let a = w
        .get("a.lin.weight", &[3, 5])
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let b = w
        .get("a.lin.weight", &[3, 5])
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn broken_pairs_are_errors_naming_key_and_file() {
    let lora = write(
        "no-up",
        &[("lora_unet_a_lin.lora_down.weight", values(&[2, 5], 1))],
        None,
    );
    let e = load(&lora, 1.0).err().unwrap().to_string();
    assert!(
        e.contains("lora_unet_a_lin") && e.contains("no-up.safetensors") && e.contains("up"),
        "{e}"
    );
    let lora = write(
        "rank-mismatch",
        &[
            ("unet.a.lin.lora_A.weight", values(&[2, 5], 1)),
            ("unet.a.lin.lora_B.weight", values(&[3, 4], 1)),
        ],
        None,
    );
    let e = load(&lora, 1.0).err().unwrap().to_string();
    assert!(
        e.contains("unet.a.lin") && e.contains("not a LoRA pair"),
        "{e}"
    );
    let lora = write(
        "bad-alpha",
        &[
            ("lora_unet_a_lin.lora_down.weight", values(&[2, 5], 1)),
            ("lora_unet_a_lin.lora_up.weight", values(&[3, 2], 1)),
            ("lora_unet_a_lin.alpha", values(&[2], 1)),
        ],
        None,
    );
    let e = load(&lora, 1.0).err().unwrap().to_string();
    assert!(e.contains("lora_unet_a_lin.alpha"), "{e}");
}

#[test]
fn conv_kernel_mismatch_is_a_shape_error() {
    let base = base_file(DType::F32, "kernel");
    let lora = write(
        "kernel",
        &[
            ("unet.a.conv.lora_A.weight", values(&[2, 6, 1, 1], 1)),
            ("unet.a.conv.lora_B.weight", values(&[3, 2, 1, 1], 1)),
        ],
        None,
    );
    let set = load(&lora, 1.0).unwrap();
    let w = Weights::open(&base, DType::F32)
        .unwrap()
        .with_lora(set.for_component(LoraComponent::Unet));
    let e = w
        .get("a.conv.weight", &[3, 2, 3, 3])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("unet.a.conv.lora_A.weight") && e.contains("a.conv.weight"),
        "{e}"
    );
}

#[test]
fn sgm_names_need_the_unet_layout() {
    let base = base_file(DType::F32, "sgm");
    let lora = write(
        "sgm",
        &[
            (
                "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",
                values(&[2, 2, 3, 3], 1),
            ),
            (
                "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight",
                values(&[3, 2, 1, 1], 1),
            ),
        ],
        None,
    );
    let set = load(&lora, 1.0).unwrap();
    let w = Weights::open(&base, DType::F32)
        .unwrap()
        .with_lora(set.for_component(LoraComponent::Unet));
    w.get("a.conv.weight", &[3, 2, 3, 3]).unwrap();
    let e = w.check_lora_consumed().err().unwrap().to_string();
    assert!(
        e.contains("lora_unet_input_blocks_1_0_in_layers_2") && e.contains("SGM"),
        "{e}"
    );
}

#[test]
fn fingerprint_follows_contents() {
    let t = |seed| {
        [
            ("unet.a.lin.lora_A.weight", values(&[2, 5], seed)),
            ("unet.a.lin.lora_B.weight", values(&[3, 2], 1)),
        ]
    };
    let a = write("fp-a", &t(1), None);
    let b = write("fp-b", &t(2), None);
    let fa = load(&a, 1.0).unwrap().fingerprint();
    assert_eq!(fa, load(&a, 1.0).unwrap().fingerprint());
    assert_ne!(fa, load(&b, 1.0).unwrap().fingerprint());
    assert_ne!(fa, load(&a, 0.5).unwrap().fingerprint());
}
