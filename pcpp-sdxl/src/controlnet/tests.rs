//! Unit tests of the ControlNet config reader and of the guidance window (diffusers'
//! `controlnet_keep` arithmetic).

use std::path::PathBuf;

use super::*;

fn tmp_config(tag: &str, json: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcpp-cn-unit-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join("config.json");
    std::fs::write(&p, json).expect("write config");
    p
}

const BASE: &str = r#""_class_name": "ControlNetModel", "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
 "block_out_channels": [2, 4], "norm_num_groups": 1, "cross_attention_dim": 64, "attention_head_dim": [2, 4],
 "use_linear_projection": true, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
 "projection_class_embeddings_input_dim": 80"#;

#[test]
fn config_resolves_the_encoder_and_the_embedding() {
    let p = tmp_config("ok", &format!("{{{BASE}}}"));
    let c = ControlNetConfig::from_file(&p).expect("config");
    assert_eq!(c.embedding_channels, [16, 32, 96, 256]);
    assert_eq!(c.up(), 3);
    assert!(!c.bgr);
    assert_eq!(skip_channels(&c.unet), [2, 2, 2, 2, 4, 4]);
    let p = tmp_config(
        "bgr",
        &format!(
            "{{{BASE}, \"controlnet_conditioning_channel_order\": \"bgr\", \"conditioning_embedding_out_channels\": [8, 16]}}"
        ),
    );
    let c = ControlNetConfig::from_file(&p).expect("bgr config");
    assert!(c.bgr);
    assert_eq!(c.up(), 1);
}

#[test]
fn config_errors_name_the_file_and_the_key() {
    for (tag, extra, key) in [
        (
            "chan",
            ", \"conditioning_channels\": 1",
            "conditioning_channels",
        ),
        (
            "pool",
            ", \"global_pool_conditions\": true",
            "global_pool_conditions",
        ),
        (
            "order",
            ", \"controlnet_conditioning_channel_order\": \"rbg\"",
            "channel_order",
        ),
        (
            "class",
            ", \"_class_name\": \"UNet2DConditionModel\"",
            "_class_name",
        ),
        (
            "emb",
            ", \"conditioning_embedding_out_channels\": []",
            "conditioning_embedding_out_channels",
        ),
    ] {
        let body = format!("{{{BASE}{extra}}}");
        // A repeated key: serde_json keeps the last one.
        let p = tmp_config(tag, &body);
        let e = ControlNetConfig::from_file(&p).expect_err(tag).to_string();
        assert!(e.contains("config.json") && e.contains(key), "{tag}: {e}");
    }
}

#[test]
fn keep_follows_diffusers_window() {
    let g = ControlGuidance {
        scale: 0.6,
        start: 0.2,
        end: 0.8,
    };
    // i/4 < 0.2 drops step 0; (i+1)/4 > 0.8 drops step 3.
    let keep: Vec<f32> = (0..4).map(|i| g.keep(i, 4)).collect();
    assert_eq!(keep, [0.0, 1.0, 1.0, 0.0]);
    assert_eq!(g.last_active(4), Some(2));
    let full = ControlGuidance::default();
    assert!((0..7).all(|i| full.keep(i, 7) == 1.0));
    // A window narrower than a step keeps nothing.
    let narrow = ControlGuidance {
        scale: 1.0,
        start: 0.3,
        end: 0.4,
    };
    assert_eq!(narrow.last_active(4), None);
    for bad in [(0.5, 0.5), (-0.1, 1.0), (0.0, 1.1)] {
        let g = ControlGuidance {
            scale: 1.0,
            start: bad.0,
            end: bad.1,
        };
        assert!(g.validate().is_err(), "{bad:?}");
    }
    let nan = ControlGuidance {
        scale: f32::NAN,
        ..ControlGuidance::default()
    };
    assert!(nan.validate().is_err());
}

#[test]
fn control_image_bytes_map_to_unit_range() {
    let t = control_image_from_rgb8(&[0, 255, 51, 102, 0, 255], 1, 2).expect("image");
    assert_eq!(t.shape(), [1, 3, 1, 2]);
    let v = t.to_vec_f32().expect("values");
    assert_eq!(v, [0.0, 0.4, 1.0, 0.0, 0.2, 1.0]);
    assert!(control_image_from_rgb8(&[0; 5], 1, 2).is_err());
}
