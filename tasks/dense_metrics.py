"""Dense-prediction metrics: segmentation, depth and edges.

Segmentation (:class:`SegMetric`) follows mmsegmentation's ``IoUMetric``: per image,
pixels whose label is ``ignore_index`` (255) are dropped, and the intersection, union,
predicted and label areas per class are accumulated over the whole dataset; then
``IoU_c = I_c / U_c``, ``Acc_c = I_c / label_c``, ``aAcc = sum I / sum label``, and the
means skip classes whose value is NaN (never present in labels nor predictions). Values
are in percent, as mmseg prints them (VPD's 53.7 mIoU is on this scale).

Depth (:class:`DepthMetric`) uses the standard Eigen et al. (2014) errors on pixels with
``min_depth < gt < max_depth`` (predictions clipped to that range), computed per image and
averaged over images as GLPDepth/VPD/BTS do: AbsRel, SqRel, RMSE, RMSE-log, log10, SiLog
(100 x sqrt of the log variance) and delta1/2/3 (``max(p/g, g/p) < 1.25^k``). Relative
depth is aligned per image first: ``align="scale_shift"`` (least squares, MiDaS) or
``"scale"`` (median ratio, Zhou et al. 2017).

Edges (:class:`EdgeMetric`) follow the BSDS500 boundary benchmark (Arbeláez et al. 2011)
as in Dollár's ``edgesEvalImg``/``collect_eval_bdry``: for 99 thresholds
``linspace(1/100, 99/100, 99)``, the prediction ``>= t`` is thinned and matched to each
ground-truth annotation with :func:`~difffeat.tasks.edge_ops.correspond_pixels`
(``maxDist = 0.0075`` of the diagonal). Recall counts matched GT pixels over all
annotations; precision counts predicted pixels matched to any annotation. ODS: best F of
the dataset-summed counts, interpolating linearly between neighbouring thresholds (100
steps); OIS: F of the counts summed at each image's best threshold; AP: area under the
PR curve sampled at recall 0:0.01:1 (``interp1`` over unique recalls, NaN as 0).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from difffeat.heads.losses import align_scale_shift

from .edge_ops import correspond_pixels, thin as thin_edges


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


# --------------------------------------------------------------------------- segmentation
def intersect_and_union(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class (intersection, union, predicted area, label area) of one or more maps.

    ``reduce_zero_label``: mmseg's option for datasets whose label 0 means "ignore"
    (ADE20K): 0 becomes 255 and every other label is shifted down by one.
    """
    pred = _as_tensor(pred).long().flatten()
    label = _as_tensor(label).long().flatten()
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels but label has {label.numel()}")
    if reduce_zero_label:
        label = torch.where(label == 0, torch.full_like(label, 255), label - 1)
        label = torch.where(label == 254, torch.full_like(label, 255), label)
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    inter = pred[pred == label]
    area_i = torch.histc(inter.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_p = torch.histc(pred.float(), bins=num_classes, min=0, max=num_classes - 1)
    area_l = torch.histc(label.float(), bins=num_classes, min=0, max=num_classes - 1)
    return area_i.double(), (area_p + area_l - area_i).double(), area_p.double(), area_l.double()


class SegMetric:
    """Accumulates mmseg-style IoU statistics over a dataset (see module docstring)."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        reduce_zero_label: bool = False,
    ) -> None:
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.reduce_zero_label = reduce_zero_label
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        self.totals = torch.zeros(4, self.num_classes, dtype=torch.float64)

    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        """Add one prediction/label pair (class indices, same shape)."""
        self.totals += torch.stack(
            intersect_and_union(pred, label, self.num_classes, self.ignore_index, self.reduce_zero_label)
        )

    def compute(self) -> dict[str, object]:
        """``{"aAcc", "mIoU", "mAcc", "IoU": {class: %}, "Acc": {class: %}}`` in percent."""
        inter, union, _, area_l = self.totals
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = (inter / union).numpy() * 100
            acc = (inter / area_l).numpy() * 100
        all_l = float(area_l.sum())
        return {
            "aAcc": float(inter.sum()) / all_l * 100 if all_l else float("nan"),
            "mIoU": _nanmean(iou),
            "mAcc": _nanmean(acc),
            "IoU": dict(zip(self.class_names, map(float, iou))),
            "Acc": dict(zip(self.class_names, map(float, acc))),
        }


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


# --------------------------------------------------------------------------- depth
DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3")


def depth_errors(
    pred: torch.Tensor | np.ndarray,
    gt: torch.Tensor | np.ndarray,
    min_depth: float = 1e-3,
    max_depth: float | None = None,
    align: str | None = None,
    mask: torch.Tensor | np.ndarray | None = None,
) -> dict[str, float] | None:
    """Eigen-style depth errors of one image; None if it has no valid pixel."""
    p = _as_tensor(pred).double().squeeze()
    g = _as_tensor(gt).double().squeeze()
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != ground-truth shape {tuple(g.shape)}")
    valid = (g > min_depth) & torch.isfinite(g)
    if max_depth is not None:
        valid &= g < max_depth
    if mask is not None:
        valid &= _as_tensor(mask).bool().squeeze()
    if not valid.any():
        return None
    if align == "scale_shift":
        p = align_scale_shift(p[None], torch.where(valid, g, torch.zeros_like(g))[None])[0]
    elif align == "scale":
        p = p * (g[valid].median() / p[valid].median().clamp_min(1e-12))
    elif align is not None:
        raise ValueError(f"align must be None, 'scale' or 'scale_shift', got {align!r}")
    p = p[valid].clamp(min_depth, max_depth if max_depth is not None else float("inf"))
    g = g[valid]
    ratio = torch.maximum(p / g, g / p)
    dlog = torch.log(p) - torch.log(g)
    return {
        "abs_rel": float(((p - g).abs() / g).mean()),
        "sq_rel": float(((p - g) ** 2 / g).mean()),
        "rmse": float(torch.sqrt(((p - g) ** 2).mean())),
        "rmse_log": float(torch.sqrt((dlog**2).mean())),
        "log10": float((torch.log10(p) - torch.log10(g)).abs().mean()),
        "silog": float(torch.sqrt(((dlog**2).mean() - dlog.mean() ** 2).clamp_min(0)) * 100),
        "d1": float((ratio < 1.25).double().mean()),
        "d2": float((ratio < 1.25**2).double().mean()),
        "d3": float((ratio < 1.25**3).double().mean()),
    }


class DepthMetric:
    """Mean of per-image :func:`depth_errors` over a dataset."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float | None = None, align: str | None = None) -> None:
        self.min_depth, self.max_depth, self.align = min_depth, max_depth, align
        self.sums = dict.fromkeys(DEPTH_KEYS, 0.0)
        self.count = 0

    def update(self, pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray, mask=None) -> None:  # type: ignore[no-untyped-def]
        """Add one image (``[H, W]`` or ``[1, H, W]``)."""
        err = depth_errors(pred, gt, self.min_depth, self.max_depth, self.align, mask)
        if err is None:
            return
        for k, v in err.items():
            self.sums[k] += v
        self.count += 1

    def compute(self) -> dict[str, float]:
        n = max(self.count, 1)
        out = {k: v / n if self.count else float("nan") for k, v in self.sums.items()}
        out["images"] = self.count
        return out


# --------------------------------------------------------------------------- edges
def edge_thresholds(n: int = 99) -> np.ndarray:
    """The BSDS thresholds ``linspace(1/(n+1), 1 - 1/(n+1), n)``."""
    return np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)


def edge_counts(
    prob: np.ndarray | torch.Tensor,
    gts: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    thresholds: int | Sequence[float] = 99,
    max_dist: float = 0.0075,
    thin: bool = True,
    gt_threshold: float = 0.5,
) -> np.ndarray:
    """Per-threshold ``[cntR, sumR, cntP, sumP]`` of one image, shape ``[K, 4]``.

    ``prob``: edge probabilities in [0, 1], ``[H, W]``. ``gts``: one ``[H, W]`` map or a
    stack/list of annotations ``[A, H, W]``; a GT pixel is an edge when ``>= gt_threshold``.
    """
    e = _to_numpy(prob).squeeze()
    g = _to_numpy(gts)
    if g.ndim == 2:
        g = g[None]
    if g.shape[-2:] != e.shape:
        raise ValueError(f"edge map shape {e.shape} != ground-truth shape {g.shape[-2:]}")
    gts_b = [a >= gt_threshold for a in g]
    thrs = edge_thresholds(thresholds) if isinstance(thresholds, int) else np.asarray(thresholds, float)
    out = np.zeros((len(thrs), 4))
    sum_r = float(sum(a.sum() for a in gts_b))
    for k, t in enumerate(thrs):
        e1 = e >= max(np.finfo(float).eps, t)
        if thin:
            e1 = thin_edges(e1)
        matched_e = np.zeros_like(e1)
        cnt_r = 0
        for a in gts_b:
            m1, m2 = correspond_pixels(e1, a, max_dist)
            matched_e |= m1
            cnt_r += int(m2.sum())
        out[k] = (cnt_r, sum_r, matched_e.sum(), e1.sum())
    return out


def _to_numpy(x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _fmeasure(r: np.ndarray, p: np.ndarray) -> np.ndarray:
    s = p + r
    return 2 * p * r / np.where(s == 0, 1, s)


def _rp(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cnt_r, sum_r, cnt_p, sum_p = counts.T
    return cnt_r / np.where(sum_r == 0, 1, sum_r), cnt_p / np.where(sum_p == 0, 1, sum_p)


def _best_interpolated(thrs: np.ndarray, r: np.ndarray, p: np.ndarray) -> tuple[float, float, float, float]:
    """BSDS ``maxF``: best (threshold, R, P, F), interpolating 100 steps between neighbours."""
    best = (float(thrs[0]), float(r[0]), float(p[0]), float(_fmeasure(r[:1], p[:1])[0]))
    d = np.linspace(0, 1, 100)
    for i in range(1, len(thrs)):
        ti = thrs[i] * d + thrs[i - 1] * (1 - d)
        ri = r[i] * d + r[i - 1] * (1 - d)
        pi = p[i] * d + p[i - 1] * (1 - d)
        fi = _fmeasure(ri, pi)
        k = int(np.argmax(fi))
        if fi[k] > best[3]:
            best = (float(ti[k]), float(ri[k]), float(pi[k]), float(fi[k]))
    return best


class EdgeMetric:
    """BSDS-style ODS / OIS / AP accumulated over images (see module docstring)."""

    def __init__(self, thresholds: int | Sequence[float] = 99, max_dist: float = 0.0075, thin: bool = True,
                 gt_threshold: float = 0.5) -> None:
        self.thresholds = edge_thresholds(thresholds) if isinstance(thresholds, int) else np.asarray(thresholds, float)
        self.max_dist, self.thin, self.gt_threshold = max_dist, thin, gt_threshold
        self.per_image: list[np.ndarray] = []

    def update(self, prob: np.ndarray | torch.Tensor, gts: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> None:
        self.per_image.append(edge_counts(prob, gts, self.thresholds, self.max_dist, self.thin, self.gt_threshold))

    def compute(self) -> dict[str, float]:
        if not self.per_image:
            return {"ODS": float("nan"), "OIS": float("nan"), "AP": float("nan"), "images": 0}
        total = np.sum(self.per_image, axis=0)
        r, p = _rp(total)
        t_ods, r_ods, p_ods, f_ods = _best_interpolated(self.thresholds, r, p)
        best_rows = []
        for c in self.per_image:
            ri, pi = _rp(c)
            best_rows.append(c[int(np.argmax(_fmeasure(ri, pi)))])
        r_ois, p_ois = _rp(np.sum(best_rows, axis=0)[None])
        ru, first = np.unique(r, return_index=True)
        ap = 0.0
        if len(ru) > 1:
            pi = np.interp(np.linspace(0, 1, 101), ru, p[first], left=np.nan, right=np.nan)
            ap = float(np.nansum(pi) * 0.01)
        return {
            "ODS": f_ods, "ODS_threshold": t_ods, "ODS_R": r_ods, "ODS_P": p_ods,
            "OIS": float(_fmeasure(r_ois, p_ois)[0]), "AP": ap, "images": len(self.per_image),
        }
