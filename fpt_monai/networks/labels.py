"""Class names bound to a network: they travel in its state dict and exports, and are checked when it loads.

A classifier's outputs mean something only together with the names of its classes, in order. A checkpoint
loaded into a network built for other classes, or for the same classes in another order, gives confident wrong
answers without a word. :func:`bind_class_names` therefore makes the class names part of the network:

- They are a persistent buffer ``class_names`` of the network's root module: the UTF-8 bytes (``uint8``) of a
  JSON list, like the frozen backbone's digest in :class:`~fpt_monai.networks.FPTNet`. A buffer, rather than a
  key added by a state-dict hook alone, because it travels wherever the module's tensors go without further
  code: ``state_dict()`` (``models/model.pt``, the resume checkpoint, under ``"model"``), a TorchScript trace
  of the module, and ``torch.export`` (``ExportedProgram.state_dict``). It works for any ``nn.Module`` (FPTNet
  and the baselines alike), and the checkpoint stays a plain state dict of tensors, so MONAI's
  ``CheckpointSaver``/``ckpt_export`` and ``torch.load(weights_only=True)`` read it unchanged.
- A load-state-dict pre-hook compares a checkpoint's names with the network's before any weight is copied.
  Other names, or the same names in another order, raise :class:`ClassNamesMismatchError` showing both lists
  (a wrong mapping is never guessed). Only with ``class_mapping="by_name"`` (the user asks for it) are the same
  names in another order accepted: the network's outputs are then reordered to its own class order by a forward
  hook, and its ``state_dict`` keeps recording the order of the weights it holds.
- A network built without names (``class_names=None``) takes the checkpoint's names when it loads one (this is
  how ``ckpt_export`` of a bare ``network_def`` carries them into the export).
- A checkpoint written before class names were stored (no ``class_names`` key) still loads strictly, with one
  :class:`UncheckedClassNamesWarning` that its class names cannot be checked; the network keeps its own names.

:func:`class_names_of` reads the names back from a network, a state dict or checkpoint, a TorchScript module or
an ``ExportedProgram``; that is the one way the rest of the package (reports, evaluation) gets them.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "CLASS_MAPPINGS",
    "CLASS_NAMES_KEY",
    "ClassNamesMismatchError",
    "UncheckedClassNamesWarning",
    "bind_class_names",
    "class_names_of",
    "decode_class_names",
    "encode_class_names",
    "set_class_mapping",
]

logger = logging.getLogger(__name__)

#: State-dict key (and buffer name) of a network's class names: UTF-8 bytes of a JSON list, as ``uint8``.
CLASS_NAMES_KEY = "class_names"
#: How a checkpoint's class names may differ from the network's: ``"strict"`` (not at all, the default) or
#: ``"by_name"`` (the same names in another order; the outputs are reordered to the network's order).
CLASS_MAPPINGS = ("strict", "by_name")


class ClassNamesMismatchError(ValueError):
    """A checkpoint's class names differ from the network's (other names, or another order)."""


class UncheckedClassNamesWarning(UserWarning):
    """A checkpoint without class names (written before they were stored) was loaded: nothing was checked."""


def encode_class_names(class_names: Sequence[str]) -> torch.Tensor:
    """The ``uint8`` tensor that stores ``class_names`` (UTF-8 JSON) in a state dict."""
    names = _names(class_names)
    return torch.tensor(list(json.dumps(names, ensure_ascii=False).encode("utf-8")), dtype=torch.uint8)


def decode_class_names(tensor: torch.Tensor) -> list[str]:
    """The class names stored by :func:`encode_class_names`."""
    names = json.loads(bytes(tensor.detach().to("cpu", torch.uint8).tolist()).decode("utf-8"))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"a '{CLASS_NAMES_KEY}' entry must hold a JSON list of strings, got {names!r}.")
    return names


def _names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names must be a list of names, got {class_names!r}.")
    names = [str(n) for n in class_names]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct names, at least one, got {names}.")
    return names


def bind_class_names(module: nn.Module, class_names: Sequence[str] | None = None) -> nn.Module:
    """Bind class names (in output order) to ``module`` and return it; see the module docstring.

    Registers the ``class_names`` buffer and the state-dict hooks once (calling it again only sets new names).
    ``class_names=None`` leaves the names unset (or as they are): the network then takes a checkpoint's names.
    FPTNet and the baselines call it when they are built; call it on any other network the bundle saves.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}.")
    if not getattr(module, "_class_names_bound", False):
        if hasattr(module, CLASS_NAMES_KEY) and CLASS_NAMES_KEY not in module._buffers:
            raise ValueError(f"{type(module).__name__} already has an attribute '{CLASS_NAMES_KEY}'.")
        module.register_buffer(CLASS_NAMES_KEY, module._buffers.get(CLASS_NAMES_KEY))
        module.register_state_dict_post_hook(_record_weights_order)
        module.register_load_state_dict_pre_hook(_check_class_names)
        #: ``"strict"`` or ``"by_name"``: what the next ``load_state_dict`` accepts (see :func:`set_class_mapping`).
        module.class_mapping = "strict"
        module._class_names_bound = True
        module._weights_class_names = None  # the order of the weights, where a by-name mapping reorders outputs
        module._class_order_hook = None
    if class_names is not None:
        _clear_mapping(module)
        device = module._buffers[CLASS_NAMES_KEY].device if module._buffers[CLASS_NAMES_KEY] is not None else None
        module._buffers[CLASS_NAMES_KEY] = encode_class_names(class_names).to(device)
    return module


def set_class_mapping(module: nn.Module, class_mapping: str) -> None:
    """Set what the next ``load_state_dict`` of a bound ``module`` accepts: one of :data:`CLASS_MAPPINGS`."""
    if class_mapping not in CLASS_MAPPINGS:
        raise ValueError(
            f"class_mapping must be one of {list(CLASS_MAPPINGS)}, got {class_mapping!r}: 'strict' refuses a "
            "checkpoint whose class names differ from the config's; 'by_name' accepts the same names in another "
            "order and reorders the outputs to the config's order."
        )
    bind_class_names(module)
    module.class_mapping = class_mapping


def class_names_of(obj: Any) -> list[str] | None:
    """The class names (in output order) that ``obj`` carries, or ``None`` when it carries none.

    ``obj`` may be a network (a DDP wrapper too), a state dict or a training checkpoint holding one under
    ``"model"`` (as read by ``torch.load``), a TorchScript module (``torch.jit.load``), or a ``torch.export``
    ``ExportedProgram`` (``torch.export.load``).
    """
    if isinstance(obj, torch.export.ExportedProgram):
        obj = obj.state_dict
    if isinstance(obj, Mapping):
        if CLASS_NAMES_KEY not in obj and isinstance(obj.get("model"), Mapping):
            obj = obj["model"]
        value = obj.get(CLASS_NAMES_KEY)
    elif isinstance(obj, nn.Module) or isinstance(obj, torch.jit.ScriptModule):
        if hasattr(obj, "module") and isinstance(obj.module, nn.Module) and not hasattr(obj, CLASS_NAMES_KEY):
            obj = obj.module  # DistributedDataParallel / DataParallel
        value = getattr(obj, CLASS_NAMES_KEY, None)
    else:
        raise TypeError(f"cannot read class names from a {type(obj).__name__}.")
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return decode_class_names(value)
    return [str(n) for n in value] or None  # a TorchScript list attribute


def _clear_mapping(module: nn.Module) -> None:
    if module._class_order_hook is not None:
        module._class_order_hook.remove()
    module._class_order_hook = None
    module._weights_class_names = None


def _record_weights_order(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: after a by-name mapping, the state dict names the classes in the order of its weights."""
    if module._weights_class_names is not None:
        state_dict[prefix + CLASS_NAMES_KEY] = encode_class_names(module._weights_class_names)


def _check_class_names(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, errors
) -> None:
    """Load pre-hook: compare the checkpoint's class names with the network's before any weight is copied."""
    key = prefix + CLASS_NAMES_KEY
    current = module._buffers.get(CLASS_NAMES_KEY)
    stored = state_dict.get(key)
    mapping = module.class_mapping
    if stored is None:
        if current is not None:
            names = decode_class_names(current)
            message = (
                f"the checkpoint has no '{CLASS_NAMES_KEY}' (it was written before class names were stored), so its "
                f"class names cannot be checked against this network's {names}: make sure it was trained on these "
                "classes in this order. Saving it again (e.g. training or `torch.save(network.state_dict(), ...)` "
                "after loading) stores them."
            )
            warnings.warn(message, UncheckedClassNamesWarning, stacklevel=4)
            logger.warning(message)
            _clear_mapping(module)  # the checkpoint is taken to be in the network's own order
            state_dict[key] = current
        return
    checkpoint_names = decode_class_names(stored)
    if current is None:  # a network built without names takes the checkpoint's
        module._buffers[CLASS_NAMES_KEY] = stored.detach().clone().to(torch.uint8)
        return
    own = decode_class_names(current)
    _clear_mapping(module)
    if checkpoint_names == own:
        return
    if mapping == "by_name" and sorted(checkpoint_names) == sorted(own):
        order = torch.tensor([checkpoint_names.index(name) for name in own], dtype=torch.long)
        module._weights_class_names = checkpoint_names
        module._class_order_hook = module.register_forward_hook(_ReorderOutputs(order))
        state_dict[key] = current  # the buffer keeps the output order
        logger.info(
            "class_mapping 'by_name': the checkpoint's classes %s are reordered to this network's %s "
            "(output i is the checkpoint's class %s)",
            checkpoint_names,
            own,
            order.tolist(),
        )
        return
    same_set = sorted(checkpoint_names) == sorted(own)
    raise ClassNamesMismatchError(
        f"the checkpoint was trained on the classes {checkpoint_names}, but the config's class_names are {own}"
        + (
            ": the same names in another order. Give class_names in the checkpoint's order, or set "
            "class_mapping to 'by_name' (bundle: --class_mapping by_name) to reorder the outputs to the config's "
            "order."
            if same_set
            else ": other names. Give the checkpoint's class_names (and num_classes), or use a checkpoint trained "
            "on these classes."
        )
    )


class _ReorderOutputs:
    """Forward hook: output column ``i`` becomes the weights' column ``order[i]`` (a by-name class mapping)."""

    def __init__(self, order: torch.Tensor) -> None:
        self.order = order

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.index_select(-1, self.order.to(output.device))
