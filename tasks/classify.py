"""Image classification: ``difffeat classify``, ``difffeat train probe``, ``difffeat sweep probe``.

Two ways to classify with a diffusion model, behind one command:

* **zero-shot** — the Diffusion Classifier of Li et al. (ICCV 2023), see
  :mod:`difffeat.heads.diffusion_classifier`. Method presets ``dc-cifar10``, ``dc-stl10``,
  ``dc-pets``, ``dc-flowers``, ``dc-food``, ``dc-aircraft`` and ``dc-imagenet``
  (configs/classify/) carry the paper's templates, schedules and numbers
  (``--preset cifar10`` or ``--preset dc-cifar10``).
* **feature probes** — ``difffeat train probe`` fits a linear probe and a cosine k-NN on
  pooled features (:mod:`difffeat.heads.probe_cls`); ``difffeat classify --probe CKPT``
  applies them; ``difffeat sweep probe`` reports validation accuracy over a (layer, t) grid.

Outputs: a CSV with columns ``image, top1, score, topk``; ``topk`` is a JSON list, best
first, of ``[class, mean error, gap]`` for zero-shot (mean denoising error, and its paired
gap to the top class; lower is better) or ``[class, probability]`` for probes. Rows are appended as images finish, and a rerun skips the
images already in the CSV (``--overwrite`` starts over). ``--eval`` reads the true class
of each image from its first sub-folder and reports accuracy and a confusion matrix PNG.

Preprocessing for zero-shot follows the reference: bicubic resize of the shorter side to
the resolution, centre crop, VAE posterior mean.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from difffeat.cli import extractor_from_options, model_options
from difffeat.errors import BadInputError, DiffFeatError
from difffeat.heads.diffusion_classifier import (
    DiffusionClassifier, Schedule, check_class_names, compile_denoiser, fit_temperature, timestep_weights,
)
from difffeat.heads.probe_cls import ProbeClassifier, accuracy, pool_features
from difffeat.distributed import DistInfo, dist_info
from difffeat.io import FolderRun, image_key, list_images, load_image, pil_to_tensor, save_png
from difffeat.runner import CsvSink, Job, output_guard, run

CSV_FIELDS = ["image", "top1", "score", "topk"]


# ---------------------------------------------------------------- inputs
def parse_classes(classes: str | None, classes_file: Path | None) -> list[str] | None:
    """Class names from ``--classes 'a,b'`` or a file (one per line, '#' comments); None if neither."""
    if classes is not None and classes_file is not None:
        raise BadInputError("give either --classes or --classes-file, not both")
    if classes_file is not None:
        if not Path(classes_file).is_file():
            raise BadInputError(f"classes file not found: {classes_file}")
        lines = Path(classes_file).read_text(encoding="utf-8").splitlines()
        return check_class_names([ln for ln in lines if not ln.lstrip().startswith("#")])
    if classes is not None:
        return check_class_names(classes.split(","))
    return None


def classify_preset(name: str) -> dict[str, Any]:
    """The raw YAML of a classify method preset, by name (``dc-cifar10``) or short name (``cifar10``)."""
    from difffeat.registry import task_preset

    raw = dict(task_preset(name, "classify", prefix="dc-").raw)
    if raw.get("base"):  # a -fast preset: the paper preset it races, plus its own settings
        base = classify_preset(str(raw["base"]))
        raw["classifier"] = {**(base.get("classifier") or {}), **(raw.get("classifier") or {})}
        raw["extract"] = {**(base.get("extract") or {}), **(raw.get("extract") or {})}
    return raw


def read_prompts_file(path: Path) -> dict[str, str]:
    """Per-class prompts from a CSV with ``prompt`` and ``classname`` columns (the reference's
    ``prompts/*.csv`` format; other columns are ignored), in file order. A repeated class name
    (the reference's ImageNet CSV has two ``missile`` and two ``sunglasses`` classes, with the
    same prompt) becomes ``"name (classidx)"`` so that every class has its own name."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"prompts file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"prompt", "classname"} <= set(reader.fieldnames):
            raise BadInputError(f"{path}: a prompts file needs 'prompt' and 'classname' columns, got {reader.fieldnames}")
        out: dict[str, str] = {}
        for row in reader:
            name = str(row["classname"]).strip()
            if name in out:
                name = f"{name} ({row.get('classidx') or len(out)})"
            if name in out:
                raise BadInputError(f"{path}: class {name!r} appears twice")
            out[name] = str(row["prompt"]).strip()
    if len(out) < 2:
        raise BadInputError(f"{path}: a prompts file needs at least two classes")
    return out


def class_prompts(names: Sequence[str], table: dict[str, str] | None, template: str) -> list[str]:
    """One prompt per class: from ``table`` (exact name, else by :func:`norm_name`), else the template."""
    if not table:
        return [template.format(n) for n in names]
    by_norm = {norm_name(k): v for k, v in table.items()}
    return [table.get(n) or by_norm.get(norm_name(n)) or template.format(n) for n in names]


def center_crop_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize of the shorter side to ``size`` then a centre crop (the reference's transform)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = (size, max(size, int(h * scale))) if w <= h else (max(size, int(w * scale)), size)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return pil_to_tensor(img.crop((left, top, left + size, top + size)))


def norm_name(name: str) -> str:
    """Match key for class names vs folder names: lower case, letters and digits only."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def labelled_images(root: Path) -> tuple[list[Path], list[str]]:
    """Images under ``root`` and their class folder (the first path component below ``root``)."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"a labelled folder (one sub-folder per class) is needed, got {root}")
    files = list_images(root)
    loose = [f for f in files if f.parent == root]
    if loose:
        raise BadInputError(f"{loose[0]} is not in a class sub-folder of {root}; put each image in a folder named after its class")
    return files, [f.relative_to(root).parts[0] for f in files]


def folder_to_class(folders: Sequence[str], classes: Sequence[str]) -> dict[str, str]:
    """Map label folders to class names (exact, else by :func:`norm_name`)."""
    by_norm: dict[str, str] = {}
    for c in classes:
        by_norm.setdefault(norm_name(c), c)
    out = {}
    for f in sorted(set(folders)):
        c = f if f in classes else by_norm.get(norm_name(f))
        if c is None:
            raise BadInputError(f"label folder {f!r} matches no class of the class list")
        out[f] = c
    return out


# ---------------------------------------------------------------- CSV
def _valid_row(row: dict[str, str]) -> bool:
    try:
        return bool(row.get("image")) and isinstance(json.loads(row.get("topk") or ""), list)
    except json.JSONDecodeError:
        return False


def csv_sink(path: Path) -> CsvSink:
    """The predictions CSV as a crash-safe sink (see :class:`difffeat.runner.CsvSink`)."""
    return CsvSink(path, CSV_FIELDS, "image", valid=_valid_row)


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an existing predictions CSV keyed by image (cut or malformed lines are ignored)."""
    return csv_sink(path).rows()


def make_row(image: str, ranked: Sequence[tuple[Any, ...]], score: float, topk: int) -> dict[str, Any]:
    """One CSV row; ``ranked`` holds (class, value, ...) tuples, best first."""
    entries = [[r[0], *(float(f"{v:.6g}") for v in r[1:])] for r in list(ranked)[: max(1, topk)]]
    return {"image": image, "top1": ranked[0][0], "score": f"{score:.4f}", "topk": json.dumps(entries)}


# ---------------------------------------------------------------- predictors
Predictor = Callable[[list[Image.Image]], list[tuple[list[tuple[Any, ...]], float]]]


def zero_shot_predictor(clf: DiffusionClassifier, resolution: int) -> Predictor:
    """Images -> ([(class, mean error, gap) ranked], top-1 score) with the Diffusion Classifier."""

    def predict(images: list[Image.Image]) -> list[tuple[list[tuple[Any, ...]], float]]:
        x = torch.stack([center_crop_tensor(im, resolution) for im in images])
        preds = clf(x, keys=[image_key(xi) for xi in x])
        evals.extend(p.unet_evals for p in preds)
        return [(list(zip(p.classes, p.errors, p.gaps)), p.score) for p in preds]

    evals: list[int] = []
    predict.evals = evals  # type: ignore[attr-defined]  # denoiser evaluations per classified image
    return predict


def probe_predictor(probe: ProbeClassifier, ex: Any, kind: str) -> Predictor:
    """Images -> ([(class, probability) ranked], top-1 probability) with a feature probe."""

    def predict(images: list[Image.Image]) -> list[tuple[list[tuple[Any, ...]], float]]:
        x = extract_pooled(ex, images, probe.pool)
        x = torch.cat(list(x.values()), dim=1)
        probe.check_features(x)
        probs = probe.predict_proba(x, kind)
        out = []
        for p in probs:
            order = p.argsort(descending=True).tolist()
            out.append(([(probe.classes[i], float(p[i])) for i in order], float(p[order[0]])))
        return out

    return predict


def extract_pooled(ex: Any, images: list[Image.Image], pool: int) -> dict[str, torch.Tensor]:
    """Pooled features {key: [N, D]} (CPU fp32) of PIL images; images of different prepared sizes run apart."""
    xs = [ex.prepare([im])[0] for im in images]
    out: dict[str, list[torch.Tensor | None]] = {}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(tuple(x.shape), []).append(i)
    for idx in groups.values():
        feats = ex(torch.stack([xs[i] for i in idx]))
        for k, f in feats.items():
            pooled = pool_features({k: f}, pool).cpu()
            slot = out.setdefault(k, [None] * len(xs))
            for j, i in enumerate(idx):
                slot[i] = pooled[j]
    return {k: torch.stack(v) for k, v in out.items()}  # type: ignore[arg-type]


def model_id(model: str) -> str:
    """How a model is recorded in a checkpoint: preset name, hub id, or absolute local path."""
    return os.path.abspath(model) if os.path.isdir(model) else model


# ---------------------------------------------------------------- the run
def run_classify(images: Path, out: Path, predict: Predictor, batch_size: int, topk: int,
                 overwrite: bool, files: list[Path] | None = None, max_side: int | None = None) -> FolderRun:
    """Classify every image not yet in ``out``; append one CSV row per image (the one folder runner).

    Rows are appended (and fsync'd) as images finish, so a kill loses at most the batch in
    flight; a cut last line is dropped and that image redone. A finished run rewrites the CSV
    atomically with each image once, in image order. Under torchrun / accelerate launch each
    rank classifies its share (strided batches) into ``OUT.rankR-of-N.csv``; the rank that
    finds every image classified merges the parts into ``out`` (:func:`merge_rank_csvs`), so
    the file is the same as a one-process run's.
    """
    files = files if files is not None else list_images(images)
    info = dist_info()
    part = rank_csv(out, info) if info.world_size > 1 else out
    with output_guard(out, info, is_file=True):
        if overwrite:
            for p in {out, part} if info.is_main else {part}:
                p.unlink(missing_ok=True)
        sink = csv_sink(part)
        sink.repair()
        done = set(read_csv(out)) | set(sink.rows())

        def process(batch: list[tuple[Path, Image.Image]]) -> None:
            results = predict([im for _, im in batch])
            for (path, _), (ranked, score) in zip(batch, results):
                if str(path) not in done:
                    sink.append(make_row(str(path), ranked, score, topk))

        job = Job(files, process, done=lambda f: str(f) in done, load=lambda f: (f, load_image(f, max_side=max_side)))
        res = run(job, batch_size=batch_size, overwrite=overwrite, desc="images", info=info, lock=False)
        if info.world_size > 1:
            res.merged = merge_rank_csvs(out, files, info.world_size)  # type: ignore[attr-defined]
        else:
            csv_sink(out).compact([str(f) for f in files])
    return res


def rank_csv(out: Path, info: DistInfo) -> Path:
    """The CSV a rank appends to in a data-parallel run."""
    return out.with_name(f"{out.stem}.rank{info.rank}-of-{info.world_size}{out.suffix}")


def merge_rank_csvs(out: Path, files: Sequence[Path], world_size: int) -> bool:
    """Merge the ranks' CSVs into ``out`` once every readable image of ``files`` has a row.

    Called by every rank when it finishes; ranks that find rows still missing return False
    (a later rank merges). The merge is atomic, ordered like ``files``, and keeps the part
    files until ``out`` is in place, so a crash at any point loses nothing.
    """
    parts = [out.with_name(f"{out.stem}.rank{r}-of-{world_size}{out.suffix}") for r in range(world_size)]
    rows = read_csv(out)
    for p in parts:
        rows.update(read_csv(p))
    for f in files:
        if str(f) not in rows:
            try:
                load_image(f)
            except DiffFeatError:
                continue  # reported by the rank that owns it
            return False
    csv_sink(out).compact([str(f) for f in files], parts)
    return True


def evaluate_csv(out: Path, root: Path, files: list[Path], labels: list[str], classes: Sequence[str],
                 zero_shot: bool) -> dict[str, Any]:
    """Accuracy + confusion matrix (PNG next to the CSV) for the images of ``root`` in ``out``."""
    rows = read_csv(out)
    to_class = folder_to_class(labels, classes)
    cls_index = {c: i for i, c in enumerate(classes)}
    K = len(classes)
    cm = np.zeros((K, K), dtype=np.int64)
    errs, ys = [], []
    correct = total = 0
    for f, lab in zip(files, labels):
        r = rows.get(str(f))
        if r is None:
            continue
        true = to_class[lab]
        pred = r["top1"]
        total += 1
        correct += int(pred == true)
        if pred in cls_index:  # a prediction outside the class list counts as wrong
            cm[cls_index[true], cls_index[pred]] += 1
        if zero_shot:
            topk = [e for e in json.loads(r["topk"]) if len(e) >= 3]
            names = [e[0] for e in topk]
            errs.append([float(e[2]) for e in topk])
            ys.append(names.index(true) if true in names else -1)
    if total == 0:
        raise BadInputError(f"no image of {root} has a prediction in {out}")
    acc = correct / total
    png = out.with_name(out.stem + ".confusion.png")
    save_png(png, confusion_image(cm, list(classes), acc))
    result: dict[str, Any] = {"accuracy": acc, "correct": correct, "total": total, "confusion_png": str(png)}
    if zero_shot and len(errs) >= 2 and any(len(e) > 1 for e in errs):
        try:
            result["fitted_temperature"] = fit_temperature(errs, ys)
        except BadInputError:
            pass
    return result


def confusion_image(cm: np.ndarray, classes: list[str], acc: float) -> Image.Image:
    """A row-normalised confusion matrix (rows: true, columns: predicted) drawn with PIL."""
    from difffeat.viz import colormap

    K = len(classes)
    cell = max(2, min(28, 1400 // max(K, 1)))
    label_w = 160 if cell >= 12 else 0
    top = 24 + (label_w if cell >= 12 else 0)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    rgb = colormap(rows, 0.0, 1.0)
    img = Image.new("RGB", (label_w + K * cell + 8, top + K * cell + 8), "white")
    heat = Image.fromarray(rgb).resize((K * cell, K * cell), Image.NEAREST)
    img.paste(heat, (label_w, top))
    d = ImageDraw.Draw(img)
    d.text((4, 4), f"accuracy {100 * acc:.2f}%  (rows: true, columns: predicted)", fill="black")
    if cell >= 12:
        for i, c in enumerate(classes):
            d.text((4, top + i * cell + cell // 2 - 5), c[:24], fill="black")
            for j in np.nonzero(cm[i])[0]:
                ink = "white" if rows[i, j] < 0.15 or rows[i, j] > 0.85 else "black"
                d.text((label_w + j * cell + 2, top + i * cell + cell // 2 - 5), f"{cm[i, j]}", fill=ink)
        col = Image.new("RGB", (label_w, cell * K), "white")
        cd = ImageDraw.Draw(col)
        for i, c in enumerate(classes):
            cd.text((4, i * cell + cell // 2 - 5), c[:24], fill="black")
        img.paste(col.rotate(90, expand=True), (label_w, 24))
    return img


# ---------------------------------------------------------------- difffeat classify
@click.command("classify")
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--classes", default=None, help="Comma-separated class names (or class ids for class-conditional models).")
@click.option("--classes-file", type=click.Path(path_type=Path), default=None, help="One class per line.")
@click.option("-m", "--model", default=None, help="Model preset, local diffusers folder or hub id (default: the preset's, else difffeat-tiny).")
@click.option("--preset", default=None, help="Classify preset: cifar10, stl10, pets, flowers, food, aircraft, imagenet (or dc-NAME).")
@click.option("--template", default=None, help="Prompt template, '{}' is the class name (default: the preset's, else 'a photo of a {}.').")
@click.option("--n-samples", default=None, help="Timesteps per class in each stage, e.g. '50,500'.")
@click.option("--to-keep", default=None, help="Classes kept after each stage, e.g. '5,1'.")
@click.option("--loss", type=click.Choice(["l2", "l1", "huber"]), default=None)
@click.option("--trials", type=int, default=None, help="Noise draws per timestep (default 1).")
@click.option("--t-weights", default=None, help="Timestep weights: uniform, range:A-B, or a JSON file of T numbers.")
@click.option("--early-stop", type=float, default=None, help="Racing with a fixed z threshold instead of --delta (deviation; off by default).")
@click.option("--delta", type=float, default=None, help="Sequential schedule: drop a class once it is worse than the leader at error rate DELTA (the -fast presets; 0 = the paper's schedule).")
@click.option("--check-every", type=int, default=None, help="Sequential schedule: pairs per class between two racing checks (default 8).")
@click.option("--prompts-file", type=click.Path(path_type=Path), default=None, help="Per-class prompts: a CSV with prompt,classname columns (the reference's prompts/*.csv).")
@click.option("--hierarchy", type=click.Path(path_type=Path), default=None, help="HDC: a class tree (JSON) whose leaves are the classes; prune level by level (docs/classify.md).")
@click.option("--hierarchy-keep", default="5", show_default=True, help="HDC: nodes kept per level (one number, or one per level: '10,5,3').")
@click.option("--temperature", default=None, help="Score temperature (a number, e.g. one fitted by --eval) or 'auto'.")
@click.option("--topk", type=int, default=5, show_default=True, help="Classes listed in the topk column.")
@click.option("--probe", "probe_path", type=click.Path(path_type=Path), default=None, help="Apply a probe from `difffeat train probe` instead.")
@click.option("--probe-kind", type=click.Choice(["linear", "knn"]), default="linear", show_default=True)
@click.option("--resolution", type=int, default=None, help="Input size (default: the preset's / model's).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="Default: bf16 on CUDA, fp32 on CPU.")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
@click.option("--max-batch", type=int, default=32, show_default=True, help="Denoiser rows per call.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the denoiser (static batch shapes).")
@click.option("--compile-mode", type=click.Choice(["default", "reduce-overhead", "max-autotune"]), default="default",
              show_default=True, help="torch.compile mode; reduce-overhead adds CUDA graphs (one per batch shape).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--random-weights", is_flag=True, hidden=True, help="Random weights (speed tests only).")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Predictions CSV (appended, resumable).")
@click.option("--eval", "evaluate", is_flag=True, help="IMAGES has one sub-folder per class: report accuracy + confusion matrix.")
@click.option("--overwrite", is_flag=True, help="Start the CSV over.")
def classify_cmd(images: Path, classes: str | None, classes_file: Path | None, model: str | None, preset: str | None,
                 template: str | None, n_samples: str | None, to_keep: str | None, loss: str | None, trials: int | None,
                 t_weights: str | None, early_stop: float | None, delta: float | None, check_every: int | None,
                 prompts_file: Path | None, hierarchy: Path | None, hierarchy_keep: str, temperature: str | None,
                 topk: int,
                 probe_path: Path | None, probe_kind: str, resolution: int | None, dtype: str | None, device: str | None,
                 max_batch: int, compile_: bool, compile_mode: str, seed: int, random_weights: bool, out: Path,
                 evaluate: bool, overwrite: bool) -> None:
    """Classify IMAGES zero-shot (Diffusion Classifier) or with a trained probe; write a CSV."""
    files, labels = labelled_images(images) if evaluate else (list_images(images), [])
    class_list = parse_classes(classes, classes_file)
    if probe_path is not None:
        if class_list is not None or preset is not None:
            raise BadInputError("--probe brings its own classes and features; drop --classes/--classes-file/--preset")
        probe = ProbeClassifier.load(probe_path, expect_backbone={"preset": model_id(model)} if model else None)
        cfg = probe.backbone
        import difffeat

        from difffeat.heads.checkpoint import rebuild_extractor

        ex = rebuild_extractor(cfg, device=device, dtype=dtype, max_batch=max_batch, compile=compile_) if cfg.get("extractor") \
            else difffeat.create(cfg["preset"], layers=cfg["layers"], timesteps=cfg["timesteps"], ensemble=cfg.get("ensemble"),
                                 noise=cfg.get("noise"), seed=int(cfg.get("seed", 0)), prompt=cfg.get("prompt"),
                                 resolution=cfg.get("resolution"), resize=cfg.get("resize"), dtype=dtype, device=device,
                                 max_batch=max_batch, compile=compile_, random_weights=random_weights)
        predict, names, zero_shot, batch = probe_predictor(probe, ex, probe_kind), probe.classes, False, 8
        from difffeat.pipeline import working_side

        side = working_side(ex)
    else:
        if hierarchy is not None and class_list is None:
            from difffeat.heads.dc_hierarchy import load_tree

            class_list = [n.name for n in load_tree(hierarchy).leaves()]  # the tree's leaves are the classes
        clf, res = build_zero_shot(model, preset, class_list, sorted(set(labels)) if evaluate else None, template,
                                   n_samples, to_keep, loss, trials, t_weights, early_stop, temperature, resolution,
                                   dtype, device, max_batch, compile_, seed, random_weights, delta=delta,
                                   check_every=check_every, prompts_file=prompts_file,
                                   compile_mode=None if compile_mode == "default" else compile_mode)
        if hierarchy is not None:
            clf = hierarchical(clf, hierarchy, _ints(hierarchy_keep, "--hierarchy-keep") or (5,))
        predict, names, zero_shot, batch = zero_shot_predictor(clf, res), clf.classes, True, 1
        side = 4 * res  # the loader may reduce huge images to >= 4x the input size
    if evaluate:
        folder_to_class(labels, names)  # fail before the run if a folder matches no class
    run = run_classify(images, out, predict, batch, topk, overwrite, files, max_side=side)
    if not getattr(run, "merged", True):
        click.echo(f"rank {dist_info().rank}: {run.done} new rows; another rank merges {out}")
        run.finish("images")
        return
    click.echo(f"wrote {out}: {run.done} new, {run.skipped} already there")
    used = getattr(predict, "evals", None)
    if used:
        cap = clf.schedule.unet_evals(len(clf.classes), clf.backbone.num_train_timesteps)
        click.echo(f"denoiser evaluations per image: mean {sum(used) / len(used):.0f}, max {max(used)} "
                   f"(the paper schedule: {cap})")
    if evaluate:
        r = evaluate_csv(out, images, files, labels, names, zero_shot)
        click.echo(f"accuracy: {100 * r['accuracy']:.2f}% ({r['correct']}/{r['total']}); confusion matrix: {r['confusion_png']}")
        if "fitted_temperature" in r:
            click.echo(f"fitted score temperature: {r['fitted_temperature']:.4g} (pass --temperature to calibrate scores)")
    run.finish("images")


def hierarchical(flat: DiffusionClassifier, tree_path: Path, keep: Sequence[int]) -> Any:
    """HDC over ``flat``'s settings: its leaf schedule and racing, levels on its first stage's
    timesteps; leaf prompts from ``flat`` where a leaf of the tree is one of its classes."""
    from difffeat.heads.dc_hierarchy import HierarchicalClassifier, load_tree

    tree = load_tree(tree_path)
    by_class = dict(zip(flat.classes, flat.prompts or []))
    for n in tree.leaves():
        n.prompt = n.prompt or by_class.get(n.name)
    sch = flat.schedule
    return HierarchicalClassifier(
        flat.backbone, tree, keep=list(keep), level_schedule=Schedule(sch.n_samples[:1], (1,), sch.loss, sch.trials),
        leaf_schedule=sch, weights=flat.weights, max_batch=flat.max_batch,
        seed=flat.seed, temperature=flat.temperature, early_stop=flat.early_stop, delta=flat.delta,
        check_every=flat.check_every, static_batches=flat.static_batches)


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise BadInputError(f"{what} must be comma-separated integers, got {text!r}") from None


def build_zero_shot(model: str | None, preset: str | None, classes: list[str] | None, folders: list[str] | None,
                    template: str | None, n_samples: str | None, to_keep: str | None, loss: str | None,
                    trials: int | None, t_weights: str | None, early_stop: float | None, temperature: str | None,
                    resolution: int | None, dtype: str | None, device: str | None, max_batch: int, compile_: bool,
                    seed: int, random_weights: bool, delta: float | None = None, check_every: int | None = None,
                    prompts_file: Path | None = None, compile_mode: str | None = None) -> tuple[DiffusionClassifier, int]:
    """The Diffusion Classifier the options (over the preset, over the defaults) describe, and its input size.

    Prompts: ``prompts_file`` (CSV), else the preset's per-class ``prompts``, else the template;
    without ``classes`` the prompt file's classes are used (in file order)."""
    from difffeat.backbone import load_backbone
    from difffeat.presets import pick, precedence
    from difffeat.registry import DEFAULT_MODEL, MODELS

    raw = classify_preset(preset) if preset else {}
    cfg = dict(raw.get("classifier") or {})
    extract = dict(raw.get("extract") or {})
    model = pick(model, extract.get("model"), DEFAULT_MODEL)
    table = read_prompts_file(prompts_file) if prompts_file is not None else cfg.get("prompts")
    names = classes or (list(table) if prompts_file is not None else None) or cfg.get("classes") or (
        [f.replace("_", " ") for f in folders] if folders else None)
    if names is None:
        raise BadInputError("empty class list: give --classes 'a,b,...' or --classes-file FILE (one class per line)")
    names = check_class_names([str(n) for n in names])
    default = Schedule()
    ns, tk = _ints(n_samples, "--n-samples"), _ints(to_keep, "--to-keep")
    if ns is not None and tk is None and len(ns) == 1:
        tk = (1,)  # one stage: score every class on every timestep
    opt = precedence(  # options over the preset over the defaults
        dict(n_samples=ns, to_keep=tk, loss=loss, trials=trials, temperature=temperature, template=template,
             timestep_weights=t_weights, resolution=resolution, check_every=check_every),
        {**cfg, "resolution": extract.get("resolution")},
        dict(n_samples=default.n_samples, to_keep=default.to_keep, loss=default.loss, trials=1, check_every=8,
             template="a photo of a {}.", resolution=MODELS[model].resolution if model in MODELS else None))
    schedule = Schedule(n_samples=tuple(opt["n_samples"]), to_keep=tuple(opt["to_keep"]), loss=opt["loss"],
                        trials=int(opt["trials"]))
    tau: float | str = "auto"
    t_spec = opt["temperature"]
    if t_spec not in (None, "auto"):
        try:
            tau = float(t_spec)  # type: ignore[arg-type]
        except ValueError:
            raise BadInputError(f"--temperature must be a number or 'auto', got {t_spec!r}") from None
    bb = load_backbone(model, dtype=dtype, device=device, random_weights=random_weights)
    res = opt["resolution"]
    if res is None:
        res = int(bb.denoiser.config.get("sample_size", 64) or 64) * bb.latent_scale
    res = int(res)
    if res % bb.size_multiple:
        raise BadInputError(f"resolution {res} is not a multiple of {bb.size_multiple} for {bb.name}")
    tpl = opt["template"]
    if "{}" not in tpl:
        raise BadInputError(f"prompt template {tpl!r} has no '{{}}' for the class name")
    if delta is None and early_stop is None:
        delta = cfg.get("delta")
    clf = DiffusionClassifier(
        bb, names, prompts=class_prompts(names, table, tpl) if bb.text_conditioned else None, schedule=schedule,
        weights=timestep_weights(opt["timestep_weights"], bb.num_train_timesteps),
        max_batch=max_batch, seed=seed, temperature=tau, early_stop=early_stop, delta=delta,
        check_every=int(opt["check_every"]), static_batches=compile_, image_size=(res, res))
    if compile_:
        compile_denoiser(bb, compile_mode)
    return clf, res


# ---------------------------------------------------------------- probes: train + sweep
def split_indices(labels: Sequence[int], val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """A stratified train/validation split (at least one training image per class)."""
    if not 0 <= val_frac < 1:
        raise BadInputError(f"--val-split must be in [0, 1), got {val_frac}")
    rng = random.Random(seed)
    by_cls: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_cls.setdefault(int(y), []).append(i)
    tr, va = [], []
    for idx in by_cls.values():
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, int(round(len(idx) * val_frac)))
        va += idx[:n_val]
        tr += idx[n_val:]
    return sorted(tr), sorted(va)


def pooled_dataset(ex: Any, files: list[Path], pool: int, batch_size: int, desc: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Pooled features {key: [N, D]} of ``files`` and the indices that could be read."""
    feats: dict[str, list[torch.Tensor]] = {}
    kept: list[int] = []
    from difffeat.distributed import progress_bar

    bar = progress_bar(len(files), desc)
    for b0 in range(0, len(files), batch_size):
        ims, idx = [], []
        for i in range(b0, min(len(files), b0 + batch_size)):
            try:
                ims.append(load_image(files[i]))
                idx.append(i)
            except DiffFeatError as e:
                tqdm.write(f"warning: skipped {e}")
        if ims:
            for k, v in extract_pooled(ex, ims, pool).items():
                feats.setdefault(k, []).append(v)
            kept += idx
        bar.update(min(len(files), b0 + batch_size) - b0)
    bar.close()
    if not kept:
        raise BadInputError("no readable training image")
    return {k: torch.cat(v) for k, v in feats.items()}, kept


def probe_data(images: Path, val: Path | None, val_split: float, seed: int, ex: Any, pool: int, batch_size: int
               ) -> tuple[list[str], dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(classes, train features, train labels, val features, val labels) for probe training/sweeps."""
    files, folders = labelled_images(images)
    classes = sorted(set(folders))
    check_class_names(classes)
    y_all = [classes.index(f) for f in folders]
    if val is not None:
        vfiles, vfolders = labelled_images(val)
        vmap = folder_to_class(vfolders, classes)
        tr_idx, vfiles_y = list(range(len(files))), [classes.index(vmap[f]) for f in vfolders]
    else:
        tr_idx, va_idx = split_indices(y_all, val_split, seed)
        vfiles, vfiles_y = [files[i] for i in va_idx], [y_all[i] for i in va_idx]
    xtr, kept = pooled_dataset(ex, [files[i] for i in tr_idx], pool, batch_size, "train features")
    ytr = torch.tensor([y_all[tr_idx[i]] for i in kept])
    xva: dict[str, torch.Tensor] = {}
    yva = torch.zeros(0, dtype=torch.long)
    if vfiles:
        xva, vkept = pooled_dataset(ex, vfiles, pool, batch_size, "val features")
        yva = torch.tensor([vfiles_y[i] for i in vkept])
    return classes, xtr, ytr, xva, yva


def backbone_record(model: str | None, ex: Any, pool: int) -> dict[str, Any]:
    """The feature settings a probe checkpoint records (and is checked against)."""
    from difffeat.registry import DEFAULT_MODEL

    from difffeat.heads.checkpoint import feature_record

    keys = ("ensemble", "noise", "seed", "prompt", "resolution", "resize")
    return feature_record(ex, model_id(model or DEFAULT_MODEL), **{k: ex.config.get(k) for k in keys}, pool=int(pool))


def probe_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--pool", type=int, default=1, show_default=True, help="Adaptive average pool to POOL x POOL before flattening."),
        click.option("--val", "val_dir", type=click.Path(path_type=Path), default=None, help="A labelled validation folder."),
        click.option("--val-split", type=float, default=0.2, show_default=True, help="Held-out fraction per class when --val is not given."),
        click.option("-C", "--C", "C", type=float, default=1.0, show_default=True, help="Inverse L2 strength of the logistic regression."),
        click.option("-k", "--knn-k", type=int, default=20, show_default=True, help="Neighbours of the k-NN."),
        click.option("--backend", type=click.Choice(["auto", "sklearn", "torch"]), default="auto", show_default=True),
        click.option("-b", "--batch-size", type=int, default=8, show_default=True, help="Images per extraction batch."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command("probe")
@click.argument("images", type=click.Path(path_type=Path))
@model_options
@probe_options
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder.")
def train_probe_cmd(images: Path, pool: int, val_dir: Path | None, val_split: float, C: float, knn_k: int, backend: str,
                    batch_size: int, out: Path, **opts: Any) -> None:
    """Fit a linear probe and a k-NN on pooled features of IMAGES (one sub-folder per class)."""
    ex = extractor_from_options(**opts)
    classes, xtr, ytr, xva, yva = probe_data(images, val_dir, val_split, opts["seed"], ex, pool, batch_size)
    x = torch.cat(list(xtr.values()), dim=1)
    probe = ProbeClassifier.fit(x, ytr, classes, backbone_record(opts["model"], ex, pool), C=C, k=knn_k, backend=backend)
    probe.metrics = {"train_images": int(ytr.numel()), "val_images": int(yva.numel())}
    if yva.numel():
        xv = torch.cat(list(xva.values()), dim=1)
        probe.metrics["val_linear_acc"] = accuracy(probe.predict_proba(xv, "linear"), yva)
        probe.metrics["val_knn_acc"] = accuracy(probe.predict_proba(xv, "knn"), yva)
        click.echo(f"validation accuracy: linear {100 * probe.metrics['val_linear_acc']:.2f}%, "
                   f"k-NN {100 * probe.metrics['val_knn_acc']:.2f}% ({yva.numel()} images)")
    probe.save(out)
    click.echo(f"wrote probe {out} ({len(classes)} classes, {ytr.numel()} training images, {x.shape[1]}-d features)")


@click.command("probe")
@click.argument("images", type=click.Path(path_type=Path))
@model_options
@probe_options
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Also write the table as CSV.")
def sweep_probe_cmd(images: Path, pool: int, val_dir: Path | None, val_split: float, C: float, knn_k: int, backend: str,
                    batch_size: int, out: Path | None, **opts: Any) -> None:
    """Validation accuracy of a linear probe and a k-NN for every (layer, t) of -l/-t (one extraction pass)."""
    ex = extractor_from_options(**opts)
    classes, xtr, ytr, xva, yva = probe_data(images, val_dir, val_split, opts["seed"], ex, pool, batch_size)
    if not yva.numel():
        raise BadInputError("a sweep needs validation images: use --val DIR or --val-split > 0 with >= 2 images per class")
    info = {f["name"]: f for f in getattr(ex, "feature_info", [])}
    rows = []
    for key in xtr:
        probe = ProbeClassifier.fit(xtr[key], ytr, classes, {}, C=C, k=knn_k, backend=backend)
        f = info.get(key, {})
        rows.append({"layer": f.get("layer", key), "t": f.get("t", ""), "dim": int(xtr[key].shape[1]),
                     "linear_acc": accuracy(probe.predict_proba(xva[key], "linear"), yva),
                     "knn_acc": accuracy(probe.predict_proba(xva[key], "knn"), yva)})
    best = max(rows, key=lambda r: (r["linear_acc"], r["knn_acc"]))
    click.echo(f"{'layer':<14} {'t':>5} {'dim':>7} {'linear':>8} {'k-NN':>8}   ({len(classes)} classes, "
               f"{ytr.numel()} train / {yva.numel()} val images)")
    for r in rows:
        mark = "  <- best" if r is best else ""
        click.echo(f"{r['layer']:<14} {r['t']:>5} {r['dim']:>7} {100 * r['linear_acc']:>7.2f}% {100 * r['knn_acc']:>7.2f}%{mark}")
    if out is not None:
        from difffeat.io import atomic_path

        with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        click.echo(f"wrote {out}")
