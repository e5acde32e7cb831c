#!/usr/bin/env python3
"""Regenerate the tiny Flux.1 pipelines and the diffusers reference data of tests/flux_parity.rs.

Everything runs on CPU in float32 with a fixed torch thread count and fixed seeds; the versions are those
pinned in scripts/requirements-reference.txt (diffusers 0.42.1, transformers 5.24.0, torch 2.15.0).

  python scripts/regen_flux_reference.py --models models --out tests/data/refs-tiny-flux \\
      --clip-from models/tiny-sdxl

writes
  models/tiny-flux-dev/      FluxPipeline folder, transformer with guidance_embeds (FLUX.1-dev layout);
                             its transformer is saved in shards (index.json + 2 files), as large models are
  models/tiny-flux-schnell/  the same pipeline without guidance embedding (FLUX.1-schnell layout)
  tests/data/refs-tiny-flux/ transformer forwards, T5 / CLIP embeddings, tokenizer ids, scheduler tables,
                             whole-pipeline latents and decoded images (+ meta.json), and
                             variants/<name>/: transformers of other depths, head counts and RoPE axes,
                             each with one forward (--variants-only writes just these)

Both folders share the text encoders, tokenizers and VAE (identical files). The T5 tokenizer is a small
Unigram model built here (none can be downloaded); the CLIP tokenizer and text encoder are the tiny SDXL
ones (real CLIP vocabulary). Every parameter that starts constant (all-zero AdaLN modulations and output
projections, unit norm weights) gets small seeded noise so that a parity test can fail there.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import save_file

SEED_MODEL_INIT = 0
SEED_PERTURB = 2000
PERTURB_SCALE = 0.1
SEED_INPUTS = 4321
SEED_NOISE = 77

TINY_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        axes_dims_rope=(4, 6, 6))
TINY_T5 = dict(vocab_size=160, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
               layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
               tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)

T5_WORDS = ("a the of and in on at with to for is photo painting squirrel eating burger astronaut riding horse "
            "mars red fox snowy forest night city tower cat dog blue sky sun light high detail quality best "
            "master piece 4 k 8 x , . ! ? - ' : ( )").split()

PROMPTS = [
    "A painting of a squirrel eating a burger",
    "a photo of an astronaut riding a horse on mars, 4k, highly detailed!!",
    "Café déjà-vu: naïve  MULTIPLE   spaces\tand\nnewlines 12345 🚀 東京",
]

# Transformer configs besides TINY_TRANSFORMER (tests/flux_parity.rs, transformer_variants_match_diffusers):
# other depths (no single-stream or no double-stream blocks), head counts, head sizes and RoPE axes.
TRANSFORMER_VARIANTS = {
    "single_heavy": dict(num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=3,
                         axes_dims_rope=(2, 2, 4)),
    "double_only": dict(num_layers=2, num_single_layers=0, attention_head_dim=32, num_attention_heads=1,
                        axes_dims_rope=(8, 12, 12)),
    "single_only": dict(num_layers=0, num_single_layers=2, attention_head_dim=12, num_attention_heads=2,
                        axes_dims_rope=(4, 4, 4)),
}

PIPELINE_RUNS = [  # (key, variant, height, width, steps, guidance, max_sequence_length)
    ("dev_square", "dev", 32, 32, 3, 3.5, 512),
    ("dev_wide", "dev", 32, 48, 3, 4.0, 512),
    ("schnell_square", "schnell", 32, 32, 2, None, 512),
    ("schnell_tall_short_text", "schnell", 48, 32, 2, None, 24),
]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def save(tensors, path):
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path)
    log(f"wrote {path} ({len(tensors)} tensors)")


def perturb_constant_params(module, seed, scale=PERTURB_SCALE):
    """Add seeded noise to every parameter whose values are all equal (zeros, unit norm weights)."""
    g = gen(seed)
    n = 0
    with torch.no_grad():
        for _, p in module.named_parameters():
            flat = p.reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
                n += 1
    return n


def make_t5_tokenizer(out_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for i, w in enumerate(T5_WORDS):
        for piece in ("▁" + w, w):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -3.0 - 0.01 * i))
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        if c not in seen:
            seen.add(c)
            pieces.append((c, -8.0))
    assert len(pieces) <= TINY_T5["vocab_size"], len(pieces)
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(out_dir)
    return fast


def make_models(models_dir, clip_from):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(SEED_MODEL_INIT)
    dev = FluxTransformer2DModel(**TINY_TRANSFORMER, guidance_embeds=True)
    perturb_constant_params(dev, SEED_PERTURB)
    schnell = FluxTransformer2DModel(**TINY_TRANSFORMER, guidance_embeds=False)
    # the same weights, less the guidance embedder
    missing = schnell.load_state_dict({k: v for k, v in dev.state_dict().items()
                                       if not k.startswith("time_text_embed.guidance_embedder.")})
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    torch.manual_seed(SEED_MODEL_INIT)
    t5 = T5EncoderModel(T5Config(**TINY_T5))
    perturb_constant_params(t5, SEED_PERTURB + 1)
    torch.manual_seed(SEED_MODEL_INIT)
    vae = AutoencoderKL(**TINY_VAE)
    perturb_constant_params(vae, SEED_PERTURB + 2)
    clip = CLIPTextModel.from_pretrained(os.path.join(clip_from, "text_encoder"))
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(clip_from, "tokenizer"))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)

    import tempfile
    tdir = tempfile.mkdtemp()
    t5_tok = make_t5_tokenizer(tdir)
    for variant, transformer in (("dev", dev), ("schnell", schnell)):
        out = os.path.join(models_dir, f"tiny-flux-{variant}")
        shutil.rmtree(out, ignore_errors=True)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                            tokenizer_2=t5_tok, transformer=transformer)
        pipe.save_pretrained(out, safe_serialization=True)
        if variant == "dev":  # the transformer as diffusers shards a large model
            shutil.rmtree(os.path.join(out, "transformer"))
            transformer.save_pretrained(os.path.join(out, "transformer"), max_shard_size="300KB")
        # CLIP-L and its tokenizer are the source folder's, unchanged: link to them (relative
        # links, so the repository stores them once and a checkout carries them once)
        for comp in ("tokenizer", "text_encoder"):
            shutil.rmtree(os.path.join(out, comp))
            os.symlink(os.path.relpath(os.path.join(clip_from, comp), out), os.path.join(out, comp))
        counts = {n: sum(p.numel() for p in m.parameters())
                  for n, m in (("transformer", transformer), ("text_encoder_2", t5), ("vae", vae))}
        with open(os.path.join(out, "fixture_info.json"), "w") as f:
            json.dump({"variant": variant, "param_counts": counts, "torch": torch.__version__}, f, indent=1)
        log(f"wrote {out}: {counts}")
    shutil.rmtree(tdir)


def load_pipe(models_dir, variant):
    from diffusers import FluxPipeline
    return FluxPipeline.from_pretrained(os.path.join(models_dir, f"tiny-flux-{variant}"), torch_dtype=torch.float32)


def ref_transformer(pipe, variant, out_dir):
    d = transformer_forward(pipe.transformer, variant == "dev")
    save(d, os.path.join(out_dir, f"transformer_{variant}.safetensors"))


def transformer_forward(tr, with_guidance):
    """One forward of `tr` on seeded inputs (a 3 x 5 packed grid, 7 text tokens), with its inputs."""
    g = gen(SEED_INPUTS)
    hp, wp = 3, 5  # packed grid: 3 rows x 5 columns of 2x2 patches
    hidden = torch.randn(1, hp * wp, 64, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    img_ids = FluxPipeline_ids(hp, wp)
    txt_ids = torch.zeros(7, 3)
    t = torch.tensor([0.625])
    kw = dict(hidden_states=hidden, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
              img_ids=img_ids, txt_ids=txt_ids, return_dict=False)
    guidance = torch.tensor([3.5]) if with_guidance else None
    with torch.no_grad():
        out = tr(guidance=guidance, **kw)[0]
    d = {"hidden_states": hidden, "encoder_hidden_states": ctx, "pooled_projections": pooled, "timestep": t,
         "img_ids": img_ids, "txt_ids": txt_ids, "out": out}
    if guidance is not None:
        d["guidance"] = guidance
    return d


def ref_transformer_variants(out_dir):
    """Transformers of other depths, head counts and RoPE axes than the pipelines': each one's folder
    (config.json, weights) and one forward in <out_dir>/variants/<name>/."""
    from diffusers import FluxTransformer2DModel
    for i, (name, over) in enumerate(TRANSFORMER_VARIANTS.items()):
        cfg = dict(TINY_TRANSFORMER)
        cfg.update(over)
        with_guidance = i % 2 == 0
        torch.manual_seed(SEED_MODEL_INIT + 10 + i)
        tr = FluxTransformer2DModel(**cfg, guidance_embeds=with_guidance)
        perturb_constant_params(tr, SEED_PERTURB + 10 + i)
        d = os.path.join(out_dir, "variants", name)
        shutil.rmtree(d, ignore_errors=True)
        tr.save_pretrained(d, safe_serialization=True)
        save(transformer_forward(tr, with_guidance), os.path.join(d, "forward.safetensors"))
        log(f"wrote {d}: {sum(p.numel() for p in tr.parameters())} parameters")


def FluxPipeline_ids(hp, wp):
    from diffusers import FluxPipeline
    return FluxPipeline._prepare_latent_image_ids(1, hp, wp, "cpu", torch.float32)


def ref_text(pipe, out_dir):
    d = {}
    for i, p in enumerate(PROMPTS):
        t5_ids = pipe.tokenizer_2(p, padding="max_length", max_length=512, truncation=True,
                                  return_tensors="pt").input_ids
        clip_ids = pipe.tokenizer(p, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        with torch.no_grad():
            d[f"t5_embeds.{i}"] = pipe.text_encoder_2(t5_ids)[0]
            d[f"clip_pooled.{i}"] = pipe.text_encoder(clip_ids).pooler_output
        d[f"t5_ids.{i}"] = t5_ids.to(torch.int64)
        d[f"clip_ids.{i}"] = clip_ids.to(torch.int64)
        short = pipe.tokenizer_2(p, padding="max_length", max_length=24, truncation=True,
                                 return_tensors="pt").input_ids
        d[f"t5_ids_24.{i}"] = short.to(torch.int64)
        with torch.no_grad():
            emb, pooled, _ = pipe.encode_prompt(prompt=p, prompt_2=None, max_sequence_length=512)
        assert torch.equal(emb, d[f"t5_embeds.{i}"]) and torch.equal(pooled, d[f"clip_pooled.{i}"])
    save(d, os.path.join(out_dir, "text_encoders.safetensors"))


def ref_scheduler(pipe, out_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    cfg = pipe.scheduler.config
    d, cases = {}, []
    for steps, seq in ((1, 16), (4, 64), (28, 4096), (50, 1024), (7, 10000)):
        s = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        s.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        d[f"sigmas.{steps}.{seq}"] = s.sigmas.clone()
        d[f"timesteps.{steps}.{seq}"] = s.timesteps.clone()
        cases.append({"steps": steps, "image_seq_len": seq, "mu": mu})
    save(d, os.path.join(out_dir, "scheduler.safetensors"))
    return cases


def ref_pipelines(models_dir, out_dir):
    from diffusers import FluxPipeline
    runs = []
    for key, variant, h, w, steps, guidance, msl in PIPELINE_RUNS:
        pipe = load_pipe(models_dir, variant)
        f = pipe.vae_scale_factor
        c = pipe.vae.config.latent_channels
        lh, lw = 2 * (h // (2 * f)), 2 * (w // (2 * f))
        noise = torch.randn(1, c, lh, lw, generator=gen(SEED_NOISE + len(runs)))
        packed = FluxPipeline._pack_latents(noise, 1, c, lh, lw)
        prompt = PROMPTS[len(runs) % len(PROMPTS)]
        kw = dict(prompt=prompt, height=h, width=w, num_inference_steps=steps, latents=packed,
                  max_sequence_length=msl, output_type="latent", return_dict=False)
        if guidance is not None:
            kw["guidance_scale"] = guidance
        with torch.no_grad():
            lat = pipe(**kw)[0]
            lat = FluxPipeline._unpack_latents(lat, h, w, f)
            z = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            image = pipe.vae.decode(z, return_dict=False)[0]
        save({"init_noise": noise, "latents": lat, "image": image}, os.path.join(out_dir, f"pipeline_{key}.safetensors"))
        runs.append({"key": key, "variant": variant, "height": h, "width": w, "steps": steps, "guidance": guidance,
                     "max_sequence_length": msl, "prompt": prompt})
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="folder to write tiny-flux-dev/ and tiny-flux-schnell/ into")
    ap.add_argument("--out", required=True, help="reference output folder")
    ap.add_argument("--clip-from", required=True, help="SDXL folder whose text_encoder/ and tokenizer/ are reused")
    ap.add_argument("--refs-only", action="store_true", help="keep the model folders, only write references")
    ap.add_argument("--variants-only", action="store_true",
                    help="only write the transformer variants (<out>/variants/)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.variants_only:
        ref_transformer_variants(args.out)
        return
    if not args.refs_only:
        make_models(args.models, args.clip_from)
    os.makedirs(args.out, exist_ok=True)
    import diffusers, transformers, tokenizers
    meta = {"versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
            "prompts": PROMPTS}
    for variant in ("dev", "schnell"):
        ref_transformer(load_pipe(args.models, variant), variant, args.out)
    pipe = load_pipe(args.models, "dev")
    ref_text(pipe, args.out)
    meta["scheduler_cases"] = ref_scheduler(pipe, args.out)
    meta["pipelines"] = ref_pipelines(args.models, args.out)
    ref_transformer_variants(args.out)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    log("done")


if __name__ == "__main__":
    main()
