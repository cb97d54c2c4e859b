"""The epoch benchmark: the bundle's training epoch against the bare step, on a tiny network."""

import json

import pytest

#: The tiny bundle settings of the tests (ViT-Ti preset at 64 px, 32 px side views), one process.
TINY = {"network_def#img_size": 64, "network_def#side_img_size": 32, "batch_size": 4, "num_workers": 0}


@pytest.mark.parametrize("fill", ["random", "backbone"])
def test_epoch_benchmark_times_both_arms(tmp_path, fill):
    from benchmarks.epoch import epoch_markdown, run_epoch_benchmark

    result = run_epoch_benchmark(["fpt_tiny"], work_dir=tmp_path, num_train=8, image_size=64, repeats=1, fill=fill,
                                 **TINY)
    row = result["presets"]["fpt_tiny"]
    assert (row["images"], row["batch_size"], row["num_workers"], row["side_img_size"]) == (8, 4, 0, [32, 32])
    assert row["preload"]["computed"] == 8 and row["kv_dtype"] == "float16"
    assert row["epoch_images_per_s"] > 0 and row["bare_step_images_per_s"] > 0
    assert row["epoch_to_bare"] == pytest.approx(row["epoch_images_per_s"] / row["bare_step_images_per_s"])
    assert len(row["epoch_seconds"]) == len(row["bare_seconds"]) == 1 and 0 <= row["data_wait_share"] < 1
    assert row["cpu_ms_per_image"]["bare_step"] > 0
    json.dumps(result)
    assert "| fpt_tiny | 4 | 0 | 32x32 |" in epoch_markdown(result)
    if fill == "backbone":
        return
    # a second run reuses the sample data and the cache
    again = run_epoch_benchmark(["fpt_tiny"], work_dir=tmp_path, num_train=8, image_size=64, repeats=1, fill=fill,
                                **TINY)
    assert again["presets"]["fpt_tiny"]["preload"]["computed"] == 0


def test_epoch_benchmark_refuses_what_it_sets_itself(tmp_path):
    from benchmarks.epoch import epoch_throughput

    with pytest.raises(ValueError, match="num_epochs"):
        epoch_throughput("fpt_tiny", tmp_path, tmp_path / "run", num_epochs=3)
    with pytest.raises(ValueError, match="fill"):
        epoch_throughput("fpt_tiny", tmp_path, tmp_path / "run", fill="zeros")
