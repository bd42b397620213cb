"""ODISE's sliding-window feature extraction, which SD-DINO and GeoAware-SC use for SD.

Both releases take SD features through ODISE's ``FeatureExtractorBackbone`` with
``slide_training=True`` and ``backbone_in_size=(512, 512)``
(``third_party/ODISE/odise/modeling/backbone/feature_extractor.py``, ``slide_forward``): the
prepared image (960 px) is covered by square crops of ``min(512, short side)`` with stride
equal to the crop, the last crop of each row/column shifted back inside the image
(``y1 = max(y2 - crop, 0)``), i.e. 2 x 2 crops overlapping by 64 px at 960 px. Each crop's
features are written into the full-size map at ``crop offset // stride`` and the overlaps are
averaged (``output_features[k] /= count_mats[k]``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import BadInputError


def window_origins(size: int, crop: int) -> list[int]:
    """Crop starts along one axis, as ODISE's ``slide_forward`` (stride = crop, last one clamped)."""
    n = max(size - crop + crop - 1, 0) // crop + 1
    return [max(min(i * crop + crop, size) - crop, 0) for i in range(n)]


class SlidingWindow(nn.Module):
    """Wrap a :class:`~difffeat.extractor.FeatureExtractor`: features averaged over crops
    (a :class:`difffeat.protocol.Extractor` itself)."""

    def __init__(self, inner: Any, window: int) -> None:
        super().__init__()
        if window < 1:
            raise BadInputError(f"sliding window must be >= 1 px, got {window}")
        self.inner, self.window = inner, int(window)

    # what callers read from an extractor
    @property
    def keys(self) -> list[str]:
        return self.inner.keys

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        return self.inner.feature_info

    @property
    def backbone(self) -> Any:
        return self.inner.backbone

    @property
    def resolution(self) -> int | None:
        return self.inner.resolution

    @property
    def resize(self) -> str:
        return self.inner.resize

    @property
    def layers(self) -> list[str]:
        return self.inner.layers

    @property
    def timesteps(self) -> list[int]:
        return self.inner.timesteps

    @property
    def geometry(self) -> Any:
        """The inner extractor's geometry: the window runs over the image it prepares."""
        return self.inner.geometry

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def per_image(self) -> bool:
        return bool(getattr(self.inner, "per_image", True))

    @property
    def config(self) -> dict[str, Any]:
        """``difffeat.create(**config)`` rebuilds the window around the same inner extractor."""
        return {**self.inner.config, "window": self.window}

    def prepare(self, images: Any) -> torch.Tensor:
        return self.inner.prepare(images)

    def metadata(self) -> dict[str, Any]:
        return {**self.inner.metadata(), "window": self.window}

    @torch.no_grad()
    def forward(self, images: Any, **kw: Any) -> dict[str, torch.Tensor]:
        x = self.inner._as_batch(images)
        H, W = x.shape[-2:]
        crop = min(self.window, H, W)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        for y0 in window_origins(H, crop):
            for x0 in window_origins(W, crop):
                feats = self.inner(x[..., y0:y0 + crop, x0:x0 + crop], **kw)
                for k, f in feats.items():
                    stride = crop // f.shape[-1]
                    if k not in sums:
                        sums[k] = f.new_zeros((*f.shape[:2], H // stride, W // stride))
                        counts[k] = f.new_zeros((1, 1, H // stride, W // stride))
                    ys, xs = y0 // stride, x0 // stride
                    sums[k][..., ys:ys + f.shape[-2], xs:xs + f.shape[-1]] += f
                    counts[k][..., ys:ys + f.shape[-2], xs:xs + f.shape[-1]] += 1
        return {k: sums[k] / counts[k] for k in sums}
