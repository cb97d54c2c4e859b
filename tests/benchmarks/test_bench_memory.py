"""The memory accounting (images and volumes): fake tensors equal real ones, the categories add up."""

import pytest

from benchmarks.memory import MEMORY_CATEGORIES, measure_3d_memory, measure_training_memory

TINY = {"batch_size": 2, "img_size": 64, "preset": "fpt_tiny"}
_RUNS: dict = {}


def measured(method, **kwargs):
    """One accounting per distinct setting for the whole module (each takes seconds)."""
    key = (method, tuple(sorted(kwargs.items())))
    if key not in _RUNS:
        _RUNS[key] = measure_training_memory(method, **TINY, **kwargs)
    return _RUNS[key]


def test_fake_tensors_account_exactly_like_real_ones():
    fake = measured("fpt_tiny")
    real = measured("fpt_tiny", fake=False)
    for key in ("total_bytes", *(f"{c}_bytes" for c in MEMORY_CATEGORIES), "saved_for_backward_bytes"):
        assert fake[key] == real[key], key


def test_categories_add_up_and_reflect_the_setup():
    row = measured("fpt_tiny")
    assert row["total_bytes"] == sum(row[f"{c}_bytes"] for c in MEMORY_CATEGORIES)
    assert row["frozen_parameters"] == 0 and row["learnable_parameters"] > 0
    resident = measured("fpt_tiny", backbone_resident=True)
    # the resident backbone adds exactly its frozen weights (ViT-Ti: 5,524,416 float32 values at 64 px)
    assert resident["frozen_parameters"] > 5_000_000
    assert resident["parameters_bytes"] - row["parameters_bytes"] >= 4 * resident["frozen_parameters"]
    assert resident["activations_bytes"] == row["activations_bytes"]


def test_float16_cache_costs_no_more_than_float32():
    half = measured("fpt_tiny")  # float16 is the default, as in the bundle
    single = measured("fpt_tiny", kv_dtype="float32")
    assert half["inputs_bytes"] < single["inputs_bytes"]
    assert half["total_bytes"] < single["total_bytes"]
    assert half["activations_bytes"] <= single["activations_bytes"]  # no upcast copy kept for backward


def test_int8_cache_costs_what_a_float16_cache_costs():
    # an int8 cache is dequantised when an item is read: the step receives float16 keys/values
    half = measured("fpt_tiny")
    quarter = measured("fpt_tiny", kv_dtype="int8", fake=False)
    for key in ("total_bytes", "inputs_bytes", "activations_bytes", "saved_for_backward_bytes"):
        assert quarter[key] == half[key], key


def test_full_fine_tuning_keeps_gradients_and_optimizer_state_of_every_weight():
    full = measured("full")
    linear = measured("linear")
    # AdamW: two moments per learnable float32 weight
    assert full["optimizer_state_bytes"] >= 2 * 4 * full["learnable_parameters"]
    # (at this tiny size the peak is the optimizer step, so compare what backward keeps)
    assert linear["saved_for_backward_bytes"] < full["saved_for_backward_bytes"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="method must be one of"):
        measure_training_memory("bitfit")
    with pytest.raises(ValueError, match="attention must be one of"):
        measure_training_memory("fpt", attention="flash")
    with pytest.raises(ValueError, match="kv_dtype"):
        measure_training_memory("fpt", kv_dtype="uint8")
    with pytest.raises(ValueError, match="fake=False"):
        measure_training_memory("fpt", device="cuda")


# -- volumes ----------------------------------------------------------------------------------------------------------

SMALL_3D = dict(img_size=32, side_img_size=16, patch_size=8, batch_size=2, hidden_size=48, mlp_dim=96,
                num_layers=2, num_heads=4, reduction=4, num_prompts=4)


@pytest.mark.parametrize("attention", ["eager", "fused"])
def test_3d_memory_fake_tensors_count_what_real_tensors_do(attention):
    fake = measure_3d_memory(**SMALL_3D, attention=attention, fake=True)
    real = measure_3d_memory(**SMALL_3D, attention=attention, fake=False)
    assert fake["methods"] == real["methods"]
    methods = fake["methods"]
    for m in methods.values():  # the same categories as for images
        assert m["total_bytes"] == sum(m[f"{c}_bytes"] for c in MEMORY_CATEGORIES)
    full, preloaded, online = (methods[k] for k in ("full_finetuning", "fpt_preloaded", "fpt_online"))
    assert preloaded["learnable_parameters"] == online["learnable_parameters"] < full["learnable_parameters"]
    assert online["frozen_parameters"] > 0 and preloaded["frozen_parameters"] == 0  # the backbone not resident
    assert preloaded["learnable_percent"] == online["learnable_percent"]  # of learnable + the frozen backbone
    assert preloaded["saved_for_backward_bytes"] < full["saved_for_backward_bytes"]
    assert online["saved_for_backward_bytes"] < full["saved_for_backward_bytes"]  # no gradient through the backbone
    assert preloaded["parameters_bytes"] < full["parameters_bytes"]
    assert preloaded["total_bytes"] < online["total_bytes"] < full["total_bytes"]
    assert 0 < fake["fpt_vs_full"]["fpt_preloaded"] < fake["fpt_vs_full"]["fpt_online"] < 1
    assert fake["protocol"]["kv_bytes_per_volume"] == 2 * 2 * 4 * 13 * 12 * 2


def test_3d_memory_optimizer_state_is_adamw_of_what_the_step_updates():
    import torch
    from monai.networks.nets import ViT

    full = measure_3d_memory(**SMALL_3D)["methods"]["full_finetuning"]
    vit = ViT(1, 32, 8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, spatial_dims=3, classification=True,
              num_classes=2, post_activation=None)
    vit(torch.randn(2, 1, 32, 32, 32))[0].sum().backward()
    updated = [p for p in vit.parameters() if p.grad is not None]  # MONAI's unused cross-attention norms get none
    assert len(updated) < len(list(vit.parameters()))
    # AdamW: two float32 moments per updated weight and a float32 step counter per tensor
    assert full["optimizer_state_bytes"] == sum(2 * 4 * p.numel() + 4 for p in updated)


def test_3d_memory_checks_its_arguments():
    with pytest.raises(ValueError, match="multiples of 8"):
        measure_3d_memory(**{**SMALL_3D, "img_size": 36})
    with pytest.raises(ValueError, match="attention must be one of"):
        measure_3d_memory(**SMALL_3D, attention="flash")
