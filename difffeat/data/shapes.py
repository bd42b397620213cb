"""``shapes``: procedural scenes with exact ground truth for every difffeat task.

A scene is 1-4 objects drawn from :data:`CLASSES` (distinct classes within a scene) over a
textured background. Objects are flat, slanted planes stacked in depth: object slot 0 is
the nearest, and nearer objects occlude farther ones. Each object and the background has a
texture (flat, gradient, stripes or noise, made of smooth sinusoids so it is a continuous
function of position) and objects get simple directional shading.

Because a scene is a continuous function of the image plane, every label is exact:

* ``label``    class index into :data:`CLASSES` with the largest visible area (with distinct
  classes per scene this is also the class of the largest visible object; ties go to the
  lower class index);
* ``mask``     per-pixel class, 0 = background, ``i + 1`` = ``CLASSES[i]``;
* ``depth``    per-pixel depth in metre-like units (float32, > 0): object planes with slant,
  depth ranges strictly ordered by slot, over a background ramp that is farther at the top
  and always behind every object;
* ``edges``    occluding contours: a pixel is an edge when a 4-neighbour belongs to a farther
  layer. Layers have disjoint depth ranges and distinct classes, so these are exactly the
  mask discontinuities and the depth discontinuities, one pixel thick, on the near side;
* ``instance`` per-pixel layer, 0 = background, ``s + 1`` = object slot ``s`` (nearest is 1),
  and ``amodal`` the full (unoccluded) silhouette of every slot;
* with ``pair=True`` a second view: the same scene seen through a random homography ``H``
  (view-1 pixel coordinates -> view-2 pixel coordinates), so point maps are exact.

Coordinates: ``x`` to the right, ``y`` down, in pixels; the centre of pixel ``[row, col]``
is ``(col + 0.5, row + 0.5)``; the image covers ``[0, size]^2``.

Determinism: the random parameters of image ``index`` are a hash of ``(seed, split, index)``
(SplitMix64), so an image does not depend on the batch it is rendered in, and the three
splits ("train", "val", "test") are independent streams: the same index never gives the
same scene in two splits.

Speed: rendering is vectorised torch (parameters are drawn in numpy, pixels are evaluated
on ``device``). Measured on a shared 2-core CPU with ``torch.set_num_threads(1)`` (faster
than torch's default pool for these small elementwise ops there): about 1,500 images/s per
core at 64x64, about 600/s with ``pair=True``; run one process per core (e.g. DataLoader
workers) for thousands per second. ``device="cuda"`` runs the same code on a GPU.

Example::

    from difffeat.data.shapes import render, write_folder
    b = render(16, seed=0, split="train", pair=True)
    b.image.shape, b.label, b.mask.max()         # [16,64,64,3] uint8, [16], <= 8
    pts2, ok = b.map_points([[10.5, 20.5]], idx=3)
    write_folder("data/shapes-val", 500, split="val")
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from difffeat.errors import BadInputError, one_of

CLASSES: tuple[str, ...] = (
    "disk", "square", "triangle", "star", "ring", "cross", "ellipse", "hexagon",
)
"""Shape classes; ``label`` indexes this tuple and ``mask`` stores ``index + 1``."""

_UNIT_AREA = np.array([3.14, 2.0, 1.3, 1.29, 2.01, 1.96, 1.73, 2.6])
"""Area of each class at unit radius (mid shape parameter), measured on a fine grid."""

SPLITS: tuple[str, ...] = ("train", "val", "test")
TEXTURES: tuple[str, ...] = ("flat", "gradient", "stripes", "noise")
MAX_OBJECTS = 4
DEPTH_SCALE = 1000
"""Depth PNGs store ``round(depth * DEPTH_SCALE)`` as uint16 (millimetre-like units)."""
TASKS: tuple[str, ...] = ("classification", "segmentation", "depth", "edges", "correspondence")

# ---------------------------------------------------------------------------------------
# Counter-based random numbers: value = hash(image key, field, element).
# ---------------------------------------------------------------------------------------
_M64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_M64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _image_keys(seed: int, split: str, start: int, n: int) -> np.ndarray:
    if split not in SPLITS:
        raise one_of("split", split, SPLITS)
    base = _mix(np.array([seed & _M64], dtype=np.uint64))
    base = _mix(base ^ np.uint64(SPLITS.index(split) + 1))
    return _mix(base ^ np.arange(start, start + n, dtype=np.uint64))


class _Stream:
    """Per-image random fields; each call uses the next field id, so call order matters."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys, self.field = keys, 0

    def uniform(self, lo: float = 0.0, hi: float = 1.0, shape: tuple[int, ...] = ()) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        ctr = np.arange(count, dtype=np.uint64) + np.uint64(self.field << 32)
        self.field += 1
        bits = _mix(self.keys[:, None] ^ _mix(ctr)[None, :])
        u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return lo + (hi - lo) * u.reshape((len(self.keys),) + tuple(shape))

    def integers(self, lo: int, hi: int, shape: tuple[int, ...] = ()) -> np.ndarray:
        return np.minimum(lo + np.floor(self.uniform(0, hi - lo, shape)), hi - 1).astype(np.int64)


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0,1] -> RGB [..., 3] (the piecewise-linear hexcone formula)."""
    k = (np.stack([np.full_like(h, 5.0), np.full_like(h, 3.0), np.full_like(h, 1.0)], -1)
         + h[..., None] * 6.0) % 6.0
    return v[..., None] * (1 - s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1))


# ---------------------------------------------------------------------------------------
# Scene parameters: L = MAX_OBJECTS + 1 layers per image, the last one is the background.
# ---------------------------------------------------------------------------------------
def _sample_scene(keys: np.ndarray, size: int) -> dict[str, np.ndarray]:
    r, n, S, L = _Stream(keys), len(keys), MAX_OBJECTS, MAX_OBJECTS + 1
    p: dict[str, np.ndarray] = {}
    n_obj = r.integers(1, S + 1)
    p["active"] = np.arange(L)[None, :] < n_obj[:, None]
    p["cls"] = np.concatenate([np.argsort(r.uniform(shape=(len(CLASSES),)), 1)[:, :S],
                               np.full((n, 1), -1)], 1)
    # Geometry in pixels; the background layer is centred with radius size/2.
    p["cx"] = np.concatenate([r.uniform(0.15, 0.85, (S,)), np.full((n, 1), 0.5)], 1) * size
    p["cy"] = np.concatenate([r.uniform(0.15, 0.85, (S,)), np.full((n, 1), 0.5)], 1) * size
    # Radii are scaled per class to equal area (a triangle gets a larger radius than a disk),
    # so no class wins "largest visible object" by construction.
    equal_area = np.sqrt(2.0 / _UNIT_AREA)[p["cls"][:, :S]]
    p["rad"] = np.concatenate([r.uniform(0.14, 0.30, (S,)) * equal_area,
                               np.full((n, 1), 0.5)], 1) * size
    p["rot"] = r.uniform(0, 2 * math.pi, (L,))
    p["shape"] = r.uniform(0, 1, (L,))  # per-class shape parameter, mapped in _inside
    # Colours: saturated objects, duller background.
    hue = r.uniform(shape=(L,))
    sat = np.concatenate([r.uniform(0.4, 1.0, (S,)), r.uniform(0.0, 0.5, (1,))], 1)
    val = np.concatenate([r.uniform(0.45, 1.0, (S,)), r.uniform(0.2, 0.95, (1,))], 1)
    p["c1"] = _hsv(hue, sat, val)
    p["c2"] = _hsv((hue + r.uniform(-0.3, 0.3, (L,))) % 1.0, r.uniform(0, 1, (L,)),
                   r.uniform(0.2, 1.0, (L,)))
    # Texture weight w = 0.5 + g.(u,v) + sum_j amp_j sin(f_j.(u,v) + phase_j), colour =
    # lerp(c1, c2, clamp(w)): flat has g = amp = 0, gradient only g, stripes one sinusoid,
    # noise three sinusoids of random direction and frequency.
    tex = np.array(TEXTURES)[r.integers(0, len(TEXTURES), (L,))]
    direction = r.uniform(0, 2 * math.pi, (L, 3))
    mag = np.where((tex == "stripes")[..., None], r.uniform(2, 4, (L, 3)) * math.pi,
                   r.uniform(1, 3, (L, 3)) * math.pi)          # radians per unit radius
    p["fx"], p["fy"] = mag * np.cos(direction), mag * np.sin(direction)
    p["phase"] = r.uniform(0, 2 * math.pi, (L, 3))
    p["amp"] = np.where((tex == "noise")[..., None], 0.25, 0.0) + np.where(
        (tex == "stripes")[..., None], np.array([0.5, 0.0, 0.0]), 0.0)
    gdir = r.uniform(0, 2 * math.pi, (L,))
    gscale = np.where(tex == "gradient", 0.5, 0.0)
    p["gx"], p["gy"] = gscale * np.cos(gdir), gscale * np.sin(gdir)
    # Shading: one light direction per scene, strength per object, none on the background.
    light = r.uniform(0, 2 * math.pi)
    p["lx"] = np.repeat(np.cos(light)[:, None], L, 1)
    p["ly"] = np.repeat(np.sin(light)[:, None], L, 1)
    p["shade"] = np.concatenate([r.uniform(0.0, 0.35, (S,)), np.zeros((n, 1))], 1)
    # Depth planes d = z + sx (x - cx)/size + sy (y - cy)/size. Slants change depth by at most
    # 0.3 * 2 * 1.06 * 0.374 < 0.24 inside an object and gaps are >= 0.6 > 2 * 0.24, so the
    # depth ranges of the slots never overlap.
    z = 1.0 + r.uniform(0, 1)[:, None] + np.cumsum(
        np.concatenate([np.zeros((n, 1)), r.uniform(0.6, 1.3, (S - 1,))], 1), 1)
    sx = np.concatenate([r.uniform(-0.3, 0.3, (S,)), r.uniform(-0.5, 0.5, (1,))], 1)
    sy = np.concatenate([r.uniform(-0.3, 0.3, (S,)), r.uniform(-3.0, -0.5, (1,))], 1)
    # The background stays >= 0.4 behind the last slot everywhere either view sees: ``reach``
    # is how far (in image widths from the centre) view 2's corners land in view-1 coordinates.
    p["H"] = _sample_homography(r, size)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    back = corners @ np.linalg.inv(p["H"]).transpose(0, 2, 1)
    reach = np.maximum(np.abs(back[..., :2] / back[..., 2:] - size / 2).max(1) / size, 0.5)
    z_bg = z[:, -1] + 0.4 + np.abs(sx[:, -1]) * reach[:, 0] + np.abs(sy[:, -1]) * reach[:, 1] \
        + r.uniform(0, 2)
    p["z"], p["sx"], p["sy"] = np.concatenate([z, z_bg[:, None]], 1), sx, sy
    return p


def _sample_homography(r: _Stream, size: int) -> np.ndarray:
    """Random near-identity homography [N,3,3] (view-1 pixels -> view-2 pixels)."""
    n = len(r.keys)
    ang, logs = r.uniform(-0.35, 0.35), r.uniform(-0.15, 0.15)
    aniso, shear = r.uniform(-0.1, 0.1), r.uniform(-0.1, 0.1)
    t = r.uniform(-0.1, 0.1, (2,)) * size
    persp = r.uniform(-0.4, 0.4, (2,)) / size
    sxy = np.exp(logs)[:, None] * np.exp(np.stack([aniso, -aniso], 1))
    c, s = np.cos(ang), np.sin(ang)
    A = np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)          # rotation
    A = A @ np.stack([np.stack([np.ones(n), shear], 1),
                      np.stack([np.zeros(n), np.ones(n)], 1)], 1)       # shear
    A = A * sxy[:, None, :]                                              # scales
    M = np.zeros((n, 3, 3))
    M[:, :2, :2], M[:, :2, 2], M[:, 2, :2], M[:, 2, 2] = A, t, persp, 1.0
    centre = np.eye(3)
    centre[:2, 2] = size / 2
    uncentre = np.eye(3)
    uncentre[:2, 2] = -size / 2
    return centre @ M @ uncentre


# ---------------------------------------------------------------------------------------
# Shapes in local coordinates (u, v): unit radius, every class fits in |(u,v)| <= 1.06.
# Order matches CLASSES and _UNIT_AREA.
# ``q`` in [0,1) is the per-object shape parameter.
# ---------------------------------------------------------------------------------------
def _polygon(u: torch.Tensor, v: torch.Tensor, sides: int) -> torch.Tensor:
    sector = 2 * math.pi / sides
    phi = torch.remainder(torch.atan2(v, u), sector) - sector / 2
    return torch.hypot(u, v) * torch.cos(phi) <= math.cos(math.pi / sides)


def _star(u: torch.Tensor, v: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    sector = 2 * math.pi / 5
    a = torch.remainder(torch.atan2(v, u), sector)
    a = torch.minimum(a, sector - a)                        # fold onto [0, pi/5]
    r = torch.hypot(u, v)
    qx, qy = r * torch.cos(a), r * torch.sin(a)
    dx, dy = inner * math.cos(sector / 2) - 1, inner * math.sin(sector / 2)
    return dx * qy - dy * (qx - 1) >= 0                      # origin side of the outer edge


def _inside(k: int, u: torch.Tensor, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    name = CLASSES[k]
    if name == "disk":
        return u * u + v * v <= 1
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) <= math.sqrt(0.5)
    if name == "triangle":
        return _polygon(u, v, 3)
    if name == "hexagon":
        return _polygon(u, v, 6)
    if name == "star":
        return _star(u, v, 0.38 + 0.12 * q)
    if name == "ring":
        rr = u * u + v * v
        return (rr <= 1) & (rr >= (0.5 + 0.2 * q) ** 2)
    if name == "cross":
        w = 0.22 + 0.13 * q
        au, av = u.abs(), v.abs()
        return ((au <= w) & (av <= 1)) | ((av <= w) & (au <= 1))
    if name == "ellipse":
        return u * u + (v / (0.45 + 0.2 * q)) ** 2 <= 1
    raise AssertionError(name)


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------
def _affine_tables(p: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer coefficients of functions that are affine in the pixel position (x, y).

    Every affine function is stored as three numbers (cx, cy, c0) meaning cx*x + cy*y + c0.
    Returns ``frame`` [N,L,2,3]: the layer's local coordinates u and v; and ``shading``
    [N,L,27]: columns 0-17 hold six affine functions, the texture base A = 0.5 + g.(u,v),
    the sinusoid arguments B_0..B_2 = f_j.(u,v) + phase_j, the shading factor S and the depth
    D; columns 18-20 the sinusoid amplitudes, 21-23 colour c1 and 24-26 c2 - c1. A layer
    renders as ``rgb = (c1 + (c2 - c1) * clamp(A + sum_j amp_j sin(B_j), 0, 1)) * S``.
    """
    c, s = np.cos(p["rot"]) / p["rad"], np.sin(p["rot"]) / p["rad"]
    u = np.stack([c, s, -p["cx"] * c - p["cy"] * s], -1)     # ((x-cx) cos + (y-cy) sin) / rad
    v = np.stack([-s, c, p["cx"] * s - p["cy"] * c], -1)     # ((y-cy) cos - (x-cx) sin) / rad

    def in_uv(a: np.ndarray, b: np.ndarray, const: np.ndarray) -> np.ndarray:   # a*u + b*v + const
        zero = np.zeros_like(const)
        return a[..., None] * u + b[..., None] * v + np.stack([zero, zero, const], -1)

    k = p["shade"] / p["rad"]                                      # 1 + shade * light . (x-c)/rad
    shading = np.stack([k * p["lx"], k * p["ly"],
                        1 - k * (p["lx"] * p["cx"] + p["ly"] * p["cy"])], -1)
    depth = np.stack([p["sx"] / size, p["sy"] / size,
                      p["z"] - (p["sx"] * p["cx"] + p["sy"] * p["cy"]) / size], -1)
    affine = [in_uv(p["gx"], p["gy"], np.full_like(c, 0.5))]
    affine += [in_uv(p["fx"][..., j], p["fy"][..., j], p["phase"][..., j]) for j in range(3)]
    table = np.concatenate([*affine, shading, depth, p["amp"], p["c1"], p["c2"] - p["c1"]], -1)
    return np.stack([u, v], -2), table


def _render_points(P: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """Evaluate the scene at points (x, y) [N,P] (or [1,P]) of view-1 pixel coordinates.

    Returns rgb [N,P,3] in [0,1], layer [N,P] (0..S-1 objects, S background), depth [N,P],
    and the full silhouette of every slot [N,S,P].
    """
    frame, T = P["frame"], P["shading"]
    N, L, F = T.shape
    S = L - 1
    x, y = x.expand(N, -1), y.expand(N, -1)
    layer = torch.full(x.shape, S, dtype=torch.long, device=x.device)
    amodal = torch.zeros((N, S) + x.shape[1:], dtype=torch.bool, device=x.device)
    for s in reversed(range(S)):                               # far to near: painter's order
        uv = frame[:, s, :, :, None]
        u, v = (uv[:, i, 0] * x + uv[:, i, 1] * y + uv[:, i, 2] for i in range(2))
        for k in range(len(CLASSES)):
            sel = (P["cls"][:, s] == k) & P["active"][:, s]
            if sel.any():
                amodal[sel, s] = _inside(k, u[sel], v[sel], P["shape"][sel, s, None])
        layer = torch.where(amodal[:, s], s, layer)
    # Shade every point once, with the coefficients of the layer it sees (one gather).
    rows = layer + torch.arange(N, device=x.device)[:, None] * L
    g = T.view(N * L, F).t().contiguous().index_select(1, rows.flatten()).view(F, *rows.shape)
    aff = [g[3 * i] * x + g[3 * i + 1] * y + g[3 * i + 2] for i in range(6)]
    w = aff[0]
    for j in range(3):
        w = w + g[18 + j] * torch.sin(aff[1 + j])
    w = w.clamp(0, 1)
    rgb = torch.stack([(g[21 + j] + g[24 + j] * w) * aff[4] for j in range(3)], -1).clamp(0, 1)
    return rgb, layer, aff[5], amodal


@dataclass
class ShapesBatch:
    """A rendered batch; all tensors on the render device. See the module docstring."""

    image: torch.Tensor            # uint8 [N,H,W,3]
    label: torch.Tensor            # int64 [N], index into CLASSES
    mask: torch.Tensor             # uint8 [N,H,W], 0 background, label+1 classes
    depth: torch.Tensor            # float32 [N,H,W], metre-like, > 0
    edges: torch.Tensor            # bool [N,H,W], occluding contours (near side)
    instance: torch.Tensor         # uint8 [N,H,W], 0 background, s+1 object slot s (1 nearest)
    amodal: torch.Tensor           # bool [N,MAX_OBJECTS,H,W], unoccluded slot silhouettes
    index: torch.Tensor            # int64 [N], image index within its split stream
    image2: torch.Tensor | None = None       # uint8 [N,H,W,3], second view
    mask2: torch.Tensor | None = None        # uint8 [N,H,W]
    depth2: torch.Tensor | None = None       # float32 [N,H,W] (depth of the scene point seen)
    homography: torch.Tensor | None = None   # float64 [N,3,3], view-1 px -> view-2 px
    valid: torch.Tensor | None = None        # bool [N,H,W], view-1 pixel lands inside view 2

    def __len__(self) -> int:
        return self.image.shape[0]

    def images01(self, second: bool = False) -> torch.Tensor:
        """Float images [N,3,H,W] in [0,1] (the library's image convention)."""
        img = self.image2 if second else self.image
        if img is None:
            raise BadInputError("this batch has no second view; render it with pair=True")
        return img.permute(0, 3, 1, 2).float() / 255.0

    def map_points(self, points, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Map view-1 points ``(x, y)`` [...,2] of image ``idx`` into view 2.

        Returns the view-2 points (float64, [...,2]) and a bool mask of those inside view 2.
        """
        if self.homography is None:
            raise BadInputError("this batch has no second view; render it with pair=True")
        H = self.homography[idx]
        pts = torch.as_tensor(points, dtype=torch.float64, device=H.device)
        return _apply_h(H, pts, self.image.shape[1])


def _apply_h(H: torch.Tensor, pts: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply homographies H [...,3,3] to points [...,P,2]; also report which land in [0,size)^2."""
    hom = torch.cat([pts, torch.ones_like(pts[..., :1])], -1) @ H.transpose(-1, -2)
    out = hom[..., :2] / hom[..., 2:]
    ok = (hom[..., 2] > 0) & (out >= 0).all(-1) & (out < size).all(-1)
    return out, ok


def _edges(layer: torch.Tensor) -> torch.Tensor:
    """Pixels with a 4-neighbour on a farther layer (layer ids increase with depth)."""
    e = torch.zeros_like(layer, dtype=torch.bool)
    e[:, 1:, :] |= layer[:, 1:, :] < layer[:, :-1, :]
    e[:, :-1, :] |= layer[:, :-1, :] < layer[:, 1:, :]
    e[:, :, 1:] |= layer[:, :, 1:] < layer[:, :, :-1]
    e[:, :, :-1] |= layer[:, :, :-1] < layer[:, :, 1:]
    return e


def _to_u8(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb * 255).round_().to(torch.uint8)


def _render_chunk(keys: np.ndarray, index: np.ndarray, size: int, pair: bool,
                  device: torch.device) -> ShapesBatch:
    params = _sample_scene(keys, size)
    frame, shading = _affine_tables(params, size)
    P = {"frame": torch.as_tensor(frame, dtype=torch.float32, device=device),
         "shading": torch.as_tensor(shading, dtype=torch.float32, device=device),
         "shape": torch.as_tensor(params["shape"], dtype=torch.float32, device=device),
         **{k: torch.as_tensor(params[k], device=device) for k in ("cls", "active", "H")}}
    N, S = len(keys), MAX_OBJECTS
    centres = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    x, y = gx.reshape(1, -1), gy.reshape(1, -1)
    rgb, layer, depth, amodal = _render_points(P, x, y)
    cls = P["cls"].gather(1, layer)
    mask = (cls + 1).to(torch.uint8).view(N, size, size)
    counts = torch.zeros(N, len(CLASSES) + 1, device=device).scatter_add_(
        1, mask.view(N, -1).long(), torch.ones(N, size * size, device=device))
    layer = layer.view(N, size, size)
    out = ShapesBatch(
        image=_to_u8(rgb).view(N, size, size, 3), label=counts[:, 1:].argmax(1), mask=mask,
        depth=depth.view(N, size, size), edges=_edges(layer),
        instance=torch.where(layer == S, 0, layer + 1).to(torch.uint8),
        amodal=amodal.view(N, S, size, size),
        index=torch.as_tensor(index, device=device))
    if pair:
        H = P["H"]
        grid = torch.stack([x, y], -1).double().expand(N, -1, -1)
        back, _ = _apply_h(torch.linalg.inv(H), grid, size)    # view-2 pixel -> view-1 point
        back = back.float()
        rgb2, layer2, depth2, _ = _render_points(P, back[..., 0], back[..., 1])
        _, ok = _apply_h(H, grid, size)
        out.image2 = _to_u8(rgb2).view(N, size, size, 3)
        out.mask2 = (P["cls"].gather(1, layer2) + 1).to(torch.uint8).view(N, size, size)
        out.depth2, out.homography = depth2.view(N, size, size), H
        out.valid = ok.view(N, size, size)
    return out


def render(n: int, seed: int = 0, split: str = "train", size: int = 64, start: int = 0,
           pair: bool = False, device: str | torch.device = "cpu",
           chunk: int | None = None) -> ShapesBatch:
    """Render images ``start .. start+n-1`` of the ``split`` stream of ``seed``.

    ``pair=True`` adds the second view (``image2``, ``mask2``, ``depth2``, ``homography``,
    ``valid``). Work is done in chunks of ``chunk`` images (default 64 on CPU, where small
    chunks stay in cache, 4096 elsewhere).
    """
    if n < 1 or size < 8 or start < 0:
        raise BadInputError(f"render needs n >= 1, size >= 8 and start >= 0 "
                            f"(got {n}, {size}, {start})")
    keys = _image_keys(seed, split, start, n)
    index = np.arange(start, start + n)
    device = torch.device(device)
    chunk = chunk or (64 if device.type == "cpu" else 4096)
    parts = [_render_chunk(keys[i:i + chunk], index[i:i + chunk], size, pair, device)
             for i in range(0, n, chunk)]
    if len(parts) == 1:
        return parts[0]
    return ShapesBatch(**{f: None if getattr(parts[0], f) is None else
                          torch.cat([getattr(p, f) for p in parts])
                          for f in ShapesBatch.__dataclass_fields__})


def render_pair(n: int, seed: int = 0, split: str = "train", size: int = 64, start: int = 0,
                device: str | torch.device = "cpu") -> ShapesBatch:
    """:func:`render` with the second view (for correspondence)."""
    return render(n, seed=seed, split=split, size=size, start=start, pair=True, device=device)


# ---------------------------------------------------------------------------------------
# Folder export
# ---------------------------------------------------------------------------------------
def _colours() -> list[tuple[int, int, int]]:
    """Mask palette: black background, evenly spaced hues for the classes."""
    hues = np.arange(len(CLASSES)) / len(CLASSES)
    rgb = _hsv(hues, np.full_like(hues, 0.8), np.ones_like(hues))
    return [(0, 0, 0)] + [tuple(int(round(c * 255)) for c in row) for row in rgb]


def _bbox(mask: torch.Tensor) -> list[float]:
    """[x1, y1, x2, y2] (0-based pixel indices) of a bool mask; the whole image if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return [0.0, 0.0, float(mask.shape[1] - 1), float(mask.shape[0] - 1)]
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def _spair_pair(b: ShapesBatch, i: int, stride: int, max_points: int) -> dict:
    """A SPair-71k style pair annotation for image ``i`` of a paired batch.

    Keypoints are the view-1 pixels on a ``stride`` grid that lie on an object and land
    inside view 2 (at most ``max_points``, evenly spread), mapped exactly. All coordinates
    use the SPair / difffeat.heads.matching convention: 0-based pixel indices, so pixel
    centres are integers (``x_index = x - 0.5``); ``homography`` maps them too.
    """
    size = b.image.shape[1]
    c = torch.arange(stride // 2, size, stride)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    keep = (b.mask[i][yy, xx] > 0) & b.valid[i][yy, xx]
    yy, xx = yy[keep], xx[keep]
    if len(xx) > max_points:
        pick = torch.linspace(0, len(xx) - 1, max_points).round().long()
        yy, xx = yy[pick], xx[pick]
    p1 = torch.stack([xx, yy], -1).double()
    p2, _ = b.map_points(p1 + 0.5, i)
    shift = torch.eye(3, dtype=torch.float64)
    shift[:2, 2] = 0.5
    H_index = torch.linalg.inv(shift) @ b.homography[i].cpu() @ shift
    cls = int(b.label[i])
    return {"src_kps": p1.tolist(), "trg_kps": (p2 - 0.5).tolist(),
            "kps_ids": list(range(len(p1))), "category": CLASSES[cls],
            "src_imsize": [size, size, 3], "trg_imsize": [size, size, 3],
            "src_bndbox": _bbox(b.mask[i] == cls + 1), "trg_bndbox": _bbox(b.mask2[i] == cls + 1),
            "homography": H_index.tolist()}


def write_folder(root: str | Path, n: int, split: str = "train", seed: int = 0, size: int = 64,
                 tasks: Iterable[str] = TASKS, start: int = 0, chunk: int = 256,
                 points_stride: int = 4, max_points: int = 32) -> Path:
    """Write ``n`` scenes of ``split`` in the folder formats the difffeat tasks read.

    * always ``images/NNNNNN.png`` and ``meta.json`` (every convention, machine-readable);
    * classification: ``by_class/<class>/NNNNNN.png`` (class = ``label``);
    * segmentation: ``masks/NNNNNN.png`` indexed PNGs and ``classes.txt`` with one
      ``name #rrggbb`` line per mask id (line 0 = background, line k = ``CLASSES[k-1]``);
    * depth: ``depth/NNNNNN.png`` uint16 = round(depth * 1000), scale in ``depth_scale.txt``;
    * edges: ``edges/NNNNNN.png``, 255 on edges, 0 elsewhere;
    * correspondence: a SPair-71k layout (``tasks.correspond_data.load_spair(root, split)``
      reads it; split names trn/val/test): ``JPEGImages/<class>/NNNNNN.png`` and
      ``NNNNNN_b.png`` (the second view) and ``PairAnnotation/<split>/*.json`` with exact
      keypoint matches (see :func:`_spair_pair`) and the homography.
    """
    from PIL import Image

    tasks = tuple(tasks)
    for t in tasks:
        if t not in TASKS:
            raise one_of("task", t, TASKS)
    if split not in SPLITS:
        raise one_of("split", split, SPLITS)
    root = Path(root)
    spair_split = {"train": "trn", "val": "val", "test": "test"}[split]
    (root / "images").mkdir(parents=True, exist_ok=True)
    for t, d in (("segmentation", "masks"), ("depth", "depth"), ("edges", "edges")):
        if t in tasks:
            (root / d).mkdir(exist_ok=True)
    colours = _colours()
    if "segmentation" in tasks:
        names = ("background",) + CLASSES
        (root / "classes.txt").write_text(
            "".join(f"{nm} #{r:02x}{g:02x}{b:02x}\n" for nm, (r, g, b) in zip(names, colours)))
    if "depth" in tasks:
        (root / "depth_scale.txt").write_text(f"{DEPTH_SCALE}\n")
    meta = {"dataset": "difffeat shapes", "split": split, "seed": seed, "size": size,
            "start": start, "n": n, "classes": list(CLASSES),
            "mask_values": {"0": "background", **{str(i + 1): c for i, c in enumerate(CLASSES)}},
            "depth_scale": DEPTH_SCALE, "tasks": list(tasks),
            "pixel_centres": "images: (col + 0.5, row + 0.5); SPair keypoints: (col, row)"}
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    palette = [v for c in colours for v in c]
    pair = "correspondence" in tasks
    for s in range(start, start + n, chunk):
        b = render(min(chunk, start + n - s), seed=seed, split=split, size=size, start=s, pair=pair)
        for i in range(len(b)):
            stem = f"{int(b.index[i]):06d}"
            cls = CLASSES[int(b.label[i])]
            img = Image.fromarray(b.image[i].numpy())
            img.save(root / "images" / f"{stem}.png")
            if "classification" in tasks:
                (root / "by_class" / cls).mkdir(parents=True, exist_ok=True)
                img.save(root / "by_class" / cls / f"{stem}.png")
            if "segmentation" in tasks:
                m = Image.fromarray(b.mask[i].numpy())
                m.putpalette(palette)                                   # mode L -> P
                m.save(root / "masks" / f"{stem}.png")
            if "depth" in tasks:
                d = (b.depth[i] * DEPTH_SCALE).round().clamp(1, 65535).numpy().astype(np.uint16)
                Image.fromarray(d).save(root / "depth" / f"{stem}.png")
            if "edges" in tasks:
                edge = b.edges[i].numpy().astype(np.uint8) * 255
                Image.fromarray(edge).save(root / "edges" / f"{stem}.png")
            if pair:
                (root / "JPEGImages" / cls).mkdir(parents=True, exist_ok=True)
                (root / "PairAnnotation" / spair_split).mkdir(parents=True, exist_ok=True)
                img.save(root / "JPEGImages" / cls / f"{stem}.png")
                view2 = Image.fromarray(b.image2[i].numpy())
                view2.save(root / "JPEGImages" / cls / f"{stem}_b.png")
                ann = {"src_imname": f"{stem}.png", "trg_imname": f"{stem}_b.png",
                       **_spair_pair(b, i, points_stride, max_points)}
                name = f"{stem}-{stem}-{stem}_b:{cls}.json"
                (root / "PairAnnotation" / spair_split / name).write_text(json.dumps(ann))
    return root
