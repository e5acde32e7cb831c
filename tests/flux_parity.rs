//! Flux.1 parity against diffusers 0.42.1 on the tiny random pipelines `models/tiny-flux-dev`
//! (guidance embedding, transformer in shards) and `models/tiny-flux-schnell` (no guidance), with
//! the references of `scripts/regen_flux_reference.py` in `tests/data/refs-tiny-flux`:
//! transformer forwards, T5 / CLIP embeddings and token ids, scheduler tables, whole-pipeline
//! latents and decoded images (square and non-square, with and without guidance), and transformers
//! of other depths, head counts and RoPE axes (`refs-tiny-flux/variants`). Also: the full-size
//! FLUX.1-dev configs parse and describe the 11.9 B-parameter transformer.

use std::collections::HashMap;
use std::path::PathBuf;

use pcpp_core::{SerialDriver, SerialFactory};
use pcpp_flux::{
    image_ids, text_ids, FlowMatchConfig, FlowMatchSchedule, FluxCond, FluxPipeline,
    FluxTransformer, FluxTransformerConfig, RopeTables, T5Config,
};
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_tests::{assert_close, refs, repo, TOL_MODULE, TOL_PIPELINE};

fn model(variant: &str) -> PathBuf {
    repo().join(format!("models/tiny-flux-{variant}"))
}

fn meta() -> serde_json::Value {
    let p = pcpp_tests::data("refs-tiny-flux/meta.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("meta.json")).expect("meta json")
}

fn ids_of(t: &Tensor) -> Vec<[f32; 3]> {
    t.to_vec_f32()
        .expect("ids")
        .chunks(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect()
}

/// The conditioning of a stored transformer forward (`transformer_forward` of the regen script),
/// after checking the forward of `tr` on its inputs (a 3 × 5 packed grid) against diffusers'.
fn stored_forward_matches(
    what: &str,
    tr: &FluxTransformer,
    r: &HashMap<String, Tensor>,
) -> FluxCond {
    let guidance = r.get("guidance").map(|g| g.to_vec_f32().unwrap()[0]);
    let cond = FluxCond::new(
        &r["encoder_hidden_states"],
        &r["pooled_projections"],
        guidance,
        DType::F32,
        Device::Cpu,
    )
    .expect("cond");
    let out = tr
        .forward_packed(&r["hidden_states"], (3, 5), &r["timestep"], &cond)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_close(what, &out, &r["out"], TOL_MODULE);
    cond
}

fn transformer_matches(variant: &str) {
    let dir = model(variant).join("transformer");
    let tr = FluxTransformer::load_on(&dir, DType::F32, Device::Cpu, &SerialFactory)
        .expect("load transformer");
    let r = refs(&format!("refs-tiny-flux/transformer_{variant}.safetensors"));
    // positions exactly as FluxPipeline builds them (the transformer builds the same tables)
    let (img, txt) = (ids_of(&r["img_ids"]), ids_of(&r["txt_ids"]));
    assert_eq!(img, image_ids(3, 5, 0));
    assert_eq!(txt, text_ids(7));
    let cond = stored_forward_matches(&format!("transformer {variant}"), &tr, &r);
    let t = &r["timestep"];
    if variant == "dev" {
        let no_guidance = FluxCond {
            guidance: None,
            ..cond
        };
        let e = tr
            .forward_packed(&r["hidden_states"], (3, 5), t, &no_guidance)
            .expect_err("a guidance model without guidance must fail")
            .to_string();
        assert!(e.contains("guidance"), "{e}");
    }
}

/// Transformers of other depths (no single-stream or no double-stream blocks), head counts, head
/// sizes and RoPE axes than the pipelines', each loaded from its diffusers folder: one forward
/// against diffusers', with its guidance embedding where it has one.
#[test]
fn transformer_variants_match_diffusers() {
    let dir = pcpp_tests::data("refs-tiny-flux/variants");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("variants folder")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    for d in names {
        let name = d.file_name().unwrap().to_string_lossy().to_string();
        let cfg = FluxTransformerConfig::from_file(&d.join("config.json")).expect("config");
        let tr = FluxTransformer::load_on(&d, DType::F32, Device::Cpu, &SerialFactory)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let r = refs(&format!(
            "refs-tiny-flux/variants/{name}/forward.safetensors"
        ));
        assert_eq!(r.contains_key("guidance"), cfg.guidance_embeds, "{name}");
        stored_forward_matches(&format!("transformer {name}"), &tr, &r);
    }
}

#[test]
fn transformer_dev_matches_diffusers() {
    transformer_matches("dev");
}

#[test]
fn transformer_schnell_matches_diffusers() {
    transformer_matches("schnell");
}

#[test]
fn rope_band_with_row_offset_matches_the_whole_grid() {
    // rows 2..4 of a 5×3 grid: the band's tables equal the whole grid's rows 2..4
    let axes = [4, 6, 6];
    let whole = RopeTables::new(&image_ids(5, 3, 0), &axes, Device::Cpu).unwrap();
    let band = RopeTables::new(&image_ids(2, 3, 2), &axes, Device::Cpu).unwrap();
    let x: Vec<f32> = (0..15 * 32)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let x = Tensor::from_vec(&[1, 15, 32], x).unwrap();
    let all = whole.apply(&x).unwrap().narrow(1, 6, 6).unwrap();
    let part = band.apply(&x.narrow(1, 6, 6).unwrap()).unwrap();
    assert_eq!(all.max_abs_diff(&part).unwrap(), 0.0);
    assert!(all.max_abs_diff(&x.narrow(1, 6, 6).unwrap()).unwrap() > 0.1);
}

#[test]
fn text_encoders_and_tokenizers_match_diffusers() {
    let pipe =
        FluxPipeline::load(&model("dev"), DType::F32, DType::F32, Device::Cpu).expect("load");
    let t5_tok =
        pcpp_flux::T5Tokenizer::from_dir(&model("dev").join("tokenizer_2")).expect("t5 tok");
    let r = refs("refs-tiny-flux/text_encoders.safetensors");
    let prompts = meta()["prompts"].as_array().expect("prompts").clone();
    for (i, p) in prompts.iter().enumerate() {
        let p = p.as_str().expect("prompt");
        for (len, key) in [(512, format!("t5_ids.{i}")), (24, format!("t5_ids_24.{i}"))] {
            let got: Vec<f32> = t5_tok
                .encode(p, len)
                .expect("encode")
                .ids
                .iter()
                .map(|&x| x as f32)
                .collect();
            assert_eq!(
                got,
                r[&key].to_vec_f32().unwrap(),
                "T5 ids of prompt {i}, length {len}"
            );
        }
        let e = pipe.encode_prompt(p, 512).expect("encode prompt");
        assert_close(
            &format!("T5 prompt {i}"),
            &e.t5,
            &r[&format!("t5_embeds.{i}")],
            TOL_MODULE,
        );
        assert_close(
            &format!("CLIP pooled prompt {i}"),
            &e.pooled,
            &r[&format!("clip_pooled.{i}")],
            TOL_MODULE,
        );
    }
}

#[test]
fn scheduler_tables_match_diffusers() {
    let cfg = FlowMatchConfig::from_file(&model("dev").join("scheduler/scheduler_config.json"))
        .expect("config");
    let r = refs("refs-tiny-flux/scheduler.safetensors");
    for case in meta()["scheduler_cases"].as_array().expect("cases") {
        let steps = case["steps"].as_u64().unwrap() as usize;
        let seq = case["image_seq_len"].as_u64().unwrap() as usize;
        let s = FlowMatchSchedule::new(&cfg, steps, seq).expect("schedule");
        let mu = case["mu"].as_f64().unwrap();
        assert!((s.mu.unwrap() - mu).abs() < 1e-12, "mu {:?} vs {mu}", s.mu);
        let schedule = [("sigmas", &s.sigmas), ("timesteps", &s.timesteps)];
        for (name, got) in schedule {
            let want = r[&format!("{name}.{steps}.{seq}")].to_vec_f32().unwrap();
            assert_eq!(got.len(), want.len(), "{name} {steps}/{seq}");
            let scale = if name == "sigmas" { 1.0 } else { 1000.0 };
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-6 * scale,
                    "{name} {steps}/{seq}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn pipelines_match_diffusers() {
    for run in meta()["pipelines"].as_array().expect("runs") {
        let key = run["key"].as_str().unwrap();
        let variant = run["variant"].as_str().unwrap();
        let pipe =
            FluxPipeline::load(&model(variant), DType::F32, DType::F32, Device::Cpu).expect("load");
        let r = refs(&format!("refs-tiny-flux/pipeline_{key}.safetensors"));
        let (h, w) = (
            run["height"].as_u64().unwrap() as usize,
            run["width"].as_u64().unwrap() as usize,
        );
        assert_eq!(
            pipe.latent_size(h, w).unwrap(),
            (r["init_noise"].shape()[2], r["init_noise"].shape()[3])
        );
        let prompt = pipe
            .encode_prompt(
                run["prompt"].as_str().unwrap(),
                run["max_sequence_length"].as_u64().unwrap() as usize,
            )
            .expect("encode");
        let guidance = run["guidance"].as_f64().map(|g| g as f32);
        assert_eq!(guidance.is_some(), pipe.embeds_guidance(), "{key}");
        let mut seen = 0;
        let lat = pipe
            .denoise(
                &prompt,
                &r["init_noise"],
                run["steps"].as_u64().unwrap() as usize,
                guidance,
                &SerialDriver,
                false,
                &mut |i, _| seen = i,
            )
            .expect("denoise")
            .latents;
        assert_eq!(seen, run["steps"].as_u64().unwrap() as usize);
        assert_close(&format!("{key} latents"), &lat, &r["latents"], TOL_PIPELINE);
        let img = pipe.decode(&lat).expect("decode");
        assert_close(&format!("{key} image"), &img, &r["image"], TOL_PIPELINE);
    }
}

#[test]
fn flux1_dev_configs_parse_with_the_full_parameter_count() {
    let dir = repo().join("pcpp-flux/configs/flux1-dev");
    let tr = FluxTransformerConfig::from_file(&dir.join("transformer/config.json"))
        .expect("transformer");
    let n = tr.parameter_count();
    assert_eq!(n, 11_901_408_320, "FLUX.1-dev transformer parameters");
    assert!(tr.guidance_embeds && tr.inner_dim() == 3072);
    let t5 = T5Config::from_file(&dir.join("text_encoder_2/config.json")).expect("t5");
    assert_eq!((t5.d_model, t5.num_layers, t5.num_heads), (4096, 24, 64));
    assert_eq!(
        t5.feed_forward().unwrap(),
        (true, pcpp_kernels::Activation::GeluTanh)
    );
    FlowMatchConfig::from_file(&dir.join("scheduler/scheduler_config.json")).expect("scheduler");
    let vae = pcpp_sdxl::VaeConfig::from_file(&dir.join("vae/config.json")).expect("vae");
    assert_eq!((vae.latent_channels, vae.scale_factor()), (16, 8));
    assert!(pcpp_flux::PipelineKind::of_folder(&dir).unwrap().is_flux());
}

#[test]
fn tiny_parameter_count_equals_the_weights() {
    for v in ["dev", "schnell"] {
        let dir = model(v).join("transformer");
        let cfg = FluxTransformerConfig::from_file(&dir.join("config.json")).unwrap();
        let file = pcpp_sdxl::weights::find_weight_file(&dir, "diffusion_pytorch_model").unwrap();
        let w = pcpp_kernels::shards::WeightFiles::open(file).unwrap();
        let total: u64 = w
            .shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        assert_eq!(cfg.parameter_count(), total, "{v}");
    }
}

#[test]
fn bad_configs_name_the_key() {
    let dir = std::env::temp_dir().join(format!("pcpp-flux-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("config.json");
    let base = std::fs::read_to_string(model("dev").join("transformer/config.json")).unwrap();
    std::fs::write(
        &p,
        base.replace(
            "\"axes_dims_rope\": [\n    4,",
            "\"axes_dims_rope\": [\n    6,",
        ),
    )
    .unwrap();
    let e = FluxTransformerConfig::from_file(&p)
        .expect_err("bad rope axes accepted")
        .to_string();
    assert!(
        e.contains("axes_dims_rope") && e.contains("config.json"),
        "{e}"
    );
    let s = std::fs::read_to_string(model("dev").join("scheduler/scheduler_config.json")).unwrap();
    std::fs::write(
        &p,
        s.replace(
            "\"use_karras_sigmas\": false",
            "\"use_karras_sigmas\": true",
        ),
    )
    .unwrap();
    let e = FlowMatchConfig::from_file(&p)
        .expect_err("karras accepted")
        .to_string();
    assert!(e.contains("use_karras_sigmas"), "{e}");
}

#[test]
fn random_transformer_from_a_config_runs() {
    let cfg = model("dev").join("transformer/config.json");
    let tr =
        FluxTransformer::random(&cfg, DType::F32, Device::Cpu, 3, &SerialFactory).expect("random");
    let r = refs("refs-tiny-flux/transformer_dev.safetensors");
    let cond = FluxCond::new(
        &r["encoder_hidden_states"],
        &r["pooled_projections"],
        Some(3.5),
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    let t = Tensor::from_vec(&[1], vec![0.5]).unwrap();
    let out = tr
        .forward_packed(&r["hidden_states"], (3, 5), &t, &cond)
        .expect("forward");
    assert_eq!(out.shape(), r["out"].shape());
    let v = out.to_vec_f32().unwrap();
    assert!(v.iter().all(|x| x.is_finite()) && out.max_abs().unwrap() > 0.0);
}

#[test]
fn missing_or_extra_tensors_are_named() {
    let src = model("schnell").join("transformer");
    let f =
        pcpp_kernels::io::SafetensorsFile::open(src.join("diffusion_pytorch_model.safetensors"))
            .unwrap();
    let all: Vec<(String, Tensor)> = f
        .shapes()
        .into_iter()
        .map(|(n, _)| (n.clone(), f.load(&n, None).unwrap()))
        .collect();
    let dir = std::env::temp_dir().join(format!("pcpp-flux-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let gone = "single_transformer_blocks.1.attn.norm_k.weight";
    let extra = Tensor::from_vec(&[2], vec![1.0, 2.0]).unwrap();
    for (tag, want) in [
        ("missing", gone),
        ("extra", "time_text_embed.guidance_embedder.linear_1.weight"),
    ] {
        let mut kept: Vec<(&str, &Tensor)> = all
            .iter()
            .filter(|(n, _)| tag != "missing" || n != gone)
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        if tag == "extra" {
            kept.push((want, &extra));
        }
        pcpp_kernels::io::save(dir.join("diffusion_pytorch_model.safetensors"), &kept, None)
            .unwrap();
        let e = FluxTransformer::load_on(&dir, DType::F32, Device::Cpu, &SerialFactory)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains(want) && e.contains("diffusion_pytorch_model.safetensors"),
            "{tag}: {e}"
        );
    }
}
