"""`difffeat correspond` / `difffeat eval correspond` end to end, presets, geometry and the flip test."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from difffeat.cli import cli, load_task_commands
from difffeat.errors import BadInputError, DiffFeatError
from difffeat.io import pil_to_tensor
from difffeat.tasks import correspond as C
from difffeat.tasks import correspond_data as D
from fixtures_correspond import make_pfpascal, make_spair

load_task_commands()
TINY = ["-t", "50", "-e", "1", "--resolution", "64", "--device", "cpu", "--dtype", "fp32"]


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(root / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "c.png")
    (root / "broken.png").write_text("not an image")
    return root


# ----------------------------------------------------------------------------- CLI
def test_self_pair_maps_points_and_every_pixel_onto_themselves(tiny_sd_dir, images, tmp_path):
    out = tmp_path / "out"
    args = ["correspond", images / "a.png", images / "a.png", "--points", "10,12;30.5,40;50,20", "--dense",
            "-m", tiny_sd_dir, *TINY, "-o", out]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "a__a.json").read_text())
    assert rec["preset"] == "dift" and rec["matching"]["metric"] == "cosine" and rec["matching"]["upsample"]
    # Identical features: every point's best match is itself (DIFT cosine argmax at pixel level);
    # 30.5 is read bilinearly between pixels and lands on a neighbouring pixel centre.
    got = [m["target"] for m in rec["matches"]]
    assert got[0] == [10.0, 12.0] and got[2] == [50.0, 20.0] and abs(got[1][0] - 30.5) <= 0.5
    assert [m["score"] for m in rec["matches"][::2]] == pytest.approx([1.0, 1.0], abs=1e-5)
    flow = np.load(out / "a__a.flow.npy")
    assert flow.shape == (64, 64, 2) and np.abs(flow).max() < 1e-4  # the identity, border included
    assert rec["dense"]["convention"].startswith("flow[y, x] = (x_src - x")
    warped = np.asarray(Image.open(out / "a__a.warped.png"), dtype=np.int16)
    assert np.abs(warped - np.asarray(Image.open(images / "a.png"), dtype=np.int16)).max() <= 1
    assert Image.open(out / "a__a.png").size == (64 + 8 + 64, 64)
    # Finished pairs are skipped (without loading a model: -m may even be gone).
    stamp = (out / "a__a.json").stat().st_mtime_ns
    r = invoke(*[a if a != tiny_sd_dir else tmp_path / "gone" for a in args])
    assert r.exit_code == 0 and "0 pair(s) matched, 1 skipped" in r.output
    assert (out / "a__a.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("args, message", [
    (["--points", "5,6;500,3"], "error: point 2 (x=500, y=3) is outside the source image (64x64 pixels"),
    (["--points", "5;6"], "error: bad point '5' in '5;6': write points as 'x,y;x,y'"),
    ([], "error: give --points, --points-file or --dense"),
])
def test_bad_points_fail_in_one_line_before_loading_a_model(images, tmp_path, args, message):
    r = invoke("correspond", images / "a.png", images / "c.png", *args, "-m", tmp_path / "no-model", "-o", tmp_path)
    assert r.exit_code == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1


def test_unreadable_image_and_mismatched_pair_files_fail_in_one_line(images, tmp_path):
    r = invoke("correspond", images / "a.png", images / "broken.png", "--points", "1,1", "-o", tmp_path)
    assert r.exit_code == 2 and r.stderr.startswith("error: cannot read image") and r.stderr.count("\n") == 1
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("src,dst\na.png,b.jpg\n")
    r = invoke("correspond", "--pairs", bad_header, "--points", "1,1", "-o", tmp_path)
    assert r.exit_code == 2 and "needs a header with columns source,target" in r.stderr
    ragged = tmp_path / "r.csv"
    ragged.write_text("source,target\na.png,b.jpg,extra\n")
    r = invoke("correspond", "--pairs", ragged, "--points", "1,1", "-o", tmp_path)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: pairs file {ragged} line 2 has 3 fields, the header has 2"


class Counting(nn.Module):
    """Wraps an extractor and counts the images it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.images = inner, 0
        self.keys, self.resolution, self.resize, self.backbone = inner.keys, inner.resolution, inner.resize, inner.backbone

    def forward(self, images, **kw):  # type: ignore[no-untyped-def]
        self.images += len(images)
        return self.inner(images, **kw)


def test_pairs_file_extracts_each_image_once_and_resumes(tiny_sd_dir, images, tmp_path, monkeypatch):
    csv_path = images / "pairs.csv"
    csv_path.write_text('source,target,category,points\na.png,b.jpg,cat,"5,6;40,33"\nb.jpg,c.png,cat,"2,3"\n'
                        'a.png,c.png,cat,\n')
    jobs = C.read_pairs_file(csv_path, points=C.parse_points("7,8"))
    assert [j.name for j in jobs] == ["00000_a__b", "00001_b__c", "00002_a__c"]
    assert jobs[1].points.tolist() == [[2.0, 3.0]] and jobs[2].points.tolist() == [[7.0, 8.0]]
    pipe = C.build_pipeline("dift", matching={"mode": "mutual"}, model=str(tiny_sd_dir), timesteps=(50,),
                            ensemble=1, resolution=64, device="cpu", dtype="fp32")
    assert pipe.prompt_for("cat") == "a photo of a cat" and pipe.prompt_for(None) is None
    pipe.extractor = Counting(pipe.extractor)
    out = tmp_path / "out"
    run = C.run_pairs(pipe, jobs, out)
    assert run.done == 3 and pipe.extractor.images == 3  # three images, each extracted once
    rec = json.loads((out / "00000_a__b.json").read_text())
    assert rec["category"] == "cat" and rec["source_size"] == [64, 64] and rec["target_size"] == [80, 48]
    for m in rec["matches"]:
        x, y = m["target"]
        assert 0 <= x <= 79 and 0 <= y <= 47 and isinstance(m["mutual"], bool)
    assert Image.open(out / "00000_a__b.png").size == (64 + 8 + 80, 64)
    stamp = (out / "00000_a__b.json").stat().st_mtime_ns
    again = C.run_pairs(pipe, jobs, out)
    assert (again.done, again.skipped, pipe.extractor.images) == (0, 3, 3)
    assert (out / "00000_a__b.json").stat().st_mtime_ns == stamp
    redo = C.run_pairs(pipe, jobs[:1], out, overwrite=True)
    assert redo.done == 1 and pipe.extractor.images == 5
    # One failing pair is reported and the others are still written.
    bad = C.PairJob("bad", images / "a.png", images / "broken.png", None, torch.zeros(1, 2))
    with pytest.raises(DiffFeatError, match="1 of 2 pairs failed"):
        C.run_pairs(pipe, [bad, jobs[1]], tmp_path / "out2")
    assert [p.name for p in (tmp_path / "out2").glob("*.json")] == ["00001_b__c.json"]
    # data-parallel (torchrun ranks): disjoint contiguous blocks, identical files to one process
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        part = C.run_pairs(pipe, jobs, tmp_path / "dp")
        assert (part.done, part.skipped) == ((2, 0) if rank == 0 else (1, 0))
    for j in jobs:
        assert (tmp_path / "dp" / f"{j.name}.json").read_bytes() == (out / f"{j.name}.json").read_bytes()


def test_eval_correspond_prints_pck_and_resumes(tiny_sd_dir, tmp_path):
    spair = make_spair(tmp_path)
    out = tmp_path / "eval"
    args = ["eval", "correspond", spair, "--dataset", "spair", "-m", tiny_sd_dir, *TINY, "-o", out]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "spair test: 3 pairs, 9 keypoints, preset dift"
    assert "normaliser: bbox" in lines[1] and [ln.split()[0] for ln in lines[3:6]] == ["cat", "dog", "all"]
    assert "paper (bbox normaliser, per image): pck@0.1: 52.9" in r.output
    summary = json.loads((out / "pck.json").read_text())
    assert f"difffeat, same averaging: pck@0.05: {summary['per_image']['0.05']:.1f}" in r.output
    assert summary["pairs"] == 3 and summary["keypoints"] == 9 and set(summary["per_image"]) == {"0.05", "0.1", "0.15"}
    preds = (out / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 3
    # Re-scoring the stored predictions by hand gives the same numbers.
    acc = D.PCKAccumulator("bbox")
    by_id = {json.loads(ln)["pair_id"]: json.loads(ln)["pred"] for ln in preds}
    for p in D.load_spair(spair):
        acc.add(torch.tensor(by_id[p.pair_id]), p.tgt_kps, D.pck_threshold(p, "bbox"), p.category)
    assert acc.summary()["per_keypoint"] == summary["per_keypoint"]
    # A rerun reads the predictions back instead of recomputing them (no model is loaded).
    r2 = invoke(*[a if a != tiny_sd_dir else tmp_path / "gone" for a in args])
    assert r2.exit_code == 0 and r2.output == r.output
    assert (out / "predictions.jsonl").read_text().splitlines() == preds


# ----------------------------------------------------------------------- presets
def test_presets_carry_protocols_and_paper_numbers():
    from difffeat.registry import get_preset, list_presets

    assert {"dift", "sd-dino", "geoaware-zs"} <= set(list_presets("correspond"))
    dift, sd_dino, geo = (get_preset(n).raw for n in ("dift", "sd-dino", "geoaware-zs"))
    expect = {"model": "sd21", "layers": ["up.1"], "timesteps": [261], "ensemble": 8, "resolution": 768, "resize": "resize"}
    assert {k: dift["extract"][k] for k in expect} == expect
    assert dift["category_prompt"] == "a photo of a {category}" and dift["extract"]["prompt"] == ""
    assert C.MatchSettings.from_dict(dift["matching"]) == C.MatchSettings("cosine", "argmax", True)
    assert C.MatchSettings.from_dict(sd_dino["matching"]) == C.MatchSettings("l2", "argmax", False, src_read="cell")
    assert C.MatchSettings.from_dict(geo["matching"]) == C.MatchSettings("cosine", "soft", False, 5, 0.02, True, "cell")
    assert geo["fusion"]["pca_mode"] == "none" and [s["model"] for s in geo["fusion"]["sources"]] == ["sd15", "dinov2-b"]
    assert [p["paper_results"]["spair71k"]["pck@0.1"] for p in (dift, sd_dino, geo)] == [52.9, 64.0, 65.4]
    with pytest.raises(BadInputError, match="fuses several models"):
        C.build_pipeline("geoaware-zs", model="sd21")
    with pytest.raises(Exception, match="unknown matching setting 'beta'"):
        C.MatchSettings.from_dict({"beta": 0.02})


# ---------------------------------------------------------------- geometry, flip test
class Pixels(nn.Module):
    """A model-free 'extractor': each pixel's RGB plus a faint x-position channel, stride 1."""

    keys = ["px"]

    def __init__(self, resolution=None, resize="resize"):  # type: ignore[no-untyped-def]
        super().__init__()
        self.resolution, self.resize, self.size_multiple = resolution, resize, 1

    def forward(self, images, **_):  # type: ignore[no-untyped-def]
        x = torch.stack([pil_to_tensor(im) for im in images])
        pos = torch.linspace(0, 0.01, x.shape[-1]).expand(x.shape[0], 1, x.shape[-2], -1)
        return {"px": torch.cat([x, pos], 1)}


def test_padded_frames_carry_points_through_the_content_box():
    pipe = C.CorrespondPipeline(Pixels(resolution=64, resize="pad"))
    frame = pipe.frame(Image.new("RGB", (60, 30)))
    assert frame.size == (64, 64) and frame.box == (0, 16, 64, 48)
    pts = torch.tensor([[0.0, 0.0], [59.0, 29.0], [12.25, 7.5]])
    inside = frame.to_frame(pts)
    assert torch.allclose(inside[0], torch.tensor([0.5 * 64 / 60 - 0.5, 16 + 0.5 * 32 / 30 - 0.5]))
    assert torch.allclose(frame.from_frame(inside), pts, atol=1e-5)
    # The resize policy (DIFT) keeps the original image as the frame.
    assert C.CorrespondPipeline(Pixels(resolution=64)).frame(Image.new("RGB", (60, 30))).size == (30, 60)


def test_flip_test_matches_mirror_partners_when_the_flipped_source_fits_better():
    rng = np.random.default_rng(3)
    src_img = Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8))
    tgt_img = src_img.transpose(Image.FLIP_LEFT_RIGHT)  # the target faces the other way
    pipe = C.CorrespondPipeline(Pixels(), C.MatchSettings(metric="l2", upsample=False, flip_test=True))
    src, tgt = pipe.image_features(src_img), pipe.image_features(tgt_img)
    fsrc = pipe.image_features(src_img, flip=True)
    pts = torch.tensor([[2.0, 3.0], [9.0, 3.0], [5.0, 6.0]])  # kp 0 and 1 are mirror partners, kp 2 is not annotated
    direct, used = pipe.match(src, tgt, pts)
    assert not used and direct.points.tolist() == [[9.0, 3.0], [2.0, 3.0], [6.0, 6.0]]  # same colour, mirrored place
    m, used = pipe.match(src, tgt, pts, flipped_src=fsrc, partners=[1, 0, None])
    assert used
    # kp 0 takes the flipped location of its partner kp 1: x = 11 - 9 = 2 in the target.
    assert m.points.tolist() == [[2.0, 3.0], [9.0, 3.0], [6.0, 6.0]]
    # When the original orientation fits better, nothing changes.
    m2, used2 = pipe.match(src, src, pts, flipped_src=fsrc, partners=[1, 0, None])
    assert not used2 and m2.points.tolist() == pts.tolist()


def test_flip_partners_follow_the_spair_table(tmp_path):
    pair = D.load_spair(make_spair(tmp_path))[0]  # cat, kps_ids (0, 3, 7)
    # cat pairs (0,1), (2,3), (6,7): partners 1, 2 and 6 are not annotated in this pair.
    assert D.flip_partners(pair) == [None, None, None]
    pair = D.CorrespondencePair("x", Path("a"), Path("b"), "cat", torch.zeros(4, 2), torch.zeros(4, 2), (1, 1), (1, 1),
                                kps_ids=(0, 1, 8, 3))
    assert D.flip_partners(pair) == [1, 0, 2, None]  # 8 (nose) is its own mirror image
    assert D.flip_partners(D.load_pfpascal(make_pfpascal(tmp_path))[0]) is None


def test_check_points_accepts_the_pixel_edges():
    C.check_points(torch.tensor([[-0.5, -0.5], [63.5, 31.5]]), (32, 64))
    with pytest.raises(BadInputError, match=r"point 1 \(x=-0.6, y=0\) is outside the target image"):
        C.check_points(torch.tensor([[-0.6, 0.0]]), (32, 64), "target image")


def test_points_file_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([[1, 2], [3.5, 4]]))
    (tmp_path / "b.json").write_text(json.dumps({"points": [[1, 2]]}))
    (tmp_path / "c.json").write_text(json.dumps({"points": [1, 2]}))
    assert C.read_points_file(tmp_path / "a.json").tolist() == [[1.0, 2.0], [3.5, 4.0]]
    assert C.read_points_file(tmp_path / "b.json").tolist() == [[1.0, 2.0]]
    with pytest.raises(BadInputError, match="must hold"):
        C.read_points_file(tmp_path / "c.json")
