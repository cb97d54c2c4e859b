"""Data: datalists (folder layout, JSON or label table) and the two-view transforms of FPT, for images and volumes.

Every name a submodule lists in its ``__all__`` is re-exported here (``fpt_monai.data.make_datalist``, ...), the
names the bundle configs reach through ``$import fpt_monai``.
"""

from fpt_monai.data import (
    datalist,
    normalization,
    pipeline,
    readers,
    sample,
    sample3d,
    tables,
    transforms,
    validation,
    volumes,
)
from fpt_monai.data.datalist import *  # noqa: F401,F403
from fpt_monai.data.normalization import *  # noqa: F401,F403
from fpt_monai.data.pipeline import *  # noqa: F401,F403
from fpt_monai.data.readers import *  # noqa: F401,F403
from fpt_monai.data.sample import *  # noqa: F401,F403
from fpt_monai.data.sample3d import *  # noqa: F401,F403
from fpt_monai.data.tables import *  # noqa: F401,F403
from fpt_monai.data.transforms import *  # noqa: F401,F403
from fpt_monai.data.validation import *  # noqa: F401,F403
from fpt_monai.data.volumes import *  # noqa: F401,F403

_SUBMODULES = (datalist, normalization, pipeline, readers, sample, sample3d, tables, transforms, validation, volumes)
__all__ = list(dict.fromkeys(name for module in _SUBMODULES for name in module.__all__))
