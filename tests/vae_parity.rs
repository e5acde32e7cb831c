//! VAE decoder parity against diffusers' reference output for the tiny SDXL model, plus the image
//! post-processing helpers.

use pcpp_kernels::DType;
use pcpp_sdxl::{to_rgb8, to_unit_range, VaeDecoder};
use pcpp_tests::{assert_close, refs, rel_err, tiny_model, TOL_MODULE};

#[test]
fn vae_decode_matches_diffusers() {
    let vae = VaeDecoder::load(&tiny_model().join("vae"), DType::F32).expect("load vae");
    let r = refs("refs-tiny-sdxl/vae_decode.safetensors");
    let out = vae.decode(&r["latent"]).expect("decode");
    println!("decoded: rel err {:.3e}", rel_err(&out, &r["decoded"]));
    assert_close("decoded", &out, &r["decoded"], TOL_MODULE);

    let unit = to_unit_range(&out).expect("unit range");
    assert_close(
        "unit",
        &unit,
        &to_unit_range(&r["decoded"]).expect("unit ref"),
        TOL_MODULE,
    );
    let rgb = to_rgb8(&out).expect("rgb8");
    assert_eq!(rgb.len(), 1);
    assert_eq!(rgb[0].len(), 64 * 48 * 3);
}

#[test]
fn vae_rejects_bad_latents() {
    let vae = VaeDecoder::load(&tiny_model().join("vae"), DType::F32).expect("load vae");
    let bad = pcpp_kernels::Tensor::zeros(&[1, 3, 8, 8], DType::F32);
    assert!(vae.decode(&bad).is_err());
    let unscaled = vae
        .unscale_latents(
            &pcpp_kernels::Tensor::from_vec(&[1, 4, 1, 1], vec![0.13025; 4]).expect("t"),
        )
        .expect("unscale");
    assert!((unscaled.to_vec_f32().expect("v")[0] - 1.0).abs() < 1e-6);
}
