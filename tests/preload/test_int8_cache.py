"""int8 K/V storage: quantisation error, entry size, cache identity, mixed-dtype batches, training from the cache."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from monai.data import list_data_collate
from torch.utils.data import ConcatDataset, DataLoader

from fpt_monai.networks import FPTNet
from fpt_monai.preload import (
    FrozenBackboneKVd,
    MixedDtypeBatchError,
    dequantize_int8,
    dequantize_item,
    dtype_checked_collate,
    int8_scale_shape,
    quantize_int8,
    read_entry,
    scale_key,
    storage_dtype,
    write_entry,
)
from preload_setup import make_backbone, make_dataset, write_images


@pytest.fixture
def data(tmp_path):
    return write_images(tmp_path / "images")


def test_int8_is_a_storage_dtype():
    assert storage_dtype("int8") == storage_dtype(torch.int8) == torch.int8
    with pytest.raises(ValueError, match="int8"):
        storage_dtype("uint8")


def test_round_trip_error_is_at_most_half_a_step_per_value():
    torch.manual_seed(0)
    # tokens of very different magnitudes, as after token selection (a high-norm token next to faint ones)
    kv = torch.randn(3, 2, 4, 7, 16) * torch.logspace(-3, 2, 7).view(1, 1, 1, 7, 1)
    kv[0, 1, :, 2] = 0.0  # a token of zeros (in every head)
    values, scales = quantize_int8(kv)
    assert values.dtype == torch.int8 and scales.dtype == torch.float16
    assert scales.shape == int8_scale_shape(kv.shape) == (3, 2, 1, 7, 1)
    assert int(values.abs().max()) <= 127 and int(values.abs().amax(dim=(-3, -1)).min()) == 0  # the zero token
    restored = dequantize_int8(values, scales)
    assert restored.dtype == torch.float16 and restored.shape == kv.shape
    error = (restored.float() - kv).abs()
    # half a quantisation step, plus the float16 rounding of the scale (at the largest value) and of the result
    bound = scales.float() / 2 + kv.abs() * 2**-10 + 1e-7
    assert bool((error <= bound).all()), float((error - bound).max())
    assert torch.equal(restored[0, 1, :, 2], torch.zeros(4, 16, dtype=torch.float16))
    relative = float((restored.float() - kv).norm() / kv.norm())
    assert relative < 0.01  # 7-bit precision per token


def test_quantisation_refuses_the_wrong_dtypes():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_int8(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="int8"):
        dequantize_int8(torch.zeros(2, 3), torch.ones(1, 1))
    with pytest.raises(KeyError, match=scale_key("kv")):
        dequantize_item({"kv": torch.zeros(2, 3, dtype=torch.int8)})
    float_item = {"kv": torch.zeros(2, 3, dtype=torch.float16), "label": 1}
    assert dequantize_item(float_item) == float_item  # floating storage passes unchanged


@pytest.mark.parametrize("blocks", [12, 6])  # the fpt and fpt_plus presets
def test_vit_b_entry_written_by_the_cache_code_fits_3_8_mb(tmp_path, blocks):
    # ViT-B/16 at 512: 12 heads, 205 kept tokens of 64; the K/V transform's cache form, written by write_entry
    transform = FrozenBackboneKVd("high_res", make_backbone(), dtype="int8")
    kv = torch.randn(blocks, 2, 12, 205, 64) * 3
    image = "/data/messidor2/train/4_proliferative/20051020_57622_0100_PP.png"
    entry = transform.cache_form({"high_res": torch.zeros(3, 64, 64), "image": image, "label": 4}, kv)
    assert set(entry) == {"kv", scale_key("kv"), "image", "label"}
    path = tmp_path / "entry.safetensors"
    write_entry(path, entry, "f" * 64, identity='{"image": {"path": "%s", "size": 912345}, "label": 4}' % image)
    values_bytes = blocks * 2 * 12 * 205 * 64  # one byte each
    scale_bytes = blocks * 2 * 205 * 2  # a float16 scale per block, keys/values and token
    size = os.path.getsize(path)
    assert entry["kv"].nbytes == values_bytes and entry[scale_key("kv")].nbytes == scale_bytes
    assert 0 < size - values_bytes - scale_bytes < 1024  # the header
    if blocks == 12:
        assert values_bytes == 3_778_560 and size <= 3_800_000
    read = dequantize_item(read_entry(path, "f" * 64))
    assert read["kv"].dtype == torch.float16 and set(read) == {"kv", "image", "label"}


def test_int8_and_float16_caches_never_share_entries(data, tmp_path):
    half = make_dataset(data, tmp_path / "cache", dtype="float16")
    half.preload()
    quarter = make_dataset(data, tmp_path / "cache", dtype="int8")
    assert quarter.fingerprint != half.fingerprint and quarter.cache_dir != half.cache_dir
    assert not any(quarter.is_cached(item) for item in data)
    quarter.preload()
    for item in data:  # each cache holds its own dtype
        assert read_entry(half.entry_path(item), half.fingerprint)["kv"].dtype == torch.float16
        assert read_entry(quarter.entry_path(item), quarter.fingerprint)["kv"].dtype == torch.int8
    # an int8 entry put in the float16 cache's place is refused (written for another cache) and recomputed
    victim = half.entry_path(data[0])
    shutil.copyfile(quarter.entry_path(data[0]), victim)
    with pytest.warns(UserWarning, match="written for another cache"):
        item = half[0]
    assert item["kv"].dtype == torch.float16 and half.corrupt_entries == [victim]
    assert read_entry(victim, half.fingerprint)["kv"].dtype == torch.float16  # rewritten in its own dtype


def test_int8_items_read_as_float16_the_same_whether_computed_read_or_uncached(data, tmp_path):
    dataset = make_dataset(data, tmp_path / "lazy", dtype="int8", augment=False)
    computed = dataset[0]  # computed, written, returned
    read = dataset[0]  # read back from the entry
    assert computed["kv"].dtype == read["kv"].dtype == torch.float16
    assert computed["kv"].shape == dataset.kv_transform.backbone.shape.kv_shape
    assert scale_key("kv") not in computed and scale_key("kv") not in read
    assert torch.equal(computed["kv"], read["kv"])
    # the transform outside a cache gives the dequantised values too
    uncached = dataset.transform(dict(data[0]), end=dataset.kv_index + 1)
    assert uncached["kv"].dtype == torch.float16 and torch.equal(uncached["kv"], read["kv"])
    # batched preloading writes what the lazy path writes (one quantisation step at most apart)
    batched = make_dataset(data, tmp_path / "batched", dtype="int8", augment=False)
    batched.preload(batch_size=4)
    entry = read_entry(batched.entry_path(data[0]), batched.fingerprint)
    assert entry["kv"].dtype == torch.int8 and entry[scale_key("kv")].dtype == torch.float16
    step = entry[scale_key("kv")].float().max()
    assert float((batched[0]["kv"].float() - read["kv"].float()).abs().max()) <= 1.01 * float(step)


def test_training_from_an_int8_cache_matches_the_float32_cache(data, tmp_path):
    """End to end: preload, read, collate, train a tiny FPT; logits and gradients stay close to float32's."""
    results = {}
    for dtype in ("float32", "int8"):
        dataset = make_dataset(data, tmp_path / dtype, dtype=dtype, augment=False)
        dataset.preload(batch_size=2)
        batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=dtype_checked_collate)))
        assert batch["kv"].dtype == (torch.float16 if dtype == "int8" else torch.float32)
        torch.manual_seed(0)
        net = FPTNet(dataset.kv_transform.backbone.shape, 2, side_img_size=32, num_prompts=4, reduction=4,
                     fusion_dropout=0.0)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
        logits = net.forward_side(batch["image"].float(), batch["kv"])
        torch.nn.functional.cross_entropy(logits, batch["label"]).backward()
        results[dtype] = (logits.detach(), net.fusion.query.weight.grad.clone())
        optimizer.step()
    torch.testing.assert_close(results["int8"][0], results["float32"][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(results["int8"][1], results["float32"][1], atol=2e-2, rtol=5e-2)


def test_a_batch_from_an_int8_cache_is_the_batch_of_a_float16_cache(data, tmp_path):
    """What training holds: the same dtype, shape and bytes as from a float16 cache, half of float32's."""
    batches = {}
    for dtype in ("float16", "int8", "float32"):
        dataset = make_dataset(data, tmp_path / dtype, dtype=dtype)
        batches[dtype] = next(iter(DataLoader(dataset, batch_size=4, collate_fn=dtype_checked_collate)))
    assert set(batches["int8"]) == set(batches["float16"])
    kv8, kv16 = batches["int8"]["kv"], batches["float16"]["kv"]
    assert kv8.dtype == kv16.dtype == torch.float16 and kv8.shape == kv16.shape
    assert kv8.nbytes == kv16.nbytes == batches["float32"]["kv"].nbytes // 2


def test_mixed_dtype_batch_is_an_error_naming_the_dtypes():
    items = [{"kv": torch.zeros(2, 3, dtype=dtype), "label": 0} for dtype in (torch.float16, torch.float32)]
    assert list_data_collate(items)["kv"].dtype == torch.float32  # what plain collation does: a silent upcast
    with pytest.raises(MixedDtypeBatchError, match=r"'kv' in different dtypes: float16 \(item 0\), float32 \(item 1\)"):
        dtype_checked_collate(items)
    same = [{"kv": torch.zeros(2, 3, dtype=torch.float16), "label": i} for i in range(3)]
    collated = dtype_checked_collate(same)
    assert collated["kv"].shape == (3, 2, 3) and collated["kv"].dtype == torch.float16
    with pytest.raises(MixedDtypeBatchError, match="bfloat16.*float16"):
        dtype_checked_collate([(torch.zeros(2, dtype=torch.bfloat16), 0), (torch.zeros(2, dtype=torch.float16), 1)])


def test_items_of_two_caches_of_different_dtypes_do_not_share_a_batch(data, tmp_path):
    half = make_dataset(data[:2], tmp_path / "cache", dtype="float16")
    single = make_dataset(data[2:], tmp_path / "cache", dtype="float32")
    loader = DataLoader(ConcatDataset([half, single]), batch_size=4, collate_fn=dtype_checked_collate)
    with pytest.raises(MixedDtypeBatchError, match=r"float16 \(items 0, 1\), float32 \(items 2, 3\)"):
        next(iter(loader))


def test_the_bundle_data_loaders_check_dtypes():
    import json

    configs = Path(__file__).resolve().parents[2] / "bundles" / "fpt_classification" / "configs"
    train = json.loads((configs / "train.json").read_text())
    evaluate = json.loads((configs / "evaluate.json").read_text())
    for loader in (train["train"]["dataloader"], train["validate"]["dataloader"], evaluate["test"]["dataloader"]):
        assert loader["collate_fn"] == "$fpt_monai.preload.dtype_checked_collate"
