"""The classify task as plain functions (difffeat.tasks.classify): what the CLI calls."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from difffeat.errors import BadInputError
from difffeat.options import ExtractorOptions
from difffeat.tasks.classify import ClassifyOptions, ProbeOptions, classify, parse_ints, sweep_probe, train_probe
from test_classify import labelled, run_cli


def test_parse_ints() -> None:
    assert parse_ints("50, 500", "--n-samples") == (50, 500) and parse_ints("7", "x") == (7,)
    assert parse_ints(None, "x") is None
    with pytest.raises(BadInputError, match="--to-keep must be comma-separated integers, got '5,a'"):
        parse_ints("5,a", "--to-keep")


def test_classify_function_writes_the_commands_csv(tiny_sd_dir: Path, tmp_path: Path) -> None:
    root = labelled(tmp_path / "imgs", ["cat", "dog"], 1)
    cli_csv, api_csv = tmp_path / "cli.csv", tmp_path / "api.csv"
    r = run_cli("classify", str(root), "-m", str(tiny_sd_dir), "--n-samples", "1,2", "--to-keep", "1,1",
                "--resolution", "64", "--device", "cpu", "--eval", "-o", str(cli_csv))
    assert r.exit_code == 0, r.output
    opts = ClassifyOptions(out=api_csv, n_samples="1,2", to_keep="1,1", evaluate=True)
    report = classify(root, opts, ExtractorOptions(model=str(tiny_sd_dir), resolution=64, device="cpu"))
    assert report.merged and report.run.done == 2 and report.run.skipped == 0
    assert report.evals == [3, 3] and report.paper_evals == 3
    assert report.evaluation is not None and report.evaluation["total"] == 2
    assert api_csv.read_text() == cli_csv.read_text()
    again = classify(root, opts, ExtractorOptions(model=str(tiny_sd_dir), resolution=64, device="cpu"))
    assert again.run.done == 0 and again.run.skipped == 2 and again.evals == []


def test_probe_mode_refuses_zero_shot_options(tmp_path: Path) -> None:
    """--probe brings its own classes and feature settings: zero-shot options are an error, not ignored."""
    root = labelled(tmp_path / "imgs", ["cat"], 1)
    args = ["classify", str(root), "--probe", str(tmp_path / "none"), "-o", str(tmp_path / "p.csv")]
    r = run_cli(*args, "--n-samples", "1", "--resolution", "64", "--hierarchy-keep", "3")
    assert r.exit_code == 2
    assert "error: --probe uses the settings recorded with the probe: drop --n-samples, --hierarchy-keep, " \
           "--resolution" in r.output
    r = run_cli(*args, "--classes", "a,b")
    assert r.exit_code == 2 and "drop --classes/--classes-file/--preset" in r.output


def test_train_and_sweep_probe_functions(tiny_pixel_dir: Path, tmp_path: Path) -> None:
    train_dir = labelled(tmp_path / "train", ["red", "blue"], 4)
    ex = ExtractorOptions(model=str(tiny_pixel_dir), resolution=16, ensemble=1, device="cpu", layers=("mid",),
                          timesteps=(50, 400))
    opts = ProbeOptions(val_split=0.25, knn_k=3)
    probe, dim = train_probe(train_dir, opts, ex, tmp_path / "ckpt")
    assert probe.classes == ["blue", "red"] and probe.metrics["train_images"] == 6 and probe.metrics["val_images"] == 2
    assert probe.knn is not None and dim == probe.knn.features.shape[1] and (tmp_path / "ckpt" / "probe.json").exists()
    sweep = sweep_probe(train_dir, opts, ex, tmp_path / "sweep.csv")
    assert [(r["layer"], r["t"]) for r in sweep.rows] == [("mid", 50), ("mid", 400)]
    assert sweep.best in sweep.rows and (sweep.train_images, sweep.val_images) == (6, 2)
    table = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["layer"], r["t"]) for r in table] == [("mid", "50"), ("mid", "400")]
