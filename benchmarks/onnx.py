"""Inference with ONNX Runtime against eager PyTorch: images/s of the same network, same inputs, one process.

The network (a preset, default the bundle's ``fpt_demo``) is exported with ``torch.onnx.export`` as the bundle's
``monai.bundle onnx_export`` command does it (the torch.export-based exporter, a dynamic batch dimension), its
outputs are checked against eager (largest absolute difference reported), and then both arms classify the same
batch in turn (:func:`benchmarks.speed.time_alternating`, median) at every batch size: eager under
``torch.inference_mode`` with PyTorch's threads, ONNX Runtime through
:class:`fpt_monai.engine.onnx_runtime.OnnxRuntimeNetwork` with its own. Inputs are random images at the
network's size; the figures are the forward pass only (no file reading or resizing).
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.speed import _quiet_build, time_alternating
from fpt_monai.engine.onnx_runtime import OnnxRuntimeNetwork
from fpt_monai.presets import create_fpt

__all__ = ["onnx_markdown", "run_onnx_benchmark"]


def _export(network: torch.nn.Module, images: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        network,
        (images,),
        str(path),
        input_names=["image"],
        output_names=["pred"],
        dynamic_axes={"image": [0], "pred": [0]},
        verbose=False,
    )


def run_onnx_benchmark(
    preset: str = "fpt_demo",
    num_classes: int = 3,
    batch_sizes: Sequence[int] = (1, 16),
    repeats: int = 5,
    pretrained: bool | str = True,
    command: str = "",
) -> dict:
    """Images/s of eager PyTorch and ONNX Runtime per batch size, with ``onnx_to_eager`` (see the module)."""
    if pretrained is False:
        network = _quiet_build(lambda: create_fpt(preset, num_classes=num_classes, pretrained=False)).eval()
    else:
        network = create_fpt(preset, num_classes=num_classes, pretrained=pretrained).eval()
    size = network.shape.img_size
    channels = network.shape.in_channels
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        with torch.inference_mode():
            _export(network, torch.rand(2, channels, *size), path)
        runtime = OnnxRuntimeNetwork(path)
        for batch_size in batch_sizes:
            images = torch.randn(batch_size, channels, *size)
            with torch.inference_mode():
                difference = float((runtime(images) - network(images)).abs().max())

            def eager(images=images) -> None:
                with torch.inference_mode():
                    network(images)

            def onnx(images=images) -> None:
                runtime(images)

            seconds = time_alternating({"eager": eager, "onnx": onnx}, repeats=repeats, min_seconds=2.0)
            results.append(
                {
                    "batch_size": batch_size,
                    "eager_images_per_s": round(batch_size / seconds["eager"], 2),
                    "onnx_images_per_s": round(batch_size / seconds["onnx"], 2),
                    "onnx_to_eager": round(seconds["eager"] / seconds["onnx"], 2),
                    "max_abs_difference": difference,
                }
            )
    return {
        "preset": preset,
        "img_size": list(size),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "command": command,
        "results": results,
    }


def onnx_markdown(result: dict) -> str:
    """A Markdown table of :func:`run_onnx_benchmark`'s result."""
    lines = [
        f"{result['preset']} at {'x'.join(map(str, result['img_size']))}, torch {result['torch']}, onnxruntime "
        f"{result['onnxruntime']}, {result['machine']} (`{result['command']}`)",
        "",
        "| batch | eager images/s | ONNX Runtime images/s | ONNX Runtime / eager | max abs difference |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        lines.append(
            f"| {row['batch_size']} | {row['eager_images_per_s']} | {row['onnx_images_per_s']} | "
            f"{row['onnx_to_eager']}x | {row['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines)
