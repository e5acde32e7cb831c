//! LoRA parity against diffusers on the tiny model (`tests/data/lora`, see its README section):
//! each fixture (kohya with SGM block names, kohya with diffusers names, PEFT) at scales 0.7 and 1.0
//! loaded through `LoraSet` + `Weights::with_lora`, against `load_lora_weights` + `fuse_lora`:
//! fused weights, prompt embeddings and the final latents of a 4-step Euler run with CFG and a
//! negative prompt from the stored `initial_noise`. Then the errors: an adapter that matches no
//! module, one that does not fit its module, SD 1.x adapters, bad `FILE:SCALE` values.
//!
//! The models are built from `Weights` stores (`ClipTextModel::build`, `UNet::build`) and the
//! prompt encoding repeats `TextEncoders::encode` (CFG with a negative prompt), so the test does
//! not depend on how the pipeline loader wires LoRA in.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pcpp_core::{SerialDriver, SerialFactory};
use pcpp_kernels::{DType, Tensor};
use pcpp_sdxl::scheduler::SchedulerKind;
use pcpp_sdxl::tokenizer::ClipTokenizer;
use pcpp_sdxl::weights::{find_weight_file, Weights};
use pcpp_sdxl::{
    denoise, ClipTextConfig, ClipTextModel, DenoiseParams, LoraComponent, LoraSet, LoraSpec,
    MicroCond, Pipeline, PromptEmbeds, UNet, UNetConfig,
};
use pcpp_tests::{assert_close, data, refs, rel_err, tiny_model, TOL_MODULE, TOL_PIPELINE};

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(data("lora/meta.json")).expect("lora/meta.json");
    serde_json::from_str(&text).expect("meta.json parses")
}

fn lora_set(files: &[(&str, f32)]) -> LoraSet {
    let specs: Vec<LoraSpec> = files
        .iter()
        .map(|(f, s)| LoraSpec {
            path: data(&format!("lora/{f}")),
            scale: *s,
        })
        .collect();
    LoraSet::load(&specs).expect("load LoRA files")
}

/// The store of component folder `sub` (weight file stem `stem`) with `set`'s adapters for `c`.
fn store(sub: &str, stem: &str, set: &LoraSet, c: LoraComponent) -> Weights {
    let file = find_weight_file(&tiny_model().join(sub), stem).expect("weight file");
    Weights::open(&file, DType::F32)
        .expect("open weights")
        .with_lora(set.for_component(c))
}

fn text_encoder(sub: &str, set: &LoraSet, c: LoraComponent) -> pcpp_sdxl::Result<ClipTextModel> {
    let cfg = ClipTextConfig::from_file(&tiny_model().join(sub).join("config.json"))?;
    ClipTextModel::build(cfg, &store(sub, "model", set, c))
}

fn unet(set: &LoraSet) -> pcpp_sdxl::Result<UNet> {
    let cfg = UNetConfig::from_file(&tiny_model().join("unet/config.json"))?;
    let w = store("unet", "diffusion_pytorch_model", set, LoraComponent::Unet);
    UNet::build(cfg, &w, &SerialFactory)
}

/// Both tokenizers, read once for all tests.
fn tokenizers() -> &'static (ClipTokenizer, ClipTokenizer) {
    static TOK: OnceLock<(ClipTokenizer, ClipTokenizer)> = OnceLock::new();
    TOK.get_or_init(|| {
        let tok = |s: &str| ClipTokenizer::from_dir(tiny_model().join(s)).expect("tokenizer");
        (tok("tokenizer"), tok("tokenizer_2"))
    })
}

struct Text {
    tok1: &'static ClipTokenizer,
    tok2: &'static ClipTokenizer,
    te1: ClipTextModel,
    te2: ClipTextModel,
}

impl Text {
    fn load(set: &LoraSet) -> Text {
        let (tok1, tok2) = tokenizers();
        Text {
            tok1,
            tok2,
            te1: text_encoder("text_encoder", set, LoraComponent::TextEncoder).expect("te1"),
            te2: text_encoder("text_encoder_2", set, LoraComponent::TextEncoder2).expect("te2"),
        }
    }

    /// (penultimate hidden states of both encoders `[1, 77, d1 + d2]`, projected pooled `[1, p]`).
    fn encode_one(&self, prompt: &str) -> (Tensor, Tensor) {
        let mut hidden = Vec::new();
        let mut pooled = None;
        for (tok, te) in [(self.tok1, &self.te1), (self.tok2, &self.te2)] {
            let ids = tok.encode(prompt).expect("tokenize").ids;
            let ids = Tensor::from_vec(&[1, ids.len()], ids.iter().map(|&i| i as f32).collect())
                .expect("ids");
            let out = te.forward(&ids).expect("text encoder");
            hidden.push(out.penultimate_hidden_state);
            pooled = out.text_embeds.or(pooled);
        }
        (
            Tensor::cat(&[&hidden[0], &hidden[1]], 2).expect("cat"),
            pooled.expect("text encoder 2 projects"),
        )
    }

    /// SDXL's CFG conditioning with a negative prompt: `[negative, prompt]`.
    fn encode(&self, prompt: &str, negative: &str) -> PromptEmbeds {
        let (ph, pp) = self.encode_one(prompt);
        let (nh, np) = self.encode_one(negative);
        PromptEmbeds {
            prompt_embeds: Tensor::cat(&[&nh, &ph], 0).expect("cat"),
            pooled: Tensor::cat(&[&np, &pp], 0).expect("cat"),
            truncated: false,
        }
    }
}

/// Runs the reference call with `set` and checks prompt embeddings and final latents against
/// `{fmt}.s{scale}.*`; returns the latents' relative error.
fn check_run(set: &LoraSet, fmt: &str, scale: &str) -> f32 {
    let m = meta();
    let call = &m["call"];
    let r = refs("lora/refs.safetensors");
    let text = Text::load(set);
    let embeds = text.encode(
        call["prompt"].as_str().expect("prompt"),
        call["negative_prompt"].as_str().expect("negative_prompt"),
    );
    let key = |k: &str| format!("{fmt}.s{scale}.{k}");
    println!(
        "{}: prompt_embeds rel err {:.3e}, add_text_embeds {:.3e}",
        key(""),
        rel_err(&embeds.prompt_embeds, &r[&key("prompt_embeds")]),
        rel_err(&embeds.pooled, &r[&key("add_text_embeds")])
    );
    assert_close(
        &key("prompt_embeds"),
        &embeds.prompt_embeds,
        &r[&key("prompt_embeds")],
        TOL_MODULE,
    );
    assert_close(
        &key("add_text_embeds"),
        &embeds.pooled,
        &r[&key("add_text_embeds")],
        TOL_MODULE,
    );
    let unet = unet(set).expect("UNet with LoRA");
    let int = |k: &str| call[k].as_u64().expect(k) as usize;
    let params = DenoiseParams {
        steps: int("num_inference_steps"),
        guidance: call["guidance_scale"].as_f64().expect("guidance") as f32,
        scheduler: SchedulerKind::Euler,
        micro: MicroCond::for_size(int("height"), int("width")),
        cuda_graphs: false,
    };
    let sched = Pipeline::load_scheduler_config(&tiny_model()).expect("scheduler config");
    let latents = denoise(
        &unet,
        &SerialDriver,
        &sched,
        &params,
        &embeds,
        &r["initial_noise"],
        &mut |_, _| {},
    )
    .expect("denoise");
    let e = rel_err(&latents, &r[&key("final_latents")]);
    println!("{}: final latents rel err {e:.3e}", key(""));
    assert_close(
        &key("final_latents"),
        &latents,
        &r[&key("final_latents")],
        TOL_PIPELINE,
    );
    e
}

#[test]
fn kohya_sgm_names_match_diffusers() {
    for (s, name) in [(0.7, "0.7"), (1.0, "1.0")] {
        check_run(&lora_set(&[("kohya.safetensors", s)]), "kohya", name);
    }
}

#[test]
fn kohya_diffusers_names_without_alpha_match_diffusers() {
    // the same deltas as kohya.safetensors, diffusers names, no `.alpha` (alpha = rank); diffusers'
    // results for the two files differ by rounding only
    let m = meta();
    for s in ["0.7", "1.0"] {
        let d = &m["runs"][format!("kohya.s{s}")]["kohya_diffusers_names.safetensors_max_rel_diff"];
        assert!(d.as_f64().expect("recorded") < 1e-5, "{s}: {d}");
    }
    for (s, name) in [(0.7, "0.7"), (1.0, "1.0")] {
        check_run(
            &lora_set(&[("kohya_diffusers_names.safetensors", s)]),
            "kohya",
            name,
        );
    }
}

#[test]
fn peft_matches_diffusers() {
    for (s, name) in [(0.7, "0.7"), (1.0, "1.0")] {
        check_run(&lora_set(&[("peft.safetensors", s)]), "peft", name);
    }
}

#[test]
fn lora_moves_the_result_far_beyond_the_tolerance() {
    // the fixtures are strong enough that a missing or wrong adapter fails the parity tests
    let r = refs("lora/refs.safetensors");
    for fmt in ["kohya", "peft"] {
        let e = rel_err(
            &r["base.final_latents"],
            &r[&format!("{fmt}.s1.0.final_latents")],
        );
        assert!(
            e > 1000.0 * TOL_PIPELINE,
            "{fmt}: LoRA moves latents by {e:.3e}"
        );
    }
}

/// The weights `set` gives the component tensors the reference holds fused (`{fmt}.s1.0.fused.*`).
fn check_fused(set: &LoraSet, fmt: &str) -> usize {
    let r = refs("lora/refs.safetensors");
    let prefix = format!("{fmt}.s1.0.fused.");
    let unet_cfg = UNetConfig::from_file(&tiny_model().join("unet/config.json")).expect("config");
    let mut n = 0;
    for (comp, sub, stem, c) in [
        (
            "unet",
            "unet",
            "diffusion_pytorch_model",
            LoraComponent::Unet,
        ),
        (
            "text_encoder",
            "text_encoder",
            "model",
            LoraComponent::TextEncoder,
        ),
        (
            "text_encoder_2",
            "text_encoder_2",
            "model",
            LoraComponent::TextEncoder2,
        ),
    ] {
        let w = store(sub, stem, set, c);
        w.set_lora_unet_config(&unet_cfg);
        let base = store(sub, stem, &lora_set(&[]), c);
        for (key, want) in r.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let Some(name) = key[prefix.len()..].strip_prefix(&format!("{comp}.")) else {
                continue;
            };
            let name = if w.contains(name) {
                name.to_string()
            } else {
                format!("text_model.{name}")
            };
            let got = w.get(&name, want.shape()).expect("fused weight");
            let orig = base.get(&name, want.shape()).expect("base weight");
            assert!(
                rel_err(&orig, want) > 0.1,
                "{key}: the adapter changes the weight"
            );
            assert_close(key, &got, want, TOL_MODULE);
            n += 1;
        }
    }
    n
}

#[test]
fn fused_weights_match_diffusers() {
    for (file, fmt) in [("kohya.safetensors", "kohya"), ("peft.safetensors", "peft")] {
        let n = check_fused(&lora_set(&[(file, 1.0)]), fmt);
        assert!(n > 100, "{fmt}: only {n} fused weights checked");
    }
}

#[test]
fn several_files_add_up() {
    let unet_cfg = UNetConfig::from_file(&tiny_model().join("unet/config.json")).expect("config");
    let sets = [
        lora_set(&[]),
        lora_set(&[("kohya.safetensors", 0.7)]),
        lora_set(&[("peft.safetensors", -0.4)]),
        lora_set(&[("kohya.safetensors", 0.7), ("peft.safetensors", -0.4)]),
    ];
    for name in [
        "down_blocks.1.attentions.0.proj_in.weight",
        "down_blocks.0.resnets.0.conv1.weight",
        "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_k.weight",
    ] {
        let got: Vec<Tensor> = sets
            .iter()
            .map(|s| {
                let w = store("unet", "diffusion_pytorch_model", s, LoraComponent::Unet);
                w.set_lora_unet_config(&unet_cfg);
                w.get(name, &shape_of(name)).expect("weight")
            })
            .collect();
        // W + d1 + d2 = (W + d1) + (W + d2) − W
        let want = got[1]
            .add(&got[2])
            .and_then(|t| t.sub(&got[0]))
            .expect("sum");
        assert_close(name, &got[3], &want, TOL_MODULE);
        assert!(rel_err(&got[1], &got[0]) > 0.1 && rel_err(&got[2], &got[0]) > 0.1);
    }
}

fn shape_of(name: &str) -> Vec<usize> {
    let file = find_weight_file(&tiny_model().join("unet"), "diffusion_pytorch_model").expect("f");
    let f = pcpp_kernels::io::SafetensorsFile::open(file).expect("open");
    f.shapes()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
        .expect("tensor in the tiny UNet")
}

#[test]
fn fingerprint_names_files_and_scales() {
    let a = lora_set(&[("kohya.safetensors", 0.7)]).fingerprint();
    assert_eq!(a, lora_set(&[("kohya.safetensors", 0.7)]).fingerprint());
    assert_ne!(a, lora_set(&[("kohya.safetensors", 0.8)]).fingerprint());
    assert_ne!(a, lora_set(&[("peft.safetensors", 0.7)]).fingerprint());
    // same tensors under other names
    assert_ne!(
        a,
        lora_set(&[("kohya_diffusers_names.safetensors", 0.7)]).fingerprint()
    );
    assert_ne!(
        lora_set(&[]).fingerprint(),
        lora_set(&[("kohya.safetensors", 0.7)]).fingerprint()
    );
}

// ---------------------------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------------------------

/// Writes a LoRA file of random-ish tensors `(key, shape)` to a fresh temp path.
fn write_lora(tag: &str, tensors: &[(&str, &[usize])]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcpp-lora-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{tag}.safetensors"));
    let ts: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            let v = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
            (k.to_string(), Tensor::from_vec(s, v).expect("tensor"))
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = ts.iter().map(|(k, t)| (k.as_str(), t)).collect();
    pcpp_kernels::io::save(&path, &refs, None).expect("write LoRA file");
    path
}

fn load_one(path: &Path) -> pcpp_sdxl::Result<LoraSet> {
    LoraSet::load(&[LoraSpec {
        path: path.to_path_buf(),
        scale: 1.0,
    }])
}

const PROJ_IN: &str = "lora_unet_down_blocks_1_attentions_0_proj_in";

#[test]
fn adapter_without_module_is_an_error_naming_key_and_file() {
    // SD 1.x has attention at the first level; this SDXL UNet does not
    let stray = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let path = write_lora(
        "unknown-key",
        &[
            (&format!("{PROJ_IN}.lora_down.weight"), &[2, 4]),
            (&format!("{PROJ_IN}.lora_up.weight"), &[4, 2]),
            (&format!("{stray}.lora_down.weight"), &[2, 2]),
            (&format!("{stray}.lora_up.weight"), &[2, 2]),
        ],
    );
    let set = load_one(&path).expect("the file itself is fine");
    assert_eq!(set.count(LoraComponent::Unet), 2);
    let e = unet(&set)
        .err()
        .expect("an unmatched adapter fails")
        .to_string();
    assert!(e.contains(stray), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(
        !e.contains(PROJ_IN),
        "the matched adapter is not listed: {e}"
    );
    // the same file loads once the stray adapter is gone
    let ok = write_lora(
        "known-key",
        &[
            (&format!("{PROJ_IN}.lora_down.weight"), &[2, 4]),
            (&format!("{PROJ_IN}.lora_up.weight"), &[4, 2]),
        ],
    );
    unet(&load_one(&ok).expect("load")).expect("a matching adapter loads");
}

#[test]
fn adapter_of_wrong_shape_is_an_error_naming_tensor_and_file() {
    let path = write_lora(
        "wrong-shape",
        &[
            (&format!("{PROJ_IN}.lora_down.weight"), &[2, 5]),
            (&format!("{PROJ_IN}.lora_up.weight"), &[4, 2]),
        ],
    );
    let e = unet(&load_one(&path).expect("load"))
        .err()
        .expect("shape mismatch")
        .to_string();
    assert!(e.contains(&format!("{PROJ_IN}.lora_down.weight")), "{e}");
    assert!(
        e.contains("down_blocks.1.attentions.0.proj_in.weight"),
        "{e}"
    );
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(!e.contains("SD 1.x"), "{e}");
}

#[test]
fn sd1_adapters_are_refused() {
    // one text encoder: `lora_te_`
    let te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    let path = write_lora(
        "sd1-te",
        &[
            (&format!("{te}.lora_down.weight"), &[4, 32]),
            (&format!("{te}.lora_up.weight"), &[32, 4]),
        ],
    );
    let e = load_one(&path).err().expect("SD 1.x file").to_string();
    assert!(e.contains("SD 1.x"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
    // cross-attention from 768-wide CLIP embeddings
    let k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k";
    let path = write_lora(
        "sd1-unet",
        &[
            (&format!("{k}.lora_down.weight"), &[2, 768]),
            (&format!("{k}.lora_up.weight"), &[4, 2]),
        ],
    );
    let e = unet(&load_one(&path).expect("load"))
        .err()
        .expect("SD 1.x adapter")
        .to_string();
    assert!(e.contains("SD 1.x adapter"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
}

#[test]
fn lora_flag_values() {
    let p = LoraSpec::parse("style.safetensors:0.8").expect("file:scale");
    assert_eq!((p.path, p.scale), (PathBuf::from("style.safetensors"), 0.8));
    let p = LoraSpec::parse("style.safetensors").expect("file");
    assert_eq!((p.path, p.scale), (PathBuf::from("style.safetensors"), 1.0));
    let p = LoraSpec::parse("/data/a:b/style.safetensors:-0.5").expect("':' in the path");
    assert_eq!(
        (p.path, p.scale),
        (PathBuf::from("/data/a:b/style.safetensors"), -0.5)
    );
    let p = LoraSpec::parse("/data/a:b/style.safetensors").expect("':' in the path");
    assert_eq!(
        (p.path, p.scale),
        (PathBuf::from("/data/a:b/style.safetensors"), 1.0)
    );
    for bad in [
        "style.safetensors:abc",
        "style.safetensors:",
        "style.safetensors:nan",
        "style.safetensors:inf",
        ":0.5",
        "",
    ] {
        let e = LoraSpec::parse(bad).expect_err(bad).to_string();
        assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
    }
}

#[test]
fn missing_lora_file_is_an_error_naming_it() {
    let path = tiny_model().join("no-such-lora.safetensors");
    let e = load_one(&path).err().expect("missing file").to_string();
    assert!(e.contains("no-such-lora.safetensors"), "{e}");
}
