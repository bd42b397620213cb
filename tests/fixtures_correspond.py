"""Write miniature SPair-71k and PF-Pascal folders in their published formats.

Used by the correspondence tests (loaders, PCK, ``difffeat eval correspond``). Every
image is a small random-colour JPEG; annotations are hand-set so tests know the
answers. Field names, file names and coordinate conventions follow the real datasets
(see :mod:`difffeat.tasks.correspond_data`).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

# (imname, (W, H)) per category; sizes deliberately not square and not equal.
SPAIR_IMAGES = {
    "cat": [("2008_000001", (48, 32)), ("2008_000002", (40, 40)), ("2008_000003", (32, 48))],
    "dog": [("2009_000101", (56, 40)), ("2009_000102", (40, 32))],
}
# pair name -> (category, src, trg, src_kps, trg_kps, kps_ids, src_bbox, trg_bbox)
SPAIR_TEST_PAIRS = [
    ("cat", "2008_000001", "2008_000002", [[4, 5], [20, 10], [40, 30]], [[6, 6], [21, 12], [35, 36]],
     ["0", "3", "7"], [2, 3, 44, 31], [1, 1, 39, 21]),
    ("cat", "2008_000002", "2008_000003", [[10, 10], [30, 20]], [[8, 12], [25, 40]],
     ["1", "2"], [0, 0, 39, 39], [4, 2, 30, 46]),
    ("dog", "2009_000101", "2009_000102", [[5, 5], [50, 30], [28, 20], [10, 35]],
     [[5, 4], [36, 28], [20, 15], [3, 30]], ["0", "1", "4", "9"], [0, 5, 55, 39], [0, 0, 39, 31]),
]


def _jpeg(path: Path, size_wh: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size_wh[1], size_wh[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


def spair_pair_name(index: int, src: str, trg: str, category: str) -> str:
    """SPair's pair file stem: ``000001-<src>-<trg>:<category>``."""
    return f"{index:06d}-{src}-{trg}:{category}"


def make_spair(root: str | Path, *, with_layout: bool = True) -> Path:
    """Create ``root/SPair-71k`` with 5 images, 3 test pairs and 1 trn/val pair; return its path."""
    base = Path(root) / "SPair-71k"
    sizes = {}
    seed = 0
    for cat, images in SPAIR_IMAGES.items():
        for name, wh in images:
            seed += 1
            sizes[name] = wh
            _jpeg(base / "JPEGImages" / cat / f"{name}.jpg", wh, seed)
            ann = {"filename": f"{name}.jpg", "src_database": "PASCAL VOC 2012", "image_width": wh[0],
                   "image_height": wh[1], "image_depth": 3, "category": cat, "pose": "Unspecified",
                   "truncated": 0, "occluded": 0, "difficult": 0, "bndbox": [0, 0, wh[0] - 1, wh[1] - 1],
                   "kps": {str(k): None for k in range(10)}, "azimuth_id": 0}
            path = base / "ImageAnnotation" / cat / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ann))
    splits = {"test": SPAIR_TEST_PAIRS, "trn": SPAIR_TEST_PAIRS[:1], "val": SPAIR_TEST_PAIRS[2:]}
    for split, pairs in splits.items():
        names = []
        for i, (cat, src, trg, skp, tkp, ids, sbb, tbb) in enumerate(pairs, start=1):
            name = spair_pair_name(i, src, trg, cat)
            names.append(name)
            d = {"filename": name, "src_imname": f"{src}.jpg", "trg_imname": f"{trg}.jpg",
                 "src_imsize": [*sizes[src], 3], "trg_imsize": [*sizes[trg], 3],
                 "src_bndbox": sbb, "trg_bndbox": tbb, "category": cat,
                 "src_pose": 0, "trg_pose": 0, "src_trunc": 0, "trg_trunc": 0, "src_occl": 0, "trg_occl": 0,
                 "src_kps": skp, "trg_kps": tkp, "kps_ids": ids,
                 "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0, "mirror": 0}
            path = base / "PairAnnotation" / split / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(d))
        if with_layout:
            lay = base / "Layout" / "large" / f"{split}.txt"
            lay.parent.mkdir(parents=True, exist_ok=True)
            lay.write_text("\n".join(names) + "\n")
    return base


# (src, trg, class index 1-based, XA, YA, XB, YB) with 1-based coordinates as in the CSV.
PF_PASCAL_PAIRS = [
    ("2007_000027", "2007_000032", 8, [5, 20, 30], [6, 10, 25], [7, 22, 33], [5, 12, 28]),
    ("2007_000033", "2007_000027", 8, [10, 12], [4, 30], [11, 40], [3, 28]),
]
PF_PASCAL_SIZES = {"2007_000027": (40, 30), "2007_000032": (36, 36), "2007_000033": (30, 44)}


def make_pfpascal(root: str | Path, split: str = "test") -> Path:
    """Create ``root/PF-dataset-PASCAL`` with 3 images and 2 pairs in ``<split>_pairs_pf_pascal.csv``."""
    base = Path(root) / "PF-dataset-PASCAL"
    for i, (name, wh) in enumerate(PF_PASCAL_SIZES.items()):
        _jpeg(base / "JPEGImages" / f"{name}.jpg", wh, 100 + i)
    path = base / f"{split}_pairs_pf_pascal.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source_image", "target_image", "class", "XA", "YA", "XB", "YB"])
        for src, trg, cls, xa, ya, xb, yb in PF_PASCAL_PAIRS:
            w.writerow([f"PF-dataset-PASCAL/JPEGImages/{src}.jpg", f"PF-dataset-PASCAL/JPEGImages/{trg}.jpg", cls,
                        ";".join(map(str, xa)), ";".join(map(str, ya)), ";".join(map(str, xb)), ";".join(map(str, yb))])
    return base
