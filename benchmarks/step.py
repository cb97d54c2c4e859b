"""The FPT/FPT+ training step after preloading, with the side ViT's activations recomputed and kept, side by side.

One optimizer step (forward, backward, gradient clipping at 1.0, AdamW) at the papers' shapes: ViT-B/16 keys/values
at 512 (205 of 1025 tokens) in the cache's storage dtype, the side view at 224 (FPT) or 128 (FPT+), batch 16,
5 classes. Arms, timed in turn in one process (:func:`benchmarks.speed.time_alternating`, median):

- ``recompute``: ``FPTNet(..., recompute=True)``, the default: attention probabilities and MLP activations are
  recomputed in backward;
- ``stored``: ``recompute=False``: they are kept;
- ``yardstick`` (when a file is given): a plain eager FPT/FPT+ written independently from the papers, with float32
  keys/values, loaded from its path (its ``PlainFPT(variant)`` and ``forward(side_images, kv)``); every
  ``speed_ratio`` is the yardstick's step time over the arm's.

Peak memory is the project's accounting of one steady-state step (:func:`benchmarks.memory.step_memory`, fake
tensors), for every arm.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table
from benchmarks.memory import step_memory
from benchmarks.speed import _quiet_build, time_alternating
from fpt_monai.networks import FPTNet
from fpt_monai.preload import storage_dtype
from fpt_monai.presets import PRESETS, create_backbone

__all__ = ["STEP_PRESETS", "load_yardstick", "step_inputs", "step_table", "training_step_comparison"]

STEP_PRESETS = ("fpt", "fpt_plus")


def load_yardstick(path: str | Path):
    """The ``PlainFPT`` class of a yardstick file (``PlainFPT(variant)``, ``forward(side_images, kv)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"yardstick file {path} does not exist.")
    spec = importlib.util.spec_from_file_location("fpt_step_yardstick", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "PlainFPT"):
        raise AttributeError(f"yardstick file {path} defines no PlainFPT.")
    return module.PlainFPT


def step_inputs(
    shape, side_img_size: int, batch_size: int, num_classes: int, kv_dtype: torch.dtype, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs of one training step (seed 0): side views, preloaded keys/values in ``kv_dtype``, labels.

    ``shape`` is the frozen backbone's (its ``in_channels`` and ``kv_shape``); ``device`` defaults to torch's.
    """
    torch.manual_seed(0)
    side = torch.randn(batch_size, shape.in_channels, side_img_size, side_img_size, device=device)
    kv = torch.randn(batch_size, *shape.kv_shape, device=device).to(kv_dtype)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    return side, kv, labels


def _step(net: torch.nn.Module, side_images: torch.Tensor, kv: torch.Tensor, labels: torch.Tensor):
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.1)

    def step() -> None:
        loss = F.cross_entropy(net(side_images, kv=kv), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    return step


def training_step_comparison(
    presets: tuple[str, ...] = STEP_PRESETS,
    batch_size: int = 16,
    num_classes: int = 5,
    kv_dtype: str = "float16",
    repeats: int = 9,
    yardstick: str | Path | None = None,
) -> list[dict]:
    """One row per preset and arm: images/s, the speed ratio to the yardstick (if given) and the peak memory."""

    plain_class = load_yardstick(yardstick) if yardstick else None
    dtype = storage_dtype(kv_dtype)
    rows = []
    for preset in presets:
        config = PRESETS[preset]
        with torch.device("meta"):  # only the backbone's shape is needed
            shape = _quiet_build(lambda: create_backbone(preset, pretrained=False)).shape
        side, kv, labels = step_inputs(shape, config.side_img_size, batch_size, num_classes, dtype)

        def network(recompute: bool, device: str | None = None) -> FPTNet:
            with torch.device(device or "cpu"):
                return FPTNet(
                    shape, num_classes, side_img_size=config.side_img_size, variant=config.variant, recompute=recompute
                ).train()

        arms = {"recompute": _step(network(True), side, kv, labels), "stored": _step(network(False), side, kv, labels)}
        memory = {
            name: step_memory(
                network(recompute, "meta"), lambda n, x: n(x[0], kv=x[1]),
                [(tuple(side.shape[1:]), torch.float32), (tuple(shape.kv_shape), dtype)], batch_size, num_classes,
            )
            for name, recompute in (("recompute", True), ("stored", False))
        }
        if plain_class is not None:
            plain = plain_class(config.variant, num_classes=num_classes).train()
            arms["yardstick"] = _step(plain, side, kv.float(), labels)
            with torch.device("meta"):
                plain_meta = plain_class(config.variant, num_classes=num_classes)
            memory["yardstick"] = step_memory(
                plain_meta, lambda n, x: n(x[0], x[1]),
                [(tuple(side.shape[1:]), torch.float32), (tuple(shape.kv_shape), torch.float32)],
                batch_size, num_classes,
            )
        seconds = time_alternating(arms, repeats=repeats, warmup=2)
        for name, s in seconds.items():
            row = {
                "preset": preset,
                "arm": name,
                "kv_dtype": kv_dtype if name != "yardstick" else "float32",
                "batch_size": batch_size,
                "images_per_second": round(batch_size / s, 2),
                "peak_mib": round(memory[name]["total_bytes"] / 2**20, 1),
                "activations_mib": round(memory[name]["activations_bytes"] / 2**20, 1),
                "saved_for_backward_mib": round(memory[name]["saved_for_backward_bytes"] / 2**20, 1),
                "peak_bytes": memory[name]["total_bytes"],
                "saved_for_backward_bytes": memory[name]["saved_for_backward_bytes"],
            }
            if "yardstick" in seconds:
                row["speed_ratio"] = round(seconds["yardstick"] / s, 3)
            rows.append(row)
    return rows


def step_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`training_step_comparison` rows."""
    return markdown_table(
        ["preset", "arm", "images/s", "speed ratio to the yardstick", "peak MiB", "activations MiB"],
        "llrrrr",
        (
            [row["preset"], row["arm"], row["images_per_second"], row.get("speed_ratio", ""), row["peak_mib"],
             row["activations_mib"]]
            for row in rows
        ),
    )
