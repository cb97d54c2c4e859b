"""An exported ONNX network run by ONNX Runtime behind the ``nn.Module`` interface MONAI's engines call.

``python -m monai.bundle onnx_export`` writes the bundle's network as ONNX (``models/model.onnx``, a dynamic batch
dimension); :class:`OnnxRuntimeNetwork` lets the same ``SupervisedEvaluator``, inferer, post-processing and report
run it (the bundle's ``configs/inference_onnx.json`` overlay; this module is not imported by ``fpt_monai.engine``, so
that only ONNX deployments load ONNX Runtime), so a deployment needs ONNX Runtime and the file,
not the PyTorch network's weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch.nn as nn

__all__ = ["OnnxRuntimeNetwork", "default_onnx_providers"]


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

    Args:
        path: the ``.onnx`` file.
        providers: ONNX Runtime execution providers, in order of preference (default:
            :func:`default_onnx_providers`).
        num_threads: threads of one operator on the CPU (ONNX Runtime's ``intra_op_num_threads``); ``None`` lets
            ONNX Runtime use every core.

    Raises:
        FileNotFoundError: no such file (the message gives the export command).
        ValueError: the file is not an ONNX model ONNX Runtime can load, or has not exactly one input.
    """

    def __init__(
        self, path: str | os.PathLike, providers: Sequence[str] | None = None, num_threads: int | None = None
    ) -> None:
        super().__init__()
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
        return torch.from_numpy(output).to(images.device)
