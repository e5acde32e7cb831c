#!/usr/bin/env python3
"""Regenerate the LoRA fixtures and diffusers references used by tests/lora_parity.rs.

On the tiny SDXL pipeline (--model), writes to --out:

  kohya.safetensors                kohya / A1111 format: lora_unet_* with SDXL's original (SGM) block names
                                   (input_blocks_4_1_..., middle_block_1_..., output_blocks_0_1_...),
                                   lora_te1_text_model_*, lora_te2_text_model_*, .lora_down/.lora_up/.alpha
                                   (alpha != rank), with LoCon (conv) adapters on resnet convs, a shortcut,
                                   the down- and up-sampler
  kohya_diffusers_names.safetensors  the same adapters with UNet modules under diffusers names
                                   (lora_unet_down_blocks_1_attentions_0_...) and without .alpha tensors
                                   (alpha = rank), lora_down multiplied by alpha/rank instead: the same
                                   deltas (diffusers' results differ from kohya.safetensors' by rounding)
  peft.safetensors                 diffusers / PEFT format (what pipe.save_lora_weights writes): unet.<module>,
                                   text_encoder.text_model.<module>, text_encoder_2.text_model.<module>
                                   .lora_A/.lora_B, alphas in the `lora_adapter_metadata` JSON (lora_alpha
                                   != r, one alpha_pattern entry), other random values
  refs.safetensors                 for each file F in (kohya, peft) and scale S in (0.7, 1.0):
                                   StableDiffusionXLPipeline.from_pretrained(model) + load_lora_weights(F) +
                                   fuse_lora(lora_scale=S), one run from `initial_noise`:
                                   F.sS.prompt_embeds, F.sS.add_text_embeds (as passed to the UNet),
                                   F.sS.final_latents; F.s1.0.fused.<component>.<module>.weight = the fused
                                   weights of every UNet target and of one layer per text encoder;
                                   base.final_latents without LoRA
  meta.json                        the call, versions, per-file adapter lists, and how far each run moved
                                   from the base run

    python scripts/regen_lora_reference.py --model models/tiny-sdxl --out tests/data/lora

Everything runs on CPU in float32 with 2 torch threads (as regen_reference.py).
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from regen_reference import PROMPTS, cpu_gen, log, save, stats, versions  # noqa: E402

SCALES = (0.7, 1.0)
CALL = dict(prompt=PROMPTS[0], negative_prompt="blurry, low quality", guidance_scale=5.0,
            num_inference_steps=4, height=32, width=32)
SEED_NOISE = 8
SEED_KOHYA = 31
SEED_PEFT = 32
# |delta| of each adapter at scale 1 relative to the module's weight (std), so that a wrong mapping,
# alpha or scale moves the output far beyond the tolerances
DELTA_REL = 0.5

UNET_RANK, UNET_ALPHA = 2, 3.0
TE_RANK, TE_ALPHA = 4, 2.5
PEFT_UNET_ALPHA_PATTERN = {"down_blocks.1.attentions.0.proj_in": 5.0}


def unet_targets(unet, convs):
    """Linear layers of every transformer (attention projections, feed-forward, proj_in/out) and, with `convs`,
    LoCon targets: resnet convs, a 1x1 shortcut, a time-embedding projection, the down- and up-sampler."""
    names = []
    for name, m in unet.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if ".attentions." in name and (name.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                      "ff.net.2", "proj_in", "proj_out"))):
            names.append(name)
    if convs:
        names += ["down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
                  "down_blocks.1.resnets.1.time_emb_proj", "down_blocks.0.downsamplers.0.conv",
                  "mid_block.resnets.1.conv2", "up_blocks.0.resnets.2.conv1", "up_blocks.0.upsamplers.0.conv",
                  "up_blocks.1.resnets.0.conv2"]
    return names


def te_targets(te):
    """q/k/v/out projections and both MLP layers of every layer, module names without `text_model.`, plus
    `text_projection` where there is one."""
    names = []
    for name, m in te.named_modules():
        n = name.removeprefix("text_model.")
        if isinstance(m, torch.nn.Linear) and n.startswith("encoder.layers."):
            names.append(n)
        elif n == "text_projection":
            names.append(n)
    return names


def module(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule("text_model." + name)


def random_adapter(mod, rank, factor, g):
    """(down, up) for `mod`: down [r, in(, kh, kw)], up [out, r(, 1, 1)], scaled so that
    std(factor * up @ down) = DELTA_REL * std(weight)."""
    w = mod.weight.detach()
    if w.dim() == 4:
        down = torch.randn(rank, w.shape[1], w.shape[2], w.shape[3], generator=g)
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g)
    else:
        down = torch.randn(rank, w.shape[1], generator=g)
        up = torch.randn(w.shape[0], rank, generator=g)
    delta = factor * (up.reshape(w.shape[0], rank) @ down.reshape(rank, -1))
    k = DELTA_REL * w.std().item() / delta.std().item()
    return down * k ** 0.5, up * k ** 0.5


# ----------------------------------------------------------------------------------------------------------
# SGM (original SDXL) names of diffusers UNet modules, written independently of the Rust mapping
# ----------------------------------------------------------------------------------------------------------

RESNET_SGM = {"norm1": "in_layers_0", "conv1": "in_layers_2", "time_emb_proj": "emb_layers_1",
              "norm2": "out_layers_0", "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}


def sgm_name(name, layers_per_block, up_attn):
    p = name.split(".")
    per = layers_per_block + 1
    if p[0] == "mid_block":
        j = int(p[2])
        if p[1] == "attentions":
            return ["middle_block", "1"] + p[3:]
        return ["middle_block", str(2 * j), RESNET_SGM[p[3]]]
    i, kind = int(p[1]), p[2]
    if p[0] == "down_blocks":
        if kind == "downsamplers":
            return ["input_blocks", str((i + 1) * per), "0", "op"]
        j = int(p[3])
        n = 1 + i * per + j
        if kind == "resnets":
            return ["input_blocks", str(n), "0", RESNET_SGM[p[4]]]
        return ["input_blocks", str(n), "1"] + p[4:]
    if kind == "upsamplers":
        return ["output_blocks", str(i * per + per - 1), "2" if up_attn[i] else "1", "conv"]
    j = int(p[3])
    n = i * per + j
    if kind == "resnets":
        return ["output_blocks", str(n), "0", RESNET_SGM[p[4]]]
    return ["output_blocks", str(n), "1"] + p[4:]


def kohya_unet_key(name, sgm, cfg):
    if sgm:
        up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
        parts = sgm_name(name, cfg.layers_per_block, up_attn)
        return "lora_unet_" + "_".join(x.replace(".", "_") for x in parts)
    return "lora_unet_" + name.replace(".", "_")


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------

def make_kohya(pipe, out_dir):
    g = cpu_gen(SEED_KOHYA)
    sgm, dif, listing = {}, {}, []
    for comp, model, names, rank, alpha in (
            ("unet", pipe.unet, unet_targets(pipe.unet, convs=True), UNET_RANK, UNET_ALPHA),
            ("te1", pipe.text_encoder, te_targets(pipe.text_encoder), TE_RANK, TE_ALPHA),
            ("te2", pipe.text_encoder_2, te_targets(pipe.text_encoder_2), TE_RANK, TE_ALPHA)):
        for name in names:
            full = name if comp == "unet" or name == "text_projection" else "text_model." + name
            down, up = random_adapter(module(model, name), rank, alpha / rank, g)
            if comp == "unet":
                k_sgm = kohya_unet_key(name, True, pipe.unet.config)
                k_dif = kohya_unet_key(name, False, pipe.unet.config)
            else:
                k_sgm = k_dif = f"lora_{comp}_" + full.replace(".", "_")
            sgm[k_sgm + ".lora_down.weight"] = down
            sgm[k_sgm + ".lora_up.weight"] = up
            sgm[k_sgm + ".alpha"] = torch.tensor(alpha)
            dif[k_dif + ".lora_down.weight"] = down * (alpha / rank)
            dif[k_dif + ".lora_up.weight"] = up
            listing.append(f"{k_sgm} rank {rank} alpha {alpha:g} down {list(down.shape)}")
    save_file(sgm, os.path.join(out_dir, "kohya.safetensors"))
    save_file(dif, os.path.join(out_dir, "kohya_diffusers_names.safetensors"))
    log(f"wrote kohya files ({len(sgm)} tensors)")
    return listing


def make_peft(pipe, out_dir):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    g = cpu_gen(SEED_PEFT)
    layers, metadata, listing = {}, {}, []
    for comp, model, names, rank, alpha, pattern in (
            ("unet", pipe.unet, unet_targets(pipe.unet, convs=True), UNET_RANK, UNET_ALPHA, PEFT_UNET_ALPHA_PATTERN),
            ("text_encoder", pipe.text_encoder, te_targets(pipe.text_encoder), TE_RANK, TE_ALPHA, {}),
            ("text_encoder_2", pipe.text_encoder_2, te_targets(pipe.text_encoder_2), TE_RANK, TE_ALPHA, {})):
        sd = {}
        for name in names:
            a = pattern.get(name, alpha)
            down, up = random_adapter(module(model, name), rank, a / rank, g)
            # real files name text-encoder modules in the transformers 4 layout (under text_model.)
            full = name if comp == "unet" or name == "text_projection" else "text_model." + name
            sd[f"{full}.lora_A.weight"] = down
            sd[f"{full}.lora_B.weight"] = up
            listing.append(f"{comp}.{full} rank {rank} alpha {a:g}")
        layers[comp] = sd
        # text encoders: short names, as PEFT matches them on any module path (transformers 5's CLIPTextModel
        # has no `text_model.` level, so full transformers 4 names would match nothing)
        targets = {k.rsplit(".lora_", 1)[0] for k in sd}
        if comp != "unet":
            targets = {t.rsplit(".", 1)[-1] for t in targets}
        cfg = LoraConfig(r=rank, lora_alpha=alpha, alpha_pattern=dict(pattern), target_modules=sorted(targets))
        metadata[comp] = cfg.to_dict()
        # LoraConfig holds target_modules as a set: sorted, so that the file is reproducible
        metadata[comp]["target_modules"] = sorted(targets)
    StableDiffusionXLPipeline.save_lora_weights(
        out_dir, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metadata["text_encoder_2"], weight_name="peft.safetensors",
        safe_serialization=True)
    log("wrote peft.safetensors")
    return listing


# ----------------------------------------------------------------------------------------------------------
# reference runs
# ----------------------------------------------------------------------------------------------------------

def load_pipe(model_dir):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, noise):
    rec = {}

    def hook(_m, _args, kwargs, _out):
        if "prompt_embeds" not in rec:
            rec["prompt_embeds"] = kwargs["encoder_hidden_states"].detach().clone()
            rec["add_text_embeds"] = kwargs["added_cond_kwargs"]["text_embeds"].detach().clone()

    h = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            lat = pipe(**CALL, latents=noise.clone(), output_type="latent").images
    finally:
        h.remove()
    rec["final_latents"] = lat
    return rec


FUSED_CHECK = {  # fused weights stored for the unit-level test: every UNet target, one layer per text encoder
    "unet": lambda n: True,
    "text_encoder": lambda n: ".layers.0." in n,
    "text_encoder_2": lambda n: ".layers.4." in n or n == "text_projection",
}


def make_refs(model_dir, out_dir, listings):
    pipe = load_pipe(model_dir)
    shape = (1, pipe.unet.config.in_channels, CALL["height"] // pipe.vae_scale_factor,
             CALL["width"] // pipe.vae_scale_factor)
    noise = torch.randn(shape, generator=cpu_gen(SEED_NOISE))
    base = run(pipe, noise)
    base_again = run(pipe, noise)
    res = {"initial_noise": noise, "base.final_latents": base["final_latents"]}
    meta = {"versions": versions(), "torch_threads": torch.get_num_threads(), "model": model_dir, "call": CALL,
            "seed_noise": SEED_NOISE, "scales": list(SCALES), "delta_rel": DELTA_REL,
            "base_bitwise_repeatable": bool(torch.equal(base["final_latents"], base_again["final_latents"])),
            "adapters": listings, "runs": {}}
    targets = {"unet": unet_targets(pipe.unet, convs=True), "text_encoder": te_targets(pipe.text_encoder),
               "text_encoder_2": te_targets(pipe.text_encoder_2)}
    for fmt, files in (("kohya", ["kohya.safetensors", "kohya_diffusers_names.safetensors"]),
                       ("peft", ["peft.safetensors"])):
        for s in SCALES:
            outs = []
            for f in files:
                p = load_pipe(model_dir)
                p.load_lora_weights(os.path.join(out_dir, f))
                p.fuse_lora(lora_scale=s)
                outs.append((f, p, run(p, noise)))
            f0, p, r = outs[0]
            for k in ("prompt_embeds", "add_text_embeds", "final_latents"):
                res[f"{fmt}.s{s}.{k}"] = r[k]
            m = {"file": f0,
                 "final_latents_vs_base": (r["final_latents"] - base["final_latents"]).abs().max().item()
                 / base["final_latents"].abs().max().item(),
                 "prompt_embeds_vs_base": (r["prompt_embeds"] - base["prompt_embeds"]).abs().max().item()
                 / base["prompt_embeds"].abs().max().item(),
                 "final_latents": stats(r["final_latents"])}
            for f, _, other in outs[1:]:
                m[f"{f}_max_rel_diff"] = max((other[k] - r[k]).abs().max().item() / r[k].abs().max().item()
                                             for k in r)
            unchanged = []
            for comp, names in targets.items():
                model = getattr(p, comp)
                for n in names:
                    mod = module(model, n)
                    w = mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight
                    if torch.equal(w, module(getattr(pipe, comp), n).weight):
                        unchanged.append(f"{comp}.{n}")
                    if s == 1.0 and FUSED_CHECK[comp](n):
                        res[f"{fmt}.s{s}.fused.{comp}.{n}.weight"] = w.detach().clone()
            m["modules_left_unchanged_by_diffusers"] = unchanged
            meta["runs"][f"{fmt}.s{s}"] = m
            log(f"{fmt} s={s}: {json.dumps(m)}")
    save(res, os.path.join(out_dir, "refs.safetensors"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    log(f"wrote {out_dir}/meta.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the tiny SDXL pipeline folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as the shipped data)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    pipe = load_pipe(args.model)
    listings = {"kohya": make_kohya(pipe, args.out), "peft": make_peft(pipe, args.out)}
    make_refs(args.model, args.out, listings)


if __name__ == "__main__":
    main()
