"""Tests for fpt_monai.weights: loading pretrained weights into timm and MONAI ViT backbones."""

from __future__ import annotations

import logging
import warnings

import pytest
import timm
import timm.models._builder as builder
import torch
from monai.networks.nets import ViT
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from fpt_monai.weights import (
    PretrainedWeightsError,
    create_timm_vit,
    hf_vit_to_timm,
    is_hf_vit_layout,
    load_monai_vit_weights,
    load_state_dict_file,
    resample_position_embedding,
)

NAME = "vit_tiny_patch16_224"
SMALL = {"depth": 2}  # vit_tiny with 2 blocks keeps the tests fast


def _timm_vit(img_size: int = 32, num_classes: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**SMALL, **kwargs}
    return timm.create_model(NAME, pretrained=False, img_size=img_size, num_classes=num_classes, **kwargs).eval()


def _save(state_dict: dict, path) -> None:
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    if str(path).endswith(".safetensors"):
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


def _features(model: torch.nn.Module, img_size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        return model.eval().forward_features(x)


# ----------------------------------------------------------------------------------------------------------------
# timm layout
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_timm_checkpoint_same_size_round_trip(tmp_path, caplog, suffix):
    ref = _timm_vit(32)
    path = tmp_path / f"vit{suffix}"
    _save(ref.state_dict(), path)

    with caplog.at_level(logging.INFO, logger="fpt_monai.weights"):
        model = create_timm_vit(NAME, 32, pretrained=path, **SMALL)

    assert model.num_classes == 0
    torch.testing.assert_close(_features(model), _features(ref), rtol=0, atol=0)
    assert any(path.name in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_timm_checkpoint_resampled_to_new_size(tmp_path, suffix):
    ref = _timm_vit(32)
    path = tmp_path / f"vit{suffix}"
    _save(ref.state_dict(), path)

    model = create_timm_vit(NAME, 64, pretrained=str(path), **SMALL)

    assert model.patch_embed.grid_size == (4, 4)
    assert model.pos_embed.shape == (1, 1 + 16, 192)
    expected_pos = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected_pos)
    # the class token's position embedding is not interpolated
    torch.testing.assert_close(model.pos_embed.detach()[:, :1], ref.pos_embed.detach()[:, :1], rtol=0, atol=0)
    ref_sd, new_sd = ref.state_dict(), model.state_dict()
    assert set(ref_sd) == set(new_sd)
    for key in ref_sd:
        if key != "pos_embed":
            torch.testing.assert_close(new_sd[key], ref_sd[key], rtol=0, atol=0, msg=key)
    assert _features(model, 64).shape == (2, 17, 192)


def test_checkpoint_with_classifier_head_loads_into_headless_backbone(tmp_path):
    ref = _timm_vit(32, num_classes=1000)
    assert ref.state_dict()["head.weight"].shape == (1000, 192)
    path = tmp_path / "with_head.pth"
    _save(ref.state_dict(), path)

    model = create_timm_vit(NAME, 32, pretrained=path, **SMALL)

    assert not any(k.startswith("head.") for k in model.state_dict())
    torch.testing.assert_close(_features(model), _features(ref), rtol=0, atol=0)


def test_wrapped_checkpoint_with_module_prefix_is_unwrapped(tmp_path):
    ref = _timm_vit(32)
    path = tmp_path / "ddp.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)

    state_dict = load_state_dict_file(path)
    assert set(state_dict) == set(ref.state_dict())
    model = create_timm_vit(NAME, 32, pretrained=path, **SMALL)
    torch.testing.assert_close(_features(model), _features(ref), rtol=0, atol=0)


@pytest.mark.parametrize(
    "file_name, architecture, reported",
    [
        ("deeper_vit.safetensors", {"depth": 3}, ["blocks.2.", "unexpected"]),  # the keys of the extra block
        ("small_vit.safetensors", {"embed_dim": 96}, ["shape mismatch"]),  # another width
    ],
)
def test_weights_of_another_architecture_name_the_file_and_what_differs(tmp_path, file_name, architecture, reported):
    path = tmp_path / file_name
    _save(_timm_vit(32, **architecture).state_dict(), path)

    with pytest.raises(PretrainedWeightsError, match=file_name) as info:
        create_timm_vit(NAME, 32, pretrained=path, **SMALL)
    for words in reported:
        assert words in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face layout
# ----------------------------------------------------------------------------------------------------------------


def _hf_state_dict(ref: torch.nn.Module, prefix: str = "vit.") -> dict[str, torch.Tensor]:
    """Writes a timm ViT's weights under the Hugging Face transformers ViT key names."""
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    hf = {
        f"{prefix}embeddings.cls_token": sd["cls_token"],
        f"{prefix}embeddings.position_embeddings": sd["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": sd["norm.weight"],
        f"{prefix}layernorm.bias": sd["norm.bias"],
        f"{prefix}pooler.dense.weight": torch.randn(192, 192),
        f"{prefix}pooler.dense.bias": torch.randn(192),
    }
    for i in range(len(ref.blocks)):
        layer = f"{prefix}encoder.layer.{i}."
        b = f"blocks.{i}."
        q_w, k_w, v_w = sd[b + "attn.qkv.weight"].chunk(3, dim=0)
        q_b, k_b, v_b = sd[b + "attn.qkv.bias"].chunk(3, dim=0)
        hf.update(
            {
                layer + "layernorm_before.weight": sd[b + "norm1.weight"],
                layer + "layernorm_before.bias": sd[b + "norm1.bias"],
                layer + "attention.attention.query.weight": q_w,
                layer + "attention.attention.query.bias": q_b,
                layer + "attention.attention.key.weight": k_w,
                layer + "attention.attention.key.bias": k_b,
                layer + "attention.attention.value.weight": v_w,
                layer + "attention.attention.value.bias": v_b,
                layer + "attention.output.dense.weight": sd[b + "attn.proj.weight"],
                layer + "attention.output.dense.bias": sd[b + "attn.proj.bias"],
                layer + "layernorm_after.weight": sd[b + "norm2.weight"],
                layer + "layernorm_after.bias": sd[b + "norm2.bias"],
                layer + "intermediate.dense.weight": sd[b + "mlp.fc1.weight"],
                layer + "intermediate.dense.bias": sd[b + "mlp.fc1.bias"],
                layer + "output.dense.weight": sd[b + "mlp.fc2.weight"],
                layer + "output.dense.bias": sd[b + "mlp.fc2.bias"],
            }
        )
    return hf


@pytest.mark.parametrize(("prefix", "suffix"), [("vit.", ".safetensors"), ("", ".bin")])
def test_hf_layout_checkpoint_loads(tmp_path, prefix, suffix):
    ref = _timm_vit(32)
    hf = _hf_state_dict(ref, prefix)
    assert is_hf_vit_layout(hf)
    assert not is_hf_vit_layout(ref.state_dict())
    path = tmp_path / f"hf_vit{suffix}"
    _save(hf, path)

    model = create_timm_vit(NAME, 32, pretrained=path, **SMALL)

    torch.testing.assert_close(_features(model), _features(ref), rtol=0, atol=0)


def test_hf_vit_to_timm_with_classifier():
    ref = _timm_vit(32, num_classes=10)
    hf = _hf_state_dict(ref)
    hf["classifier.weight"] = ref.state_dict()["head.weight"].clone()
    hf["classifier.bias"] = ref.state_dict()["head.bias"].clone()

    converted = hf_vit_to_timm(hf)

    expected = ref.state_dict()
    assert set(converted) == set(expected)  # pooler dropped, classifier -> head
    for key, value in expected.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0, msg=key)


def test_hf_vit_to_timm_rejects_unknown_keys():
    hf = _hf_state_dict(_timm_vit(32))
    hf["vit.encoder.layer.0.attention.attention.rotary.weight"] = torch.zeros(1)
    hf["decoder.conv.weight"] = torch.zeros(1)
    with pytest.raises(PretrainedWeightsError, match="rotary") as info:
        hf_vit_to_timm(hf)
    assert "decoder.conv.weight" in str(info.value)


def test_hf_vit_to_timm_requires_query_key_value():
    hf = _hf_state_dict(_timm_vit(32))
    del hf["vit.encoder.layer.1.attention.attention.value.bias"]
    with pytest.raises(PretrainedWeightsError, match=r"encoder\.layer\.1\.attention\.attention\.value\.bias"):
        hf_vit_to_timm(hf)


# ----------------------------------------------------------------------------------------------------------------
# File errors
# ----------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "vit.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_timm_vit(NAME, 32, pretrained=path, **SMALL)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(noise.numpy().tobytes())
    with pytest.raises(PretrainedWeightsError, match="corrupt.safetensors"):
        load_state_dict_file(path)
    bad_pth = tmp_path / "truncated.pth"
    bad_pth.write_bytes(b"not a zip file")
    with pytest.raises(PretrainedWeightsError, match="truncated.pth"):
        create_timm_vit(NAME, 32, pretrained=bad_pth, **SMALL)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "vit.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.npz"):
        load_state_dict_file(path)


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return "payload ran"


class _Payload:
    """An arbitrary object whose unpickling would run code."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"weight": torch.zeros(2), "extra": _Payload()}, path)
    _UNPICKLED.clear()
    with pytest.raises(PretrainedWeightsError, match="pickled.pth"):
        load_state_dict_file(path)
    assert not _UNPICKLED


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"weight": torch.zeros(2), "note": "hello"}, path)
    with pytest.raises(PretrainedWeightsError, match="'note'"):
        load_state_dict_file(path)


# ----------------------------------------------------------------------------------------------------------------
# Hub / random weights / model names
# ----------------------------------------------------------------------------------------------------------------


def test_hub_failure_explains_how_to_give_weights(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable (simulated)")

    # timm.models._builder.load_pretrained fetches hub weights with these (imported into _builder's namespace)
    for fn in ("load_state_dict_from_hf", "load_custom_from_hf", "load_state_dict_from_url"):
        monkeypatch.setattr(builder, fn, unreachable)

    with pytest.raises(PretrainedWeightsError) as info:
        create_timm_vit(NAME, 32, pretrained=True, **SMALL)

    message = str(info.value)
    assert NAME in message
    assert "timm/vit_tiny_patch16_224" in message  # the hub repo that was tried
    assert "simulated" in message  # the underlying error
    assert 'pretrained="/path/to/model.safetensors"' in message
    assert "pretrained=False" in message
    assert isinstance(info.value.__cause__, OSError)


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="fpt_monai.weights"):
        with pytest.warns(UserWarning, match="(?i)random"):
            model = create_timm_vit(NAME, 32, pretrained=False, **SMALL)
    assert model.num_classes == 0
    assert model.patch_embed.grid_size == (2, 2)
    assert any("random" in r.getMessage().lower() for r in caplog.records if r.levelno == logging.WARNING)


def test_unknown_model_name_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="vit_tinny_patch16_224"):
        create_timm_vit("vit_tinny_patch16_224", 32, pretrained=False)
    with pytest.raises(ValueError, match="vit_tinny_patch16_224"):
        create_timm_vit("vit_tinny_patch16_224", 32, pretrained=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        create_timm_vit(NAME, 32, pretrained=False, num_classes=5)
    with pytest.raises(ValueError, match="img_size"):
        create_timm_vit(NAME, 0, pretrained=False)
    with pytest.raises(TypeError, match="pretrained"):
        create_timm_vit(NAME, 32, pretrained=1.0)


def test_local_file_needs_no_warning(tmp_path):
    path = tmp_path / "vit.safetensors"
    _save(_timm_vit(32).state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_timm_vit(NAME, 32, pretrained=path, **SMALL)


# ----------------------------------------------------------------------------------------------------------------
# Position embedding resampling
# ----------------------------------------------------------------------------------------------------------------


def test_resample_3d_shape_and_constant():
    pos = torch.full((1, 8, 6), 3.5)
    out = resample_position_embedding(pos, (4, 4, 4))
    assert out.shape == (1, 64, 6)
    torch.testing.assert_close(out, torch.full((1, 64, 6), 3.5))


def test_resample_3d_keeps_axis_order():
    # an embedding that only varies along the first grid axis must still only vary along the first axis
    first_axis = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 2, 2, 5)
    pos = first_axis.reshape(1, 8, 5)
    out = resample_position_embedding(pos, (4, 4, 4), old_grid=(2, 2, 2)).reshape(4, 4, 4, 5)
    torch.testing.assert_close(out, out[:, :1, :1, :].expand_as(out))
    assert torch.all(out[1:, 0, 0, 0] >= out[:-1, 0, 0, 0]) and out[-1, 0, 0, 0] > out[0, 0, 0, 0]


def test_resample_2d_with_prefix_matches_timm():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 4, 8)
    out = resample_position_embedding(pos, (3, 3), num_prefix_tokens=1)
    assert out.shape == (1, 10, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(out, resample_abs_pos_embed(pos, new_size=[3, 3], num_prefix_tokens=1))


def test_resample_non_square_and_errors():
    pos = torch.randn(1, 6, 4)
    out = resample_position_embedding(pos, (4, 6), old_grid=(2, 3))
    torch.testing.assert_close(out, resample_abs_pos_embed(pos, [4, 6], old_size=[2, 3], num_prefix_tokens=0))
    with pytest.raises(ValueError, match="cube"):
        resample_position_embedding(pos, (4, 4, 4))
    with pytest.raises(ValueError, match="old_grid"):
        resample_position_embedding(pos, (4, 4), old_grid=(2, 2))
    assert resample_position_embedding(pos, (2, 3), old_grid=(2, 3)) is pos


# ----------------------------------------------------------------------------------------------------------------
# MONAI ViT
# ----------------------------------------------------------------------------------------------------------------


def _monai_vit(size: int = 32, **kwargs) -> ViT:
    torch.manual_seed(0)
    args = dict(
        in_channels=1,
        img_size=(size,) * 3,
        patch_size=(16, 16, 16),
        hidden_size=32,
        mlp_dim=64,
        num_layers=2,
        num_heads=2,
        classification=False,
    )
    return ViT(**{**args, **kwargs}).eval()


def _monai_out(model: ViT, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(1, 1, size, size, size))[0]


def test_monai_vit_same_size_round_trip(tmp_path):
    ref = _monai_vit(32)
    path = tmp_path / "monai_vit.pt"
    torch.save({"state_dict": ref.state_dict(), "epoch": 10}, path)
    model = _monai_vit(32)
    torch.nn.init.zeros_(model.patch_embedding.position_embeddings)

    load_monai_vit_weights(model, path)

    torch.testing.assert_close(_monai_out(model), _monai_out(ref), rtol=0, atol=0)


def test_monai_vit_position_embeddings_resampled(tmp_path):
    ref = _monai_vit(32)
    path = tmp_path / "monai_vit.safetensors"
    _save(ref.state_dict(), path)
    model = _monai_vit(64)
    assert model.patch_embedding.position_embeddings.shape == (1, 64, 32)

    load_monai_vit_weights(model, path)

    pos = model.patch_embedding.position_embeddings.detach()
    ref_pos = ref.patch_embedding.position_embeddings.detach()
    torch.testing.assert_close(pos, resample_position_embedding(ref_pos, (4, 4, 4), old_grid=(2, 2, 2)))
    # corners of the 4x4x4 grid lie closest to the corners of the 2x2x2 grid, they must come from the right cell
    grid, ref_grid = pos.reshape(4, 4, 4, 32), ref_pos.reshape(2, 2, 2, 32)
    torch.testing.assert_close(grid[0, 0, 0], ref_grid[0, 0, 0])
    torch.testing.assert_close(grid[3, 0, 3], ref_grid[1, 0, 1])
    ref_sd, new_sd = ref.state_dict(), model.state_dict()
    for key in ref_sd:
        if key != "patch_embedding.position_embeddings":
            torch.testing.assert_close(new_sd[key], ref_sd[key], rtol=0, atol=0, msg=key)
    assert _monai_out(model, 64).shape == (1, 64, 32)


def test_monai_vit_classification_checkpoint_into_backbone(tmp_path):
    ref = _monai_vit(32, classification=True, num_classes=3)
    path = tmp_path / "classifier.pth"
    torch.save(ref.state_dict(), path)
    model = _monai_vit(32)

    load_monai_vit_weights(model, path)

    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key], rtol=0, atol=0, msg=key)


def test_monai_vit_mismatch_names_file(tmp_path):
    path = tmp_path / "three_layers.pt"
    torch.save(_monai_vit(32, num_layers=3).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="three_layers.pt") as info:
        load_monai_vit_weights(_monai_vit(32), path)
    assert "blocks.2." in str(info.value)
    # non-strict loading accepts the extra layer
    load_monai_vit_weights(_monai_vit(32), path, strict=False)
