"""``python -m benchmarks bench``: every benchmark in one run, written as JSON, a markdown table and a PNG plot.

Sections (each documented in its module):

- ``parameters``: learnable parameters and their share of learnable + frozen, per method (meta device).
- ``memory``: training memory per method under the protocol of :mod:`benchmarks.memory`, eager and
  fused attention, with ``ratio_to_full``; FPT/FPT+ from the cache (float16 and float32) with and without the
  frozen backbone's weights resident.
- ``cache``: cached keys/values per image (FPT, FPT+; float32, float16).
- ``speed``: training throughput per method, preload throughput and single-image inference latency
  (:mod:`benchmarks.speed`).
- ``accuracy`` (only with ``accuracy=True``; minutes to hours on a CPU): every method trained and tested on the
  bundle's sample task with the same schedule, on the demo network (:mod:`benchmarks.accuracy`); also
  written to ``accuracy.json`` and ``accuracy.md``.

The acceptance bounds (:data:`TARGETS`, checked by :func:`check_targets`) are evaluated on the figures and
printed with them (``targets``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import speed as speed_bench
from benchmarks.accuracy import accuracy_markdown, accuracy_table, write_accuracy
from benchmarks.memory import METHODS, memory_table
from fpt_monai.weights import random_weights_expected

__all__ = [
    "METHOD_LABELS", "TARGETS", "cache_bytes", "check_targets", "parameter_table", "run_benchmarks", "write_markdown",
    "write_plot",
]

logger = logging.getLogger(__name__)

METHOD_LABELS = {
    "full": "full fine-tuning",
    "linear": "linear probing",
    "vpt": "VPT-deep prompt tuning",
    "lora": "LoRA (r=16, q/k/v)",
    "adapter": "AdaptFormer adapter",
    "fpt": "FPT",
    "fpt_plus": "FPT+",
}
_MB = 1e6

#: The acceptance bounds: training memory of FPT/FPT+ as a share of full fine-tuning's (at most), FPT's training
#: throughput as a multiple of full fine-tuning's (at least), preload throughput as a share of the fastest bare
#: backbone inference (at least), FPT's one-image latency as a multiple of the fastest bare backbone's (at most).
TARGETS = {
    "memory_ratio": {"fpt": 0.04, "fpt_plus": 0.01},
    "training_speedup": 50.0,
    "preload_ratio": 0.95,
    "latency_ratio": 1.10,
}


def parameter_table(num_classes: int = 5, preset: str = "fpt") -> list[dict]:
    """Learnable and frozen parameters of every method on the preset's backbone (meta device, no weights)."""
    from fpt_monai.presets import create_baseline, create_fpt

    rows = []
    with random_weights_expected(), torch.device("meta"):
        for method in METHODS:
            if method in ("fpt", "fpt_plus"):
                net = create_fpt(method, num_classes, pretrained=False)
            else:
                net = create_baseline(method, num_classes, preset=preset, pretrained=False)
            counts = net.parameter_counts()
            total = counts["learnable"] + counts["frozen"]
            rows.append({"method": method, **counts, "learnable_percent": 100 * counts["learnable"] / total})
    return rows


def cache_bytes() -> list[dict]:
    """Bytes of the cached keys/values of one image (the entry file adds a header of about 400 bytes)."""
    from fpt_monai.presets import create_fpt

    rows = []
    for preset in ("fpt", "fpt_plus"):
        with random_weights_expected(), torch.device("meta"):
            shape = create_fpt(preset, 5, pretrained=False).backbone.shape
        for dtype in ("float32", "float16"):
            numel = math.prod(shape.kv_shape)
            rows.append({"method": preset, "dtype": dtype, "kv_shape": list(shape.kv_shape),
                         "bytes_per_image": numel * getattr(torch, dtype).itemsize})
    return rows


def _find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def check_targets(results: dict) -> list[dict]:
    """The bounds of :data:`TARGETS` evaluated on ``results``: name, measured value, bound and pass/fail."""
    checks = []
    memory = results.get("memory", [])
    for method, bound in TARGETS["memory_ratio"].items():
        for dtype in ("float16", "float32"):
            row = _find(memory, method=method, attention="eager", kv_dtype=dtype, backbone_resident=False, setup="preloaded")
            if row:
                checks.append({"target": f"{METHOD_LABELS[method]} memory / full fine-tuning, preloaded ({dtype} cache), "
                               "backbone weights not resident, eager attention", "value": row["ratio_to_full"],
                               "bound": f"<= {bound}", "met": row["ratio_to_full"] <= bound})
    for method in ("fpt", "fpt_plus"):
        half = _find(memory, method=method, attention="eager", kv_dtype="float16", backbone_resident=False, setup="preloaded")
        single = _find(memory, method=method, attention="eager", kv_dtype="float32", backbone_resident=False, setup="preloaded")
        if half and single:
            checks.append({"target": f"{METHOD_LABELS[method]}: float16 cache memory <= float32 cache memory",
                           "value": half["total_bytes"] / single["total_bytes"], "bound": "<= 1", "met": half["total_bytes"] <= single["total_bytes"]})
    speed = results.get("speed", {})
    training = speed.get("training_images_per_s", {})
    if "fpt" in training and "full" in training:
        ratio = training["fpt"] / training["full"]
        checks.append({"target": "FPT training images/s / full fine-tuning", "value": ratio,
                       "bound": f">= {TARGETS['training_speedup']:g}", "met": ratio >= TARGETS["training_speedup"]})
    # against the fastest way measured to run the bare backbone (fused or eager attention, batched or one
    # image at a time), so no arm is picked to flatter FPT: the most images/s, the shortest latency
    preload_bound, latency_bound = TARGETS["preload_ratio"], TARGETS["latency_ratio"]
    against_bare = (
        ("preload_images_per_s", "kv_extraction", max, "preload throughput / fastest bare backbone inference",
         f">= {preload_bound:g}", lambda ratio: ratio >= preload_bound),
        ("inference_latency_s", "fpt_network", min, "FPT inference latency / fastest bare backbone latency",
         f"<= {latency_bound:.2f}", lambda ratio: ratio <= latency_bound),
    )
    for figures, measured, fastest, target, bound, met in against_bare:
        values = speed.get(figures, {})
        bare = {arm: value for arm, value in values.items() if arm.startswith("bare_backbone")}
        if measured in values and bare:
            arm = fastest(bare, key=bare.get)
            ratio = values[measured] / bare[arm]
            checks.append({"target": f"{target} ({arm.replace('_', ' ')})", "value": ratio, "bound": bound,
                           "met": met(ratio)})
    return checks


def write_markdown(results: dict, path: str | os.PathLike) -> str:
    """The results as markdown tables (also returned)."""
    date = f" Date: {results['date']}." if results.get("date") else ""
    lines = [f"# FPT benchmarks\n\nMachine: {results['machine']}. Command: `{results['command']}`.{date}\n"]
    if results.get("parameters"):
        lines += ["## Learnable parameters (ViT-B/16 at 512, 5 classes)\n", "| method | learnable | frozen | learnable % |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['learnable']:,} | {r['frozen']:,} | {r['learnable_percent']:.2f} |"
                  for r in results["parameters"]]
        lines.append("")
    if results.get("memory"):
        p = results["protocol"]
        lines += [f"## Training memory (batch {p['batch_size']}, {p['img_size']}x{p['img_size']}, float32, AdamW, steady "
                  "state; peak live MB by category)\n",
                  "| method | setup | attention | total MB | % of full | params | grads | optimizer | activations | temporaries | inputs | saved for backward |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["memory"]:
            if r["setup"] == "images":
                setup = "images"
            else:
                setup = f"{r['setup']}" + (f", {r['kv_dtype']} cache" if r["kv_dtype"] else "")
                setup += ", backbone resident" if r["backbone_resident"] else ", backbone not resident"
            lines.append(
                f"| {METHOD_LABELS.get(r['method'], r['method'])} | {setup} | {r['attention']} | {r['total_bytes'] / _MB:,.1f} | "
                f"{100 * r['ratio_to_full']:.2f} | {r['parameters_bytes'] / _MB:,.1f} | {r['gradients_bytes'] / _MB:,.1f} | "
                f"{r['optimizer_state_bytes'] / _MB:,.1f} | {r['activations_bytes'] / _MB:,.1f} | "
                f"{r['temporaries_bytes'] / _MB:,.1f} | {r['inputs_bytes'] / _MB:,.1f} | {r['saved_for_backward_bytes'] / _MB:,.1f} |"
            )
        lines.append("")
    if results.get("cache"):
        lines += ["## Cached keys/values per image\n", "| method | dtype | K/V shape | bytes |", "|---|---|---|---:|"]
        lines += [f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['dtype']} | {tuple(r['kv_shape'])} | {r['bytes_per_image']:,} |" for r in results["cache"]]
        lines.append("")
    speed = results.get("speed")
    if speed:
        lines += [f"## Speed ({speed['settings']})\n", "| method | training images/s |", "|---|---:|"]
        lines += [f"| {METHOD_LABELS.get(m, m)} | {v:.3f} |" for m, v in speed["training_images_per_s"].items()]
        lines += ["", "| preload (images/s) | value |", "|---|---:|"]
        lines += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in speed["preload_images_per_s"].items()]
        lines += ["", "| inference latency, one image (s) | value |", "|---|---:|"]
        lines += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in speed["inference_latency_s"].items()]
        lines.append("")
    if results.get("accuracy"):
        lines += ["## Accuracy on the bundle's sample task (demo network EfficientNet-Lite0 for every method)\n",
                  accuracy_markdown(results["accuracy"])]
    if results.get("targets"):
        lines += ["## Targets\n", "| target | measured | bound | met |", "|---|---:|---|---|"]
        lines += [f"| {c['target']} | {c['value']:.4g} | {c['bound']} | {'yes' if c['met'] else '**no**'} |" for c in results["targets"]]
        lines.append("")
    text = "\n".join(lines)
    Path(path).write_text(text)
    return text


def write_plot(results: dict, path: str | os.PathLike) -> None:
    """Training memory per method (eager and fused attention, log scale) against its learnable share."""
    import matplotlib  # the optional `bench` extra: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    memory = [r for r in results.get("memory", []) if r["setup"] == "images" or (
        r["setup"] == "preloaded" and r["kv_dtype"] == "float16" and not r["backbone_resident"])]
    for offset, attention in ((-0.2, "eager"), (0.2, "fused")):
        rows = [r for r in memory if r["attention"] == attention]
        axes[0].bar([i + offset for i in range(len(rows))], [r["total_bytes"] / 1e9 for r in rows], width=0.4, label=f"{attention} attention")
        axes[0].set_xticks(range(len(rows)), [METHOD_LABELS.get(r["method"], r["method"]) for r in rows], rotation=30, ha="right")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("peak training memory (GB, log)")
    axes[0].set_title("ViT-B/16 at 512, batch 16 (FPT: float16 cache, backbone not resident)")
    axes[0].legend()
    eager = {r["method"]: r["total_bytes"] / 1e9 for r in memory if r["attention"] == "eager"}
    for row in results.get("parameters", []):
        if row["method"] in eager:
            axes[1].scatter(row["learnable_percent"], eager[row["method"]])
            axes[1].annotate(METHOD_LABELS.get(row["method"], row["method"]), (row["learnable_percent"], eager[row["method"]]), fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("learnable parameters (%)")
    axes[1].set_ylabel("peak training memory (GB, eager attention)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_benchmarks(
    output_dir: str | os.PathLike = "benchmarks/results",
    batch_size: int = 16,
    img_size: int = 512,
    speed: bool = True,
    speed_batch_size: int = 4,
    speed_repeats: int = 2,
    accuracy: bool = False,
    accuracy_epochs: int = 20,
    accuracy_dir: str | os.PathLike = "fpt_accuracy",
    accuracy_img_size: int | None = None,
    methods: Sequence[str] = METHODS,
    command: str = "python -m benchmarks bench",
    device: str | None = None,
) -> dict:
    """Run every section and write ``results.json``, ``results.md`` and ``memory.png`` to ``output_dir``.

    ``accuracy=True`` adds the accuracy section: :func:`benchmarks.accuracy.accuracy_table` with
    ``accuracy_epochs`` epochs per method at ``accuracy_img_size`` (default 512: the sample task as the demo has
    it), its runs under ``accuracy_dir``, also written to ``accuracy.json`` and
    ``accuracy.md`` in ``output_dir``. The speed section runs on ``device`` (default: the GPU when there is
    one, else the CPU); the memory section is the CPU accounting of :mod:`benchmarks.memory` either way.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results: dict = {
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"),
        "command": command,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "protocol": {"batch_size": batch_size, "img_size": img_size, "compute": "float32", "optimizer": "AdamW",
                     "steady_state": True, "zero_grad": "set_to_none"},
    }
    logger.info("parameters ...")
    results["parameters"] = parameter_table()
    logger.info("training memory (fake tensors, eager and fused attention) ...")
    results["memory"] = memory_table(methods, batch_size=batch_size, img_size=img_size)
    results["cache"] = cache_bytes()
    if speed:
        logger.info("training throughput, preload throughput, inference latency (this takes minutes) ...")
        results["speed"] = {
            "settings": f"on {device}, batch {speed_batch_size} for training and preload at {img_size}, random weights, "
            f"median of {speed_repeats} (training) or {speed_repeats + 3} (preload, latency) alternating samples, "
            "a sample of an arm under 1 s repeating its call for about 1 s",
            "training_images_per_s": speed_bench.training_throughput(
                methods, batch_size=speed_batch_size, img_size=img_size, repeats=speed_repeats, device=device),
            "preload_images_per_s": speed_bench.preload_throughput(
                batch_size=speed_batch_size, img_size=img_size, repeats=speed_repeats + 3, device=device),
            "inference_latency_s": speed_bench.inference_latency(
                img_size=img_size, repeats=speed_repeats + 3, device=device),
        }
    if accuracy:
        logger.info("accuracy on the sample task, %d epochs per method (this takes long on a CPU) ...", accuracy_epochs)
        results["accuracy"] = accuracy_table(accuracy_dir, num_epochs=accuracy_epochs, img_size=accuracy_img_size)
        write_accuracy(results["accuracy"], output, command=command)
    results["targets"] = check_targets(results)
    results["seconds"] = time.time() - start
    (output / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, output / "results.md")
    write_plot(results, output / "memory.png")
    return results
