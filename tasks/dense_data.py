"""Labelled image folders for dense tasks: segmentation masks, depth maps, edge maps.

Layout (labels mirror the image paths, any sub-folders, matched by path without suffix)::

    root/images/<name>.jpg|png|...
    root/masks/<name>.png        seg: indexed (P) or grey PNG of class ids, 255 = ignore;
                                 RGB masks are mapped through the palette
    root/depth/<name>.png|.npy   depth: 16-bit PNG (metres = value / depth_scale, 0 = invalid)
                                 or float .npy in metres (NaN/inf/<=0 = invalid)
    root/edges/<name>.png|.npy   edges: grey PNG, value/255 as a (soft) edge probability, or
                                 .npy [H,W] / [A,H,W] in [0,1] (A annotators, averaged for training)
    root/classes.txt             seg: one class name per line, optionally "name #rrggbb"

``labels=`` names another label folder. ``reduce_zero_label`` reads ADE20K-style masks
(0 = ignore, k = class k-1; mmseg's option of the same name). :meth:`DenseFolder.validate` (run by default)
checks everything before training and raises one :class:`~difffeat.errors.BadInputError`
line naming the first offenders: images without labels and labels without images, label
sizes that differ from their image, label values out of range, unreadable files. EXR depth
is not supported (Pillow cannot read it; convert to .npy).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from difffeat.errors import BadInputError, one_of
from difffeat.io import check_regular_file, list_images, load_image, pil_to_tensor

TASKS = ("seg", "depth", "edges")
LABEL_DIRS = {"seg": ("masks", "labels", "annotations"), "depth": ("depth", "depths"), "edges": ("edges", "boundaries")}
LABEL_EXTS = {
    "seg": (".png", ".bmp", ".tif", ".tiff"),
    "depth": (".png", ".tif", ".tiff", ".npy", ".exr"),
    "edges": (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy"),
}
IGNORE_INDEX = 255
SHOW = 5  # offenders named per problem


@dataclass(frozen=True)
class Sample:
    name: str  # relative path without suffix, "/"-separated
    image: Path
    label: Path


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


def _image_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image after EXIF orientation, read from the header only."""
    check_regular_file(Path(path))
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:
        raise BadInputError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# --------------------------------------------------------------------------- dataset
class DenseFolder(Dataset):
    """Images paired with dense labels; items are ``{"image", "target", "name"}``.

    ``image``: float ``[3, H, W]`` in [0, 1]. ``target``: seg int64 ``[H, W]`` (255 =
    ignore), depth float ``[H, W]`` metres (0 = invalid), edges float ``[H, W]`` in [0, 1]
    (annotators averaged). ``transform``, if given, maps the item dict to a new one.
    """

    def __init__(
        self,
        root: str | Path,
        task: str,
        *,
        images: str | Path = "images",
        labels: str | Path | None = None,
        classes: str | Path | Sequence[str] | None = None,
        depth_scale: float = 1000.0,
        ignore_index: int = IGNORE_INDEX,
        reduce_zero_label: bool = False,
        validate: bool = True,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if task not in TASKS:
            raise one_of("task", task, TASKS)
        self.root, self.task = Path(root), task
        self.depth_scale, self.ignore_index, self.transform = float(depth_scale), int(ignore_index), transform
        self.reduce_zero_label = bool(reduce_zero_label) and task == "seg"
        if not self.root.is_dir():
            raise BadInputError(f"dataset folder not found: {self.root}")
        self.images_dir = self.root / images
        if not self.images_dir.is_dir():
            raise BadInputError(f"no {images}/ folder in {self.root} (expected images in {self.images_dir})")
        self.labels_dir = self._find_labels(labels)
        self.classes, self.palette = self._find_classes(classes)
        self.samples, self._orphans = self._pair()
        self._num_classes: int | None = len(self.classes) if self.classes else None
        if validate:
            self.validate()

    # ---------------------------------------------------------------- construction
    def _find_labels(self, labels: str | Path | None) -> Path:
        if labels is not None:
            p = Path(labels) if Path(labels).is_absolute() else self.root / labels
            if not p.is_dir():
                raise BadInputError(f"label folder not found: {p}")
            return p
        for name in LABEL_DIRS[self.task]:
            if (self.root / name).is_dir():
                return self.root / name
        wanted = ", ".join(f"{n}/" for n in LABEL_DIRS[self.task])
        raise BadInputError(f"no {self.task} label folder in {self.root} (looked for {wanted}); pass labels=")

    def _find_classes(self, classes: str | Path | Sequence[str] | None):  # type: ignore[no-untyped-def]
        if self.task != "seg":
            return None, None
        if classes is None:
            path = self.root / "classes.txt"
            return read_classes(path) if path.exists() else (None, None)
        if isinstance(classes, (str, Path)):
            p = Path(classes) if Path(classes).is_absolute() or Path(classes).exists() else self.root / classes
            if not p.exists():
                raise BadInputError(f"classes file not found: {p}")
            return read_classes(p)
        return list(classes), None

    def _pair(self) -> tuple[list[Sample], dict[str, list[str]]]:
        images = {_key(p, self.images_dir): p for p in list_images(self.images_dir)}
        exts = LABEL_EXTS[self.task]
        labels: dict[str, Path] = {}
        for p in sorted(self.labels_dir.rglob("*")):
            if p.is_file() and p.suffix.lower() in exts:
                labels.setdefault(_key(p, self.labels_dir), p)
        samples = [Sample(k, images[k], labels[k]) for k in sorted(images) if k in labels]
        orphans = {
            "no_label": [images[k].name for k in sorted(images) if k not in labels],
            "no_image": [labels[k].name for k in sorted(labels) if k not in images],
        }
        return samples, orphans

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check pairing, sizes and label values; one :class:`BadInputError` line if bad."""
        kind = {"seg": "mask", "depth": "depth map", "edges": "edge map"}[self.task]
        problems: list[str] = []
        if self._orphans["no_label"]:
            problems.append(_listing(f"image(s) without a {kind} in {self.labels_dir}", self._orphans["no_label"]))
        if self._orphans["no_image"]:
            problems.append(_listing(f"{kind}(s) without an image in {self.images_dir}", self._orphans["no_image"]))
        if not self.samples and not problems:
            problems.append(f"no image/{kind} pairs found")
        sizes, values, unreadable = [], [], []
        max_label = -1
        shift = 1 if self.reduce_zero_label else 0  # ADE20K style: stored id 0 = ignore, k = class k-1
        limit = len(self.classes) + shift if self.classes else self.ignore_index  # valid stored ids: 0..limit-1
        for s in self.samples:
            try:
                w, h = _image_size(s.image)
                label = self._read_label(s.label)
            except BadInputError as e:
                unreadable.append(f"{s.name} ({e})")
                continue
            lh, lw = label.shape[-2:]
            if (lh, lw) != (h, w):
                sizes.append(f"{s.name} ({kind} {lw}x{lh} vs image {w}x{h})")
            if self.task == "seg":
                vals = np.unique(label)
                vals = vals[vals != self.ignore_index]
                bad = vals[(vals < 0) | (vals >= limit)]
                if bad.size:
                    values.append(f"{s.name} (values {', '.join(map(str, bad[:SHOW].tolist()))})")
                if vals.size:
                    max_label = max(max_label, int(vals.max()))
        if unreadable:
            problems.append(_listing("unreadable label(s)", unreadable))
        if sizes:
            problems.append(_listing("size mismatch(es)", sizes))
        if values:
            problems.append(_listing(f"mask(s) with ids outside 0..{limit - 1} ({self.ignore_index} = ignore)", values))
        if problems:
            raise BadInputError(f"bad {self.task} dataset {self.root}: " + "; ".join(problems))
        if self.task == "seg" and self._num_classes is None:
            self._num_classes = max_label + 1 - shift

    # ---------------------------------------------------------------- access
    @property
    def num_classes(self) -> int | None:
        """Number of classes (seg): from classes.txt, else largest id + 1 found by validation."""
        if self.task == "seg" and self._num_classes is None:
            self._num_classes = 1 - int(self.reduce_zero_label) + max(
                int(np.max(np.where(m == self.ignore_index, -1, m), initial=-1))
                for m in (self._read_label(s.label) for s in self.samples)
            )
        return self._num_classes

    def _read_label(self, path: Path) -> np.ndarray:
        if self.task == "seg":
            return load_mask(path, self.palette)
        if self.task == "depth":
            return load_depth(path, self.depth_scale)
        return load_edges(path)

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self, i: int) -> dict[str, Any]:
        """Item ``i`` without its image: ``{"target", "name"[, "annotations"]}``."""
        s = self.samples[i]
        label = self._read_label(s.label)
        if self.task == "seg":
            target = torch.from_numpy(label.astype(np.int64))
            if self.reduce_zero_label:
                target = torch.where((target == 0) | (target == self.ignore_index), self.ignore_index, target - 1)
        else:
            arr = label.mean(0) if label.ndim == 3 else label
            target = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        item: dict[str, Any] = {"target": target, "name": s.name}
        if self.task == "edges" and label.ndim == 3:
            item["annotations"] = torch.from_numpy(label)
        return item

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.labels(i)
        item["image"] = pil_to_tensor(load_image(self.samples[i].image))
        return self.transform(item) if self.transform else item


def _key(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _listing(what: str, items: list[str]) -> str:
    more = f" and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return f"{len(items)} {what}: {', '.join(items[:SHOW])}{more}"


__all__ = [
    "DenseFolder", "IGNORE_INDEX", "LABEL_DIRS", "Sample", "TASKS", "default_palette",
    "load_depth", "load_edges", "load_mask", "read_classes",
]
