"""SPair-71k / PF-Pascal loaders on generated mini datasets, and PCK against hand-worked cases."""
from __future__ import annotations

import json

import pytest
import torch

from difffeat.errors import BadInputError, UnknownNameError
from difffeat.tasks import correspond_data as D
from fixtures_correspond import PF_PASCAL_PAIRS, SPAIR_TEST_PAIRS, make_pfpascal, make_spair


@pytest.fixture(scope="module")
def spair(tmp_path_factory):
    return make_spair(tmp_path_factory.mktemp("spair"))


@pytest.fixture(scope="module")
def pfpascal(tmp_path_factory):
    return make_pfpascal(tmp_path_factory.mktemp("pf"))


def test_load_spair_reads_the_published_format(spair):
    pairs = D.load_spair(spair, "test")
    assert [p.category for p in pairs] == ["cat", "cat", "dog"]
    p = pairs[0]
    assert p.pair_id == "000001-2008_000001-2008_000002:cat"
    assert p.src_image == spair / "JPEGImages" / "cat" / "2008_000001.jpg" and p.src_image.is_file()
    assert p.src_size == (32, 48) and p.tgt_size == (40, 40)  # imsize is [W, H, C]
    assert p.src_bbox == (2, 3, 44, 31) and p.tgt_bbox == (1, 1, 39, 21)
    assert torch.equal(p.src_kps, torch.tensor(SPAIR_TEST_PAIRS[0][3], dtype=torch.float32))
    assert torch.equal(p.tgt_kps, torch.tensor(SPAIR_TEST_PAIRS[0][4], dtype=torch.float32))
    assert p.kps_ids == (0, 3, 7)
    assert [len(q.src_kps) for q in pairs] == [3, 2, 4]


def test_load_spair_filters_limits_and_falls_back_without_layout(spair, tmp_path):
    assert [p.category for p in D.load_spair(spair, categories=["dog"])] == ["dog"]
    assert len(D.load_spair(spair, limit=1)) == 2  # one per category
    assert [p.pair_id for p in D.load_spair(spair, "trn")] == ["000001-2008_000001-2008_000002:cat"]
    bare = make_spair(tmp_path, with_layout=False)
    assert [p.pair_id for p in D.load_spair(bare)] == [p.pair_id for p in D.load_spair(spair)]


def test_load_spair_errors_are_one_clear_line(spair, tmp_path):
    with pytest.raises(UnknownNameError, match="unknown SPair-71k split 'train'"):
        D.load_spair(spair, "train")
    with pytest.raises(UnknownNameError, match="category 'zebra'"):
        D.load_spair(spair, categories=["zebra"])
    with pytest.raises(BadInputError, match="not a SPair-71k folder"):
        D.load_spair(tmp_path)
    broken = make_spair(tmp_path / "b")
    f = next((broken / "PairAnnotation" / "val").glob("*.json"))
    d = json.loads(f.read_text())
    del d["trg_bndbox"]
    f.write_text(json.dumps(d))
    with pytest.raises(BadInputError, match="lacks field 'trg_bndbox'") as e:
        D.load_spair(broken, "val")
    assert "\n" not in str(e.value)


def test_load_pfpascal_reads_the_csv_format(pfpascal):
    pairs = D.load_pfpascal(pfpascal)
    assert len(pairs) == 2 and {p.category for p in pairs} == {"cat"}  # class 8 of 20 (1-based)
    p = pairs[0]
    assert p.src_image == pfpascal / "JPEGImages" / "2007_000027.jpg"
    assert p.src_size == (30, 40) and p.tgt_size == (36, 36)  # read from the images, (H, W)
    _, _, _, xa, ya, xb, yb = PF_PASCAL_PAIRS[0]
    # CSV coordinates are 1-based; the loader returns 0-based pixel centres.
    assert torch.equal(p.src_kps, torch.tensor([xa, ya], dtype=torch.float32).T)  # as SD-DINO/GeoAware: no -1
    assert torch.equal(p.tgt_kps, torch.tensor([xb, yb], dtype=torch.float32).T)
    assert p.tgt_bbox is None
    # The dataset folder, its parent and the CSV itself all work.
    for root in (pfpascal.parent, pfpascal / "test_pairs_pf_pascal.csv"):
        assert [q.pair_id for q in D.load_pfpascal(root)] == [q.pair_id for q in pairs]
    assert len(D.load_pairs("pfpascal", pfpascal, limit=1)) == 1


def test_load_pfpascal_errors(pfpascal, tmp_path):
    with pytest.raises(BadInputError, match="no PF-Pascal pair list for split 'val'"):
        D.load_pfpascal(pfpascal, "val")
    dhpf = tmp_path / "trn_pairs.csv"  # the DHPF layout keeps keypoints in .mat files
    dhpf.write_text("source_image,target_image,class,flip\nJPEGImages/a.jpg,JPEGImages/b.jpg,1,0\n")
    with pytest.raises(BadInputError, match="lacks PF-Pascal columns XA,YA,XB,YB"):
        D.load_pfpascal(dhpf)
    missing = tmp_path / "test_pairs_pf_pascal.csv"
    missing.write_text("source_image,target_image,class,XA,YA,XB,YB\nPF-dataset-PASCAL/JPEGImages/nope.jpg,"
                       "PF-dataset-PASCAL/JPEGImages/nope2.jpg,8,1,1,1,1\n")
    with pytest.raises(BadInputError, match="image 'PF-dataset-PASCAL/JPEGImages/nope.jpg'.*not found"):
        D.load_pfpascal(missing)
    with pytest.raises(UnknownNameError, match="unknown dataset 'cub'"):
        D.load_pairs("cub", pfpascal)


def test_pck_thresholds_follow_both_conventions(spair, pfpascal):
    p = D.load_spair(spair)[0]
    assert D.pck_threshold(p, "bbox") == 38.0  # target bbox [1, 1, 39, 21]: max(38, 20)
    assert D.pck_threshold(p, "image") == 40.0  # target image 40 x 40
    q = D.load_pfpascal(pfpascal)[0]
    assert D.pck_threshold(q, "image") == 36.0
    with pytest.raises(BadInputError, match="no target bounding box"):
        D.pck_threshold(q, "bbox")
    assert D.default_normaliser("spair") == "bbox" and D.default_normaliser("pfpascal") == "image"


def test_pck_correct_hand_worked():
    gt = torch.zeros(5, 2)
    pred = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [9.0, 12.0], [12.0, 16.0]])  # 0, 5, 10, 15, 20
    c = D.pck_correct(pred, gt, 100.0)  # limits 5, 10, 15 (inclusive)
    assert c.tolist() == [[True, True, False, False, False],
                          [True, True, True, False, False],
                          [True, True, True, True, False]]


def test_pck_per_image_and_per_keypoint_averages_differ_as_worked_by_hand():
    acc = D.PCKAccumulator(normaliser="bbox", alphas=(0.1,))
    # Pair A (cat): 1 keypoint, correct. Pair B (cat): 3 keypoints, 1 correct. L = 50 -> limit 5.
    acc.add(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]]), 50.0, "cat")
    acc.add(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 30.0]]), torch.zeros(3, 2), 50.0, "cat")
    # Pair C (dog): 2 keypoints, none correct. Pair D (dog): no keypoints, ignored.
    acc.add(torch.tensor([[6.0, 0.0], [0.0, 6.0]]), torch.zeros(2, 2), 50.0, "dog")
    acc.add(torch.zeros(0, 2), torch.zeros(0, 2), 50.0, "dog")
    s = acc.summary()
    assert s["pairs"] == 3 and s["keypoints"] == 6
    assert s["per_image"]["0.1"] == pytest.approx(100 * (1 + 1 / 3 + 0) / 3)
    assert s["per_keypoint"]["0.1"] == pytest.approx(100 * 2 / 6)
    assert s["per_category"]["cat"]["per_image"]["0.1"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    assert s["per_category"]["cat"]["per_keypoint"]["0.1"] == pytest.approx(50.0)
    assert s["per_category"]["dog"]["per_keypoint"]["0.1"] == 0.0
    table = D.format_pck_table(s)
    assert "normaliser: bbox (max side of the target bbox)" in table
    assert [ln.split()[0] for ln in table.splitlines()[2:5]] == ["cat", "dog", "all"]
    assert "66.7" in table.splitlines()[2] and "33.3" in table.splitlines()[4]
    # SD-DINO's headline: per keypoint within each category, then the mean over categories
    assert s["category_mean"]["0.1"] == pytest.approx((50.0 + 0.0) / 2)
    assert table.splitlines()[-1] == "per keypoint, mean over categories: @0.1 25.0"


def test_ground_truth_scores_100_on_every_loaded_pair(spair, pfpascal):
    for dataset, root in (("spair", spair), ("pfpascal", pfpascal)):
        norm = D.default_normaliser(dataset)
        acc = D.PCKAccumulator(normaliser=norm)
        for p in D.load_pairs(dataset, root):
            acc.add(p.tgt_kps, p.tgt_kps, D.pck_threshold(p, norm), p.category)
        s = acc.summary()
        assert s["alphas"] == [0.05, 0.1, 0.15]
        assert set(s["per_image"].values()) == {100.0} and set(s["per_keypoint"].values()) == {100.0}
