#!/usr/bin/env python3
"""Regenerate the ControlNet fixtures and diffusers references used by tests/controlnet_parity.rs.

On the tiny SDXL pipeline (--model), writes to --out:

  controlnet/                 ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
                              (torch.manual_seed(SEED_NET) before building it): its conditioning embedding
                              halves the control image once, as the tiny VAE does (scale factor 2; SDXL's
                              embedding and VAE both scale by 8), so that the pipeline's latents and control
                              image fit; every zero convolution (controlnet_down_blocks.*, controlnet_mid_block,
                              controlnet_cond_embedding.conv_out) given random non-zero weights and biases;
                              saved with save_pretrained (config.json + diffusion_pytorch_model.safetensors)
  controlnet_b/               a second one (SEED_NET_B), for a MultiControlNet run
  controlnet_px8/             one with SDXL's default embedding (16, 32, 96, 256): the control image at 8x the
                              latent, as in SDXL (SEED_NET_PX8), for the single-forward reference
  control.png                 64x64 RGB control image (smooth random pattern, SEED_IMAGE), the output size
  control_tall.png            64 high x 48 wide, for the non-square run
  refs.safetensors            initial_noise [1,4,32,32], initial_noise_tall [1,4,32,24], base.final_latents (no
                              ControlNet), and StableDiffusionXLControlNetPipeline final latents (output_type
                              "latent", from the stored noise) for
                                full.final_latents       scale 1.0, control start 0 / end 1
                                window.final_latents     scale 0.6, control start 0.2 / end 0.8 (4 steps: the
                                                         ControlNet acts in steps 1 and 2 only)
                                tall.final_latents       scale 1.0, 64 high x 48 wide (control_tall.png)
                                multi.final_latents      [controlnet, controlnet_b], scales [0.8, 0.5],
                                                         starts [0, 0], ends [1, 0.5]
                              and one forward of controlnet_px8 (fwd.*): sample [2,4,8,8], timestep [2],
                              encoder_hidden_states [2,77,64], text_embeds [2,32], time_ids [2,6],
                              controlnet_cond [2,3,64,64] (control.png as the pipeline prepares it),
                              conditioning_scale FWD_SCALE -> fwd.down.{k} (k = 0..), fwd.mid,
                              fwd.cond_embedding (the conditioning embedding's output)
  meta.json                   the calls, versions, seeds and how far each run moved from the base run

    python scripts/regen_controlnet_reference.py --model models/tiny-sdxl --out tests/data/controlnet

Everything runs on CPU in float32 with 2 torch threads (as regen_reference.py).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from regen_reference import PROMPTS, cpu_gen, log, save, stats, versions  # noqa: E402

CALL = dict(prompt=PROMPTS[0], negative_prompt="blurry, low quality", guidance_scale=5.0,
            num_inference_steps=4, height=64, width=64)
TALL = dict(height=64, width=48)
SEED_NOISE = 8
SEED_NOISE_TALL = 9
SEED_NET = 41
SEED_NET_B = 42
SEED_NET_PX8 = 46
TINY_EMBEDDING = (16, 32)
SEED_ZERO_CONVS = 43
SEED_IMAGE = 44
SEED_FWD = 45
FWD_SCALE = 0.7
# std of the random zero-convolution weights relative to 1/sqrt(fan_in): large enough that a wrong mapping,
# scale or window moves the latents far beyond the tolerances
ZERO_CONV_GAIN = 1.0
RUNS = {
    "full": dict(controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0),
    "window": dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.8),
}


def zero_conv_names(net):
    names = [f"controlnet_down_blocks.{i}" for i in range(len(net.controlnet_down_blocks))]
    return names + ["controlnet_mid_block", "controlnet_cond_embedding.conv_out"]


def make_controlnet(unet, seed, out_dir, embedding=TINY_EMBEDDING):
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
    g = cpu_gen(SEED_ZERO_CONVS + seed)
    with torch.no_grad():
        for name in zero_conv_names(net):
            conv = net.get_submodule(name)
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * ZERO_CONV_GAIN / fan_in ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    net.save_pretrained(out_dir, safe_serialization=True)
    log(f"wrote {out_dir}")
    return net


def make_image(path, height, width, seed):
    """A smooth random RGB pattern: low-resolution noise upsampled bilinearly, as uint8."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((1, 3, height // 8, width // 8), dtype=np.float32))
    up = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    arr = (up[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    log(f"wrote {path}")
    return Image.open(path).convert("RGB")


def pipeline(model_dir, controlnet):
    from diffusers import StableDiffusionXLControlNetPipeline
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(model_dir, controlnet=controlnet,
                                                               torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, noise, image, **kw):
    call = dict(CALL)
    call.update(kw)
    with torch.no_grad():
        return pipe(**call, image=image, latents=noise.clone(), output_type="latent").images


def forward_refs(pipe, net, image):
    """One ControlNet forward with the pipeline's image preparation, and its conditioning embedding."""
    g = cpu_gen(SEED_FWD)
    h, w = CALL["height"] // 8, CALL["width"] // 8
    sample = torch.randn(2, 4, h, w, generator=g)
    ehs = torch.randn(2, 77, net.config.cross_attention_dim, generator=g)
    text_embeds = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    timestep = torch.tensor([999, 261])
    cond = pipe.prepare_image(image, CALL["width"], CALL["height"], 1, 1, "cpu", torch.float32,
                              do_classifier_free_guidance=True, guess_mode=False)
    rec = {}
    hook = net.controlnet_cond_embedding.register_forward_hook(lambda _m, _a, out: rec.setdefault("emb", out))
    try:
        with torch.no_grad():
            down, mid = net(sample, timestep, encoder_hidden_states=ehs, controlnet_cond=cond,
                            conditioning_scale=FWD_SCALE,
                            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                            return_dict=False)
    finally:
        hook.remove()
    res = {"fwd.sample": sample, "fwd.timestep": timestep, "fwd.encoder_hidden_states": ehs,
           "fwd.text_embeds": text_embeds, "fwd.time_ids": time_ids, "fwd.controlnet_cond": cond,
           "fwd.mid": mid, "fwd.cond_embedding": rec["emb"]}
    for k, d in enumerate(down):
        res[f"fwd.down.{k}"] = d
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the tiny SDXL pipeline folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as the shipped data)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.model, "unet"), torch_dtype=torch.float32)
    net = make_controlnet(unet, SEED_NET, os.path.join(args.out, "controlnet"))
    net_b = make_controlnet(unet, SEED_NET_B, os.path.join(args.out, "controlnet_b"))
    net_px8 = make_controlnet(unet, SEED_NET_PX8, os.path.join(args.out, "controlnet_px8"),
                              embedding=(16, 32, 96, 256))
    image = make_image(os.path.join(args.out, "control.png"), CALL["height"], CALL["width"], SEED_IMAGE)
    tall = make_image(os.path.join(args.out, "control_tall.png"), TALL["height"], TALL["width"], SEED_IMAGE + 1)

    base_pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    base_pipe.set_progress_bar_config(disable=True)
    f = base_pipe.vae_scale_factor
    lat = lambda hw, seed: torch.randn((1, 4, hw[0] // f, hw[1] // f), generator=cpu_gen(seed))  # noqa: E731
    noise = lat((CALL["height"], CALL["width"]), SEED_NOISE)
    noise_tall = lat((TALL["height"], TALL["width"]), SEED_NOISE_TALL)
    with torch.no_grad():
        base = base_pipe(**CALL, latents=noise.clone(), output_type="latent").images
    res = {"initial_noise": noise, "initial_noise_tall": noise_tall, "base.final_latents": base}
    meta = {"versions": versions(), "torch_threads": torch.get_num_threads(), "model": args.model, "call": CALL,
            "tall": TALL, "runs": {}, "seeds": {"noise": SEED_NOISE, "noise_tall": SEED_NOISE_TALL,
                                                "net": SEED_NET, "net_b": SEED_NET_B, "net_px8": SEED_NET_PX8,
                                                "image": SEED_IMAGE,
                                                "fwd": SEED_FWD},
            "zero_conv_gain": ZERO_CONV_GAIN, "fwd_scale": FWD_SCALE, "vae_scale_factor": f,
            "embedding": {"controlnet": TINY_EMBEDDING, "controlnet_px8": [16, 32, 96, 256]},
            "zero_convs": zero_conv_names(net)}

    pipe = pipeline(args.model, net)
    for key, kw in RUNS.items():
        out = run(pipe, noise, image, **kw)
        again = run(pipe, noise, image, **kw)
        res[f"{key}.final_latents"] = out
        meta["runs"][key] = dict(kw, final_latents=stats(out), bitwise_repeatable=bool(torch.equal(out, again)),
                                 vs_base=((out - base).abs().max() / base.abs().max()).item())
        log(f"{key}: {json.dumps(meta['runs'][key])}")
    out = run(pipe, noise_tall, tall, **TALL)
    res["tall.final_latents"] = out
    meta["runs"]["tall"] = dict(TALL, final_latents=stats(out))
    multi_kw = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.0],
                    control_guidance_end=[1.0, 0.5])
    multi = pipeline(args.model, [net, net_b])
    out = run(multi, noise, [image, image], **multi_kw)
    res["multi.final_latents"] = out
    meta["runs"]["multi"] = dict(multi_kw, final_latents=stats(out),
                                 vs_full=((out - res["full.final_latents"]).abs().max() / base.abs().max()).item())
    res.update(forward_refs(pipe, net_px8, image))
    save(res, os.path.join(args.out, "refs.safetensors"))
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    log(f"wrote {args.out}/meta.json")


if __name__ == "__main__":
    main()
