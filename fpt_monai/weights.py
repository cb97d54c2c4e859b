"""Pretrained weights for the frozen ViT backbones used by Fine-grained Prompt Tuning.

FPT only trains a small side network and prompts; the large backbone stays frozen. A frozen backbone with random
weights produces random features, so loading the right pretrained weights (and adapting them to the input size of
the task) is essential. This module provides:

* :func:`create_timm_vit`: a headless timm ``VisionTransformer`` with weights from the timm / Hugging Face hub or
  from a local checkpoint (timm or Hugging Face ``transformers`` ViT layout), with position embeddings resampled to
  the requested image size.
* :func:`load_monai_vit_weights`: loads a MONAI-layout checkpoint (e.g. MONAI Model Zoo, self-supervised
  pre-training) into a :class:`monai.networks.nets.ViT`, resampling its (possibly 3D) position embeddings.
* Helpers: :func:`load_state_dict_file`, :func:`is_hf_vit_layout`, :func:`hf_vit_to_timm` and
  :func:`resample_position_embedding`.

Checkpoints are read without unpickling arbitrary objects (``torch.load(..., weights_only=True)`` or safetensors).
"""

from __future__ import annotations

import difflib
import logging
import math
import operator
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as _load_safetensors_file
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

__all__ = [
    "PretrainedWeightsError",
    "load_state_dict_file",
    "is_hf_vit_layout",
    "hf_vit_to_timm",
    "create_timm_vit",
    "resample_position_embedding",
    "load_monai_vit_weights",
    "random_weights_expected",
]

logger = logging.getLogger(__name__)


@contextmanager
def random_weights_expected() -> Iterator[None]:
    """Silence the package's random-weights warnings (log records and ``warnings``) inside the block.

    For code that builds networks whose weights do not matter: parameter counting, memory and speed benchmarks.
    """
    package_logger = logging.getLogger("fpt_monai")
    level = package_logger.level
    package_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        package_logger.setLevel(level)

_SAFETENSORS_SUFFIXES = (".safetensors",)
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Keys under which training scripts commonly nest the actual state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_MAX_LISTED_KEYS = 10
# Heads that a headless (num_classes=0) timm ViT does not have.
_TIMM_HEAD_PREFIXES = ("head.", "head_dist.")
_MONAI_POS_EMBED_KEY = "patch_embedding.position_embeddings"


class PretrainedWeightsError(RuntimeError):
    """Raised when pretrained weights cannot be obtained, read, converted or loaded into a model."""


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoint files
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face transformers ViT -> timm VisionTransformer
# ----------------------------------------------------------------------------------------------------------------

_HF_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_QKV_RE = re.compile(r"^attention\.attention\.(query|key|value)$")
_HF_LAYER_MAP = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP_LEVEL_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Parts of Hugging Face checkpoints that a timm ViT backbone has no use for.
_HF_DROPPED_PREFIXES = ("pooler.", "embeddings.mask_token")
_HF_MARKER_RE = re.compile(
    r"^(vit\.)?(embeddings\.patch_embeddings\.projection\.weight|encoder\.layer\.\d+\.attention\.attention\.query\."
    r"weight)$"
)


def is_hf_vit_layout(state_dict: Mapping[str, Any]) -> bool:
    """Tells whether a state dict uses the Hugging Face ``transformers`` ViT layout.

    Both ``ViTForImageClassification`` (keys prefixed with ``vit.``) and a bare ``ViTModel`` (no prefix) are
    recognised, by their patch-embedding projection or per-layer ``attention.attention.query`` keys.

    Args:
        state_dict: a state dict.

    Returns:
        True if the state dict looks like a Hugging Face ViT checkpoint.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping, got {type(state_dict).__name__}.")
    return any(isinstance(k, str) and _HF_MARKER_RE.match(k) for k in state_dict)


def hf_vit_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converts a Hugging Face ``transformers`` ViT state dict to the timm ``VisionTransformer`` layout.

    The per-layer ``query``/``key``/``value`` projections are concatenated (in that order, along dim 0) into timm's
    fused ``attn.qkv``; ``classifier.*`` becomes ``head.*``; pooler weights (and a masked-image-modelling
    ``mask_token``) are dropped, timm ViTs have no use for them.

    Args:
        state_dict: a ``ViTModel`` or ``ViTForImageClassification`` state dict (``vit.`` prefix optional).

    Returns:
        A new state dict in timm layout, sharing the input tensors where no concatenation is needed.

    Raises:
        PretrainedWeightsError: if the state dict holds keys that are not part of a Hugging Face ViT, or a layer
            lacks one of its query/key/value tensors.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping, got {type(state_dict).__name__}.")
    has_prefix = any(isinstance(k, str) and k.startswith("vit.") for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    dropped: list[str] = []
    for key, value in state_dict.items():
        if not isinstance(key, str):
            unknown.append(repr(key))
            continue
        if key.startswith("classifier."):
            out["head." + key[len("classifier.") :]] = value
            continue
        if has_prefix:
            if not key.startswith("vit."):
                unknown.append(key)
                continue
            name = key[len("vit.") :]
        else:
            name = key
        if name.startswith(_HF_DROPPED_PREFIXES):
            dropped.append(key)
            continue
        if name in _HF_TOP_LEVEL_MAP:
            out[_HF_TOP_LEVEL_MAP[name]] = value
            continue
        match = _HF_LAYER_RE.match(name)
        if match is None:
            unknown.append(key)
            continue
        layer, module, param = int(match.group(1)), match.group(2), match.group(3)
        qkv_match = _HF_QKV_RE.match(module)
        if qkv_match is not None:
            qkv.setdefault((layer, param), {})[qkv_match.group(1)] = value
        elif module in _HF_LAYER_MAP:
            out[f"blocks.{layer}.{_HF_LAYER_MAP[module]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise PretrainedWeightsError(
            f"Cannot convert a Hugging Face ViT state dict to timm layout: {len(unknown)} key(s) are not part of a "
            f"Hugging Face ViT(Model/ForImageClassification): {_format_keys(unknown)}."
        )
    for (layer, param), parts in sorted(qkv.items()):
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            prefix = "vit." if has_prefix else ""
            names = [f"{prefix}encoder.layer.{layer}.attention.attention.{p}.{param}" for p in missing]
            raise PretrainedWeightsError(
                f"Cannot convert a Hugging Face ViT state dict to timm layout: missing {_format_keys(names)}."
            )
        out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if dropped:
        logger.debug("Dropped %d Hugging Face ViT key(s) unused by timm: %s", len(dropped), _format_keys(dropped))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Strict loading with clear errors
# ----------------------------------------------------------------------------------------------------------------


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
        logger.warning("Checkpoint %s lacks %d key(s), left as initialised: %s", path, len(missing),
                       _format_keys(missing))
    if unexpected:
        logger.warning("Checkpoint %s has %d key(s) the model does not use, ignored: %s", path, len(unexpected),
                       _format_keys(unexpected))
    model.load_state_dict(dict(state_dict), strict=strict)


# ----------------------------------------------------------------------------------------------------------------
# timm ViT backbones
# ----------------------------------------------------------------------------------------------------------------


def _check_img_size(img_size: Any) -> int | tuple[int, int]:
    """Checks ``img_size`` is a positive int or a pair of positive ints."""

    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if positive_int(img_size):
        return img_size
    if isinstance(img_size, Sequence) and len(img_size) == 2 and all(positive_int(v) for v in img_size):
        return (img_size[0], img_size[1])
    raise ValueError(f"`img_size` must be a positive int or a pair of positive ints (height, width), got {img_size!r}.")


def _check_model_name(model_name: Any) -> None:
    """Raises ValueError when ``model_name`` is not a timm model (hub-prefixed names are left to timm)."""
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError(f"`model_name` must be a non-empty timm model name, got {model_name!r}.")
    if ":" in model_name:  # 'hf-hub:org/repo' and 'local-dir:/path' are resolved by timm.create_model
        return
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name.split(".")[0], timm.list_models(), n=5)
        hint = f" Did you mean one of {close}?" if close else " See timm.list_models('vit_*')."
        raise ValueError(f"Unknown timm model name {model_name!r}.{hint}")


def _describe_hub_source(model_name: str) -> str:
    """Describes where timm looks for the pretrained weights of ``model_name`` (best effort, for messages)."""
    if ":" in model_name:
        source, _, location = model_name.partition(":")
        return f"{source} location '{location}'"
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # only used to build an error message
        cfg = None
    if cfg is None:
        return f"timm's registered pretrained weights for '{model_name}' (none may be registered)"
    tried = []
    if getattr(cfg, "hf_hub_id", None):
        tried.append(f"Hugging Face hub repo '{cfg.hf_hub_id}'")
    if getattr(cfg, "url", None):
        tried.append(f"URL '{cfg.url}'")
    if getattr(cfg, "file", None):
        tried.append(f"file '{cfg.file}'")
    if not tried:
        return f"timm's registered pretrained weights for '{model_name}' (no download location registered)"
    return f"timm model '{model_name}' from " + " or ".join(tried)


def _timm_create(model_name: str, **kwargs: Any) -> nn.Module:
    """Calls :func:`timm.create_model`, turning timm's 'Unknown model' RuntimeError into a ValueError."""
    try:
        return timm.create_model(model_name, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"Unknown timm model name {model_name!r}: {err}") from err
        raise


def _check_is_vit(model: nn.Module, model_name: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"timm model {model_name!r} is a {type(model).__name__}, not a timm VisionTransformer; "
            "create_timm_vit only supports timm.models.VisionTransformer architectures."
        )
    return model


def create_timm_vit(
    model_name: str,
    img_size: int | tuple[int, int],
    pretrained: bool | str | os.PathLike = True,
    **kwargs: Any,
) -> VisionTransformer:
    """Creates a headless timm ``VisionTransformer`` backbone with pretrained weights for ``img_size`` inputs.

    The model always has ``num_classes=0`` (no classifier head; ``head.*`` checkpoint keys are dropped), and its
    absolute position embeddings are resampled (bicubic) from the checkpoint's patch grid to the grid of
    ``img_size``, so a 224-pixel checkpoint can be used at e.g. 512 pixels.

    Args:
        model_name: timm model name, e.g. ``"vit_base_patch16_224.augreg2_in21k_ft_in1k"``.
        img_size: input image size, an int (square) or ``(height, width)``.
        pretrained: where the weights come from:

            * ``True``: the timm / Hugging Face hub weights registered for ``model_name`` (downloaded and cached
              by timm). Without network access and no cached copy this fails with :class:`PretrainedWeightsError`
              (note that ``huggingface_hub`` retries for about a minute before giving up unless
              ``HF_HUB_OFFLINE=1`` is set).
            * a path: a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` checkpoint in timm or Hugging Face
              ``transformers`` ViT layout for the same architecture.
            * ``False``: random weights, for tests only. A UserWarning is emitted, as a frozen random backbone gives
              random features and FPT has nothing to transfer.

        **kwargs: passed on to :func:`timm.create_model` (e.g. ``drop_path_rate``, ``dynamic_img_size``).
            ``num_classes`` may only be 0.

    Returns:
        The ``VisionTransformer`` (``num_classes=0``, in training mode, parameters not frozen).

    Raises:
        ValueError: for an unknown model name, a non-ViT timm model, a bad ``img_size`` or ``num_classes != 0``.
        TypeError: if ``pretrained`` is neither a bool nor a path.
        FileNotFoundError: if the local checkpoint does not exist.
        PretrainedWeightsError: if the hub weights cannot be obtained, or the local checkpoint cannot be read,
            converted or loaded (the message names the file and the mismatching keys).
    """
    _check_model_name(model_name)
    img_size = _check_img_size(img_size)
    if kwargs.get("num_classes", 0) != 0:
        raise ValueError(
            f"create_timm_vit builds a headless backbone (num_classes=0), got num_classes={kwargs['num_classes']!r}."
        )
    kwargs.pop("num_classes", None)
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(
            f"`pretrained` must be True, False or a checkpoint path, got {type(pretrained).__name__}: {pretrained!r}."
        )

    if pretrained is True:
        source = _describe_hub_source(model_name)
        logger.info("Creating %s with pretrained weights from %s.", model_name, source)
        try:
            model = timm.create_model(model_name, pretrained=True, img_size=img_size, num_classes=0, **kwargs)
        except Exception as err:
            if isinstance(err, RuntimeError) and "Unknown model" in str(err):
                raise ValueError(f"Unknown timm model name {model_name!r}: {err}") from err
            raise PretrainedWeightsError(
                f"Could not load pretrained weights for timm model '{model_name}' (tried {source}): "
                f"{type(err).__name__}: {err}\n"
                f"To use a local copy of the weights instead, pass pretrained=\"/path/to/model.safetensors\" "
                f"(timm or Hugging Face ViT layout; .pth/.pt/.bin also accepted). To use random weights, ask for "
                f"them explicitly with pretrained=False (FPT's frozen backbone then has nothing to transfer)."
            ) from err
        return _check_is_vit(model, model_name)

    if pretrained is False:
        message = (
            f"create_timm_vit({model_name!r}, pretrained=False): the backbone has RANDOM weights. Its features are "
            "random, so Fine-grained Prompt Tuning (which keeps the backbone frozen) has nothing to transfer. Use "
            "this only for tests; pass pretrained=True or a checkpoint path for real training."
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        logger.warning(message)
        model = _timm_create(model_name, pretrained=False, img_size=img_size, num_classes=0, **kwargs)
        return _check_is_vit(model, model_name)

    path = _as_path(pretrained, "pretrained")
    state_dict = load_state_dict_file(path)
    model = _check_is_vit(
        _timm_create(model_name, pretrained=False, img_size=img_size, num_classes=0, **kwargs), model_name
    )
    if is_hf_vit_layout(state_dict):
        logger.info("Converting Hugging Face ViT checkpoint %s to timm layout.", path)
        try:
            state_dict = hf_vit_to_timm(state_dict)
        except PretrainedWeightsError as err:
            raise PretrainedWeightsError(f"Checkpoint '{path}': {err}") from err
    try:
        # resamples pos_embed to the model's grid, adapts patch-embedding kernels, handles other known layouts
        state_dict = checkpoint_filter_fn(state_dict, model)
    except Exception as err:
        raise PretrainedWeightsError(
            f"Could not adapt checkpoint '{path}' to timm model '{model_name}' at img_size={img_size}: "
            f"{type(err).__name__}: {err}"
        ) from err
    model_keys = set(model.state_dict())
    dropped = [k for k in state_dict if k.startswith(_TIMM_HEAD_PREFIXES) and k not in model_keys]
    for k in dropped:
        del state_dict[k]
    if dropped:
        logger.info("Dropped classifier head key(s) %s from %s (the backbone is headless).", _format_keys(dropped),
                    path)
    _load_checked(model, state_dict, path, strict=True)
    logger.info("Loaded pretrained weights for %s (img_size=%s) from %s.", model_name, img_size, path)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Position embeddings (N-D) and MONAI ViTs
# ----------------------------------------------------------------------------------------------------------------


def _check_grid(grid: Any, name: str) -> tuple[int, ...]:
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not 1 <= len(grid) <= 3:
        raise ValueError(f"`{name}` must be a sequence of 1 to 3 positive ints, got {grid!r}.")
    try:
        checked = tuple(operator.index(g) for g in grid if not isinstance(g, bool))
    except TypeError:
        checked = ()
    if len(checked) != len(grid) or any(g <= 0 for g in checked):
        raise ValueError(f"`{name}` must be a sequence of 1 to 3 positive ints, got {grid!r}.")
    return checked


def _infer_cube_grid(num_tokens: int, ndim: int) -> tuple[int, ...]:
    """Returns ``(s,) * ndim`` with ``s ** ndim == num_tokens``, or raises ValueError."""
    side = round(num_tokens ** (1.0 / ndim))
    for s in (side - 1, side, side + 1):
        if s > 0 and s**ndim == num_tokens:
            return (s,) * ndim
    shape = {1: "line", 2: "square", 3: "cube"}[ndim]
    raise ValueError(
        f"Cannot infer the {ndim}D grid of a position embedding with {num_tokens} patch tokens: {num_tokens} is not "
        f"a perfect {shape}; pass the grid explicitly."
    )


def resample_position_embedding(
    pos_embed: torch.Tensor,
    new_grid: Sequence[int],
    old_grid: Sequence[int] | None = None,
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Resamples an absolute position embedding to another patch grid, in 1, 2 or 3 spatial dimensions.

    timm's :func:`~timm.layers.resample_abs_pos_embed` only handles 2D grids, whereas MONAI ViTs are often 3D.
    2D grids are delegated to timm (bicubic); 3D grids use trilinear and 1D linear interpolation. Prefix tokens
    (class / register tokens) are kept as they are. Patch tokens are assumed in row-major grid order, as produced
    by flattening a convolutional patch embedding.

    Args:
        pos_embed: tensor of shape ``(1, num_prefix_tokens + prod(old_grid), C)``.
        new_grid: target patch grid, e.g. ``(4, 4, 4)``.
        old_grid: grid of ``pos_embed``; inferred as a square / cube with ``len(new_grid)`` dims when None.
        num_prefix_tokens: number of leading non-spatial tokens.

    Returns:
        A tensor of shape ``(1, num_prefix_tokens + prod(new_grid), C)`` with the dtype of ``pos_embed``
        (``pos_embed`` itself when the grids are equal).

    Raises:
        ValueError: for a badly shaped ``pos_embed``, inconsistent grids, or a grid that cannot be inferred.
    """
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        shape = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
        raise ValueError(f"`pos_embed` must be a tensor of shape (1, tokens, channels), got {shape}.")
    new_grid = _check_grid(new_grid, "new_grid")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"`num_prefix_tokens` must be a non-negative int, got {num_prefix_tokens!r}.")
    num_tokens = pos_embed.shape[1] - num_prefix_tokens
    if num_tokens <= 0:
        raise ValueError(
            f"`pos_embed` has {pos_embed.shape[1]} tokens, not more than num_prefix_tokens={num_prefix_tokens}."
        )
    if old_grid is None:
        old_grid = _infer_cube_grid(num_tokens, len(new_grid))
    else:
        old_grid = _check_grid(old_grid, "old_grid")
        if len(old_grid) != len(new_grid):
            raise ValueError(f"`old_grid` {old_grid} and `new_grid` {new_grid} have different numbers of dimensions.")
        if math.prod(old_grid) != num_tokens:
            raise ValueError(
                f"`old_grid` {old_grid} has {math.prod(old_grid)} cells but `pos_embed` has {num_tokens} patch tokens "
                f"(after {num_prefix_tokens} prefix token(s))."
            )
    if old_grid == new_grid:
        return pos_embed
    if len(new_grid) == 2:
        return resample_abs_pos_embed(
            pos_embed,
            new_size=list(new_grid),
            old_size=list(old_grid),
            num_prefix_tokens=num_prefix_tokens,
            interpolation="bicubic",
            antialias=True,
        )
    prefix, tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    channels = tokens.shape[-1]
    grid = tokens.float().reshape(1, *old_grid, channels).movedim(-1, 1)
    mode = "trilinear" if len(new_grid) == 3 else "linear"
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    tokens = grid.movedim(1, -1).reshape(1, -1, channels).to(pos_embed.dtype)
    logger.info("Resampled position embedding from grid %s to %s.", old_grid, new_grid)
    return torch.cat([prefix, tokens], dim=1)


def _monai_patch_grid(block: nn.Module, grid: Sequence[int] | None, spatial_dims: int | None) -> tuple[int, ...]:
    """Returns the patch grid of a MONAI PatchEmbeddingBlock (given, or inferred as a square/cube)."""
    n_patches = int(block.position_embeddings.shape[1])
    if grid is not None:
        grid = _check_grid(grid, "grid")
        if math.prod(grid) != n_patches:
            raise ValueError(f"`grid` {grid} has {math.prod(grid)} cells but the model has {n_patches} patches.")
        return grid
    if spatial_dims is None:
        raise ValueError(
            "Cannot tell the number of spatial dimensions of the model's patch embedding (it is not a convolution); "
            "pass `grid` (img_size // patch_size per dimension)."
        )
    try:
        return _infer_cube_grid(n_patches, spatial_dims)
    except ValueError as err:
        raise ValueError(
            f"The model's patch grid is not a {spatial_dims}D cube ({n_patches} patches); pass "
            f"`grid=tuple(i // p for i, p in zip(img_size, patch_size))`."
        ) from err


def load_monai_vit_weights(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    *,
    grid: Sequence[int] | None = None,
    checkpoint_grid: Sequence[int] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Loads a MONAI-layout ViT checkpoint into a :class:`monai.networks.nets.ViT`, resampling position embeddings.

    Suitable for MONAI Model Zoo and self-supervised pre-training checkpoints (wrappers such as
    ``{"state_dict": ...}`` are removed by :func:`load_state_dict_file`). ``classification_head.*`` and
    ``cls_token`` are dropped when the model has none. ``patch_embedding.position_embeddings`` (no prefix tokens)
    is resampled (trilinear in 3D, bicubic in 2D) from the checkpoint grid to the model grid; fixed ``sincos``
    embeddings are instead kept as the model computed them.

    Args:
        model: a MONAI ``ViT`` (any module with a MONAI ``PatchEmbeddingBlock`` as ``patch_embedding`` and the same
            key layout works).
        path: checkpoint file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``).
        strict: if True, missing or unexpected keys are errors; otherwise they are logged. Shape mismatches are
            always errors.
        grid: the model's patch grid (``img_size // patch_size`` per dim). Inferred as a square / cube (with the
            dimensionality of the patch-embedding convolution) when None, which is only needed when resampling.
        checkpoint_grid: the checkpoint's patch grid; inferred as a square / cube when None.
        state_dict: the content of ``path`` when the caller has already read it with :func:`load_state_dict_file`
            (e.g. to build the model to match it); ``path`` then only names the checkpoint in messages.

    Raises:
        TypeError: if ``model`` has no MONAI patch embedding.
        FileNotFoundError: if the checkpoint does not exist.
        ValueError: if the model grid cannot be inferred.
        PretrainedWeightsError: if the checkpoint cannot be read, its grid cannot be inferred, or it does not match
            the model (the message names the file and the keys).
    """
    block = getattr(model, "patch_embedding", None)
    model_pos = getattr(block, "position_embeddings", None)
    if not isinstance(model, nn.Module) or not isinstance(model_pos, torch.Tensor):
        raise TypeError(
            f"`model` must be a MONAI ViT with a PatchEmbeddingBlock as `patch_embedding`, got {type(model).__name__}."
        )
    path = _as_path(path)
    state_dict = load_state_dict_file(path) if state_dict is None else dict(state_dict)

    dropped = []
    if not hasattr(model, "classification_head"):
        dropped += [k for k in state_dict if k.startswith("classification_head.")]
    if not hasattr(model, "cls_token"):
        dropped += [k for k in state_dict if k == "cls_token"]
    for k in dropped:
        del state_dict[k]
    if dropped:
        logger.info("Dropped %s from %s (the model has no classification head).", _format_keys(dropped), path)

    ckpt_pos = state_dict.get(_MONAI_POS_EMBED_KEY)
    if ckpt_pos is not None and tuple(ckpt_pos.shape) != tuple(model_pos.shape):
        if getattr(block, "pos_embed_type", "learnable") == "sincos":
            logger.info("Using the model's own fixed sincos position embedding instead of the one in %s.", path)
            state_dict[_MONAI_POS_EMBED_KEY] = model_pos.detach().clone()
        else:
            if ckpt_pos.ndim != 3 or ckpt_pos.shape[0] != 1 or ckpt_pos.shape[-1] != model_pos.shape[-1]:
                raise PretrainedWeightsError(
                    f"Checkpoint '{path}' does not match the model: {_MONAI_POS_EMBED_KEY} has shape "
                    f"{tuple(ckpt_pos.shape)}, the model's is {tuple(model_pos.shape)} (different hidden size?)."
                )
            proj = getattr(block, "patch_embeddings", None)
            spatial_dims = len(proj.kernel_size) if isinstance(proj, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None
            if spatial_dims is None and grid is not None:
                spatial_dims = len(grid)
            if spatial_dims is None and checkpoint_grid is not None:
                spatial_dims = len(checkpoint_grid)
            new_grid = _monai_patch_grid(block, grid, spatial_dims)
            try:
                state_dict[_MONAI_POS_EMBED_KEY] = resample_position_embedding(
                    ckpt_pos, new_grid, old_grid=checkpoint_grid, num_prefix_tokens=0
                )
            except ValueError as err:
                raise PretrainedWeightsError(
                    f"Could not resample {_MONAI_POS_EMBED_KEY} of checkpoint '{path}' to the model grid {new_grid}: "
                    f"{err} (pass `checkpoint_grid`)."
                ) from err
    _load_checked(model, state_dict, path, strict=strict)
    logger.info("Loaded MONAI ViT weights from %s.", path)
