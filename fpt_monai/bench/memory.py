"""Training memory of FPT, FPT+ and the baselines, under one stated protocol.

Protocol (the defaults): the ViT-B/16 backbone of the ``fpt`` preset at 512x512, batch 16, float32 compute,
AdamW, 5 classes, cross-entropy. One training step runs first so the optimizer state exists (steady state);
the second step (forward, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``) is tracked. The figure
is the peak of live tensor bytes during that step, split by PyTorch's
``torch.distributed._tools.mem_tracker.MemTracker`` into

- ``parameters`` (parameters and buffers, frozen ones included when they are resident),
- ``gradients``, ``optimizer_state``,
- ``activations`` (tensors made in the forward pass and alive at the peak: what is saved for backward),
- ``temporaries`` (made during backward, e.g. gradients of activations),
- ``inputs`` (the batch: images, labels and, for preloaded FPT, the keys/values read from the cache).

Tensors are fake (``FakeTensorMode``: shapes, dtypes and storages without data) unless ``fake=False``, so the
22 GB full fine-tuning step is accounted for exactly without the memory or the hours of compute; a real run of
the small methods gives the same bytes (tested). A second count, the bytes saved for backward collected with
``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters and inputs excluded), cross-checks the
``activations`` figure. On a GPU (``device="cuda"``, real tensors) ``torch.cuda.max_memory_allocated`` over the
tracked step is reported too; it includes the caching allocator's rounding and workspace.

Attention: ``"eager"`` (the score matrix is materialised: softmax(q k^T) v in plain operations) for every
attention of every method, or ``"fused"`` (PyTorch's ``scaled_dot_product_attention``) where timm offers it.
FPT's fusion module is the same in both (16 prompt queries per block; its own memory-lean function).

FPT/FPT+ setups:

- ``preloaded`` (default): the step reads the side view and the cached keys/values (``kv_dtype``, float16 in
  the bundle); the frozen backbone's weights are not resident (the network is built from its shape only).
- ``preloaded`` with ``backbone_resident=True``: the same, with the 86 M frozen weights in memory as well.
- ``online``: no cache; the frozen backbone runs in every step under no-grad (weights resident).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from fpt_monai.weights import random_weights_expected

__all__ = ["FPT_METHODS", "MEMORY_CATEGORIES", "METHODS", "measure_training_memory", "memory_table"]

FPT_METHODS = {"fpt": "fpt", "fpt_plus": "fpt_plus", "fpt_tiny": "fpt_tiny", "fpt_plus_tiny": "fpt_plus_tiny"}
METHODS = ("full", "linear", "vpt", "lora", "adapter", "fpt", "fpt_plus")
MEMORY_CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "inputs")
_ATTENTION = ("eager", "fused")
_FPT_SETUPS = ("preloaded", "online")


def _set_attention(module: nn.Module, attention: str) -> None:
    # timm's Attention (backbone blocks and the side ViT's blocks) switches on this attribute per instance
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = attention == "fused"


def _build(method: str, preset: str, img_size: int, num_classes: int, setup: str, backbone_resident: bool):
    """(network on the meta device, forward(network, inputs) -> logits, input shapes and dtypes)."""
    from fpt_monai.networks import FPTNet, create_fpt
    from fpt_monai.networks.baselines import create_baseline

    overrides = {"img_size": img_size}
    if method in FPT_METHODS:
        with torch.device("meta"):
            full = create_fpt(FPT_METHODS[method], num_classes, pretrained=False, **overrides)
        if setup == "online" or backbone_resident:
            net = full
        else:  # trains from the cache without the backbone's weights
            net = FPTNet(
                full.backbone.shape, num_classes, side_img_size=full.side_img_size, variant=full.fusion.variant,
                num_prompts=full.prompts.prompts.shape[1], reduction=full.shape.embed_dim // full.side.embed_dim,
            )
            net = net.to("meta")
        if setup == "online":
            return net, lambda n, x: n(x[0]), [((3, *full.shape.img_size), None)]
        return net, lambda n, x: n.forward_side(x[0], x[1]), [
            ((3, *full.side_img_size), None),
            (tuple(full.shape.kv_shape), "kv"),
        ]
    with torch.device("meta"):
        net = create_baseline(method, num_classes, preset=preset, pretrained=False, **overrides)
    return net, lambda n, x: n(x[0]), [((3, *net.img_size), None)]


class _NoHook:
    def remove(self) -> None:
        pass


def _memory_tracker(net: nn.Module, *tracked) -> torch.distributed._tools.mem_tracker.MemTracker:
    """PyTorch's MemTracker over ``net`` and ``tracked``, usable with frozen parameters.

    MemTracker installs a gradient hook on every parameter of a module it enters, and PyTorch refuses hooks on
    tensors that do not require grad; frozen parameters never get a gradient, so they are marked as hooked.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(net, *tracked)
    for param in net.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    return tracker


def _storages(t: torch.Tensor) -> list:
    from torch.distributed._tools.common_utils import get_untyped_storages

    return list(get_untyped_storages(t))


def measure_training_memory(
    method: str = "fpt",
    batch_size: int = 16,
    img_size: int = 512,
    attention: str = "eager",
    kv_dtype: str = "float16",
    setup: str = "preloaded",
    backbone_resident: bool = False,
    num_classes: int = 5,
    preset: str = "fpt",
    fake: bool = True,
    device: str = "cpu",
) -> dict:
    """Peak training memory of one steady-state step of ``method``, split by category (see the module doc).

    Args:
        method: ``full``, ``linear``, ``vpt``, ``lora``, ``adapter``, ``fpt``, ``fpt_plus`` (or the tiny FPT
            presets ``fpt_tiny``/``fpt_plus_tiny``, for tests).
        batch_size: images per step.
        img_size: the backbone's input size (the side network keeps its preset size).
        attention: ``eager`` or ``fused``.
        kv_dtype: storage dtype of the preloaded keys/values (FPT ``preloaded`` only).
        setup: FPT only: ``preloaded`` or ``online`` (see the module doc).
        backbone_resident: FPT ``preloaded`` only: keep the frozen backbone's weights in memory too.
        num_classes: classifier outputs.
        preset: the FPT preset whose backbone the baselines use (``fpt``: ViT-B/16).
        fake: account with fake tensors (no data, no compute); ``False`` runs the step for real.
        device: ``cpu`` or ``cuda`` (``cuda`` needs ``fake=False``).

    Returns:
        A dict with ``total_bytes``, one ``<category>_bytes`` per :data:`MEMORY_CATEGORIES`,
        ``saved_for_backward_bytes`` (the cross-check), parameter counts and the settings.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if method not in METHODS and method not in FPT_METHODS:
        raise ValueError(f"method must be one of {METHODS} (or {tuple(FPT_METHODS)}), got {method!r}.")
    if attention not in _ATTENTION:
        raise ValueError(f"attention must be one of {_ATTENTION}, got {attention!r}.")
    if setup not in _FPT_SETUPS:
        raise ValueError(f"setup must be one of {_FPT_SETUPS}, got {setup!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if device != "cpu" and fake:
        raise ValueError("a GPU measurement runs real tensors: pass fake=False with device='cuda'.")
    kv_torch_dtype = getattr(torch, kv_dtype, None)
    if not isinstance(kv_torch_dtype, torch.dtype) or not kv_torch_dtype.is_floating_point:
        raise ValueError(f"kv_dtype must name a floating torch dtype, got {kv_dtype!r}.")
    is_fpt = method in FPT_METHODS

    with random_weights_expected():  # no weights are needed to count bytes
        net, forward, input_specs = _build(method, preset, img_size, num_classes, setup, backbone_resident)
    _set_attention(net, attention)
    counts = net.parameter_counts()

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    with mode:
        net = net.to_empty(device=device).train()
        # foreach: PyTorch's default on GPUs; one op per step instead of one per tensor (fast fake accounting)
        optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
        inputs = [
            torch.randn(batch_size, *shape, device=device).to(kv_torch_dtype if kind == "kv" else torch.float32)
            for shape, kind in input_specs
        ]
        labels = torch.randint(0, num_classes, (batch_size,), device=device)

        def step(saved_hook: Callable | None = None) -> None:
            hooks = torch.autograd.graph.saved_tensors_hooks(saved_hook, lambda t: t) if saved_hook else nullcontext()
            with hooks:
                loss = F.cross_entropy(forward(net, inputs), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # optimizer state now exists: the tracked step is the steady state
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tracker = _memory_tracker(net, optimizer, *inputs, labels)
        with tracker:
            step()
        cuda_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None

        # cross-check in a further step (holding the storages would change the peak): bytes of the unique
        # storages saved for backward, parameters and inputs excluded
        known = {id(s) for t in [*net.parameters(), *net.buffers(), *inputs, labels] for s in _storages(t)}
        saved: dict[int, tuple] = {}

        def count_saved(t: torch.Tensor) -> torch.Tensor:
            for s in _storages(t):
                if id(s) not in known:
                    saved[id(s)] = (s, s.nbytes())  # holding the storage keeps its id unique
            return t

        step(count_saved)
        saved_bytes = sum(nbytes for _, nbytes in saved.values())
        saved.clear()

    peak = tracker.get_tracker_snapshot("peak")
    snapshot = next(iter(peak.values())) if peak else {}

    def bytes_of(*names: str) -> int:
        return int(sum(v for k, v in snapshot.items() if getattr(k, "value", k) in names))

    result = {
        "method": method,
        "setup": setup if is_fpt else "images",
        "backbone_resident": bool(backbone_resident or setup == "online") if is_fpt else True,
        "kv_dtype": kv_dtype if is_fpt and setup == "preloaded" else None,
        "attention": attention,
        "batch_size": batch_size,
        "img_size": img_size,
        "fake_tensors": fake,
        "device": device,
        "total_bytes": int(snapshot.get("Total", 0)),
        "parameters_bytes": bytes_of("Parameter", "Buffer"),
        "gradients_bytes": bytes_of("Gradient"),
        "optimizer_state_bytes": bytes_of("Optstate"),
        "activations_bytes": bytes_of("Activation"),
        "temporaries_bytes": bytes_of("Temp"),
        "inputs_bytes": bytes_of("Other"),
        "saved_for_backward_bytes": int(saved_bytes),
        "learnable_parameters": counts["learnable"],
        "frozen_parameters": counts["frozen"],
    }
    if cuda_peak is not None:
        result["cuda_max_memory_allocated"] = int(cuda_peak)
    return result


def memory_table(
    methods: Sequence[str] = METHODS,
    attention: Sequence[str] = _ATTENTION,
    batch_size: int = 16,
    img_size: int = 512,
    kv_dtypes: Sequence[str] = ("float16", "float32"),
    online: bool = False,
    **kwargs,
) -> list[dict]:
    """Every method (FPT/FPT+ in each setup and cache dtype) under each attention, with ``ratio_to_full``.

    The ratio divides by full fine-tuning measured in the same call with the same attention. FPT's ``online``
    setup (backbone run in every step) is added with ``online=True``; it takes minutes on a CPU, since the
    backbone's per-head attention loop is traced op by op.
    """
    rows = []
    for attn in attention:
        full = measure_training_memory("full", batch_size, img_size, attn, **kwargs)
        for method in methods:
            if method not in FPT_METHODS:
                runs = [full] if method == "full" else [measure_training_memory(method, batch_size, img_size, attn, **kwargs)]
            else:
                runs = [
                    measure_training_memory(method, batch_size, img_size, attn, kv_dtype=d, backbone_resident=r, **kwargs)
                    for d in kv_dtypes
                    for r in (False, True)
                ]
                if online:
                    runs.append(measure_training_memory(method, batch_size, img_size, attn, setup="online", **kwargs))
            for row in runs:
                rows.append({**row, "ratio_to_full": row["total_bytes"] / full["total_bytes"]})
    return rows
