//! Image-to-image parity against diffusers 0.42.1 (`tests/data/samplers/`): the image
//! pre-processing (`u8` → `[-1, 1]`), the VAE encoder's latent mean, and whole
//! `StableDiffusionXLImg2ImgPipeline` runs (Euler with SDXL micro-conditioning flags, DPM-Solver++
//! 2M Karras with a negative prompt) started from the encoder's mean, the stored noise and a
//! `strength` that truncates the schedule.

use pcpp_core::{SerialDriver, SerialFactory};
use pcpp_kernels::DType;
use pcpp_sdxl::scheduler::SchedulerKind;
use pcpp_sdxl::{
    denoise_with, image_from_rgb8, DenoiseParams, DenoiseStart, MicroCond, Pipeline, StepNoise,
};
use pcpp_tests::{assert_close, data, refs, rel_err, tiny_model, TOL_MODULE, TOL_PIPELINE};

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(data("samplers/meta.json")).expect("samplers/meta.json");
    serde_json::from_str(&text).expect("meta.json parses")
}

fn pair(v: &serde_json::Value) -> Option<(usize, usize)> {
    Some((v[0].as_u64()? as usize, v[1].as_u64()? as usize))
}

#[test]
fn preprocess_and_encoder_mean_match() {
    let r = refs("samplers/vae_encode.safetensors");
    let u8s: Vec<u8> = r["image_u8"]
        .to_vec_f32()
        .expect("f32")
        .iter()
        .map(|&x| x as u8)
        .collect();
    let (h, w) = (r["image_u8"].shape()[0], r["image_u8"].shape()[1]);
    let image = image_from_rgb8(&u8s, h, w).expect("image");
    let e = image.max_abs_diff(&r["image"]).expect("diff");
    assert_eq!(e, 0.0, "preprocessed image differs by {e}");
    let pipe = Pipeline::load(&tiny_model(), DType::F32, &SerialFactory).expect("load");
    let enc = pipe.load_vae_encoder(DType::F32).expect("encoder");
    let mean = enc.encode_mean(&image).expect("encode");
    println!("encoder mean rel err {:.3e}", rel_err(&mean, &r["mean"]));
    assert_close("vae mean", &mean, &r["mean"], TOL_MODULE);
    assert!(enc
        .encode_mean(&image.narrow(3, 0, w - 1).expect("narrow"))
        .is_err());
}

fn run(name: &str, kind: SchedulerKind) {
    let meta = meta();
    let call = &meta[name]["call"];
    let r = refs(&format!("samplers/{name}.safetensors"));
    let enc_ref = refs("samplers/vae_encode.safetensors");
    let pipe = Pipeline::load(&tiny_model(), DType::F32, &SerialFactory).expect("load");
    let enc = pipe.load_vae_encoder(DType::F32).expect("encoder");
    let mean = enc.encode_mean(&enc_ref["image"]).expect("encode");
    let latents = enc.scale_latents(&mean).expect("scale");
    let (h, w) = (enc_ref["image"].shape()[2], enc_ref["image"].shape()[3]);
    let mut micro = MicroCond::for_size(h, w);
    if let Some(o) = pair(&call["original_size"]) {
        micro.original_size = o;
    }
    if let Some(c) = pair(&call["crops_coords_top_left"]) {
        micro.crop_top_left = c;
    }
    if let Some(t) = pair(&call["target_size"]) {
        micro.target_size = t;
    }
    let want_ids = r["add_time_ids"].to_vec_f32().expect("ids");
    let (o, c, t) = (micro.original_size, micro.crop_top_left, micro.target_size);
    let ids = [o.0, o.1, c.0, c.1, t.0, t.1].map(|x| x as f32);
    assert_eq!(&want_ids[..6], ids.as_slice(), "{name}: add_time_ids");
    let steps = call["num_inference_steps"].as_u64().expect("steps") as usize;
    let params = DenoiseParams {
        steps,
        guidance: call["guidance_scale"].as_f64().expect("guidance") as f32,
        scheduler: kind,
        micro,
        cuda_graphs: false,
    };
    let embeds = pipe
        .text
        .encode(
            call["prompt"].as_str().expect("prompt"),
            call["negative_prompt"].as_str(),
            true,
        )
        .expect("encode");
    let strength = call["strength"].as_f64().expect("strength") as f32;
    let mut ran = 0;
    let out = denoise_with(
        &pipe.unet,
        None,
        &SerialDriver,
        &pipe.scheduler,
        &params,
        &embeds,
        &DenoiseStart::Image {
            latents: &latents,
            noise: &r["initial_noise"],
            strength,
        },
        &StepNoise::Derived,
        &mut |i, _| ran = i,
    )
    .expect("denoise")
    .latents;
    let first = pcpp_sdxl::img2img_start_step(steps, strength).expect("start");
    assert_eq!(ran, steps - first, "{name}: steps run");
    let sched = pcpp_sdxl::scheduler::build(kind, &pipe.scheduler, steps).expect("sched");
    assert_eq!(
        sched.timesteps()[first] as f32,
        r["first_timestep"].to_vec_f32().expect("t")[0],
        "{name}: first timestep"
    );
    println!(
        "{name}: final latents rel err {:.3e}",
        rel_err(&out, &r["final_latents"])
    );
    assert_close(name, &out, &r["final_latents"], TOL_PIPELINE);
}

#[test]
fn img2img_euler_with_micro_conditioning_matches_diffusers() {
    run("img2img_euler", SchedulerKind::Euler);
}

#[test]
fn img2img_dpmpp_2m_karras_matches_diffusers() {
    run("img2img_dpmpp_2m_karras", SchedulerKind::DpmPp2MKarras);
}
