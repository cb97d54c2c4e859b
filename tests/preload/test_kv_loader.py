"""KVCacheLoader (keys/values read by the training process) and the reads that skip a verified entry's checksum."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from monai.data import DataLoader

import fpt_monai.preload.dataset as dataset_module
from fpt_monai.preload import KVCacheLoader, KVReference, default_num_workers, read_kv_into, write_entry
from preload_setup import make_dataset, write_images


@pytest.fixture
def data(tmp_path):
    return write_images(tmp_path / "images", names=[f"{c}/{i:04d}.png" for c in "ab" for i in range(3)])


@pytest.fixture
def dataset(data, tmp_path):
    dataset = make_dataset(data, tmp_path / "cache")  # with a random flip after the K/V transform
    dataset.preload(batch_size=4)
    return dataset


def batches(loader):
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()} for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_batches_are_those_of_monais_dataloader(dataset, num_workers):
    """Same sampler, same worker seeds, same augmentation: the same batches, keys/values included."""
    kwargs = {"batch_size": 4, "shuffle": True, "num_workers": num_workers}
    torch.manual_seed(0)
    expected = batches(DataLoader(dataset, generator=torch.Generator().manual_seed(1), **kwargs))
    torch.manual_seed(0)
    got = batches(KVCacheLoader(dataset, generator=torch.Generator().manual_seed(1), **kwargs))
    assert len(got) == len(expected) == 2 and [len(b["label"]) for b in got] == [4, 2]
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and torch.equal(a["label"], b["label"])
        assert type(a["kv"]) is torch.Tensor and a["kv"].dtype == torch.float16
        torch.testing.assert_close(a["kv"], b["kv"], atol=0, rtol=0)
        torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)


def test_without_workers_entries_are_read_ahead_in_a_thread_with_the_same_batches(dataset, data, monkeypatch):
    """Entries and keys/values are read by a thread, one batch ahead; the random transforms still draw as in
    MONAI's DataLoader, so the batches are the same."""
    import fpt_monai.preload.loader as loader_module

    threads = []

    def recording(*args):
        threads.append(threading.current_thread().name)
        return read_kv_into(*args)

    monkeypatch.setattr(loader_module, "read_kv_into", recording)
    kwargs = {"batch_size": 4, "shuffle": True}
    for _ in range(2):  # the second time the entries are known (verified) in this process
        torch.manual_seed(0)
        expected = batches(DataLoader(dataset, generator=torch.Generator().manual_seed(1), **kwargs))
        threads.clear()
        torch.manual_seed(0)
        got = batches(KVCacheLoader(dataset, generator=torch.Generator().manual_seed(1), **kwargs))
        assert len(got) == len(expected) == 2
        for a, b in zip(got, expected):
            torch.testing.assert_close(a["kv"], b["kv"], atol=0, rtol=0)
            torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)
        assert len(threads) == len(data) and all(name.startswith("fpt-kv-reader") for name in threads)
    path = dataset.entry_path(data[0])
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))  # altered: found, recomputed
    with pytest.warns(UserWarning, match=path.name):
        got = batches(KVCacheLoader(dataset, batch_size=len(data)))
    torch.testing.assert_close(got[0]["kv"], torch.stack([dataset[i]["kv"] for i in range(len(data))]), atol=0, rtol=0)


def test_keys_values_held_by_the_caller_are_never_overwritten(dataset, data):
    loader = KVCacheLoader(dataset, batch_size=2, shuffle=False)
    held = [batch["kv"] for _ in range(2) for batch in loader]  # two epochs, every batch kept
    expected = [dataset[i]["kv"] for i in range(len(data))] * 2
    torch.testing.assert_close(torch.cat(held), torch.stack(expected), atol=0, rtol=0)
    pointers = [batch["kv"].data_ptr() for _ in range(2) for batch in loader]  # each batch released at once
    assert len(set(pointers)) < len(pointers)  # released batches give their memory to the next ones


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_int8_cache_is_read_as_float16_keys_values(data, tmp_path, num_workers):
    dataset = make_dataset(data, tmp_path / "cache", dtype="int8", augment=False)
    dataset.preload(batch_size=4)
    batch = next(iter(KVCacheLoader(dataset, batch_size=len(data), num_workers=num_workers)))
    assert batch["kv"].dtype == torch.float16 and "kv_int8_scale" not in batch
    torch.testing.assert_close(batch["kv"], torch.stack([dataset[i]["kv"] for i in range(len(data))]), atol=0, rtol=0)


def test_workers_send_references_and_the_loader_reads_them(dataset, data):
    item = dataset.kv_reference(1)
    reference = item["kv"]
    assert isinstance(reference, KVReference) and reference.index == 1
    assert reference.path == str(dataset.entry_path(data[1]))
    out = torch.empty(dataset.kv_transform.backbone.shape.kv_shape, dtype=torch.float16)
    assert read_kv_into(reference, "kv", out)
    torch.testing.assert_close(out, dataset[1]["kv"], atol=0, rtol=0)
    assert not read_kv_into(reference, "kv", torch.empty(3, dtype=torch.float16))  # another layout
    assert not read_kv_into(reference, "nothing", out)


def test_an_entry_replaced_after_the_worker_read_it_is_read_again_verified(dataset, data):
    loader = KVCacheLoader(dataset, batch_size=len(data), shuffle=False)
    reference = dataset.kv_reference(0)["kv"]
    path = dataset.entry_path(data[0])
    entry = dataset_module.read_entry(path, dataset.fingerprint)
    write_entry(path, entry, dataset.fingerprint, dataset_module.item_identity(data[0]))  # a new file (inode)
    assert not read_kv_into(reference, "kv", torch.empty_like(entry["kv"]))
    batch = {"kv": [reference, *[dataset.kv_reference(i)["kv"] for i in range(1, len(data))]]}
    torch.testing.assert_close(loader._read_kv(batch)["kv"][0], entry["kv"], atol=0, rtol=0)


def test_an_entry_computed_in_a_worker_travels_as_its_keys_values(data, tmp_path):
    dataset = make_dataset(data, tmp_path / "cache")  # nothing preloaded: reading computes the entries
    item = dataset.kv_reference(0)
    assert isinstance(item["kv"], torch.Tensor)
    batch = next(iter(KVCacheLoader(dataset, batch_size=len(data))))
    torch.testing.assert_close(batch["kv"][0], item["kv"], atol=0, rtol=0)


def test_any_other_dataset_is_loaded_as_by_monais_dataloader():
    data = [{"x": torch.full((2,), float(i))} for i in range(5)]
    got = list(KVCacheLoader(data, batch_size=2))
    assert [b["x"].tolist() for b in got] == [b["x"].tolist() for b in DataLoader(data, batch_size=2)]


def test_a_verified_entry_is_read_without_its_checksum_until_its_file_changes(dataset, data, monkeypatch):
    hashed = []
    checksum = dataset_module._entry_checksum
    monkeypatch.setattr(dataset_module, "_entry_checksum", lambda *a: hashed.append(1) or checksum(*a))
    dataset[0]
    assert hashed  # written just now: a change within the file clock's resolution would go unseen
    monkeypatch.setattr(dataset_module, "_RECENT_NS", -10**12)  # as if the entries had been written long ago
    dataset._verified.clear()
    dataset.preload()  # verifies what it finds
    hashed.clear()
    for _ in range(2):
        dataset[0]
        dataset.kv_reference(1)
    assert hashed == []
    path = dataset.entry_path(data[0])
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw) + b" ")  # another size: verified again, found corrupt, recomputed
    with pytest.warns(UserWarning, match=path.name):
        dataset[0]
    assert hashed and dataset.corrupt_entries == [path]


def test_preload_reports_and_recomputes_a_corrupt_entry(dataset, data):
    path = dataset.entry_path(data[2])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match=path.name):
        report = dataset.preload()
    assert (report["already_cached"], report["computed"]) == (len(data) - 1, 1)
    assert dataset.corrupt_entries == [path]


def test_default_workers_leave_the_cpus_to_the_step(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, on_cpu, on_gpu in [(1, 0, 0), (2, 0, 1), (3, 0, 1), (4, 1, 2), (8, 2, 4), (64, 4, 4)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert default_num_workers() == default_num_workers("cpu") == on_cpu
        assert default_num_workers(torch.device("cuda:0")) == on_gpu
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four training processes on these 64 CPUs
    assert default_num_workers("cuda:1", max_workers=16) == 8
