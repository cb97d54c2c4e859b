"""FPT/FPT+ networks as plain PyTorch modules: frozen backbones, token selection, side ViT, fusion, baselines."""

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
