"""The FPT/FPT+ training step on a GPU, both implementations side by side: time and peak CUDA memory.

At the papers' setting (ViT-B/16 keys/values at 512 in the cache's float16, the side view at 224 for FPT and 128
for FPT+, batch 32, 5 classes, AdamW, gradient clipping at 1.0), as the bundle trains on CUDA: under MONAI's mixed
precision (float16 autocast and a gradient scaler). Arms, timed in turn in one process
(:func:`benchmarks.speed.time_alternating`, median, CUDA synchronised):

- ``reference``: ``FPTNet(..., kernels="reference")``, stock PyTorch and timm operations with
  ``F.scaled_dot_product_attention``: what ``kernels="auto"`` runs off the CPU;
- ``cpu``: ``kernels="cpu"``, the hand-written CPU kernels forced onto the device, for comparison.

Peak memory is an arm's own: ``torch.cuda.max_memory_allocated`` during its first step (network, optimizer state,
activations), less what was allocated before the arm was built (the shared inputs, the other arm), in MiB; on a CPU
it is not measured (``None``). Random weights and inputs: speed and memory do not depend on their values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table
from benchmarks.speed import _quiet_build, _synchronizer, time_alternating
from benchmarks.step import step_inputs

__all__ = ["GPU_STEP_ARMS", "gpu_step_comparison", "gpu_step_table"]

#: The implementations timed (values of ``FPTNet``'s ``kernels``).
GPU_STEP_ARMS = ("reference", "cpu")


def _train_step(network, side, kv, labels, amp: bool):
    device = side.device
    optimizer = torch.optim.AdamW(network.trainable_parameters(), lr=1e-3, weight_decay=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(network(side, kv=kv), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.trainable_parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()

    return step


def gpu_step_comparison(
    presets: tuple[str, ...] = ("fpt", "fpt_plus"),
    batch_size: int = 32,
    device: str | None = None,
    amp: bool | None = None,
    repeats: int = 9,
    num_classes: int = 5,
) -> list[dict]:
    """One row per preset and arm: images/s and peak CUDA memory (see the module).

    ``device`` defaults to the GPU when there is one; ``amp`` to ``True`` on CUDA (the bundle's default).
    """
    from fpt_monai.networks import FPTNet
    from fpt_monai.presets import PRESETS, create_backbone

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda" if amp is None else bool(amp)
    cuda = device.type == "cuda"
    rows = []
    for preset in presets:
        config = PRESETS[preset]
        with torch.device("meta"):  # only the backbone's shape is needed
            shape = _quiet_build(lambda: create_backbone(preset, pretrained=False)).shape
        side, kv, labels = step_inputs(shape, config.side_img_size, batch_size, num_classes, torch.float16, device)
        steps, peaks = {}, {}
        for kernels in GPU_STEP_ARMS:
            if cuda:  # the arm's own memory: what it allocates above the shared inputs and the arms built before it
                torch.cuda.synchronize(device)
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            with torch.device(device):
                network = FPTNet(
                    shape, num_classes, side_img_size=config.side_img_size, variant=config.variant, kernels=kernels
                ).train()
            steps[kernels] = _train_step(network, side, kv, labels, amp)
            steps[kernels]()  # one step: the network, its optimizer state and one step's activations
            if cuda:
                torch.cuda.synchronize(device)
                peaks[kernels] = round((torch.cuda.max_memory_allocated(device) - resident) / 2**20, 1)
        seconds = time_alternating(steps, repeats=repeats, synchronize=_synchronizer(device))
        for kernels in GPU_STEP_ARMS:
            rows.append(
                {
                    "preset": preset,
                    "kernels": kernels,
                    "device": str(device),
                    "amp": amp,
                    "batch_size": batch_size,
                    "images_per_second": round(batch_size / seconds[kernels], 2),
                    "peak_cuda_mib": peaks.get(kernels),
                }
            )
    return rows


def gpu_step_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`gpu_step_comparison`'s rows."""
    return markdown_table(
        ["preset", "kernels", "device", "amp", "batch", "images/s", "peak CUDA MiB"],
        "llllrrr",
        (
            [row[key] for key in ("preset", "kernels", "device", "amp", "batch_size", "images_per_second")]
            + ["-" if row["peak_cuda_mib"] is None else row["peak_cuda_mib"]]
            for row in rows
        ),
    )
