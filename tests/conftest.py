"""Shared fixtures: tiny backbones so the suite runs in minutes on 2 CPU cores.

The tests mirror the package (``tests/networks``, ``tests/data``, ...); end-to-end runs (bundle, distributed,
resume, 3D) live in ``tests/integration`` and, with the benchmarks' tests, carry the ``slow`` marker:
``pytest -m "not slow"`` is the quick loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from fpt_monai.data import make_sample_dataset
from fpt_monai.weights import random_weights_expected


def make_tiny_timm_vit(img_size: int = 64, depth: int = 4, seed: int = 0) -> VisionTransformer:
    """A 4-block, width-64, 4-head timm ViT with patch 8 (65 tokens at 64x64), headless."""
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=64, depth=depth, num_heads=4, qkv_bias=True, num_classes=0
    )


@pytest.fixture
def tiny_timm_vit() -> VisionTransformer:
    return make_tiny_timm_vit()


@pytest.fixture
def random_weights_quiet():
    """The package's random-weights warnings silenced for a test that builds networks on purpose without weights."""
    with random_weights_expected():
        yield


#: Bundle overrides that keep a training run to seconds: the ViT-Ti preset at 64 px (17 tokens), a 32 px side
#: view, 2 epochs of batch 4 (global batch 4 in the multi-process tests too).
TINY_BUNDLE = {
    "preset": "fpt_tiny",
    "network_def#img_size": 64,
    "network_def#side_img_size": 32,
    "num_epochs": 2,
    "batch_size": 4,
    "num_workers": 0,
    "learning_rate": 0.001,
}


#: ``ConfigWorkflow`` arguments of the bundle runs inside tests (:func:`fpt_monai.bundle.run_workflow`): pytest keeps
#: its logging set-up, and no workflow type (the property checks are the Model Zoo pattern's, in test_bundle.py).
TEST_WORKFLOW = {"logging_file": False, "workflow_type": None}


def tiny_bundle_task(root: Path, num_train: int = 6, num_val: int = 3, num_test: int = 3) -> dict[str, str]:
    """The bundle's sample data (64 px) and a ViT-Ti backbone weights file (random, seed 0) under ``root``.

    Returns:
        the overrides that point a bundle run at them: ``{"dataset_dir", "pretrained"}``.
    """
    data = make_sample_dataset(
        root / "data", num_train=num_train, num_val=num_val, num_test=num_test, image_size=64, progress=False
    )
    torch.manual_seed(0)
    weights = root / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), str(weights))
    return {"dataset_dir": str(data), "pretrained": str(weights)}


#: Folders whose tests are slow: end-to-end runs, and the benchmarks' own tests (not the library's).
_SLOW = (Path(__file__).parent / "integration", Path(__file__).parent / "benchmarks")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(folder in Path(item.fspath).parents for folder in _SLOW):
            item.add_marker(pytest.mark.slow)
