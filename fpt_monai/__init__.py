"""fpt-monai: Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution medical image classification.

References:
    Huang, Cheng, Tam, Tang. "Fine-grained Prompt Tuning: A Parameter and Memory Efficient Transfer Learning
    Method for High-resolution Medical Image Classification". MICCAI 2024, arXiv:2403.07576.
    Huang, Cheng, Tam, Tang. "Boosting Memory Efficiency in Transfer Learning for High-Resolution Medical
    Image Classification". IEEE TNNLS 2025, arXiv:2408.02426.
"""

__version__ = "0.1.0"

# Subpackages are imported here so bundle configs can reach them from `$import fpt_monai` alone.
from fpt_monai import config_check, data, engine, networks, preload, presets, pretrained  # noqa: E402,F401
