"""Overrides spelled the way users spell them: ``--pretrained false`` is the bool, ranges are named."""

from __future__ import annotations

import pytest

from fpt_monai.bundle import config_files
from fpt_monai.config_check import ConfigOverrideError, check_overrides
from fpt_monai.presets import create_fpt
from fpt_monai.weights import pretrained_argument

TRAIN = config_files("train")


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("TRUE", True), (" true ", True)])
def test_the_json_spelling_of_a_bool_is_the_bool(text, value):
    assert pretrained_argument(text) is value
    assert pretrained_argument("./false") == "./false" and pretrained_argument(False) is False


def test_create_fpt_given_the_text_false_builds_random_weights_not_a_file_lookup(random_weights_quiet):
    network = create_fpt("fpt_tiny", num_classes=3, pretrained="false", img_size=64, side_img_size=32)
    assert network.shape.img_size == (64, 64)  # built (on main: "false" was looked up as a weights file)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"val_interval": 0}, r"--val_interval: must be at least 1, got 0"),
        ({"image_reader#max_pixels": 0}, r"--image_reader#max_pixels: must be at least 1, got 0"),
        ({"image_reader#max_pixels": "lots"}, r"--image_reader#max_pixels: expects int or NoneType"),
        ({"resume": "false"}, r"--resume: expects bool, got the text 'false': write False"),
    ],
)
def test_bad_values_name_the_key_and_what_it_takes(overrides, message):
    with pytest.raises(ConfigOverrideError, match=message):
        check_overrides(TRAIN, overrides)


def test_good_spellings_pass():
    check_overrides(TRAIN, {"pretrained": "false", "val_interval": 2, "image_reader#max_pixels": None})
    check_overrides(config_files("inference"), {"pretrained": "true", "image_reader#max_pixels": 100_000_000})
