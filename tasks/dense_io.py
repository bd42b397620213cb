"""The files of the dense tasks: label readers and prediction writers.

Labels (see :mod:`difffeat.tasks.dense_data` for the folder layout):

* masks: indexed (P) or grey PNG of class ids, 255 = ignore; RGB masks through a palette
  (:func:`load_mask`); class names and colours from a ``classes.txt`` (:func:`read_classes`);
* depth: 16-bit PNG (metres = value / depth_scale, 0 = invalid) or float .npy in metres
  (:func:`load_depth`; EXR is not supported: Pillow cannot read it);
* edges: grey PNG (value / 255, a soft edge probability) or .npy ``[H, W]`` / ``[A, H, W]``
  (A annotators; :func:`load_edges`).

Predictions: seg -> indexed PNG + colour overlay (:func:`write_seg`), depth -> 16-bit PNG
+ colour-mapped PNG (:func:`write_depth`), edges -> probability PNG, optionally NMS'd or
thinned to binary (:func:`write_edges`). Every output is written atomically, the file that
marks an image done last.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from difffeat.errors import BadInputError
from difffeat.io import atomic_path, check_regular_file, save_png

from .edge_ops import edge_nms, thin

IGNORE_INDEX = 255
SHOW = 5  # offenders named per problem


# --------------------------------------------------------------------------- classes
def read_classes(path: str | Path) -> tuple[list[str], list[tuple[int, int, int]] | None]:
    """Class names (and colours when every line has ``#rrggbb``) from a classes.txt."""
    names: list[str] = []
    colours: list[tuple[int, int, int] | None] = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.match(r"^(.*?)[\s,;:]+#([0-9a-fA-F]{6})$", line)
        if m:
            names.append(m.group(1).strip())
            colours.append(tuple(int(m.group(2)[i : i + 2], 16) for i in (0, 2, 4)))  # type: ignore[arg-type]
        else:
            names.append(line)
            colours.append(None)
    if not names:
        raise BadInputError(f"{path} lists no classes (one name per line)")
    if len(names) > IGNORE_INDEX:
        raise BadInputError(f"{path} lists {len(names)} classes; at most {IGNORE_INDEX} fit ids 0..254 (255 = ignore)")
    palette = None if any(c is None for c in colours) else [c for c in colours if c is not None]
    return names, palette


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC bit-interleaved colour map (class 0 black), for ``n`` classes."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


# --------------------------------------------------------------------------- label readers
def load_mask(path: str | Path, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Class-id mask ``[H, W]`` (int64) from an indexed, grey or (with ``palette``) RGB image."""
    with _open(path) as im:
        mode = im.mode
        if mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
            return np.asarray(im, dtype=np.int64).copy()
        if mode == "LA":
            return np.asarray(im.getchannel(0), dtype=np.int64).copy()
        rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].copy()
    if palette is None:
        raise BadInputError(f"colour mask {path} needs a palette: add '#rrggbb' colours to classes.txt or save indexed PNGs")
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    lut = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(palette)}
    out = np.full(codes.shape, IGNORE_INDEX, np.int64)
    unknown = []
    for code in np.unique(codes):
        if int(code) in lut:
            out[codes == code] = lut[int(code)]
        else:
            unknown.append(f"#{int(code):06x}")
    if unknown:
        raise BadInputError(f"mask {path} has colours not in the palette: {', '.join(unknown[:SHOW])}")
    return out


def load_depth(path: str | Path, depth_scale: float = 1000.0) -> np.ndarray:
    """Depth ``[H, W]`` float32 in metres, 0 where invalid."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".exr":
        raise BadInputError(f"EXR depth is not supported ({path}); save float32 .npy or 16-bit PNG instead")
    if suffix == ".npy":
        arr = _load_npy(path).squeeze()
        if arr.ndim != 2:
            raise BadInputError(f"depth {path} has shape {arr.shape}; expected [H, W]")
        arr = arr.astype(np.float32)
        arr[~np.isfinite(arr) | (arr <= 0)] = 0.0
        return arr
    with _open(path) as im:
        if im.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise BadInputError(
                f"depth {path} is {im.mode!r} (8-bit?); expected a 16-bit PNG (metres x {depth_scale:g}) or .npy"
            )
        arr = np.asarray(im, dtype=np.float32)
    if im.mode == "F":
        out = arr.copy()
    else:
        out = arr / float(depth_scale)
    out[~np.isfinite(out) | (out <= 0)] = 0.0
    return out


def load_edges(path: str | Path) -> np.ndarray:
    """Edge map ``[H, W]`` or annotator stack ``[A, H, W]``, float32 in [0, 1]."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = _load_npy(path).astype(np.float32)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[0] == 0):
            raise BadInputError(f"edge map {path} has shape {arr.shape}; expected [H, W] or [A, H, W]")
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise BadInputError(f"edge map {path} has values outside [0, 1]")
        return arr
    with _open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.float32) / 65535.0
        if im.mode == "1":
            return np.asarray(im, dtype=np.float32)
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _open(path: str | Path) -> Image.Image:
    check_regular_file(Path(path))  # a FIFO or device named like a label is refused, never opened
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise BadInputError(f"label file not found: {path}") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise BadInputError(f"cannot read label {path}: {type(e).__name__}: {e}") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise BadInputError(f"cannot read {path}: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- output files
def seg_palette(config: Mapping[str, Any], n: int) -> list[tuple[int, int, int]]:
    pal = config.get("palette")
    return [tuple(c) for c in pal] if pal and len(pal) >= n else default_palette(max(n, 1))  # type: ignore[misc]


def write_seg(path: Path, labels: np.ndarray, image: Image.Image, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> None:
    """Indexed PNG ``path`` (written last: marks the image done) + ``<stem>_overlay.png``."""
    pal = np.zeros((256, 3), np.uint8)
    pal[: min(256, len(palette))] = np.asarray(palette[:256], np.uint8)
    colour = pal[labels.clip(0, 255)]
    overlay = (np.asarray(image.convert("RGB"), np.float32) * (1 - alpha) + colour * alpha + 0.5).astype(np.uint8)
    save_png(path.with_name(path.stem + "_overlay.png"), overlay)
    mask = Image.fromarray(labels.astype(np.uint8), mode="P")
    mask.putpalette(pal.flatten().tolist())
    with atomic_path(path) as tmp:
        mask.save(tmp, format="PNG")


def write_depth(path: Path, depth: np.ndarray, depth_scale: float, relative: bool) -> dict[str, float]:
    """16-bit PNG (metric: metres x ``depth_scale``; relative: min-max to 0..65535) + ``_color.png``."""
    from difffeat.viz import colormap

    d = depth.astype(np.float64)
    lo, hi = float(d.min()), float(d.max())
    if relative:
        q = (d - lo) / max(hi - lo, 1e-12) * 65535.0
    else:
        q = d * depth_scale
    save_png(path.with_name(path.stem + "_color.png"), colormap(-d))  # near = warm
    save_png(path, np.clip(q + 0.5, 0, 65535).astype(np.uint16))
    return {"min": lo, "max": hi}


def write_edges(path: Path, prob: np.ndarray, nms: bool = False, thin_threshold: float | None = None) -> None:
    """8-bit edge probability PNG; ``nms`` suppresses non-maxima; ``thin_threshold`` writes thinned 0/255."""
    p = edge_nms(prob) if nms else prob
    if thin_threshold is not None:
        p = thin(p >= thin_threshold).astype(np.float32)
    save_png(path, (np.clip(p, 0, 1) * 255 + 0.5).astype(np.uint8))


