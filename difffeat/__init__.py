"""difffeat: discriminative perception with diffusion features.

    >>> import difffeat
    >>> ex = difffeat.create("sd21", layers=["up.1"], timesteps=[261], ensemble=8)
    >>> feats = ex(images)          # {"up.1": Tensor[B, 1280, H/16, W/16]}
    >>> ex.feature_info             # [{"name": "up.1", "channels": 1280, "stride": 16, ...}]
    >>> isinstance(ex, difffeat.Extractor) and difffeat.create(**ex.config)  # the one contract
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import DiffFeatError  # noqa: E402
from .factory import create, load_backbone  # noqa: E402
from .protocol import Extractor  # noqa: E402
from .registry import list_models, list_presets  # noqa: E402

__all__ = ["create", "load_backbone", "Extractor", "list_models", "list_presets", "DiffFeatError", "__version__"]
