"""Crashes lose nothing: SIGKILL mid-epoch and resume, SIGKILL mid-preload, full disks, non-finite losses,
and checkpoints that never unpickle arbitrary objects."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigWorkflow

import fpt_monai.engine.checkpoint as checkpoint_module
from conftest import TEST_WORKFLOW, tiny_bundle_task
from fpt_monai.bundle import bundle_dir, config_files
from fpt_monai.engine import (
    EpochSeeder,
    NonFiniteLossError,
    SafeCheckpointSaver,
    attach_resume,
    epoch_seed,
    latest_checkpoint,
)
from fpt_monai.preload import read_entry
from preload_setup import make_dataset, write_images

TESTS = Path(__file__).resolve().parents[1]  # tests/: conftest.py, preload_setup.py
# ViT-Ti at 64 px, side view 32; 6 training images in batches of 2: 3 iterations per epoch
TINY = {
    "preset": "fpt_tiny",
    "network_def#img_size": 64,
    "network_def#side_img_size": 32,
    "num_epochs": 3,
    "batch_size": 2,
    "num_workers": 0,
    "learning_rate": 0.001,
}


# One intra-op thread, here and in the subprocesses: the tiny networks of these tests run ~10x faster on a
# busy 2-core machine without thread oversubscription, and bit-identical results need equal thread counts.
SINGLE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Sample data, local backbone weights and a shared K/V cache."""
    root = tmp_path_factory.mktemp("resume")
    return root, {**TINY, **tiny_bundle_task(root), "cache_dir": str(root / "cache")}


def training_workflow(bundle_root: Path, overrides: dict) -> ConfigWorkflow:
    """train.json in this process, initialized (not run)."""
    workflow = ConfigWorkflow(
        config_file=config_files("train"), meta_file=config_files("metadata"), run_id="training",
        bundle_root=str(bundle_root), **TEST_WORKFLOW, **overrides,
    )
    workflow.initialize()
    return workflow


def train_in_process(bundle_root: Path, overrides: dict) -> ConfigWorkflow:
    workflow = training_workflow(bundle_root, overrides)
    workflow.run()
    return workflow


def kill_when_marked(process: subprocess.Popen, marker: Path, timeout: float, poll: float) -> None:
    """SIGKILL ``process`` as soon as it creates ``marker`` (it must do so within ``timeout`` seconds, alive).

    The process is killed in any case, its stderr (a pipe: its tail is the message when it ends early) closed.
    """
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"the process never created {marker.name}"
            time.sleep(poll)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{index}")
    else:
        assert a == b, (where, a, b)


# -- SIGKILL in the middle of an epoch, then resume -------------------------------------------------
def test_training_killed_mid_epoch_resumes_to_the_same_final_state(task):
    root, overrides = task
    uninterrupted = train_in_process(root / "uninterrupted", overrides)

    # the same run in a real process, SIGKILLed after iteration 5 (the middle of epoch 2)
    killed_root, marker = root / "killed", root / "killed_mid_epoch_2"
    hook = (f"$[@train#resume_checkpoint.attach(@train#trainer), @train#trainer.add_event_handler("
            f"ignite.engine.Events.ITERATION_COMPLETED(once=5), lambda engine: (open({str(marker)!r}, 'w').close(), "
            f"os.read(os.pipe()[0], 1))), @train#trainer.run()]")  # blocks on an empty pipe until killed
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
               "--bundle_root", str(killed_root), "--training", hook]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    process = subprocess.Popen(command, cwd=bundle_dir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=SINGLE_THREAD_ENV)
    kill_when_marked(process, marker, timeout=400, poll=0.2)  # the marker: the training process reached epoch 2
    models = killed_root / "models"
    assert latest_checkpoint(models) == models / "resume_checkpoint_epoch=1.pt"
    assert not list(models.glob(".*.tmp")) and not (models / "model_final.pt").exists()

    # the same command plus the resume flag
    resumed = train_in_process(killed_root, {**overrides, "resume": True})
    for name in ("model_final.pt", "model.pt", "resume_checkpoint_epoch=3.pt"):
        assert_same_tensors(load(models / name), load(root / "uninterrupted" / "models" / name), name)
    assert not (models / "resume_checkpoint_epoch=1.pt").exists()  # superseded, removed (n_saved=1)
    metrics = [w.parser.get_parsed_content("validate#evaluator").state.metrics for w in (uninterrupted, resumed)]
    assert metrics[0] == metrics[1] and set(metrics[0]) == {"val_auc", "val_accuracy", "val_f1", "val_kappa"}
    trainers = [w.parser.get_parsed_content("train#trainer").state for w in (uninterrupted, resumed)]
    assert (trainers[1].epoch, trainers[1].iteration) == (trainers[0].epoch, trainers[0].iteration) == (3, 9)


def test_epoch_seeder_makes_each_epochs_randomness_depend_on_the_epoch_only():
    seeder = EpochSeeder(7)
    engine = Engine(lambda e, b: None)

    def draws(epoch):
        engine.state.epoch = epoch
        seeder(engine)
        return torch.rand(3), torch.randperm(10)

    first = draws(2)
    draws(5)  # anything in between
    again = draws(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(draws(3)[0], first[0])
    assert epoch_seed(7, 2, rank=0) != epoch_seed(7, 2, rank=1)  # ranks augment differently
    with pytest.raises(TypeError, match="seed must be an integer"):
        EpochSeeder("7")


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, caplog):
    saver = SafeCheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(2, 2)}, file_prefix="resume",
                                save_interval=1, n_saved=1)
    with caplog.at_level("WARNING"):
        assert attach_resume(Engine(lambda e, b: None), saver) is None
    assert "no resume_model_epoch=N.pt in" in caplog.text and "starts from the beginning" in caplog.text
    for name in ("resume_checkpoint_epoch=2.pt", "resume_checkpoint_epoch=10.pt", ".resume_checkpoint_epoch=11.pt.1.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "resume_checkpoint_epoch=10.pt"
    assert latest_checkpoint(tmp_path, name="model") is None


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fpt_monai_pwned",))


def test_checkpoints_are_loaded_without_unpickling_arbitrary_objects(tmp_path):
    model = torch.nn.Linear(2, 2)
    saver = SafeCheckpointSaver(str(tmp_path), {"model": model}, file_prefix="resume", save_interval=1, n_saved=1)
    with open(tmp_path / "resume_model_epoch=1.pt", "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    engine = Engine(lambda e, b: None)
    attach_resume(engine, saver)
    with pytest.raises(pickle.UnpicklingError, match=r"resume checkpoint .*resume_model_epoch=1.pt was refused: it "
                                                     r"holds pickled objects .*\((?i:.*unsupported.*)\)"):
        engine.run([0], max_epochs=2)
    assert not Path("/tmp/fpt_monai_pwned").exists()


# -- full disk -----------------------------------------------------------------------------------------
def test_full_disk_during_checkpointing_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    resume = SafeCheckpointSaver(str(tmp_path), {"model": model}, file_prefix="resume", save_interval=1, n_saved=1)
    final = SafeCheckpointSaver(str(tmp_path), {"model": model}, save_final=True, final_filename="model_final.pt")
    engine = Engine(lambda e, b: torch.nn.init.normal_(model.weight))
    resume.attach(engine)
    engine.run([0], max_epochs=1)
    final.completed(engine)
    saved = {name: load(tmp_path / name) for name in ("resume_model_epoch=1.pt", "model_final.pt")}

    real_save = torch.save

    def disk_full(obj, f, **kwargs):
        real_save(obj, f, **kwargs)
        f.truncate(10)  # half-written...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...when the disk filled up

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*resume_model_epoch=2.pt: No space left on "
                                      r"device; no checkpoint was written"):
        engine.run([0], max_epochs=2)
    with pytest.raises(OSError, match=r"could not write checkpoint .*model_final.pt: No space left on device; the "
                                      r"previous checkpoint of that name is kept"):
        final.completed(engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pt", "resume_model_epoch=1.pt"]
    for name, state in saved.items():  # intact, still loadable: nothing half-written is ever read
        assert_same_tensors(load(tmp_path / name), state, name)


# -- non-finite loss ---------------------------------------------------------------------------------------
class NaNFromCall:
    """Cross-entropy that turns NaN from its n-th call on (like a diverging run)."""

    def __init__(self, first_bad_call: int) -> None:
        self.calls, self.first_bad_call = 0, first_bad_call

    def __call__(self, logits, labels):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if self.calls >= self.first_bad_call else loss


def test_non_finite_loss_stops_training_with_a_clear_message_and_keeps_the_checkpoints(task):
    root, overrides = task
    bundle_root = root / "nan"
    workflow = training_workflow(bundle_root, {**overrides, "loss": NaNFromCall(5)})
    with pytest.raises(RuntimeError) as raised:
        workflow.run()
    error = raised.value
    while error is not None and not isinstance(error, NonFiniteLossError):
        error = error.__cause__
    assert error is not None, raised.value
    message = str(error)
    assert message.startswith("training stopped: the loss is nan at epoch 2, iteration 5 (batch images: ")
    assert ".png" in message and "The weights were not updated with it" in message
    network = workflow.parser.get_parsed_content("network")
    assert all(torch.isfinite(p).all() for p in network.parameters())  # the bad step was never taken
    models = bundle_root / "models"
    assert latest_checkpoint(models) == models / "resume_checkpoint_epoch=1.pt"
    assert not (models / "model_final.pt").exists()  # no "final" model from a run that failed
    for name in ("model.pt", "resume_checkpoint_epoch=1.pt"):
        state = load(models / name)
        state = state.get("model", state)
        assert all(torch.isfinite(t).all() for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point())


# -- SIGKILL while preloading ------------------------------------------------------------------------------
def test_preload_killed_mid_write_resumes_without_recomputing_or_corrupt_entries(tmp_path):
    names = tuple(f"{c}/{i:04d}.png" for i in range(6) for c in "ab")
    data = write_images(tmp_path / "images", names=names)
    cache, marker = tmp_path / "cache", tmp_path / "writing_entry_4"
    worker = textwrap.dedent(
        f"""
        import sys, json, time
        sys.path.insert(0, {str(TESTS)!r})
        import builtins
        import fpt_monai.utils as utils_module
        from preload_setup import make_dataset

        writes = []

        class SlowFile:  # the 4th entry: half of it reaches the disk, then the process is killed
            def __init__(self, f):
                self.f = f
            def __enter__(self):
                return self
            def __exit__(self, *args):
                return self.f.__exit__(*args)
            def write(self, payload):
                if len(writes) == 4:
                    self.f.write(payload[: len(payload) // 2])
                    self.f.flush()
                    open({str(marker)!r}, "w").close()
                    time.sleep(600)
                return self.f.write(payload)

        def slow_open(path, mode="r", *args, **kwargs):
            f = builtins.open(path, mode, *args, **kwargs)
            if "w" in mode and str(path).endswith(".tmp") and ".safetensors." in str(path):  # an entry
                writes.append(path)
                return SlowFile(f)
            return f

        utils_module.open = slow_open  # the module that writes files atomically
        make_dataset(json.loads(sys.argv[1]), {str(cache)!r}, dtype="float32").preload(batch_size=1)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", worker, json.dumps(data)], stderr=subprocess.PIPE, text=True,
                               env=SINGLE_THREAD_ENV)
    kill_when_marked(process, marker, timeout=300, poll=0.1)

    dataset = make_dataset(data, cache, dtype="float32")
    entries = sorted(Path(dataset.cache_dir).glob("*.safetensors"))
    assert len(entries) == 3 and len(list(Path(dataset.cache_dir).glob(".*.tmp"))) == 1  # the cut write, hidden
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in entries}
    for path in entries:
        read_entry(path, dataset.fingerprint)  # every visible entry is complete and verified
    report = dataset.preload(batch_size=4)
    assert (report["already_cached"], report["computed"]) == (3, 9)  # finished entries are not recomputed
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in entries} == before
    for item in data:
        read_entry(dataset.entry_path(item), dataset.fingerprint)
