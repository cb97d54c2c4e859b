"""The NVIDIA FLARE job: FedAvg of the bundle's learnable parameters over N sites (``fpt-monai fl_job``).

The job is built with FLARE's PyTorch ``FedAvgRecipe`` (Client API): the server holds and averages only the
learnable parameters, starting from the network the bundle builds with the job's overrides and seed; each
site runs :mod:`fpt_monai.fl.client` (the bundle through :class:`~fpt_monai.fl.FPTMonaiAlgo`) on its own
bundle root and data. :meth:`FLJob.simulate` runs the job on this machine with FLARE's simulator (one process
per site); :meth:`FLJob.export` writes the job folder that ``nvflare job submit`` sends to a provisioned
deployment. Needs ``nvflare`` (``pip install "fpt-monai[fl]"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from fpt_monai.utils import config_files
from fpt_monai.config_check import check_overrides
from fpt_monai.fl import learnable_state_dict
from fpt_monai.networks import FPTNet
from fpt_monai.utils import atomic_write
from fpt_monai.weights import random_weights_expected

__all__ = ["CLIENT_SCRIPT", "INITIAL_WEIGHTS", "FLJob", "build_job", "initial_weights", "site_names"]

logger = logging.getLogger(__name__)

#: The file, in the server app's ``custom/`` folder, holding the initial global learnable weights.
INITIAL_WEIGHTS = "fpt_initial_learnable.pt"
#: The sites' script, in their apps' ``custom/`` folder: it runs the installed :mod:`fpt_monai.fl.client`.
CLIENT_SCRIPT = "fpt_fl_client.py"


def site_names(count: int) -> list[str]:
    """FLARE's client names for ``count`` sites: ``site-1``, ``site-2``, ..."""
    return [f"site-{i + 1}" for i in range(count)]


def initial_weights(overrides: Mapping, configs: Sequence[str] = ("train",)) -> dict[str, torch.Tensor]:
    """The global model of round 1: the learnable parameters of the network the bundle builds with ``overrides``.

    The network is built as a site builds it (``network_def``, after the bundle's seed). For FPT and FPT+ the
    backbone's weights are random: the learnable parameters' initial values do not depend on them, and building
    the job needs no backbone file. A baseline network is built with the job's ``pretrained`` weights, since what
    it learns can be the pretrained weights themselves (full fine-tuning).
    """
    network = _bundle_network(overrides, configs, pretrained=False)
    if not isinstance(network, FPTNet):
        network = _bundle_network(overrides, configs, pretrained=None)
    return learnable_state_dict(network)


def _bundle_network(overrides: Mapping, configs: Sequence[str], pretrained: bool | None) -> torch.nn.Module:
    """The bundle's ``network_def`` on the CPU after its seed; ``pretrained=None``: the configs' own setting."""
    parser = ConfigParser()
    parser.read_config(config_files(*configs))
    parser.update({**overrides, "device": "$torch.device('cpu')"})
    if pretrained is not None:
        parser["pretrained"] = pretrained
    set_determinism(seed=parser.get_parsed_content("seed"))
    try:
        with random_weights_expected() if pretrained is False else contextlib.nullcontext():
            return parser.get_parsed_content("network_def")
    finally:
        set_determinism(seed=None)


def build_job(
    sites: Sequence[str | os.PathLike],
    num_rounds: int,
    work_dir: str | os.PathLike,
    overrides: Mapping | None = None,
    dataset_dirs: Sequence[str | os.PathLike] | None = None,
    local_epochs: int = 1,
    configs: Sequence[str] = ("train",),
    name: str = "fpt_fedavg",
    site_python: str | None = None,
) -> FLJob:
    """FLARE's FedAvg recipe for ``len(sites)`` sites, site ``i`` (``site-{i+1}``) on bundle root ``sites[i]``.

    Args:
        sites: the sites' bundle roots (checkpoints, logs and K/V cache of each site go there).
        num_rounds: FedAvg rounds.
        work_dir: where the files that travel inside the job are written: the initial global weights (to the
            server), the sites' script and each site's overrides (``site-N.json``, to that site).
        overrides: bundle config overrides of every site (``preset``, ``pretrained``, ``batch_size``, ...).
        dataset_dirs: each site's ``dataset_dir`` (default: ``<bundle root>/data``).
        local_epochs: training epochs per round at each site.
        configs: the training configs (``train``, or ``train`` and overlays).
        name: the job's name.
        site_python: the Python interpreter (with fpt-monai) that runs a site's script; default: this one, as
            the simulator needs (for an exported job, the sites' own, e.g. ``python3`` on their PATH).
    """
    # nvflare is the optional `fl` extra: imported where a job is built, so the module imports without it
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.client.config import ExchangeFormat
    from nvflare.recipe.utils import set_per_site_config

    if not sites:
        raise ValueError("give at least one site (its bundle root).")
    if int(num_rounds) < 1 or int(local_epochs) < 1:
        raise ValueError(f"num_rounds and local_epochs must be at least 1, got {num_rounds}, {local_epochs}.")
    overrides = dict(overrides or {})
    if "dataset_dir" in overrides or "bundle_root" in overrides:
        raise ValueError("dataset_dir and bundle_root differ per site: give sites (and dataset_dirs), not overrides.")
    roots = [Path(s).expanduser().absolute() for s in sites]
    data = [Path(d).expanduser().absolute() for d in dataset_dirs] if dataset_dirs else [r / "data" for r in roots]
    if len(data) != len(roots):
        raise ValueError(f"{len(roots)} sites but {len(data)} dataset_dirs: give one dataset folder per site.")
    if "pretrained" in overrides and isinstance(overrides["pretrained"], str):
        overrides["pretrained"] = str(Path(overrides["pretrained"]).expanduser().absolute())

    check_overrides(config_files(*configs, "evaluate"), overrides)  # a misspelt key fails before the job runs
    work_dir = Path(work_dir).expanduser().absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    initial = work_dir / INITIAL_WEIGHTS
    with atomic_write(initial, what="initial global weights") as f:
        torch.save(initial_weights(overrides, configs), f)
    # a script outside the package: FLARE copies a script's package-local imports into the job, and every site
    # runs the fpt_monai it has installed (with the bundle it ships)
    script = work_dir / CLIENT_SCRIPT
    with atomic_write(script, "w", what="client script") as f:
        f.write('"""A site of the FPT job: fpt_monai.fl.client."""\n\nimport logging\n\n')
        f.write("from fpt_monai.fl.client import main\n\n")
        f.write('if __name__ == "__main__":\n    logging.basicConfig(level=logging.INFO)\n    main()\n')

    with _working_dir(work_dir):  # the recipe resolves the relative paths below
        recipe = FedAvgRecipe(
            name=name,
            # the server never builds the network: it holds the learnable state dict of INITIAL_WEIGHTS (the recipe
            # requires a module, which only names the model in FLARE's records)
            model={"class_path": "torch.nn.Identity", "args": {}},
            initial_ckpt=INITIAL_WEIGHTS,  # relative (to work_dir, when the job is written): copied into the server app
            min_clients=len(roots),
            num_rounds=int(num_rounds),
            train_script=CLIENT_SCRIPT,  # relative, as above: custom/fpt_fl_client.py
            launch_external_process=True,  # one process per site: sites share no Python state
            command=f"{shlex.quote(site_python or sys.executable)} -u",
            server_expected_format=ExchangeFormat.PYTORCH,
            key_metric="val_auc",
        )
    per_site = {}
    for site, root, dataset in zip(site_names(len(roots)), roots, data):
        # a file that travels in the site's app, not the command line: FLARE reads braces in a job's arguments as
        # its own expressions
        with atomic_write(work_dir / f"{site}.json", "w", what="site overrides") as f:
            json.dump({**overrides, "dataset_dir": str(dataset)}, f, indent=2)
        arguments = ["--bundle_root", str(root), "--overrides_file", f"{site}.json"]
        arguments += ["--local_epochs", str(int(local_epochs)), "--configs", ",".join(configs)]
        per_site[site] = {"train_args": shlex.join(arguments)}
    with _working_dir(work_dir):
        set_per_site_config(recipe, per_site)
        for site in per_site:
            recipe.add_client_file(f"{site}.json", clients=[site])
    return FLJob(recipe, work_dir, list(per_site))


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """Run the block in ``path``: FLARE places a job's files by their path relative to the working folder."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@dataclass
class FLJob:
    """A built FedAvg job: FLARE's recipe and the folder of the files it takes along (see :func:`build_job`)."""

    recipe: Any
    work_dir: Path
    sites: list[str]

    def simulate(self, workspace: str | os.PathLike) -> Path:
        """Run the job with FLARE's simulator (all sites on this machine, one process each); return the run's
        workspace folder.

        The global model ends in ``<run>/server/simulate_job/app_server/`` (FLARE's ``FL_global_model.pt`` and
        best model); each site's checkpoints, logs and cache in its bundle root. Raises ``RuntimeError`` naming
        the logs when the run did not produce its global model.
        """
        from nvflare.recipe.sim_env import SimEnv  # the optional `fl` extra, as in build_job

        workspace = Path(workspace).expanduser().absolute()
        env = SimEnv(clients=self.sites, num_threads=len(self.sites), workspace_root=str(workspace))
        with _working_dir(self.work_dir):
            self.recipe.run(env)
        run_dir = workspace / self.recipe.name
        global_model = run_dir / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
        initial = torch.load(self.work_dir / INITIAL_WEIGHTS, map_location="cpu", weights_only=True)
        trained = global_model.is_file() and any(
            not torch.equal(value, initial[name])
            for name, value in torch.load(global_model, map_location="cpu", weights_only=True)["model"].items()
        )
        if not trained:  # FLARE's simulator does not report every failure of a site
            raise RuntimeError(
                f"the federated run ended without a trained global model; the logs are in {run_dir}/*/log.txt "
                "(e.g. server/log.txt, site-1/log.txt)."
            )
        return run_dir

    def export(self, job_dir: str | os.PathLike) -> Path:
        """Write the job folder (server and site apps, their configs, the sites' script, the initial weights)
        that ``nvflare job submit -j JOB_DIR`` sends to a provisioned deployment."""
        job_dir = Path(job_dir).expanduser().absolute()
        with _working_dir(self.work_dir):
            self.recipe.export(job_dir=str(job_dir))
        return job_dir / self.recipe.name
