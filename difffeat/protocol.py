"""The one extractor contract every ``difffeat.create`` result honours.

:class:`~difffeat.extractor.FeatureExtractor` (UNet/DiT/SD3/PixArt),
:class:`~difffeat.dino.DinoExtractor` and :class:`~difffeat.fusion.FusedExtractor` all
implement it, so tasks never probe what came back:

* ``keys`` — output names; ``feature_info`` — one dict per key (name, layer, t, channels, stride);
* ``geometry`` — resolution, resize policy and size multiple (:class:`~difffeat.geometry.Geometry`);
* ``prepare(pil_images)`` — a batch [B,3,H,W] in [0,1] prepared with that geometry;
* ``device`` — where outputs live; ``metadata()`` — what to write next to saved features;
* ``config`` — plain keyword arguments: ``difffeat.create(**ex.config)`` rebuilds an
  extractor that gives the same features (the idea of diffusers' ``ConfigMixin``);
* ``ex(images, **kw)`` — ``{key: Tensor[B, C, h, w]}``;
* ``per_image`` — whether an image's features are independent of the other images of the
  call (False for co-PCA fusion, which fits its PCA on the call: run it on pairs).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image

from .geometry import Geometry


@runtime_checkable
class Extractor(Protocol):
    """What every extractor offers (checked with ``isinstance(ex, Extractor)``)."""

    @property
    def keys(self) -> list[str]: ...

    @property
    def feature_info(self) -> list[dict[str, Any]]: ...

    @property
    def geometry(self) -> Geometry: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def config(self) -> dict[str, Any]: ...

    @property
    def per_image(self) -> bool: ...

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def metadata(self) -> dict[str, Any]: ...

    def __call__(self, images: Any, **kwargs: Any) -> dict[str, torch.Tensor]: ...


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the names ``create(dtype=...)`` accepts)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def portable_name(name: str) -> str:
    """A model name as a config records it: local folders as absolute paths."""
    import os

    return os.path.abspath(name) if os.path.isdir(name) else name


__all__ = ["Extractor", "Geometry", "dtype_name", "portable_name"]
