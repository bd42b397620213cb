"""The dense tasks are a table: a task registered here, in the test only (surface normals:
3-channel regression with a cosine loss), trains, predicts and is scored through the same
generic commands as segmentation, depth and edges, with its own loss, targets, prediction,
metric and writer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import tiny_models

from difffeat.errors import BadInputError
from difffeat.io import save_png
from difffeat.tasks.dense_tasks import TASKS, DenseTask, LabelSettings, get_task

N = 4
LEFT, RIGHT = (0.0, 0.0, 1.0), (0.6, 0.0, 0.8)  # unit normals of the two regions
CALLS: dict[str, int] = {"loss": 0, "metric": 0, "write": 0}


def read_normals(path: Path, s: LabelSettings) -> np.ndarray:
    """[3, H, W] unit normals from .npy, or from a PNG written by the writer below."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32)
    return np.asarray(Image.open(path).convert("RGB"), np.float32).transpose(2, 0, 1) / 255 * 2 - 1


def cosine_loss(cfg, pred, sides, target, ignore):  # type: ignore[no-untyped-def]
    CALLS["loss"] += 1
    return 1 - F.cosine_similarity(pred.float(), target, dim=1).mean()


class MeanAngle:
    """Mean angular error in degrees over the pixels of a dataset."""

    def __init__(self) -> None:
        CALLS["metric"] += 1
        self.total, self.pixels = 0.0, 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        cos = F.cosine_similarity(pred[None].float(), target[None].float(), dim=1).clamp(-1, 1)
        self.total += float(torch.rad2deg(torch.acos(cos)).sum())
        self.pixels += cos.numel()

    def compute(self) -> dict[str, float]:
        return {"angle": self.total / max(self.pixels, 1), "images": self.pixels // (64 * 64)}


def normals_writer(config, options):  # type: ignore[no-untyped-def]
    def write(path: Path, normals: np.ndarray, image: Image.Image) -> None:
        CALLS["write"] += 1
        save_png(path, ((normals.transpose(1, 2, 0) + 1) / 2 * 255 + 0.5).clip(0, 255).astype(np.uint8))
    return write


def normals_task() -> DenseTask:
    from difffeat.tasks.dense_config import default_config

    config = default_config("depth")  # the shared sections; the task's own below
    config.pop("loss")
    config.update(task="normals", head={"kind": "probe", "args": {}, "aggregator": None}, data={"val": None})
    return DenseTask(
        name="normals", title="surface normal", command="normals", predict_help="Predict surface normals.",
        heads=("probe",), label_dirs=("normals",), label_exts=(".npy", ".png"), label_name="normal map",
        read_label=read_normals, targets=lambda label, s: {"target": torch.from_numpy(label)}, resize="bilinear",
        loss=cosine_loss, loss_weight=lambda cfg, target, ignore: float(target.shape[0]), outputs=lambda ds: 3,
        predict=lambda out: F.normalize(out.float(), dim=0), writer=normals_writer, metric=lambda s: MeanAngle(),
        summary=lambda m: f"mean angle {m['angle']:.1f} deg", config=config,
    )


@pytest.fixture
def normals(monkeypatch: pytest.MonkeyPatch) -> DenseTask:
    spec = normals_task()
    monkeypatch.setitem(TASKS, "normals", spec)  # this test only
    for k in CALLS:
        CALLS[k] = 0
    return spec


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("normals-data")
    (root / "images").mkdir()
    (root / "normals").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N):
        img, x0 = tiny_models.two_region_image(rng)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        n = np.empty((3, 64, 64), np.float32)
        n[:, :, :x0] = np.asarray(LEFT, np.float32)[:, None, None]
        n[:, :, x0:] = np.asarray(RIGHT, np.float32)[:, None, None]
        np.save(root / "normals" / f"im{i}.npy", n)
    return root


def test_an_unregistered_task_is_unknown() -> None:
    assert "normals" not in TASKS and set(TASKS) >= {"seg", "depth", "edges"}
    with pytest.raises(KeyError, match="unknown task 'normals'"):
        get_task("normals")


def test_a_task_registered_in_the_table_trains_predicts_and_scores(normals: DenseTask, data: Path, tiny_sd_dir: Path,
                                                                  tmp_path: Path) -> None:
    from difffeat.cli.dense import eval_command, predict_command, train_command
    from difffeat.tasks.dense_data import DenseFolder

    ds = DenseFolder(data, "normals")
    assert len(ds) == N and ds.labels(0)["target"].shape == (3, 64, 64) and ds.num_classes is None

    run = tmp_path / "run"
    r = CliRunner().invoke(train_command(normals), [
        str(data), "-o", str(run), "-m", str(tiny_sd_dir), "--val", str(data), "--device", "cpu",
        "backbone.resolution=64", f"train.batch_size={N}", "train.lr=0.01", "train.warmup_steps=0", "train.epochs=4",
        "train.cache_flip=false", f"train.cache_dir={tmp_path / 'cache'}", "train.log_every=1"],
        catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert CALLS["loss"] == 4 and CALLS["metric"] == 4  # the table's loss each step, its metric each epoch
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "train_loss" in x]
    assert len(epochs) == 4 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["val_angle"] < epochs[0]["val_angle"]
    head = json.loads((run / "head" / "head.json").read_text())
    assert head["task"] == "normals" and head["head"]["args"] == {"num_outputs": 3} and head["classes"] is None

    out = tmp_path / "pred"
    r = CliRunner().invoke(predict_command(normals), [str(data / "images"), "--head", str(run / "head"), "-o", str(out),
                                                     "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0 and f"wrote {N} image(s)" in r.output, r.output
    assert CALLS["write"] == N
    pred = read_normals(out / "im0.png", LabelSettings())
    assert pred.shape == (3, 64, 64) and np.allclose(np.linalg.norm(pred, axis=0), 1, atol=0.02)  # unit normals

    r = CliRunner().invoke(eval_command(normals), [str(data), "--pred", str(out), "-o", str(tmp_path / "m.json")],
                           catch_exceptions=False)
    assert r.exit_code == 0 and f"{N} images: mean angle" in r.output, r.output
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["angle"] == pytest.approx(epochs[-1]["val_angle"], abs=2.0)  # files score like the validation


def test_a_head_outside_the_tasks_row_is_refused(normals: DenseTask, data: Path, tmp_path: Path) -> None:
    from difffeat.tasks.dense_config import load_train_config
    from difffeat.tasks.dense_train import train_dense

    cfg = load_train_config("normals", None, ["head.kind=fpn"])
    with pytest.raises(BadInputError, match="head.kind 'fpn' cannot be trained for normals; valid: probe"):
        train_dense("normals", data, tmp_path / "x", cfg)


def test_flags_and_diffseg_settings_merge_cli_over_preset_over_default() -> None:
    from types import SimpleNamespace

    from difffeat.tasks.dense import DIFFSEG_DEFAULTS, DiffSegOptions, diffseg_settings
    from difffeat.tasks.dense_config import load_train_config

    # a flag given wins over --config / KEY=VALUE; one not given (None) keeps them
    cfg = load_train_config("seg", None, ["backbone.model=a", "data.val=x", "data.ignore_index=null"],
                            {"backbone.model": "b", "data.val": None, "train.device": None})
    assert cfg["backbone"]["model"] == "b" and cfg["data"]["val"] == "x" and cfg["train"]["device"] is None
    assert cfg["data"]["ignore_index"] is None  # KEY=null is a value
    preset = SimpleNamespace(raw={"diffseg": {"kl_threshold": 0.9, "kl_precision": "release-fp16"}})
    s = diffseg_settings(DiffSegOptions(anchors=4), preset)
    assert s == {"tau": 0.9, "iterations": 3, "points": 4, "refine_kmeans": False, "kl_precision": "release-fp16"}
    s = diffseg_settings(DiffSegOptions(kl_threshold=1.3, refine=True), SimpleNamespace(raw={}))
    assert (s["tau"], s["refine_kmeans"], s["points"]) == (1.3, True, 16)
    assert s["kl_precision"] == DIFFSEG_DEFAULTS["kl_precision"] == "fp32"
