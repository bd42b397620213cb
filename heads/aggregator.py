"""Multi-layer, multi-timestep feature aggregation after Diffusion Hyperfeatures.

Luo et al., "Diffusion Hyperfeatures: Searching Through Time and Space for Semantic
Correspondence", NeurIPS 2023. Their aggregation network projects every (layer, timestep)
feature map with a ResNet bottleneck to a common width (384 channels in the paper, one
bottleneck per layer shared across timesteps), resamples all maps to one resolution
(64x64 for SD at 512 px, i.e. stride 8) and sums them with learned mixing weights
(softmax over all layers x timesteps, initialised uniform). On SPair-71k keypoint
matching this beat hand-picked single-layer features (DIFT, SD-DINO-style baselines).

Here the same network is backbone-agnostic: ``feature_info`` entries that carry a
``layer`` key share one projection across their timesteps (``t``); others get their own.
One deliberate difference: each map is projected at its native resolution and then
bilinearly upsampled (the paper upsamples first), which is several times cheaper for
the stride-32/64 maps and changes only the receptive field of the 3x3 conv.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .blocks import Bottleneck, FeatureInfo, check_feature_info, grid_at_stride, levels_by_stride, resize, take


class HyperfeatureAggregator(nn.Module):
    """Fuse many feature maps into one ``[B, width, h, w]`` map at ``stride``.

    Args:
        feature_info: the backbone's feature description (name, channels, stride[, layer, t]).
        width: common projection width (384 in Diffusion Hyperfeatures).
        stride: output stride; defaults to the finest stride among the inputs.
        projection: ``"bottleneck"`` (the paper) or ``"linear"`` (a 1x1 conv, cheaper).
        share_timesteps: share one projection per layer across its timesteps (the paper).
    """

    out_name = "hyperfeatures"

    def __init__(
        self,
        feature_info: FeatureInfo,
        width: int = 384,
        stride: float | None = None,
        projection: str = "bottleneck",
        share_timesteps: bool = True,
    ) -> None:
        super().__init__()
        info = check_feature_info(feature_info)
        if projection not in ("bottleneck", "linear"):
            raise ValueError(f"projection must be 'bottleneck' or 'linear', got {projection!r}")
        self.levels = levels_by_stride(info)
        self.names = [str(f["name"]) for f in info]
        self.stride = float(stride) if stride is not None else self.levels[0].stride
        self.width = int(width)
        # one projection per layer (shared over timesteps) or per feature
        self.proj_key = [
            str(f["layer"]) if share_timesteps and "layer" in f else str(f["name"]) for f in info
        ]
        self.proj = nn.ModuleDict()
        for f, key in zip(info, self.proj_key):
            if key in self.proj:
                continue
            cin = int(f["channels"])
            self.proj[_safe(key)] = (
                Bottleneck(cin, self.width) if projection == "bottleneck" else nn.Conv2d(cin, self.width, 1)
            )
        self.mixing_logits = nn.Parameter(torch.zeros(len(info)))

    @property
    def out_feature_info(self) -> list[dict]:
        """Feature description of this module's output, for the head stacked on top."""
        return [{"name": self.out_name, "channels": self.width, "stride": self.stride}]

    def mixing_weights(self) -> dict[str, float]:
        """The learned softmax weight of each input feature (what the paper visualises)."""
        w = torch.softmax(self.mixing_logits.detach().float(), 0).tolist()
        return dict(zip(self.names, w))

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        size = grid_at_stride(feats, self.levels, self.stride)
        weights = torch.softmax(self.mixing_logits, 0)
        out = None
        for i, (name, x) in enumerate(zip(self.names, take(feats, self.names))):
            y = resize(self.proj[_safe(self.proj_key[i])](x), size) * weights[i]
            out = y if out is None else out + y
        return out


def _safe(key: str) -> str:
    """ModuleDict keys may not contain dots."""
    return key.replace(".", "_")
