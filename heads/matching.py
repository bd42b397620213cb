"""Zero-shot matching on dense feature maps: points, mutual pairs and dense flow.

Everything here works on feature maps ``[C, h, w]`` or batches ``[B, C, h, w]`` and
on point sets ``[N, 2]`` or ``[B, N, 2]``; no model is involved.

Coordinate convention (used by every function and by :mod:`difffeat.tasks.correspond`)
-------------------------------------------------------------------------------------
* Points are ``(x, y)`` pixel coordinates, ``x`` along the width. Image sizes are
  ``(H, W)`` (torch order).
* Pixel centres sit at integer coordinates: pixel ``(i, j)`` covers
  ``[j - 0.5, j + 0.5) x [i - 0.5, i + 0.5)``; the image spans ``[-0.5, W - 0.5]``.
  SPair-71k keypoints are read the same way (DIFT indexes ``feat[:, y, x]``).
* A feature map of size ``(h, w)`` computed from an image of size ``(H, W)`` is a
  coarser pixel grid over the same area, so cell ``(i, j)`` has its centre at
  ``x = (j + 0.5) * W / w - 0.5``. :func:`rescale_points` is the ONE conversion
  between any two such grids (image <-> feature grid <-> resized image); it is the
  mapping that ``F.interpolate(..., mode="bilinear", align_corners=False)`` and
  ``F.grid_sample(..., align_corners=False)`` use.

Methods reproduced
------------------
* **DIFT** (Tang et al., "Emergent Correspondence from Image Diffusion", NeurIPS 2023):
  bilinearly upsample both feature maps to the image size, read the source vector at
  the keypoint, take the cosine argmax over the target. :func:`match_points` with
  ``upsample=True`` computes exactly that score map without materialising the
  upsampled ``[C, H, W]`` target: a dot product commutes with bilinear interpolation,
  so it upsamples the ``[N, h, w]`` dot map instead and divides by the norm of the
  interpolated vectors (accumulated over channel chunks).
* **SD-DINO** (Zhang et al., "A Tale of Two Features", NeurIPS 2023): nearest neighbour
  of fused descriptors under L2 (``metric="l2"``).
* **GeoAware-SC** (Zhang et al., "Telling Left from Right", CVPR 2024) window
  soft-argmax: hard argmax on the similarity map, then a softmax with temperature
  (their ``beta``) 0.02 restricted to a ``(2r+1) x (2r+1)`` window around it, with
  ``r = SOFT_EVAL_WINDOW = 5`` in their zero-shot config (``configs/eval_zero_shot_spair.yaml``;
  the code documents "window size is 2*SOFT_EVAL_WINDOW+1"), computed on the feature
  grid (60 x 60 there) of L2-normalised descriptors. :func:`window_soft_argmax` with
  ``radius=5, temperature=0.02``. GeoAware's pose alignment ("flip test", mask-free
  variant) keeps the source orientation whose mutual-nearest-neighbour distance to the
  target is smaller: :func:`mutual_nn_distance`.

Backends
--------
:func:`nearest_neighbors` runs a chunked ``matmul`` + ``topk`` in torch, or a faiss
flat index (exact search; a GPU index when ``faiss`` has ``StandardGpuResources`` and
sees a GPU, faiss-cpu otherwise). ``backend="auto"`` picks faiss for large problems
(at least :data:`FAISS_MIN_PAIRS` query-key pairs). Both return the same scores:
cosine similarity, or the *negative squared* Euclidean distance for ``metric="l2"``,
so "higher is better" everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from difffeat.errors import BadInputError, one_of

Metric = Literal["cosine", "l2"]
Size = tuple[int, int]

METRICS: tuple[str, ...] = ("cosine", "l2")
POINT_MODES: tuple[str, ...] = ("argmax", "mutual", "soft")
DENSE_MODES: tuple[str, ...] = ("argmax", "soft")
BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")

#: ``backend="auto"`` switches to faiss from this many query x key pairs on.
FAISS_MIN_PAIRS: int = 1 << 26
#: GeoAware-SC zero-shot defaults (window radius in score-map cells, softmax temperature).
GEOAWARE_WINDOW_RADIUS: int = 5
GEOAWARE_TEMPERATURE: float = 0.02

_EPS = 1e-8


# --------------------------------------------------------------------------- geometry
def rescale_points(points: torch.Tensor, from_size: Size, to_size: Size) -> torch.Tensor:
    """Convert ``(x, y)`` points between two pixel grids covering the same image area.

    ``from_size`` and ``to_size`` are ``(H, W)``. With pixel centres at integer
    coordinates, ``x' = (x + 0.5) * W' / W - 0.5`` (same for ``y``). Use it for
    image -> feature grid (``to_size = (h, w)``), feature grid -> image, and image ->
    resized image alike.
    """
    scale = points.new_tensor([to_size[1] / from_size[1], to_size[0] / from_size[0]])
    return (points + 0.5) * scale - 0.5


def pixel_grid(size: Size, device: torch.device | str | None = None) -> torch.Tensor:
    """``[H, W, 2]`` tensor of the ``(x, y)`` coordinates of every pixel centre."""
    ys = torch.arange(size[0], device=device, dtype=torch.float32)
    xs = torch.arange(size[1], device=device, dtype=torch.float32)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def _normalized(points: torch.Tensor, size: Size) -> torch.Tensor:
    """Image coordinates -> ``grid_sample`` coordinates in [-1, 1] (align_corners=False)."""
    scale = points.new_tensor([2.0 / size[1], 2.0 / size[0]])
    return (points + 0.5) * scale - 1.0


def sample_descriptors(feats: torch.Tensor, points: torch.Tensor, image_size: Size) -> torch.Tensor:
    """Bilinearly read descriptors at image points: ``[B, C, h, w]``, ``[B, N, 2]`` -> ``[B, N, C]``.

    Equals upsampling ``feats`` to ``image_size`` with
    ``F.interpolate(mode="bilinear", align_corners=False)`` and indexing ``[:, :, y, x]``
    at integer points (DIFT's source read-out), and interpolates between pixels for
    fractional ones. Points outside the image read the border value.
    """
    grid = _normalized(points.to(feats.dtype), image_size).unsqueeze(2)  # [B, N, 1, 2]
    out = F.grid_sample(feats, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(-1).transpose(1, 2)


SRC_READS: tuple[str, ...] = ("bilinear", "cell")


def read_source(feats: torch.Tensor, points: torch.Tensor, image_size: Size, how: str = "bilinear") -> torch.Tensor:
    """Source descriptors ``[B, N, C]`` at ``points [B, N, 2]``: bilinear, or the containing cell."""
    if how == "bilinear":
        return sample_descriptors(feats, points, image_size)
    if how != "cell":
        raise one_of("source read", how, SRC_READS)
    h, w = feats.shape[-2:]
    cx = (points[..., 0] * w / image_size[1]).floor().long().clamp(0, w - 1)
    cy = (points[..., 1] * h / image_size[0]).floor().long().clamp(0, h - 1)
    flat = feats.flatten(2)  # [B, C, h*w]
    idx = (cy * w + cx).unsqueeze(1).expand(-1, flat.shape[1], -1)
    return flat.gather(2, idx).transpose(1, 2)


def upsampled_sq_norms(feats: torch.Tensor, size: Size, channel_chunk: int = 64) -> torch.Tensor:
    """``[B, H, W]`` squared norms of the vectors of ``feats`` bilinearly upsampled to ``size``.

    Accumulated over channel chunks so the ``[B, C, H, W]`` map never exists at once.
    """
    if tuple(feats.shape[-2:]) == tuple(size):
        return feats.pow(2).sum(1)
    total = feats.new_zeros((feats.shape[0], *size))
    for c0 in range(0, feats.shape[1], channel_chunk):
        up = F.interpolate(feats[:, c0:c0 + channel_chunk], size=size, mode="bilinear", align_corners=False)
        total += up.pow(2).sum(1)
    return total


# ----------------------------------------------------------------------- similarities
def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise one_of("metric", metric, METRICS)


def pairwise_scores(queries: torch.Tensor, keys: torch.Tensor, metric: Metric = "cosine") -> torch.Tensor:
    """``[..., N, C]`` x ``[..., M, C]`` -> ``[..., N, M]`` scores, higher is better.

    Cosine similarity, or the negative squared Euclidean distance for ``"l2"``.
    """
    _check_metric(metric)
    if metric == "cosine":
        return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(-1, -2)
    dots = queries @ keys.transpose(-1, -2)
    return 2 * dots - queries.pow(2).sum(-1, keepdim=True) - keys.pow(2).sum(-1).unsqueeze(-2)


def score_maps(queries: torch.Tensor, feats: torch.Tensor, *, metric: Metric = "cosine",
               size: Size | None = None, sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Score every query against every position of a feature map.

    ``queries [B, N, C]``, ``feats [B, C, h, w]`` -> ``[B, N, H, W]`` where ``(H, W)`` is
    ``size`` (the map is bilinearly upsampled first, exactly as DIFT does) or the
    feature grid when ``size`` is None. Pass ``sq_norms`` (from
    :func:`upsampled_sq_norms`) to reuse it across query chunks.
    """
    _check_metric(metric)
    size = tuple(feats.shape[-2:]) if size is None else tuple(size)
    dots = torch.einsum("bnc,bchw->bnhw", queries, feats)
    if dots.shape[-2:] != size:
        dots = F.interpolate(dots, size=size, mode="bilinear", align_corners=False)
    if sq_norms is None:
        sq_norms = upsampled_sq_norms(feats, size)
    sq_norms = sq_norms.unsqueeze(1)
    if metric == "cosine":
        qn = queries.norm(dim=-1).clamp_min(_EPS)[..., None, None]
        return dots / (qn * sq_norms.clamp_min(0).sqrt().clamp_min(_EPS))
    return 2 * dots - queries.pow(2).sum(-1)[..., None, None] - sq_norms


# ------------------------------------------------------------------- peak extraction
def argmax_2d(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard argmax of ``[..., h, w]`` maps -> (``[..., 2]`` float ``(x, y)`` grid coords, max score)."""
    w = scores.shape[-1]
    best, idx = scores.flatten(-2).max(-1)
    xy = torch.stack([idx % w, torch.div(idx, w, rounding_mode="floor")], dim=-1)
    return xy.to(torch.float32), best


def window_soft_argmax(scores: torch.Tensor, *, radius: int = GEOAWARE_WINDOW_RADIUS,
                       temperature: float = GEOAWARE_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """GeoAware-SC window soft-argmax of ``[..., h, w]`` maps.

    As the release (``utils/utils_correspondence.py`` ``get_flow`` + ``soft_argmax``): take the
    hard argmax, multiply the map by a mask that is 1 on the ``(2 * radius + 1)^2`` window
    around it (clamped to the map) and 0 elsewhere, then take the softmax(score / temperature)
    -weighted mean position over the **whole** map, so cells outside the window count with
    score 0 (negligible at realistic similarities, a pull towards the map centre at low ones).
    Returns (``[..., 2]`` float ``(x, y)`` in score-map cells, the hard max score).
    ``radius=0`` is the hard argmax only when the max score is well above 0.
    """
    if radius < 0 or temperature <= 0:
        raise BadInputError(f"window soft-argmax needs radius >= 0 and temperature > 0, got {radius}, {temperature}")
    h, w = scores.shape[-2:]
    flat = scores.flatten(-2)
    best, idx = flat.max(-1)
    cx, cy = idx % w, torch.div(idx, w, rounding_mode="floor")
    offs = torch.arange(-radius, radius + 1, device=scores.device)
    dy, dx = torch.meshgrid(offs, offs, indexing="ij")
    px = cx.unsqueeze(-1) + dx.flatten()  # [..., K]
    py = cy.unsqueeze(-1) + dy.flatten()
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    gathered = flat.gather(-1, (py.clamp(0, h - 1) * w + px.clamp(0, w - 1)))
    top = best.clamp_min(0).unsqueeze(-1)  # the largest logit over the whole (zero-filled) map
    win = torch.exp((gathered - top) / temperature) * inside
    rest = torch.exp(-top / temperature)  # each cell outside the window (score 0)
    n_out = h * w - inside.sum(-1, keepdim=True)
    sx_out = h * (w - 1) * w / 2 - (px * inside).sum(-1, keepdim=True)
    sy_out = w * (h - 1) * h / 2 - (py * inside).sum(-1, keepdim=True)
    z = win.sum(-1, keepdim=True) + rest * n_out
    x = ((win * px).sum(-1, keepdim=True) + rest * sx_out) / z
    y = ((win * py).sum(-1, keepdim=True) + rest * sy_out) / z
    return torch.cat([x, y], dim=-1).to(torch.float32), best


# ------------------------------------------------------------------ nearest neighbours
_GPU_RESOURCES = None


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _faiss_search(queries: torch.Tensor, keys: torch.Tensor, metric: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One unbatched exact search with a faiss flat index: ``[N, C]``, ``[M, C]``."""
    import faiss

    global _GPU_RESOURCES
    q = queries.detach().float()
    kv = keys.detach().float()
    if metric == "cosine":
        q, kv = F.normalize(q, dim=-1), F.normalize(kv, dim=-1)
    index = (faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2)(kv.shape[1])
    if faiss_gpu_available():
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    index.add(kv.cpu().contiguous().numpy())
    dist, idx = index.search(q.cpu().contiguous().numpy(), k)
    scores = torch.from_numpy(dist).to(queries.device)
    if metric == "l2":
        scores = -scores
    return scores, torch.from_numpy(idx).to(queries.device)


def nearest_neighbors(queries: torch.Tensor, keys: torch.Tensor, *, metric: Metric = "cosine", k: int = 1,
                      backend: str = "auto", chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest keys of each query, best first.

    ``queries [N, C]`` or ``[B, N, C]``; ``keys [M, C]`` or ``[B, M, C]``. Returns
    (``scores``, ``indices``), each ``[..., N, k]``; scores as in :func:`pairwise_scores`.
    The torch backend processes queries in chunks of about ``chunk_elems`` scores.
    """
    _check_metric(metric)
    if backend not in BACKENDS:
        raise one_of("matching backend", backend, BACKENDS)
    batched = queries.dim() == 3
    q = queries if batched else queries.unsqueeze(0)
    kv = keys if keys.dim() == 3 else keys.unsqueeze(0).expand(q.shape[0], -1, -1)
    if q.shape[-1] != kv.shape[-1]:
        raise BadInputError(f"descriptor sizes differ: queries have {q.shape[-1]} channels, keys {kv.shape[-1]}")
    n, m = q.shape[1], kv.shape[1]
    if not 1 <= k <= m:
        raise BadInputError(f"k={k} nearest neighbours asked among {m} keys")
    if backend == "auto":
        backend = "faiss" if n * m >= FAISS_MIN_PAIRS and (q.device.type == "cpu" or faiss_gpu_available()) else "torch"
    if backend == "faiss":
        outs = [_faiss_search(q[b], kv[b], metric, k) for b in range(q.shape[0])]
        scores, idx = torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    else:
        step = max(1, chunk_elems // max(m, 1))
        parts = [pairwise_scores(q[:, i:i + step].float(), kv.float(), metric).topk(k, dim=-1)
                 for i in range(0, n, step)]
        scores = torch.cat([p.values for p in parts], 1) if parts else q.new_zeros((q.shape[0], 0, k))
        idx = torch.cat([p.indices for p in parts], 1) if parts else torch.zeros((q.shape[0], 0, k), dtype=torch.long)
    return (scores, idx) if batched else (scores[0], idx[0])


def mutual_nearest_neighbors(a: torch.Tensor, b: torch.Tensor, *, metric: Metric = "cosine",
                             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest neighbour of each row of ``a`` in ``b`` and whether it is mutual.

    ``a [N, C]`` / ``b [M, C]`` (or batched ``[B, ...]``). Returns (``idx_ab [..., N]``,
    ``mutual [..., N]`` bool): ``mutual[i]`` is True when ``a[i]`` is also the nearest
    neighbour of ``b[idx_ab[i]]`` in ``a``.
    """
    _, ab = nearest_neighbors(a, b, metric=metric, backend=backend)
    _, ba = nearest_neighbors(b, a, metric=metric, backend=backend)
    ab, ba = ab[..., 0], ba[..., 0]
    back = ba.gather(-1, ab)
    own = torch.arange(a.shape[-2], device=ab.device).expand_as(ab)
    return ab, back == own


def mutual_nn_distance(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Mean Euclidean distance between mutual nearest neighbours of ``a`` and ``b``.

    GeoAware-SC's mask-free pose-alignment criterion (``get_distance_mutual_nn``): the
    flipped source is used when its distance to the target is smaller. ``a [N, C]``,
    ``b [M, C]`` (or batched); returns a scalar (or ``[B]``). There is always at
    least one mutual pair (the globally closest one).
    """
    ab, mutual = mutual_nearest_neighbors(a, b, metric="l2", backend=backend)
    bb = b if b.dim() == a.dim() else b.unsqueeze(0).expand(a.shape[0], -1, -1)
    nn = bb.gather(-2, ab.unsqueeze(-1).expand(*ab.shape, b.shape[-1]))
    dist = (a - nn).norm(dim=-1)
    return (dist * mutual).sum(-1) / mutual.sum(-1).clamp_min(1)


# ----------------------------------------------------------------------- point matching
@dataclass
class PointMatches:
    """Matches of source points in the target image (``[N, ...]`` or ``[B, N, ...]``).

    ``points``: matched ``(x, y)`` in target image pixels; ``scores``: similarity at the
    match (cosine, or negative squared L2); ``mutual``: for ``mode="mutual"``, whether
    matching the target point back lands within ``mutual_radius`` of the query.
    """

    points: torch.Tensor
    scores: torch.Tensor
    mutual: torch.Tensor | None = None


def _batched(feats: torch.Tensor, points: torch.Tensor | None = None) -> bool:
    if feats.dim() not in (3, 4):
        raise BadInputError(f"feature maps must be [C,h,w] or [B,C,h,w], got shape {tuple(feats.shape)}")
    if points is not None and points.dim() != feats.dim() - 1:
        raise BadInputError(f"points {tuple(points.shape)} do not fit feature maps {tuple(feats.shape)}")
    if points is not None and points.shape[-1] != 2:
        raise BadInputError(f"points must be (x, y) pairs, got shape {tuple(points.shape)}")
    return feats.dim() == 4


def _locate(scores: torch.Tensor, mode: str, radius: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    if mode == "soft":
        return window_soft_argmax(scores, radius=radius, temperature=temperature)
    return argmax_2d(scores)


def _match_into(queries: torch.Tensor, feats: torch.Tensor, feat_image_size: Size, *, metric: str, mode: str,
                upsample: bool, radius: int, temperature: float, query_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best position (image coords) in ``feats`` for each of ``queries [B, N, C]``."""
    size = tuple(feat_image_size) if upsample else tuple(feats.shape[-2:])
    sq = upsampled_sq_norms(feats, size)
    pts, best = [], []
    for i in range(0, queries.shape[1], query_chunk):
        s = score_maps(queries[:, i:i + query_chunk], feats, metric=metric, size=size, sq_norms=sq)
        xy, b = _locate(s, mode, radius, temperature)
        pts.append(xy)
        best.append(b)
    xy = torch.cat(pts, 1) if pts else queries.new_zeros((queries.shape[0], 0, 2))
    best = torch.cat(best, 1) if best else queries.new_zeros((queries.shape[0], 0))
    return rescale_points(xy, size, feat_image_size), best


def match_points(src_feats: torch.Tensor, tgt_feats: torch.Tensor, src_points: torch.Tensor, *,
                 src_size: Size, tgt_size: Size, metric: Metric = "cosine", mode: str = "argmax",
                 upsample: bool = True, window_radius: int = GEOAWARE_WINDOW_RADIUS,
                 temperature: float = GEOAWARE_TEMPERATURE, mutual_radius: float | None = None,
                 query_chunk: int = 64, src_read: str = "bilinear") -> PointMatches:
    """Find the target location of each source point.

    ``src_feats [C, hs, ws]`` / ``tgt_feats [C, ht, wt]`` (or batched ``[B, ...]`` with
    ``src_points [B, N, 2]``); ``src_points`` are ``(x, y)`` in the source image of size
    ``src_size = (H, W)``; results are in the target image of size ``tgt_size``.

    * ``mode="argmax"``: best-scoring location (DIFT with ``upsample=True, metric="cosine"``).
    * ``mode="soft"``: GeoAware-SC window soft-argmax; ``window_radius`` counts score-map
      cells (feature cells when ``upsample=False``, as GeoAware-SC uses it).
    * ``mode="mutual"``: argmax, plus ``mutual`` flags: the target point is matched back
      into the source and the flag says whether it lands within ``mutual_radius`` pixels
      of the query (default: one source feature stride).

    ``upsample=True`` scores every target *pixel* (feature maps bilinearly upsampled to
    the image size, sub-patch precision as in DIFT); ``False`` scores feature cells and
    reports cell centres.

    ``src_read``: ``bilinear`` reads the source descriptor at the point (DIFT: the upsampled
    map at the pixel); ``cell`` takes the cell containing it, ``floor(x * w / W)`` (SD-DINO
    ``pck_spair_pascal.py`` and GeoAware-SC ``kpts_to_patch_idx``).
    """
    if mode not in POINT_MODES:
        raise one_of("matching mode", mode, POINT_MODES)
    _check_metric(metric)
    batched = _batched(src_feats, src_points)
    if _batched(tgt_feats) != batched:
        raise BadInputError("source and target feature maps must both be batched or both unbatched")
    sf = (src_feats if batched else src_feats.unsqueeze(0)).float()
    tf = (tgt_feats if batched else tgt_feats.unsqueeze(0)).float()
    sp = (src_points if batched else src_points.unsqueeze(0)).float().to(sf.device)
    if sf.shape[1] != tf.shape[1]:
        raise BadInputError(f"descriptor sizes differ: source {sf.shape[1]} channels, target {tf.shape[1]}")
    queries = read_source(sf, sp, src_size, src_read)
    loc = "soft" if mode == "soft" else "argmax"
    opts = dict(metric=metric, upsample=upsample, radius=window_radius, temperature=temperature,
                query_chunk=query_chunk)
    points, scores = _match_into(queries, tf, tgt_size, mode=loc, **opts)
    mutual = None
    if mode == "mutual":
        back_q = sample_descriptors(tf, points, tgt_size)
        back, _ = _match_into(back_q, sf, src_size, mode="argmax", **opts)
        if mutual_radius is None:
            mutual_radius = max(src_size[0] / sf.shape[-2], src_size[1] / sf.shape[-1])
        mutual = (back - sp).norm(dim=-1) <= mutual_radius + 1e-4
    if not batched:
        points, scores = points[0], scores[0]
        mutual = None if mutual is None else mutual[0]
    return PointMatches(points=points, scores=scores, mutual=mutual)


# ------------------------------------------------------------------------- dense flow
@dataclass
class DenseMatches:
    """For every target position of a ``(H, W)`` grid, the matched source point.

    ``mapping [B, H, W, 2]`` (or ``[H, W, 2]``) holds absolute ``(x, y)`` *source image*
    coordinates; position ``(i, j)`` is the target point
    ``rescale_points((j, i), size, tgt_size)``. ``flow = mapping - that point`` if you
    need displacements. ``scores`` is the similarity at each match.
    """

    mapping: torch.Tensor
    scores: torch.Tensor
    size: Size


def dense_flow(src_feats: torch.Tensor, tgt_feats: torch.Tensor, *, src_size: Size, tgt_size: Size,
               out_size: Size | None = None, metric: Metric = "cosine", mode: str = "argmax",
               window_radius: int = GEOAWARE_WINDOW_RADIUS, temperature: float = GEOAWARE_TEMPERATURE,
               backend: str = "auto", query_chunk: int = 16384) -> DenseMatches:
    """Match every target position to the source feature grid.

    Target positions form the ``out_size`` grid (default: the target feature grid;
    pass ``tgt_size`` for one match per target pixel: descriptors are then bilinearly
    read at each pixel, chunked). Candidates are the source feature cells; ``mode="soft"``
    refines each match with the window soft-argmax for sub-cell precision.
    """
    if mode not in DENSE_MODES:
        raise one_of("dense matching mode", mode, DENSE_MODES)
    _check_metric(metric)
    batched = _batched(src_feats)
    sf = (src_feats if batched else src_feats.unsqueeze(0)).float()
    tf = (tgt_feats if batched else tgt_feats.unsqueeze(0)).float()
    if sf.shape[1] != tf.shape[1]:
        raise BadInputError(f"descriptor sizes differ: source {sf.shape[1]} channels, target {tf.shape[1]}")
    b, c, hs, ws = sf.shape
    out = tuple(tf.shape[-2:]) if out_size is None else tuple(out_size)
    keys = sf.flatten(2).transpose(1, 2)  # [B, hs*ws, C]
    on_grid = out == tuple(tf.shape[-2:])
    tgt_pts = rescale_points(pixel_grid(out, tf.device).reshape(-1, 2), out, tgt_size)
    maps, best = [], []
    for i in range(0, out[0] * out[1], query_chunk):
        if on_grid:
            q = tf.flatten(2)[:, :, i:i + query_chunk].transpose(1, 2)
        else:
            q = sample_descriptors(tf, tgt_pts[i:i + query_chunk].expand(b, -1, -1), tgt_size)
        if mode == "soft":
            s = pairwise_scores(q, keys, metric).reshape(b, -1, hs, ws)
            xy, sc = window_soft_argmax(s, radius=window_radius, temperature=temperature)
        else:
            sc, idx = nearest_neighbors(q, keys, metric=metric, backend=backend)
            sc, idx = sc[..., 0], idx[..., 0]
            xy = torch.stack([idx % ws, torch.div(idx, ws, rounding_mode="floor")], -1).float()
        maps.append(xy)
        best.append(sc)
    mapping = rescale_points(torch.cat(maps, 1), (hs, ws), src_size).reshape(b, out[0], out[1], 2)
    scores = torch.cat(best, 1).reshape(b, out[0], out[1])
    if not batched:
        mapping, scores = mapping[0], scores[0]
    return DenseMatches(mapping=mapping, scores=scores, size=out)


def warp_image(src_image: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Pull source pixels through a mapping: ``[B, 3, Hs, Ws]`` + ``[B, H, W, 2]`` -> ``[B, 3, H, W]``.

    ``mapping`` holds source image coordinates (as :class:`DenseMatches` does); read it at
    every target pixel with :func:`sample_descriptors` first for a full-size warp.
    """
    batched = src_image.dim() == 4
    img = src_image if batched else src_image.unsqueeze(0)
    m = mapping if mapping.dim() == 4 else mapping.unsqueeze(0)
    grid = _normalized(m.to(img.dtype), tuple(img.shape[-2:]))
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out if batched else out[0]
