# FPT's training step (preloaded float16 K/V, batch 4) against full fine-tuning of ViT-B/16 at 512, one process.
# Run: .venv/bin/python benchmarks/scripts/fpt_vs_full_step.py
import time, torch, statistics
import fpt_monai.bench.speed as sp
from fpt_monai.networks import FPTNet, create_fpt
from fpt_monai.networks.baselines import create_baseline
import torch.nn.functional as F
torch.manual_seed(0)
labels = torch.randint(0, 5, (4,))
full = sp._quiet_build(lambda: create_fpt("fpt", 5, pretrained=False, img_size=512))
net = FPTNet(full.backbone.shape, 5, side_img_size=full.side_img_size, variant=full.fusion.variant).train()
inputs = [torch.randn(4, 3, *full.side_img_size), torch.randn(4, *full.backbone.shape.kv_shape).half()]
del full
fpt = sp._training_step(net, torch.optim.AdamW(net.trainable_parameters(), lr=1e-4), inputs, labels, lambda n, x: n.forward_side(x[0], x[1]))
base = sp._quiet_build(lambda: create_baseline("full", 5, preset="fpt", pretrained=False, img_size=512)).train()
fullstep = sp._training_step(base, torch.optim.AdamW(base.trainable_parameters(), lr=1e-4), [torch.randn(4, 3, 512, 512)], labels, lambda n, x: n(x[0]))
fullstep(); fpt()
res = {"cold": [], "warm": [], "full": []}
for r in range(3):
    t = time.perf_counter(); fullstep(); res["full"].append(time.perf_counter() - t)
    ts = []
    for i in range(6):
        t = time.perf_counter(); fpt(); ts.append(time.perf_counter() - t)
    print(r, ["%.3f" % x for x in ts])
    res["cold"].append(sum(ts[:3]) / 3); res["warm"].append(sum(ts[3:]) / 3)
print({k: "%.3f" % statistics.median(v) for k, v in res.items()})
