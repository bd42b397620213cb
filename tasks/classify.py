"""Image classification: what ``difffeat classify``, ``difffeat train probe`` and ``difffeat
sweep probe`` do (the commands are in :mod:`difffeat.cli.classify`; :func:`classify`,
:func:`train_probe` and :func:`sweep_probe` take the options dataclasses below).

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
import dataclasses
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from difffeat.errors import BadInputError, DiffFeatError
from difffeat.heads.diffusion_classifier import (
    DiffusionClassifier, Schedule, check_class_names, compile_denoiser, fit_temperature, timestep_weights,
)
from difffeat.heads.probe_cls import ProbeClassifier, accuracy, pool_features
from difffeat.distributed import DistInfo, dist_info
from difffeat.io import FolderRun, image_key, list_images, load_image, pil_to_tensor, save_png
from difffeat.options import ExtractorOptions, flag_of, option
from difffeat.runner import CsvSink, Job, output_guard, run

CSV_FIELDS = ["image", "top1", "score", "topk"]


# ---------------------------------------------------------------- options
@dataclass
class ClassifyOptions:
    """The options of ``difffeat classify`` beyond the shared extractor ones.

    Zero-shot (default): the Diffusion Classifier of Li et al., "Your Diffusion Model is
    Secretly a Zero-Shot Classifier" (ICCV 2023); ``--preset`` loads one of the paper's
    settings. ``--probe CKPT``: a probe from ``difffeat train probe``, which brings its own
    classes and feature settings (the zero-shot fields must stay unset).
    """

    classes: str | None = option(None, "Comma-separated class names (or class ids for class-conditional models).")
    classes_file: Path | None = option(None, "One class per line.", path=True)
    preset: str | None = option(None, "Classify preset: cifar10, stl10, pets, flowers, food, aircraft, imagenet "
                                "(or dc-NAME).")
    template: str | None = option(None, "Prompt template, '{}' is the class name (default: the preset's, else "
                                  "'a photo of a {}.').")
    n_samples: str | None = option(None, "Timesteps per class in each stage, e.g. '50,500'.")
    to_keep: str | None = option(None, "Classes kept after each stage, e.g. '5,1'.")
    loss: str | None = option(None, "Denoising error (default: the preset's, else l2).", choices=("l2", "l1", "huber"))
    trials: int | None = option(None, "Noise draws per timestep (default 1).", type=int)
    t_weights: str | None = option(None, "Timestep weights: uniform, range:A-B, or a JSON file of T numbers.")
    early_stop: float | None = option(None, "Racing with a fixed z threshold instead of --delta (deviation; off by "
                                      "default).", type=float)
    delta: float | None = option(None, "Sequential schedule: drop a class once it is worse than the leader at error "
                                 "rate DELTA (the -fast presets; 0 = the paper's schedule).", type=float)
    check_every: int | None = option(None, "Sequential schedule: pairs per class between two racing checks "
                                     "(default 8).", type=int)
    prompts_file: Path | None = option(None, "Per-class prompts: a CSV with prompt,classname columns (the reference's "
                                       "prompts/*.csv).", path=True)
    hierarchy: Path | None = option(None, "HDC: a class tree (JSON) whose leaves are the classes; prune level by level "
                                    "(docs/classify.md).", path=True)
    hierarchy_keep: str = option("5", "HDC: nodes kept per level (one number, or one per level: '10,5,3').")
    temperature: str | None = option(None, "Score temperature (a number, e.g. one fitted by --eval) or 'auto'.")
    compile_mode: str = option("default", "torch.compile mode; reduce-overhead adds CUDA graphs (one per batch shape).",
                               choices=("default", "reduce-overhead", "max-autotune"))
    topk: int = option(5, "Classes listed in the topk column.")
    probe: Path | None = option(None, "Apply a probe from `difffeat train probe` instead.", path=True)
    probe_kind: str = option("linear", "Which of the probe's classifiers: the linear probe or the k-NN.",
                             choices=("linear", "knn"))
    out: Path | None = option(None, "Predictions CSV (appended, resumable).", "-o", "--out", path=True, required=True)
    evaluate: bool = option(False, "IMAGES has one sub-folder per class: report accuracy + confusion matrix.",
                            "--eval", is_flag=True)
    random_weights: bool = option(False, "Random weights (speed tests only).", is_flag=True, hidden=True)


# the fields that set the zero-shot classifier: a --probe run must leave them unset
ZERO_SHOT_FIELDS = ("template", "n_samples", "to_keep", "loss", "trials", "t_weights", "early_stop", "delta",
                    "check_every", "prompts_file", "hierarchy", "hierarchy_keep", "temperature", "compile_mode")


@dataclass
class ProbeOptions:
    """How ``difffeat train probe`` and ``difffeat sweep probe`` fit a linear probe and a cosine
    k-NN on pooled features (:mod:`difffeat.heads.probe_cls`)."""

    pool: int = option(1, "Adaptive average pool to POOL x POOL before flattening.")
    val: Path | None = option(None, "A labelled validation folder.", path=True)
    val_split: float = option(0.2, "Held-out fraction per class when --val is not given.")
    C: float = option(1.0, "Inverse L2 strength of the logistic regression.", "-C", "--C")
    knn_k: int = option(20, "Neighbours of the k-NN.", "-k", "--knn-k")
    backend: str = option("auto", "Logistic-regression solver (auto: scikit-learn for small problems, else torch).",
                          choices=("auto", "sklearn", "torch"))


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """``'50,500'`` -> ``(50, 500)`` (None stays None); ``what`` names the option in the error."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise BadInputError(f"{what} must be comma-separated integers, got {text!r}") from None


def given_flags(opts: Any, names: Sequence[str]) -> list[str]:
    """The flags of ``opts``'s fields ``names`` whose value is not the field's default."""
    out = []
    for f in dataclasses.fields(opts):
        if f.name in names and getattr(opts, f.name) != f.default:
            spec = flag_of(f)
            out.append(spec.flags[-1] if spec and spec.flags else "--" + f.name.replace("_", "-"))
    return out


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
@dataclass
class Prepared:
    """A classifier ready for :func:`run_classify`: the predictor and how to feed it."""

    predict: Predictor
    classes: list[str]
    zero_shot: bool
    batch_size: int  # images per predictor call
    max_side: int | None  # the loader may reduce huge images to this side
    paper_evals: int | None = None  # denoiser evaluations per image of the full schedule (zero-shot)


@dataclass
class ClassifyReport:
    """What :func:`classify` did (the CLI prints it, then calls ``run.finish()``)."""

    run: FolderRun
    merged: bool = True  # False: a data-parallel rank that left the merge to another rank
    evals: list[int] = field(default_factory=list)  # denoiser evaluations per newly classified image
    paper_evals: int | None = None
    evaluation: dict[str, Any] | None = None  # :func:`evaluate_csv`'s result with --eval


def classify(images: Path, opts: ClassifyOptions, ex: ExtractorOptions | None = None,
             overwrite: bool = False) -> ClassifyReport:
    """``difffeat classify``: classify every image under ``images`` into the CSV ``opts.out``.

    Zero-shot with the Diffusion Classifier (Li et al., ICCV 2023; :func:`build_zero_shot`),
    or with the probe ``opts.probe``. ``ex`` gives the model and the runtime settings (model,
    seed, resolution, dtype, device, max_batch, compile). With ``opts.evaluate`` the first
    sub-folder of each image is its class and the report holds accuracy and a confusion matrix.
    """
    ex = ex or ExtractorOptions()
    if opts.out is None:
        raise BadInputError("classify needs an output CSV (-o/--out)")
    files, labels = labelled_images(images) if opts.evaluate else (list_images(images), [])
    if opts.probe is not None:
        ready = probe_classifier(opts, ex)
    else:
        ready = zero_shot_classifier(opts, ex, sorted(set(labels)) if opts.evaluate else None)
    if opts.evaluate:
        folder_to_class(labels, ready.classes)  # fail before the run if a folder matches no class
    run = run_classify(images, opts.out, ready.predict, ready.batch_size, opts.topk, overwrite, files,
                       max_side=ready.max_side)
    report = ClassifyReport(run, merged=getattr(run, "merged", True))
    if not report.merged:
        return report
    report.evals = list(getattr(ready.predict, "evals", []))
    report.paper_evals = ready.paper_evals
    if opts.evaluate:
        report.evaluation = evaluate_csv(opts.out, images, files, labels, ready.classes, ready.zero_shot)
    return report


def zero_shot_classifier(opts: ClassifyOptions, ex: ExtractorOptions, folders: list[str] | None) -> Prepared:
    """The Diffusion Classifier (flat, or HDC with ``opts.hierarchy``) that ``opts`` describe."""
    classes = parse_classes(opts.classes, opts.classes_file)
    if opts.hierarchy is not None and classes is None:
        from difffeat.heads.dc_hierarchy import load_tree

        classes = [n.name for n in load_tree(opts.hierarchy).leaves()]  # the tree's leaves are the classes
    clf, res = build_zero_shot(
        ex.model, opts.preset, classes, folders, opts.template, opts.n_samples, opts.to_keep, opts.loss, opts.trials,
        opts.t_weights, opts.early_stop, opts.temperature, ex.resolution, ex.dtype, ex.device, ex.max_batch,
        ex.compile, ex.seed, opts.random_weights, delta=opts.delta, check_every=opts.check_every,
        prompts_file=opts.prompts_file, compile_mode=None if opts.compile_mode == "default" else opts.compile_mode)
    if opts.hierarchy is not None:
        clf = hierarchical(clf, opts.hierarchy, parse_ints(opts.hierarchy_keep, "--hierarchy-keep") or (5,))
    paper = clf.schedule.unet_evals(len(clf.classes), clf.backbone.num_train_timesteps)
    return Prepared(zero_shot_predictor(clf, res), list(clf.classes), zero_shot=True, batch_size=1,
                    max_side=4 * res, paper_evals=paper)


def probe_classifier(opts: ClassifyOptions, ex: ExtractorOptions) -> Prepared:
    """The probe ``opts.probe`` on the extractor it was trained with (``-m`` must match it)."""
    assert opts.probe is not None
    if opts.classes is not None or opts.classes_file is not None or opts.preset is not None:
        raise BadInputError("--probe brings its own classes and features; drop --classes/--classes-file/--preset")
    given = given_flags(opts, ZERO_SHOT_FIELDS) + given_flags(ex, ("resolution",))
    if given:
        raise BadInputError(f"--probe uses the settings recorded with the probe: drop {', '.join(given)} "
                            "(options of the zero-shot classifier)")
    probe = ProbeClassifier.load(opts.probe, expect_backbone={"preset": model_id(ex.model)} if ex.model else None)
    extractor = probe_extractor(probe.backbone, ex, opts.random_weights)
    from difffeat.pipeline import working_side

    return Prepared(probe_predictor(probe, extractor, opts.probe_kind), probe.classes, zero_shot=False,
                    batch_size=8, max_side=working_side(extractor))


def probe_extractor(record: dict[str, Any], ex: ExtractorOptions, random_weights: bool = False) -> Any:
    """The extractor a probe checkpoint records, on this machine's device/dtype/max_batch/compile."""
    runtime = dict(device=ex.device, dtype=ex.dtype, max_batch=ex.max_batch, compile=ex.compile)
    if record.get("extractor"):
        from difffeat.heads.checkpoint import rebuild_extractor

        return rebuild_extractor(record, **runtime)
    from difffeat.factory import create

    return create(record["preset"], layers=record["layers"], timesteps=record["timesteps"],
                  ensemble=record.get("ensemble"), noise=record.get("noise"), seed=int(record.get("seed", 0)),
                  prompt=record.get("prompt"), resolution=record.get("resolution"), resize=record.get("resize"),
                  random_weights=random_weights, **runtime)
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
    from difffeat.presets import pick
    from difffeat.registry import DEFAULT_MODEL

    raw = classify_preset(preset) if preset else {}
    cfg = dict(raw.get("classifier") or {})
    extract = dict(raw.get("extract") or {})
    model = pick(model, extract.get("model"), DEFAULT_MODEL)
    table = read_prompts_file(prompts_file) if prompts_file is not None else cfg.get("prompts")
    names = zero_shot_class_names(classes, list(table) if prompts_file is not None else None, cfg, folders)
    opt = zero_shot_settings(model, cfg, extract, dict(
        n_samples=n_samples, to_keep=to_keep, loss=loss, trials=trials, temperature=temperature, template=template,
        timestep_weights=t_weights, resolution=resolution, check_every=check_every))
    schedule = Schedule(n_samples=tuple(opt["n_samples"]), to_keep=tuple(opt["to_keep"]), loss=opt["loss"],
                        trials=int(opt["trials"]))
    tau = parse_temperature(opt["temperature"])
    bb = load_backbone(model, dtype=dtype, device=device, random_weights=random_weights)
    res = input_size(bb, opt["resolution"])
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


def zero_shot_class_names(classes: list[str] | None, prompt_classes: list[str] | None, cfg: dict[str, Any],
                          folders: list[str] | None) -> list[str]:
    """The class list: given, else the prompts file's, else the preset's, else the label folders'."""
    names = classes or prompt_classes or cfg.get("classes") or (
        [f.replace("_", " ") for f in folders] if folders else None)
    if names is None:
        raise BadInputError("empty class list: give --classes 'a,b,...' or --classes-file FILE (one class per line)")
    return check_class_names([str(n) for n in names])


def zero_shot_settings(model: str, cfg: dict[str, Any], extract: dict[str, Any],
                       given: dict[str, Any]) -> dict[str, Any]:
    """The classifier settings: ``given`` (options; None = unset) over the preset over the defaults
    (:func:`difffeat.presets.precedence`). ``n_samples``/``to_keep`` strings are parsed here."""
    from difffeat.presets import precedence
    from difffeat.registry import MODELS

    ns, tk = parse_ints(given["n_samples"], "--n-samples"), parse_ints(given["to_keep"], "--to-keep")
    if ns is not None and tk is None and len(ns) == 1:
        tk = (1,)  # one stage: score every class on every timestep
    default = Schedule()
    return precedence(
        {**given, "n_samples": ns, "to_keep": tk},
        {**cfg, "resolution": extract.get("resolution")},
        dict(n_samples=default.n_samples, to_keep=default.to_keep, loss=default.loss, trials=1, check_every=8,
             template="a photo of a {}.", resolution=MODELS[model].resolution if model in MODELS else None))


def parse_temperature(spec: Any) -> float | str:
    """``--temperature``: a number, or ``'auto'`` (also when unset)."""
    if spec in (None, "auto"):
        return "auto"
    try:
        return float(spec)
    except ValueError:
        raise BadInputError(f"--temperature must be a number or 'auto', got {spec!r}") from None


def input_size(bb: Any, resolution: int | None) -> int:
    """The classifier's square input size: ``resolution``, else the denoiser's native one."""
    res = resolution
    if res is None:
        res = int(bb.denoiser.config.get("sample_size", 64) or 64) * bb.latent_scale
    res = int(res)
    if res % bb.size_multiple:
        raise BadInputError(f"resolution {res} is not a multiple of {bb.size_multiple} for {bb.name}")
    return res


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


def train_probe(images: Path, opts: ProbeOptions, ex: ExtractorOptions, out: Path,
                batch_size: int = 4) -> tuple[ProbeClassifier, int]:
    """``difffeat train probe``: fit a linear probe and a k-NN on pooled features of ``images``
    (one sub-folder per class), validate them, save the checkpoint folder ``out``.

    Returns the probe (validation accuracy in ``probe.metrics``) and its feature width."""
    extractor = ex.create()
    classes, xtr, ytr, xva, yva = probe_data(images, opts.val, opts.val_split, ex.seed, extractor, opts.pool,
                                             batch_size)
    x = torch.cat(list(xtr.values()), dim=1)
    probe = ProbeClassifier.fit(x, ytr, classes, backbone_record(ex.model, extractor, opts.pool), C=opts.C,
                                k=opts.knn_k, backend=opts.backend)
    probe.metrics = {"train_images": int(ytr.numel()), "val_images": int(yva.numel())}
    if yva.numel():
        xv = torch.cat(list(xva.values()), dim=1)
        probe.metrics["val_linear_acc"] = accuracy(probe.predict_proba(xv, "linear"), yva)
        probe.metrics["val_knn_acc"] = accuracy(probe.predict_proba(xv, "knn"), yva)
    probe.save(out)
    return probe, int(x.shape[1])


@dataclass
class ProbeSweep:
    """:func:`sweep_probe`'s table: one row per feature key (layer, t, dim, linear_acc, knn_acc)."""

    rows: list[dict[str, Any]]
    classes: list[str]
    train_images: int
    val_images: int

    @property
    def best(self) -> dict[str, Any]:
        return max(self.rows, key=lambda r: (r["linear_acc"], r["knn_acc"]))


def sweep_probe(images: Path, opts: ProbeOptions, ex: ExtractorOptions, out: Path | None = None,
                batch_size: int = 4) -> ProbeSweep:
    """``difffeat sweep probe``: validation accuracy of a linear probe and a k-NN for every
    (layer, t) of ``ex`` from one extraction pass; with ``out`` also the table as CSV."""
    extractor = ex.create()
    classes, xtr, ytr, xva, yva = probe_data(images, opts.val, opts.val_split, ex.seed, extractor, opts.pool,
                                             batch_size)
    if not yva.numel():
        raise BadInputError("a sweep needs validation images: use --val DIR or --val-split > 0 with >= 2 images "
                            "per class")
    info = {f["name"]: f for f in getattr(extractor, "feature_info", [])}
    rows = []
    for key in xtr:
        probe = ProbeClassifier.fit(xtr[key], ytr, classes, {}, C=opts.C, k=opts.knn_k, backend=opts.backend)
        f = info.get(key, {})
        rows.append({"layer": f.get("layer", key), "t": f.get("t", ""), "dim": int(xtr[key].shape[1]),
                     "linear_acc": accuracy(probe.predict_proba(xva[key], "linear"), yva),
                     "knn_acc": accuracy(probe.predict_proba(xva[key], "knn"), yva)})
    if out is not None:
        write_table(out, rows)
    return ProbeSweep(rows, classes, int(ytr.numel()), int(yva.numel()))


def write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as a CSV (written atomically; the columns of the first row)."""
    from difffeat.io import atomic_path

    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
