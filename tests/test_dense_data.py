"""Dense datasets from folders: label formats, and bad folders rejected with one clear line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difffeat.errors import BadInputError
from difffeat.tasks.dense_data import DenseFolder, default_palette, read_classes

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


def _image(path, w=16, h=12, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _indexed(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette([c for rgb in PALETTE for c in rgb] + [0] * (768 - 9))
    im.save(path)


def _seg_folder(root, n=3, w=16, h=12):
    for i in range(n):
        _image(root / "images" / f"im{i}.jpg", w, h, seed=i)
        ids = np.zeros((h, w), np.uint8)
        ids[:, : w // 2] = 1
        ids[0, 0] = 255  # ignore
        ids[-1, -1] = 2
        _indexed(root / "masks" / f"im{i}.png", ids)
    (root / "classes.txt").write_text("background #000000\nred thing #ff0000\ngreen #00ff00\n")
    return root


def test_seg_folder_loads_indexed_masks_classes_and_palette(tmp_path):
    ds = DenseFolder(_seg_folder(tmp_path), "seg")
    assert len(ds) == 3 and ds.classes == ["background", "red thing", "green"] and ds.num_classes == 3
    assert ds.palette == PALETTE
    item = ds[0]
    assert item["image"].shape == (3, 12, 16) and item["image"].dtype == torch.float32
    assert item["target"].dtype == torch.int64 and item["target"].shape == (12, 16)
    assert item["target"][0, 0] == 255 and item["target"][0, 1] == 1 and item["target"][-1, -1] == 2
    assert item["name"] == "im0"


def test_rgb_masks_map_through_palette_and_grey_masks_infer_classes(tmp_path):
    root = tmp_path / "rgb"
    _image(root / "images" / "a.png")
    rgb = np.zeros((12, 16, 3), np.uint8)
    rgb[:, 8:] = (0, 255, 0)
    Image.fromarray(rgb).save((root / "masks").mkdir(parents=True) or root / "masks" / "a.png")
    (root / "classes.txt").write_text("bg #000000\nred #ff0000\ngreen #00ff00\n")
    t = DenseFolder(root, "seg")[0]["target"]
    assert t[0, 0] == 0 and t[0, 15] == 2
    (root / "classes.txt").write_text("bg #000000\nred #ff0000\n")
    with pytest.raises(BadInputError, match="#00ff00"):
        DenseFolder(root, "seg")

    grey = tmp_path / "grey"
    _image(grey / "images" / "sub" / "b.png")
    ids = np.full((12, 16), 4, np.uint8)
    ids[0] = 255
    (grey / "labels" / "sub").mkdir(parents=True)
    Image.fromarray(ids, mode="L").save(grey / "labels" / "sub" / "b.png")
    ds = DenseFolder(grey, "seg")  # labels/ folder, nested names, no classes.txt
    assert ds.num_classes == 5 and ds.samples[0].name == "sub/b"


def test_depth_png16_npy_and_rejected_formats(tmp_path):
    root = tmp_path
    _image(root / "images" / "a.png")
    _image(root / "images" / "b.png")
    (root / "depth").mkdir()
    mm = np.full((12, 16), 2500, np.uint16)
    mm[0, 0] = 0
    Image.fromarray(mm).save(root / "depth" / "a.png")
    metres = np.full((12, 16), 1.5, np.float32)
    metres[1, 1] = np.nan
    np.save(root / "depth" / "b.npy", metres)
    ds = DenseFolder(root, "depth", depth_scale=1000.0)
    a, b = ds[0]["target"], ds[1]["target"]
    assert a[0, 0] == 0 and a[5, 5] == pytest.approx(2.5)
    assert b[1, 1] == 0 and b[0, 0] == pytest.approx(1.5)

    Image.fromarray(np.full((12, 16), 9, np.uint8)).save(root / "depth" / "a.png")  # 8-bit
    with pytest.raises(BadInputError, match="16-bit"):
        DenseFolder(root, "depth")


def test_edges_soft_png_and_annotator_stack(tmp_path):
    root = tmp_path
    _image(root / "images" / "a.png")
    _image(root / "images" / "b.png")
    (root / "edges").mkdir()
    e = np.zeros((12, 16), np.uint8)
    e[5] = 255
    e[6] = 128
    Image.fromarray(e).save(root / "edges" / "a.png")
    stack = np.zeros((2, 12, 16), np.float32)
    stack[0, 3] = 1
    stack[1, 3:5] = 1
    np.save(root / "edges" / "b.npy", stack)
    ds = DenseFolder(root, "edges")
    a, b = ds[0], ds[1]
    assert a["target"][5, 0] == 1.0 and a["target"][6, 0] == pytest.approx(128 / 255)
    assert b["target"][3, 0] == 1.0 and b["target"][4, 0] == 0.5  # annotators averaged
    assert b["annotations"].shape == (2, 12, 16)


# ----------------------------------------------------------------------------- bad folders
def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_unpaired_files_are_listed(tmp_path):
    root = _seg_folder(tmp_path, n=8)
    for i in range(7):
        (root / "masks" / f"im{i}.png").unlink()
    (root / "masks" / "stray.png").write_bytes((root / "masks" / "im7.png").read_bytes())
    with pytest.raises(BadInputError) as e:
        DenseFolder(root, "seg")
    msg = _one_line(e)
    assert "7 image(s) without a mask" in msg and "im0.jpg" in msg and "and 2 more" in msg
    assert "1 mask(s) without an image" in msg and "stray.png" in msg


def test_size_mismatch_and_out_of_range_ids_are_listed(tmp_path):
    root = _seg_folder(tmp_path)
    _indexed(root / "masks" / "im1.png", np.zeros((10, 16), np.uint8))
    ids = np.zeros((12, 16), np.uint8)
    ids[3, 3], ids[4, 4] = 7, 9
    _indexed(root / "masks" / "im2.png", ids)
    with pytest.raises(BadInputError) as e:
        DenseFolder(root, "seg")
    msg = _one_line(e)
    assert "im1 (mask 16x10 vs image 16x12)" in msg
    assert "ids outside 0..2" in msg and "im2 (values 7, 9)" in msg


def test_missing_folders_and_corrupt_labels(tmp_path):
    with pytest.raises(BadInputError, match="dataset folder not found"):
        DenseFolder(tmp_path / "nope", "seg")
    _image(tmp_path / "images" / "a.png")
    with pytest.raises(BadInputError, match=r"looked for depth/, depths/"):
        DenseFolder(tmp_path, "depth")
    (tmp_path / "edges").mkdir()
    (tmp_path / "edges" / "a.png").write_bytes(b"not a png")
    with pytest.raises(BadInputError, match="unreadable label"):
        DenseFolder(tmp_path, "edges")
    (tmp_path / "depth").mkdir()
    (tmp_path / "depth" / "a.exr").write_bytes(b"x")
    with pytest.raises(BadInputError, match="EXR depth is not supported"):
        DenseFolder(tmp_path, "depth")
    with pytest.raises(KeyError, match="unknown task"):
        DenseFolder(tmp_path, "flow")


def test_classes_file_parsing_and_default_palette(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("wall socket\nsky\n\n")
    assert read_classes(p) == (["wall socket", "sky"], None)
    assert default_palette(4) == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
