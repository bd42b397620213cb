"""Monocular depth decoder in the style of VPD / GLPDepth.

VPD (Zhao et al., ICCV 2023) brings the SD-1.5 UNet's multi-scale maps to stride 32:
finer maps through stride-2 3x3 convs (GN + ReLU between), coarser maps by bilinear
upsampling; concatenates them; a 1x1 conv + GN + ReLU to 1536 channels; then the
deconvolution decoder of Simple Baselines (Xiao et al., ECCV 2018) as in
MIM-Depth-Estimation, inside GLPDepth's training code (Kim et al. 2022): three
stride-2 deconvolutions (kernel 2, 32 channels, BN + ReLU) to stride 4, a 3x3 conv to
192 channels, two 2x bilinear upsamplings to full resolution, and a conv3x3-ReLU-conv3x3
depth layer with ``sigmoid * max_depth``. VPD reports RMSE 0.254, AbsRel 0.069 and
delta1 0.964 on NYUv2 (max depth 10 m), trained with the SiLog loss in :mod:`.losses`.

Generalisation here: the fusion stride defaults to 32 (or the largest input stride
below it, so DINOv2's single stride 14 fuses at 14), the number of deconvolutions is
``round(log2(fuse_stride / 4))``, and the last upsampling goes straight to ``out_size``.
GroupNorm replaces BatchNorm so small batches train stably. ``mode="relative"`` drops the
sigmoid and returns an unconstrained map for scale-and-shift-invariant training.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .blocks import FeatureInfo, concat_level, conv_gn_relu, grid_at_stride, group_norm, levels_by_stride, num_doublings, resize


class DepthHead(nn.Module):
    """Dense depth ``[B, 1, H, W]`` from multi-scale features.

    Args:
        feature_info: the backbone's feature description.
        fuse_stride: stride at which the levels are fused (VPD: 32).
        embed_channels: width after fusion (VPD: 1536).
        deconv_channels: width of the deconvolution stages (VPD: 32).
        out_channels: width of the full-resolution layers (VPD: 192).
        mode: ``"metric"`` (sigmoid * ``max_depth``) or ``"relative"`` (unconstrained).
        max_depth: depth range for metric mode (10 m for NYUv2, 80 m for KITTI).
    """

    def __init__(
        self,
        feature_info: FeatureInfo,
        fuse_stride: float | None = None,
        embed_channels: int = 1536,
        deconv_channels: int = 32,
        out_channels: int = 192,
        mode: str = "metric",
        max_depth: float = 10.0,
    ) -> None:
        super().__init__()
        if mode not in ("metric", "relative"):
            raise ValueError(f"mode must be 'metric' or 'relative', got {mode!r}")
        self.levels = levels_by_stride(feature_info)
        strides = [lv.stride for lv in self.levels]
        if fuse_stride is None:
            below = [s for s in strides if s <= 32]
            fuse_stride = max(below) if below else min(strides)
        self.fuse_stride = float(fuse_stride)
        self.mode, self.max_depth = mode, float(max_depth)

        self.to_fuse = nn.ModuleList()
        for lv in self.levels:
            steps = num_doublings(self.fuse_stride / lv.stride)
            exact = math.isclose(lv.stride * 2**steps, self.fuse_stride)
            layers: list[nn.Module] = []
            for i in range(steps if exact else 0):
                if i:
                    layers += [group_norm(lv.channels), nn.ReLU(inplace=True)]
                layers.append(nn.Conv2d(lv.channels, lv.channels, 3, stride=2, padding=1))
            self.to_fuse.append(nn.Sequential(*layers))  # anything left is bilinear in forward
        self.fuse = conv_gn_relu(sum(lv.channels for lv in self.levels), embed_channels, k=1)

        n_deconv = num_doublings(self.fuse_stride / 4)
        deconv: list[nn.Module] = []
        cin = embed_channels
        for _ in range(n_deconv):
            deconv += [
                nn.ConvTranspose2d(cin, deconv_channels, 2, stride=2, bias=False),
                group_norm(deconv_channels),
                nn.ReLU(inplace=True),
            ]
            cin = deconv_channels
        self.deconv = nn.Sequential(*deconv)
        self.conv = conv_gn_relu(cin, out_channels)
        self.predict = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, 1, 3, padding=1),
        )
        nn.init.normal_(self.predict[-1].weight, std=1e-3)
        nn.init.zeros_(self.predict[-1].bias)

    def forward(self, feats: Mapping[str, torch.Tensor], out_size: tuple[int, int] | None = None) -> torch.Tensor:
        grid = grid_at_stride(feats, self.levels, self.fuse_stride)
        fused = torch.cat(
            [resize(down(concat_level(feats, lv)), grid) for down, lv in zip(self.to_fuse, self.levels)], dim=1
        )
        x = self.conv(self.deconv(self.fuse(fused)))
        if out_size is None:
            out_size = (round(grid[0] * self.fuse_stride), round(grid[1] * self.fuse_stride))
        depth = self.predict(resize(x, out_size))
        if self.mode == "metric":
            return torch.sigmoid(depth) * self.max_depth
        return depth
