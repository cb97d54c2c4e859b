"""Errors of checkpoints, training and overrides name the file or key and say what to do."""

from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.engines import SupervisedTrainer

import fpt_monai.utils as utils_module
from conftest import make_tiny_timm_vit
from fpt_monai.bundle import config_files, run_demo
from fpt_monai.config_check import ConfigOverrideError, check_overrides
from fpt_monai.engine import (
    CheckpointReadError,
    NonFiniteLossError,
    NonFiniteLossGuard,
    SafeCheckpointLoader,
    SafeCheckpointSaver,
    attach_resume,
    load_checkpoint,
)
from fpt_monai.networks import FPTNet, TimmViTBackbone
from fpt_monai.networks.fpt import BACKBONE_REFERENCE_KEY


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fpt_monai_pwned",))


class DiskFullFile:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return self.f.__exit__(*args)

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_inside_torch_save_names_the_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(64, 64)
    saver = SafeCheckpointSaver(str(tmp_path), {"model": model}, save_final=True, final_filename="model_final.pt")
    real_open = open
    monkeypatch.setattr(utils_module, "open", lambda *a, **k: DiskFullFile(real_open(*a, **k), room=100),
                        raising=False)
    # torch's zip writer turns the OSError into "[enforce fail at inline_container.cc] ... unexpected pos"
    with pytest.raises(OSError, match=r"could not write checkpoint .*model_final.pt: .*inline_container.* \(is the "
                                      r"disk full\?\); no checkpoint was written"):
        saver.completed(Engine(lambda e, b: None))
    assert list(tmp_path.iterdir()) == []  # no partial file


def _resume_saver(folder: Path, model: torch.nn.Module) -> SafeCheckpointSaver:
    return SafeCheckpointSaver(str(folder), {"model": model}, file_prefix="resume", save_interval=1, n_saved=1)


def test_truncated_resume_checkpoint_names_the_file_and_says_what_to_do(tmp_path):
    model = torch.nn.Linear(64, 64)
    engine = Engine(lambda e, b: None)
    _resume_saver(tmp_path, model).attach(engine)
    engine.run([0], max_epochs=1)
    path = tmp_path / "resume_model_epoch=1.pt"
    path.write_bytes(path.read_bytes()[:1000])  # e.g. an interrupted copy
    resumed = Engine(lambda e, b: None)
    attach_resume(resumed, _resume_saver(tmp_path, model))
    with pytest.raises(CheckpointReadError, match=rf"resume checkpoint {path} cannot be read \(RuntimeError: "
                                                  r"PytorchStreamReader.*truncated or damaged.*Delete it"):
        resumed.run([0], max_epochs=2)


@pytest.mark.parametrize("content,error,message", [
    ("truncated", CheckpointReadError, r"cannot be read \(RuntimeError: .*the file is truncated or damaged"),
    ("empty", CheckpointReadError, r"cannot be read \(EOFError.*the file is truncated or damaged"),
    ("pickle", pickle.UnpicklingError, r"was refused: it holds pickled objects .*\((?i:.*unsupported.*)\).*re-save"),
])
def test_unreadable_checkpoints_are_named(tmp_path, content, error, message):
    path = tmp_path / "model.pt"
    if content == "truncated":
        torch.save({"weight": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif content == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(pickle.dumps({"weight": _Payload()}))
    with pytest.raises(error, match=rf"checkpoint {path} {message}"):
        load_checkpoint(path)
    assert not Path("/tmp/fpt_monai_pwned").exists()


def _tiny_fpt() -> FPTNet:
    torch.manual_seed(1)
    return FPTNet(TimmViTBackbone(make_tiny_timm_vit(), token_ratio=0.25), num_classes=3, side_img_size=32)


def test_checkpoint_without_backbone_digest_is_refused_unless_allowed(tmp_path):
    trained = _tiny_fpt()
    with torch.no_grad():
        trained.side.head.weight.add_(1.0)
    state = trained.state_dict()
    del state[BACKBONE_REFERENCE_KEY]  # e.g. written by another tool
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=rf"(?s)could not load checkpoint {path}: .*no '{BACKBONE_REFERENCE_KEY}'.*"
                                           r"allow_missing_backbone_digest=True"):
        SafeCheckpointLoader(str(path), {"model": _tiny_fpt()})(Engine(lambda e, b: None))
    with pytest.raises(RuntimeError, match="allow_missing_backbone_digest"):
        _tiny_fpt().load_state_dict(state)
    network = _tiny_fpt()
    SafeCheckpointLoader(str(path), {"model": network}, allow_missing_backbone_digest=True)(Engine(lambda e, b: None))
    torch.testing.assert_close(network.side.head.weight, trained.side.head.weight)
    _tiny_fpt().load_state_dict(trained.state_dict())  # with the digest: loads as before


@pytest.mark.parametrize("lr", [1e39, float("inf")])
def test_overflowing_learning_rate_stops_through_the_non_finite_guard(lr):
    torch.manual_seed(0)
    network = torch.nn.Linear(4, 2)
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    data = [{"image": torch.randn(2, 4), "label": torch.tensor([0, 1])}]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=network,
        optimizer=torch.optim.AdamW(network.parameters(), lr=lr), loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=[NonFiniteLossGuard()],
    )
    with pytest.raises(NonFiniteLossError, match=rf"the learning rate {re.escape(str(lr))} makes the optimizer step "
                                                 r"overflow torch.float32 at epoch 1, iteration 1"):
        trainer.run()
    for name, p in network.named_parameters():  # the step was never taken
        assert torch.equal(p, before[name]), name


class _SqrtLogits(torch.nn.Module):
    """Finite logits whose gradient is not finite: sqrt at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] + torch.sqrt(self.w)


@pytest.mark.parametrize("with_clipping", [False, True])
def test_a_non_finite_gradient_stops_training_with_or_without_clipping(with_clipping):
    from fpt_monai.engine import GradientNormClipping

    network = _SqrtLogits()
    data = [{"image": torch.randn(2, 4), "label": torch.tensor([0, 1])}]
    handlers = [GradientNormClipping(1.0)] if with_clipping else []  # the norm it leaves is not finite
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=[*handlers, NonFiniteLossGuard()],
    )
    with pytest.raises(NonFiniteLossError, match=r"a gradient is (nan|inf) at epoch 1, iteration 1"):
        trainer.run()
    assert torch.equal(network.w.detach(), torch.zeros(2))


@pytest.mark.parametrize("names,overrides,message", [
    (["train"], {"num_epochs": 0}, r"--num_epochs: must be at least 1, got 0"),
    (["train"], {"batch_size": -2}, r"--batch_size: must be at least 1, got -2"),
    (["train"], {"learning_rate": -0.1}, r"--learning_rate: must be a positive finite number, got -0.1"),
    (["train"], {"preset": "fpt_tinny"}, r"--preset: unknown preset 'fpt_tinny' .*did you mean 'fpt_tiny'\?"),
    (["train", "demo"], {"preset": "nonsense"}, r"--preset: unknown preset 'nonsense'"),
    (["train"], {"kv_dtype": "int4"}, r"--kv_dtype: unknown K/V storage dtype 'int4' \(the storage dtypes: "
                                      r"float16, bfloat16, float32, int8\)"),
    (["train"], {"selection_map_images": -1}, r"--selection_map_images: must be at least 0, got -1"),
    (["train"], {"selection_map_images": "4"}, r"--selection_map_images: .*int"),
    (["inference"], {"selection_maps": "yes"}, r"--selection_maps: .*bool"),
    (["train"], {"kernels": "gpu"}, r"--kernels: unknown kernels 'gpu' \(the choices: auto, reference, cpu\)"),
    (["inference"], {"kernels": "fast"}, r"--kernels: unknown kernels 'fast'"),
    (["train", "baseline"], {"kernels": "cpu"}, r"--kernels: has no effect: nothing in these configs refers to @kernels"),
    (["train", "demo", "baseline", "demo_baseline"], {"preset": "fpt_plus"},
     r"--preset: has no effect: nothing in these configs refers to @preset"),
])
def test_override_values_are_checked(names, overrides, message):
    with pytest.raises(ConfigOverrideError, match=message):
        check_overrides(config_files(*names), overrides)


def test_demo_with_zero_epochs_fails_before_creating_anything(tmp_path):
    with pytest.raises(ConfigOverrideError, match="--num_epochs: must be at least 1, got 0"):
        run_demo(tmp_path / "demo", num_epochs=0)
    assert not any((tmp_path / "demo").iterdir())
