"""Command line for the dense tasks: train, predict and evaluate segmentation, depth, edges.

    difffeat train seg|depth|edges DATA -o RUN [--config my.yaml] [--val VAL] [key=value ...]
    difffeat segment IMAGES --head RUN/head -o OUT [--sliding-window]
    difffeat segment IMAGES --zero-shot K -m sd21 -l up.1 -o OUT     (K-means, no training)
    difffeat depth   IMAGES --head RUN/head -o OUT
    difffeat edges   IMAGES --head RUN/head -o OUT [--nms] [--thin 0.5]
    difffeat eval seg|depth|edges DATA (--head RUN/head | --pred OUT) [-o metrics.json]

DATA is a labelled folder (see :mod:`difffeat.tasks.dense_data`). Prediction runs are
resumable (finished outputs are skipped, files are written atomically, nothing is
overwritten without ``--overwrite``); an unreadable image is reported and skipped and the
command exits non-zero at the end. Training logic: :mod:`.dense_train`; inference and
evaluation: :mod:`.dense_predict`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import torch

from difffeat.cli import extractor_from_options, model_options
from difffeat.errors import BadInputError
from difffeat.io import save_json

TASK_TITLES = {"seg": "semantic segmentation", "depth": "monocular depth", "edges": "edge detection"}


# --------------------------------------------------------------------------- train
def _train_command(task: str) -> click.Command:
    @click.command(task, help=f"Train a {TASK_TITLES[task]} head on frozen features of the labelled folder DATA.\n\n"
                   f"Settings: configs/train/{task}.yaml, changed by --config FILE and KEY=VALUE overrides "
                   "(e.g. train.epochs=50 train.mode=online head.kind=probe backbone.model=sd21).")
    @click.argument("data", type=click.Path(path_type=Path))
    @click.argument("overrides", nargs=-1)
    @click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Run folder (checkpoint in OUT/head).")
    @click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML with settings to change.")
    @click.option("--val", type=click.Path(path_type=Path), default=None, help="Labelled validation folder.")
    @click.option("-m", "--model", default=None, help="Shortcut for backbone.model=...")
    @click.option("-l", "--layer", "layers", multiple=True, help="Shortcut for backbone.layers (repeatable).")
    @click.option("-t", "--timestep", "timesteps", multiple=True, type=int, help="Shortcut for backbone.timesteps (repeatable).")
    @click.option("--device", default=None, help="Shortcut for train.device=...")
    @click.option("--overwrite", is_flag=True, help="Start over instead of resuming OUT.")
    def cmd(data: Path, overrides: tuple[str, ...], out: Path, config_file: Path | None, val: Path | None,
            model: str | None, layers: tuple[str, ...], timesteps: tuple[int, ...], device: str | None, overwrite: bool) -> None:
        from difffeat.distributed import dist_info

        from .dense_config import load_train_config
        from .dense_train import train_dense

        extra = list(overrides)
        if model:
            extra.append(f"backbone.model={model}")
        if layers:
            extra.append(f"backbone.layers=[{', '.join(layers)}]")
        if timesteps:
            extra.append(f"backbone.timesteps=[{', '.join(map(str, timesteps))}]")
        if device:
            extra.append(f"train.device={device}")
        if val:
            extra.append(f"data.val={val}")
        cfg = load_train_config(task, config_file, extra)
        result = train_dense(task, data, out, cfg, overwrite=overwrite, echo=click.echo)
        if dist_info().is_main:  # under torchrun every rank gets here
            click.echo(f"checkpoint: {result['checkpoint']}")

    return cmd


TRAIN_COMMANDS = [_train_command(_task) for _task in ("seg", "depth", "edges")]


# --------------------------------------------------------------------------- predict
def _pred_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder."),
        click.option("-b", "--batch-size", type=int, default=4, show_default=True, help="Images per batch."),
        click.option("--sliding-window", is_flag=True, help="Overlapping windows at the training size (large images)."),
        click.option("--overlap", type=float, default=1 / 3, show_default=True, help="Window overlap fraction."),
        click.option("--overwrite", is_flag=True, help="Recompute outputs that already exist."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _device_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--head", "head_path", type=click.Path(path_type=Path), required=True, help="Head checkpoint folder."),
        click.option("-m", "--model", default=None, help="Check the checkpoint was trained on this model."),
        click.option("-l", "--layer", "layers", multiple=True, help="Check the checkpoint's layers."),
        click.option("-t", "--timestep", "timesteps", multiple=True, type=int, help="Check the checkpoint's timesteps."),
        click.option("--device", default=None), click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None),
        click.option("--max-batch", type=int, default=16, show_default=True), click.option("--compile", "compile_", is_flag=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _expect(model: str | None, layers: tuple[str, ...], timesteps: tuple[int, ...]) -> dict[str, Any]:
    import os

    exp: dict[str, Any] = {}
    if model:
        exp["preset"] = os.path.abspath(model) if os.path.isdir(model) else model
    if layers:
        exp["layers"] = list(layers)
    if timesteps:
        exp["timesteps"] = list(timesteps)
    return exp


_PRED_CMD = {"seg": "segment", "depth": "depth", "edges": "edges"}


class _SetupFailed(Exception):
    """A predictor that could not be built: ends the run instead of failing image by image."""


def _checked_config(task: str, head_path: Path, model: str | None, layers: tuple[str, ...],
                    timesteps: tuple[int, ...]) -> dict[str, Any]:
    """The checkpoint's config, checked against the task and any -m/-l/-t given (cheap: no model)."""
    from difffeat.heads import read_config
    from difffeat.heads.checkpoint import check_backbone

    config = read_config(head_path)
    check_backbone(config, _expect(model, layers, timesteps), where=str(head_path))
    if config.get("task") != task:
        raise BadInputError(f"{head_path} is a {config.get('task')!r} head; use `difffeat {_PRED_CMD.get(config.get('task'), 'eval')}`")
    return config


def _run_predictions(make: Callable[[], Any], images: Path, out_dir: Path, batch_size: int, sliding: bool,
                     overlap: float, overwrite: bool, write: Callable[[Any, Any, torch.Tensor], None]) -> None:
    """Predict every unfinished image; the model is only loaded if some image needs it."""
    from difffeat.errors import DiffFeatError
    from difffeat.pipeline import run_folder

    holder: list[Any] = []

    def process(items: list[Any]) -> None:
        if not holder:
            try:
                holder.append(make())
            except DiffFeatError as e:
                raise _SetupFailed(e) from None
        p = holder[0]
        maps = [p.predict_sliding(it.image, overlap, batch_size) for it in items] if sliding else p.predict([it.image for it in items])
        for it, m in zip(items, maps):
            if not it.written:
                write(p, it, m)

    try:
        run = run_folder(images, out_dir, ".png", process, batch_size=batch_size, overwrite=overwrite, desc="images")
    except _SetupFailed as e:
        raise e.args[0] from None
    click.echo(f"wrote {run.done} image(s) to {out_dir}" + (f", skipped {run.skipped} finished" if run.skipped else ""))


def _maker(head_path: Path, device: str | None, dtype: str | None, max_batch: int, compile_: bool) -> Callable[[], Any]:
    from .dense_predict import DensePredictor

    return lambda: DensePredictor.from_checkpoint(head_path, None, device, dtype, max_batch, compile_)


@click.command("segment")
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--head", "head_path", type=click.Path(path_type=Path), default=None, help="Segmentation head checkpoint folder.")
@click.option("--zero-shot", "zero_shot", type=int, default=None, metavar="K", help="Unsupervised: K-means with K segments (no head).")
@click.option("--diffseg", is_flag=True, help="Unsupervised: DiffSeg self-attention merging (preset 'diffseg'; no head, no K).")
@click.option("--kl-threshold", type=float, default=None, help="DiffSeg merging threshold tau (default: the preset's 1.1).")
@click.option("--anchors", type=click.IntRange(min=2), default=None, help="DiffSeg anchor grid side (default 16).")
@click.option("--refine", is_flag=True, default=None, help="DiffSeg: the release's optional K-means refinement.")
@click.option("--kl-precision", type=click.Choice(["release-fp16", "fp32"]), default=None,
              help="DiffSeg first-merge precision (default: the preset's release-fp16, as the published numbers).")
@model_options
@_pred_options
def segment_cmd(images: Path, head_path: Path | None, zero_shot: int | None, diffseg: bool, kl_threshold: float | None,
                kl_precision: str | None,
                anchors: int | None, refine: bool | None, out_dir: Path, batch_size: int,
                sliding_window: bool, overlap: float, overwrite: bool, **opts: Any) -> None:
    """Segment every image under IMAGES: indexed PNG masks + colour overlays (original resolution)."""
    from .dense_predict import final_prediction, seg_palette, write_seg

    if sum((head_path is not None, zero_shot is not None, diffseg)) != 1:
        raise BadInputError("give exactly one of --head CKPT, --zero-shot K or --diffseg")
    if zero_shot is not None:
        _zero_shot(images, zero_shot, out_dir, batch_size, overwrite, opts)
        return
    if diffseg:
        _diffseg(images, out_dir, batch_size, overwrite, opts, kl_threshold, anchors, refine, kl_precision)
        return
    given = [k for k in ("ensemble", "prompt", "noise", "resolution", "resize") if opts.get(k) is not None]
    if given:
        raise BadInputError(f"--{given[0]} comes from the checkpoint with --head; drop it")
    config = _checked_config("seg", head_path, opts["model"], opts["layers"], opts["timesteps"])
    n = len(config.get("classes") or []) or int(config["head"]["args"].get("num_classes") or 0)
    palette = seg_palette(config, n)

    def write(p: Any, it: Any, logits: torch.Tensor) -> None:
        write_seg(it.out, final_prediction("seg", logits).numpy(), it.image, palette)

    _run_predictions(_maker(head_path, opts["device"], opts["dtype"], opts["max_batch"], opts["compile_"]),
                     images, out_dir, batch_size, sliding_window, overlap, overwrite, write)


def _zero_shot(images: Path, k: int, out_dir: Path, batch_size: int, overwrite: bool, opts: dict[str, Any]) -> None:
    from difffeat.heads.kmeans_seg import kmeans_segment
    from difffeat.pipeline import group_by_size, run_folder

    from .dense_data import default_palette
    from .dense_predict import write_seg

    if k < 2:
        raise BadInputError(f"--zero-shot needs K >= 2 segments, got {k}")
    ex = extractor_from_options(**opts)
    info = [f for f in ex.feature_info if f.get("kind", "feature") == "feature"]
    palette = default_palette(k)

    def process(items: list[Any]) -> None:
        for its, x in group_by_size(items, lambda im: ex.prepare([im])[0]):
            feats = ex(x)
            for i, it in enumerate(its):
                if it.written:
                    continue
                one = {f["name"]: feats[f["name"]][i : i + 1] for f in info}
                seg = kmeans_segment(one, info, k, out_size=(it.image.size[1], it.image.size[0]), seed=opts["seed"])
                write_seg(it.out, seg[0].cpu().numpy(), it.image, palette)

    run = run_folder(images, out_dir, ".png", process, batch_size=batch_size, overwrite=overwrite, desc="images")
    click.echo(f"wrote {run.done} K-means segmentation(s) (K={k}) to {out_dir}")


def _diffseg(images: Path, out_dir: Path, batch_size: int, overwrite: bool, opts: dict[str, Any],
             kl_threshold: float | None, anchors: int | None, refine: bool | None, kl_precision: str | None = None) -> None:
    from difffeat.heads.diffseg import diffseg_segment, self_attention_layers
    from difffeat.io import centre_square
    from difffeat.pipeline import group_by_size, run_folder
    from difffeat.registry import get_preset

    from .dense_data import default_palette
    from .dense_predict import write_seg

    preset = get_preset("diffseg")
    cfg = dict(preset.raw.get("diffseg") or {})
    if opts.get("model") is None:  # the paper's protocol, with any option given on top
        opts = dict(opts, model="diffseg")
    elif not opts.get("layers"):
        from difffeat.backbone import load_backbone

        bb = load_backbone(opts["model"], dtype=opts.get("dtype"), device=opts.get("device"))
        opts = dict(opts, layers=tuple(f"attn.self.{n}" for n in self_attention_layers(bb.denoiser)))
        opts.setdefault("timesteps", ())
        if not opts["timesteps"]:
            opts["timesteps"] = tuple(preset.extract["timesteps"])
        for key in ("noise", "resize"):  # the release: clean latent, centre crop
            opts[key] = opts.get(key) or preset.extract[key]
    if any(not name.startswith("attn.self.") for name in opts.get("layers") or ()):
        raise BadInputError("--diffseg reads self-attention maps: give layers as attn.self.LAYER (or none for all)")
    ex = extractor_from_options(**opts)
    tau = kl_threshold if kl_threshold is not None else float(cfg.get("kl_threshold", 1.1))
    side = anchors or int(cfg.get("anchors", 16))
    precision = kl_precision or str(cfg.get("kl_precision", "fp32"))
    palette = default_palette(256)

    def process(items: list[Any]) -> None:
        for its, x in group_by_size(items, lambda im: ex.prepare([im])[0]):
            maps = ex(x)
            for i, it in enumerate(its):
                if it.written:
                    continue
                one = {k: v[i : i + 1] for k, v in maps.items()}
                box = centre_square(*it.image.size) if ex.resize == "crop" else (0, 0, *it.image.size)
                seg = diffseg_segment(one, out_size=(box[3] - box[1], box[2] - box[0]), tau=tau,
                                      iterations=int(cfg.get("iterations", 3)), points=side,
                                      refine_kmeans=bool(cfg.get("refine", False) if refine is None else refine),
                                      kl_precision=precision)[0]
                labels = np.full((it.image.size[1], it.image.size[0]), 255, dtype=np.int64)  # 255: outside the crop
                labels[box[1]:box[3], box[0]:box[2]] = seg.cpu().numpy()
                write_seg(it.out, labels, it.image, palette)

    run = run_folder(images, out_dir, ".png", process, batch_size=batch_size, overwrite=overwrite, desc="images")
    click.echo(f"wrote {run.done} DiffSeg segmentation(s) (tau={tau}, {side}x{side} anchors, {precision} merge) to {out_dir}")


@click.command("depth")
@click.argument("images", type=click.Path(path_type=Path))
@_device_options
@_pred_options
def depth_cmd(images: Path, head_path: Path, model: str | None, layers: tuple[str, ...], timesteps: tuple[int, ...],
              device: str | None, dtype: str | None, max_batch: int, compile_: bool, out_dir: Path, batch_size: int,
              sliding_window: bool, overlap: float, overwrite: bool) -> None:
    """Predict depth for every image under IMAGES: 16-bit PNG (+ _color.png), original resolution.

    Metric heads write metres x the training depth_scale (1000: millimetres); relative heads
    write the per-image min-max range scaled to 0..65535.
    """
    from .dense_predict import final_prediction, is_relative_depth, train_config_of, write_depth

    config = _checked_config("depth", head_path, model, layers, timesteps)
    cfg = train_config_of(config)
    scale = float(cfg.get("data", {}).get("depth_scale", 1000.0))
    relative = is_relative_depth(cfg)

    def write(p: Any, it: Any, depth: torch.Tensor) -> None:
        write_depth(it.out, final_prediction("depth", depth).numpy(), scale, relative)

    _run_predictions(_maker(head_path, device, dtype, max_batch, compile_), images, out_dir, batch_size,
                     sliding_window, overlap, overwrite, write)


@click.command("edges")
@click.argument("images", type=click.Path(path_type=Path))
@_device_options
@_pred_options
@click.option("--nms", is_flag=True, help="Non-maximum suppression along the edge normal (crisp edges).")
@click.option("--thin", "thin_threshold", type=float, default=None, help="Write binary edges: threshold, then thin to 1 px.")
def edges_cmd(images: Path, head_path: Path, model: str | None, layers: tuple[str, ...], timesteps: tuple[int, ...],
              device: str | None, dtype: str | None, max_batch: int, compile_: bool, out_dir: Path, batch_size: int,
              sliding_window: bool, overlap: float, overwrite: bool, nms: bool, thin_threshold: float | None) -> None:
    """Predict edges for every image under IMAGES: probability PNG at original resolution."""
    from .dense_predict import final_prediction, write_edges

    _checked_config("edges", head_path, model, layers, timesteps)

    def write(p: Any, it: Any, logits: torch.Tensor) -> None:
        write_edges(it.out, final_prediction("edges", logits).numpy(), nms=nms, thin_threshold=thin_threshold)

    _run_predictions(_maker(head_path, device, dtype, max_batch, compile_), images, out_dir, batch_size,
                     sliding_window, overlap, overwrite, write)


# --------------------------------------------------------------------------- eval
def _eval_command(task: str) -> click.Command:
    @click.command(task, help=f"Score {TASK_TITLES[task]} on the labelled folder DATA, with a head (--head) "
                        "or saved predictions (--pred, files named like the labels).")
    @click.argument("data", type=click.Path(path_type=Path))
    @click.option("--head", "head_path", type=click.Path(path_type=Path), default=None, help="Head checkpoint folder.")
    @click.option("--pred", "pred_dir", type=click.Path(path_type=Path), default=None, help="Folder of saved predictions.")
    @click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Also write the metrics as JSON.")
    @click.option("--sliding-window", is_flag=True)
    @click.option("--classes", "classes_file", type=click.Path(path_type=Path), default=None, help="seg: classes.txt.")
    @click.option("--reduce-zero-label", is_flag=True, help="seg: label 0 = ignore, k = class k-1 (ADE20K).")
    @click.option("--depth-scale", type=float, default=1000.0, show_default=True, help="depth: 16-bit PNG value per metre.")
    @click.option("--min-depth", type=float, default=1e-3, show_default=True)
    @click.option("--max-depth", type=float, default=None, help="depth: evaluate gt < max-depth (NYU: 10, KITTI: 80).")
    @click.option("--align", type=click.Choice(["scale_shift", "scale"]), default=None, help="depth: per-image alignment (relative depth).")
    @click.option("--thresholds", type=int, default=99, show_default=True, help="edges: number of thresholds.")
    @click.option("--max-dist", type=float, default=0.0075, show_default=True, help="edges: match tolerance / image diagonal.")
    @click.option("--device", default=None)
    @click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None)
    def cmd(data: Path, head_path: Path | None, pred_dir: Path | None, out: Path | None, sliding_window: bool,
            classes_file: Path | None, reduce_zero_label: bool, depth_scale: float, min_depth: float,
            max_depth: float | None, align: str | None, thresholds: int, max_dist: float, device: str | None,
            dtype: str | None) -> None:
        from .dense_data import DenseFolder
        from .dense_predict import DensePredictor, evaluate, format_metrics

        if (head_path is None) == (pred_dir is None):
            raise BadInputError("give exactly one of --head CKPT or --pred DIR")
        predict = None
        classes = classes_file
        if head_path is not None:
            p = DensePredictor.from_checkpoint(head_path, device=device, dtype=dtype)
            if p.task != task:
                raise BadInputError(f"{head_path} is a {p.task!r} head, not {task!r}")
            classes = classes or p.loaded.classes  # type: ignore[assignment]
            if task == "depth":
                depth_scale = float(p.config.get("data", {}).get("depth_scale", depth_scale))

            def predict(item: dict[str, Any], image: Any) -> torch.Tensor:
                return p.predict_sliding(image) if sliding_window else p.predict([image])[0]
        elif not pred_dir.is_dir():  # type: ignore[union-attr]
            raise BadInputError(f"prediction folder not found: {pred_dir}")
        ds = DenseFolder(data, task, classes=classes, depth_scale=depth_scale, reduce_zero_label=reduce_zero_label)
        metrics = evaluate(task, ds, predict=predict, pred_dir=pred_dir, depth_scale=depth_scale,
                           num_classes=ds.num_classes, class_names=ds.classes, min_depth=min_depth, max_depth=max_depth,
                           align=align, thresholds=thresholds, max_dist=max_dist)
        if task == "seg":
            click.echo(f"{'class':<24} {'IoU':>7} {'Acc':>7}")
            for name, iou in metrics["IoU"].items():
                acc = metrics["Acc"][name]
                click.echo(f"{name:<24} {iou:>7.2f} {acc:>7.2f}" if np.isfinite(iou) else f"{name:<24} {'nan':>7} {'nan':>7}")
        click.echo(f"{len(ds)} images: {format_metrics(task, metrics)}")
        if out is not None:
            save_json(out, metrics)

    return cmd


EVAL_COMMANDS = [_eval_command(_task) for _task in ("seg", "depth", "edges")]
