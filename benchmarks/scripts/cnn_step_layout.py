# One training step (batch 16, 512) of a demo-network baseline, default vs channels-last layout.
# Run: .venv/bin/python benchmarks/scripts/cnn_step_layout.py full cl   (method: full/linear/lora/adapter; c or cl)
# Note: CNNBaseline is channels-last itself now; the 'c' arm converts only the input, so compare with git 88f9813^.
import time, torch, sys
from fpt_monai.weights import random_weights_expected
from fpt_monai.pretrained import create_demo_baseline
torch.manual_seed(0)
method = sys.argv[1]; cl = sys.argv[2] == "cl"
with random_weights_expected():
    net = create_demo_baseline(method, 3, pretrained=False)
net.train()
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
x = torch.rand(16, 3, 512, 512); y = torch.randint(0, 3, (16,))
if cl:
    net = net.to(memory_format=torch.channels_last); x = x.contiguous(memory_format=torch.channels_last)
ts = []
for i in range(3):
    t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
    ts.append(time.perf_counter() - t)
print(method, sys.argv[2], ["%.2f" % t for t in ts])
