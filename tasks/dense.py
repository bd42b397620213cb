"""The dense tasks behind the CLI: train a head, predict a folder, segment without training, evaluate.

    difffeat train seg|depth|edges DATA -o RUN [--config my.yaml] [--val VAL] [key=value ...]
    difffeat segment IMAGES --head RUN/head -o OUT [--sliding-window]
    difffeat segment IMAGES --zero-shot K -m sd21 -l up.1 -o OUT     (K-means, no training)
    difffeat segment IMAGES --diffseg -o OUT                          (DiffSeg, no training)
    difffeat depth   IMAGES --head RUN/head -o OUT
    difffeat edges   IMAGES --head RUN/head -o OUT [--nms] [--thin 0.5]
    difffeat eval seg|depth|edges DATA (--head RUN/head | --pred OUT) [-o metrics.json]

Each function takes the option dataclasses below (and the shared
:class:`~difffeat.options.ExtractorOptions` / :class:`~difffeat.options.FolderOptions`) and
returns what the command prints; :mod:`difffeat.cli.dense` only parses and prints. What
differs between the tasks is their record in :mod:`.dense_tasks`. DATA is a labelled folder
(:mod:`.dense_data`). Prediction runs are resumable (finished outputs are skipped, files are
written atomically, nothing is overwritten without ``--overwrite``); an unreadable image is
reported and skipped and the run exits non-zero at the end. Training: :mod:`.dense_train`;
inference and scoring: :mod:`.dense_predict`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from difffeat.errors import BadInputError, DiffFeatError
from difffeat.options import ExtractorOptions, FolderOptions, option
from difffeat.presets import precedence

from .dense_tasks import TASKS, get_task


# --------------------------------------------------------------------------- options
@dataclass
class TrainOptions:
    """``difffeat train TASK``'s own flags (the settings themselves: the task's YAML config)."""

    out: Path = option(None, "Run folder (checkpoint in OUT/head).", "-o", "--out", path=True, required=True)
    config: Path | None = option(None, "YAML with settings to change.", "--config", path=True)
    val: Path | None = option(None, "Labelled validation folder.", path=True)


@dataclass
class HeadOptions:
    """The checkpoint a prediction command runs."""

    head: Path = option(None, "Head checkpoint folder.", "--head", path=True, required=True)


@dataclass
class PredictOptions:
    """Where predictions go and how large images are covered."""

    out_dir: Path = option(None, "Output folder.", "-o", "--out", path=True, required=True)
    sliding_window: bool = option(False, "Overlapping windows at the training size (large images).", is_flag=True)
    overlap: float = option(1 / 3, "Window overlap fraction.")


@dataclass
class SegmentOptions:
    """The three ways ``difffeat segment`` segments (exactly one is given)."""

    head: Path | None = option(None, "Segmentation head checkpoint folder.", "--head", path=True)
    zero_shot: int | None = option(None, "Unsupervised: K-means with K segments (no head).", "--zero-shot", type=int)
    diffseg: bool = option(False, "Unsupervised: DiffSeg self-attention merging (preset 'diffseg'; no head, no K).",
                           is_flag=True)


@dataclass
class DiffSegOptions:
    """DiffSeg's merging (Tian et al., CVPR 2024; :mod:`difffeat.heads.diffseg`); unset: the preset's."""

    kl_threshold: float | None = option(None, "DiffSeg merging threshold tau (default: the preset's 1.1).", type=float)
    anchors: int | None = option(None, "DiffSeg anchor grid side (default 16).", type=int, min=2)
    refine: bool = option(False, "DiffSeg: the release's optional K-means refinement.", is_flag=True)
    kl_precision: str | None = option(None, "DiffSeg first-merge precision (default: the preset's release-fp16, as "
                                      "the published numbers).", choices=("release-fp16", "fp32"))


@dataclass
class EvalOptions:
    """``difffeat eval TASK``: what is scored, how labels are read and the metric settings."""

    head: Path | None = option(None, "Head checkpoint folder.", "--head", path=True)
    pred: Path | None = option(None, "Folder of saved predictions.", "--pred", path=True)
    out: Path | None = option(None, "Also write the metrics as JSON.", "-o", "--out", path=True)
    sliding_window: bool = option(False, "Overlapping windows at the training size (large images).", is_flag=True)
    classes: Path | None = option(None, "seg: classes.txt.", "--classes", path=True)
    reduce_zero_label: bool = option(False, "seg: label 0 = ignore, k = class k-1 (ADE20K).", is_flag=True)
    depth_scale: float = option(1000.0, "depth: 16-bit PNG value per metre.")
    min_depth: float = option(1e-3, "depth: evaluate gt > min-depth.")
    max_depth: float | None = option(None, "depth: evaluate gt < max-depth (NYU: 10, KITTI: 80).", type=float)
    align: str | None = option(None, "depth: per-image alignment (relative depth).", choices=("scale_shift", "scale"))
    thresholds: int = option(99, "edges: number of thresholds.")
    max_dist: float = option(0.0075, "edges: match tolerance / image diagonal.")


# DiffSeg's settings where neither the flags nor the preset's ``diffseg`` block set them
DIFFSEG_DEFAULTS = {"kl_threshold": 1.1, "iterations": 3, "anchors": 16, "refine": False, "kl_precision": "fp32"}


# --------------------------------------------------------------------------- train
def train_folder(task: str, data: Path, overrides: Sequence[str], opts: TrainOptions, ex: ExtractorOptions,
                 run: FolderOptions, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """``difffeat train TASK``: the task's config (defaults < ``--config`` < KEY=VALUE < the
    flags -m/-l/-t/--device/--val), then :func:`~.dense_train.train_dense`."""
    from .dense_config import load_train_config
    from .dense_train import train_dense

    flags = {"backbone.model": ex.model, "backbone.layers": list(ex.layers) or None,
             "backbone.timesteps": list(ex.timesteps) or None, "train.device": ex.device,
             "data.val": str(opts.val) if opts.val else None}
    cfg = load_train_config(task, opts.config, overrides, flags)
    return train_dense(task, data, opts.out, cfg, overwrite=run.overwrite, echo=echo)


# --------------------------------------------------------------------------- predict with a head
class _SetupFailed(Exception):
    """A predictor that could not be built: ends the run instead of failing image by image."""


def checked_config(task: str, head: Path, ex: ExtractorOptions) -> dict[str, Any]:
    """The checkpoint's config, checked against ``task`` and any -m/-l/-t given (cheap: no model)."""
    import os

    from difffeat.heads import read_config
    from difffeat.heads.checkpoint import check_backbone

    expect: dict[str, Any] = {}
    if ex.model:
        expect["preset"] = os.path.abspath(ex.model) if os.path.isdir(ex.model) else ex.model
    if ex.layers:
        expect["layers"] = list(ex.layers)
    if ex.timesteps:
        expect["timesteps"] = list(ex.timesteps)
    config = read_config(head)
    check_backbone(config, expect, where=str(head))
    if config.get("task") != task:
        other = config.get("task")
        raise BadInputError(f"{head} is a {other!r} head; use `difffeat {TASKS[other].command if other in TASKS else 'eval'}`")
    return config


def predict_folder(task: str, images: Path, head: Path, ex: ExtractorOptions, opts: PredictOptions,
                   run: FolderOptions, write_options: Any = None) -> str:
    """Predict every unfinished image under ``images`` with the head checkpoint ``head`` and
    write the task's files (``write_options``: its writer's flags); returns the summary line.
    The model is only loaded if some image needs it."""
    from difffeat.pipeline import run_folder

    from .dense_predict import DensePredictor

    spec = get_task(task)
    writer = spec.writer(checked_config(task, head, ex), write_options)
    holder: list[Any] = []

    def process(items: list[Any]) -> None:
        if not holder:
            try:
                holder.append(DensePredictor.from_checkpoint(head, None, ex.device, ex.dtype, ex.max_batch, ex.compile))
            except DiffFeatError as e:
                raise _SetupFailed(e) from None
        p = holder[0]
        maps = ([p.predict_sliding(it.image, opts.overlap, run.batch_size) for it in items] if opts.sliding_window
                else p.predict([it.image for it in items]))
        for it, m in zip(items, maps):
            if not it.written:
                writer(it.out, spec.predict(m).numpy(), it.image)

    try:
        done = run_folder(images, opts.out_dir, ".png", process, batch_size=run.batch_size, overwrite=run.overwrite,
                          desc="images")
    except _SetupFailed as e:
        raise e.args[0] from None
    return f"wrote {done.done} image(s) to {opts.out_dir}" + (f", skipped {done.skipped} finished" if done.skipped else "")


# --------------------------------------------------------------------------- segment
def segment_folder(images: Path, seg: SegmentOptions, merging: DiffSegOptions, ex: ExtractorOptions,
                   opts: PredictOptions, run: FolderOptions) -> str:
    """``difffeat segment``: with a head, K-means (``--zero-shot K``) or DiffSeg; returns the summary line."""
    if sum((seg.head is not None, seg.zero_shot is not None, seg.diffseg)) != 1:
        raise BadInputError("give exactly one of --head CKPT, --zero-shot K or --diffseg")
    if seg.zero_shot is not None:
        return zero_shot_folder(images, seg.zero_shot, ex, opts.out_dir, run)
    if seg.diffseg:
        return diffseg_folder(images, merging, ex, opts.out_dir, run)
    given = [k for k in ("ensemble", "prompt", "noise", "resolution", "resize") if getattr(ex, k) is not None]
    if given:
        raise BadInputError(f"--{given[0]} comes from the checkpoint with --head; drop it")
    return predict_folder("seg", images, seg.head, ex, opts, run)  # type: ignore[arg-type]


def zero_shot_folder(images: Path, k: int, ex: ExtractorOptions, out_dir: Path, run: FolderOptions) -> str:
    """K-means over the features of every image into ``k`` segments (no training)."""
    from difffeat.heads.kmeans_seg import kmeans_segment
    from difffeat.pipeline import group_by_size, run_folder

    from .dense_io import default_palette, write_seg

    if k < 2:
        raise BadInputError(f"--zero-shot needs K >= 2 segments, got {k}")
    extractor = ex.create()
    info = [f for f in extractor.feature_info if f.get("kind", "feature") == "feature"]
    palette = default_palette(k)

    def process(items: list[Any]) -> None:
        for its, x in group_by_size(items, lambda im: extractor.prepare([im])[0]):
            feats = extractor(x)
            for i, it in enumerate(its):
                if it.written:
                    continue
                one = {f["name"]: feats[f["name"]][i : i + 1] for f in info}
                labels = kmeans_segment(one, info, k, out_size=(it.image.size[1], it.image.size[0]), seed=ex.seed)
                write_seg(it.out, labels[0].cpu().numpy(), it.image, palette)

    done = run_folder(images, out_dir, ".png", process, batch_size=run.batch_size, overwrite=run.overwrite,
                      desc="images")
    return f"wrote {done.done} K-means segmentation(s) (K={k}) to {out_dir}"


def diffseg_settings(merging: DiffSegOptions, preset: Any) -> dict[str, Any]:
    """DiffSeg's merging settings: flags > the preset's ``diffseg`` block > :data:`DIFFSEG_DEFAULTS`."""
    flags = {"kl_threshold": merging.kl_threshold, "anchors": merging.anchors,
             "refine": True if merging.refine else None, "kl_precision": merging.kl_precision}
    s = precedence(flags, preset.raw.get("diffseg") or {}, DIFFSEG_DEFAULTS)
    return {"tau": float(s["kl_threshold"]), "iterations": int(s["iterations"]), "points": int(s["anchors"]),
            "refine_kmeans": bool(s["refine"]), "kl_precision": str(s["kl_precision"])}


def diffseg_extractor(ex: ExtractorOptions, preset: Any) -> Any:
    """The self-attention extractor DiffSeg reads: the ``diffseg`` preset when no -m is given,
    else every self-attention layer of -m (unless -l) with the preset's timesteps, noise and
    resize where the flags leave them unset (flags > preset)."""
    from difffeat.heads.diffseg import self_attention_layers

    if ex.model is None:  # the paper's protocol, with any option given on top
        ex = dataclasses.replace(ex, model="diffseg")
    elif not ex.layers:
        from difffeat.backbone import load_backbone

        bb = load_backbone(ex.model, dtype=ex.dtype, device=ex.device)
        given = {"timesteps": tuple(ex.timesteps) or None, "noise": ex.noise, "resize": ex.resize}
        merged = precedence(given, {k: preset.extract[k] for k in given})  # the release: t=300, clean, centre crop
        ex = dataclasses.replace(ex, layers=tuple(f"attn.self.{n}" for n in self_attention_layers(bb.denoiser)),
                                 timesteps=tuple(merged["timesteps"]), noise=merged["noise"], resize=merged["resize"])
    if any(not name.startswith("attn.self.") for name in ex.layers):
        raise BadInputError("--diffseg reads self-attention maps: give layers as attn.self.LAYER (or none for all)")
    return ex.create()


def diffseg_folder(images: Path, merging: DiffSegOptions, ex: ExtractorOptions, out_dir: Path,
                   run: FolderOptions) -> str:
    """DiffSeg (Tian et al., CVPR 2024) on every image: masks at the original size, 255
    outside the centre crop the release segments."""
    import numpy as np

    from difffeat.heads.diffseg import diffseg_segment
    from difffeat.io import centre_square
    from difffeat.pipeline import group_by_size, run_folder
    from difffeat.registry import get_preset

    from .dense_io import default_palette, write_seg

    preset = get_preset("diffseg")
    extractor, settings, palette = diffseg_extractor(ex, preset), diffseg_settings(merging, preset), default_palette(256)

    def process(items: list[Any]) -> None:
        for its, x in group_by_size(items, lambda im: extractor.prepare([im])[0]):
            maps = extractor(x)
            for i, it in enumerate(its):
                if it.written:
                    continue
                box = centre_square(*it.image.size) if extractor.resize == "crop" else (0, 0, *it.image.size)
                seg = diffseg_segment({k: v[i : i + 1] for k, v in maps.items()},
                                      out_size=(box[3] - box[1], box[2] - box[0]), **settings)[0]
                labels = np.full((it.image.size[1], it.image.size[0]), 255, dtype=np.int64)  # 255: outside the crop
                labels[box[1]:box[3], box[0]:box[2]] = seg.cpu().numpy()
                write_seg(it.out, labels, it.image, palette)

    done = run_folder(images, out_dir, ".png", process, batch_size=run.batch_size, overwrite=run.overwrite,
                      desc="images")
    side = settings["points"]
    return (f"wrote {done.done} DiffSeg segmentation(s) (tau={settings['tau']}, {side}x{side} anchors, "
            f"{settings['kl_precision']} merge) to {out_dir}")


# --------------------------------------------------------------------------- eval
def _head_maps(p: Any, sliding: bool) -> Callable[[dict[str, Any], Any], Any]:
    """``evaluate``'s ``predict``: a predictor's map of an image (whole or sliding window)."""
    return lambda item, image: p.predict_sliding(image) if sliding else p.predict([image])[0]


def evaluate_folder(task: str, data: Path, opts: EvalOptions, ex: ExtractorOptions) -> tuple[dict[str, Any], int]:
    """Score a head (``--head``) or saved predictions (``--pred``) on the labelled folder ``data``;
    writes the metrics to ``opts.out`` if given. Returns (metrics, number of images)."""
    from difffeat.io import save_json

    from .dense_data import DenseFolder
    from .dense_predict import DensePredictor, evaluate

    if (opts.head is None) == (opts.pred is None):
        raise BadInputError("give exactly one of --head CKPT or --pred DIR")
    predict, classes, depth_scale = None, opts.classes, opts.depth_scale
    if opts.head is not None:
        p = DensePredictor.from_checkpoint(opts.head, device=ex.device, dtype=ex.dtype)
        if p.task != task:
            raise BadInputError(f"{opts.head} is a {p.task!r} head, not {task!r}")
        classes = classes or p.loaded.classes  # type: ignore[assignment]
        depth_scale = float(p.config.get("data", {}).get("depth_scale", depth_scale))  # the head's training labels
        predict = _head_maps(p, opts.sliding_window)
    elif not opts.pred.is_dir():  # type: ignore[union-attr]
        raise BadInputError(f"prediction folder not found: {opts.pred}")
    ds = DenseFolder(data, task, classes=classes, depth_scale=depth_scale, reduce_zero_label=opts.reduce_zero_label)
    metrics = evaluate(task, ds, predict=predict, pred_dir=opts.pred, depth_scale=depth_scale,
                       num_classes=ds.num_classes, class_names=ds.classes, min_depth=opts.min_depth,
                       max_depth=opts.max_depth, align=opts.align, thresholds=opts.thresholds, max_dist=opts.max_dist)
    if opts.out is not None:
        save_json(opts.out, metrics)
    return metrics, len(ds)
