#!/usr/bin/env python3
"""Regenerate the diffusers reference data used by the Rust parity tests.

Everything runs on CPU in float32 with a fixed torch thread count and fixed seeds, so re-running with the
versions pinned in scripts/requirements-reference.txt reproduces the shipped files bit for bit (a different
thread count moves results by a few 1e-6 of a tensor's max-abs).

Modes (all paths relative to the repository root, or absolute):

  # reference tensors for a pipeline folder (every file of tests/data/refs-tiny-sdxl + meta.json)
  python scripts/regen_reference.py --model models/tiny-sdxl --out tests/data/refs-tiny-sdxl

  # the tiny random-weight SDXL pipeline folder itself (tokenizers copied from an existing folder)
  python scripts/regen_reference.py --make-model --out models/tiny-sdxl --tokenizers-from models/tiny-sdxl

  # standalone UNet configurations with one reference forward each
  python scripts/regen_reference.py --make-unet alt  --out tests/data/unet-alt
  python scripts/regen_reference.py --make-unet sd15 --out tests/data/unet-sd15

  # only some of the reference files
  python scripts/regen_reference.py --model models/tiny-sdxl --out /tmp/refs --only unet_forward,schedulers

  # DPM-Solver++ 2M (plain and Karras) and Euler ancestral: tables, chained steps, tiny pipelines;
  # the VAE encoder and image-to-image runs (every file of tests/data/samplers)
  python scripts/regen_reference.py --samplers --model models/tiny-sdxl --out tests/data/samplers
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REF_PARTS = ["unet_forward", "unet_activations", "text_encoders", "vae_decode", "schedulers",
             "pipeline_euler", "pipeline_ddim"]

PROMPTS = [
    "A painting of a squirrel eating a burger",
    "a photo of an astronaut riding a horse on mars, 4k, highly detailed, trending on artstation, 8K UHD!!",
    "Café déjà-vu: naïve résumé's   MULTIPLE   spaces\tand\nnewlines... 12345 + 3.14 = x^2 (won't) can't I'm we'll they'd",
    "🚀 東京タワー at night, ¥100 price-tag, e-mail@example.com #hashtag [brackets] {braces} under_score",
    " ".join(["masterpiece, best quality, ultra-detailed photograph of a red fox in a snowy birch forest"] * 5),
]

# Seeds of the random inputs (torch.Generator on CPU, torch.randn in the order listed).
SEED_UNET_INPUTS = 1234      # sample, encoder_hidden_states, text_embeds
SEED_VAE_LATENT = 99
SEED_SCHED_INPUTS = 7        # step_model_outputs, step_initial_sample
SEED_MODEL_INIT = 0          # torch.manual_seed before building each random-weight module
SEED_PERTURB = 1000          # (+ component index) generator for the noise on constant-initialised params
PERTURB_SCALE = 0.1

SDXL_SCHEDULER_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# UNet of diffusers' own SDXL pipeline tests (tests/pipelines/stable_diffusion_xl, get_dummy_components).
TINY_SDXL_UNET = dict(
    block_out_channels=(2, 4), layers_per_block=2, time_cond_proj_dim=None, sample_size=32, in_channels=4,
    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1,
)
TINY_SDXL_VAE = dict(
    block_out_channels=[32, 64], in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128,
    scaling_factor=0.13025,
)
TINY_SDXL_TEXT = dict(
    bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
    num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=49408, hidden_act="gelu",
    projection_dim=32,
)

# Differently shaped UNets for the Rust tests (the code must not assume the tiny SDXL shape).
UNET_VARIANTS = {
    # SDXL-style (text_time conditioning, linear proj) with 3 levels, one resnet per block, per-block
    # transformer depth (mid block: 2), head counts per level (head size 8 at level 1, 6 at level 2),
    # 8 groups of 2-3 channels. Channels are small to keep the files small (f32 + fp16 < 2 MB).
    "alt": dict(
        config=dict(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=(16, 16, 24), layers_per_block=1, transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4), norm_num_groups=8, cross_attention_dim=48,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=24 + 6 * 4,
        ),
        text_embeds_dim=24, batch=2, latent_hw=(16, 24), seq_len=77, timesteps=(999, 261),
        time_ids=[[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 16.0, 32.0, 832.0, 1216.0]],
        fp16=True, seed=4321,
    ),
    # SD-1.5-style: no added conditioning, conv 1x1 proj_in/proj_out, attention_head_dim given as one int.
    # NB: diffusers' UNet2DConditionModel uses attention_head_dim as the number of heads (SD 1.5: 8 heads of 40
    # channels), so here every attention has 8 heads: head size 2 at level 0, 3 at level 1 and in the mid block.
    "sd15": dict(
        config=dict(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=(16, 24, 24), layers_per_block=2, attention_head_dim=8, norm_num_groups=8,
            cross_attention_dim=32, use_linear_projection=False,
        ),
        text_embeds_dim=None, batch=2, latent_hw=(16, 16), seq_len=77, timesteps=(999, 261),
        time_ids=None, fp16=False, seed=5678,
    ),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def stats(t):
    t = t.detach().double()
    return {"shape": list(t.shape), "mean": t.mean().item(), "std": t.std().item(), "absmax": t.abs().max().item()}


def versions():
    import diffusers
    import safetensors
    import transformers
    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__}


def cpu_gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def save(tensors, path):
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path)
    log(f"wrote {path} ({len(tensors)} tensors)")


# ----------------------------------------------------------------------------------------------------------
# random-weight models
# ----------------------------------------------------------------------------------------------------------

def perturb_constant_params(module, seed=SEED_PERTURB, scale=PERTURB_SCALE):
    """Add small noise to every parameter whose initial value is constant (norm weights = 1, zero biases),
    so that a dropped bias or norm affine shows up in a parity test. Returns the number of tensors touched."""
    g = cpu_gen(seed)
    n = 0
    with torch.no_grad():
        for _, p in module.named_parameters():
            flat = p.reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
                n += 1
    return n


def make_model(out_dir, tokenizers_from):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(SEED_MODEL_INIT)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    torch.manual_seed(SEED_MODEL_INIT)
    vae = AutoencoderKL(**TINY_SDXL_VAE)
    torch.manual_seed(SEED_MODEL_INIT)
    te_cfg = CLIPTextConfig(**TINY_SDXL_TEXT)
    text_encoder = CLIPTextModel(te_cfg)
    text_encoder_2 = CLIPTextModelWithProjection(te_cfg)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tokenizers_from, "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(tokenizers_from, "tokenizer_2"))

    comps = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    # one generator per component: seeds 1000, 1001, ... in the order unet, vae, text_encoder, text_encoder_2
    perturbed = {name: perturb_constant_params(m, seed=SEED_PERTURB + i) for i, (name, m) in enumerate(comps.items())}
    param_counts = {name: sum(p.numel() for p in m.parameters()) for name, m in comps.items()}

    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    src_tok = {sub: os.path.abspath(os.path.join(tokenizers_from, sub)) for sub in ("tokenizer", "tokenizer_2")}
    tmp_tok = None
    if os.path.abspath(out_dir) == os.path.abspath(tokenizers_from):  # keep the originals while overwriting
        import tempfile
        tmp_tok = tempfile.mkdtemp()
        for sub, p in src_tok.items():
            shutil.copytree(p, os.path.join(tmp_tok, sub))
            src_tok[sub] = os.path.join(tmp_tok, sub)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Keep the tokenizer files exactly as in the source folder (real CLIP vocabulary, SDXL pad tokens).
    for sub, p in src_tok.items():
        dst = os.path.join(out_dir, sub)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(p, dst)
    if tmp_tok:
        shutil.rmtree(tmp_tok)
    info = {"variant": "diffusers-test", "perturbed_constant_tensors": perturbed, "param_counts": param_counts,
            "torch": torch.__version__}
    with open(os.path.join(out_dir, "fixture_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"wrote pipeline folder {out_dir}: {info}")


def unet_inputs(spec, dtype=torch.float32):
    cfg = spec["config"]
    b, (h, w) = spec["batch"], spec["latent_hw"]
    g = cpu_gen(spec["seed"] + 1)
    d = {"sample": torch.randn(b, cfg["in_channels"], h, w, generator=g),
         "timestep": torch.tensor(spec["timesteps"], dtype=torch.int64),
         "encoder_hidden_states": torch.randn(b, spec["seq_len"], cfg["cross_attention_dim"], generator=g)}
    if spec["text_embeds_dim"]:
        d["text_embeds"] = torch.randn(b, spec["text_embeds_dim"], generator=g)
        d["time_ids"] = torch.tensor(spec["time_ids"], dtype=torch.float32)
    return d


def unet_call(unet, d):
    added = {"text_embeds": d["text_embeds"], "time_ids": d["time_ids"]} if "text_embeds" in d else None
    with torch.no_grad():
        return unet(d["sample"], d["timestep"], encoder_hidden_states=d["encoder_hidden_states"],
                    added_cond_kwargs=added).sample


def make_unet(variant, out_dir):
    from diffusers import UNet2DConditionModel
    spec = UNET_VARIANTS[variant]
    torch.manual_seed(spec["seed"])
    unet = UNet2DConditionModel(**spec["config"]).eval()
    n_pert = perturb_constant_params(unet, seed=spec["seed"] + 2)
    unet_dir = os.path.join(out_dir, "unet")
    unet.save_pretrained(unet_dir, safe_serialization=True)
    d = unet_inputs(spec)
    out = unet_call(unet, d)
    save({**d, "out": out}, os.path.join(out_dir, "unet_forward.safetensors"))
    info = {"variant": variant, "param_count": sum(p.numel() for p in unet.parameters()),
            "perturbed_constant_tensors": n_pert, "out": stats(out), "versions": versions(),
            "torch_threads": torch.get_num_threads()}
    if spec["fp16"]:
        unet16 = UNet2DConditionModel(**spec["config"]).eval()
        unet16.load_state_dict({k: v.to(torch.float16).to(torch.float32) for k, v in unet.state_dict().items()})
        unet.to(torch.float16).save_pretrained(unet_dir, safe_serialization=True, variant="fp16")
        out16 = unet_call(unet16, d)
        save({**d, "out": out16}, os.path.join(out_dir, "unet_forward_fp16weights.safetensors"))
        info["out_fp16weights"] = stats(out16)
        info["fp16weights_vs_f32_max_abs_diff"] = (out16 - out).abs().max().item()
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"wrote {out_dir}: {json.dumps(info)}")


# ----------------------------------------------------------------------------------------------------------
# reference tensors for a pipeline folder
# ----------------------------------------------------------------------------------------------------------

def ref_unet_forward(pipe, out_dir, meta):
    unet = pipe.unet
    g = cpu_gen(SEED_UNET_INPUTS)
    d = {"sample": torch.randn(2, 4, 32, 24, generator=g),
         "timestep": torch.tensor([999, 261], dtype=torch.int64),
         "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
         "text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=g),
         "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
                                   [768.0, 1344.0, 16.0, 32.0, 832.0, 1216.0]])}
    unet_call(unet, d)  # warm-up, so that "seconds" is one steady-state forward
    t0 = time.perf_counter()
    out = unet_call(unet, d)
    seconds = time.perf_counter() - t0
    out_again = unet_call(unet, d)
    ds = dict(d, timestep=torch.tensor(501, dtype=torch.int64))
    out_scalar = unet_call(unet, ds)
    save({**d, "out": out, "timestep_scalar": ds["timestep"], "out_timestep_scalar": out_scalar},
         os.path.join(out_dir, "unet_forward.safetensors"))

    # every submodule's output in the same call; k-th (k >= 1) call of a module gets "#k"
    acts, counts, hooks = {}, {}, []

    def first_tensor(o):
        if torch.is_tensor(o):
            return o
        if isinstance(o, (tuple, list)) and o and torch.is_tensor(o[0]):
            return o[0]
        if hasattr(o, "to_tuple"):
            return first_tensor(o.to_tuple())
        return None

    def make_hook(name):
        def hook(_m, _inp, o):
            t = first_tensor(o)
            if t is None:
                return
            k = counts.get(name, 0)
            counts[name] = k + 1
            acts["act." + name + (f"#{k}" if k else "")] = t.detach().clone()
        return hook

    for name, m in unet.named_modules():
        if name:
            hooks.append(m.register_forward_hook(make_hook(name)))
    try:
        out_act = unet_call(unet, d)
    finally:
        for h in hooks:
            h.remove()
    acts["out"] = out_act
    save(acts, os.path.join(out_dir, "unet_activations.safetensors"))
    meta["unet_forward"] = {"seconds": round(seconds, 4), "out": stats(out), "n_activations": len(acts),
                            "bitwise_repeatable": bool(torch.equal(out, out_again) and torch.equal(out, out_act))}


def ref_text_encoders(pipe, out_dir, meta):
    res = {}
    t0 = time.perf_counter()
    for pre, tok, te in (("te1", pipe.tokenizer, pipe.text_encoder), ("te2", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            o = te(ids, output_hidden_states=True)
        res[f"{pre}.input_ids"] = ids.to(torch.int64)
        res[f"{pre}.embeddings_output"] = o.hidden_states[0]
        res[f"{pre}.last_hidden_state"] = o.last_hidden_state
        res[f"{pre}.penultimate_hidden_state"] = o.hidden_states[-2]
        if pre == "te1":
            res["te1.pooler_output"] = o.pooler_output
        else:
            res["te2.text_embeds"] = o.text_embeds
    seconds = time.perf_counter() - t0
    save(res, os.path.join(out_dir, "text_encoders.safetensors"))
    meta["text_encoders"] = {"seconds": round(seconds, 4), "prompts": PROMPTS,
                             "te2.text_embeds": stats(res["te2.text_embeds"])}


def ref_vae_decode(pipe, out_dir, meta):
    latent = torch.randn(1, 4, 32, 24, generator=cpu_gen(SEED_VAE_LATENT))
    t0 = time.perf_counter()
    with torch.no_grad():
        dec = pipe.vae.decode(latent).sample
    seconds = time.perf_counter() - t0
    save({"latent": latent, "decoded": dec}, os.path.join(out_dir, "vae_decode.safetensors"))
    meta["vae_decode"] = {"seconds": round(seconds, 4), "vae_scale_factor": pipe.vae_scale_factor,
                          "decoded": stats(dec), "note": "decoded = vae.decode(latent).sample, no scaling_factor applied"}


def schedulers_for(model_dir):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    euler = EulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    ddim = DDIMScheduler.from_config(euler.config)
    return {"euler": euler, "ddim": ddim}


def ref_schedulers(model_dir, out_dir, meta):
    res, m = {}, {}
    g = cpu_gen(SEED_SCHED_INPUTS)
    model_outputs = torch.randn(4, 1, 4, 8, 8, generator=g)
    init_sample = torch.randn(1, 4, 8, 8, generator=g)
    res["step_model_outputs"], res["step_initial_sample"] = model_outputs, init_sample
    for name, sch in schedulers_for(model_dir).items():
        res[f"{name}.alphas_cumprod"] = sch.alphas_cumprod.to(torch.float32)
        for n in (1, 2, 4, 25, 30, 50):
            sch.set_timesteps(n)
            res[f"{name}.n{n}.timesteps"] = sch.timesteps.clone()
            if name == "euler":
                res[f"{name}.n{n}.sigmas"] = sch.sigmas.clone()
                m[f"euler.n{n}.init_noise_sigma"] = float(sch.init_noise_sigma)
        sch.set_timesteps(4)
        sample = init_sample * sch.init_noise_sigma
        for i, t in enumerate(sch.timesteps):
            res[f"{name}.step{i}.scaled_input"] = sch.scale_model_input(sample, t)
            sample = sch.step(model_outputs[i], t, sample, return_dict=True).prev_sample
            res[f"{name}.step{i}.prev_sample"] = sample
    # configs after the loop so the dict order matches the shipped meta.json
    for name, sch in schedulers_for(model_dir).items():
        cfg = {k: v for k, v in sch.config.items() if k != "_use_default_values"}  # a set: unordered
        if cfg.get("lambda_min_clipped") == -float("inf"):
            cfg["lambda_min_clipped"] = None  # JSON has no -Infinity; the Rust reader takes null as "no bound"
        m[f"{name}.config"] = cfg
    save(res, os.path.join(out_dir, "schedulers.safetensors"))
    meta["schedulers"] = m


PIPELINE_RUNS = {
    "pipeline_euler": dict(scheduler="euler", call=dict(prompt=PROMPTS[0], guidance_scale=5.0, seed=0,
                                                       num_inference_steps=4)),
    "pipeline_ddim": dict(scheduler="ddim", call=dict(prompt=PROMPTS[1], negative_prompt="blurry, low quality",
                                                     guidance_scale=7.0, seed=1, width=96,
                                                     num_inference_steps=4)),
}


def ref_pipeline(pipe, model_dir, key, out_dir, meta):
    run = PIPELINE_RUNS[key]
    pipe.scheduler = schedulers_for(model_dir)[run["scheduler"]]
    call = dict(run["call"])
    seed = call.pop("seed")
    height = call.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    width = call.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)

    rec = {}

    def unet_hook(_m, args, kwargs, out):
        i = rec["_step"]
        sample, t = args[0], args[1]
        rec[f"step{i}.unet_in"] = sample.detach().clone()
        rec[f"step{i}.timestep"] = t.detach().clone() if torch.is_tensor(t) else torch.tensor(t)
        rec[f"step{i}.unet_out"] = (out[0] if isinstance(out, tuple) else out.sample).detach().clone()
        if i == 0:
            rec["prompt_embeds"] = kwargs["encoder_hidden_states"].detach().clone()
            rec["add_text_embeds"] = kwargs["added_cond_kwargs"]["text_embeds"].detach().clone()
            rec["add_time_ids"] = kwargs["added_cond_kwargs"]["time_ids"].detach().clone()

    times = []

    def on_step_end(_pipe, i, _t, cb_kwargs):
        rec[f"step{i}.latents"] = cb_kwargs["latents"].detach().clone()
        rec["_step"] = i + 1
        times.append(time.perf_counter())
        return cb_kwargs

    def decoder_hook(_m, args, out):
        # the VAE decoder module (after post_quant_conv of latents / scaling_factor)
        rec["vae_decoder_in"] = args[0].detach().clone()
        rec["vae_decoder_out"] = out.detach().clone()

    def run_pipe(output_type, latents=None):
        rec.clear()
        rec["_step"] = 0
        times.clear()
        h = pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)
        hd = pipe.vae.decoder.register_forward_hook(decoder_hook)
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                images = pipe(**call, generator=cpu_gen(seed), latents=latents, output_type=output_type,
                              callback_on_step_end=on_step_end).images
            t1 = time.perf_counter()
        finally:
            h.remove()
            hd.remove()
        prev, step_s = t0, []
        for t in times:
            step_s.append(round(t - prev, 4))
            prev = t
        timing = {"total_s": round(t1 - t0, 4), "step_s": step_s, "after_last_step_s": round(t1 - times[-1], 4)}
        r = {k: v for k, v in rec.items() if k != "_step"}
        return images, r, timing

    lat, rec_lat, timing_latent = run_pipe("latent")
    img, rec_np, timing_np = run_pipe("np")
    lat2, rec_lat2, timing_latent_rerun = run_pipe("latent")
    img2, _, timing_np_rerun = run_pipe("np")
    initial_noise = torch.randn(shape, generator=cpu_gen(seed))
    lat3, _, _ = run_pipe("latent", latents=initial_noise.clone())

    res = {"initial_noise": initial_noise,
           "init_noise_sigma": torch.tensor(float(pipe.scheduler.init_noise_sigma), dtype=torch.float32),
           "timesteps": pipe.scheduler.timesteps.clone()}
    if hasattr(pipe.scheduler, "sigmas"):
        res["sigmas"] = pipe.scheduler.sigmas.clone()
    res.update({k: v for k, v in rec_np.items() if not k.startswith("vae_")})
    res["final_latents"] = lat
    res["vae_decoder_in"] = rec_np["vae_decoder_in"]
    res["vae_decoder_out"] = rec_np["vae_decoder_out"]
    res["image_np"] = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float32)
    save(res, os.path.join(out_dir, f"{key}.safetensors"))

    same_latents = all(torch.equal(rec_lat[k], rec_np[k]) for k in rec_lat)
    meta[key] = {
        "call": run["call"], "height": height, "width": width, "scheduler": type(pipe.scheduler).__name__,
        "timing_latent": timing_latent, "timing_np": timing_np,
        "timing_latent_rerun": timing_latent_rerun, "timing_np_rerun": timing_np_rerun,
        "deterministic_latent_bitwise": bool(torch.equal(lat, lat2)
                                             and all(torch.equal(rec_lat[k], rec_lat2[k]) for k in rec_lat)),
        "deterministic_np_bitwise": bool(np.array_equal(img, img2)),
        "explicit_noise_equals_generator_run": bool(torch.equal(lat, lat3)),
        "latent_run_equals_np_run_latents": bool(same_latents),
        "final_latents": stats(lat), "image_np": stats(res["image_np"]),
    }


# ----------------------------------------------------------------------------------------------------------
# more samplers (DPM-Solver++ 2M, its Karras variant, Euler ancestral): tests/data/samplers
# ----------------------------------------------------------------------------------------------------------

SEED_SAMPLER_INPUTS = 11     # step_model_outputs, step_initial_sample, step_noise
SAMPLER_STEP_COUNTS = (1, 2, 3, 4, 10, 25, 30, 50)
SAMPLER_CHAIN_STEPS = 6


def sampler_variants(model_dir):
    """name -> (diffusers class, config overrides applied to the folder's (Euler) scheduler config)."""
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
    return {
        "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
        "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        # other configurations: spacing, prediction type, final sigma
        "dpmpp_2m_linspace_v": (DPMSolverMultistepScheduler,
                                {"timestep_spacing": "linspace", "steps_offset": 0,
                                 "prediction_type": "v_prediction"}),
        "dpmpp_2m_karras_sigma_min": (DPMSolverMultistepScheduler,
                                      {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                                       "timestep_spacing": "trailing"}),
        "euler_a_trailing_v": (EulerAncestralDiscreteScheduler,
                               {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    }


def make_sampler(model_dir, name):
    from diffusers import EulerDiscreteScheduler
    base = EulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    cls, over = sampler_variants(model_dir)[name]
    return cls.from_config(base.config, **over)


def ref_sampler_tables(model_dir, out_dir, meta):
    res, m = {}, {}
    g = cpu_gen(SEED_SAMPLER_INPUTS)
    n_chain = SAMPLER_CHAIN_STEPS
    model_outputs = torch.randn(n_chain, 1, 4, 4, 4, generator=g)
    init_sample = torch.randn(1, 4, 4, 4, generator=g)
    step_noise = torch.randn(n_chain, 1, 4, 4, 4, generator=g)
    res.update(step_model_outputs=model_outputs, step_initial_sample=init_sample, step_noise=step_noise)
    for name in sampler_variants(model_dir):
        sch = make_sampler(model_dir, name)
        for n in SAMPLER_STEP_COUNTS:
            sch.set_timesteps(n)
            res[f"{name}.n{n}.timesteps"] = sch.timesteps.clone()
            res[f"{name}.n{n}.sigmas"] = sch.sigmas.clone()
            m[f"{name}.n{n}.init_noise_sigma"] = float(sch.init_noise_sigma)
        sch.set_timesteps(n_chain)
        sample = init_sample * sch.init_noise_sigma
        for i, t in enumerate(sch.timesteps):
            res[f"{name}.step{i}.scaled_input"] = sch.scale_model_input(sample, t)
            if name.startswith("euler_a"):
                # EulerAncestralDiscreteScheduler draws its noise with randn_tensor(shape, generator):
                # a generator that yields exactly step_noise[i]
                out = sch.step(model_outputs[i], t, sample, generator=_FixedNoise(step_noise[i]))
            else:
                out = sch.step(model_outputs[i], t, sample)
            sample = out.prev_sample
            res[f"{name}.step{i}.prev_sample"] = sample
        # add_noise at every step index (image-to-image starts there), with step_noise[0]
        for i, t in enumerate(sch.timesteps):
            fresh = make_sampler(model_dir, name)
            fresh.set_timesteps(n_chain)
            fresh.set_begin_index(i)
            res[f"{name}.add_noise{i}"] = fresh.add_noise(init_sample, step_noise[0], t.reshape(1))
        cfg = {k: v for k, v in sch.config.items() if k != "_use_default_values"}  # a set: unordered
        if cfg.get("lambda_min_clipped") == -float("inf"):
            cfg["lambda_min_clipped"] = None  # JSON has no -Infinity; the Rust reader takes null as "no bound"
        m[f"{name}.config"] = cfg
    save(res, os.path.join(out_dir, "schedulers.safetensors"))
    meta["schedulers"] = m


class _FixedNoise:
    """Stands in for a torch.Generator: diffusers' randn_tensor passes it to torch.randn, which we intercept."""

    def __init__(self, noise):
        self.noise = noise
        self.device = torch.device("cpu")


SAMPLER_PIPELINES = {
    "pipeline_dpmpp_2m": dict(scheduler="dpmpp_2m", call=dict(prompt=PROMPTS[0], guidance_scale=5.0, seed=3,
                                                              height=32, width=32, num_inference_steps=5)),
    "pipeline_dpmpp_2m_karras": dict(scheduler="dpmpp_2m_karras",
                                     call=dict(prompt=PROMPTS[1], negative_prompt="blurry, low quality",
                                               guidance_scale=7.0, seed=4, height=32, width=48,
                                               num_inference_steps=5)),
    "pipeline_euler_a": dict(scheduler="euler_a", call=dict(prompt=PROMPTS[0], guidance_scale=5.0, seed=5,
                                                            height=32, width=32, num_inference_steps=4)),
}


def ref_sampler_pipeline(pipe, model_dir, key, out_dir, meta):
    run = SAMPLER_PIPELINES[key]
    pipe.scheduler = make_sampler(model_dir, run["scheduler"])
    call = dict(run["call"])
    seed = call.pop("seed")
    steps = call["num_inference_steps"]
    height = call.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    width = call.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    rec = {"_step": 0}

    def on_step_end(_pipe, i, _t, cb_kwargs):
        rec[f"step{i}.latents"] = cb_kwargs["latents"].detach().clone()
        return cb_kwargs

    with torch.no_grad():
        lat = pipe(**call, generator=cpu_gen(seed), output_type="latent", callback_on_step_end=on_step_end).images
        img = pipe(**call, generator=cpu_gen(seed), output_type="np").images
    # the generator's stream: the initial noise, then (Euler ancestral) one noise tensor per step
    g = cpu_gen(seed)
    res = {"initial_noise": torch.randn(shape, generator=g)}
    if run["scheduler"].startswith("euler_a"):
        for i in range(steps):
            res[f"step{i}.noise"] = torch.randn(shape, generator=g)
    res["timesteps"] = pipe.scheduler.timesteps.clone()
    res["sigmas"] = pipe.scheduler.sigmas.clone()
    res.update({k: v for k, v in rec.items() if k != "_step"})
    res["final_latents"] = lat
    res["image_np"] = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float32)
    save(res, os.path.join(out_dir, f"{key}.safetensors"))
    meta[key] = {"call": run["call"], "height": height, "width": width, "scheduler": type(pipe.scheduler).__name__,
                 "config_overrides": sampler_variants(model_dir)[run["scheduler"]][1],
                 "final_latents": stats(lat), "image_np": stats(res["image_np"])}


SEED_IMG2IMG_IMAGE = 21
IMG2IMG_RUNS = {
    # image-to-image from the VAE encoder's mean (passed to diffusers as 4-channel latents, so its own
    # latent_dist.sample() is bypassed); the generator's first randn is the noise added at the start step
    "img2img_euler": dict(scheduler="euler", call=dict(prompt=PROMPTS[0], guidance_scale=5.0, seed=6, strength=0.6,
                                                       num_inference_steps=5, original_size=(64, 48),
                                                       crops_coords_top_left=(4, 8), target_size=(32, 48))),
    "img2img_dpmpp_2m_karras": dict(scheduler="dpmpp_2m_karras",
                                    call=dict(prompt=PROMPTS[1], negative_prompt="blurry, low quality",
                                              guidance_scale=7.0, seed=7, strength=0.5, num_inference_steps=6)),
}


def ref_vae_encode_and_img2img(model_dir, out_dir, meta):
    import PIL.Image
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    g = cpu_gen(SEED_IMG2IMG_IMAGE)
    image_u8 = torch.randint(0, 256, (32, 48, 3), generator=g, dtype=torch.uint8)
    # smooth it a little so the image is not pure noise (a gradient plus the random pixels)
    ramp = torch.linspace(0, 128, 48).to(torch.uint8).view(1, 48, 1)
    image_u8 = (image_u8 // 2 + ramp).to(torch.uint8)
    pil = PIL.Image.fromarray(image_u8.numpy())
    image = pipe.image_processor.preprocess(pil)
    with torch.no_grad():
        dist = pipe.vae.encode(image).latent_dist
    mean = dist.mean
    res = {"image_u8": image_u8, "image": image, "mean": mean, "logvar": dist.logvar}
    save(res, os.path.join(out_dir, "vae_encode.safetensors"))
    meta["vae_encode"] = {"image": "image_u8 [H,W,3] -> VaeImageProcessor.preprocess -> image [1,3,H,W]",
                          "mean": stats(mean), "logvar": stats(dist.logvar)}
    init_latents = mean * pipe.vae.config.scaling_factor
    for key, run in IMG2IMG_RUNS.items():
        if run["scheduler"] == "euler":
            pipe.scheduler = EulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
        else:
            pipe.scheduler = make_sampler(model_dir, run["scheduler"])
        call = dict(run["call"])
        seed = call.pop("seed")
        rec = {}

        def unet_hook(_m, args, kwargs, out):
            if "add_time_ids" not in rec:
                rec["add_time_ids"] = kwargs["added_cond_kwargs"]["time_ids"].detach().clone()
                rec["first_timestep"] = args[1].detach().clone().reshape(1).to(torch.float32)

        h = pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)
        try:
            with torch.no_grad():
                lat = pipe(**call, image=init_latents.clone(), generator=cpu_gen(seed), output_type="latent").images
        finally:
            h.remove()
        noise = torch.randn(init_latents.shape, generator=cpu_gen(seed))
        out = {"initial_noise": noise, "final_latents": lat, "timesteps": pipe.scheduler.timesteps.clone(), **rec}
        save(out, os.path.join(out_dir, f"{key}.safetensors"))
        meta[key] = {"call": run["call"], "scheduler": type(pipe.scheduler).__name__,
                     "config_overrides": sampler_variants(model_dir).get(run["scheduler"], (None, {}))[1],
                     "final_latents": stats(lat)}


def make_sampler_refs(model_dir, out_dir):
    import diffusers.utils.torch_utils as tu
    from diffusers import StableDiffusionXLPipeline
    # randn_tensor(shape, generator=_FixedNoise) returns the fixed tensor (used by the chained Euler-a steps)
    orig_randn_tensor = tu.randn_tensor

    def randn_tensor(shape, generator=None, **kw):
        if isinstance(generator, _FixedNoise):
            assert tuple(generator.noise.shape) == tuple(shape)
            return generator.noise.clone()
        return orig_randn_tensor(shape, generator=generator, **kw)

    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
    ea.randn_tensor = randn_tensor
    os.makedirs(out_dir, exist_ok=True)
    meta = {"versions": versions(), "torch_threads": torch.get_num_threads(), "model": model_dir}
    ref_sampler_tables(model_dir, out_dir, meta)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for key in SAMPLER_PIPELINES:
        ref_sampler_pipeline(pipe, model_dir, key, out_dir, meta)
    ref_vae_encode_and_img2img(model_dir, out_dir, meta)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    log(f"wrote {out_dir}/meta.json")


def make_refs(model_dir, out_dir, only):
    from diffusers import StableDiffusionXLPipeline
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    meta = {}
    if only != REF_PARTS and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    meta.update({"versions": versions(), "torch_threads": torch.get_num_threads(), "model": model_dir})
    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    meta["load_s"] = round(time.perf_counter() - t0, 3)
    for part in only:
        log(f"== {part}")
        if part == "unet_forward" or part == "unet_activations":
            if "unet_forward" not in meta.get("_done", []):
                ref_unet_forward(pipe, out_dir, meta)
                meta.setdefault("_done", []).append("unet_forward")
        elif part == "text_encoders":
            ref_text_encoders(pipe, out_dir, meta)
        elif part == "vae_decode":
            ref_vae_decode(pipe, out_dir, meta)
        elif part == "schedulers":
            ref_schedulers(model_dir, out_dir, meta)
        elif part.startswith("pipeline_"):
            ref_pipeline(pipe, model_dir, part, out_dir, meta)
    meta.pop("_done", None)
    order = ["versions", "torch_threads", "model", "load_s"] + REF_PARTS
    meta = {k: meta[k] for k in order if k in meta}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    log(f"wrote {meta_path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="pipeline folder to read (reference mode)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--make-model", action="store_true", help="write the tiny random-weight pipeline to --out")
    ap.add_argument("--tokenizers-from", help="folder holding tokenizer/ and tokenizer_2/ to copy (--make-model)")
    ap.add_argument("--make-unet", choices=sorted(UNET_VARIANTS), help="write a standalone UNet variant to --out")
    ap.add_argument("--samplers", action="store_true",
                    help="write the DPM-Solver++ / Euler ancestral references for --model to --out")
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(REF_PARTS))
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as the shipped data)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.make_model:
        if not args.tokenizers_from:
            ap.error("--make-model needs --tokenizers-from")
        make_model(args.out, args.tokenizers_from)
    elif args.samplers:
        if not args.model:
            ap.error("--samplers needs --model")
        make_sampler_refs(args.model, args.out)
    elif args.make_unet:
        os.makedirs(args.out, exist_ok=True)
        make_unet(args.make_unet, args.out)
    else:
        if not args.model:
            ap.error("--model is required in reference mode")
        only = REF_PARTS if not args.only else [p.strip() for p in args.only.split(",")]
        bad = [p for p in only if p not in REF_PARTS]
        if bad:
            ap.error(f"unknown parts: {bad}")
        make_refs(args.model, args.out, only)


if __name__ == "__main__":
    main()
