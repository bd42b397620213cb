"""Dense metrics against hand-worked cases: mmseg-style IoU, Eigen depth errors, BSDS edges."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difffeat.tasks.dense_metrics import DepthMetric, EdgeMetric, SegMetric, depth_errors, edge_counts, edge_thresholds
from difffeat.tasks.edge_ops import correspond_pixels, edge_nms, thin


# ----------------------------------------------------------------------------- segmentation
def test_seg_metric_matches_hand_worked_iou():
    # 3 classes; class 2 never appears in labels nor predictions -> NaN, excluded from means
    label = np.array([[0, 0, 1], [1, 1, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])  # last pixel ignored whatever it predicts
    m = SegMetric(num_classes=4, class_names=["a", "b", "c", "d"])
    m.update(pred, label)
    r = m.compute()
    # class 0: I=1, pred area 2, label area 2 -> U=3; class 1: I=2, pred 3, label 3 -> U=4
    assert r["IoU"]["a"] == pytest.approx(100 / 3)
    assert r["IoU"]["b"] == pytest.approx(50.0)
    assert math.isnan(r["IoU"]["c"]) and math.isnan(r["IoU"]["d"])
    assert r["mIoU"] == pytest.approx((100 / 3 + 50) / 2)
    assert r["aAcc"] == pytest.approx(60.0)  # 3 of 5 non-ignored pixels
    assert r["Acc"]["a"] == pytest.approx(50.0) and r["Acc"]["b"] == pytest.approx(200 / 3)


def test_seg_metric_accumulates_over_the_dataset_not_per_image():
    m = SegMetric(num_classes=2)
    m.update(torch.tensor([[0, 0]]), torch.tensor([[0, 1]]))  # class 1 missed
    m.update(torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]]))
    # class 0: I=1, U=2 -> 50; class 1: I=4, U=5 -> 80 (per-image averaging would differ)
    assert m.compute()["mIoU"] == pytest.approx(65.0)


def test_seg_reduce_zero_label_follows_mmseg():
    m = SegMetric(num_classes=2, reduce_zero_label=True)
    m.update(np.array([0, 1, 1]), np.array([0, 1, 2]))  # label 0 -> ignore, 1 -> 0, 2 -> 1
    # kept pixels: pred [1, 1] vs label [0, 1]; class 0: I=0, U=1; class 1: I=1, U=2
    assert m.compute()["mIoU"] == pytest.approx(25.0)


# ----------------------------------------------------------------------------- depth
def test_depth_errors_hand_worked():
    gt = torch.tensor([[1.0, 2.0, 0.0]])  # last pixel invalid
    pred = torch.tensor([[1.5, 2.0, 9.0]])
    e = depth_errors(pred, gt)
    assert e["abs_rel"] == pytest.approx(0.25)
    assert e["sq_rel"] == pytest.approx(0.125)
    assert e["rmse"] == pytest.approx(math.sqrt(0.125))
    assert e["d1"] == pytest.approx(0.5) and e["d2"] == pytest.approx(1.0)
    assert e["rmse_log"] == pytest.approx(math.sqrt(math.log(1.5) ** 2 / 2))
    assert depth_errors(pred, torch.zeros(1, 3)) is None


def test_silog_log10_and_d3_hand_worked():
    gt = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0])
    pred = torch.tensor([2.0, 2.0, 1.0, 3.0, 1.8])  # ratios 2, 1, 1, 3, 1.8
    e = depth_errors(pred, gt)
    d = [math.log(2), 0.0, 0.0, math.log(3), math.log(1.8)]
    m1, m2 = sum(d) / 5, sum(x * x for x in d) / 5
    assert e["silog"] == pytest.approx(100 * math.sqrt(m2 - m1**2))  # BTS/GLPDepth: sqrt(E[d^2] - E[d]^2) * 100
    assert e["log10"] == pytest.approx((math.log10(2) + math.log10(3) + math.log10(1.8)) / 5)
    assert (e["d1"], e["d2"], e["d3"]) == pytest.approx((0.4, 0.4, 0.6))  # 1.8 < 1.25^3 = 1.953 only


def test_bsds_default_threshold_grid():
    want = np.linspace(0.01, 0.99, 99)  # edgesEvalImg: thrs = linspace(1/(K+1), 1-1/(K+1), K), K = 99
    np.testing.assert_allclose(edge_thresholds(), want)
    np.testing.assert_allclose(EdgeMetric().thresholds, want)


def test_depth_metric_averages_per_image_and_aligns_relative_depth():
    m = DepthMetric()
    m.update(torch.tensor([1.5, 2.0]), torch.tensor([1.0, 2.0]))  # abs_rel 0.25
    m.update(torch.ones(4, 4), torch.ones(4, 4))  # abs_rel 0
    r = m.compute()
    assert r["abs_rel"] == pytest.approx(0.125) and r["images"] == 2
    gt = torch.rand(8, 8) * 5 + 1
    for align, pred in (("scale_shift", 0.3 * gt - 0.2), ("scale", 7.0 * gt)):
        e = depth_errors(pred, gt, align=align)
        assert e["abs_rel"] == pytest.approx(0.0, abs=1e-6) and e["d1"] == 1.0
    assert depth_errors(0.3 * gt - 0.2, gt)["abs_rel"] > 0.5  # not aligned by default


# ----------------------------------------------------------------------------- edge operations
def test_thinning_is_one_pixel_wide_and_keeps_thin_curves():
    bar = np.zeros((7, 12), bool)
    bar[2:5, 1:11] = True
    t = thin(bar)
    assert t.sum() > 0 and (t <= bar).all()
    assert t[[2, 4]].sum() == 0 and t[3].sum() == t.sum()  # collapsed onto the middle row
    line = np.zeros((7, 12), bool)
    line[3, 2:9] = True
    line[2, 9] = line[1, 10] = True  # a one-pixel, 8-connected curve with a diagonal part
    np.testing.assert_array_equal(thin(line), line)
    corner = line.copy()
    corner[3, 9] = True  # a 4-connected corner pixel is redundant: thinning removes it
    np.testing.assert_array_equal(thin(corner), line)
    square = np.zeros((5, 5), bool)
    square[1:4, 1:4] = True
    assert thin(square).sum() == 1  # bwmorph('thin') shrinks a filled square to a point


def _grid(shape, pts):
    a = np.zeros(shape, bool)
    for y, x in pts:
        a[y, x] = True
    return a


def test_correspondence_is_one_to_one_within_tolerance():
    shape = (10, 10)  # diagonal 14.142 -> radius 2.0 with this max_dist
    md = 2.0 / math.hypot(*shape)
    gt = _grid(shape, [(5, 5)])
    two_preds = _grid(shape, [(5, 4), (5, 6)])  # both within 1 px of the only GT pixel
    mp, mg = correspond_pixels(two_preds, gt, md)
    assert mp.sum() == 1 and mg.sum() == 1  # a distance transform would count 2 true positives
    far = _grid(shape, [(5, 8)])  # 3 px away > radius 2
    assert correspond_pixels(far, gt, md)[0].sum() == 0
    shifted_gt = _grid(shape, [(4, x) for x in range(2, 8)])
    shifted_pred = _grid(shape, [(5, x) for x in range(2, 8)])
    mp, mg = correspond_pixels(shifted_pred, shifted_gt, md)
    assert mp.sum() == 6 and mg.sum() == 6


def test_correspondence_maximises_matches_not_greedy_nearest():
    shape = (10, 10)
    md = 2.0 / math.hypot(*shape)
    gt = _grid(shape, [(5, 5), (5, 7)])
    pred = _grid(shape, [(5, 5), (5, 3)])  # (5,5) sits on g1; (5,3) can only reach g1
    for limit in (4_000_000, 0):  # exact assignment and Hopcroft-Karp paths
        mp, mg = correspond_pixels(pred, gt, md, dense_limit=limit)
        assert mp.sum() == 2 and mg.sum() == 2  # greedy nearest would match only 1


def test_correspondence_paths_agree_on_random_maps():
    rng = np.random.default_rng(0)
    a, b = rng.random((40, 50)) < 0.08, rng.random((40, 50)) < 0.08
    exact = correspond_pixels(a, b, 0.03)
    hk = correspond_pixels(a, b, 0.03, dense_limit=0)
    assert exact[0].sum() == hk[0].sum() == exact[1].sum() > 0


def test_edge_nms_keeps_the_ridge_of_a_blurred_line():
    y = np.arange(21)[:, None]
    prob = np.exp(-((y - 10) ** 2) / 8.0) * np.ones((21, 30))
    out = edge_nms(prob)
    inner = out[:, 6:-6]
    assert (inner[10] > 0.9).all() and inner[[8, 9, 11, 12]].max() == 0


# ----------------------------------------------------------------------------- ODS / OIS / AP
def _graded_case():
    """A 10-px GT line; 5 of its pixels predicted at 0.9, 5 at 0.4; 5 isolated false edges at 0.6."""
    gt = np.zeros((30, 30), bool)
    gt[5, 5:15] = True
    prob = np.zeros((30, 30))
    prob[5, 5:10] = 0.9
    prob[5, 10:15] = 0.4
    for x in range(5, 25, 4):
        prob[25, x] = 0.6
    return prob, gt


def test_edge_counts_hand_worked():
    prob, gt = _graded_case()
    c = edge_counts(prob, gt, thresholds=[0.3, 0.5, 0.7])
    np.testing.assert_array_equal(c, [[10, 10, 10, 15], [5, 10, 5, 10], [5, 10, 5, 5]])
    # two annotators: recall counts both, precision counts a match to either
    second = np.zeros_like(gt)
    second[25, 5] = True
    c2 = edge_counts(prob, np.stack([gt, second]), thresholds=[0.5])
    np.testing.assert_array_equal(c2, [[6, 11, 6, 10]])


def test_ods_ois_ap_hand_worked():
    prob, gt = _graded_case()
    m = EdgeMetric(thresholds=[0.3, 0.5, 0.7])
    m.update(prob, gt)
    r = m.compute()
    # F per threshold: 0.8, 0.5, 2/3 -> ODS = OIS = 0.8 at t = 0.3
    assert r["ODS"] == pytest.approx(0.8) and r["ODS_threshold"] == pytest.approx(0.3)
    assert r["OIS"] == pytest.approx(0.8)
    # PR points (R, P): (1, 2/3), (0.5, 0.5), (0.5, 1); unique R keeps (0.5, 0.5):
    # P interpolated on R = 0.50..1.00 -> sum = 51 * 0.5 + (1/6) * 25.5
    assert r["AP"] == pytest.approx((51 * 0.5 + 25.5 / 6) * 0.01)


def test_ois_uses_each_images_best_threshold():
    prob1, gt1 = _graded_case()  # best alone at t=0.3 (F 0.8)
    gt2 = np.zeros((30, 30), bool)
    gt2[8, 5:15] = True
    prob2 = gt2 * 0.9
    prob2[20, 2:30:3] = 0.4  # 10 isolated false edges: best at t >= 0.5 (F 1)
    m = EdgeMetric(thresholds=[0.3, 0.5, 0.7])
    m.update(prob1, gt1)
    m.update(prob2, gt2)
    r = m.compute()
    # OIS: (10,10,10,15) + (10,10,10,10) -> R 1, P 0.8
    assert r["OIS"] == pytest.approx(2 * 0.8 / 1.8)
    # ODS: summed counts (20,20,20,35), (15,20,15,20), (15,20,15,15) -> best F = 6/7 at t=0.7
    assert r["ODS"] == pytest.approx(6 / 7) and r["ODS_threshold"] == pytest.approx(0.7)
