"""Semantic-correspondence benchmarks: SPair-71k and PF-Pascal loaders, and PCK.

Both loaders read the datasets in their published folder formats and return
:class:`CorrespondencePair` records whose keypoints follow the convention of
:mod:`difffeat.heads.matching`: ``(x, y)`` pixels, pixel centres at integer
coordinates, 0-based.

SPair-71k (Min et al., "SPair-71k: A Large-scale Benchmark for Semantic Correspondence", 2019)::

    SPair-71k/
      JPEGImages/<category>/<imname>.jpg
      ImageAnnotation/<category>/<imname>.json      (not needed for PCK)
      PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json
      Layout/{large,small}/{trn,val,test}.txt        (one pair name per line, no .json)

  A pair JSON carries ``src_imname``, ``trg_imname``, ``category``, ``src_imsize`` /
  ``trg_imsize`` as ``[W, H, C]``, ``src_bndbox`` / ``trg_bndbox`` as ``[x1, y1, x2, y2]``,
  ``src_kps`` / ``trg_kps`` as lists of ``[x, y]`` (only keypoints visible in both
  images), ``kps_ids`` and difficulty flags. Coordinates are 0-based pixel indices
  (DIFT reads ``feature[:, y, x]`` at them).

PF-Pascal (Ham et al., "Proposal Flow", CVPR 2016; the pair lists of Rocco et al.'s
CNNGeometric / WeakAlign that DIFT, SD-DINO and GeoAware-SC evaluate on)::

    <data>/PF-dataset-PASCAL/
      JPEGImages/<imname>.jpg
      {trn,val,test}_pairs_pf_pascal.csv   (or {split}_pairs.csv)

  CSV columns ``source_image,target_image,class,XA,YA,XB,YB``: image paths relative to
  ``<data>`` (``PF-dataset-PASCAL/JPEGImages/...``), ``class`` a 1-based index into the 20
  VOC classes, and ``;``-separated keypoint coordinates, 1-based as in MATLAB (WeakAlign
  subtracts 1 when normalising them); the loader converts them to 0-based. The CSV has
  no bounding boxes, so PF-Pascal uses the image normaliser.

PCK@alpha: a predicted keypoint is correct when its distance to the ground truth is
``<= alpha * L`` (DIFT's and DHPF's ``<=``). ``L`` is the *bbox* normaliser
``max(x2 - x1, y2 - y1)`` of the target box (SPair-71k convention) or the *image*
normaliser ``max(H, W)`` of the target image (PF-Pascal convention). Averages are
reported per image (mean over pairs of the fraction correct within the pair; DIFT's
"per image" number) and per keypoint (all keypoints pooled; "per point").
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from difffeat.errors import BadInputError, one_of

SPAIR_SPLITS: tuple[str, ...] = ("trn", "val", "test")
SPAIR_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)
PASCAL_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
PF_PASCAL_COLUMNS: tuple[str, ...] = ("source_image", "target_image", "class", "XA", "YA", "XB", "YB")
PCK_ALPHAS: tuple[float, ...] = (0.05, 0.1, 0.15)
NORMALISERS: tuple[str, ...] = ("bbox", "image")
DATASETS: tuple[str, ...] = ("spair", "pfpascal")

Size = tuple[int, int]
BBox = tuple[float, float, float, float]

#: Mirror-symmetric SPair-71k keypoint ids per category (left/right counterparts), as listed by
#: GeoAware-SC (Zhang et al., CVPR 2024, ``SPAIR_FLIP`` in utils/utils_geoware.py, test split).
#: Ids not listed are their own mirror image (e.g. a nose). Used by the flip test: in the
#: horizontally flipped source, keypoint ``a`` looks like keypoint ``b`` and vice versa.
SPAIR_FLIP_PAIRS: dict[str, tuple[tuple[int, int], ...]] = {
    "aeroplane": ((4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19), (20, 21)),
    "bicycle": ((2, 3), (6, 7), (9, 10)),
    "bird": ((1, 2), (4, 5), (7, 8), (10, 11), (12, 13), (14, 15)),
    "boat": ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)),
    "bottle": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)),
    "bus": ((0, 1), (2, 3), (5, 6), (8, 18), (11, 21), (9, 19), (12, 22), (10, 20), (13, 23), (14, 15),
            (24, 25), (16, 17), (26, 27)),
    "car": ((0, 1), (2, 3), (6, 7), (10, 20), (13, 23), (11, 21), (14, 24), (12, 22), (15, 25), (16, 17),
            (26, 27), (18, 19), (28, 29)),
    "cat": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12)),
    "chair": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13)),
    "cow": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)),
    "dog": ((0, 1), (2, 3), (4, 5), (9, 10), (11, 12)),
    "horse": ((0, 1), (2, 3), (4, 5), (6, 7), (10, 11), (12, 13), (16, 17), (18, 19)),
    "motorbike": ((0, 1), (2, 3)),
    "person": ((0, 1), (2, 3), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19)),
    "pottedplant": ((0, 2), (4, 5), (6, 8)),
    "sheep": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)),
    "train": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17)),
    "tvmonitor": ((0, 2), (4, 6), (3, 7), (8, 10), (12, 14), (11, 15)),
}


@dataclass(frozen=True)
class CorrespondencePair:
    """One annotated image pair; keypoints ``[N, 2]`` ``(x, y)``, row ``k`` of both corresponds."""

    pair_id: str
    src_image: Path
    tgt_image: Path
    category: str
    src_kps: torch.Tensor
    tgt_kps: torch.Tensor
    src_size: Size  # (H, W)
    tgt_size: Size
    src_bbox: BBox | None = None  # (x1, y1, x2, y2)
    tgt_bbox: BBox | None = None
    kps_ids: tuple[int, ...] | None = None


# ------------------------------------------------------------------------------ SPair
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInputError(f"missing annotation file {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"unreadable annotation file {path}: {e}") from None


def _kps(value: object, where: Path, key: str) -> torch.Tensor:
    t = torch.tensor(value, dtype=torch.float32) if value else torch.zeros((0, 2))
    if t.dim() != 2 or t.shape[1] != 2:
        raise BadInputError(f"{where}: {key} must be a list of [x, y] pairs")
    return t


def _spair_pair(root: Path, path: Path) -> CorrespondencePair:
    d = _read_json(path)
    try:
        cat = d["category"]
        src_w, src_h = int(d["src_imsize"][0]), int(d["src_imsize"][1])
        tgt_w, tgt_h = int(d["trg_imsize"][0]), int(d["trg_imsize"][1])
        pair = CorrespondencePair(
            pair_id=path.stem,
            src_image=root / "JPEGImages" / cat / d["src_imname"],
            tgt_image=root / "JPEGImages" / cat / d["trg_imname"],
            category=cat,
            src_kps=_kps(d["src_kps"], path, "src_kps"),
            tgt_kps=_kps(d["trg_kps"], path, "trg_kps"),
            src_size=(src_h, src_w),
            tgt_size=(tgt_h, tgt_w),
            src_bbox=tuple(float(v) for v in d["src_bndbox"]),
            tgt_bbox=tuple(float(v) for v in d["trg_bndbox"]),
            kps_ids=tuple(int(i) for i in d.get("kps_ids", ())) or None,
        )
    except KeyError as e:
        raise BadInputError(f"{path}: SPair pair annotation lacks field {e.args[0]!r}") from None
    if pair.src_kps.shape != pair.tgt_kps.shape:
        raise BadInputError(f"{path}: {len(pair.src_kps)} source but {len(pair.tgt_kps)} target keypoints")
    return pair


def load_spair(root: str | os.PathLike, split: str = "test", *, categories: Iterable[str] | None = None,
               layout: str = "large", limit: int | None = None) -> list[CorrespondencePair]:
    """Read SPair-71k pairs of ``split`` (``trn``, ``val`` or ``test``).

    The pair list comes from ``Layout/<layout>/<split>.txt`` when present, else from the
    sorted ``PairAnnotation/<split>/*.json``. ``categories`` keeps only those;
    ``limit`` keeps the first pairs of each category (quick runs).
    """
    root = Path(root)
    if split not in SPAIR_SPLITS:
        raise one_of("SPair-71k split", split, SPAIR_SPLITS)
    ann_dir = root / "PairAnnotation" / split
    if not ann_dir.is_dir():
        raise BadInputError(f"{root} is not a SPair-71k folder: {ann_dir} does not exist")
    layout_file = root / "Layout" / layout / f"{split}.txt"
    if layout_file.is_file():
        names = [ln.strip() for ln in layout_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        files = [ann_dir / (n if n.endswith(".json") else f"{n}.json") for n in names]
    else:
        files = sorted(ann_dir.glob("*.json"))
    wanted = None if categories is None else set(categories)
    if wanted is not None and (unknown := wanted - set(SPAIR_CATEGORIES)):
        raise one_of("SPair-71k category", sorted(unknown)[0], SPAIR_CATEGORIES)
    pairs: list[CorrespondencePair] = []
    per_cat: dict[str, int] = {}
    for f in files:
        cat = f.stem.rsplit(":", 1)[-1] if ":" in f.stem else None
        if wanted is not None and cat is not None and cat not in wanted:
            continue
        if limit is not None and cat is not None and per_cat.get(cat, 0) >= limit:
            continue
        pair = _spair_pair(root, f)
        if wanted is not None and pair.category not in wanted:
            continue
        if limit is not None and per_cat.get(pair.category, 0) >= limit:
            continue
        per_cat[pair.category] = per_cat.get(pair.category, 0) + 1
        pairs.append(pair)
    if not pairs:
        raise BadInputError(f"no SPair-71k pairs found for split {split!r} under {root}")
    return pairs


# -------------------------------------------------------------------------- PF-Pascal
def _pf_csv(root: Path, split: str) -> Path:
    if root.is_file():
        return root
    for base in (root, root / "PF-dataset-PASCAL"):
        for name in (f"{split}_pairs_pf_pascal.csv", f"{split}_pairs.csv"):
            if (base / name).is_file():
                return base / name
    raise BadInputError(f"no PF-Pascal pair list for split {split!r} under {root} "
                        f"(expected {split}_pairs_pf_pascal.csv or {split}_pairs.csv)")


def _pf_image(csv_path: Path, name: str) -> Path:
    folder = csv_path.parent
    for cand in (folder.parent / name, folder / name, folder / "JPEGImages" / Path(name).name):
        if cand.is_file():
            return cand
    raise BadInputError(f"PF-Pascal image {name!r} (listed in {csv_path.name}) not found next to {folder}")


def _coords(text: str, where: str) -> list[float]:
    try:
        return [float(v) for v in str(text).split(";") if v.strip()]
    except ValueError:
        raise BadInputError(f"{where}: keypoint coordinates must be ';'-separated numbers, got {text!r}") from None


def image_size(path: Path) -> Size:
    """``(H, W)`` of an image file, reading only its header."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except OSError as e:
        raise BadInputError(f"unreadable image {path}: {e}") from None


def load_pfpascal(root: str | os.PathLike, split: str = "test", *,
                  limit: int | None = None) -> list[CorrespondencePair]:
    """Read PF-Pascal pairs from ``<split>_pairs_pf_pascal.csv``.

    ``root`` is the ``PF-dataset-PASCAL`` folder, its parent, or the CSV file itself.
    Keypoints are used as the CSV gives them, as SD-DINO and GeoAware-SC read them (no
    1-based -> 0-based shift; PCK there is reported in those coordinates).
    """
    csv_path = _pf_csv(Path(root), split)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
        header = tuple(rows[0].keys()) if rows else ()
    missing = [c for c in PF_PASCAL_COLUMNS if c not in header]
    if missing:
        raise BadInputError(f"{csv_path} lacks PF-Pascal columns {','.join(missing)} "
                            f"(expected {','.join(PF_PASCAL_COLUMNS)})")
    pairs: list[CorrespondencePair] = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        where = f"{csv_path.name} row {i + 2}"
        xa, ya, xb, yb = (_coords(row[c], where) for c in ("XA", "YA", "XB", "YB"))
        if not len(xa) == len(ya) == len(xb) == len(yb):
            raise BadInputError(f"{where}: XA, YA, XB, YB have different lengths")
        try:
            cat = PASCAL_CLASSES[int(float(row["class"])) - 1]
        except (ValueError, IndexError):
            raise BadInputError(f"{where}: class must be 1..20, got {row['class']!r}") from None
        src, tgt = _pf_image(csv_path, row["source_image"]), _pf_image(csv_path, row["target_image"])
        pairs.append(CorrespondencePair(
            pair_id=f"{i:06d}-{src.stem}-{tgt.stem}:{cat}",
            src_image=src, tgt_image=tgt, category=cat,
            src_kps=torch.tensor([xa, ya], dtype=torch.float32).T,
            tgt_kps=torch.tensor([xb, yb], dtype=torch.float32).T,
            src_size=image_size(src), tgt_size=image_size(tgt),
        ))
    if not pairs:
        raise BadInputError(f"{csv_path} lists no pairs")
    return pairs


def flip_partners(pair: CorrespondencePair) -> list[int | None] | None:
    """For each keypoint of ``pair``, the row of its mirror-symmetric partner (itself if symmetric).

    ``None`` for a keypoint whose partner is not annotated in this pair; returns ``None``
    altogether when the pair has no keypoint ids or its category has no table (PF-Pascal).
    """
    table = SPAIR_FLIP_PAIRS.get(pair.category)
    if pair.kps_ids is None or table is None:
        return None
    mirror = {a: b for a, b in table} | {b: a for a, b in table}
    row = {kid: i for i, kid in enumerate(pair.kps_ids)}
    return [row.get(mirror.get(kid, kid)) for kid in pair.kps_ids]


def load_pairs(dataset: str, root: str | os.PathLike, split: str = "test", **kw: object) -> list[CorrespondencePair]:
    """Dispatch to :func:`load_spair` (``"spair"``) or :func:`load_pfpascal` (``"pfpascal"``)."""
    if dataset == "spair":
        return load_spair(root, split, **kw)  # type: ignore[arg-type]
    if dataset == "pfpascal":
        return load_pfpascal(root, split, **kw)  # type: ignore[arg-type]
    raise one_of("dataset", dataset, DATASETS)


def default_normaliser(dataset: str) -> str:
    """The PCK normaliser the literature uses for ``dataset``: bbox for SPair, image for PF-Pascal."""
    return "bbox" if dataset == "spair" else "image"


# -------------------------------------------------------------------------------- PCK
def pck_threshold(pair: CorrespondencePair, normaliser: str) -> float:
    """``L`` of PCK@alpha for a pair: target bbox ``max(w, h)`` or target image ``max(H, W)``."""
    if normaliser not in NORMALISERS:
        raise one_of("PCK normaliser", normaliser, NORMALISERS)
    if normaliser == "image":
        return float(max(pair.tgt_size))
    if pair.tgt_bbox is None:
        raise BadInputError(f"pair {pair.pair_id} has no target bounding box; use the 'image' normaliser")
    x1, y1, x2, y2 = pair.tgt_bbox
    return float(max(x2 - x1, y2 - y1))


def pck_correct(pred: torch.Tensor, gt: torch.Tensor, threshold: float | torch.Tensor,
                alphas: Sequence[float] = PCK_ALPHAS) -> torch.Tensor:
    """``[len(alphas), N]`` bool: ``|pred - gt| <= alpha * threshold`` for ``[N, 2]`` points."""
    if pred.shape != gt.shape or pred.shape[-1] != 2:
        raise BadInputError(f"predicted {tuple(pred.shape)} and ground-truth {tuple(gt.shape)} keypoints differ")
    dist = (pred.float() - gt.float()).norm(dim=-1)
    limit = torch.as_tensor(alphas, dtype=torch.float32).unsqueeze(-1) * torch.as_tensor(threshold, dtype=torch.float32)
    return dist.unsqueeze(0) <= limit


@dataclass
class PCKAccumulator:
    """Collects per-pair PCK and reports per-image and per-keypoint averages.

    >>> acc = PCKAccumulator(normaliser="bbox")
    >>> acc.add(pred, gt, threshold=120.0, category="cat")
    >>> acc.summary()["per_image"]["0.1"]
    """

    normaliser: str = "bbox"
    alphas: tuple[float, ...] = PCK_ALPHAS
    _pairs: list[tuple[str, torch.Tensor]] = field(default_factory=list, repr=False)

    def add(self, pred: torch.Tensor, gt: torch.Tensor, threshold: float, category: str = "all") -> torch.Tensor:
        """Score one pair's keypoints; returns its ``[len(alphas), N]`` correctness."""
        correct = pck_correct(pred, gt, threshold, self.alphas)
        self._pairs.append((category, correct))
        return correct

    @staticmethod
    def _average(items: list[torch.Tensor], alphas: Sequence[float]) -> dict[str, object]:
        items = [c for c in items if c.shape[1] > 0]
        n_kps = sum(c.shape[1] for c in items)
        if not items:
            return {"per_image": {}, "per_keypoint": {}, "pairs": 0, "keypoints": 0}
        per_img = torch.stack([c.double().mean(1) for c in items]).mean(0)
        per_kp = torch.cat(items, 1).double().mean(1)
        key = [f"{a:g}" for a in alphas]
        return {
            "per_image": {k: 100 * float(v) for k, v in zip(key, per_img)},
            "per_keypoint": {k: 100 * float(v) for k, v in zip(key, per_kp)},
            "pairs": len(items),
            "keypoints": n_kps,
        }

    def summary(self) -> dict[str, object]:
        """PCK in percent: overall and per category, both averaging conventions.

        Pairs without keypoints are left out. Overall per-image PCK averages over all
        pairs (not over category means), as DIFT reports it. ``category_mean`` is PCK per
        keypoint within each category, then averaged over the categories with equal weight:
        SD-DINO's headline number (``pck_spair_pascal.py``: ``np.average(pcks)`` of the
        per-category ``compute_pck``).
        """
        out = {"normaliser": self.normaliser, "alphas": list(self.alphas),
               **self._average([c for _, c in self._pairs], self.alphas)}
        cats = sorted({cat for cat, _ in self._pairs})
        out["per_category"] = {cat: self._average([c for k, c in self._pairs if k == cat], self.alphas)
                               for cat in cats}
        scored = [v["per_keypoint"] for v in out["per_category"].values() if v["per_keypoint"]]
        out["category_mean"] = {a: sum(d[a] for d in scored) / len(scored) for a in (scored[0] if scored else {})}
        return out


def format_pck_table(summary: dict[str, object]) -> str:
    """Plain-text table of a :meth:`PCKAccumulator.summary` (one row per category + all)."""
    alphas = [f"{a:g}" for a in summary["alphas"]]  # type: ignore[union-attr]
    head = ["category", "pairs", "kps"] + [f"img@{a}" for a in alphas] + [f"kp@{a}" for a in alphas]
    rows = []
    cats = summary.get("per_category", {})
    for name, s in [*cats.items(), ("all", summary)]:  # type: ignore[union-attr]
        rows.append([name, str(s["pairs"]), str(s["keypoints"])]
                    + [f"{s['per_image'].get(a, float('nan')):.1f}" for a in alphas]
                    + [f"{s['per_keypoint'].get(a, float('nan')):.1f}" for a in alphas])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    title = f"PCK (%), normaliser: {summary['normaliser']} " + (
        "(max side of the target bbox)" if summary["normaliser"] == "bbox" else "(max side of the target image)")
    means = summary.get("category_mean") or {}
    tail = ["per keypoint, mean over categories: " + ", ".join(f"@{a} {means[a]:.1f}" for a in alphas if a in means)] if means else []
    return "\n".join([title, fmt(head), *[fmt(r) for r in rows], *tail])
