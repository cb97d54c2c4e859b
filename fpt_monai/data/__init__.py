"""Data: datalists (folder layout or JSON) and the two-view transforms of FPT, for images and volumes."""

from fpt_monai.data.datalist import (
    IMAGE_SUFFIXES,
    check_class_names,
    dataset_classes,
    folder_classes,
    folder_datalist,
    image_datalist,
    json_datalist,
    make_datalist,
)
from fpt_monai.data.pipeline import fpt_transforms, image_transforms, inference_transforms, make_fpt_dataset
from fpt_monai.data.readers import (
    DICOM_WINDOWS,
    ImageReadError,
    LoadImageRGBd,
    RGBImageReader,
    image_format,
    image_size,
    is_dicom_file,
    read_image,
)
from fpt_monai.data.sample import SAMPLE_CLASSES, SampleFundusSpec, make_sample_dataset
from fpt_monai.data.sample3d import SAMPLE_3D_CLASSES, SampleVolumeSpec, make_sample_dataset_3d
from fpt_monai.data.transforms import SideSourced, SideViewd, load_and_normalize
from fpt_monai.data.validation import BAD_ITEM_POLICIES, DatalistError, readable_datalist, validate_datalist
from fpt_monai.data.volumes import (
    VOLUME_SUFFIXES,
    CheckVolumed,
    fpt_transforms_3d,
    inference_transforms_3d,
    is_dicom_series,
    load_volume,
    make_volume_datalist,
    volume_datalist,
    volume_image_datalist,
)

__all__ = [
    "BAD_ITEM_POLICIES",
    "DICOM_WINDOWS",
    "DatalistError",
    "ImageReadError",
    "LoadImageRGBd",
    "RGBImageReader",
    "image_format",
    "image_size",
    "is_dicom_file",
    "read_image",
    "readable_datalist",
    "validate_datalist",
    "IMAGE_SUFFIXES",
    "SAMPLE_CLASSES",
    "SampleFundusSpec",
    "make_sample_dataset",
    "SideSourced",
    "SideViewd",
    "check_class_names",
    "dataset_classes",
    "image_datalist",
    "image_transforms",
    "inference_transforms",
    "folder_classes",
    "fpt_transforms",
    "make_fpt_dataset",
    "folder_datalist",
    "json_datalist",
    "load_and_normalize",
    "make_datalist",
    "SAMPLE_3D_CLASSES",
    "SampleVolumeSpec",
    "make_sample_dataset_3d",
    "VOLUME_SUFFIXES",
    "CheckVolumed",
    "fpt_transforms_3d",
    "inference_transforms_3d",
    "is_dicom_series",
    "load_volume",
    "make_volume_datalist",
    "volume_datalist",
    "volume_image_datalist",
]
