"""The shapes generator: determinism, splits and the exactness of every ground truth."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difffeat.data.shapes import (CLASSES, DEPTH_SCALE, MAX_OBJECTS, render, render_pair,
                                  write_folder)
from difffeat.errors import BadInputError, UnknownNameError


@pytest.fixture(scope="module")
def pair():
    return render_pair(48, seed=5, split="val")


def test_deterministic_and_independent_of_batching():
    a = render(6, seed=3, split="test")
    b = render(6, seed=3, split="test")
    for f in ("image", "label", "mask", "depth", "edges", "instance", "amodal"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    part = render(3, seed=3, split="test", start=2, chunk=2)
    assert torch.equal(part.index, torch.tensor([2, 3, 4]))
    assert torch.equal(part.mask, a.mask[2:5]) and torch.equal(part.label, a.label[2:5])
    assert torch.equal(part.image, a.image[2:5]) and torch.equal(part.depth, a.depth[2:5])
    assert not torch.equal(render(6, seed=4, split="test").image, a.image)


def test_splits_never_share_a_scene():
    seen = {}
    for split in ("train", "val", "test"):
        b = render(64, seed=0, split=split)
        for i in range(64):
            seen.setdefault(b.image[i].numpy().tobytes(), set()).add(split)
    assert len(seen) == 3 * 64 and all(len(s) == 1 for s in seen.values())
    with pytest.raises(UnknownNameError, match="unknown split"):
        render(2, split="training")
    with pytest.raises(BadInputError):
        render(0)


def test_label_mask_instance_consistency():
    b = render(64, seed=1, size=48)
    assert b.image.shape == (64, 48, 48, 3) and b.image.dtype == torch.uint8
    assert int(b.mask.max()) <= len(CLASSES)
    counts = torch.stack([torch.bincount(m.flatten().long(), minlength=len(CLASSES) + 1)
                          for m in b.mask])
    assert torch.equal(b.label, counts[:, 1:].argmax(1))            # largest visible class
    assert (counts[torch.arange(64), b.label + 1] > 0).all()
    # Background <-> instance 0; each instance has exactly one class, distinct per scene.
    assert torch.equal(b.mask == 0, b.instance == 0)
    for i in range(64):
        classes = [torch.unique(b.mask[i][b.instance[i] == s + 1]).tolist()
                   for s in range(MAX_OBJECTS) if (b.instance[i] == s + 1).any()]
        assert all(len(c) == 1 for c in classes) and len({c[0] for c in classes}) == len(classes)
    # The visible instance is the nearest slot whose full silhouette covers the pixel.
    covered = b.amodal.any(1)
    first = b.amodal.float().argmax(1) + 1
    assert torch.equal(b.instance.long(), torch.where(covered, first, 0))


def test_depth_is_ordered_so_occluders_are_nearer():
    b = render(64, seed=2)
    assert b.depth.dtype == torch.float32 and (b.depth > 0).all()
    for i in range(64):
        inst = b.instance[i]
        ranges = [(b.depth[i][inst == k].min(), b.depth[i][inst == k].max())
                  for k in [*range(1, MAX_OBJECTS + 1), 0] if (inst == k).any()]
        for (_, far), (near, _) in zip(ranges, ranges[1:]):
            assert far < near                          # nearer slot < farther slot < background
    # Where two silhouettes overlap the nearer slot is the one seen: the occluder is visible
    # and (by the ranges above) has the smaller depth.
    overlap = b.amodal[:, 0] & b.amodal[:, 1]
    assert overlap.any() and (b.instance[overlap] == 1).all()


def test_edges_are_exactly_the_occluding_side_of_mask_and_depth_steps():
    b = render(32, seed=3)
    assert b.edges.dtype == torch.bool and b.edges.flatten(1).any(1).all()
    all_ = slice(None)
    horizontal = (all_, all_, slice(None, -1)), (all_, all_, slice(1, None))
    vertical = (all_, slice(None, -1)), (all_, slice(1, None))
    expected = torch.zeros_like(b.edges)
    for first, second in (horizontal, vertical):
        step = b.mask[first] != b.mask[second]
        assert torch.equal(step, b.instance[first] != b.instance[second])
        jump = (b.depth[first] - b.depth[second]).abs()
        assert (jump[step] > 0.3).all() and (jump[~step] < 0.1).all()  # steps = depth jumps
        expected[first] |= step & (b.depth[first] < b.depth[second])
        expected[second] |= step & (b.depth[second] < b.depth[first])
    # Edges are exactly the near-side pixels of every mask/depth step, and nothing else.
    assert torch.equal(b.edges, expected)


def test_second_view_point_map_is_exact(pair):
    b, n, size = pair, len(pair), pair.image.shape[1]
    c = torch.arange(size, dtype=torch.float64) + 0.5
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    p1 = torch.stack([xx, yy], -1).reshape(-1, 2)
    p2, ok = zip(*(b.map_points(p1, i) for i in range(n)))
    p2, ok = torch.stack(p2), torch.stack(ok)
    assert torch.equal(ok.view(n, size, size), b.valid) and b.valid.float().mean() > 0.6
    # Inverse homography brings the points back.
    back = torch.cat([p2, torch.ones_like(p2[..., :1])], -1) @ torch.linalg.inv(b.homography).mT
    assert torch.allclose(back[..., :2] / back[..., 2:], p1.expand(n, -1, -1), atol=1e-9)
    # Sample view 2 at the mapped points, away from edges and borders.
    grid = (2 * p2 / size - 1).float().view(n, size, size, 2)
    sample = lambda t, mode: F.grid_sample(t, grid, mode=mode, align_corners=False)
    img2 = sample(b.images01(second=True), "bilinear")
    mask2 = sample(b.mask2[:, None].float(), "nearest")[:, 0]
    depth2 = sample(b.depth2[:, None], "bilinear")[:, 0]
    def near_step(mask):                 # a different mask value within 2 pixels
        m = mask[:, None].float()
        return (F.max_pool2d(m, 5, 1, 2) != -F.max_pool2d(-m, 5, 1, 2))[:, 0]

    inner = ((p2 > 1) & (p2 < size - 1)).all(-1).view(n, size, size)
    near2 = sample(near_step(b.mask2)[:, None].float(), "nearest")[:, 0] > 0
    use = b.valid & inner & ~near_step(b.mask) & ~near2
    assert use.float().mean() > 0.4
    assert torch.equal(mask2[use], b.mask[use].float())
    assert torch.allclose(depth2[use], b.depth[use], atol=1e-3)
    err = (img2 - b.images01()).abs().amax(1)[use]
    assert err.mean() < 0.005 and torch.quantile(err, 0.99) < 0.03
    with pytest.raises(BadInputError):
        render(2).map_points([[1.0, 1.0]], 0)


def test_throughput_runs():
    t = time.perf_counter()
    b = render(512, seed=9)
    dt = time.perf_counter() - t
    print(f"shapes: {512 / dt:.0f} images/s (64x64, 1 thread)")
    assert len(b) == 512 and b.image2 is None


def test_write_folder_formats(tmp_path):
    from difffeat.tasks.correspond_data import load_spair
    from difffeat.tasks.dense_data import read_classes

    root = write_folder(tmp_path / "ds", 6, split="val", seed=2)
    b = render_pair(6, seed=2, split="val")
    names, colours = read_classes(root / "classes.txt")
    assert names == ["background", *CLASSES] and colours[0] == (0, 0, 0)
    assert json.loads((root / "meta.json").read_text())["depth_scale"] == DEPTH_SCALE
    assert int((root / "depth_scale.txt").read_text()) == DEPTH_SCALE
    assert torch.equal(torch.from_numpy(np.array(Image.open(root / "images/000003.png"))),
                       b.image[3])
    m = Image.open(root / "masks/000003.png")
    assert m.mode == "P" and torch.equal(torch.from_numpy(np.array(m)), b.mask[3])
    d = np.array(Image.open(root / "depth/000003.png")).astype(np.float64) / DEPTH_SCALE
    assert np.abs(d - b.depth[3].numpy()).max() <= 0.5 / DEPTH_SCALE + 1e-6
    e = np.array(Image.open(root / "edges/000003.png"))
    assert torch.equal(torch.from_numpy(e > 0), b.edges[3])
    by_class = sorted(p.parent.name for p in (root / "by_class").glob("*/*.png"))
    assert by_class == sorted(CLASSES[int(k)] for k in b.label)
    # Correspondence: a SPair-71k folder; keypoints are 0-based indices (centres at integers).
    pairs = {p.src_image.stem: p for p in load_spair(root, "val")}
    assert len(pairs) == 6
    p = pairs["000003"]
    assert p.category == CLASSES[int(b.label[3])] and p.tgt_image.name == "000003_b.png"
    assert torch.equal(torch.from_numpy(np.array(Image.open(p.tgt_image))), b.image2[3])
    assert len(p.src_kps) > 0
    src = p.src_kps.long()
    assert (b.mask[3][src[:, 1], src[:, 0]] > 0).all()           # keypoints lie on objects
    mapped, ok = b.map_points(p.src_kps.double() + 0.5, 3)
    assert ok.all() and torch.allclose(mapped - 0.5, p.tgt_kps.double(), atol=1e-4)
    with pytest.raises(UnknownNameError):
        write_folder(tmp_path / "x", 1, tasks=["segmentaton"])
