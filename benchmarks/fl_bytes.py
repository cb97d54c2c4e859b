"""Bytes a site exchanges per federated round, per method: what ``fpt_monai.fl`` sends and receives.

Each round a site receives the global learnable parameters and sends back their update (a weight difference of
the same shape): both directions carry exactly the learnable parameters (:func:`fpt_monai.fl.learnable_names`),
as float32. The counts come from the networks built on PyTorch's meta device (no weights, no training), at
ViT-B/16 (the papers' presets, 5 classes) and on the demo network (EfficientNet-Lite0, the sample task's 3
classes). "whole model" is what exchanging the full network would cost (learnable + frozen values, float32):
what a client that sends its whole ``state_dict`` sends for a baseline network.
"""

from __future__ import annotations

import torch

from fpt_monai.fl import learnable_names
from fpt_monai.presets import create_baseline, create_fpt
from fpt_monai.weights import random_weights_expected

__all__ = ["SETTINGS", "fl_bytes_markdown", "run"]

#: (backbone label, preset of the baselines, FPT preset, FPT+ preset, number of classes).
SETTINGS = (
    ("ViT-B/16 at 512", "fpt", "fpt", "fpt_plus", 5),
    ("demo (EfficientNet-Lite0)", "fpt_demo", "fpt_demo", "fpt_plus_demo", 3),
)
#: The methods of the table, in its order.
METHODS = ("fpt", "fpt_plus", "lora", "full")
BYTES_PER_VALUE = torch.tensor([], dtype=torch.float32).element_size()


def _network(method: str, preset: str, fpt_preset: str, fpt_plus_preset: str, num_classes: int):
    if method == "fpt":
        return create_fpt(fpt_preset, num_classes, pretrained=False)
    if method == "fpt_plus":
        return create_fpt(fpt_plus_preset, num_classes, pretrained=False)
    return create_baseline(method, num_classes, preset=preset, pretrained=False)


def run(command: str = "") -> dict:
    """One row per (backbone, method): learnable tensors and values, bytes sent, received, and in all per round."""
    rows = []
    for label, preset, fpt_preset, fpt_plus_preset, num_classes in SETTINGS:
        for method in METHODS:
            with random_weights_expected(), torch.device("meta"):
                net = _network(method, preset, fpt_preset, fpt_plus_preset, num_classes)
            names = set(learnable_names(net))
            values = sum(p.numel() for n, p in net.named_parameters() if n in names)
            counts = net.parameter_counts()
            assert values == counts["learnable"], (method, preset)
            whole = counts["learnable"] + counts["frozen"]
            rows.append(
                {
                    "backbone": label,
                    "method": method,
                    "num_classes": num_classes,
                    "tensors": len(names),
                    "values": values,
                    "sent_bytes": values * BYTES_PER_VALUE,
                    "received_bytes": values * BYTES_PER_VALUE,
                    "round_bytes": 2 * values * BYTES_PER_VALUE,
                    "whole_model_bytes": whole * BYTES_PER_VALUE,
                    "share_of_whole": values / whole,
                }
            )
    return {"command": command, "dtype": "float32", "rows": rows}


def fl_bytes_markdown(result: dict) -> str:
    """The table of :func:`run` in Markdown (MB = 10^6 bytes)."""
    lines = [
        "| backbone | method | tensors | values | sent per round | received per round | per round, both ways "
        "| whole model | share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['backbone']} | {row['method']} | {row['tensors']} | {row['values']:,} "
            f"| {row['sent_bytes'] / 1e6:.2f} MB | {row['received_bytes'] / 1e6:.2f} MB "
            f"| {row['round_bytes'] / 1e6:.2f} MB | {row['whole_model_bytes'] / 1e6:.2f} MB "
            f"| {100 * row['share_of_whole']:.2f}% |"
        )
    return "\n".join(lines)
