"""Headless timm ``VisionTransformer`` backbones with weights from the hub or a local file, at any input size.

A local checkpoint (timm or Hugging Face layout) is read by :func:`~fpt_monai.weights.files.load_state_dict_file`,
converted by :func:`~fpt_monai.weights.hf.hf_vit_to_timm` when needed, and adapted to the model by timm's own
``checkpoint_filter_fn`` (position embeddings resampled to the input grid, patch kernels adapted).
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import timm
from timm.models import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from fpt_monai.weights.files import (
    PretrainedWeightsError,
    _as_path,
    _format_keys,
    _load_checked,
    load_state_dict_file,
    warn_random_weights,
)
from fpt_monai.weights.hf import hf_vit_to_timm, is_hf_vit_layout

__all__ = ["create_timm_vit", "random_weights_expected"]

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


_TIMM_HEAD_PREFIXES = ("head.", "head_dist.")


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
    model_name: str, img_size: int | tuple[int, int], pretrained: bool | str | os.PathLike = True, **kwargs: Any
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
                f'To use a local copy of the weights instead, pass pretrained="/path/to/model.safetensors" '
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
        warn_random_weights(message)
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
        logger.info(
            "Dropped classifier head key(s) %s from %s (the backbone is headless).", _format_keys(dropped), path
        )
    _load_checked(model, state_dict, path, strict=True)
    logger.info("Loaded pretrained weights for %s (img_size=%s) from %s.", model_name, img_size, path)
    return model
