//! Unit tests of the single-file checkpoint conversion: the original layout's UNet and VAE tensor
//! names, and the raw tensors' transposes and row slices.

use super::*;

fn tiny_layout() -> UnetLayout {
    UnetLayout {
        layers: 2,
        up_attn: vec![true, true, false],
    }
}

#[test]
fn sdxl_unet_names_follow_the_original_layout() {
    let l = tiny_layout();
    for (d, o) in [
        ("conv_in.weight", "input_blocks.0.0.weight"),
        (
            "down_blocks.0.resnets.1.conv1.weight",
            "input_blocks.2.0.in_layers.2.weight",
        ),
        (
            "down_blocks.1.attentions.0.proj_in.weight",
            "input_blocks.4.1.proj_in.weight",
        ),
        (
            "down_blocks.1.downsamplers.0.conv.bias",
            "input_blocks.6.0.op.bias",
        ),
        (
            "mid_block.resnets.1.time_emb_proj.weight",
            "middle_block.2.emb_layers.1.weight",
        ),
        (
            "mid_block.attentions.0.norm.weight",
            "middle_block.1.norm.weight",
        ),
        (
            "up_blocks.0.upsamplers.0.conv.weight",
            "output_blocks.2.2.conv.weight",
        ),
        (
            "up_blocks.1.resnets.2.conv_shortcut.weight",
            "output_blocks.5.0.skip_connection.weight",
        ),
        (
            "up_blocks.2.resnets.0.norm2.bias",
            "output_blocks.6.0.out_layers.0.bias",
        ),
        ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ] {
        assert_eq!(unet_to_original(d, &l).as_deref(), Some(o), "{d}");
        assert_eq!(unet_to_diffusers(o, &l).as_deref(), Some(d), "{o}");
    }
}

#[test]
fn vae_names_follow_the_original_layout() {
    for (d, o, proj) in [
        (
            "decoder.up_blocks.0.resnets.1.conv1.weight",
            "decoder.up.3.block.1.conv1.weight",
            false,
        ),
        (
            "decoder.up_blocks.2.upsamplers.0.conv.bias",
            "decoder.up.1.upsample.conv.bias",
            false,
        ),
        (
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "encoder.down.1.block.0.nin_shortcut.weight",
            false,
        ),
        (
            "encoder.mid_block.attentions.0.to_out.0.weight",
            "encoder.mid.attn_1.proj_out.weight",
            true,
        ),
        (
            "decoder.mid_block.resnets.1.norm2.bias",
            "decoder.mid.block_2.norm2.bias",
            false,
        ),
        (
            "encoder.conv_norm_out.weight",
            "encoder.norm_out.weight",
            false,
        ),
    ] {
        assert_eq!(vae_to_original(d, 4), Some((o.to_string(), proj)), "{d}");
        assert_eq!(vae_to_diffusers(o, 4), Some((d.to_string(), proj)), "{o}");
    }
}

#[test]
fn raw_transpose_and_rows() {
    let r = Raw {
        dtype: Dtype::F32,
        shape: vec![2, 3],
        data: (0..6u32).flat_map(|x| (x as f32).to_le_bytes()).collect(),
    };
    let t = r.transposed();
    assert_eq!(t.shape, [3, 2]);
    let vals: Vec<f32> = t
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(vals, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    assert_eq!(r.rows(1, 1).data, r.data[12..]);
    // 2-byte elements (f16 checkpoints): bit patterns move as whole elements
    let h = Raw {
        dtype: Dtype::F16,
        shape: vec![3, 2],
        data: (0..6u16).flat_map(|x| (x + 0x3c00).to_le_bytes()).collect(),
    };
    let t = h.transposed();
    let vals: Vec<u16> = t
        .data
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) - 0x3c00)
        .collect();
    assert_eq!(vals, [0, 2, 4, 1, 3, 5]);
    let fused = Raw::concat_rows(&[&h.rows(2, 1), &h.rows(0, 1)]);
    assert_eq!(fused.shape, [2, 2]);
    assert_eq!(fused.data, [&h.data[8..12], &h.data[0..4]].concat());
}
