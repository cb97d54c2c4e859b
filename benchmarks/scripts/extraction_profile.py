# Per-op CPU time of one image: the K/V extraction against bare timm forward_features (ViT-B/16 at 512), from
# PyTorch's profiler (mean of 3 calls). Run with and without MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
# to see the page-fault cost land in gelu/copy_. Run: .venv/bin/python benchmarks/scripts/extraction_profile.py
import torch
from torch.profiler import profile
from fpt_monai.networks import create_backbone
from fpt_monai.weights import random_weights_expected
torch.manual_seed(0)
with random_weights_expected():
    bb = create_backbone("fpt", pretrained=False, img_size=512)
img = torch.randn(1, 3, 512, 512)
def stats(f):
    with torch.inference_mode():
        f(); f()
        with profile() as p:
            for _ in range(3): f()
    return {e.key: (e.self_cpu_time_total / 3000, e.count // 3) for e in p.key_averages()}
a = stats(lambda: bb(img)); b = stats(lambda: bb.model.forward_features(img))
keys = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, (0,0))[0], b.get(k, (0,0))[0]))
print("%-55s %9s %5s %9s %5s" % ("op", "kv ms", "n", "bare ms", "n"))
for k in keys[:30]:
    print("%-55s %9.1f %5d %9.1f %5d" % (k[:55], *a.get(k, (0, 0)), *b.get(k, (0, 0))))
print("total", sum(v[0] for v in a.values()), sum(v[0] for v in b.values()))
