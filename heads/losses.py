"""Losses for the dense heads, plus the per-image depth alignment they share with metrics.

* :func:`silog_loss`: scale-invariant log loss (Eigen et al., NeurIPS 2014) in the
  square-root form ``scale * sqrt(mean(d^2) - lambd * mean(d)^2)``, ``d = log pred - log gt``.
  Checked facts: VPD and GLPDepth (their ``SiLogLoss``) use ``lambd=0.5`` and no scale
  factor; ``lambd=0.85`` with ``scale=10`` is the BTS (Lee et al. 2019) / AdaBins variant
  (its ``variance_focus``). Both are available; the default is VPD's.
* :func:`ssi_l1_loss`: the scale-and-shift-invariant L1 of MiDaS (Ranftl et al., TPAMI
  2020, L_ssitrim): each map is aligned *robustly* per image by subtracting its median
  and dividing by its mean absolute deviation from the median, then the L1 residual is
  averaged (optionally trimming the largest ``trim`` fraction, 0.2 in MiDaS) and divided
  by 2 as in the paper.
* :func:`align_scale_shift`: per-image least-squares scale and shift (MiDaS' L_ssimse
  alignment), used by the relative-depth metrics.
* :func:`class_balanced_bce` / :func:`hed_loss`: HED's class-balanced cross-entropy
  (Xie & Tu 2015): positives weighted by ``beta = |Y-|/|Y|``, negatives by ``1 - beta``,
  per image. Soft labels in [0, 1] count fractionally. HED sums over pixels; here the
  sum is divided by the number of pixels so the scale does not depend on image size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _valid(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    valid = target > 0
    return valid if mask is None else valid & mask.bool()


def silog_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    lambd: float = 0.5,
    scale: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Scale-invariant log loss over all valid pixels of the batch (``target > 0``)."""
    valid = _valid(target, mask)
    if not valid.any():
        return pred.sum() * 0.0
    d = torch.log(pred[valid].float().clamp_min(eps)) - torch.log(target[valid].float())
    var = (d**2).mean() - lambd * d.mean() ** 2
    return scale * torch.sqrt(var.clamp_min(0.0) + 1e-12)


def _median_mad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = x.median()
    return t, (x - t).abs().mean()


def ssi_l1_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    trim: float = 0.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """MiDaS scale-and-shift-invariant (trimmed) L1, averaged over images.

    ``pred``/``target``: ``[B, 1, H, W]`` or ``[B, H, W]``; valid pixels are ``target > 0``
    (and ``mask``). Images with fewer than two valid pixels are skipped.
    """
    pred, target = pred.reshape(pred.shape[0], -1).float(), target.reshape(target.shape[0], -1).float()
    valid = _valid(target, None if mask is None else mask.reshape(mask.shape[0], -1))
    losses = []
    for p, g, v in zip(pred, target, valid):
        if v.sum() < 2:
            continue
        p, g = p[v], g[v]
        tp, sp = _median_mad(p)
        tg, sg = _median_mad(g)
        res = ((p - tp) / (sp + eps) - (g - tg) / (sg + eps)).abs()
        m = res.numel()
        if trim > 0:
            keep = max(1, int(round(m * (1.0 - trim))))
            res = torch.topk(res, keep, largest=False).values
        losses.append(res.sum() / (2 * m))
    if not losses:
        return pred.sum() * 0.0
    return torch.stack(losses).mean()


def align_scale_shift(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Return ``s * pred + t`` with per-image ``(s, t)`` minimising ``sum((s*pred + t - target)^2)``.

    Works on ``[B, ...]``; valid pixels are ``target > 0`` (and ``mask``). Degenerate images
    (constant prediction) get ``s = 0`` and ``t = mean(target)``.
    """
    shape = pred.shape
    p = pred.reshape(shape[0], -1).double()
    g = target.reshape(shape[0], -1).double()
    v = _valid(g, None if mask is None else mask.reshape(shape[0], -1)).double()
    n = v.sum(1)
    sp, sg = (v * p).sum(1), (v * g).sum(1)
    spp, spg = (v * p * p).sum(1), (v * p * g).sum(1)
    det = n * spp - sp * sp
    ok = det.abs() > 1e-12 * (n * spp).clamp_min(1e-30)
    s = torch.where(ok, (n * spg - sp * sg) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    t = (sg - s * sp) / n.clamp_min(1)
    return (s[:, None] * p + t[:, None]).reshape(shape).to(pred.dtype)


def class_balanced_bce(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """HED class-balanced BCE with logits, per-image ``beta``, mean over valid pixels and images.

    ``logits``/``target``: ``[B, 1, H, W]`` or ``[B, H, W]``; ``target`` in [0, 1] (soft allowed).
    """
    b = logits.shape[0]
    x = logits.reshape(b, -1).float()
    y = target.reshape(b, -1).float()
    v = torch.ones_like(y) if mask is None else mask.reshape(b, -1).float()
    n = v.sum(1).clamp_min(1)
    beta = ((1 - y) * v).sum(1) / n  # fraction of negatives = weight of positives
    per_px = beta[:, None] * y * F.softplus(-x) + (1 - beta[:, None]) * (1 - y) * F.softplus(x)
    return ((per_px * v).sum(1) / n).mean()


def hed_loss(
    fused: torch.Tensor, sides: list[torch.Tensor], target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """HED deep supervision: class-balanced BCE on the fused map plus every side output."""
    loss = class_balanced_bce(fused, target, mask)
    for s in sides:
        loss = loss + class_balanced_bce(s, target, mask)
    return loss
