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

Which folders and suffixes a task's labels have, and how they are read, is its record in
:mod:`.dense_tasks` (the readers: :mod:`.dense_io`). ``labels=`` names another label folder.
``reduce_zero_label`` reads ADE20K-style masks (0 = ignore, k = class k-1; mmseg's option of
the same name). :meth:`DenseFolder.validate` (run by default) checks everything before
training and raises one :class:`~difffeat.errors.BadInputError` line naming the first
offenders: images without labels and labels without images, label sizes that differ from
their image, label values out of range, unreadable files. EXR depth is not supported (Pillow
cannot read it; convert to .npy).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from difffeat.errors import BadInputError
from difffeat.io import check_regular_file, list_images, load_image, pil_to_tensor

from .dense_io import IGNORE_INDEX, SHOW, default_palette, load_depth, load_edges, load_mask, read_classes
from .dense_tasks import TASKS, DenseTask, LabelSettings, get_task


@dataclass(frozen=True)
class Sample:
    name: str  # relative path without suffix, "/"-separated
    image: Path
    label: Path


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

    ``task``: a name in :data:`~difffeat.tasks.dense_tasks.TASKS` (or its record), which says
    where the labels are and how they are read. ``image``: float ``[3, H, W]`` in [0, 1].
    ``target``: seg int64 ``[H, W]`` (255 = ignore), depth float ``[H, W]`` metres (0 =
    invalid), edges float ``[H, W]`` in [0, 1] (annotators averaged, the stack kept as
    ``annotations``). ``transform``, if given, maps the item dict to a new one.
    """

    def __init__(
        self,
        root: str | Path,
        task: str | DenseTask,
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
        self.spec = task if isinstance(task, DenseTask) else get_task(task)
        self.root, self.task = Path(root), self.spec.name
        self.depth_scale, self.ignore_index, self.transform = float(depth_scale), int(ignore_index), transform
        self.reduce_zero_label = bool(reduce_zero_label) and self.spec.classes
        if not self.root.is_dir():
            raise BadInputError(f"dataset folder not found: {self.root}")
        self.images_dir = self.root / images
        if not self.images_dir.is_dir():
            raise BadInputError(f"no {images}/ folder in {self.root} (expected images in {self.images_dir})")
        self.labels_dir = self._find_labels(labels)
        self.classes, self.palette = self._find_classes(classes)
        self.settings = LabelSettings(self.depth_scale, self.ignore_index, self.reduce_zero_label, self.palette)
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
        for name in self.spec.label_dirs:
            if (self.root / name).is_dir():
                return self.root / name
        wanted = ", ".join(f"{n}/" for n in self.spec.label_dirs)
        raise BadInputError(f"no {self.task} label folder in {self.root} (looked for {wanted}); pass labels=")

    def _find_classes(self, classes: str | Path | Sequence[str] | None):  # type: ignore[no-untyped-def]
        if not self.spec.classes:
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
        labels: dict[str, Path] = {}
        for p in sorted(self.labels_dir.rglob("*")):
            if p.is_file() and p.suffix.lower() in self.spec.label_exts:
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
        kind = self.spec.label_name
        problems: list[str] = []
        if self._orphans["no_label"]:
            problems.append(_listing(f"image(s) without a {kind} in {self.labels_dir}", self._orphans["no_label"]))
        if self._orphans["no_image"]:
            problems.append(_listing(f"{kind}(s) without an image in {self.images_dir}", self._orphans["no_image"]))
        if not self.samples and not problems:
            problems.append(f"no image/{kind} pairs found")
        max_label = self._check_labels(problems)
        if problems:
            raise BadInputError(f"bad {self.task} dataset {self.root}: " + "; ".join(problems))
        if self.spec.classes and self._num_classes is None:
            self._num_classes = max_label + 1 - int(self.reduce_zero_label)

    def _check_labels(self, problems: list[str]) -> int:
        """Read every label: unreadable ones, sizes and (class labels) ids out of range go to
        ``problems``; returns the largest class id found (-1: none)."""
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
                sizes.append(f"{s.name} ({self.spec.label_name} {lw}x{lh} vs image {w}x{h})")
            if self.spec.classes:
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
            problems.append(_listing(f"{self.spec.label_name}(s) with ids outside 0..{limit - 1} ({self.ignore_index} = ignore)", values))
        return max_label

    # ---------------------------------------------------------------- access
    @property
    def num_classes(self) -> int | None:
        """Number of classes (class labels): from classes.txt, else largest id + 1 found by validation."""
        if self.spec.classes and self._num_classes is None:
            self._num_classes = 1 - int(self.reduce_zero_label) + max(
                int(np.max(np.where(m == self.ignore_index, -1, m), initial=-1))
                for m in (self._read_label(s.label) for s in self.samples)
            )
        return self._num_classes

    def _read_label(self, path: Path) -> np.ndarray:
        return self.spec.read_label(path, self.settings)

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self, i: int) -> dict[str, Any]:
        """Item ``i`` without its image: ``{"target", "name"[, "annotations"]}``."""
        s = self.samples[i]
        item: dict[str, Any] = dict(self.spec.targets(self._read_label(s.label), self.settings))
        item["name"] = s.name
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
    "DenseFolder", "IGNORE_INDEX", "Sample", "TASKS", "default_palette",
    "load_depth", "load_edges", "load_mask", "read_classes",
]
