//! The tiny Flux.1 pipelines on the GPU against diffusers' references: the transformer forward in
//! f32 (pipeline tolerance) and bf16 (Flux's native dtype, storage precision), and a whole
//! FLUX.1-dev generation in f32 and bf16 from the stored noise; and the time of one step of the
//! full-size FLUX.1-dev transformer (random bf16 weights from its config) at 1024². Ignored by
//! default (needs a GPU): `cargo test --release --features cuda --test cuda_flux_parity -- --ignored --nocapture`.
#![cfg(feature = "cuda")]

use pcpp_core::{SerialDriver, SerialFactory};
use pcpp_flux::{FluxCond, FluxPipeline, FluxTransformer};
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_tests::{refs, rel_err, repo, TOL_PIPELINE};

const GPU: Device = Device::Cuda(0);

fn host(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn transformer(dtype: DType) -> f32 {
    let dir = repo().join("models/tiny-flux-dev/transformer");
    let tr = FluxTransformer::load_on(&dir, dtype, GPU, &SerialFactory).unwrap();
    let r = refs("refs-tiny-flux/transformer_dev.safetensors");
    let dev = |n: &str| r[n].to_dtype(dtype).unwrap().to_device(GPU).unwrap();
    let cond = FluxCond::new(
        &r["encoder_hidden_states"],
        &r["pooled_projections"],
        Some(3.5),
        dtype,
        GPU,
    )
    .unwrap();
    let t = Tensor::from_vec(&[1], vec![0.625])
        .unwrap()
        .to_device(GPU)
        .unwrap();
    let out = tr
        .forward_packed(&dev("hidden_states"), (3, 5), &t, &cond)
        .unwrap();
    assert_eq!(out.device(), GPU, "the transformer output left the GPU");
    let e = rel_err(&host(&out), &r["out"]);
    println!("tiny Flux transformer on the GPU, {dtype}: rel err {e:.2e}");
    e
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_flux_transformer_on_gpu_matches_diffusers() {
    let e = transformer(DType::F32);
    assert!(e <= TOL_PIPELINE, "f32 rel err {e:e}");
    let e = transformer(DType::BF16);
    assert!(e <= 8e-2, "bf16 rel err {e:e}");
}

fn pipeline(dtype: DType) -> (f32, f32) {
    let pipe = FluxPipeline::load(&repo().join("models/tiny-flux-dev"), dtype, dtype, GPU).unwrap();
    let r = refs("refs-tiny-flux/pipeline_dev_wide.safetensors");
    let prompt = pipe
        .encode_prompt(
            "a photo of an astronaut riding a horse on mars, 4k, highly detailed!!",
            512,
        )
        .unwrap();
    let lat = pipe
        .denoise(
            &prompt,
            &r["init_noise"],
            3,
            Some(4.0),
            &SerialDriver,
            true,
            &mut |_, _| {},
        )
        .unwrap()
        .latents;
    let img = pipe.decode(&lat).unwrap();
    assert_eq!(img.device(), GPU, "the VAE ran off the GPU");
    let (el, ei) = (
        rel_err(&host(&lat), &r["latents"]),
        rel_err(&host(&img), &r["image"]),
    );
    println!("tiny FLUX.1-dev pipeline on the GPU, {dtype}: latents {el:.2e}, image {ei:.2e}");
    (el, ei)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_flux_pipeline_on_gpu_matches_diffusers() {
    // with the feed-forward GELUs computed apart and in cuBLASLt's epilogue
    for fused in [false, true] {
        pcpp_kernels::cuda::set_fused_epilogues(fused);
        let (el, ei) = pipeline(DType::F32);
        assert!(
            el <= TOL_PIPELINE && ei <= TOL_PIPELINE,
            "f32, fused GELU {fused}: {el:e} {ei:e}"
        );
        let (el, ei) = pipeline(DType::BF16);
        assert!(
            el <= 1e-1 && ei <= 1e-1,
            "bf16, fused GELU {fused}: {el:e} {ei:e}"
        );
    }
    pcpp_kernels::cuda::set_fused_epilogues(true);
}

#[test]
#[ignore = "needs a CUDA GPU with 30 GB free"]
fn full_size_flux_dev_transformer_step_on_gpu() {
    let cfg = repo().join("pcpp-flux/configs/flux1-dev/transformer/config.json");
    let t0 = std::time::Instant::now();
    let tr = FluxTransformer::random(&cfg, DType::BF16, GPU, 7, &SerialFactory).unwrap();
    println!(
        "random FLUX.1-dev transformer built in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let c = tr.config().clone();
    let (hp, wp, t) = (64, 64, 512); // 1024² image: 128² latents, 64² packed tokens
    let rnd = |shape: &[usize], seed: u64| {
        Tensor::rand_uniform(shape, DType::BF16, GPU, (-1.0, 1.0), seed).unwrap()
    };
    let img = rnd(&[1, c.in_channels / 4, 2 * hp, 2 * wp], 1);
    let txt = rnd(&[1, t, c.joint_attention_dim], 2);
    let pooled = rnd(&[1, c.pooled_projection_dim], 3);
    let cond = FluxCond::new(&txt, &pooled, Some(3.5), DType::BF16, GPU).unwrap();
    let ts = Tensor::from_vec(&[1], vec![0.5])
        .unwrap()
        .to_device(GPU)
        .unwrap();
    let ctx = pcpp_core::StepCtx::serial();
    let mut out = tr.forward(&ctx, &img, &ts, &cond).unwrap();
    pcpp_kernels::synchronize(GPU).unwrap();
    let t1 = std::time::Instant::now();
    for _ in 0..3 {
        out = tr.forward(&ctx, &img, &ts, &cond).unwrap();
    }
    pcpp_kernels::synchronize(GPU).unwrap();
    let per_step = t1.elapsed().as_secs_f64() / 3.0;
    println!("FLUX.1-dev transformer, 1024², 512 text tokens, bf16: {per_step:.3} s per step");
    assert_eq!(out.shape(), [1, c.out_channels() / 4, 2 * hp, 2 * wp]);
    let v = host(&out).to_vec_f32().unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "non-finite output");
}
