# Single torch ops (diffusers' calls) at the shapes of an SDXL UNet step at 1024², b = 2, fp16:
# the counterpart of `unet_bench --ops` (pcpp-sdxl/examples/unet_bench.rs).
import torch, torch.nn.functional as F
torch.backends.cuda.matmul.allow_tf32 = False
dev, dt = "cuda", torch.float16
def t(fn, iters=20):
    for _ in range(2): fn()
    torch.cuda.synchronize(); ts = []
    import time
    for _ in range(iters):
        s = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append((time.perf_counter() - s) * 1e3)
    ts.sort(); return ts[len(ts) // 2]
r = lambda *s: torch.rand(*s, device=dev, dtype=dt) * 2 - 1
rows = []
with torch.no_grad():
    for c, hw in [(320, 128), (640, 64), (1280, 32)]:
        x = r(2, c, hw, hw); w = r(c, c, 3, 3) * 0.05; b = r(c); g = r(c)
        rows.append((f"conv3x3 {c}ch {hw}x{hw}", t(lambda: F.conv2d(x, w, b, padding=1))))
        rows.append((f"group_norm+silu {c}ch {hw}x{hw}", t(lambda: F.silu(F.group_norm(x, 32, g, b, 1e-5)))))
        rows.append((f"to_tokens {c}ch {hw}x{hw}", t(lambda: x.permute(0, 2, 3, 1).reshape(2, hw * hw, c).contiguous())))
        rows.append((f"add {c}ch {hw}x{hw}", t(lambda: x + x)))
        rows.append((f"cat x2 {c}ch {hw}x{hw}", t(lambda: torch.cat([x, x], 1))))
    for l, h in [(4096, 10), (1024, 20)]:
        dm = h * 64
        q, k, v = r(2, l, dm), r(2, l, dm), r(2, l, dm)
        sh = lambda z: z.view(2, -1, h, 64).transpose(1, 2)
        rows.append((f"self-attention {l} tok {h} heads", t(lambda: F.scaled_dot_product_attention(sh(q), sh(k), sh(v)).transpose(1, 2).reshape(2, l, dm))))
        kc = r(2, 77, dm)
        rows.append((f"cross-attention {l}x77 {h} heads", t(lambda: F.scaled_dot_product_attention(sh(q), sh(kc), sh(kc)).transpose(1, 2).reshape(2, l, dm))))
        w = r(dm, dm) * 0.05; b = r(dm)
        rows.append((f"linear {2*l}x{dm}x{dm}", t(lambda: F.linear(q, w, b))))
        w1 = r(8 * dm, dm) * 0.05; b1 = r(8 * dm)
        rows.append((f"linear ff1 {2*l}x{dm}x{8*dm}", t(lambda: F.linear(q, w1, b1))))
        hh = F.linear(q, w1, b1)
        def geglu():
            a, gate = hh.chunk(2, dim=-1); return a * F.gelu(gate)
        rows.append((f"geglu {2*l}x{8*dm}", t(geglu)))
        g = r(dm)
        rows.append((f"layer_norm {2*l}x{dm}", t(lambda: F.layer_norm(q, (dm,), g, b, 1e-5))))
for n, ms in rows:
    print(f"torch {n:<40} {ms:8.3f} ms")
