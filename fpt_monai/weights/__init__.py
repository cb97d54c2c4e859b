"""Pretrained weights for the frozen backbones used by Fine-grained Prompt Tuning.

FPT only trains a small side network and prompts; the large backbone stays frozen. A frozen backbone with random
weights produces random features, so loading the right pretrained weights (and adapting them to the input size of
the task) is essential. One module per job:

* :mod:`~fpt_monai.weights.files`: :func:`load_state_dict_file`, safe reading of ``.safetensors``/``.pth`` files
  (no arbitrary unpickling; wrappers and ``module.`` prefixes removed), and :class:`PretrainedWeightsError`.
* :mod:`~fpt_monai.weights.hf`: :func:`is_hf_vit_layout`, :func:`hf_vit_to_timm` (Hugging Face ``transformers``
  ViT -> timm layout).
* :mod:`~fpt_monai.weights.timm_vit`: :func:`create_timm_vit`, a headless timm ``VisionTransformer`` with weights
  from the hub or a local file at the requested image size; :func:`random_weights_expected`.
* :mod:`~fpt_monai.weights.monai_vit`: :func:`create_monai_vit`, a headless MONAI ``ViT`` (3D or 2D) with weights
  from a local MONAI-layout file.
* :mod:`~fpt_monai.weights.position`: :func:`resample_position_embedding` (1D/2D/3D) and
  :func:`load_monai_vit_weights` (MONAI-layout checkpoints into a MONAI ``ViT``).
"""

from fpt_monai.weights.files import (
    PretrainedWeightsError,
    load_state_dict_file,
    pretrained_argument,
    warn_random_weights,
)
from fpt_monai.weights.hf import hf_vit_to_timm, is_hf_vit_layout
from fpt_monai.weights.monai_vit import create_monai_vit
from fpt_monai.weights.position import load_monai_vit_weights, resample_position_embedding
from fpt_monai.weights.timm_vit import create_timm_vit, random_weights_expected

__all__ = [
    "PretrainedWeightsError",
    "load_state_dict_file",
    "pretrained_argument",
    "is_hf_vit_layout",
    "hf_vit_to_timm",
    "create_timm_vit",
    "create_monai_vit",
    "warn_random_weights",
    "resample_position_embedding",
    "load_monai_vit_weights",
    "random_weights_expected",
]
