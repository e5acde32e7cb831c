//! The names of the CUDA kernels the back-end loads from the NVRTC module of
//! [`super::KERNEL_SOURCE`] (the `extern "C"` entries of `kernels.cu`, `flash_attn.cu`,
//! `flash_hopper.cu`, `flash_ws.cu`, `gemm_wg.cu`, `vector.cu` and `instances.cu`).

/// The names of every `extern "C"` kernel in [`super::KERNEL_SOURCE`].
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
        "flash_small64_f16",
        "flash_small64_bf16",
        "flash_small64s2_f16",
        "flash_small64s2_bf16",
        "flash_small64s4_f16",
        "flash_small64s4_bf16",
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
        "flash_wsr64_f16",
        "flash_wsr64_bf16",
        "flash_wsr128_f16",
        "flash_wsr128_bf16",
        "flash_ws3wr64_f16",
        "flash_ws3wr64_bf16",
        "gemm_wg_f16",
        "gemm_wg_bf16",
        "gemm_wg_geglu_f16",
        "gemm_wg_geglu_bf16",
        "gemm_wg_ln_f16",
        "gemm_wg_ln_bf16",
        "gemm_wg_ln_geglu_f16",
        "gemm_wg_ln_geglu_bf16",
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

#[cfg(test)]
mod tests {
    use super::super::KERNEL_SOURCE;

    /// The body of every `extern "C"` kernel definition in `src` (from its opening brace on), by
    /// the line it starts on. Mentions in comments are skipped.
    fn kernel_bodies(src: &str) -> Vec<(usize, &str)> {
        let key = "extern \"C\" __global__";
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(at) = src[from..].find(key).map(|i| i + from) {
            from = at + key.len();
            let line_start = src[..at].rfind('\n').map_or(0, |i| i + 1);
            if src[line_start..at].trim_start().starts_with("//") {
                continue;
            }
            // The body opens at the first brace after the key (no kernel signature has one).
            let brace = src[from..]
                .find('{')
                .map(|i| i + from)
                .expect("kernel body");
            out.push((src[..at].lines().count() + 1, &src[brace + 1..]));
        }
        out
    }

    /// Programmatic dependent launch lets a kernel's blocks start before the kernel before it
    /// has finished (`ops::launch_ex`): a kernel of this source that touched memory before
    /// `pdl_begin` waited would race with its predecessor. The one other allowed start is
    /// `pdl_l2_then_wait` (gemm_wg.cu), which only asks L2 for weights before it waits.
    #[test]
    fn every_kernel_waits_for_its_predecessor() {
        let bodies = kernel_bodies(KERNEL_SOURCE);
        assert!(bodies.len() >= 50, "found only {} kernels", bodies.len());
        for (line, body) in bodies {
            let first = body
                .trim_start_matches(|c: char| c.is_whitespace() || c == '\\')
                .split(';')
                .next()
                .unwrap_or_default()
                .trim();
            assert!(
                first == "pdl_begin()" || first.starts_with("pdl_l2_then_wait("),
                "the kernel at line {line} of KERNEL_SOURCE does not start with pdl_begin()"
            );
        }
    }

    /// The L2 prefetch before the wait is the only memory instruction there, and it ends in
    /// `pdl_begin`.
    #[test]
    fn the_l2_prefetch_waits_before_returning() {
        let at = KERNEL_SOURCE
            .find("void pdl_l2_then_wait(")
            .expect("pdl_l2_then_wait is defined");
        let body = &KERNEL_SOURCE[at..];
        let body = &body[..body.find("\n}\n").expect("end of the function")];
        assert!(body.trim_end().ends_with("pdl_begin();"));
        assert!(!body.contains("ld.") && !body.contains("st.") && !body.contains("cp.async.cg"));
        assert!(body.contains("cp.async.bulk.prefetch.L2"));
    }

    #[test]
    fn a_kernel_without_the_wait_is_found() {
        let src = "// extern \"C\" __global__ in a comment\nextern \"C\" __global__ void \
                   __launch_bounds__(128) k(int* x) { x[0] = 1; }";
        let bodies = kernel_bodies(src);
        assert_eq!(bodies.len(), 1);
        assert!(bodies[0].1.trim_start().starts_with("x[0] = 1;"));
    }
}
