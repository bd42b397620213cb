"""DINOv2 / DINOv3 patch features through timm (Oquab et al., "DINOv2", 2023; Siméoni et al.,
"DINOv3", 2025).

``DinoExtractor`` has the same interface as the diffusion extractor: call it on images in
[0, 1] and get ``{"block.i": Tensor[B, C, H/p, W/p]}`` (patch p = 14 for DINOv2, 16 for DINOv3;
timm's ``features_only`` maps hold patch tokens only: CLS and register tokens are dropped). Features are the outputs of
transformer block ``i`` (0-based, before the final norm), patch tokens reshaped to a map,
as SD-DINO's "token" facet of layer 11 for ViT-B/14.

Weights load through timm's pretrained machinery (the HF hub, honouring HF_HUB_OFFLINE and
HF_HOME). A local checkpoint goes in with ``weights=PATH`` (timm's
``pretrained_cfg_overlay=dict(file=PATH)``).
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .backbone import parse_device, parse_dtype
from .errors import BadInputError, WeightsNotFoundError, one_of
from .protocol import dtype_name
from .geometry import Geometry
from .loading import hf_home
from .registry import get_model

PATCH = 14  # DINOv2; DINOv3 ViTs use 16 (read from the timm name: ..._patch16_...)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def patch_of(arch: str) -> int:
    """The ViT patch size in a timm architecture name (``vit_base_patch16_dinov3`` -> 16)."""
    m = re.search(r"patch(\d+)", arch)
    return int(m.group(1)) if m else PATCH


class DinoExtractor(nn.Module):
    """DINOv2 / DINOv3 block outputs as feature maps."""

    def __init__(
        self,
        name: str = "dinov2-b",
        layers: Sequence[str] | str | None = None,
        resolution: int | None = None,
        resize: str = "snap",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        random_weights: bool = False,
        weights: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        preset = get_model(name)
        self.name, self.arch = name, preset.hub_id
        self.layers = [layers] if isinstance(layers, str) else list(layers or preset.layers)
        self.resolution, self.resize = resolution, resize
        self.random_weights, self.model_kwargs = random_weights, dict(model_kwargs)
        self.device_ = parse_device(device)
        self.dtype_ = parse_dtype(dtype, self.device_)
        depth = int(model_kwargs.get("depth", int(preset.layers[0].split(".")[1]) + 1))  # presets default to the last block
        self.patch = patch_of(self.arch)
        valid = [f"block.{i}" for i in range(depth)]
        for layer in self.layers:
            if layer not in valid:
                raise one_of("layer", layer, valid)
        self.indices = [int(layer.split(".")[1]) for layer in self.layers]
        weights = weights or os.environ.get("DIFFFEAT_DINOV2_WEIGHTS")
        self.weights = os.path.abspath(weights) if weights else None
        kw: dict[str, Any] = dict(features_only=True, out_indices=tuple(self.indices), dynamic_img_size=True, **model_kwargs)
        if weights:
            if not os.path.exists(weights):
                raise WeightsNotFoundError(f"DINO weights file not found: {weights}")
            kw["pretrained_cfg_overlay"] = dict(file=weights)
        try:
            self.model = timm.create_model(self.arch, pretrained=not random_weights, **kw)
        except (OSError, RuntimeError, ValueError) as e:
            if random_weights:
                raise
            raise WeightsNotFoundError(
                f"DINO weights for {self.arch!r} are not available ({type(e).__name__}); download "
                f"timm/{self.arch} into HF_HOME={hf_home()} or pass weights=PATH (.safetensors/.pth)"
            ) from None
        self.model.to(self.device_, self.dtype_).eval().requires_grad_(False)
        chans = self.model.feature_info.channels()
        self._info = [{"name": l, "layer": l, "t": None, "channels": int(c), "stride": self.patch}
                      for l, c in zip(self.layers, chans)]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        return list(self._info)

    @property
    def keys(self) -> list[str]:
        return list(self.layers)

    def metadata(self) -> dict[str, Any]:
        from . import __version__

        return {"model": self.name, "source": self.arch, "layers": self.layers, "resolution": self.resolution,
                "dtype": str(self.dtype_).replace("torch.", ""), "difffeat_version": __version__}

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments of :func:`difffeat.create` that rebuild this extractor (same features)."""
        return {"name": self.name, "layers": list(self.layers), "resolution": self.resolution, "resize": self.resize,
                "dtype": dtype_name(self.dtype_), "device": str(self.device_), "random_weights": self.random_weights,
                "weights": self.weights, "model_kwargs": dict(self.model_kwargs)}

    @property
    def device(self) -> torch.device:
        return self.device_

    @property
    def per_image(self) -> bool:
        """Features of an image never depend on the other images of the call."""
        return True

    @property
    def geometry(self) -> Geometry:
        """Resolution and resize policy of PIL inputs; sides snap to the patch (14 or 16 pixels)."""
        return Geometry(self.resolution, self.resize, self.patch)

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.geometry.prepare(images)

    @torch.no_grad()
    def forward(self, images: Any, **_: Any) -> dict[str, torch.Tensor]:
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
            images = self.prepare(images)
        if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
            raise BadInputError("images must be a tensor [B,3,H,W] in [0,1] or PIL images")
        x = images if images.dim() == 4 else images.unsqueeze(0)
        h, w = x.shape[-2:]
        p = self.patch
        if h % p or w % p:  # snap tensors to the patch grid
            size = (max(p, round(h / p) * p), max(p, round(w / p) * p))
            x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        x = ((x.to(self.device_).float() - self.mean) / self.std).to(self.dtype_)
        feats = self.model(x)
        return {layer: f.float() for layer, f in zip(self.layers, feats)}
