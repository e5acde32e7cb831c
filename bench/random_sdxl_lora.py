# A random PEFT-format LoRA (rank 16, fp16) for every attention projection and feed-forward layer of
# a full-size SDXL UNet folder, to time `generate --lora` against the same run without it.
#
#   python3 bench/random_sdxl_lora.py MODEL_DIR OUT.safetensors
import json, struct, sys

import torch
from safetensors.torch import save_file

model, out = sys.argv[1], sys.argv[2]
path = f"{model}/unet/diffusion_pytorch_model.fp16.safetensors"
try:
    raw = open(path, "rb")
except FileNotFoundError:
    path = f"{model}/unet/diffusion_pytorch_model.safetensors"
    raw = open(path, "rb")
n = struct.unpack("<Q", raw.read(8))[0]
header = json.loads(raw.read(n))
g = torch.Generator().manual_seed(0)
tensors, r = {}, 16
for name, info in header.items():
    if not name.endswith(".weight") or len(info.get("shape", [])) != 2:
        continue
    if not any(k in name for k in ("to_q", "to_k", "to_v", "to_out.0", "ff.net")):
        continue
    o, i = info["shape"]
    mod = name[: -len(".weight")]
    tensors[f"unet.{mod}.lora_A.weight"] = (torch.randn(r, i, generator=g) / i**0.5).half()
    tensors[f"unet.{mod}.lora_B.weight"] = (torch.randn(o, r, generator=g) * 0.01).half()
save_file(tensors, out)
print(f"{len(tensors) // 2} adapted modules -> {out}")
