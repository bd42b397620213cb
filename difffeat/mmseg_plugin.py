"""mmsegmentation plugin: ``DiffFeatBackbone``, a frozen diffusion-feature backbone for mmseg.

Registered in ``mmseg.registry.MODELS`` when this module is imported and mmsegmentation
(>= 1.0, with mmengine) is importable; without mmseg, importing it does nothing. In an
mmseg config::

    custom_imports = dict(imports=["difffeat.mmseg_plugin"], allow_failed_imports=False)
    model = dict(
        backbone=dict(type="DiffFeatBackbone", model="sd15",
                      layers=["up.3", "up.2.attn.1", "up.1.attn.1", "up.0.res.1"], timesteps=[1]),
        decode_head=dict(type="FPNHead", in_channels=[320, 640, 1280, 1280], in_index=[0, 1, 2, 3],
                         feature_strides=[8, 16, 32, 64], ...))

The backbone returns the requested maps as a tuple ordered by stride (finest first, the
order mmseg necks and heads expect), undoes mmseg's ``data_preprocessor`` normalisation
(``mean``/``std`` in 0..255 units, mmseg's ImageNet defaults) to get images in [0, 1], and
never trains (the diffusion model stays frozen; use difffeat's own heads to fine-tune nothing
but the head, or mmseg's heads on top of this).
"""
from __future__ import annotations

from typing import Any, Sequence

MMSEG_MEAN = (123.675, 116.28, 103.53)
MMSEG_STD = (58.395, 57.12, 57.375)


def available() -> bool:
    """True when mmsegmentation and mmengine can be imported."""
    try:
        import mmengine  # noqa: F401
        import mmseg  # noqa: F401
    except Exception:  # ImportError, or a broken mmcv build
        return False
    return True


def _build_class() -> Any:
    import torch
    from mmengine.model import BaseModule

    class DiffFeatBackbone(BaseModule):
        """Frozen difffeat extractor as an mmseg backbone (see module docstring)."""

        def __init__(self, model: str = "sd15", layers: Sequence[str] | None = None,
                     timesteps: Sequence[int] | None = None, mean: Sequence[float] = MMSEG_MEAN,
                     std: Sequence[float] = MMSEG_STD, init_cfg: Any = None, **create_kwargs: Any) -> None:
            super().__init__(init_cfg)
            import difffeat

            self.extractor = difffeat.create(model, layers=list(layers) if layers else None,
                                             timesteps=list(timesteps) if timesteps else None, **create_kwargs)
            self.extractor.requires_grad_(False)
            info = sorted(self.extractor.feature_info, key=lambda f: f["stride"])
            self.out_keys = [f["name"] for f in info]
            self.out_channels = [int(f["channels"]) for f in info]
            self.out_strides = [f["stride"] for f in info]
            self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)

        def init_weights(self) -> None:  # pretrained diffusion weights: nothing to initialise
            pass

        def train(self, mode: bool = True) -> "DiffFeatBackbone":
            super().train(mode)
            self.extractor.eval()
            return self

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            images = ((x.float() * self.std + self.mean) / 255.0).clamp(0, 1)
            feats = self.extractor(images)
            return tuple(feats[k].to(x.dtype) for k in self.out_keys)

    return DiffFeatBackbone


def register() -> Any:
    """Register ``DiffFeatBackbone`` in mmseg's MODELS (idempotent); None without mmseg."""
    if not available():
        return None
    from mmseg.registry import MODELS

    existing = MODELS.get("DiffFeatBackbone")
    if existing is not None:
        return existing
    cls = _build_class()
    MODELS.register_module(name="DiffFeatBackbone", module=cls)
    return cls


DiffFeatBackbone = register()
