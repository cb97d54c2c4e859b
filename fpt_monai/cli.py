"""Command line interface: ``fpt-monai COMMAND ...`` (or ``python -m fpt_monai COMMAND ...``).

Built with `fire`: every public method of :class:`Commands` is a command, its arguments are flags
(``fpt-monai params --preset fpt_plus --num_classes 5``). ``fpt-monai COMMAND --help`` documents each.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
from monai.transforms import Resize
from PIL import Image

from fpt_monai import bundle
from fpt_monai.data import (
    LoadImageRGBd,
    SampleFundusSpec,
    SampleVolumeSpec,
    make_datalist,
    make_fpt_dataset,
    make_sample_dataset,
    make_sample_dataset_3d,
    sample_spec,
)
from fpt_monai.engine.distributed import rank_and_world_size
from fpt_monai.engine.onnx_runtime import write_onnx_class_names
from fpt_monai.fl.job import build_job
from fpt_monai.preload import int8_scale_shape, storage_dtype
from fpt_monai.presets import PRESETS, create_backbone, create_fpt
from fpt_monai.visualize import display_image, save_png, selection_overlay
from fpt_monai.weights import random_weights_expected

__all__ = ["Commands", "main", "run_commands"]


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
            preset: network preset (``fpt``, ``fpt_plus``, ``fpt_tiny``, ``fpt_plus_tiny``, ``fpt_3d``, ...).
            num_classes: number of classes of the task.
        """
        if preset not in PRESETS:
            raise fire.core.FireError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
        # Counting needs the architecture only; the random-weights warning would be noise here.
        with random_weights_expected(), torch.device("meta"):
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

    def preload(
        self,
        dataset_dir: str,
        cache_dir: str,
        preset: str = "fpt",
        pretrained: bool | str = True,
        splits: str | Sequence[str] = ("train", "val", "test"),
        dtype: str = "float16",
        batch_size: int = 8,
        num_workers: int = 0,
        device: str = "cpu",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        side_img_size: int | None = None,
        side_source: bool = True,
    ) -> None:
        """Fill the K/V cache of a dataset before training (resumable; what is cached stays cached).

        Prints one JSON object: per split the images computed and already cached, seconds, images/s, and
        the cache folder; plus the bytes of one entry.

        Under ``torchrun --nproc_per_node=N`` (or any launcher setting ``RANK``/``WORLD_SIZE``) every process
        fills its own shard of each split and prints its own report; ``--device cuda`` then means the process's
        GPU, ``cuda:LOCAL_RANK``. The processes never talk to each other: run it once more, in one process, to
        check that nothing is missing (it computes only what is).

        Args:
            dataset_dir: folder with ``train/ val/ test/`` of class sub-folders, or a JSON datalist file.
            cache_dir: root of the cache (entries go to a sub-folder named by the cache fingerprint).
            preset: network preset whose frozen backbone fills the cache.
            pretrained: ``True`` for the preset's hub weights, a local weights file, or ``False`` (random).
            splits: the splits to preload (comma-separated or a list).
            dtype: storage dtype: ``float16``, ``bfloat16``, ``float32`` or ``int8`` (a float16 scale per token,
                read back as float16).
            batch_size: images per backbone forward pass.
            num_workers: data-loading worker processes.
            device: device the backbone runs on.
            mean: per-channel normalisation mean (default: the backbone's pre-training mean).
            std: per-channel normalisation std (default: the backbone's pre-training std).
            side_img_size: the side network's input size (default: the preset's); entries store the source of the
                training side views, made for this size.
            side_source: store that source in the entries (training then reads no image file); ``False`` for a
                smaller cache (the bundle's ``side_source``), whose training reads every image file again.
        """
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        splits = [s for s in splits.split(",") if s] if isinstance(splits, str) else list(splits)
        rank, world_size = rank_and_world_size()
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process of a node
        backbone = create_backbone(preset, pretrained=pretrained).to(device)
        mean = tuple(mean) if mean is not None else backbone.mean
        std = tuple(std) if std is not None else backbone.std
        result: dict = {"preset": preset, "dtype": dtype, "mean": mean, "std": std, "splits": {}}
        if world_size > 1:
            result.update(rank=rank, world_size=world_size)
        for split in splits:
            dataset = make_fpt_dataset(
                make_datalist(dataset_dir, split),
                backbone.shape.img_size,
                PRESETS[preset].side_img_size if side_img_size is None else int(side_img_size),
                mean,
                std,
                train=False,
                backbone=backbone,
                cache_dir=cache_dir,
                kv_dtype=dtype,
                side_source=bool(side_source),
            )
            report = dataset.preload(batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size)
            entries = sorted(dataset.cache_dir.glob("*.safetensors"))
            result["splits"][split] = {**report, "cache_dir": str(dataset.cache_dir)}
            if entries:
                result["entry_bytes"] = entries[0].stat().st_size
        result["kv_bytes"] = math.prod(backbone.shape.kv_shape) * storage_dtype(dtype).itemsize
        if storage_dtype(dtype) == torch.int8:
            result["int8_scale_bytes"] = math.prod(int8_scale_shape(backbone.shape.kv_shape)) * 2  # float16
        print(json.dumps(result, indent=2))

    def sample_data(self, output_dir: str = "fpt_sample", **spec_fields: Any) -> None:
        """Create the offline sample dataset (fundus photographs graded by counting tiny lesions).

        Reuses an existing folder made with the same settings. See :mod:`fpt_monai.data.sample`.

        Args:
            output_dir: the dataset folder (``train/ val/ test/`` of class folders of PNG images).
            spec_fields: :class:`~fpt_monai.data.SampleFundusSpec` fields, e.g. ``--num_train 60 --num_val 30
                --num_test 30 --image_size 256 --seed 1`` (by default 240/90/90 images of 512 px, seed 0).
        """
        _write_sample_dataset(make_sample_dataset, SampleFundusSpec, output_dir, spec_fields)

    def sample_data_3d(self, output_dir: str = "fpt_sample_3d", **spec_fields: Any) -> None:
        """Create the offline 3D sample dataset (CT-like NIfTI volumes graded by counting tiny bright spots).

        Reuses an existing folder made with the same settings. See :mod:`fpt_monai.data.sample3d`.

        Args:
            output_dir: the dataset folder (``train/ val/ test/`` of class folders of ``.nii.gz`` volumes).
            spec_fields: :class:`~fpt_monai.data.SampleVolumeSpec` fields, e.g. ``--num_train 12 --volume_size 48``
                (by default 60/30/30 volumes of 64^3 voxels, seed 0).
        """
        _write_sample_dataset(make_sample_dataset_3d, SampleVolumeSpec, output_dir, spec_fields)

    def selection_map(
        self,
        image: str,
        output: str = "selection_map.png",
        preset: str = "fpt_demo",
        pretrained: bool | str = True,
        size: int | None = None,
        alpha: float = 0.7,
        colors: int | None = None,
    ) -> None:
        """Write a PNG of which high-resolution patches FPT's frozen backbone selects in one image.

        Left: the image as the backbone reads it (resized to the preset's input size). Right: the same image with
        each patch painted by the fraction of the backbone's (extracted block, head) pairs that kept its token,
        from none (not painted) through blue and cyan to white (every pair kept it). Only the frozen backbone runs,
        so no trained checkpoint is needed: the selection is the backbone's, the same before and after training.
        The bundle writes the same maps at validation (TensorBoard) and, with ``--selection_maps true``, at
        inference.

        Args:
            image: the image file (any format the bundle reads).
            output: the PNG to write.
            preset: network preset whose backbone selects (``fpt_demo``: the offline demo network).
            pretrained: the backbone's weights (``True``: the preset's own; a path: a local weights file).
            size: height of the written picture in pixels (default: the backbone's input size).
            alpha: opacity of the paint on a patch that every block and head kept, in [0, 1].
            colors: store the PNG with a palette of this many colours (a smaller file, e.g. for documentation).
        """
        if preset not in PRESETS:
            raise fire.core.FireError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
        backbone = create_backbone(preset, pretrained=pretrained)
        if backbone.shape.spatial_dims != 2:
            raise fire.core.FireError(f"preset {preset!r} reads volumes; selection maps are drawn for 2D images.")
        pixels = LoadImageRGBd(keys="image")({"image": image})["image"]
        pixels = Resize(backbone.shape.img_size, mode="bilinear", anti_aliasing=True)(pixels)
        pixels = torch.as_tensor(pixels).as_subclass(torch.Tensor).float()
        mean = torch.tensor(backbone.mean).reshape(-1, 1, 1)
        std = torch.tensor(backbone.std).reshape(-1, 1, 1)
        selection = backbone.selection_map(((pixels - mean) / std)[None])[0]
        picture = np.concatenate([display_image(pixels), selection_overlay(pixels, selection, alpha=alpha)], axis=1)
        if size is not None and int(size) != picture.shape[0]:
            height = int(size)
            width = round(picture.shape[1] * height / picture.shape[0])
            picture = np.asarray(Image.fromarray(picture).resize((width, height), Image.Resampling.LANCZOS))
        print(save_png(picture, output, colors=colors))

    def demo(self, work_dir: str = "fpt_demo", method: str = "fpt", **overrides) -> None:
        """Train FPT on the offline sample dataset with the MONAI bundle, evaluate it, print the test metrics.

        Everything (sample data, K/V cache, checkpoints, reports, TensorBoard logs) goes to ``work_dir``; see
        ``tensorboard --logdir <work_dir>/eval/tensorboard``. Any bundle config value can be overridden, e.g.
        ``fpt-monai demo --num_epochs 2``. ``--method full|linear|lora|adapter`` trains that baseline on the same
        demo network instead (overlays ``baseline.json`` and ``demo_baseline.json``).
        """
        results = bundle.run_demo(work_dir, method=method, **overrides)
        print(json.dumps({"work_dir": str(work_dir), "test_metrics": results}, indent=2))

    def export_bundle(self, output_dir: str, overwrite: bool = False) -> None:
        """Write a self-contained copy of the MONAI bundle (custom code under ``scripts/``) to ``output_dir``."""
        print(bundle.export_bundle(output_dir, overwrite=overwrite))

    def fl_job(
        self,
        sites: str | Sequence[str],
        num_rounds: int = 2,
        work_dir: str = "fpt_fl",
        local_epochs: int = 1,
        dataset_dirs: str | Sequence[str] | None = None,
        export_dir: str | None = None,
        configs: str | Sequence[str] = "train",
        site_python: str | None = None,
        **overrides,
    ) -> None:
        """Federated training with NVIDIA FLARE: FedAvg of the learnable parameters over sites (docs/federated.md).

        Runs the job with FLARE's simulator (every site on this machine) and prints where the global model is;
        with ``--export_dir DIR`` writes the job folder for a real deployment instead (``nvflare job submit``).
        Needs ``pip install "fpt-monai[fl]"``.

        Args:
            sites: the sites' bundle roots, comma-separated or a list: each site's checkpoints, logs and K/V cache
                go there, and its data is ``<root>/data`` unless ``dataset_dirs`` says otherwise.
            num_rounds: FedAvg rounds.
            work_dir: the job's files (initial weights, sites' script and overrides) and the simulator's workspace.
            local_epochs: training epochs per round at each site.
            dataset_dirs: each site's ``dataset_dir``, in the order of ``sites``.
            export_dir: write the job folder there instead of running the simulator.
            configs: training configs, e.g. ``train`` or ``train,baseline``.
            site_python: the Python interpreter with fpt-monai that runs a site (default: this one for the
                simulator, ``python3`` for an export).
            overrides: bundle config values of every site, e.g. ``--preset fpt_plus --batch_size 8``.
        """

        def as_list(value):
            return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        job = build_job(
            as_list(sites),
            num_rounds=num_rounds,
            work_dir=work_dir,
            overrides=overrides,
            dataset_dirs=as_list(dataset_dirs) if dataset_dirs is not None else None,
            local_epochs=local_epochs,
            configs=as_list(configs),
            site_python=site_python or ("python3" if export_dir is not None else None),
        )
        if export_dir is not None:
            print(json.dumps({"job": str(job.export(export_dir))}, indent=2))
            return
        run_dir = job.simulate(Path(work_dir) / "simulator")
        app = run_dir / "server" / "simulate_job" / "app_server"
        result = {"run": str(run_dir), "global_model": str(app / "FL_global_model.pt"), "sites": job.sites}
        print(json.dumps(result, indent=2))

    def onnx_class_names(self, onnx_file: str = "models/model.onnx", ckpt_file: str = "models/model.pt") -> None:
        """Store the class names of the checkpoint an ONNX model was exported from in the model's metadata.

        ``python -m monai.bundle onnx_export`` writes the network's graph; this adds its class names (in output
        order, ``metadata_props["class_names"]``), which ONNX Runtime inference (the bundle's
        ``inference_onnx.json``) then checks against the config's, as a checkpoint's are checked. Prints them.
        """
        print(json.dumps(write_onnx_class_names(onnx_file, ckpt_file)))


def _write_sample_dataset(
    make: Callable[..., Path], spec_type: type, output_dir: str, spec_fields: Mapping[str, Any]
) -> None:
    """Create (or reuse) a sample dataset for a command and print its folder; a flag that is not a field of
    ``spec_type``, or a value its checks refuse, is a command-line error naming it."""
    try:
        spec = sample_spec(spec_type, None, spec_fields)
    except (TypeError, ValueError) as err:  # unknown fields are named with the known ones
        raise fire.core.FireError(str(err)) from err
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(make(output_dir, spec=spec))


def run_commands(commands: type, name: str, argv: Sequence[str] | None = None) -> None:
    """Run the `fire` command line of the class ``commands`` (one command per public method) on ``argv``."""
    args = list(sys.argv[1:] if argv is None else argv)
    # fire hands a plain ``--help`` to commands with ``**overrides`` (demo) as an override, which would start a
    # run; give fire's help flag form (after ``--``) instead, for every command alike
    if "--" not in args and any(a in ("--help", "-h") for a in args):
        args = [a for a in args if a not in ("--help", "-h")] + ["--", "--help"]
    fire.Fire(commands(), command=args, name=name)  # an instance: the help lists the commands


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    run_commands(Commands, "fpt-monai", argv)


if __name__ == "__main__":
    main()
