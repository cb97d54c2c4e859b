"""Reading checkpoint files safely, and loading a state dict into a model with errors that name file and keys.

Checkpoints are read without unpickling arbitrary objects (``torch.load(..., weights_only=True)`` or safetensors).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as _load_safetensors_file
from torch import nn

__all__ = ["PretrainedWeightsError", "load_state_dict_file", "pretrained_argument", "warn_random_weights"]

logger = logging.getLogger(__name__)


def warn_random_weights(message: str) -> None:
    """Say loudly, as a ``UserWarning`` at the builder's caller and in the log, that a backbone has random weights."""
    warnings.warn(message, UserWarning, stacklevel=3)
    logger.warning(message)


_SAFETENSORS_SUFFIXES = (".safetensors",)
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Keys under which training scripts commonly nest the actual state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_MAX_LISTED_KEYS = 10


class PretrainedWeightsError(RuntimeError):
    """Raised when pretrained weights cannot be obtained, read, converted or loaded into a model."""


def pretrained_argument(pretrained: Any) -> Any:
    """A ``pretrained`` argument with the boolean spelled as text made a bool: ``"true"``/``"false"`` in any case.

    Command lines spell booleans as JSON does: ``python -m monai.bundle run ... --pretrained false`` hands the
    config the text ``"false"`` (``fire`` turns only the Python spelling ``False`` into a bool), which would
    otherwise be taken for a weights file name. A file really named ``false`` is given as ``./false``. Other
    values are returned unchanged.
    """
    if isinstance(pretrained, str) and pretrained.strip().lower() in ("true", "false"):
        return pretrained.strip().lower() == "true"
    return pretrained


def _format_keys(keys: Sequence[str], limit: int = _MAX_LISTED_KEYS) -> str:
    """Formats at most ``limit`` keys for an error message, noting how many were left out."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    if len(keys) > limit:
        shown += f", ... (+{len(keys) - limit} more)"
    return shown


def _as_path(path: str | os.PathLike, argument: str = "path") -> Path:
    """Checks that ``path`` is a str or ``os.PathLike`` and returns it as a :class:`~pathlib.Path`."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{argument}` must be a str or os.PathLike, got {type(path).__name__}: {path!r}.")
    return Path(os.fspath(path)).expanduser()


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers and a ``module.`` prefix, checks the result."""
    for _ in range(len(_WRAPPER_KEYS) + 1):
        if not isinstance(obj, Mapping):
            break
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        logger.debug("Unwrapping checkpoint %s from its %r entry.", path, wrapper)
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise PretrainedWeightsError(
            f"Checkpoint '{path}' does not contain a state dict: its content is a {type(obj).__name__}, expected a "
            f"mapping of parameter names to tensors (optionally nested under one of {list(_WRAPPER_KEYS)})."
        )
    if not obj:
        raise PretrainedWeightsError(f"Checkpoint '{path}' contains an empty state dict.")
    bad_names = [repr(k) for k in obj if not isinstance(k, str)]
    if bad_names:
        raise PretrainedWeightsError(
            f"Checkpoint '{path}' is not a state dict: some keys are not strings ({', '.join(bad_names[:10])})."
        )
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise PretrainedWeightsError(
            f"Checkpoint '{path}' is not a state dict of tensors: these entries are not tensors: "
            f"{_format_keys(not_tensors)}."
        )
    state_dict = dict(obj)
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a state dict from a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file, safely, onto the CPU.

    PyTorch files are read with ``torch.load(..., weights_only=True)``, so files holding arbitrary pickled
    objects are refused instead of being executed. Common wrappers are removed: ``{"state_dict": ...}``,
    ``{"model": ...}``, ``{"model_state_dict": ...}`` (also nested) and a ``module.`` prefix on every key (from
    ``DataParallel`` / ``DistributedDataParallel``).

    Args:
        path: checkpoint file.

    Returns:
        The state dict, mapping parameter names to tensors.

    Raises:
        TypeError: if ``path`` is not a str or ``os.PathLike``.
        ValueError: if the file suffix is not one of ``.safetensors``, ``.pth``, ``.pt``, ``.bin``.
        FileNotFoundError: if the file does not exist (or is not a file).
        PretrainedWeightsError: if the file cannot be read (corrupt, truncated, or holding pickled objects that are
            not tensors) or does not contain a state dict of tensors.
    """
    path = _as_path(path)
    suffix = path.suffix.lower()
    if suffix not in _SAFETENSORS_SUFFIXES + _TORCH_SUFFIXES:
        raise ValueError(
            f"Unsupported checkpoint file '{path}': suffix {path.suffix!r} is not one of "
            f"{list(_SAFETENSORS_SUFFIXES + _TORCH_SUFFIXES)}."
        )
    if not path.is_file():
        reason = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"Checkpoint file '{path}' {reason}.")
    try:
        if suffix in _SAFETENSORS_SUFFIXES:
            obj: Any = _load_safetensors_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        hint = ""
        if suffix in _TORCH_SUFFIXES:
            hint = (
                " Only plain tensors and containers are read (weights_only=True); arbitrary pickled objects are "
                "refused for safety. Re-save the checkpoint as a plain state dict, e.g. with "
                "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
            )
        raise PretrainedWeightsError(
            f"Could not read checkpoint file '{path}': {type(err).__name__}: {err}.{hint}"
        ) from err
    return _unwrap_state_dict(obj, path)


def _load_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, strict: bool = True) -> None:
    """Loads ``state_dict`` into ``model``, raising :class:`PretrainedWeightsError` naming ``path`` on mismatch.

    Shape mismatches are always errors; missing / unexpected keys are errors when ``strict`` and warnings otherwise.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(state_dict) & set(expected))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_format_keys(mismatched)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_format_keys(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_format_keys(unexpected)}")
    if problems:
        raise PretrainedWeightsError(
            f"Checkpoint '{path}' does not match the {type(model).__name__} architecture; is it for another model "
            f"(depth, width, patch size)? " + "; ".join(problems) + "."
        )
    if missing:
        logger.warning(
            "Checkpoint %s lacks %d key(s), left as initialised: %s", path, len(missing), _format_keys(missing)
        )
    if unexpected:
        logger.warning(
            "Checkpoint %s has %d key(s) the model does not use, ignored: %s",
            path,
            len(unexpected),
            _format_keys(unexpected),
        )
    model.load_state_dict(dict(state_dict), strict=strict)
