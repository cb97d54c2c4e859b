"""FPT/FPT+ networks as plain PyTorch modules: frozen backbones, token selection, side ViT, fusion, baselines.

The networks take built modules and know nothing of preset names, weights files or hubs: the factories that build
them by name (``create_fpt``, ``create_backbone``, ``create_baseline``, ``PRESETS``) are in :mod:`fpt_monai.presets`.
"""

import importlib
import warnings

from fpt_monai.networks.baselines import BASELINE_METHODS, CNN_BASELINE_METHODS, CNNBaseline, ViTBaseline
from fpt_monai.networks.backbones import (
    BackboneShape,
    FrozenBackbone,
    FrozenCNNBackbone,
    FrozenViTBackbone,
    MonaiViTBackbone,
    TimmViTBackbone,
)
from fpt_monai.networks.fpt import FPTNet, make_side_view
from fpt_monai.networks.fusion import FineGrainedFusion, FineGrainedPrompts
from fpt_monai.networks.labels import (
    CLASS_MAPPINGS,
    ClassNamesMismatchError,
    UncheckedClassNamesWarning,
    bind_class_names,
    class_names_of,
)
from fpt_monai.networks.methods import METHODS, Method, method_names
from fpt_monai.networks.selection import mean_received_attention, num_selected_tokens, select_important_tokens
from fpt_monai.networks.side import SideViT

__all__ = [
    "BASELINE_METHODS",
    "CNN_BASELINE_METHODS",
    "CNNBaseline",
    "ViTBaseline",
    "BackboneShape",
    "FrozenBackbone",
    "FrozenCNNBackbone",
    "FrozenViTBackbone",
    "TimmViTBackbone",
    "MonaiViTBackbone",
    "FPTNet",
    "make_side_view",
    "CLASS_MAPPINGS",
    "ClassNamesMismatchError",
    "UncheckedClassNamesWarning",
    "bind_class_names",
    "class_names_of",
    "FineGrainedFusion",
    "FineGrainedPrompts",
    "METHODS",
    "Method",
    "method_names",
    "SideViT",
    "mean_received_attention",
    "num_selected_tokens",
    "select_important_tokens",
]

#: Names that moved to :mod:`fpt_monai.presets`; reading them here still works, with a ``DeprecationWarning``.
MOVED_TO_PRESETS = frozenset(
    {"PRESETS", "CNNPreset", "FPTPreset", "MonaiViTPreset", "create_backbone", "create_baseline", "create_fpt"}
)


def __getattr__(name: str):
    # resolved on first access only, so importing the networks never imports the presets (which import them)
    if name in MOVED_TO_PRESETS:
        warnings.warn(
            f"fpt_monai.networks.{name} is fpt_monai.presets.{name}; import it from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("fpt_monai.presets"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
