//! CLIP text encoder parity against transformers' reference outputs for the tiny SDXL model: both
//! encoders on five prompts (embeddings, penultimate and last hidden states, pooled / projected).

use pcpp_kernels::DType;
use pcpp_sdxl::ClipTextModel;
use pcpp_tests::{assert_close, refs, rel_err, tiny_model, TOL_MODULE};

#[test]
fn text_encoders_match_transformers() {
    let r = refs("refs-tiny-sdxl/text_encoders.safetensors");
    for (te, dir, projected) in [
        ("te1", "text_encoder", false),
        ("te2", "text_encoder_2", true),
    ] {
        let model =
            ClipTextModel::load(&tiny_model().join(dir), DType::F32).expect("load text encoder");
        assert_eq!(model.has_projection(), projected, "{te}: projection");
        let out = model
            .forward(&r[&format!("{te}.input_ids")])
            .expect("forward");
        let mut checks = vec![
            ("embeddings_output", &out.embeddings),
            ("penultimate_hidden_state", &out.penultimate_hidden_state),
            ("last_hidden_state", &out.last_hidden_state),
        ];
        let pooled_key = if projected {
            "text_embeds"
        } else {
            "pooler_output"
        };
        let pooled = if projected {
            out.text_embeds.as_ref().expect("text_embeds")
        } else {
            &out.pooled
        };
        checks.push((pooled_key, pooled));
        for (key, got) in checks {
            let name = format!("{te}.{key}");
            println!("{name}: rel err {:.3e}", rel_err(got, &r[&name]));
            assert_close(&name, got, &r[&name], TOL_MODULE);
        }
    }
}

#[test]
fn text_encoder_rejects_bad_ids() {
    let model = ClipTextModel::load(&tiny_model().join("text_encoder"), DType::F32).expect("load");
    let too_long = pcpp_kernels::Tensor::zeros(&[1, 78], DType::F32);
    assert!(model.forward(&too_long).is_err());
    let out_of_vocab = pcpp_kernels::Tensor::from_vec(&[1, 2], vec![49406.0, 1e6]).expect("ids");
    assert!(model.forward(&out_of_vocab).is_err());
}
