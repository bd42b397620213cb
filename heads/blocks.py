"""Small building blocks shared by the dense heads.

Every head is built from a backbone's ``feature_info``: a list of dicts with at least
``name`` (the key of the feature in the dict the extractor returns), ``channels`` and
``stride`` (input pixels per feature cell). Heads that work per scale group the entries
by stride: features of one stride (several timesteps of a layer, or several layers of a
DiT) are concatenated along channels into one level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.errors import BadInputError

FeatureInfo = Sequence[Mapping[str, object]]


@dataclass(frozen=True)
class Level:
    """All features of one stride, concatenated in ``names`` order."""

    stride: float
    names: tuple[str, ...]
    channels: int


def check_feature_info(feature_info: FeatureInfo) -> list[dict]:
    """Return ``feature_info`` as plain dicts; raise :class:`BadInputError` if malformed."""
    out = []
    for i, f in enumerate(feature_info):
        missing = [k for k in ("name", "channels", "stride") if k not in f]
        if missing:
            raise BadInputError(f"feature_info[{i}] lacks {', '.join(missing)}: {dict(f)}")
        if str(f.get("kind", "feature")).startswith("attn"):
            raise BadInputError(f"{f['name']} is an attention map; dense heads take feature maps (drop attn.* layers)")
        if f["channels"] is None or int(f["channels"]) <= 0 or float(f["stride"]) <= 0:
            raise BadInputError(f"feature_info[{i}] needs positive channels and stride: {dict(f)}")
        out.append(dict(f))
    if not out:
        raise BadInputError("feature_info is empty: a head needs at least one feature")
    names = [f["name"] for f in out]
    if len(set(names)) != len(names):
        raise BadInputError(f"feature_info has duplicate names: {names}")
    return out


def levels_by_stride(feature_info: FeatureInfo) -> list[Level]:
    """Group features by stride, finest first."""
    info = check_feature_info(feature_info)
    groups: dict[float, list[dict]] = {}
    for f in info:
        groups.setdefault(float(f["stride"]), []).append(f)
    return [
        Level(s, tuple(str(f["name"]) for f in fs), sum(int(f["channels"]) for f in fs))
        for s, fs in sorted(groups.items())
    ]


def take(feats: Mapping[str, torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
    """Pick ``names`` from the feature dict, with one clear error for missing keys."""
    missing = [n for n in names if n not in feats]
    if missing:
        raise BadInputError(
            f"head expects features {list(names)} but got {sorted(feats)} (missing {missing}); "
            "extract with the layers/timesteps the head was trained on"
        )
    return [feats[n] for n in names]


def resize(x: torch.Tensor, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resample ``x`` [B,C,h,w] to ``size`` (no-op when equal)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def concat_level(feats: Mapping[str, torch.Tensor], level: Level) -> torch.Tensor:
    """Concatenate one level's features (resized to the first one's grid if they differ)."""
    xs = take(feats, level.names)
    size = xs[0].shape[-2:]
    return torch.cat([resize(x, size) for x in xs], dim=1)


def grid_at_stride(feats: Mapping[str, torch.Tensor], levels: Sequence[Level], stride: float) -> tuple[int, int]:
    """Spatial size of a grid of ``stride`` derived from the finest level present in ``feats``."""
    ref = levels[0]
    h, w = take(feats, ref.names[:1])[0].shape[-2:]
    if math.isclose(stride, ref.stride):
        return int(h), int(w)
    r = ref.stride / stride
    return max(1, round(h * r)), max(1, round(w * r))


def num_doublings(ratio: float) -> int:
    """How many x2 steps best approximate ``ratio`` (>= 0)."""
    return max(0, int(round(math.log2(ratio)))) if ratio > 1 else 0


def group_norm(channels: int, groups: int = 32, min_per_group: int = 4) -> nn.GroupNorm:
    """GroupNorm with the most groups (<= ``groups``) dividing ``channels`` into groups of
    at least ``min_per_group`` channels (so a 1x1 map still has several values per group)."""
    cap = max(1, min(groups, channels // min_per_group))
    g = max(d for d in range(1, cap + 1) if channels % d == 0)
    return nn.GroupNorm(g, channels)


def conv_gn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) -> GroupNorm -> ReLU, padding keeps size for odd ``k``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        group_norm(cout),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """ResNet bottleneck block (He et al. 2016) with GroupNorm and a projection shortcut.

    1x1 (cin -> cout/4) -> 3x3 -> 1x1 (-> cout), plus 1x1 projection of the input when
    ``cin != cout``. This is the per-layer projection Diffusion Hyperfeatures uses.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = max(1, cout // 4)
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), group_norm(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), group_norm(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), group_norm(cout),
        )
        self.shortcut = (
            nn.Identity() if cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), group_norm(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))
