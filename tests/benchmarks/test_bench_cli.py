"""``python -m benchmarks``: commands, help, the cache-dtype and 3D memory commands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


def run_benchmarks(*args, cwd=REPOSITORY):
    path = os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PAGER": "cat", "PYTHONPATH": path}  # benchmarks/ is not installed
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def test_help_lists_every_benchmark():
    result = run_benchmarks("--help")
    assert result.returncode == 0, result.stderr
    listed = result.stdout + result.stderr
    for command in ("bench", "memory", "memory3d", "speed", "epoch", "accuracy", "accuracy_merge", "cache_dtype",
                    "file_digest", "onnx", "gpu_step", "fl_bytes", "fl_accuracy"):
        assert f"\n     {command}\n" in listed, command


@pytest.mark.parametrize("command,argument", [("accuracy", "num_epochs"), ("bench", "output_dir"), ("epoch", "num_train")])
def test_help_documents_the_command_and_runs_nothing(command, argument, tmp_path):
    # accuracy takes **overrides: a plain --help must not become an override that starts a run
    result = run_benchmarks(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert argument in result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    assert list(tmp_path.iterdir()) == []  # no sample data, run folder or result made


def test_cache_dtype_reports_every_dtype():
    result = run_benchmarks("cache_dtype", "--train_size", "32", "--test_size", "16", "--epochs", "1", "--seeds", "2",
                            "--pretrained_features", "False")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["inference"]) == set(report["training"]) == {"float32", "float16", "bfloat16", "int8"}
    assert report["inference"]["float32"]["max_abs_logit_diff"] == 0.0
    assert 0.0 < report["inference"]["float16"]["max_abs_logit_diff"] < 0.05
    assert 0.0 < report["inference"]["int8"]["max_abs_logit_diff"] < 0.5
    stored = report["int8_granularity"]["per token (stored)"]
    assert stored["fits_3_8_MB"] and stored["fpt_scale_bytes"] == 9840
    assert stored["max_abs_logit_diff"] == report["inference"]["int8"]["max_abs_logit_diff"]
    assert not report["int8_granularity"]["per channel and head"]["fits_3_8_MB"]


def test_memory3d_command_prints_json_and_table(capsys):
    from benchmarks.cli import Commands

    Commands().memory3d(img_size=32, side_img_size=16, patch_size=8, batch_size=2, hidden_size=48, mlp_dim=96,
                        num_layers=2, num_heads=4, reduction=4, variant="fpt_plus", table=True)
    out = capsys.readouterr().out
    assert "| fpt_preloaded |" in out and "| temporaries |" in out
    report = json.loads(out[: out.index("\n| method")])
    assert report["protocol"]["extracted_blocks"] == [1]  # fpt_plus: the second half of the 2 blocks
    assert 0 < report["fpt_vs_full"]["fpt_preloaded"] < report["fpt_vs_full"]["fpt_online"] < 1


def test_speed_command_refuses_an_unknown_section():
    from benchmarks.cli import Commands

    with pytest.raises(ValueError, match="sections must be"):
        Commands().speed(sections="training,warmup")


def test_file_digest_benchmark_hashes_distinct_files_of_a_realistic_size(tmp_path):
    from benchmarks.file_digest import run, write_images

    paths = write_images(tmp_path / "images", 4, bases=2)
    assert len({open(p, "rb").read() for p in paths}) == 4  # each file its own bytes
    report = run(num_files=4, work_dir=str(tmp_path / "run"), bases=2)
    assert report["files"] == 4 and 250 < report["mean_kb"] < 500
    assert report["one_thread_seconds"] >= 0 and report["known_digests_seconds"] >= 0 and report["megabytes"] > 1
