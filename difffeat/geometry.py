"""How an extractor prepares its inputs: resolution, resize policy and size multiple.

One :class:`Geometry` per extractor (``ex.geometry``), used for PIL images and tensors alike,
so that every source of a fused descriptor sees the image placed the same way (the SD-DINO
protocol pads both the SD and the DINOv2 input to a square: Zhang et al., NeurIPS 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import BadInputError
from .io import Prepared, prepare_image, snap



@dataclass(frozen=True)
class Geometry:
    """``resolution`` (None = native size), ``resize`` policy and ``multiple`` every side must be."""

    resolution: int | None
    resize: str
    multiple: int

    @property
    def policy(self) -> str:
        """The policy in effect: without a resolution every policy snaps the native size."""
        return self.resize if self.resolution else "snap"

    @property
    def letterbox(self) -> bool:
        """Whether prepared images are the picture centred on a padded square (``pad``)."""
        return self.policy == "pad"

    @property
    def placement(self) -> str:
        """Where the picture lands: ``pad`` (letterboxed), ``crop`` (its centre square) or ``cover`` (all of it)."""
        return self.policy if self.policy in ("pad", "crop") else "cover"

    def prepare_one(self, image: Image.Image) -> Prepared:
        return prepare_image(image, self.resolution, self.policy, self.multiple)  # type: ignore[arg-type]

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> [B,3,H,W] in [0,1] (one line if they prepare to different sizes)."""
        preps = [self.prepare_one(im).image for im in images]
        sizes = {tuple(p.shape) for p in preps}
        if len(sizes) > 1:
            raise BadInputError(f"images prepare to different sizes {sorted(sizes)}; set a resolution to batch them")
        return torch.stack(preps)

    def prepare_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """The same policy and placement on a [B,3,H,W] batch in [0,1] (bicubic with antialias; the
        PIL path's ``pad`` resamples with LANCZOS, so pixels differ by resampling noise only)."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        r, policy = self.resolution, self.policy
        if policy == "resize":
            return _resample(x, (r, r))  # type: ignore[arg-type]
        if policy == "pad":
            s = int(r)  # type: ignore[arg-type]
            scale = s / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            out = x.new_zeros(x.shape[0], 3, s, s, dtype=torch.float32)
            oy, ox = (s - nh) // 2, (s - nw) // 2
            out[..., oy : oy + nh, ox : ox + nw] = _resample(x, (nh, nw))
            return out
        if policy == "crop":  # io.prepare_image's crop: centre square, bilinear without antialias
            c = min(h, w)
            y0, x0 = (h - c) // 2, (w - c) // 2
            sq = x[..., y0 : y0 + c, x0 : x0 + c].float()
            return sq if c == r else F.interpolate(sq, size=(r, r), mode="bilinear", align_corners=False)  # type: ignore[arg-type]
        if policy == "snap":
            scale = 1.0 if r is None else r / max(h, w)
            return _resample(x, (snap(round(h * scale), self.multiple), snap(round(w * scale), self.multiple)))
        if h % self.multiple or w % self.multiple:
            raise BadInputError(f"image size {w}x{h} is not a multiple of {self.multiple}; use --resize snap")
        return x


def _resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x.float()
    return F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def common(geometries: Sequence[Geometry]) -> Geometry:
    """One geometry for several sources that place the picture the same way.

    All must letterbox (``pad``), all take the centre square (``crop``) or all cover the picture
    (``resize``/``snap``/``none``):
    mixing them would put one location at different cells of the two maps. The common
    geometry prepares at the largest resolution; each source then applies its own geometry
    to that tensor (:meth:`Geometry.prepare_tensor`), which keeps the placement.
    """
    kinds = {g.placement for g in geometries}
    if len(kinds) > 1:
        raise BadInputError("fused sources must place the image alike: all resize 'pad', all 'crop', or none of "
                            f"them (got {', '.join(g.policy for g in geometries)})")
    res = [g.resolution for g in geometries if g.resolution]
    # each source re-prepares the fused input with its own multiple: the fused one need not snap
    if kinds != {"cover"}:
        return Geometry(max(res), kinds.pop(), 1)
    return Geometry(max(res) if res else None, "snap", 1)  # keep the aspect; "resize" sources stretch it
