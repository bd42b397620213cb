"""Zero-shot (unsupervised) segmentation by K-means over diffusion features.

Each image's feature maps are resampled to the finest grid, concatenated, L2-normalised
per pixel and clustered with K-means (k-means++ seeding, Lloyd iterations, cosine
geometry). The per-cluster similarity maps are bilinearly upsampled to the output size
and the arg-max gives the segment of every pixel, so boundaries are not blocky.

This is the clustering baseline that diffusion-feature segmentation papers compare with
(e.g. the K-means baseline of DiffSeg, Tian et al., CVPR 2024). DiffSeg's own method,
merging self-attention maps, is :mod:`difffeat.heads.diffseg`.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from .blocks import FeatureInfo, concat_level, grid_at_stride, levels_by_stride, resize


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical K-means of rows of ``x`` [N, D] (L2-normalised): (centroids [k, D], labels [N])."""
    x = F.normalize(x.float(), dim=1)
    n = x.shape[0]
    k = max(1, min(int(k), n))
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    # k-means++ seeding on cosine distance
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    dist = (1 - x @ centres[0]).clamp_min(0)
    for _ in range(1, k):
        p = dist.cpu() + 1e-12
        idx = int(torch.multinomial(p / p.sum(), 1, generator=g))
        centres.append(x[idx])
        dist = torch.minimum(dist, (1 - x @ x[idx]).clamp_min(0))
    c = torch.stack(centres)
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        new = (x @ c.T).argmax(1)
        if _ > 0 and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        c = torch.where(counts > 0, F.normalize(sums, dim=1), c)
    return c, labels


def kmeans_segment(
    feats: Mapping[str, torch.Tensor],
    feature_info: FeatureInfo,
    k: int,
    out_size: tuple[int, int] | None = None,
    seed: int = 0,
    iters: int = 30,
) -> torch.Tensor:
    """Segment ids ``[B, H, W]`` (0..k-1, ordered by first appearance in raster order)."""
    levels = levels_by_stride(feature_info)
    grid = grid_at_stride(feats, levels, levels[0].stride)
    x = torch.cat([F.normalize(resize(concat_level(feats, lv).float(), grid), dim=1) for lv in levels], dim=1)
    out = []
    for fmap in x:
        c, labels = kmeans(fmap.flatten(1).T, k, iters, seed)
        sim = (F.normalize(fmap, dim=0).flatten(1).T @ c.T).T.reshape(len(c), *grid)
        seg = resize(sim[None], out_size or grid)[0].argmax(0)
        out.append(relabel_by_first_appearance(seg, len(c)))
    return torch.stack(out)


def relabel_by_first_appearance(seg: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Renumber segment ids ``[H, W]`` by first appearance in raster order, so ids do not
    depend on how clusters were seeded (ids absent from ``seg`` go last)."""
    n = int(seg.max()) + 1 if n is None else n
    flat = seg.flatten()
    first = torch.full((n,), flat.numel(), device=flat.device, dtype=torch.long)
    first.scatter_reduce_(0, flat, torch.arange(flat.numel(), device=flat.device), reduce="amin")
    lut = torch.empty_like(first)
    lut[first.argsort()] = torch.arange(n, device=flat.device)
    return lut[seg]
