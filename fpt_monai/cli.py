"""Command line interface: ``fpt-monai COMMAND ...`` (or ``python -m fpt_monai COMMAND ...``).

Built with `fire`: every public method of :class:`Commands` is a command, its arguments are flags
(``fpt-monai params --preset fpt_plus --num_classes 5``). ``fpt-monai COMMAND --help`` documents each.
"""

from __future__ import annotations

import json
import logging
import warnings

import fire
import torch

from fpt_monai.networks import PRESETS, create_fpt

__all__ = ["Commands", "main"]


class Commands:
    """Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution medical image classification."""

    def presets(self) -> None:
        """List the network presets as JSON: name -> backbone weights, sizes, variant, blocks."""
        table = {
            name: {
                "model_name": p.model_name,
                "img_size": p.img_size,
                "side_img_size": p.side_img_size,
                "variant": p.variant,
                "blocks": list(p.blocks) if p.blocks is not None else "all",
                "token_ratio": p.token_ratio,
                "description": p.description,
            }
            for name, p in PRESETS.items()
        }
        print(json.dumps(table, indent=2))

    def params(self, preset: str = "fpt", num_classes: int = 5) -> None:
        """Print the learnable and frozen parameter counts of a preset as one JSON object.

        Nothing is downloaded and no weight is allocated: the network is built on PyTorch's meta device.

        Args:
            preset: network preset (``fpt``, ``fpt_plus``, ``fpt_tiny``, ``fpt_plus_tiny``).
            num_classes: number of classes of the task.
        """
        if preset not in PRESETS:
            raise fire.core.FireError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
        # Counting needs the architecture only; the random-weights warning would be noise here.
        logging.getLogger("fpt_monai.weights").setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            net = create_fpt(preset, num_classes=int(num_classes), pretrained=False)
        counts = net.parameter_counts()
        total = counts["learnable"] + counts["frozen"]
        result = {
            "preset": preset,
            "backbone": PRESETS[preset].model_name,
            "num_classes": int(num_classes),
            "learnable": counts["learnable"],
            "frozen": counts["frozen"],
            "total": total,
            "learnable_ratio": round(counts["learnable"] / total, 6),
            "side": counts["side"],
            "fusion": counts["fusion"],
            "kv_shape_per_image": list(net.shape.kv_shape),
        }
        print(json.dumps(result, indent=2))


def main() -> None:
    """Console-script entry point."""
    fire.Fire(Commands, name="fpt-monai")


if __name__ == "__main__":
    main()
