"""Classification: the zero-shot Diffusion Classifier, feature probes and `difffeat classify`."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import difffeat
from difffeat.errors import BadInputError, CheckpointMismatchError
from difffeat.heads.diffusion_classifier import DiffusionClassifier, Schedule, fit_temperature, spread_order
from difffeat.heads.probe_cls import KNNProbe, LinearProbe, ProbeClassifier, accuracy, pool_features


def run_cli(*args: str):  # type: ignore[no-untyped-def]
    from difffeat.cli import cli, load_task_commands

    load_task_commands()
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


class Oracle(torch.nn.Module):
    """An analytic denoiser for one known image: the exact target for class ``good``,
    the target plus a class-dependent offset for the others. Records every call."""

    def __init__(self, bb, x0: torch.Tensor, good: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.alphas, self.target, self.x0, self.good = bb.alphas_cumprod, bb.target, x0.float(), good
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, sample, timestep, class_labels=None, return_dict=False):  # type: ignore[no-untyped-def]
        self.calls.append((sample.clone(), timestep.clone(), class_labels.clone()))
        a = self.alphas[timestep].view(-1, 1, 1, 1)
        eps = (sample.float() - a.sqrt() * self.x0) / (1 - a).sqrt()
        target = self.target(self.x0.expand_as(eps), eps, timestep)
        off = 0.05 * (1 + class_labels.float()).view(-1, 1, 1, 1) * (class_labels != self.good).view(-1, 1, 1, 1)
        return (target + off,)


@pytest.fixture(scope="module")
def pixel_cls(tiny_pixel_cls_dir: Path):  # type: ignore[no-untyped-def]
    bb = difffeat.load_backbone(str(tiny_pixel_cls_dir), dtype="fp32", device="cpu")
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return bb, img, bb.encode(img)[0][0]


def with_oracle(bb, x0, good):  # type: ignore[no-untyped-def]
    bb.denoiser = Oracle(bb, x0, good)
    return bb.denoiser


# ---------------------------------------------------------------- schedule
def test_schedule_matches_reference_arithmetic() -> None:
    cifar = Schedule((50, 500), (5, 1), "l1")
    grid = cifar.grid(1000)
    assert grid[:3] == [1, 3, 5] and len(grid) == 500  # range(T//m//2, T, T//m)
    stage1 = [grid[i] for i in cifar.stage_indices(0, len(grid))]
    assert stage1[:3] == [11, 31, 51] and len(stage1) == 50
    assert [s["evals"] for s in cifar.plan(10)] == [500, 2250]  # stage 2 skips the 50 seen timesteps
    assert cifar.unet_evals(10) == 2750
    assert Schedule((50, 100, 500, 1000), (500, 50, 10, 1)).unet_evals(1000) == 124_500
    order = spread_order(8)
    assert sorted(order) == list(range(8)) and order[:2] == [0, 4]
    with pytest.raises(BadInputError, match="as many n_samples"):
        Schedule((10, 20), (1,))


# ---------------------------------------------------------------- zero-shot core
def test_classes_share_identical_noisy_inputs(pixel_cls) -> None:  # type: ignore[no-untyped-def]
    bb, img, x0 = pixel_cls
    oracle = with_oracle(bb, x0, good=1)
    clf = DiffusionClassifier(bb, ["0", "1", "2", "3"], schedule=Schedule((3, 6), (2, 1)), max_batch=5)
    clf(img)
    x = torch.cat([c[0] for c in oracle.calls])
    t = torch.cat([c[1] for c in oracle.calls])
    y = torch.cat([c[2] for c in oracle.calls])
    for tv in t.unique():
        rows = (t == tv).nonzero().flatten()
        assert len(set(y[rows].tolist())) == len(rows) >= 2  # several classes at this t, once each
        for r in rows[1:]:
            assert torch.equal(x[r], x[rows[0]])  # the very same x_t for every class
    # stage 1 scores all 4 classes on the same 3 timesteps
    t_by_class = {c: set(t[y == c].tolist()) for c in range(4)}
    first = set.intersection(*t_by_class.values())
    assert len(first) == 3


def test_adaptive_schedule_keeps_configured_counts(pixel_cls) -> None:  # type: ignore[no-untyped-def]
    bb, img, x0 = pixel_cls
    oracle = with_oracle(bb, x0, good=2)
    sch = Schedule((2, 4, 8), (4, 2, 1))
    clf = DiffusionClassifier(bb, ["0", "1", "2", "3", "4"], schedule=sch, max_batch=7)  # 4 = the null label
    pred = clf(img)[0]
    assert [s["classes"] for s in pred.stages] == [5, 4, 2]
    y = torch.cat([c[2] for c in oracle.calls])
    assert pred.unet_evals == len(y) == sch.unet_evals(5) == sum(s["evals"] for s in sch.plan(5))
    assert pred.top1 == "2" and pred.samples[0] == 8  # the survivor was scored on every timestep
    # grid of 8: stage 1 takes indices {2, 6}, stage 2 {1, 3, 5, 7} (disjoint), stage 3 the rest
    assert sorted(pred.samples, reverse=True) == [8, 8, 6, 6, 2]


@pytest.mark.parametrize("good", [0, 3])
def test_oracle_class_wins(pixel_cls, good: int) -> None:  # type: ignore[no-untyped-def]
    bb, img, x0 = pixel_cls
    with_oracle(bb, x0, good)
    clf = DiffusionClassifier(bb, ["0", "1", "2", "3"], schedule=Schedule((4, 8), (2, 1), loss="l1"), max_batch=16)
    pred = clf(img)[0]
    assert pred.top1 == str(good)
    assert pred.errors[0] < 1e-5 and min(pred.gaps[1:]) > 0.04
    assert pred.scores[0] == max(pred.scores) and abs(sum(pred.scores) - 1) < 1e-9


def test_v_prediction_target_and_early_stop(pixel_cls) -> None:  # type: ignore[no-untyped-def]
    bb, img, x0 = pixel_cls
    bb.prediction_type = "v_prediction"  # the oracle returns the model's target, so v must win too
    try:
        with_oracle(bb, x0, good=3)
        full = DiffusionClassifier(bb, ["0", "1", "2", "3"], schedule=Schedule((4, 64), (2, 1)), max_batch=8)(img)[0]
        fast = DiffusionClassifier(bb, ["0", "1", "2", "3"], schedule=Schedule((4, 64), (2, 1)), max_batch=8,
                                   early_stop=3.0)(img)[0]
    finally:
        bb.prediction_type = "epsilon"
    assert full.top1 == fast.top1 == "3"
    assert fast.stages[1]["stopped_early"] and fast.unet_evals < full.unet_evals


def test_fit_temperature_recovers_scale() -> None:
    rng = np.random.default_rng(0)
    gaps, labels = [], []
    for _ in range(400):  # labels drawn from softmax(-gap / 0.02)
        g = np.concatenate([[0.0], rng.uniform(0, 0.08, 3)])
        p = np.exp(-g / 0.02)
        gaps.append(g.tolist())
        labels.append(int(rng.choice(4, p=p / p.sum())))
    assert 0.014 < fit_temperature(gaps, labels) < 0.028


# ---------------------------------------------------------------- probes
def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(7)) * 4
    y = torch.arange(n) % 3
    return centres[y] + torch.randn(n, 16, generator=g), y


def test_probes_fit_predict_save_load(tmp_path: Path) -> None:
    xtr, ytr = blobs(60, 0)
    xte, yte = blobs(30, 1)
    for backend in ("sklearn", "torch"):
        lin = LinearProbe.fit(xtr, ytr, 3, backend=backend)
        assert accuracy(torch.softmax(lin(xte), 1), yte) == 1.0
    assert accuracy(KNNProbe(xtr, ytr, 3, k=5).predict_proba(xte), yte) == 1.0
    feats = {"up.1": torch.randn(2, 8, 4, 4), "mid": torch.randn(2, 4, 2, 2)}
    assert pool_features(feats, 2).shape == (2, 8 * 4 + 4 * 4)
    assert torch.allclose(pool_features(feats, 1)[:, :8], feats["up.1"].mean((2, 3)))
    record = {"preset": "sd21-base", "layers": ["up.1"], "timesteps": [100], "pool": 1}
    probe = ProbeClassifier.fit(xtr, ytr, ["a", "b", "c"], record, k=5)
    probe.save(tmp_path / "ckpt")
    back = ProbeClassifier.load(tmp_path / "ckpt", expect_backbone={"preset": "sd21-base", "timesteps": [100]})
    assert back.classes == ["a", "b", "c"]
    assert torch.allclose(back.predict_proba(xte), probe.predict_proba(xte), atol=1e-6)
    assert torch.allclose(back.predict_proba(xte, "knn"), probe.predict_proba(xte, "knn"), atol=1e-3)
    with pytest.raises(CheckpointMismatchError, match="preset"):
        ProbeClassifier.load(tmp_path / "ckpt", expect_backbone={"preset": "sd15"})
    with pytest.raises(CheckpointMismatchError):
        back.check_features(torch.randn(2, 17))


# ---------------------------------------------------------------- CLI
def labelled(root: Path, classes: list[str], per_class: int, size: int = 24) -> Path:
    colours = {0: (220, 30, 30), 1: (30, 30, 220), 2: (30, 200, 30)}
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(colours[ci]) + rng.normal(0, 20, (size, size + 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_cli_zero_shot_text_model_eval_and_resume(tiny_sd_dir: Path, tmp_path: Path) -> None:
    root = labelled(tmp_path / "imgs", ["cat", "dog"], 1)
    out = tmp_path / "preds.csv"
    args = ["classify", str(root), "-m", str(tiny_sd_dir), "--n-samples", "1,2", "--to-keep", "1,1",
            "--resolution", "64", "--device", "cpu", "--topk", "2", "-o", str(out), "--eval"]
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert [row["image"] for row in rows] == [str(root / "cat" / "0.png"), str(root / "dog" / "0.png")]
    for row in rows:
        topk = json.loads(row["topk"])
        assert row["top1"] == topk[0][0] and {e[0] for e in topk} == {"cat", "dog"}
        assert topk[0][2] == 0.0 and topk[1][2] >= 0  # [class, mean error, gap to the top class]
    assert "accuracy:" in r.output and (tmp_path / "preds.confusion.png").exists()
    assert "denoiser evaluations per image: mean 3, max 3 (the paper schedule: 3)" in r.output
    # the score is softmax(-gap / temperature): with two classes, the logistic of gap / temperature
    fixed = tmp_path / "fixed.csv"
    assert run_cli(*args[:-3], "--classes", "cat,dog", "-o", str(fixed), "--temperature", "0.002").exit_code == 0
    for row in csv.DictReader(fixed.open()):
        gap = json.loads(row["topk"])[1][2]
        assert float(row["score"]) == pytest.approx(1 / (1 + math.exp(-gap / 0.002)), abs=6e-5)
    again = run_cli(*args)
    assert again.exit_code == 0 and "0 new, 2 already there" in again.output
    assert len(list(csv.DictReader(out.open()))) == 2


def test_cli_zero_shot_data_parallel_ranks_merge_to_the_one_process_csv(
        tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two torchrun ranks (RANK/WORLD_SIZE) classify disjoint shares; the last one to finish
    merges a CSV equal to a one-process run's, row for row, and evaluates it."""
    root = labelled(tmp_path / "imgs", ["cat", "dog"], 2)
    base = ["classify", str(root), "-m", str(tiny_sd_dir), "--n-samples", "1,2", "--to-keep", "1,1",
            "--resolution", "64", "--device", "cpu", "--eval"]
    assert run_cli(*base, "-o", str(tmp_path / "one.csv")).exit_code == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "two.csv"
    monkeypatch.setenv("RANK", "1")
    r1 = run_cli(*base, "-o", str(out))
    assert r1.exit_code == 0 and "another rank merges" in r1.output and not out.exists()
    part1 = list(csv.DictReader((tmp_path / "two.rank1-of-2.csv").open()))
    assert len(part1) == 2  # batch size 1: rank 1 owns images 1 and 3 of 4
    monkeypatch.setenv("RANK", "0")
    r0 = run_cli(*base, "-o", str(out))
    assert r0.exit_code == 0 and "accuracy:" in r0.output
    assert out.read_text() == (tmp_path / "one.csv").read_text()
    assert not list(tmp_path.glob("two.rank*"))


@pytest.mark.parametrize("classes, message", [
    ("", "empty class list"), ("cat,dog,cat", "duplicated class 'cat'"), ("cat", "only one class")])
def test_cli_class_list_errors(tmp_path: Path, classes: str, message: str) -> None:
    root = labelled(tmp_path / "imgs", ["cat"], 1)
    r = run_cli("classify", str(root), "--classes", classes, "-o", str(tmp_path / "p.csv"))
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_cli_train_probe_classify_and_sweep(tiny_pixel_dir: Path, tmp_path: Path) -> None:
    train_dir = labelled(tmp_path / "train", ["red", "blue"], 4)
    test_dir = labelled(tmp_path / "test", ["red", "blue"], 2)
    common = ["-m", str(tiny_pixel_dir), "--resolution", "16", "-e", "1", "--device", "cpu"]
    r = run_cli("train", "probe", str(train_dir), *common, "-l", "mid", "-t", "50", "--pool", "2",
                "--val-split", "0.25", "-k", "3", "-o", str(tmp_path / "ckpt"))
    assert r.exit_code == 0, r.output
    assert "validation accuracy" in r.output
    cfg = json.loads((tmp_path / "ckpt" / "probe.json").read_text())
    assert cfg["backbone"]["layers"] == ["mid"] and cfg["backbone"]["timesteps"] == [50] and cfg["classes"] == ["blue", "red"]
    r = run_cli("classify", str(test_dir), "--probe", str(tmp_path / "ckpt"), "--device", "cpu", "--eval",
                "-o", str(tmp_path / "probe.csv"))
    assert r.exit_code == 0, r.output
    assert "accuracy: 100.00% (4/4)" in r.output
    r = run_cli("classify", str(test_dir), "--probe", str(tmp_path / "ckpt"), "-m", "sd15", "-o", str(tmp_path / "x.csv"))
    assert r.exit_code == 2 and "error: head" in r.output and "preset" in r.output
    r = run_cli("sweep", "probe", str(train_dir), *common, "-l", "mid", "-l", "up.0", "-t", "50", "-t", "400",
                "--val", str(test_dir), "-k", "3", "-o", str(tmp_path / "sweep.csv"))
    assert r.exit_code == 0, r.output
    table = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert {(row["layer"], row["t"]) for row in table} == {("mid", "50"), ("mid", "400"), ("up.0", "50"), ("up.0", "400")}
    assert "<- best" in r.output


# ---------------------------------------------------------------- presets and prompts
def test_pets_prompts_come_from_the_reference_csv() -> None:
    from difffeat.tasks.classify import class_prompts, classify_preset

    cfg = classify_preset("pets")["classifier"]
    prompts = class_prompts(cfg["classes"], cfg["prompts"], cfg["template"])
    assert len(prompts) == 37 and prompts[0] == "a photo of a Abyssinian cat, a type of pet."
    assert prompts[cfg["classes"].index("basset hound")] == "a photo of a Basset Hound dog, a type of pet."
    assert all((" cat, " in p) or (" dog, " in p) for p in prompts if "Bulldog" not in p)  # 36 of 37 carry the word
    fast = classify_preset("pets-fast")
    assert fast["classifier"]["n_samples"] == [25, 250] and fast["classifier"]["delta"] == 0.05
    assert fast["classifier"]["prompts"] == cfg["prompts"]  # everything else is the paper preset's


def test_prompts_file_sets_classes_and_prompts(tiny_sd_dir: Path, tmp_path: Path) -> None:
    from difffeat.tasks.classify import build_zero_shot

    f = tmp_path / "p.csv"
    f.write_text('prompt,classname,classidx\n"a photo of a Bengal cat, a pet.",bengal,0\na photo of a pug dog.,pug,1\n')
    clf, _ = build_zero_shot(str(tiny_sd_dir), None, None, None, None, "1", None, None, None, None, None, None, 64,
                             None, "cpu", 8, False, 0, False, prompts_file=f)
    assert clf.classes == ["bengal", "pug"] and clf.prompts == ["a photo of a Bengal cat, a pet.", "a photo of a pug dog."]
    clf, _ = build_zero_shot(str(tiny_sd_dir), None, ["pug", "beagle"], None, "an image of {}.", "1", None, None, None,
                             None, None, None, 64, None, "cpu", 8, False, 0, False, prompts_file=f)
    assert clf.prompts == ["a photo of a pug dog.", "an image of beagle."]  # the template for classes not in the file
    f.write_text("prompt,name\na,b\n")
    with pytest.raises(BadInputError, match="'prompt' and 'classname' columns"):
        build_zero_shot(str(tiny_sd_dir), None, None, None, None, "1", None, None, None, None, None, None, 64, None,
                        "cpu", 8, False, 0, False, prompts_file=f)
