//! Single-file SDXL checkpoints: the tiny pipeline packed into one file with the original
//! (Stability) key names and unpacked again gives bit-identical tensors and the identical image;
//! the packed file has the SDXL layout; unsupported files (SD 1.5, LoRA, truncated, a diffusers
//! component file) are refused with a message naming what was found.

use std::path::{Path, PathBuf};

use pcpp_core::{SerialDriver, SerialFactory};
use pcpp_kernels::DType;
use pcpp_sdxl::checkpoint::{pack_single_file, read_header, unpack_single_file};
use pcpp_sdxl::scheduler::SchedulerKind;
use pcpp_sdxl::{denoise, DenoiseParams, MicroCond, Pipeline};
use pcpp_tests::{data, refs, tiny_model};
use safetensors::SafeTensors;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcpp-single-file-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tmp");
    d.join(name)
}

fn generate(dir: &Path) -> Vec<f32> {
    let pipe = Pipeline::load(dir, DType::F32, &SerialFactory).expect("load");
    let r = refs("refs-tiny-sdxl/pipeline_euler.safetensors");
    let embeds = pipe
        .text
        .encode("A painting of a squirrel eating a burger", None, true)
        .expect("encode");
    let params = DenoiseParams {
        steps: 2,
        guidance: 5.0,
        scheduler: SchedulerKind::Euler,
        micro: MicroCond::for_size(64, 64),
        cuda_graphs: false,
    };
    let lat = denoise(
        &pipe.unet,
        &SerialDriver,
        &pipe.scheduler,
        &params,
        &embeds,
        &r["initial_noise"],
        &mut |_, _| {},
    )
    .expect("denoise");
    pipe.decode(&lat)
        .expect("decode")
        .to_vec_f32()
        .expect("f32")
}

/// Both files hold the same tensors, bit for bit (text-encoder names compared without the
/// optional `text_model.` root, which transformers 5 drops and the single file always has).
fn same_tensors(a: &Path, b: &Path) {
    let (ba, bb) = (std::fs::read(a).expect("a"), std::fs::read(b).expect("b"));
    let (sa, sb) = (
        SafeTensors::deserialize(&ba).expect("a"),
        SafeTensors::deserialize(&bb).expect("b"),
    );
    let norm = |st: &SafeTensors<'_>| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = st
            .names()
            .into_iter()
            .filter(|n| !n.ends_with("position_ids"))
            .map(|n| {
                let short = n.strip_prefix("text_model.").unwrap_or(n).to_string();
                (short, n.to_string())
            })
            .collect();
        v.sort();
        v
    };
    let (na, nb) = (norm(&sa), norm(&sb));
    let short = |v: &[(String, String)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(short(&na), short(&nb), "{} vs {}", a.display(), b.display());
    for ((n, ka), (_, kb)) in na.iter().zip(&nb) {
        let (x, y) = (sa.tensor(ka).expect("x"), sb.tensor(kb).expect("y"));
        assert_eq!(x.dtype(), y.dtype(), "{n}");
        assert_eq!(x.shape(), y.shape(), "{n}");
        assert!(x.data() == y.data(), "{n}: bytes differ");
    }
}

#[test]
fn tiny_pipeline_round_trips_through_a_single_file() {
    let file = tmp("tiny.safetensors");
    let n = pack_single_file(&tiny_model(), &file).expect("pack");
    let header = read_header(&file).expect("header");
    assert_eq!(header.names.len(), n);
    assert_eq!(header.expected_len, header.actual_len);
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ] {
        assert!(header.names.iter().any(|k| k == key), "missing {key}");
    }
    let dir = tmp("unpacked");
    unpack_single_file(&file, &dir).expect("unpack");
    for rel in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    ] {
        same_tensors(&tiny_model().join(rel), &dir.join(rel));
    }
    for rel in [
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
    ] {
        assert_eq!(
            std::fs::read(tiny_model().join(rel)).expect("orig"),
            std::fs::read(dir.join(rel)).expect("copy"),
            "{rel}"
        );
    }
    let (a, b) = (generate(&tiny_model()), generate(&dir));
    assert_eq!(a, b, "the unpacked pipeline gives a different image");
    std::fs::remove_dir_all(&dir).expect("clean up");
    std::fs::remove_file(&file).expect("clean up");
}

fn fake_file(name: &str, keys: &[&str]) -> PathBuf {
    let p = tmp(name);
    let data: Vec<(String, safetensors::tensor::TensorView<'static>)> = keys
        .iter()
        .map(|k| {
            (
                k.to_string(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![1],
                    &[0u8, 0, 128, 63],
                )
                .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(data, None, &p).expect("write");
    p
}

fn unpack_err(file: &Path) -> String {
    unpack_single_file(file, &tmp("never"))
        .expect_err("must fail")
        .to_string()
}

#[test]
fn unsupported_files_name_what_was_found() {
    let sd15 = fake_file(
        "sd15.safetensors",
        &[
            "model.diffusion_model.input_blocks.0.0.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "first_stage_model.decoder.conv_in.weight",
        ],
    );
    let e = unpack_err(&sd15);
    assert!(
        e.contains("1.x/2.x") && e.contains("sd15.safetensors"),
        "{e}"
    );
    let lora = fake_file(
        "lora.safetensors",
        &["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"],
    );
    let e = unpack_err(&lora);
    assert!(e.contains("LoRA") && e.contains("expected an SDXL"), "{e}");
    let comp = data("unet-sd15/unet/diffusion_pytorch_model.safetensors");
    let e = unpack_err(&comp);
    assert!(e.contains("diffusers component"), "{e}");
    let unet_only = fake_file(
        "unet-only.safetensors",
        &["model.diffusion_model.label_emb.0.0.weight"],
    );
    let e = unpack_err(&unet_only);
    assert!(e.contains("VAE") && e.contains("text encoder 2"), "{e}");

    let full = tmp("full.safetensors");
    pack_single_file(&tiny_model(), &full).expect("pack");
    let bytes = std::fs::read(&full).expect("read");
    let cut = tmp("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).expect("write");
    let e = unpack_err(&cut);
    assert!(
        e.contains("truncated") && e.contains("cut.safetensors"),
        "{e}"
    );
    std::fs::write(&cut, &bytes[..5]).expect("write");
    let e = unpack_err(&cut);
    assert!(e.contains("not a safetensors file"), "{e}");
    for f in [&full, &cut, &sd15, &lora, &unet_only] {
        std::fs::remove_file(f).expect("clean up");
    }
}

fn json(rel: &str) -> serde_json::Value {
    let p = pcpp_tests::repo().join(rel);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json")
}

#[test]
fn sdxl_base_names_map_one_to_one() {
    use pcpp_sdxl::checkpoint::{
        unet_key_to_diffusers, unet_key_to_original, vae_key_to_diffusers, vae_key_to_original,
    };
    let cfg = json("models/sdxl-base-1.0-configs/unet/config.json");
    let manifest = json("models/sdxl-base-1.0-configs/unet/tensor_manifest.json");
    let keys: Vec<&String> = manifest.as_object().expect("manifest").keys().collect();
    let mut seen = std::collections::BTreeSet::new();
    for k in &keys {
        let o = unet_key_to_original(&cfg, k).unwrap_or_else(|| panic!("no name for {k}"));
        assert_eq!(
            unet_key_to_diffusers(&cfg, &o).as_deref(),
            Some(k.as_str()),
            "{o}"
        );
        assert!(seen.insert(o.clone()), "{o} twice");
    }
    // names of the SGM SDXL UNet (3 levels, 2 resnets each, attention in levels 1 and 2)
    for o in [
        "input_blocks.3.0.op.weight",
        "input_blocks.7.0.skip_connection.weight",
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
        "middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.0.out_layers.3.weight",
        "label_emb.0.0.weight",
        "out.2.bias",
    ] {
        assert!(seen.contains(o), "SDXL name {o} not produced");
    }
    assert_eq!(seen.len(), keys.len());

    let manifest = json("models/sdxl-base-1.0-configs/vae/tensor_manifest.json");
    let mut seen = std::collections::BTreeSet::new();
    for k in manifest.as_object().expect("manifest").keys() {
        let o = vae_key_to_original(4, k).unwrap_or_else(|| panic!("no name for {k}"));
        assert_eq!(
            vae_key_to_diffusers(4, &o).as_deref(),
            Some(k.as_str()),
            "{o}"
        );
        assert!(seen.insert(o), "{k}: duplicate");
    }
    for o in [
        "decoder.up.3.block.2.conv2.weight",
        "decoder.up.1.upsample.conv.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "decoder.norm_out.bias",
        "quant_conv.weight",
    ] {
        assert!(seen.contains(o), "SDXL VAE name {o} not produced");
    }
}
