"""Training memory of one steady-state step, one accounting for images (2D) and volumes (3D).

The accounting (:func:`step_memory`): float32 compute, AdamW, cross-entropy. One training step runs first so the
optimizer state exists (steady state); the second step (forward, backward, ``optimizer.step()``,
``zero_grad(set_to_none=True)``) is tracked. The figure is the peak of live tensor bytes during that step, split
by PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` into

- ``parameters`` (parameters and buffers, frozen ones included when they are resident),
- ``gradients``, ``optimizer_state``,
- ``activations`` (tensors made in the forward pass and alive at the peak: what is saved for backward),
- ``temporaries`` (made during backward, e.g. gradients of activations),
- ``inputs`` (the batch: images or volumes, labels and, for preloaded FPT, the keys/values read from the cache).

Tensors are fake (``FakeTensorMode``: shapes, dtypes and storages without data) unless ``fake=False``, so the
22 GB full fine-tuning step is accounted for exactly without the memory or the hours of compute; a real run of
small networks gives the same bytes (tested). A second count, the bytes saved for backward collected with
``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters and inputs excluded), cross-checks the
``activations`` figure. On a GPU (``device="cuda"``, real tensors) ``torch.cuda.max_memory_allocated`` over the
tracked step is reported too; it includes the caching allocator's rounding and workspace.

Attention: ``"eager"`` (the score matrix is materialised) or ``"fused"`` (PyTorch's
``scaled_dot_product_attention``) in every attention that offers the choice: timm's ``fused_attn`` (ViT-B/16,
the baselines, the side ViT) and MONAI's ``use_flash_attention`` (the 3D ViT). FPT's fusion module is the same in
both (16 prompt queries per block; its own memory-lean function).

Images (:func:`measure_training_memory`, :func:`memory_table`): the ViT-B/16 backbone of the ``fpt`` preset at
512x512, batch 16, 5 classes; every method of :data:`METHODS`. FPT/FPT+ setups:

- ``preloaded`` (default): the step reads the side view and the cached keys/values (``kv_dtype``, float16 in
  the bundle; an int8 cache gives float16 keys/values, as it dequantises them when an item is read); the frozen
  backbone's weights are not resident (the network is built from its shape only).
- ``preloaded`` with ``backbone_resident=True``: the same, with the 86 M frozen weights in memory as well.
- ``online``: no cache; the frozen backbone runs in every step under no-grad (weights resident).

Volumes (:func:`measure_3d_memory`): MONAI ``ViT(spatial_dims=3)``, ViT-B-like (width 768, 12 blocks, 12 heads,
MLP 3072, patch 16, class token, MONAI's default of no qkv bias), one input channel, 128^3, batch 4, 2 classes.
Full fine-tuning is that ViT with a linear head on its class token; FPT has a side ViT at ``side_img_size``
(width 96) and runs ``preloaded`` (the keys/values of the 20% most attended tokens per block and head, float16)
and ``online``, as for images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import MemTracker

from fpt_monai.networks import FPTNet, MonaiViTBackbone
from fpt_monai.networks.methods import method_names
from fpt_monai.preload import STORAGE_DTYPES, int8_scale_shape, kv_read_dtype, storage_dtype
from fpt_monai.weights import create_monai_vit, random_weights_expected

__all__ = [
    "FPT_METHODS", "MEMORY_CATEGORIES", "METHODS", "markdown_table_3d", "measure_3d_memory", "measure_training_memory",
    "memory_table", "set_attention", "step_memory",
]

FPT_METHODS = ("fpt", "fpt_plus", "fpt_tiny", "fpt_plus_tiny")
METHODS = method_names()
#: What the peak of a step is split into (``<category>_bytes`` in every result).
MEMORY_CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "inputs")
ATTENTION = ("eager", "fused")
FPT_SETUPS = ("preloaded", "online")
#: The 3D methods, in table order.
METHODS_3D = ("full_finetuning", "fpt_preloaded", "fpt_online")
#: The MONAI 3D ViT of :func:`measure_3d_memory` (arguments of :func:`fpt_monai.networks.backbones.create_monai_vit`):
#: ViT-B, one input channel.
VIT_3D = {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12, "in_channels": 1}

#: A batch element: its shape without the batch dimension and its dtype.
InputSpec = tuple[tuple[int, ...], torch.dtype]


def set_attention(module: nn.Module, attention: str) -> None:
    """Eager or fused attention in every attention of ``module`` that offers the choice (timm and MONAI)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}.")
    fused = attention == "fused"
    for m in module.modules():
        if hasattr(m, "fused_attn"):  # timm Attention
            m.fused_attn = fused
        if hasattr(m, "use_flash_attention") and not getattr(m, "save_attn", False):  # MONAI SABlock
            m.use_flash_attention = fused


class _NoHook:
    def remove(self) -> None:
        pass


def _memory_tracker(net: nn.Module, *tracked):
    """PyTorch's MemTracker over ``net`` and ``tracked``, usable with frozen parameters.

    MemTracker installs a gradient hook on every parameter of a module it enters, and PyTorch refuses hooks on
    tensors that do not require grad; frozen parameters never get a gradient, so they are entered in the tracker's
    table of hooked parameters beforehand. That table is private to MemTracker: a PyTorch that renames it fails
    here, loudly, instead of miscounting.
    """
    tracker = MemTracker()
    if not hasattr(tracker, "_param_to_grad_hook_handles"):
        raise RuntimeError(f"torch {torch.__version__}: MemTracker has no _param_to_grad_hook_handles; the memory "
                           "accounting of frozen parameters needs updating for this PyTorch.")
    tracker.track_external(net, *tracked)
    for param in net.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    return tracker


def _storages(t: torch.Tensor) -> list:
    return list(get_untyped_storages(t))


def step_memory(
    net: nn.Module,
    forward: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor],
    input_specs: Sequence[InputSpec],
    batch_size: int,
    num_classes: int,
    fake: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Peak memory of one steady-state training step of ``net`` (see the module doc), split by category.

    Args:
        net: the network, built on the meta device (its storages are made here: fake, or real on ``device``).
        forward: ``forward(net, inputs) -> logits``.
        input_specs: ``(shape, dtype)`` of each input, without the batch dimension.
        batch_size: samples per step.
        num_classes: classifier outputs (the labels are drawn below it).
        fake: account with fake tensors (no data, no compute); ``False`` runs the step for real.
        device: ``cpu`` or ``cuda`` (``cuda`` needs ``fake=False``).

    Returns:
        ``total_bytes``, one ``<category>_bytes`` per :data:`MEMORY_CATEGORIES`, ``saved_for_backward_bytes``
        (the cross-check), ``learnable_parameters``, ``frozen_parameters`` and, on a GPU,
        ``cuda_max_memory_allocated``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if device != "cpu" and fake:
        raise ValueError("a GPU measurement runs real tensors: pass fake=False with device='cuda'.")
    learnable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    with mode:
        net = net.to_empty(device=device).train()
        trainable = [p for p in net.parameters() if p.requires_grad]
        # foreach: PyTorch's default on GPUs; one op per step instead of one per tensor (fast fake accounting)
        optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.1, foreach=True)
        inputs = [torch.randn(batch_size, *shape, device=device).to(dtype) for shape, dtype in input_specs]
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
        "total_bytes": int(snapshot.get("Total", 0)),
        "parameters_bytes": bytes_of("Parameter", "Buffer"),
        "gradients_bytes": bytes_of("Gradient"),
        "optimizer_state_bytes": bytes_of("Optstate"),
        "activations_bytes": bytes_of("Activation"),
        "temporaries_bytes": bytes_of("Temp"),
        "inputs_bytes": bytes_of("Other"),
        "saved_for_backward_bytes": int(saved_bytes),
        "learnable_parameters": learnable,
        "frozen_parameters": frozen,
    }
    if cuda_peak is not None:
        result["cuda_max_memory_allocated"] = int(cuda_peak)
    return result


# -- images -----------------------------------------------------------------------------------------------------------


def _kv_read_dtype(kv_dtype: str) -> torch.dtype:
    """The dtype a training step receives from a cache of storage dtype ``kv_dtype`` (int8 is read as float16)."""
    if kv_dtype not in STORAGE_DTYPES:
        raise ValueError(f"kv_dtype must be one of {list(STORAGE_DTYPES)}, got {kv_dtype!r}.")
    return kv_read_dtype(STORAGE_DTYPES[kv_dtype])


def _build_2d(method: str, preset: str, img_size: int, num_classes: int, setup: str, backbone_resident: bool,
              kv_dtype: torch.dtype):
    """(network on the meta device, forward(network, inputs) -> logits, input specs)."""
    from fpt_monai.networks import FPTNet
    from fpt_monai.presets import create_baseline, create_fpt

    with torch.device("meta"):
        if method not in FPT_METHODS:
            net = create_baseline(method, num_classes, preset=preset, pretrained=False, img_size=img_size)
            return net, lambda n, x: n(x[0]), [((3, *net.img_size), torch.float32)]
        full = create_fpt(method, num_classes, pretrained=False, img_size=img_size)
        if setup == "online":
            return full, lambda n, x: n(x[0]), [((3, *full.shape.img_size), torch.float32)]
        net = full if backbone_resident else FPTNet(  # trains from the cache without the backbone's weights
            full.backbone.shape, num_classes, side_img_size=full.side_img_size, variant=full.fusion.variant,
            num_prompts=full.prompts.prompts.shape[1], reduction=full.shape.embed_dim // full.side.embed_dim,
        )
    specs = [((3, *full.side_img_size), torch.float32), (tuple(full.shape.kv_shape), kv_dtype)]
    return net, lambda n, x: n.forward_side(x[0], x[1]), specs


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
    """Peak training memory of one steady-state step of ``method`` on images (see the module doc).

    Args:
        method: ``full``, ``linear``, ``vpt``, ``lora``, ``adapter``, ``fpt``, ``fpt_plus`` (or the tiny FPT
            presets ``fpt_tiny``/``fpt_plus_tiny``, for tests).
        batch_size: images per step.
        img_size: the backbone's input size (the side network keeps its preset size).
        attention: ``eager`` or ``fused``.
        kv_dtype: storage dtype of the preloaded keys/values (FPT ``preloaded`` only): ``float16``, ``bfloat16``,
            ``float32``, or ``int8`` (read as float16).
        setup: FPT only: ``preloaded`` or ``online`` (see the module doc).
        backbone_resident: FPT ``preloaded`` only: keep the frozen backbone's weights in memory too.
        num_classes: classifier outputs.
        preset: the FPT preset whose backbone the baselines use (``fpt``: ViT-B/16).
        fake: account with fake tensors (no data, no compute); ``False`` runs the step for real.
        device: ``cpu`` or ``cuda`` (``cuda`` needs ``fake=False``).

    Returns:
        :func:`step_memory`'s figures with the settings (``method``, ``setup``, ``backbone_resident``,
        ``kv_dtype``, ``attention``, ``batch_size``, ``img_size``, ``fake_tensors``, ``device``).
    """
    if method not in METHODS and method not in FPT_METHODS:
        raise ValueError(f"method must be one of {METHODS} (or {FPT_METHODS}), got {method!r}.")
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}.")
    if setup not in FPT_SETUPS:
        raise ValueError(f"setup must be one of {FPT_SETUPS}, got {setup!r}.")
    kv_torch_dtype = _kv_read_dtype(kv_dtype)
    is_fpt = method in FPT_METHODS
    with random_weights_expected():  # no weights are needed to count bytes
        net, forward, specs = _build_2d(method, preset, img_size, num_classes, setup, backbone_resident, kv_torch_dtype)
    set_attention(net, attention)
    figures = step_memory(net, forward, specs, batch_size, num_classes, fake=fake, device=device)
    return {
        "method": method,
        "setup": setup if is_fpt else "images",
        "backbone_resident": bool(backbone_resident or setup == "online") if is_fpt else True,
        "kv_dtype": kv_dtype if is_fpt and setup == "preloaded" else None,
        "attention": attention,
        "batch_size": batch_size,
        "img_size": img_size,
        "fake_tensors": fake,
        "device": device,
        **figures,
    }


def memory_table(
    methods: Sequence[str] = METHODS,
    attention: Sequence[str] = ATTENTION,
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

    def measure(method: str, attn: str, **settings) -> dict:
        return measure_training_memory(method, batch_size, img_size, attn, **settings, **kwargs)

    rows = []
    for attn in attention:
        full = measure("full", attn)
        for method in methods:
            if method not in FPT_METHODS:
                runs = [full if method == "full" else measure(method, attn)]
            else:
                runs = [measure(method, attn, kv_dtype=dtype, backbone_resident=resident)
                        for dtype in kv_dtypes for resident in (False, True)]
                if online:
                    runs.append(measure(method, attn, setup="online"))
            for row in runs:
                rows.append({**row, "ratio_to_full": row["total_bytes"] / full["total_bytes"]})
    return rows


# -- volumes ----------------------------------------------------------------------------------------------------------


def measure_3d_memory(
    img_size: int = 128,
    side_img_size: int = 64,
    patch_size: int = 16,
    batch_size: int = 4,
    num_classes: int = 2,
    variant: str = "fpt",
    blocks: Sequence[int] | None = None,
    token_ratio: float = 0.2,
    num_prompts: int = 16,
    reduction: int = 8,
    kv_dtype: str = "float16",
    attention: str = "fused",
    fake: bool = True,
    **vit: Any,
) -> dict[str, Any]:
    """Training-step memory of full fine-tuning and of FPT (preloaded, online) on one MONAI 3D ViT.

    Args:
        img_size: high-resolution volume size (cubic), the backbone's input.
        side_img_size: the side network's input size (cubic).
        patch_size: patch size of the backbone and of the side ViT.
        batch_size: volumes per step.
        num_classes: classes of the task.
        variant: ``"fpt"`` or ``"fpt_plus"`` (fusion variant).
        blocks: extracted backbone blocks (default all; FPT+ uses the second half).
        token_ratio: kept tokens per block and head.
        num_prompts, reduction: prompts per side block; backbone width / side width.
        kv_dtype: storage dtype of the preloaded keys/values (``float16``, ``bfloat16``, ``float32``, ``int8``).
        attention: ``"fused"`` or ``"eager"``.
        fake: fake tensors (no data, no compute); ``False`` runs real tensors on the CPU.
        vit: the MONAI ViT's architecture, :data:`VIT_3D` (ViT-B) where not given: ``hidden_size``, ``mlp_dim``,
            ``num_layers``, ``num_heads``, ``in_channels``, ``qkv_bias`` (the arguments of
            :func:`~fpt_monai.networks.backbones.create_monai_vit`).

    Returns:
        ``{"protocol": {...}, "methods": {name: figures of step_memory plus "learnable_percent"},
        "fpt_vs_full": {name: total / full fine-tuning's total}}``, methods in :data:`METHODS_3D`.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}.")
    if img_size % patch_size or side_img_size % patch_size:
        raise ValueError(f"img_size {img_size} and side_img_size {side_img_size} must be multiples of {patch_size}.")
    dtype = storage_dtype(kv_dtype)
    read_dtype = _kv_read_dtype(str(dtype).removeprefix("torch."))
    vit = {**VIT_3D, **vit}
    in_channels = vit["in_channels"]
    fpt_args = dict(num_classes=num_classes, side_img_size=side_img_size, variant=variant, num_prompts=num_prompts,
                    reduction=reduction)
    with random_weights_expected(), torch.device("meta"):
        # full fine-tuning: the ViT with a linear head on its class token, everything trainable
        full = ViT(img_size=img_size, patch_size=patch_size, spatial_dims=3, **vit, classification=True,
                   num_classes=num_classes, post_activation=None)
        # as the 3D presets build it: a class token, no classification head (FPT never uses it)
        model = create_monai_vit(img_size, patch_size, pretrained=False, spatial_dims=3, classification=True, **vit)
        backbone = MonaiViTBackbone(model, img_size, patch_size, blocks=blocks, token_ratio=token_ratio)
        online = FPTNet(backbone, **fpt_args)
        shape = online.shape
        preloaded = FPTNet(shape, **fpt_args)  # the backbone's weights not resident
    volume = ((in_channels, *(img_size,) * 3), torch.float32)
    side_view = ((in_channels, *(side_img_size,) * 3), torch.float32)
    cases = {
        "full_finetuning": (full, lambda n, x: n(x[0])[0], [volume]),
        "fpt_preloaded": (preloaded, lambda n, x: n.forward_side(x[0], x[1]),
                          [side_view, (tuple(shape.kv_shape), read_dtype)]),
        "fpt_online": (online, lambda n, x: n(x[0]), [volume]),
    }
    methods: dict[str, dict] = {}
    backbone_parameters = sum(p.numel() for p in backbone.parameters())
    for name, (net, forward, specs) in cases.items():
        set_attention(net, attention)
        figures = step_memory(net, forward, specs, batch_size, num_classes, fake=fake)
        # FPT's learnable share is of learnable + the frozen backbone, whether or not the backbone is resident
        frozen = backbone_parameters if name == "fpt_preloaded" else figures["frozen_parameters"]
        whole = figures["learnable_parameters"] + frozen
        methods[name] = {**figures, "learnable_percent": round(100 * figures["learnable_parameters"] / whole, 3)}
    full_total = methods["full_finetuning"]["total_bytes"]
    return {
        "protocol": {
            "backbone": f"MONAI ViT 3D: width {vit['hidden_size']}, {vit['num_layers']} blocks, {vit['num_heads']} "
                        f"heads, MLP {vit['mlp_dim']}, patch {patch_size}, class token, qkv "
                        f"{'with' if vit.get('qkv_bias') else 'without'} bias",
            "img_size": [img_size] * 3,
            "side_img_size": [side_img_size] * 3,
            "batch_size": batch_size,
            "num_classes": num_classes,
            "tokens": shape.num_tokens,
            "side_tokens": (side_img_size // patch_size) ** 3 + 1,
            "kept_tokens_per_block_and_head": shape.num_selected_tokens,
            "variant": variant,
            "extracted_blocks": list(shape.blocks),
            "kv_dtype": str(dtype).removeprefix("torch."),
            "kv_bytes_per_volume": math.prod(shape.kv_shape) * dtype.itemsize
            + (2 * math.prod(int8_scale_shape(shape.kv_shape)) if dtype == torch.int8 else 0),  # float16 scales
            "attention": attention,
            "compute_dtype": "float32",
            "optimizer": "AdamW",
            "tensors": "fake (FakeTensorMode)" if fake else "real (CPU)",
        },
        "methods": methods,
        "fpt_vs_full": {name: round(methods[name]["total_bytes"] / full_total, 4) for name in METHODS_3D[1:]},
    }


def markdown_table_3d(result: dict[str, Any]) -> str:
    """The methods of :func:`measure_3d_memory` as a Markdown table (MB = 10^6 bytes)."""
    header = "| method | learnable | learnable % | " + " | ".join(MEMORY_CATEGORIES) + " | total | of full FT |"
    rows = [header, "|---" + "|---:" * (len(MEMORY_CATEGORIES) + 4) + "|"]
    full_total = result["methods"]["full_finetuning"]["total_bytes"]
    for name, m in result["methods"].items():
        cells = [name, f"{m['learnable_parameters']:,}", f"{m['learnable_percent']:.2f}"]
        cells += [f"{m[f'{c}_bytes'] / 1e6:,.1f} MB" for c in MEMORY_CATEGORIES]
        cells += [f"{m['total_bytes'] / 1e6:,.1f} MB", f"{100 * m['total_bytes'] / full_total:.1f}%"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
