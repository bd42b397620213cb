"""HED-style edge head: one side output per scale plus a learned fusion.

Xie & Tu, "Holistically-Nested Edge Detection", ICCV 2015. Each VGG stage gets a 1x1
conv to one channel (a side output), upsampled to image size; a 1x1 conv over the
concatenated side outputs (initialised to equal weights, 0.2 for five sides) gives the
fused map. Every side output and the fused map are supervised with class-balanced BCE
(:func:`difffeat.heads.losses.hed_loss`). HED reports ODS 0.782 / OIS 0.804 /
AP 0.833 on BSDS500.

Here a "stage" is a stride level of the backbone's features (equal strides concatenated).
``hidden > 0`` inserts a conv3x3-GN-ReLU before each side classifier, which helps with
frozen diffusion features that are not trained to be linearly edge-separable.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .blocks import FeatureInfo, concat_level, conv_gn_relu, grid_at_stride, levels_by_stride, resize


class HEDHead(nn.Module):
    """Edge logits ``[B, 1, H, W]`` (apply ``sigmoid`` for probabilities).

    Args:
        feature_info: the backbone's feature description.
        hidden: width of an optional conv before each side classifier (0: pure HED 1x1).
    """

    def __init__(self, feature_info: FeatureInfo, hidden: int = 0) -> None:
        super().__init__()
        self.levels = levels_by_stride(feature_info)
        self.sides = nn.ModuleList(
            nn.Sequential(conv_gn_relu(lv.channels, hidden), nn.Conv2d(hidden, 1, 1))
            if hidden > 0 else nn.Conv2d(lv.channels, 1, 1)
            for lv in self.levels
        )
        n = len(self.levels)
        self.fuse = nn.Conv2d(n, 1, 1)
        nn.init.constant_(self.fuse.weight, 1.0 / n)
        nn.init.zeros_(self.fuse.bias)

    def forward(
        self,
        feats: Mapping[str, torch.Tensor],
        out_size: tuple[int, int] | None = None,
        return_sides: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Fused logits at ``out_size`` (default: the finest feature grid).

        With ``return_sides=True`` also returns the per-scale side logits (for deep
        supervision), each at ``out_size``.
        """
        size = out_size or grid_at_stride(feats, self.levels, self.levels[0].stride)
        sides = [resize(side(concat_level(feats, lv)), size) for side, lv in zip(self.sides, self.levels)]
        fused = self.fuse(torch.cat(sides, dim=1))
        return (fused, sides) if return_sides else fused
