"""The dense tasks as a table: one :class:`DenseTask` record per task, in :data:`TASKS`.

Everything that differs between semantic segmentation, depth and edges lives in its record:
where labels are found and how they are read, which heads train it, its loss and the share
of a batch that loss averages over, how targets are resized, how a head's map becomes the
prediction, its metric and summary line, and how predictions are written. The labelled
folders (:mod:`.dense_data`), training (:mod:`.dense_train`), prediction and evaluation
(:mod:`.dense_predict`, :mod:`.dense`) and the CLI look the task up here and branch on
nothing else. A new dense task is therefore one :func:`register` call, its packaged
defaults ``configs/train/NAME.yaml`` (or ``config=``) and, if no head of
:data:`difffeat.heads.HEADS` fits, a head: at most three files
(``tests/test_dense_tasks.py`` registers surface normals in a test to show it).

DiffSeg and K-means (``difffeat segment --diffseg / --zero-shot``) are not rows: they train
nothing and have no head, so none of the fields below applies to them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from difffeat.errors import BadInputError, one_of
from difffeat.heads import class_balanced_bce, hed_loss, silog_loss, ssi_l1_loss
from difffeat.options import option

from .dense_io import IGNORE_INDEX, load_depth, load_edges, load_mask, seg_palette, write_depth, write_edges, write_seg
from .dense_metrics import DepthMetric, EdgeMetric, SegMetric

# the head argument that sets a head's output channels (other heads have one output)
OUTPUT_ARGS = {"probe": "num_outputs", "fpn": "num_classes"}


@dataclass(frozen=True)
class LabelSettings:
    """How a folder's labels are read (from the training config or the eval flags)."""

    depth_scale: float = 1000.0  # 16-bit depth PNG value per metre
    ignore_index: int = IGNORE_INDEX
    reduce_zero_label: bool = False  # class labels: 0 = ignore, k = class k-1 (ADE20K)
    palette: Sequence[Sequence[int]] | None = None  # class labels: RGB mask colours


@dataclass(frozen=True)
class MetricSettings:
    """What the metrics of the tasks take; each task's metric reads the fields it needs."""

    num_classes: int | None = None
    class_names: Sequence[str] | None = None
    ignore_index: int = IGNORE_INDEX
    min_depth: float = 1e-3
    max_depth: float | None = None
    align: str | None = None
    thresholds: int = 99
    max_dist: float = 0.0075

    @classmethod
    def from_config(cls, data: Mapping[str, Any], num_classes: int | None = None,
                    class_names: Sequence[str] | None = None) -> "MetricSettings":
        """The settings of a training config's ``data`` section (validation during training)."""
        return cls(num_classes, class_names, int(data.get("ignore_index", IGNORE_INDEX)),
                   float(data.get("min_depth", 1e-3)), data.get("max_depth"), data.get("align"),
                   int(data.get("thresholds", 99)), float(data.get("max_dist", 0.0075)))


Config = Mapping[str, Any]
Writer = Callable[[Path, np.ndarray, Image.Image], None]  # (output file, final prediction, the image)


def _same(out: torch.Tensor, config: Config) -> torch.Tensor:
    return out


def _one_output(dataset: Any) -> int:
    return 1


def _update(metric: Any, pred: torch.Tensor, item: Mapping[str, Any]) -> None:
    metric.update(pred, item["target"])


def _no_details(metrics: Mapping[str, Any]) -> list[str]:
    return []


@dataclass(frozen=True, kw_only=True)
class DenseTask:
    """One dense task: what train, predict and eval do differently for it."""

    name: str  # the train/eval subcommand and the checkpoint's ``task``
    title: str  # "semantic segmentation", for help texts
    command: str  # the prediction command ("segment")
    predict_help: str  # that command's help
    heads: tuple[str, ...]  # head kinds `difffeat train` builds (the packaged default first)
    # labels
    label_dirs: tuple[str, ...]  # label folders looked for under DATA, in order
    label_exts: tuple[str, ...]
    label_name: str  # one label in messages ("mask")
    read_label: Callable[[Path, LabelSettings], np.ndarray]  # also reads saved predictions (`eval --pred`)
    targets: Callable[[np.ndarray, LabelSettings], dict[str, torch.Tensor]]  # {"target"[, "annotations"]}
    classes: bool = False  # labels are class ids: classes.txt, id checks, the ignore index pads
    resize: str = "nearest"  # how targets are resized (nearest keeps ids and invalid pixels)
    # training: loss(cfg, prediction, side outputs, target, ignore index) at target size
    loss: Callable[[Config, torch.Tensor, Sequence[torch.Tensor], torch.Tensor, int], torch.Tensor]
    loss_weight: Callable[[Config, torch.Tensor, int], float]  # what the loss averages over in a target
    outputs: Callable[[Any], int | None] = _one_output  # output channels, from the training DenseFolder
    side_outputs: tuple[str, ...] = ()  # head kinds whose side outputs the loss supervises
    # prediction
    decode: Callable[[torch.Tensor, Config], torch.Tensor] = _same  # head map -> task map (train config)
    predict: Callable[[torch.Tensor], torch.Tensor]  # task map [C, H, W] -> what is scored and saved
    writer: Callable[[Config, Any], Writer]  # (checkpoint config, write_options instance) -> writer
    write_options: type | None = None  # the prediction command's own flags (a dataclass of options)
    # evaluation
    metric: Callable[[MetricSettings], Any]
    score: Callable[[Any, torch.Tensor, Mapping[str, Any]], None] = _update  # add a prediction of an item
    summary: Callable[[Mapping[str, Any]], str]  # one line
    details: Callable[[Mapping[str, Any]], list[str]] = _no_details  # lines `eval` prints above it
    config: Mapping[str, Any] | None = None  # the training defaults (None: configs/train/NAME.yaml)

    def default_config(self, config_dir: Path) -> dict[str, Any]:
        """The training defaults: ``config``, else ``config_dir/NAME.yaml``."""
        if self.config is not None:
            return copy.deepcopy(dict(self.config))
        from difffeat.registry import read_yaml

        return read_yaml(config_dir / f"{self.name}.yaml")


TASKS: dict[str, DenseTask] = {}


def register(task: DenseTask) -> DenseTask:
    """Add (or replace) a dense task; train, predict and eval then know it."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> DenseTask:
    """The record of task ``name`` (an 'unknown task' error listing the valid ones)."""
    if name not in TASKS:
        raise one_of("task", name, list(TASKS))
    return TASKS[name]


def train_config_of(checkpoint_config: Mapping[str, Any]) -> dict[str, Any]:
    """The training config stored in a checkpoint (or a minimal one naming its head)."""
    return checkpoint_config.get("extra", {}).get("train_config") or {"head": checkpoint_config["head"]}


# --------------------------------------------------------------------------- segmentation
def _class_targets(label: np.ndarray, s: LabelSettings) -> dict[str, torch.Tensor]:
    target = torch.from_numpy(label.astype(np.int64))
    if s.reduce_zero_label:
        target = torch.where((target == 0) | (target == s.ignore_index), s.ignore_index, target - 1)
    return {"target": target}


def _seg_metric(s: MetricSettings) -> SegMetric:
    if not s.num_classes:
        raise BadInputError("segmentation metrics need the number of classes (classes.txt or the checkpoint)")
    return SegMetric(s.num_classes, s.ignore_index, s.class_names)


def _seg_writer(config: Config, options: Any) -> Writer:
    n = len(config.get("classes") or []) or int(config["head"]["args"].get("num_classes") or 0)
    palette = seg_palette(config, n)
    return lambda path, labels, image: write_seg(path, labels, image, palette)


def _seg_details(m: Mapping[str, Any]) -> list[str]:
    """The per-class table of ``eval seg``."""
    lines = [f"{'class':<24} {'IoU':>7} {'Acc':>7}"]
    for name, iou in m["IoU"].items():
        acc = m["Acc"][name]
        lines.append(f"{name:<24} {iou:>7.2f} {acc:>7.2f}" if np.isfinite(iou) else f"{name:<24} {'nan':>7} {'nan':>7}")
    return lines


SEG = register(DenseTask(
    name="seg", title="semantic segmentation", command="segment",
    predict_help="Segment every image under IMAGES: indexed PNG masks + colour overlays (original resolution).",
    heads=("fpn", "probe"), label_dirs=("masks", "labels", "annotations"),
    label_exts=(".png", ".bmp", ".tif", ".tiff"), label_name="mask", classes=True,
    read_label=lambda path, s: load_mask(path, s.palette), targets=_class_targets,
    loss=lambda cfg, pred, sides, target, ignore: F.cross_entropy(pred.float(), target, ignore_index=ignore),
    loss_weight=lambda cfg, target, ignore: float((target != ignore).sum()),  # valid pixels
    outputs=lambda ds: ds.num_classes,
    predict=lambda out: out.argmax(0), writer=_seg_writer, metric=_seg_metric,
    summary=lambda m: f"mIoU {m['mIoU']:.2f}  aAcc {m['aAcc']:.2f}  mAcc {m['mAcc']:.2f}", details=_seg_details,
))


# --------------------------------------------------------------------------- depth
def _map_targets(label: np.ndarray, s: LabelSettings) -> dict[str, torch.Tensor]:
    """A float map; an annotator stack ``[A, H, W]`` is averaged (and kept as ``annotations``)."""
    arr = label.mean(0) if label.ndim == 3 else label
    item = {"target": torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))}
    if label.ndim == 3:
        item["annotations"] = torch.from_numpy(label)
    return item


def _depth_loss_kind(cfg: Config) -> str:
    kind = cfg.get("loss", {}).get("kind", "silog")
    if kind not in ("silog", "ssi"):
        raise BadInputError(f"unknown loss.kind {kind!r}; valid: silog, ssi")
    return kind


def _depth_loss(cfg: Config, pred: torch.Tensor, sides: Sequence[torch.Tensor], target: torch.Tensor,
                ignore: int) -> torch.Tensor:
    """SiLog (metric, VPD/GLPDepth) or MiDaS' trimmed scale-and-shift-invariant L1 (relative)."""
    loss, p = cfg.get("loss", {}), pred.float().squeeze(1)
    if _depth_loss_kind(cfg) == "ssi":
        return ssi_l1_loss(p, target, trim=float(loss.get("trim", 0.0)))
    return silog_loss(p, target, lambd=float(loss.get("lambd", 0.5)), scale=float(loss.get("scale", 1.0)))


def _depth_loss_weight(cfg: Config, target: torch.Tensor, ignore: int) -> float:
    """Valid pixels for SILog, images with >= 2 valid pixels for SSI."""
    valid = target > 0
    if cfg.get("loss", {}).get("kind", "silog") == "ssi":
        return float((valid.flatten(1).sum(1) >= 2).sum())
    return float(valid.sum())


def _depth_decode(out: torch.Tensor, config: Config) -> torch.Tensor:
    """A probe on metric depth predicts log-depth: exp is applied here."""
    if config["head"]["kind"] == "probe" and config.get("loss", {}).get("kind", "silog") == "silog":
        return torch.exp(out.float().clamp(max=20.0))
    return out


def is_relative_depth(config: Mapping[str, Any]) -> bool:
    """Whether a training config trains relative (scale-and-shift-free) depth."""
    return config.get("loss", {}).get("kind") == "ssi" or config["head"].get("args", {}).get("mode") == "relative"


def _depth_writer(config: Config, options: Any) -> Writer:
    cfg = train_config_of(config)
    scale, relative = float(cfg.get("data", {}).get("depth_scale", 1000.0)), is_relative_depth(cfg)
    return lambda path, depth, image: write_depth(path, depth, scale, relative)


DEPTH = register(DenseTask(
    name="depth", title="monocular depth", command="depth",
    predict_help="Predict depth for every image under IMAGES: 16-bit PNG (+ _color.png), original resolution.\n\n"
                 "Metric heads write metres x the training depth_scale (1000: millimetres); relative heads "
                 "write the per-image min-max range scaled to 0..65535.",
    heads=("depth", "probe"), label_dirs=("depth", "depths"), label_exts=(".png", ".tif", ".tiff", ".npy", ".exr"),
    label_name="depth map", read_label=lambda path, s: load_depth(path, s.depth_scale), targets=_map_targets,
    loss=_depth_loss, loss_weight=_depth_loss_weight, decode=_depth_decode,
    predict=lambda out: out[0], writer=_depth_writer,
    metric=lambda s: DepthMetric(s.min_depth, s.max_depth, s.align),
    summary=lambda m: ("AbsRel {abs_rel:.4f}  RMSE {rmse:.4f}  d1 {d1:.4f}  d2 {d2:.4f}  d3 {d3:.4f}  "
                       "SqRel {sq_rel:.4f}  RMSElog {rmse_log:.4f}  log10 {log10:.4f}").format(**m),
))


# --------------------------------------------------------------------------- edges
@dataclass
class EdgeWriteOptions:
    """The flags of ``difffeat edges``: how probabilities become the written map."""

    nms: bool = option(False, "Non-maximum suppression along the edge normal (crisp edges).", is_flag=True)
    thin_threshold: float | None = option(None, "Write binary edges: threshold, then thin to 1 px.", "--thin",
                                          type=float)


def _edge_loss(cfg: Config, pred: torch.Tensor, sides: Sequence[torch.Tensor], target: torch.Tensor,
               ignore: int) -> torch.Tensor:
    """HED's class-balanced BCE on the fused map and every side output (Xie & Tu 2015)."""
    t = target.unsqueeze(1)
    return hed_loss(pred.float(), [s.float() for s in sides], t) if sides else class_balanced_bce(pred.float(), t)


def _edge_writer(config: Config, options: EdgeWriteOptions | None) -> Writer:
    o = options or EdgeWriteOptions()
    return lambda path, prob, image: write_edges(path, prob, nms=o.nms, thin_threshold=o.thin_threshold)


def _edge_score(metric: Any, pred: torch.Tensor, item: Mapping[str, Any]) -> None:
    metric.update(pred.numpy(), item.get("annotations", item["target"]).numpy())  # every annotator


EDGES = register(DenseTask(
    name="edges", title="edge detection", command="edges",
    predict_help="Predict edges for every image under IMAGES: probability PNG at original resolution.",
    heads=("hed", "probe"), label_dirs=("edges", "boundaries"),
    label_exts=(".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy"), label_name="edge map",
    read_label=lambda path, s: load_edges(path), targets=_map_targets, resize="bilinear",  # soft edges
    loss=_edge_loss, loss_weight=lambda cfg, target, ignore: float(target.shape[0]), side_outputs=("hed",),
    predict=lambda out: torch.sigmoid(out[0].float()), writer=_edge_writer, write_options=EdgeWriteOptions,
    metric=lambda s: EdgeMetric(s.thresholds, s.max_dist), score=_edge_score,
    summary=lambda m: f"ODS {m['ODS']:.4f}  OIS {m['OIS']:.4f}  AP {m['AP']:.4f}",
))


__all__ = ["DEPTH", "DenseTask", "EDGES", "EdgeWriteOptions", "LabelSettings", "MetricSettings", "OUTPUT_ARGS",
           "SEG", "TASKS", "get_task", "is_relative_depth", "register", "seg_palette", "train_config_of"]
