"""``difffeat demo``: every task end to end on a few shapes scenes with the embedded difffeat-tiny."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from difffeat.data.shapes import CLASSES

SMALL = ["--scenes", "2", "--train-scenes", "2", "--epochs", "2", "--device", "cpu"]


def invoke(*args: object):  # type: ignore[no-untyped-def]
    from difffeat.cli import cli, load_task_commands

    load_task_commands()
    return CliRunner().invoke(cli, [str(a) for a in args])


def _png(path: Path, min_side: int = 64) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        w, h = im.size
    assert min_side <= w <= 4000 and min_side <= h <= 4000, (path, im.size)
    return w, h


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_demo_runs_every_task_and_refuses_to_overwrite(tmp_path: Path) -> None:
    from difffeat.tasks.demo import TASKS

    out = tmp_path / "demo"
    r = invoke("demo", "-o", out, *SMALL)
    assert r.exit_code == 0, r.output
    for name in TASKS:  # the printed table
        assert name in r.stdout
    assert "[6/6] detect" in r.stderr  # per-task progress lines

    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "difffeat-tiny" and s["scenes"] == 2 and s["seconds"] > 0
    assert list(s["tasks"]) == list(TASKS)
    for name, t in s["tasks"].items():
        assert isinstance(t["metric"], str) and t["metric"]
        assert isinstance(t["value"], float) and math.isfinite(t["value"]) and 0.0 <= t["value"] <= 1.0, (name, t)
        assert t["seconds"] >= 0
        for f in t["files"]:
            assert (out / name / f).exists(), (name, f)

    # classify: predictions vs truth, a labelled grid and the confusion matrix
    rows = list(csv.DictReader(open(out / "classify" / "predictions.csv", newline="")))
    assert len(rows) == 2 and all(r["top1"] in CLASSES for r in rows)
    preds = json.loads((out / "classify" / "predictions.json").read_text())["predictions"]
    assert len(preds) == 2 and all(p["truth"] in CLASSES and p["prediction"] in CLASSES for p in preds)
    acc = sum(p["correct"] for p in preds) / 2
    assert math.isclose(s["tasks"]["classify"]["value"], acc)
    _png(out / "classify" / "grid.png")
    _png(out / "classify" / "confusion.png")

    # correspond: side by side scene | second view, PCK from the known warp
    w, h = _png(out / "correspond" / "matches.png", min_side=128)
    assert w >= 2 * 64 * 3 and h >= 64 * 3  # the two views side by side, at 3x
    pck = json.loads((out / "correspond" / "pck.json").read_text())
    assert pck["keypoints"] > 0 and math.isclose(pck["per_image"]["0.1"] / 100, s["tasks"]["correspond"]["value"])

    # dense: image | truth | prediction, metrics, a prediction per test scene, a trained head
    for name in ("segment", "depth", "edges"):
        w, h = _png(out / name / "comparison.png", min_side=128)
        assert w >= 3 * 64 * 3  # three 64x64 panels at 3x
        assert len(list((out / name / "pred").glob("00000?.png"))) == 2
        assert (out / name / "run" / "head" / "head.safetensors").exists()
        assert json.loads((out / name / "metrics.json").read_text())
    assert s["tasks"]["depth"]["details"]["abs_rel"] >= 0

    # detect: DIRE of the real renders and of the model's own samples
    det = json.loads((out / "detect" / "scores.json").read_text())
    assert sorted(x["label"] for x in det["scores"]) == ["generated"] * 2 + ["real"] * 2
    assert all(x["dire"] >= 0 for x in det["scores"]) and 0 <= det["auc"] <= 1 and 0 <= det["ap"] <= 1
    assert det["auc"] >= 0.75, det  # the samples reconstruct better than the renders (an inverted rule gives 0)
    _png(out / "detect" / "samples.png")
    assert len(list((out / "data" / "generated").glob("*.png"))) == 2

    # a second run into the same folder fails in one line and touches nothing
    before = _snapshot(out)
    r2 = invoke("demo", "-o", out, *SMALL)
    assert r2.exit_code != 0
    assert r2.stderr.startswith("error: ") and r2.stderr.strip().count("\n") == 0 and "--overwrite" in r2.stderr
    assert _snapshot(out) == before


def test_output_folder_rules(tmp_path: Path) -> None:
    from difffeat.errors import BadInputError
    from difffeat.tasks.demo import MARKER, check_output_folder

    check_output_folder(tmp_path / "new", overwrite=False)  # a new folder is fine
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", overwrite=False)  # so is an empty one

    out = tmp_path / "used"
    (out / "classify").mkdir(parents=True)
    (out / "classify" / "grid.png").write_bytes(b"x")
    (out / "data").mkdir()
    (out / "summary.json").write_text("{}")
    (out / "mine.txt").write_text("keep me")
    for overwrite, words in ((False, ("not empty", "--overwrite")), (True, ("no earlier demo",))):
        with pytest.raises(BadInputError) as e:  # not a demo's folder: refused even with --overwrite
            check_output_folder(out, overwrite=overwrite)
        assert all(w in str(e.value) for w in words)
    assert (out / "summary.json").exists() and (out / "data").is_dir()
    (out / MARKER).write_text("{}")  # an earlier demo's folder
    with pytest.raises(BadInputError):
        check_output_folder(out, overwrite=False)
    check_output_folder(out, overwrite=True)  # removes the demo's outputs only
    assert not (out / "classify").exists() and not (out / "summary.json").exists() and not (out / "data").exists()
    assert (out / "mine.txt").read_text() == "keep me"

    f = tmp_path / "file"
    f.write_text("x")
    r = invoke("demo", "-o", f, *SMALL)
    assert r.exit_code != 0 and "not a folder" in r.stderr
    r = invoke("demo", "-o", tmp_path / "x", "--scenes", "1")
    assert r.exit_code != 0  # one scene cannot show a confusion matrix or an AUC
