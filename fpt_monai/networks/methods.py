"""The one list of transfer-learning methods the package trains, and where each one applies.

FPT and FPT+ train a side network on the frozen backbone's keys/values; the baselines
(:mod:`~fpt_monai.networks.baselines`) train the backbone network itself, all of it (``full``) or through a few
new parameters. Every other list of method names (CLI choices, the bundle's demo, benchmark tables) is derived
from :data:`METHODS` with :func:`method_names`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METHODS", "Method", "method_names"]


@dataclass(frozen=True)
class Method:
    """A transfer-learning method.

    Attributes:
        name: the name configs and the CLI use.
        description: one line, with the reference.
        baseline: trains the backbone network itself (``False``: FPT/FPT+, a side network on keys/values).
        on_cnn: has a counterpart on the demo CNN (VPT inserts tokens into a transformer's sequence; a CNN has
            none).
    """

    name: str
    description: str
    baseline: bool = True
    on_cnn: bool = True


#: Every method, in the order tables list them.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", "full fine-tuning: every weight learns"),
        Method("linear", "linear probing: a new head on the frozen backbone's features"),
        Method("vpt", "VPT-deep prompt tuning (Jia et al., ECCV 2022)", on_cnn=False),
        Method("lora", "LoRA (Hu et al., ICLR 2022)"),
        Method("adapter", "AdaptFormer adapters (Chen et al., NeurIPS 2022)"),
        Method("fpt", "Fine-grained Prompt Tuning (Huang et al., MICCAI 2024)", baseline=False),
        Method("fpt_plus", "FPT+ (Huang et al., IEEE TNNLS 2025)", baseline=False),
    )
}


def method_names(baseline: bool | None = None, on_cnn: bool | None = None) -> tuple[str, ...]:
    """Names of the methods of :data:`METHODS` with the given properties (``None``: either), in table order."""
    return tuple(
        m.name
        for m in METHODS.values()
        if (baseline is None or m.baseline == baseline) and (on_cnn is None or m.on_cnn == on_cnn)
    )
