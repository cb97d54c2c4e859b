"""Federated learning with the bundle: MONAI FL's client, exchanging only what learns.

FPT fits federated learning well: only the side ViT, the fusion module and the prompts learn (1-2% of the
values at ViT-B/16), and the frozen backbone and its K/V cache never need to leave a site. MONAI's own
:class:`monai.fl.client.MonaiAlgo` runs the bundle (``configs/train.json`` to train, ``train.json`` +
``evaluate.json`` to evaluate) but exchanges the network's whole ``state_dict``: for FPTNet that adds the
class-name and backbone-digest records, and for a baseline network the frozen backbone itself.
:class:`FPTMonaiAlgo` is ``MonaiAlgo`` with a contract on what crosses the site boundary:

- weights (full or differences) are exactly the network's learnable parameters (``requires_grad``), as CPU
  copies;
- what it receives must be exactly those parameters, so a server cannot overwrite anything else;
- statistics and metrics are numbers only (no file names, paths or images).

The NVIDIA FLARE job around it is :mod:`fpt_monai.fl.job` (``fpt-monai fl_job``), whose client script
(:mod:`fpt_monai.fl.client`) drives this class through FLARE's Client API. See ``docs/federated.md``.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Mapping

import torch
import torch.nn as nn
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems
from monai.fl.utils.exchange_object import ExchangeObject

__all__ = ["FPTMonaiAlgo", "learnable_names", "learnable_state_dict", "numeric_entries"]

logger = logging.getLogger(__name__)


def _unwrapped(network: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper: state dict keys without ``module.``."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return network.module if isinstance(network, wrappers) else network


def learnable_names(network: nn.Module) -> list[str]:
    """State dict keys of ``network``'s learnable parameters (``requires_grad``), in ``named_parameters`` order.

    For FPTNet these are the side ViT's, the prompts' and the fusion module's (``trainable_parameters()``); for
    a baseline network, what its method trains (the head, LoRA matrices, ...).
    """
    names = [name for name, p in _unwrapped(network).named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"{type(network).__name__} has no learnable parameter: nothing to exchange.")
    return names


def learnable_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The learnable parameters of ``network`` as a state dict of detached CPU tensors (what a site sends)."""
    params = dict(_unwrapped(network).named_parameters())
    return {name: params[name].detach().cpu().clone() for name in learnable_names(network)}


def numeric_entries(values: Mapping | None, what: str) -> dict:
    """The entries of ``values`` whose value is a finite real number; the others are dropped, with one log line.

    Statistics and metrics leave a site: a number says nothing about an image, a string might (a file name).
    """
    if not values:
        return {}
    kept = {
        str(k): v
        for k, v in values.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    dropped = sorted(str(k) for k in values if str(k) not in kept)
    if dropped:
        logger.info("not sent (%s that are not finite numbers): %s", what, dropped)
    return kept


class FPTMonaiAlgo(MonaiAlgo):
    """:class:`monai.fl.client.MonaiAlgo` exchanging exactly the network's learnable parameters.

    Takes MonaiAlgo's arguments (``bundle_root``, ``local_epochs``, ``send_weight_diff``, config file names,
    ``train_kwargs``/``eval_kwargs`` as config overrides, ...). Relative config file names are read under
    ``bundle_root``; absolute ones (e.g. the installed bundle's, :func:`fpt_monai.bundle.config_files`) let a
    site keep only its outputs, cache and data in its own folder.

    Set the bundle's ``num_epochs`` to rounds x ``local_epochs``: the learning-rate schedule spans
    ``num_epochs`` and carries on across rounds, while each round trains ``local_epochs``.
    """

    def initialize(self, extra: dict | None = None) -> None:
        """MonaiAlgo's ``initialize``, with the site's ``bundle_root`` given to the workflows as a config override.

        MonaiAlgo initialises the evaluation workflow once before it sets that workflow's ``bundle_root``: without
        the override, that first pass resolves the configs' ``bundle_root`` (``"."``), so its outputs and run lock
        would land in the process's working folder instead of the site's.
        """
        root = os.path.join((extra or {}).get(ExtraItems.APP_ROOT, ""), self.bundle_root)
        self.train_kwargs.setdefault("bundle_root", root)
        self.eval_kwargs.setdefault("bundle_root", root)
        super().initialize(extra)

    def _learnable(self) -> list[str]:
        network = self.trainer.network if self.trainer is not None else getattr(self.evaluator, "network", None)
        if network is None:
            raise RuntimeError("FPTMonaiAlgo has no network: call initialize() first.")
        return learnable_names(network)

    def _check_received(self, data: ExchangeObject) -> None:
        """Refuse global weights that are not exactly the learnable parameters (before anything is loaded)."""
        if not isinstance(data, ExchangeObject) or not isinstance(data.weights, Mapping):
            raise ValueError(f"expected an ExchangeObject with a weights dict, got {type(data).__name__}.")
        expected, received = set(self._learnable()), set(data.weights)
        unexpected, missing = sorted(received - expected), sorted(expected - received)
        if unexpected or missing:
            raise ValueError(
                f"{self.client_name}: the global weights must be exactly the network's {len(expected)} learnable "
                f"parameters; not learnable here: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                f"({len(unexpected)}), missing: {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}). "
                "Start the federation from this network's learnable_state_dict() with the same preset and classes."
            )

    def train(self, data: ExchangeObject, extra: dict | None = None) -> None:
        """Load the global learnable weights and train ``local_epochs`` on the site's data."""
        self._check_received(data)
        super().train(data, extra)

    def evaluate(self, data: ExchangeObject, extra: dict | None = None) -> ExchangeObject:
        """Evaluate the global learnable weights on the site's validation data; return numeric metrics only."""
        self._check_received(data)
        result = super().evaluate(data, extra)
        result.metrics = numeric_entries(result.metrics, "metrics")
        return result

    def get_weights(self, extra: dict | None = None) -> ExchangeObject:
        """MonaiAlgo's weights (current, a weight difference, or a checkpoint), restricted to what learns."""
        result = super().get_weights(extra)
        if result.weights is not None:
            names = self._learnable()
            missing = [name for name in names if name not in result.weights]
            if missing:
                raise RuntimeError(
                    f"{self.client_name}: the weights to send lack {len(missing)} learnable parameters "
                    f"(e.g. {missing[:3]}); a checkpoint of another network?"
                )
            # copies: MonaiAlgo's current weights are the live parameters, which the next round changes
            result.weights = {name: result.weights[name].detach().cpu().clone() for name in names}
        result.optim = None
        result.statistics = numeric_entries(result.statistics, "statistics")
        return result
