"""Data: datalists (folder layout or JSON) and the two-view transforms of FPT."""

from fpt_monai.data.datalist import (
    IMAGE_SUFFIXES,
    dataset_classes,
    folder_classes,
    folder_datalist,
    image_datalist,
    json_datalist,
    make_datalist,
)
from fpt_monai.data.pipeline import fpt_transforms, inference_transforms, make_fpt_dataset
from fpt_monai.data.sample import SAMPLE_CLASSES, SampleFundusSpec, make_sample_dataset
from fpt_monai.data.transforms import ScaleToUnitd, SideViewd, ToRGBd, load_and_normalize

__all__ = [
    "IMAGE_SUFFIXES",
    "SAMPLE_CLASSES",
    "SampleFundusSpec",
    "make_sample_dataset",
    "ScaleToUnitd",
    "SideViewd",
    "ToRGBd",
    "dataset_classes",
    "image_datalist",
    "inference_transforms",
    "folder_classes",
    "fpt_transforms",
    "make_fpt_dataset",
    "folder_datalist",
    "json_datalist",
    "load_and_normalize",
    "make_datalist",
]
