"""Edge-map operations of the BSDS boundary benchmark, in numpy/scipy.

* :func:`thin`: morphological thinning to one-pixel-wide curves with the algorithm of
  MATLAB's ``bwmorph(BW, 'thin', Inf)`` (Lam, Lee & Suen, PAMI 1992, the two-subiteration
  parallel method), which the BSDS benchmark and Dollár's ``edgesEvalImg`` apply to each
  thresholded prediction.
* :func:`correspond_pixels`: the benchmark's ``correspondPixels``: a minimum-cost
  bipartite matching between predicted and ground-truth edge pixels, where a pair may be
  matched only within ``max_dist`` times the image diagonal (0.0075 by default) and an
  unmatched pixel costs 100 times that radius (so the matching first maximises the number
  of matched pairs, then minimises their total distance). Solved per connected component
  of the pair graph with ``scipy.optimize.linear_sum_assignment`` instead of the
  benchmark's CSA solver.
* :func:`edge_nms`: non-maximum suppression along the edge normal, after Dollár's
  structured-edge NMS (orientation from second derivatives of a triangle-smoothed map,
  margin factor 1.01, radius 2 as in the HED/RCF evaluation scripts; the 5-pixel border
  fade is omitted); used for crisp edge predictions before thinning.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components, maximum_bipartite_matching
from scipy.spatial import cKDTree

# Neighbour offsets x1..x8 of Lam et al.: E, NE, N, NW, W, SW, S, SE (x9 = x1).
_NEIGHBOURS = [(0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1)]


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion look-up tables for the two subiterations, indexed by the 8-neighbour code."""
    lut1 = np.zeros(256, bool)
    lut2 = np.zeros(256, bool)
    for code in range(256):
        x = [(code >> k) & 1 for k in range(8)]
        x = [None] + x + [x[0]]  # 1-based, x[9] = x[1]
        xh = sum(1 for i in range(1, 5) if x[2 * i - 1] == 0 and (x[2 * i] or x[2 * i + 1]))
        n1 = sum(1 for k in range(1, 5) if x[2 * k - 1] or x[2 * k])
        n2 = sum(1 for k in range(1, 5) if x[2 * k] or x[2 * k + 1])
        g12 = xh == 1 and 2 <= min(n1, n2) <= 3
        lut1[code] = g12 and ((x[2] or x[3] or not x[8]) and x[1]) == 0
        lut2[code] = g12 and ((x[6] or x[7] or not x[4]) and x[5]) == 0
    return lut1, lut2


_LUT1, _LUT2 = _thin_luts()


def _neighbour_code(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, 1)
    h, w = img.shape
    code = np.zeros(img.shape, np.uint8)
    for k, (dy, dx) in enumerate(_NEIGHBOURS):
        code |= p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w].astype(np.uint8) << k
    return code


def thin(binary: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Thin a boolean image to one-pixel-wide curves (``bwmorph(..., 'thin', Inf)``)."""
    img = np.asarray(binary, bool).copy()
    it = 0
    while max_iter is None or it < max_iter:
        before = np.count_nonzero(img)
        for lut in (_LUT1, _LUT2):
            img &= ~lut[_neighbour_code(img)]
        it += 1
        if np.count_nonzero(img) == before:
            break
    return img


def correspond_pixels(
    pred: np.ndarray, gt: np.ndarray, max_dist: float = 0.0075, dense_limit: int = 4_000_000
) -> tuple[np.ndarray, np.ndarray]:
    """Match edge pixels of two boolean maps; return ``(matched_pred, matched_gt)`` masks.

    Pixels are matched one-to-one, only within ``max_dist * sqrt(H^2 + W^2)`` pixels
    (Euclidean), maximising the number of matches and then minimising their total distance.
    The pair graph is split into connected components; a component whose dense cost matrix
    has at most ``dense_limit`` entries is solved exactly with ``linear_sum_assignment``, a
    larger one with Hopcroft-Karp (the same, maximal, number of matches without the
    distance tie-break, which can only change *which* pixels match, not how many).
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {gt.shape}")
    radius = max_dist * float(np.hypot(*pred.shape))
    mp, mg = np.zeros_like(pred), np.zeros_like(gt)
    p_yx, g_yx = np.argwhere(pred), np.argwhere(gt)
    n1, n2 = len(p_yx), len(g_yx)
    if n1 == 0 or n2 == 0:
        return mp, mg
    pairs = cKDTree(p_yx).sparse_distance_matrix(cKDTree(g_yx), radius, output_type="ndarray")
    if len(pairs) == 0:
        return mp, mg
    i, j, d = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"].astype(np.float64)
    # components of the bipartite graph: nodes 0..n1-1 are predictions, n1.. are GT pixels
    adj = csr_matrix((np.ones(len(i)), (i, n1 + j)), shape=(n1 + n2, n1 + n2))
    _, label = connected_components(adj, directed=False)
    comp = label[i]
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for idx in np.split(order, bounds):
        ci, cj, cd = i[idx], j[idx], d[idx]
        ui, ri = np.unique(ci, return_inverse=True)
        uj, rj = np.unique(cj, return_inverse=True)
        if len(ui) * len(uj) <= dense_limit:
            big = radius * (min(len(ui), len(uj)) + 1) + 1.0
            cost = np.full((len(ui), len(uj)), big)
            cost[ri, rj] = cd
            rows, cols = linear_sum_assignment(cost)
            ok = cost[rows, cols] < big
            mi, mj = ui[rows[ok]], uj[cols[ok]]
        else:
            graph = csr_matrix((np.ones(len(ci)), (ri, rj)), shape=(len(ui), len(uj)))
            m = maximum_bipartite_matching(graph, perm_type="column")  # column per row, -1 if none
            ok = m >= 0
            mi, mj = ui[ok], uj[m[ok]]
        mp[tuple(p_yx[mi].T)] = True
        mg[tuple(g_yx[mj].T)] = True
    return mp, mg


def _tri_smooth(img: np.ndarray, r: int) -> np.ndarray:
    """Separable triangle filter of radius ``r`` (Dollár's ``convTri``), reflect padding."""
    if r <= 0:
        return img
    k = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]).astype(np.float64)
    k /= k.sum()
    out = ndimage.convolve1d(img, k, axis=0, mode="reflect")
    return ndimage.convolve1d(out, k, axis=1, mode="reflect")


def edge_nms(prob: np.ndarray, radius: int = 2, margin: float = 1.01, smooth: int = 4) -> np.ndarray:
    """Suppress pixels that are not maxima of ``prob`` along the local edge normal."""
    e = np.asarray(prob, np.float64)
    oy, ox = np.gradient(_tri_smooth(e, smooth))
    _, oxx = np.gradient(ox)
    oyy, oxy = np.gradient(oy)
    sign = np.where(oxy > 0, -1.0, 1.0)  # sign(-Oxy), taking +1 where Oxy is exactly 0 (straight edges)
    theta = np.mod(np.arctan(oyy * sign / (oxx + 1e-5)), np.pi)  # direction of the edge normal
    yy, xx = np.mgrid[0 : e.shape[0], 0 : e.shape[1]].astype(np.float64)
    cos, sin = np.cos(theta), np.sin(theta)
    keep = np.ones(e.shape, bool)
    for d in range(-radius, radius + 1):
        if d == 0:
            continue
        nb = ndimage.map_coordinates(e, [yy + d * sin, xx + d * cos], order=1, mode="nearest")
        keep &= e * margin >= nb
    return np.where(keep, e, 0.0).astype(np.float32)
