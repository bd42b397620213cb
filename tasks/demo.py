"""``difffeat demo``: every task of difffeat, offline, in about a minute on a CPU.

The demo renders a few held-out scenes of the procedural shapes world
(:mod:`difffeat.data.shapes`, ``split="test"``; the dense heads train on ``split="train"``
scenes) and runs each task with the embedded ``difffeat-tiny`` model, through the same
functions the task commands use:

* **classify** - the zero-shot Diffusion Classifier (:func:`.classify.build_zero_shot`,
  :func:`.classify.run_classify`, :func:`.classify.evaluate_csv`) over the 8 shape classes;
* **correspond** - each scene against its second view under a known homography, DIFT-style
  matching (:func:`.correspond.build_pipeline`, :func:`.correspond.evaluate`), PCK@0.1 of
  the target bounding box;
* **segment / depth / edges** - small heads trained in seconds on cached features
  (:func:`.dense_train.train_dense`), predictions written with the task writers and scored
  with :func:`.dense_predict.evaluate`;
* **detect** - DIRE (:func:`.detect.detector_from_preset`, :func:`.detect.score_paths`) on
  the real renders against as many samples of the model (DDIM with classifier-free
  guidance, :func:`difffeat.data.tiny_model.generate`); low reconstruction error = generated.

The settings below keep the default run (6 test scenes, 12 training scenes) at about a
minute of one CPU core: a denoiser call costs ~0.12 s per 64x64 image there, so the
Diffusion Classifier gets 34 calls per image (3 timesteps for all classes, 5 more for the
best two; roughly 45-50% top-1 on 48 held-out scenes, chance 12.5%), DIRE 3+3
DDIM steps and the samples 6 guided steps (24 calls per real/generated pair; AUC 1.0 on the
14 + 14 held-out scenes tried), and the dense heads are narrow and train for 12 short epochs.

Outputs (``-o DIR``)::

    DIR/summary.json                      one headline metric per task (all in [0, 1], higher is better)
    DIR/data/{test,train,generated}/      the scenes (shapes folder formats) and the model's samples
    DIR/classify/predictions.csv|.json    zero-shot predictions vs truth, grid.png, confusion.png
    DIR/correspond/matches.png            scene | second view with match lines; pck.json, predictions.jsonl
    DIR/{segment,depth,edges}/            comparison.png (image | truth | prediction), metrics.json,
                                          pred/ (the task's output files), run/head (the trained head)
    DIR/detect/scores.json, samples.png   DIRE score per image, AUC and AP

difffeat-tiny knows only the shapes world: on real photographs use ``-m sd21`` and friends
with the task commands.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

from difffeat.errors import BadInputError
from difffeat.io import list_images, load_image, save_json, save_png
from difffeat.options import option

MODEL = "difffeat-tiny"
TASKS = ("classify", "correspond", "segment", "depth", "edges", "detect")
DENSE = {"segment": "seg", "depth": "depth", "edges": "edges"}
MARKER = ".difffeat-demo.json"
OUTPUTS = (MARKER, "summary.json", "data", *TASKS)
"""Everything the demo writes into its folder (what ``--overwrite`` replaces)."""

# Cheap settings that still show each method working (2 CPU cores, 64x64 scenes).
DC_SAMPLES = "3,8"      # Diffusion Classifier: 3 timesteps for all 8 classes, then 5 more for the best 2
DC_KEEP = "2,1"
DENSE_LAYERS = ("up.0", "up.1", "up.2")  # strides 4, 2, 1
DENSE_EPOCHS = 12
HEAD_WIDTH = 32         # narrow heads: they run at the full 64x64 resolution on a CPU
DENSE_BATCH = 4
EDGE_THRESHOLDS = 19    # edge F-measure thresholds (BSDS uses 99; the matching dominates the edge task's time)
DIRE_STEPS = 3          # DDIM steps of DIRE's inversion and reconstruction (the preset's guided-diffusion
                        # respacing: t = 0, 334, 668; linspace up to 999 inverts the ranking under that rule)
SAMPLE_STEPS = 6        # DDIM steps of difffeat-tiny's samples (the fakes) ...
SAMPLE_GUIDANCE = 2.0   # ... with classifier-free guidance, as the model card's samples
VIEW_SCALE = 3          # PNGs show the 64x64 scenes at 3x
MAX_ROWS = 8            # scenes shown in each PNG
BATCH = 8               # denoiser rows per call: larger CPU batches are slower per image (allocation, cache)
STEPS = {
    "classify": "zero-shot Diffusion Classifier, {n} scenes x 8 classes",
    "correspond": "DIFT-style matching of {n} scenes against their warped second views",
    "segment": "segmentation head trained on cached features of {m} scenes, tested on {n}",
    "depth": "depth head trained on {m} scenes, tested on {n}",
    "edges": "edge head trained on {m} scenes, tested on {n}",
    "detect": "DIRE of {n} real renders vs {n} samples of difffeat-tiny",
}


@contextlib.contextmanager
def _no_bars() -> Iterator[None]:
    """Silence the library's per-epoch/per-image bars; the demo prints one line per task."""
    old = os.environ.get("DIFFFEAT_NO_PROGRESS")
    os.environ["DIFFFEAT_NO_PROGRESS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DIFFFEAT_NO_PROGRESS", None)
        else:
            os.environ["DIFFFEAT_NO_PROGRESS"] = old


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; then remove only the demo's own outputs.

    ``overwrite`` applies only to a folder an earlier demo wrote (it holds :data:`MARKER`), so
    a mistyped ``-o`` never deletes someone's own ``data/`` folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise BadInputError(f"{out} exists and is not empty; use --overwrite to replace the demo outputs there, "
                                "or choose another -o")
        if not (out / MARKER).is_file():
            raise BadInputError(f"{out} is not empty and holds no earlier demo (no {MARKER}); "
                                "--overwrite only replaces a demo's own folder: choose another -o")
        for name in OUTPUTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()


# --------------------------------------------------------------------------- data
def render_data(out: Path, scenes: int, train_scenes: int, seed: int) -> dict[str, Path]:
    """Held-out test scenes (every label) and training scenes for the dense heads."""
    from difffeat.data.shapes import write_folder

    test = write_folder(out / "data" / "test", scenes, split="test", seed=seed)
    train = write_folder(out / "data" / "train", train_scenes, split="train", seed=seed,
                         tasks=("segmentation", "depth", "edges"))
    return {"test": test, "train": train}


def _big(img: Image.Image) -> Image.Image:
    return img.resize((img.width * VIEW_SCALE, img.height * VIEW_SCALE), Image.NEAREST)


# --------------------------------------------------------------------------- classify
def demo_classify(test: Path, out: Path, seed: int, device: str | None) -> dict[str, Any]:
    """Zero-shot Diffusion Classifier over the 8 shape classes; CSV/JSON, confusion matrix, grid."""
    from difffeat.data.shapes import CLASSES
    from difffeat.viz import tile

    from .classify import build_zero_shot, evaluate_csv, labelled_images, read_csv, run_classify, zero_shot_predictor

    files, labels = labelled_images(test / "by_class")
    # difffeat-tiny is conditioned on class ids 0..7 (= CLASSES); rank by id, report by name
    clf, res = build_zero_shot(model=MODEL, preset=None, classes=[str(i) for i in range(len(CLASSES))], folders=None,
                               template=None, n_samples=DC_SAMPLES, to_keep=DC_KEEP, loss=None, trials=None,
                               t_weights=None, early_stop=None, temperature=None, resolution=None, dtype=None,
                               device=device, max_batch=BATCH, compile_=False, seed=seed, random_weights=False)
    by_id = zero_shot_predictor(clf, res)

    def predict(images: list[Image.Image]) -> list[tuple[list[tuple[Any, ...]], float]]:
        return [([(CLASSES[int(c)], *rest) for c, *rest in ranked], score) for ranked, score in by_id(images)]

    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "predictions.csv"
    run = run_classify(test / "by_class", csv_path, predict, 1, 3, True, files)
    run.finish("images")
    ev = evaluate_csv(csv_path, test / "by_class", files, labels, list(CLASSES), zero_shot=True)
    confusion = out / "confusion.png"
    os.replace(ev["confusion_png"], confusion)
    rows = read_csv(csv_path)
    records = [{"image": str(Path(f).relative_to(test)), "truth": lab, "prediction": rows[str(f)]["top1"],
                "score": float(rows[str(f)]["score"]), "correct": rows[str(f)]["top1"] == lab}
               for f, lab in zip(files, labels)]
    records.sort(key=lambda r: Path(r["image"]).name)
    save_json(out / "predictions.json", {"model": MODEL, "method": "Diffusion Classifier (zero-shot)",
                                         "schedule": clf.schedule.as_dict(),
                                         "accuracy": ev["accuracy"], "predictions": records})
    shown = records[: max(MAX_ROWS, 16)]
    grid = tile([load_image(test / r["image"]) for r in shown], 8, scale=2,
                captions=[f"{r['prediction']}" + ("" if r["correct"] else f" ({r['truth']})") for r in shown],
                colours=[(0, 140, 0) if r["correct"] else (200, 0, 0) for r in shown],
                title=f"zero-shot prediction (truth when wrong): accuracy {100 * ev['accuracy']:.0f}%")
    save_png(out / "grid.png", grid)
    return {"metric": "accuracy", "value": float(ev["accuracy"]),
            "details": {"correct": ev["correct"], "total": ev["total"], "chance": 1 / len(CLASSES)},
            "files": ["predictions.csv", "predictions.json", "grid.png", "confusion.png"]}


# --------------------------------------------------------------------------- correspond
def demo_correspond(test: Path, out: Path, seed: int, device: str | None) -> dict[str, Any]:
    """Each scene vs its warped second view: DIFT matching with difffeat-tiny's features, PCK."""
    from difffeat.heads.matching import rescale_points
    from difffeat.registry import MODELS

    from . import correspond_data as D
    from .correspond import build_pipeline, draw_matches, evaluate

    p = MODELS[MODEL]
    pairs = D.load_spair(test, "test")
    pipe = build_pipeline("dift", model=MODEL, layers=p.layers, timesteps=p.timesteps, ensemble=p.ensemble,
                          resolution=p.resolution, seed=seed, device=device, max_batch=BATCH)
    summary = evaluate(pipe, pairs, normaliser="bbox", out_dir=out, overwrite=True, progress=False)
    preds = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        preds[rec["pair_id"]] = torch.tensor(rec["pred"], dtype=torch.float32).reshape(-1, 2)
    panels = []
    for pair in [q for q in pairs if len(q.src_kps)][:4]:
        src, tgt = load_image(pair.src_image), load_image(pair.tgt_image)
        big = (src.height * VIEW_SCALE, src.width * VIEW_SCALE)
        s = rescale_points(pair.src_kps.float(), (src.height, src.width), big)
        t = rescale_points(preds[pair.pair_id], (tgt.height, tgt.width), big)
        panels.append(draw_matches(_big(src), _big(tgt), s, t))
    if panels:
        from difffeat.viz import tile

        save_png(out / "matches.png", tile(panels, 1, title="source scene | second view (known homography): "
                                           "DIFT-style matches of difffeat-tiny features"))
    pck = summary.get("per_image", {}).get("0.1")
    if pck is None:
        raise BadInputError("no scene had keypoints visible in both views; rerun with more --scenes")
    return {"metric": "PCK@0.1", "value": float(pck) / 100,
            "details": {"normaliser": "bbox (max side of the target box)", "pairs": summary["pairs"],
                        "keypoints": summary["keypoints"],
                        "per_image_pct": summary["per_image"], "per_keypoint_pct": summary["per_keypoint"]},
            "files": ["matches.png", "pck.json", "predictions.jsonl"]}


# --------------------------------------------------------------------------- dense
def dense_config(task: str, seed: int, device: str | None, epochs: int, cache_dir: Path) -> dict[str, Any]:
    """The packaged training config of ``task``, shrunk for 64x64 scenes and a CPU."""
    from difffeat.registry import MODELS

    from .dense_config import load_train_config, set_key

    p = MODELS[MODEL]
    cfg = load_train_config(task)
    settings: dict[str, Any] = {
        "backbone.model": MODEL, "backbone.layers": list(DENSE_LAYERS), "backbone.timesteps": list(p.timesteps),
        "backbone.ensemble": 1, "backbone.resolution": p.resolution, "backbone.seed": seed,
        "train.epochs": epochs, "train.batch_size": DENSE_BATCH, "train.lr": 2e-3, "train.warmup_steps": 5,
        "train.cache_dir": str(cache_dir), "train.cache_flip": True, "train.device": device, "train.seed": seed,
        "train.log_every": 1000,
    }
    if task == "seg":
        settings["head.args"] = {"fpn_channels": HEAD_WIDTH, "head_channels": HEAD_WIDTH // 2, "dropout": 0.0}
    elif task == "depth":
        settings["head.args"] = {"embed_channels": 2 * HEAD_WIDTH, "deconv_channels": HEAD_WIDTH // 2,
                                 "out_channels": HEAD_WIDTH // 2, "mode": "metric", "max_depth": 16.0}
        settings["data.max_depth"] = 16.0
    else:
        settings["head.args"] = {"hidden": HEAD_WIDTH // 4}
        settings["data.thresholds"] = EDGE_THRESHOLDS
    for k, v in settings.items():
        set_key(cfg, k, v)
    return cfg


def _dense_panel(task: str, image: Image.Image, truth: np.ndarray, pred: np.ndarray,
                 palette: list[tuple[int, int, int]]) -> list[Image.Image]:
    from difffeat.viz import colormap

    if task == "seg":
        pal = np.zeros((256, 3), np.uint8)
        pal[: len(palette)] = np.asarray(palette, np.uint8)
        views = [pal[truth.clip(0, 255)], pal[pred.clip(0, 255)]]
    elif task == "depth":
        valid = truth > 0
        lo, hi = float(truth[valid].min()), float(truth[valid].max())
        views = [colormap(-truth, -hi, -lo), colormap(-pred, -hi, -lo)]  # near = warm, one scale for both
    else:
        views = [(np.clip(1 - truth, 0, 1) * 255).astype(np.uint8), (np.clip(1 - pred, 0, 1) * 255).astype(np.uint8)]
    return [_big(image)] + [_big(Image.fromarray(v)) for v in views]


def demo_dense(task_name: str, data: dict[str, Path], out: Path, seed: int, device: str | None, epochs: int,
               cache_dir: Path, ex: Any = None) -> tuple[dict[str, Any], Any]:
    """Train a small head on cached features of the train scenes, predict and score the test scenes.

    Returns the task's summary and the extractor (pass it to the next dense task: one model,
    one feature cache).
    """
    from difffeat.heads import load_head
    from difffeat.viz import tile

    from .dense_data import DenseFolder
    from .dense_predict import DensePredictor, extractor_device, format_metrics
    from .dense_train import STATE_JSON, STATE_WEIGHTS, make_extractor, train_dense

    task = DENSE[task_name]
    cfg = dense_config(task, seed, device, epochs, cache_dir)
    if ex is None:
        ex = make_extractor(cfg["backbone"], device, None)
    result = train_dense(task, data["train"], out / "run", cfg, overwrite=True, echo=lambda m: None, ex=ex)
    for name in (STATE_WEIGHTS, STATE_JSON):  # the optimizer state only serves resuming: keep the demo small
        (out / "run" / name).unlink(missing_ok=True)
    predictor = DensePredictor(load_head(result["checkpoint"], device=extractor_device(ex)), ex)
    scale = float(cfg["data"].get("depth_scale", 1000.0))
    test = DenseFolder(data["test"], task, depth_scale=scale)
    panels, captions = _predict_dense(task, predictor, test, out / "pred", cfg, scale)
    metrics = _score_dense(task, test, out / "pred", cfg, scale)
    save_json(out / "metrics.json", metrics)
    title = f"{task_name}: {format_metrics(task, metrics)}"
    save_png(out / "comparison.png", tile(panels, 6, captions=captions, title=title))  # two scenes a row
    metric, value, details = _dense_headline(task, metrics)
    details["train_scenes"] = len(list_images(data["train"] / "images"))
    details["epochs"] = epochs
    return ({"metric": metric, "value": value, "details": details,
             "files": ["comparison.png", "metrics.json", "pred/", "run/head/"]}, ex)


def _predict_dense(task: str, predictor: Any, test: Any, pred_dir: Path, cfg: dict[str, Any],
                   scale: float) -> tuple[list[Image.Image], list[str]]:
    """Write the task's output file of every test scene; the comparison panels of the first ones."""
    from .dense_predict import final_prediction, is_relative_depth, write_depth, write_edges, write_seg

    panels, captions = [], []
    for i, sample in enumerate(test.samples):
        image = load_image(sample.image)
        final = final_prediction(task, predictor.predict([image])[0]).numpy()
        path = pred_dir / f"{sample.name}.png"
        if task == "seg":
            write_seg(path, final, image, test.palette or [])
        elif task == "depth":
            write_depth(path, final, scale, is_relative_depth(cfg))
        else:
            write_edges(path, final)
        if i < MAX_ROWS:
            truth = test.labels(i)["target"].numpy()
            panels += _dense_panel(task, image, truth, final, list(test.palette or []))
            captions += [sample.name, "truth", "prediction"]
    return panels, captions


def _score_dense(task: str, test: Any, pred_dir: Path, cfg: dict[str, Any], scale: float) -> dict[str, Any]:
    """The task's metrics of the written predictions (:func:`.dense_predict.evaluate`)."""
    from .dense_predict import evaluate

    kw: dict[str, Any] = {"num_classes": test.num_classes, "class_names": test.classes}
    if task == "depth":
        kw.update(min_depth=float(cfg["data"]["min_depth"]), max_depth=cfg["data"]["max_depth"])
    if task == "edges":
        kw.update(thresholds=int(cfg["data"]["thresholds"]), max_dist=float(cfg["data"]["max_dist"]))
    return evaluate(task, test, pred_dir=pred_dir, depth_scale=scale, **kw)


def _dense_headline(task: str, metrics: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
    """(metric name, value in [0, 1], details) of a dense task."""
    if task == "seg":
        return "mIoU", float(metrics["mIoU"]) / 100, {k: metrics[k] for k in ("mIoU", "aAcc", "mAcc")}
    if task == "depth":
        return "delta1", float(metrics["d1"]), {k: metrics[k] for k in ("abs_rel", "rmse", "d1", "d2", "d3")}
    return "ODS F", float(metrics["ODS"]), {k: metrics[k] for k in ("ODS", "OIS", "AP")}


# --------------------------------------------------------------------------- detect
def generate_samples(folder: Path, labels: list[int], seed: int, device: str | None) -> list[Path]:
    """difffeat-tiny's own samples of the given classes (DDIM, classifier-free guidance), as PNGs."""
    from difffeat.backbone import load_backbone
    from difffeat.data.tiny_model import generate
    from difffeat.io import tensor_to_pil

    bb = load_backbone(MODEL, dtype="fp32", device=device)
    g = torch.Generator(device=bb.device).manual_seed(seed)
    step = max(1, BATCH // 2)  # guidance doubles the rows
    x = torch.cat([generate(bb.denoiser, bb.scheduler.config, torch.tensor(labels[i : i + step]), steps=SAMPLE_STEPS,
                            guidance=SAMPLE_GUIDANCE, generator=g) for i in range(0, len(labels), step)])
    paths = []
    for i, img in enumerate(x):
        paths.append(folder / f"sample_{i:04d}.png")
        save_png(paths[-1], tensor_to_pil(img))
    return paths


def demo_detect(test: Path, generated: Path, out: Path, seed: int, device: str | None,
                echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """DIRE of real renders vs difffeat-tiny samples: per-image scores, AUC and AP (``echo``: failure lines)."""
    from sklearn.metrics import roc_auc_score

    from difffeat.data.shapes import CLASSES
    from difffeat.io import FolderRun
    from difffeat.viz import tile

    from .detect import detection_metrics, detector_from_preset, score_paths

    real_paths = list_images(test / "images")
    labels = [CLASSES.index(p.parent.name) for p in sorted((test / "by_class").rglob("*.png"), key=lambda q: q.name)]
    fake_paths = generate_samples(generated, labels, seed, device)  # the classes of the real scenes
    dire = {"resolution": 64, "steps": DIRE_STEPS, "max_batch": BATCH}  # the preset's spacing and pairing
    det = detector_from_preset("dire-adm256", MODEL, dire=dire, device=device)
    run = FolderRun(echo=echo)
    _, r = score_paths(det, real_paths, BATCH, run, desc="real")
    _, f = score_paths(det, fake_paths, BATCH, run, desc="generated")
    run.finish("images")
    s = torch.cat([r["score"], f["score"]]).numpy()
    y = np.r_[np.zeros(len(r["score"])), np.ones(len(f["score"]))]
    auc = float(roc_auc_score(y, -s))  # low reconstruction error = generated
    m = detection_metrics(s, y, calibrated=False)
    root = out.parent
    scores = [{"image": str(p.relative_to(root)), "label": lab, "dire": float(v)}
              for paths, vals, lab in ((real_paths, r["score"], "real"), (fake_paths, f["score"], "generated"))
              for p, v in zip(paths, vals)]
    save_json(out / "scores.json", {"method": "DIRE (training-free mean |x - DDIM reconstruction|)",
                                    "dire": det.settings.to_dict(), "lower_means": "generated",
                                    "auc": auc, "ap": m["ap"], "scores": scores})
    n = min(MAX_ROWS, len(real_paths), len(fake_paths))
    ims = [load_image(p) for p in real_paths[:n]] + [load_image(p) for p in fake_paths[:n]]
    caps = [f"real {float(v):.3f}" for v in r["score"][:n]] + [f"gen. {float(v):.3f}" for v in f["score"][:n]]
    save_png(out / "samples.png", tile(ims, n, captions=caps, scale=2,
                                       title=f"top: real renders, bottom: difffeat-tiny samples; DIRE score "
                                       f"(low = generated), AUC {auc:.2f}"))
    return {"metric": "AUC", "value": auc,
            "details": {"ap": m["ap"], "n_real": m["n_real"], "n_generated": m["n_fake"], "dire_steps": DIRE_STEPS,
                        "sample_steps": SAMPLE_STEPS, "sample_guidance": SAMPLE_GUIDANCE},
            "files": ["scores.json", "samples.png", "../data/generated/"]}


# --------------------------------------------------------------------------- the run
@dataclass
class DemoOptions:
    """How big the demo run is (its seed and device are the shared ``--seed`` / ``--device``)."""

    scenes: int = option(6, "Held-out test scenes.", min=2)
    train_scenes: int = option(12, "Training scenes of the segmentation, depth and edge heads.", min=1)
    epochs: int = option(DENSE_EPOCHS, "Training epochs of the dense heads.", min=1)
    overwrite: bool = option(False, "Replace the outputs of an earlier demo in --out (never anything else; "
                             "default: refuse a non-empty folder).", is_flag=True)
    threads: int | None = option(None, "torch CPU threads (default: 1 on machines with 2 cores or fewer, where one "
                                 "thread runs these small batches fastest; else torch's default).", type=int, min=1)


def use_threads(threads: int | None) -> None:
    """Set torch's CPU threads: ``threads``, else 1 on machines with 2 cores or fewer (else torch's default)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is None and cores <= 2:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def _run_task(name: str, data: dict[str, Path], out: Path, opts: DemoOptions, seed: int, device: str | None,
              cache: Path, ex: Any, echo: Callable[[str], Any]) -> tuple[dict[str, Any], Any]:
    """One task of the demo into ``out / name``; returns its summary and the dense tasks' shared extractor."""
    folder = out / name
    if name == "classify":
        return demo_classify(data["test"], folder, seed, device), ex
    if name == "correspond":
        return demo_correspond(data["test"], folder, seed, device), ex
    if name in DENSE:
        return demo_dense(name, data, folder, seed, device, opts.epochs, cache, ex)
    return demo_detect(data["test"], out / "data" / "generated", folder, seed, device, echo), ex


def run_demo(out: str | Path, opts: DemoOptions | None = None, seed: int = 0, device: str | None = None,
             echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Render the scenes, run every task, write ``out/summary.json``; returns the summary."""
    out, opts = Path(out), opts or DemoOptions()
    scenes, train_scenes = opts.scenes, opts.train_scenes
    if scenes < 2 or train_scenes < 1:
        raise BadInputError(f"the demo needs --scenes >= 2 and --train-scenes >= 1 (got {scenes}, {train_scenes})")
    check_output_folder(out, opts.overwrite)
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / MARKER, {"written_by": "difffeat demo", "model": MODEL, "scenes": scenes, "seed": seed})
    data = render_data(out, scenes, train_scenes, seed)
    echo(f"[0/{len(TASKS)}] rendered {scenes} held-out scenes and {train_scenes} training scenes -> {out / 'data'}")
    results: dict[str, Any] = {}
    ex = None
    with _no_bars(), tempfile.TemporaryDirectory(prefix="difffeat-demo-cache-") as cache:
        for k, name in enumerate(TASKS, 1):
            t0 = time.time()
            echo(f"[{k}/{len(TASKS)}] {name}: {STEPS[name].format(n=scenes, m=train_scenes)} ...")
            res, ex = _run_task(name, data, out, opts, seed, device, Path(cache), ex, echo)
            res["seconds"] = round(time.time() - t0, 1)
            results[name] = res
            echo(f"      {res['metric']} {res['value']:.3f} in {res['seconds']:.1f} s -> {out / name}")
    summary = {"model": MODEL, "scenes": scenes, "train_scenes": train_scenes, "seed": seed,
               "device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
               "seconds": round(time.time() - t_start, 1),
               "note": "difffeat-tiny knows only the shapes world; use -m sd21 (and friends) with the task "
                       "commands on real images",
               "metrics_in": "[0, 1], higher is better", "tasks": results}
    save_json(out / "summary.json", summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as the table ``difffeat demo`` prints: task, metric, value, seconds."""
    lines = [f"{'task':<11} {'metric':<9} {'value':>6} {'time':>7}"]
    for name, r in summary["tasks"].items():
        lines.append(f"{name:<11} {r['metric']:<9} {r['value']:>6.3f} {r['seconds']:>6.1f}s")
    lines.append(f"total {summary['seconds']:.1f} s on {summary['device']}; difffeat-tiny knows only the shapes world "
                 "(real images: -m sd21 and friends)")
    return "\n".join(lines)
