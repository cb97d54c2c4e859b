"""Speed of FPT against the alternatives, measured side by side in one process.

- Training throughput (images/s) of one optimizer step per method on the same backbone and resolution: the
  baselines take the high-resolution image; FPT/FPT+ take the side view plus cached keys/values (float16, as
  the bundle stores them), i.e. a training step after preloading.
- Preload throughput: the frozen backbone's K/V extraction (what ``preload()`` computes per image) against the
  bare backbone's inference (timm ``forward_features``) on the same batch, with timm's fused attention
  (``bare_backbone``), with eager attention (``bare_backbone_eager``) and with fused attention one image at a
  time (``bare_backbone_per_image``; on the CPU the extraction itself runs one image at a time). The extraction
  needs every attention matrix (token importance is the attention each token receives), so it computes attention
  eagerly, but skips what the last extracted block does not need.
  The report's target compares with the fastest bare arm.
- Inference latency of one image: ``FPTNet(image)`` (backbone, selection, fusion, side ViT) against the same
  two bare-backbone arms.

Timings alternate between the compared arms and report the median, so slow drifts of a shared machine hit
both arms alike; an arm quicker than a second (FPT's training step) repeats its call within each sample.
Every network uses its default attention (PyTorch's fused attention where timm offers it).
Weights are random (``pretrained=False``): speed does not depend on their values.
Every function takes a ``device``: on a GPU (``"cuda"``) networks and inputs live there and each timed sample
ends with ``torch.cuda.synchronize()``, so the clock stops when the GPU's work is done.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fpt_monai.weights import random_weights_expected
from fpt_monai.networks.methods import method_names

__all__ = ["extraction_profile", "inference_latency", "preload_throughput", "time_alternating", "training_throughput"]


def time_alternating(
    arms: dict[str, Callable[[], None]],
    repeats: int = 3,
    warmup: int = 1,
    min_seconds: float = 1.0,
    synchronize: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each arm, timing the arms in turn ``repeats`` times after ``warmup`` rounds.

    A sample of an arm that is quicker than ``min_seconds`` (judged from its last warm-up call) repeats the call
    until the sample lasts about that long: a 0.1 s training step timed once is at the mercy of one scheduler
    hiccup, while the slow arms it is compared with average theirs over seconds. ``synchronize`` (e.g.
    ``torch.cuda.synchronize``) runs before the clock starts and before it stops, so asynchronous work is timed.
    """
    sync = synchronize or (lambda: None)
    calls = dict.fromkeys(arms, 1)
    for _ in range(warmup):
        for name, run in arms.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            calls[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, run in arms.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls[name]):
                run()
            sync()
            seconds[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in seconds.items()}


def _synchronizer(device: str | torch.device) -> Callable[[], None] | None:
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _quiet_build(build: Callable):
    with random_weights_expected():  # speed does not depend on the weights' values
        return build()


def _bare(model: torch.nn.Module, images: torch.Tensor, fused: bool, per_image: bool = False) -> Callable[[], None]:
    """timm ``forward_features`` with every attention fused or eager (restoring the flags afterwards), on the
    whole batch or one image at a time."""
    attentions = [m for m in model.modules() if hasattr(m, "fused_attn")]

    def run() -> None:
        before = [m.fused_attn for m in attentions]
        for m in attentions:
            m.fused_attn = fused
        try:
            for chunk in images.split(1) if per_image else (images,):
                model.forward_features(chunk)
        finally:
            for m, flag in zip(attentions, before):
                m.fused_attn = flag

    return run


def _training_step(net, optimizer, inputs: Sequence[torch.Tensor], labels: torch.Tensor, forward) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(net, inputs), labels).backward()
        optimizer.step()

    return step


def training_throughput(
    methods: Sequence[str] = method_names(),
    batch_size: int = 4,
    img_size: int = 512,
    preset: str = "fpt",
    repeats: int = 2,
    num_classes: int = 5,
    device: str = "cpu",
) -> dict[str, float]:
    """Images per second of a training step (forward, backward, AdamW) per method, timed alternately."""
    from fpt_monai.networks import FPTNet
    from fpt_monai.presets import create_baseline, create_fpt

    torch.manual_seed(0)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    arms = {}
    for method in methods:
        if method.startswith("fpt"):
            with torch.device("meta"):  # only the backbone's shape is needed: no 86M weights allocated or drawn
                full = _quiet_build(lambda: create_fpt(method, num_classes, pretrained=False, img_size=img_size))
            net = FPTNet(
                full.backbone.shape, num_classes, side_img_size=full.side_img_size, variant=full.fusion.variant
            ).train()
            inputs = [torch.randn(batch_size, 3, *full.side_img_size, device=device),
                      torch.randn(batch_size, *full.backbone.shape.kv_shape, device=device).half()]
            forward = lambda n, x: n.forward_side(x[0], x[1])  # noqa: E731
            del full
        else:
            net = _quiet_build(lambda: create_baseline(method, num_classes, preset=preset, pretrained=False, img_size=img_size)).train()
            inputs = [torch.randn(batch_size, 3, img_size, img_size, device=device)]
            forward = lambda n, x: n(x[0])  # noqa: E731
        net.to(device)
        optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-4)
        arms[method] = _training_step(net, optimizer, inputs, labels, forward)
    seconds = time_alternating(arms, repeats=repeats, warmup=1, synchronize=_synchronizer(device))
    return {method: batch_size / s for method, s in seconds.items()}


def preload_throughput(
    preset: str = "fpt", batch_size: int = 4, img_size: int = 512, repeats: int = 3, device: str = "cpu"
) -> dict[str, float]:
    """Images per second: K/V extraction of the preset's frozen backbone against bare ``forward_features``
    (fused and eager attention)."""
    from fpt_monai.presets import create_backbone

    backbone = _quiet_build(lambda: create_backbone(preset, pretrained=False, img_size=img_size)).to(device)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    with torch.inference_mode():
        seconds = time_alternating(
            {
                "kv_extraction": lambda: backbone(images),
                "bare_backbone": _bare(backbone.model, images, fused=True),
                "bare_backbone_eager": _bare(backbone.model, images, fused=False),
                "bare_backbone_per_image": _bare(backbone.model, images, fused=True, per_image=True),
            },
            repeats=repeats,
            synchronize=_synchronizer(device),
        )
    return {name: batch_size / s for name, s in seconds.items()}


def inference_latency(
    preset: str = "fpt", img_size: int = 512, repeats: int = 3, num_classes: int = 5, device: str = "cpu"
) -> dict[str, float]:
    """Seconds for one image: the whole FPT network against the bare backbone (fused and eager attention)."""
    from fpt_monai.presets import create_fpt

    net = _quiet_build(lambda: create_fpt(preset, num_classes, pretrained=False, img_size=img_size)).eval().to(device)
    image = torch.randn(1, 3, img_size, img_size, device=device)
    with torch.inference_mode():
        return time_alternating(
            {
                "fpt_network": lambda: net(image),
                "bare_backbone": _bare(net.backbone.model, image, fused=True),
                "bare_backbone_eager": _bare(net.backbone.model, image, fused=False),
            },
            repeats=repeats,
            synchronize=_synchronizer(device),
        )


def extraction_profile(preset: str = "fpt", img_size: int = 512, calls: int = 3, top: int = 30) -> list[dict]:
    """Where one image's time goes: per-operator CPU milliseconds of the K/V extraction and of bare timm
    ``forward_features`` (PyTorch's profiler, mean over ``calls`` after two warm-up calls), the ``top`` operators
    by the larger of the two, plus a ``total`` row."""
    from torch.profiler import profile

    from fpt_monai.presets import create_backbone

    torch.manual_seed(0)
    backbone = _quiet_build(lambda: create_backbone(preset, pretrained=False, img_size=img_size))
    image = torch.randn(1, 3, img_size, img_size)

    def per_op(run: Callable[[], object]) -> dict[str, tuple[float, int]]:
        with torch.inference_mode():
            run()
            run()
            with profile() as prof:
                for _ in range(calls):
                    run()
        return {e.key: (e.self_cpu_time_total / 1000 / calls, e.count // calls) for e in prof.key_averages()}

    extraction = per_op(lambda: backbone(image))
    bare = per_op(lambda: backbone.model.forward_features(image))
    never = (0.0, 0)
    names = sorted(set(extraction) | set(bare), key=lambda k: -max(extraction.get(k, never)[0], bare.get(k, never)[0]))
    rows = [
        {"op": name, "kv_extraction_ms": extraction.get(name, never)[0], "kv_extraction_calls": extraction.get(name, never)[1],
         "bare_backbone_ms": bare.get(name, never)[0], "bare_backbone_calls": bare.get(name, never)[1]}
        for name in names[:top]
    ]
    rows.append({"op": "total", "kv_extraction_ms": sum(v[0] for v in extraction.values()), "kv_extraction_calls": None,
                 "bare_backbone_ms": sum(v[0] for v in bare.values()), "bare_backbone_calls": None})
    return rows
