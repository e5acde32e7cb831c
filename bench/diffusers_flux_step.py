#!/usr/bin/env python3
"""diffusers' FluxTransformer2DModel step on one GPU, the anchor of bench/gpu-flux.sh.

Builds the transformer from a config (e.g. pcpp-flux/configs/flux1-dev/transformer/config.json)
with random bf16 weights straight on the GPU, then times one forward (bf16, SDPA attention) at
each requested image size with 512 T5 tokens: eager and as a CUDA-graph replay (median of CUDA
event times). Prints one JSON line per size: {"impl": "diffusers", "height", "width",
"image_tokens", "text_tokens", "eager_ms", "graph_ms"}.

Usage: diffusers_flux_step.py CONFIG [--sizes 1024,2048] [--iters 5]
"""
import argparse
import json

import torch
from diffusers import FluxTransformer2DModel


def timeit(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    cfg = json.load(open(a.config))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = FluxTransformer2DModel.from_config(cfg).eval()
    torch.set_default_dtype(torch.float32)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    for size in [int(s) for s in a.sizes.split(",")]:
        hp = wp = size // 16
        n = hp * wp
        x = torch.randn(1, n, cfg["in_channels"], **bf)
        txt = torch.randn(1, a.tokens, cfg["joint_attention_dim"], **bf)
        pooled = torch.randn(1, cfg["pooled_projection_dim"], **bf)
        t = torch.full([1], 0.5, **bf)
        g = torch.full([1], 3.5, device="cuda", dtype=torch.float32) if cfg.get("guidance_embeds") else None
        img_ids = torch.zeros(hp, wp, 3, device="cuda")
        img_ids[..., 1] = torch.arange(hp, device="cuda")[:, None]
        img_ids[..., 2] = torch.arange(wp, device="cuda")[None, :]
        img_ids = img_ids.reshape(n, 3)
        txt_ids = torch.zeros(a.tokens, 3, device="cuda")

        def step():
            return model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                         timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=g,
                         return_dict=False)[0]

        with torch.no_grad():
            eager = timeit(step, a.warmup, a.iters)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            replay = timeit(graph.replay, a.warmup, a.iters)
        print(json.dumps(dict(impl="diffusers", height=size, width=size, image_tokens=n,
                              text_tokens=a.tokens, eager_ms=round(eager, 3),
                              graph_ms=round(replay, 3))), flush=True)
        del graph, out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
