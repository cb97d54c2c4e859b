"""Frozen backbones for FPT: the :class:`FrozenBackbone` interface and its ViT and CNN implementations.

- :mod:`~fpt_monai.networks.backbones.base`: :class:`FrozenBackbone` (what FPT needs of a frozen network) and
  :class:`BackboneShape`.
- :mod:`~fpt_monai.networks.backbones.vit`: keys/values from a ViT's attention (:class:`TimmViTBackbone`,
  :class:`MonaiViTBackbone` for MONAI's 2D/3D ``ViT``).
- :mod:`~fpt_monai.networks.backbones.cnn`: keys/values from a CNN's feature maps (:class:`FrozenCNNBackbone`,
  an extension of the papers).

The backbones take built models; loading their weights is :mod:`fpt_monai.weights`' job and choosing them by name
is :mod:`fpt_monai.presets`'.
"""

from fpt_monai.networks.backbones.base import BackboneShape, FrozenBackbone, state_dict_sha256
from fpt_monai.networks.backbones.cnn import FrozenCNNBackbone, orthonormal_projection, projection_buffer_name
from fpt_monai.networks.backbones.vit import FrozenViTBackbone, MonaiViTBackbone, TimmViTBackbone

__all__ = [
    "BackboneShape",
    "FrozenBackbone",
    "FrozenCNNBackbone",
    "FrozenViTBackbone",
    "MonaiViTBackbone",
    "TimmViTBackbone",
    "orthonormal_projection",
    "projection_buffer_name",
    "state_dict_sha256",
]
