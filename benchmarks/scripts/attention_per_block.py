# One ViT-B/16 block's attention at 512 (12 heads, 1025 tokens), one image: fused SDPA vs the extraction's
# per-head loop vs query chunks. Run: .venv/bin/python benchmarks/scripts/attention_per_block.py
import time, torch
import torch.nn.functional as F
from fpt_monai.networks.backbones import FrozenViTBackbone
torch.manual_seed(0)
H, N, D = 12, 1025, 64
q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
scale = D ** -0.5
def fused():
    return F.scaled_dot_product_attention(q, k, v)
def current():  # the extraction's own per-head loop
    return FrozenViTBackbone._attend_and_rank(q, k, v, scale)
def chunked(c):
    def f():
        qs = q * scale
        ctx = qs.new_empty(v.shape); imp = qs.new_zeros(qs.shape[:3])
        buf = qs.new_empty((c, N))
        for h in range(H):
            kt = k[0, h].T
            for s in range(0, N, c):
                e = min(s + c, N); a = buf[: e - s]
                torch.mm(qs[0, h, s:e], kt, out=a)
                torch._softmax(a, -1, False, out=a)
                torch.mm(a, v[0, h], out=ctx[0, h, s:e])
                imp[0, h].add_(a.sum(0))
        return ctx, imp.div_(N)
    return f
def chunk_heads(c):
    # all heads at once, query chunks
    def f():
        qs = q * scale
        ctx = qs.new_empty(v.shape); imp = qs.new_zeros(qs.shape[:3])
        kt = k[0].transpose(-2, -1)
        buf = qs.new_empty(H * c * N)
        for s in range(0, N, c):
            e = min(s + c, N); a = buf[: H * (e - s) * N].view(H, e - s, N)
            torch.bmm(qs[0, :, s:e], kt, out=a)
            torch._softmax(a, -1, False, out=a)
            torch.bmm(a, v[0], out=ctx[0, :, s:e])
            imp[0].add_(a.sum(1))
        return ctx, imp.div_(N)
    return f
ref = current()
arms = {"fused": fused, "current": current, **{f"chunk{c}": chunked(c) for c in (64, 128, 256, 512)}, **{f"heads{c}": chunk_heads(c) for c in (16, 32, 64)}}
for name, f in arms.items():
    out = f()
    if name != "fused":
        assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1], ref[1], atol=1e-5), name
for rep in range(2):
    for name, f in arms.items():
        ts = []
        for i in range(7):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        print(rep, name, "%.1f ms (best) %.1f ms (median) per 12 heads" % (min(ts)*1e3, sorted(ts)[3]*1e3))
