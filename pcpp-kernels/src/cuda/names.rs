//! The names of the CUDA kernels the back-end loads from the NVRTC module of
//! [`super::KERNEL_SOURCE`] (the `extern "C"` entries of `kernels.cu`, `flash_attn.cu`,
//! `flash_hopper.cu`, `flash_ws.cu`, `vector.cu` and `instances.cu`).

/// The names of every `extern "C"` kernel in [`KERNEL_SOURCE`].
pub fn kernel_names() -> Vec<String> {
    let mut v: Vec<String> = [
        "cast_f32_f16",
        "cast_f32_bf16",
        "cast_f16_f32",
        "cast_bf16_f32",
        "cast_f16_bf16",
        "cast_bf16_f16",
        "gn_finalize",
        "gn_moments",
        "gn_merge",
        "gn_merge_sums",
        "flash_attn_f16",
        "flash_attn_bf16",
        "flash_attn128_f16",
        "flash_attn128_bf16",
        "flash_attn128q_f16",
        "flash_attn128q_bf16",
        "flash_attn128q64_f16",
        "flash_attn128q64_bf16",
        "flash_wg64_f16",
        "flash_wg64_bf16",
        "flash_wg128_f16",
        "flash_wg128_bf16",
        "flash_ws64_f16",
        "flash_ws64_bf16",
        "flash_ws128_f16",
        "flash_ws128_bf16",
        "flash_wsp64_f16",
        "flash_wsp64_bf16",
        "flash_wsp128_f16",
        "flash_wsp128_bf16",
        "flash_wso64_f16",
        "flash_wso64_bf16",
        "flash_wso128_f16",
        "flash_wso128_bf16",
        "flash_ws3w64_f16",
        "flash_ws3w64_bf16",
        "flash_ws3wo64_f16",
        "flash_ws3wo64_bf16",
        "copy2d_u128",
        "cat_multi_u16",
        "cat_multi_u128",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for t in ["f32", "f16", "bf16"] {
        for k in [
            "unary",
            "binary",
            "binary_same",
            "geglu",
            "geglu_vec",
            "rotate_pairs",
            "binary_same_vec",
            "unary_vec",
            "rowb_binary",
            "row_norm_warp",
            "add_row_norm_warp",
            "gated_add",
            "gn_sums",
            "gn_apply",
            "gn_apply_planes",
            "plane_binary",
            "plane_binary_vec",
            "gn_apply_planes_vec",
            "gn_sums_vec",
            "transpose_pairs",
            "gn_apply_nhwc",
            "row_norm_reg2",
            "row_norm_reg3",
            "row_norm_reg5",
            "row_norm_reg12",
            "layer_norm",
            "rms_norm",
            "softmax",
            "upsample2x",
            "bias_nchw",
            "timestep_emb",
            "fill_uniform",
            "nonfinite_mark",
        ] {
            v.push(format!("{k}_{t}"));
        }
    }
    for w in ["u16", "u32"] {
        for k in ["copy2d", "permute", "pad2d", "gather_rows", "transpose"] {
            v.push(format!("{k}_{w}"));
        }
    }
    v
}
