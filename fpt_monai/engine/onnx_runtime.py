"""An exported ONNX network run by ONNX Runtime behind the ``nn.Module`` interface MONAI's engines call.

``python -m monai.bundle onnx_export`` writes the bundle's network as ONNX (``models/model.onnx``, a dynamic batch
dimension). The graph holds what the forward pass computes; the network's class names are not part of it, so
:func:`write_onnx_class_names` (``fpt-monai onnx_class_names``) copies them from the checkpoint that was exported
into the file's metadata (``metadata_props["class_names"]``, a JSON list). :class:`OnnxRuntimeNetwork` lets the
same ``SupervisedEvaluator``, inferer, post-processing and report run the model (the bundle's
``configs/inference_onnx.json`` overlay). ``fpt_monai.engine`` does not import this module: only ONNX deployments
load ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn as nn

from fpt_monai.engine.checkpoint import load_checkpoint
from fpt_monai.networks.labels import (
    CLASS_MAPPINGS,
    CLASS_NAMES_KEY,
    ClassNamesMismatchError,
    UncheckedClassNamesWarning,
    class_names_of,
)
from fpt_monai.utils import atomic_write

__all__ = ["OnnxRuntimeNetwork", "default_onnx_providers", "onnx_class_names", "write_onnx_class_names"]

logger = logging.getLogger(__name__)

#: Key of the class names (a JSON list, in output order) in an ONNX model's ``metadata_props``.
ONNX_CLASS_NAMES_KEY = CLASS_NAMES_KEY


def write_onnx_class_names(onnx_file: str | os.PathLike, ckpt_file: str | os.PathLike) -> list[str]:
    """Store the class names of the checkpoint ``ckpt_file`` in the metadata of the ONNX model ``onnx_file``
    (exported from it) and return them; the file is rewritten atomically.

    Raises:
        FileNotFoundError: either file is missing.
        ValueError: the checkpoint carries no class names (written before they were stored: export a checkpoint
            saved again, or trained, with class names).
    """
    onnx_file = Path(onnx_file)
    if not onnx_file.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_file} not found.")
    names = class_names_of(load_checkpoint(ckpt_file))
    if names is None:
        raise ValueError(
            f"checkpoint {ckpt_file} carries no class names (it was written before they were stored): load it into "
            "the network with its class names and save it again, then export and run this again."
        )
    model = onnx.load(str(onnx_file))
    kept = [p for p in model.metadata_props if p.key != ONNX_CLASS_NAMES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=ONNX_CLASS_NAMES_KEY, value=json.dumps(names, ensure_ascii=False))
    with atomic_write(onnx_file, what="ONNX model") as f:
        f.write(model.SerializeToString())
    logger.info("class names %s written into %s", names, onnx_file)
    return names


def onnx_class_names(session_or_file: onnxruntime.InferenceSession | str | os.PathLike) -> list[str] | None:
    """The class names stored in an ONNX model's metadata (see :func:`write_onnx_class_names`), or ``None``."""
    session = session_or_file
    if not isinstance(session, onnxruntime.InferenceSession):
        session = onnxruntime.InferenceSession(str(session_or_file), providers=["CPUExecutionProvider"])
    value = session.get_modelmeta().custom_metadata_map.get(ONNX_CLASS_NAMES_KEY)
    if value is None:
        return None
    names = json.loads(value)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"ONNX metadata '{ONNX_CLASS_NAMES_KEY}' must be a JSON list of names, got {value!r:.200}.")
    return names


def default_onnx_providers() -> list[str]:
    """ONNX Runtime's execution providers to use: CUDA when this installation has it, and the CPU."""
    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX model run by ONNX Runtime: ``forward(images)`` takes and returns ``torch.Tensor`` like the network it
    was exported from (one input, the first output returned).

    The input's fixed dimensions (channels, image size) are checked before the run, and a mismatch names the
    file and both shapes; the batch dimension may vary when the export made it dynamic. Outputs come back on the
    input's device.

    Class names are checked as a checkpoint's are when a network loads it
    (:mod:`fpt_monai.networks.labels`): given ``class_names`` that differ from those in the file's metadata
    (other names, or another order) are refused, showing both lists, unless ``class_mapping="by_name"`` and the
    names are the same, when the outputs are reordered to ``class_names``' order; a file without class names
    (exported without :func:`write_onnx_class_names`) runs with one :class:`UncheckedClassNamesWarning`.
    ``class_names`` (attribute) are then the names of the outputs, for reports.

    Args:
        path: the ``.onnx`` file.
        class_names: the classes the outputs are expected to be, in order (``None``: take the file's).
        class_mapping: ``"strict"`` or ``"by_name"`` (see above).
        providers: ONNX Runtime execution providers, in order of preference (default:
            :func:`default_onnx_providers`).
        num_threads: threads of one operator on the CPU (ONNX Runtime's ``intra_op_num_threads``); ``None`` lets
            ONNX Runtime use every core.

    Raises:
        FileNotFoundError: no such file (the message gives the export command).
        ValueError: the file is not an ONNX model ONNX Runtime can load, or has not exactly one input.
        ClassNamesMismatchError: ``class_names`` differ from the file's (see above).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        class_mapping: str = "strict",
        providers: Sequence[str] | None = None,
        num_threads: int | None = None,
    ) -> None:
        super().__init__()
        if class_mapping not in CLASS_MAPPINGS:
            raise ValueError(f"class_mapping must be one of {list(CLASS_MAPPINGS)}, got {class_mapping!r}.")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"ONNX model {self.path} not found: export the trained network first, from the bundle folder: "
                "python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file "
                "models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json "
                "(the bundle README gives the whole command)."
            )
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.path), options, providers=list(providers or default_onnx_providers())
            )
        except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid models
            raise ValueError(f"ONNX model {self.path} cannot be loaded by ONNX Runtime: {err}") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"ONNX model {self.path} has {len(inputs)} inputs; expected one (the images).")
        self.input_name = inputs[0].name
        # fixed dimensions are ints; dynamic ones are names (e.g. the batch) or None
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
        self.class_names, self.output_order = self._check_class_names(class_names, class_mapping)

    def _check_class_names(
        self, expected: Sequence[str] | None, class_mapping: str
    ) -> tuple[list[str] | None, list[int] | None]:
        stored = onnx_class_names(self.session)
        expected = [str(n) for n in expected] if expected is not None else None
        if stored is None:
            if expected is not None:
                message = (
                    f"ONNX model {self.path} has no class names in its metadata, so they cannot be checked against "
                    f"the config's {expected}: make sure it was exported from a checkpoint of these classes in this "
                    "order (`fpt-monai onnx_class_names` stores the checkpoint's)."
                )
                warnings.warn(message, UncheckedClassNamesWarning, stacklevel=3)
                logger.warning(message)
            return expected, None
        if expected is None or stored == expected:
            return stored, None
        if class_mapping == "by_name" and sorted(stored) == sorted(expected):
            order = [stored.index(name) for name in expected]
            logger.info("class_mapping 'by_name': the ONNX model's classes %s reordered to %s", stored, expected)
            return expected, order
        same = sorted(stored) == sorted(expected)
        raise ClassNamesMismatchError(
            f"ONNX model {self.path} was exported for the classes {stored}, but the config's class_names are "
            f"{expected}"
            + (
                ": the same names in another order. Give class_names in the model's order, or set class_mapping "
                "to 'by_name' (bundle: --class_mapping by_name)."
                if same
                else ": other names. Give the model's class_names (and num_classes), or export a model of these."
            )
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's first output for ``images`` (a ``torch.Tensor``), on ``images``' device."""
        shape = tuple(images.shape)
        if len(shape) != len(self.input_shape) or any(
            want is not None and want != got for want, got in zip(self.input_shape, shape)
        ):
            expected = ", ".join("N" if d is None else str(d) for d in self.input_shape)
            raise ValueError(f"ONNX model {self.path} takes input of shape ({expected}), got {list(shape)}.")
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        output = self.session.run(None, {self.input_name: array})[0]
        if self.output_order is not None:
            output = output[..., self.output_order]
        return torch.from_numpy(np.ascontiguousarray(output)).to(images.device)
