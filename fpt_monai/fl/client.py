"""A site of an NVIDIA FLARE job: the bundle trained by :class:`~fpt_monai.fl.FPTMonaiAlgo` under FLARE's Client API.

Each site of the job :mod:`fpt_monai.fl.job` builds runs :func:`main` (FLARE starts ``custom/fpt_fl_client.py
--bundle_root DIR --overrides_file site-1.json``, which calls it). Each round it receives the global learnable
weights, evaluates them on the site's validation split (the metrics go back with the update, for FLARE's choice
of the best global model), trains ``local_epochs`` on the site's training split, and sends the difference of
the learnable weights, weighted by its number of training steps. Everything else stays in the site's bundle
root: checkpoints, logs, the K/V cache, the data checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from fpt_monai.utils import config_files
from fpt_monai.config_check import check_overrides
from fpt_monai.fl import FPTMonaiAlgo

__all__ = ["make_algo", "main"]

logger = logging.getLogger(__name__)


def make_algo(
    bundle_root: str, overrides: dict, local_epochs: int = 1, configs: Sequence[str] = ("train",)
) -> FPTMonaiAlgo:
    """The site's MONAI FL client on the installed bundle's configs, after checking ``overrides`` against them.

    Args:
        bundle_root: the site's folder: checkpoints (``models/``), logs (``eval/``) and the K/V cache (``cache/``).
        overrides: bundle config overrides (``dataset_dir``, ``preset``, ``pretrained``, ``num_epochs``, ...).
        local_epochs: training epochs per round.
        configs: the training configs (``train`` and overlays such as ``baseline``); evaluation adds ``evaluate``.
    """
    train_files = config_files(*configs)
    eval_files = config_files(*configs, "evaluate")
    check_overrides(eval_files, overrides)  # a misspelt key fails here, before any round
    return FPTMonaiAlgo(
        bundle_root=bundle_root,
        local_epochs=local_epochs,
        send_weight_diff=True,
        config_train_filename=train_files,
        config_evaluate_filename=eval_files,
        train_kwargs=dict(overrides),
        eval_kwargs=dict(overrides),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run one site until the server ends the job (FLARE's Client API loop)."""
    # nvflare is the optional `fl` extra: imported when a site runs, so the module imports without it
    import nvflare.client as flare
    from nvflare.apis.fl_constant import FLMetaKey

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle_root", required=True, help="the site's folder (models, logs, cache)")
    parser.add_argument(
        "--overrides_file", help="the site's bundle config overrides, a JSON object (relative: beside the script)"
    )
    parser.add_argument("--local_epochs", type=int, default=1, help="training epochs per round")
    parser.add_argument("--configs", default="train", help="comma-separated training configs, e.g. train,baseline")
    args = parser.parse_args(argv)
    overrides = {}
    if args.overrides_file:
        path = Path(args.overrides_file)
        if not path.is_absolute():  # shipped in the site's app, beside the script FLARE runs
            path = Path(sys.argv[0]).absolute().parent / path
        overrides = json.loads(path.read_text())
    if not isinstance(overrides, dict):
        raise ValueError(f"{args.overrides_file} must hold a JSON object of config overrides.")

    flare.init()
    site = flare.get_site_name()
    algo = None
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        if algo is None:  # the schedule spans the whole federation: rounds x local epochs
            total = max(int(received.total_rounds or 1), 1) * args.local_epochs
            overrides.setdefault("num_epochs", total)
            algo = make_algo(args.bundle_root, overrides, args.local_epochs, args.configs.split(","))
            algo.initialize({ExtraItems.CLIENT_NAME: site})
        weights = {name: torch.as_tensor(value) for name, value in received.params.items()}
        global_model = ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS)
        metrics = algo.evaluate(global_model).metrics
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics=metrics))
            continue
        algo.train(global_model)
        update = algo.get_weights()
        params_type = flare.ParamsType.DIFF if update.weight_type == WeightType.WEIGHT_DIFF else flare.ParamsType.FULL
        steps = update.statistics.get(FlStatistics.NUM_EXECUTED_ITERATIONS, 1)
        logger.info("%s: round %s sends %d learnable tensors", site, received.current_round, len(update.weights))
        flare.send(
            flare.FLModel(
                params=update.weights,
                params_type=params_type,
                metrics=metrics,
                meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps},
            )
        )
    if algo is not None:
        algo.finalize()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
