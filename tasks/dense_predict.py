"""Inference with trained dense heads, output files, and evaluation against labelled folders.

* :class:`DensePredictor` runs extractor + head and returns maps at the **original image
  resolution**: whole-image mode (the image resized to the training resolution, outputs
  resized back, batched) or sliding-window mode (the image scaled so its shorter side is
  the training resolution, overlapping square windows averaged, as mmseg's ``slide``
  inference), for images much larger than the training size.
* ``write_*`` turn maps into files: seg -> indexed PNG (+ colour overlay), depth -> 16-bit
  PNG (+ colour-mapped PNG), edges -> probability PNG (optionally NMS'd, or thinned binary).
* :func:`evaluate` scores a head (in memory) or saved predictions against a labelled folder
  with :mod:`difffeat.tasks.dense_metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from difffeat.errors import BadInputError
from difffeat.heads import LoadedHead, load_head
from difffeat.heads.blocks import resize
from difffeat.io import atomic_path, load_image, pil_to_tensor, prepare_image, save_png

from .dense_data import IGNORE_INDEX, DenseFolder, default_palette, load_depth, load_edges, load_mask
from .dense_metrics import DepthMetric, EdgeMetric, SegMetric
from .edge_ops import edge_nms, thin

TASK_NAMES = {"seg": "segmentation", "depth": "depth", "edges": "edges"}


# --------------------------------------------------------------------------- head outputs
def head_outputs(head: torch.nn.Module, feats: Mapping[str, torch.Tensor], out_size: Sequence[int] | None,
                 task: str, config: Mapping[str, Any], with_sides: bool = False) -> Any:
    """The task's map from a head: seg logits, depth (metres or relative), edge logits.

    ``with_sides`` (edges + HED head): also return the side outputs for deep supervision.
    A probe head on metric depth predicts log-depth (exp is applied here).
    """
    kind = config["head"]["kind"]
    size = None if out_size is None else tuple(int(s) for s in out_size)
    if task == "edges" and kind == "hed":
        fused, sides = head(feats, size, return_sides=True)
        return (fused, sides) if with_sides else fused
    out = head(feats, size)
    if task == "depth" and kind == "probe" and config.get("loss", {}).get("kind", "silog") == "silog":
        out = torch.exp(out.float().clamp(max=20.0))
    return (out, []) if with_sides else out


def train_config_of(checkpoint_config: Mapping[str, Any]) -> dict[str, Any]:
    """The training config stored in a checkpoint (or a minimal one naming its head)."""
    return checkpoint_config.get("extra", {}).get("train_config") or {"head": checkpoint_config["head"]}


def is_relative_depth(config: Mapping[str, Any]) -> bool:
    return config.get("loss", {}).get("kind") == "ssi" or config["head"].get("args", {}).get("mode") == "relative"


def autocast(device: torch.device, enabled: bool = True) -> Any:
    """bf16 autocast on CUDA (AMP), a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def extractor_for(record: Mapping[str, Any], device: str | None = None, dtype: str | None = None,
                  max_batch: int = 16, compile: bool = False) -> Any:
    """The feature extractor a head was trained on, from its checkpoint's backbone record
    (its whole ``ex.config``; checkpoints older than that record only the main settings)."""
    from difffeat.factory import create
    from difffeat.heads.checkpoint import rebuild_extractor

    if record.get("extractor"):
        return rebuild_extractor(record, device=device, dtype=dtype, max_batch=max_batch, compile=compile)

    kw = {k: record[k] for k in ("layers", "timesteps", "ensemble", "noise", "seed", "prompt", "resolution") if record.get(k) is not None}
    if "timesteps" in kw and not kw["timesteps"]:
        kw.pop("timesteps")
    return create(record["preset"], resize="resize", dtype=dtype, device=device, max_batch=max_batch, compile=compile, **kw)


def size_multiple(ex: Any) -> int:
    """Input sizes the extractor accepts are multiples of this (its geometry's multiple)."""
    return int(ex.geometry.multiple)


def extractor_device(ex: Any) -> torch.device:
    return torch.device(ex.device)


# --------------------------------------------------------------------------- predictor
@dataclass
class DensePredictor:
    """A checkpoint's head with its extractor; maps come back at original resolution."""

    loaded: LoadedHead
    ex: Any
    amp: bool = True

    @classmethod
    def from_checkpoint(cls, path: str | Path, expect_backbone: Mapping[str, Any] | None = None, device: str | None = None,
                        dtype: str | None = None, max_batch: int = 16, compile: bool = False) -> "DensePredictor":
        from difffeat.heads import read_config
        from difffeat.heads.checkpoint import check_backbone

        config = read_config(path)
        if expect_backbone:
            check_backbone(config, expect_backbone, where=str(path))
        ex = extractor_for(config["backbone"], device, dtype, max_batch, compile)
        loaded = load_head(path, expect_backbone={"feature_info": ex.feature_info}, device=extractor_device(ex))
        return cls(loaded, ex)

    @property
    def task(self) -> str:
        return str(self.loaded.task)

    @property
    def config(self) -> dict[str, Any]:
        return train_config_of(self.loaded.config)

    @property
    def resolution(self) -> int:
        size = self.loaded.config.get("image_size")
        if size is None:
            raise BadInputError("head checkpoint records no image_size")
        return int(size if isinstance(size, int) else size[0])

    def _head(self, x: torch.Tensor, out_size: Sequence[int] | None) -> torch.Tensor:
        feats = self.ex(x)
        device = extractor_device(self.ex)
        with torch.no_grad(), autocast(device, self.amp):
            out = head_outputs(self.loaded.head, feats, out_size, self.task, self.config)
        return out.float()

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Whole-image maps ``[C, H, W]`` (per image original size), batched over ``images``."""
        r, m = self.resolution, size_multiple(self.ex)
        x = torch.stack([prepare_image(im, r, "resize", m).image for im in images])
        out = self._head(x, None)
        return [resize(o[None], (im.size[1], im.size[0]))[0].cpu() for o, im in zip(out, images)]

    @torch.no_grad()
    def predict_sliding(self, image: Image.Image, overlap: float = 1 / 3, batch_size: int = 4) -> torch.Tensor:
        """Sliding-window map ``[C, H, W]`` at the image's original size."""
        r, m = self.resolution, size_multiple(self.ex)
        w0, h0 = image.size
        scale = r / min(w0, h0)
        w, h = max(r, round(w0 * scale / m) * m), max(r, round(h0 * scale / m) * m)
        x = pil_to_tensor(image.resize((w, h), Image.BICUBIC))
        step = max(m, int(round(r * (1 - overlap) / m)) * m)
        ys = sorted({min(y, h - r) for y in range(0, h - r + step, step)})
        xs = sorted({min(v, w - r) for v in range(0, w - r + step, step)})
        boxes = [(y, v) for y in ys for v in xs]
        acc, count = None, torch.zeros(1, h, w)
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i : i + batch_size]
            out = self._head(torch.stack([x[:, y : y + r, v : v + r] for y, v in chunk]), (r, r)).cpu()
            if acc is None:
                acc = torch.zeros(out.shape[1], h, w)
            for o, (y, v) in zip(out, chunk):
                acc[:, y : y + r, v : v + r] += o
                count[:, y : y + r, v : v + r] += 1
        return resize((acc / count)[None], (h0, w0))[0]


# --------------------------------------------------------------------------- output files
def seg_palette(config: Mapping[str, Any], n: int) -> list[tuple[int, int, int]]:
    pal = config.get("palette")
    return [tuple(c) for c in pal] if pal and len(pal) >= n else default_palette(max(n, 1))  # type: ignore[misc]


def write_seg(path: Path, labels: np.ndarray, image: Image.Image, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> None:
    """Indexed PNG ``path`` (written last: marks the image done) + ``<stem>_overlay.png``."""
    pal = np.zeros((256, 3), np.uint8)
    pal[: min(256, len(palette))] = np.asarray(palette[:256], np.uint8)
    colour = pal[labels.clip(0, 255)]
    overlay = (np.asarray(image.convert("RGB"), np.float32) * (1 - alpha) + colour * alpha + 0.5).astype(np.uint8)
    save_png(path.with_name(path.stem + "_overlay.png"), overlay)
    mask = Image.fromarray(labels.astype(np.uint8), mode="P")
    mask.putpalette(pal.flatten().tolist())
    with atomic_path(path) as tmp:
        mask.save(tmp, format="PNG")


def write_depth(path: Path, depth: np.ndarray, depth_scale: float, relative: bool) -> dict[str, float]:
    """16-bit PNG (metric: metres x ``depth_scale``; relative: min-max to 0..65535) + ``_color.png``."""
    from difffeat.viz import colormap

    d = depth.astype(np.float64)
    lo, hi = float(d.min()), float(d.max())
    if relative:
        q = (d - lo) / max(hi - lo, 1e-12) * 65535.0
    else:
        q = d * depth_scale
    save_png(path.with_name(path.stem + "_color.png"), colormap(-d))  # near = warm
    save_png(path, np.clip(q + 0.5, 0, 65535).astype(np.uint16))
    return {"min": lo, "max": hi}


def write_edges(path: Path, prob: np.ndarray, nms: bool = False, thin_threshold: float | None = None) -> None:
    """8-bit edge probability PNG; ``nms`` suppresses non-maxima; ``thin_threshold`` writes thinned 0/255."""
    p = edge_nms(prob) if nms else prob
    if thin_threshold is not None:
        p = thin(p >= thin_threshold).astype(np.float32)
    save_png(path, (np.clip(p, 0, 1) * 255 + 0.5).astype(np.uint8))


# --------------------------------------------------------------------------- evaluation
def make_metric(task: str, *, num_classes: int | None = None, class_names: Sequence[str] | None = None,
                ignore_index: int = IGNORE_INDEX, min_depth: float = 1e-3, max_depth: float | None = None,
                align: str | None = None, thresholds: int = 99, max_dist: float = 0.0075) -> Any:
    if task == "seg":
        if not num_classes:
            raise BadInputError("segmentation metrics need the number of classes (classes.txt or the checkpoint)")
        return SegMetric(num_classes, ignore_index, class_names)
    if task == "depth":
        return DepthMetric(min_depth, max_depth, align)
    return EdgeMetric(thresholds, max_dist)


def final_prediction(task: str, out: torch.Tensor) -> torch.Tensor:
    """A head map ``[C, H, W]`` as what is scored and saved: class ids, depth, edge probability."""
    if task == "seg":
        return out.argmax(0)
    return torch.sigmoid(out[0].float()) if task == "edges" else out[0]


def update_metric(metric: Any, task: str, pred: torch.Tensor, item: Mapping[str, Any]) -> None:
    """Add one final prediction (class ids, depth, edge probabilities; ``[H, W]``) for a dataset item."""
    target = item["target"]
    pred = pred.reshape(target.shape).cpu()
    if task == "edges":
        metric.update(pred.numpy(), item.get("annotations", target).numpy())
    else:
        metric.update(pred, target)


def evaluate(
    task: str,
    dataset: DenseFolder,
    predict: Callable[[dict[str, Any], Image.Image], torch.Tensor] | None = None,
    pred_dir: Path | None = None,
    depth_scale: float = 1000.0,
    **metric_kw: Any,
) -> dict[str, Any]:
    """Score head maps ``predict(item, image)`` (in memory) or files in ``pred_dir`` on ``dataset``."""
    from difffeat.distributed import progress_bar

    metric = make_metric(task, **metric_kw)
    missing = []

    bar = progress_bar(len(dataset), "eval")
    for i in range(len(dataset)):
        bar.update(1)
        item = dataset.labels(i)
        if predict is not None:
            pred = final_prediction(task, predict(item, load_image(dataset.samples[i].image)))
        else:
            pred = _read_prediction(task, pred_dir, item["name"], depth_scale)  # type: ignore[arg-type]
            if pred is None:
                missing.append(item["name"])
                continue
            if tuple(pred.shape[-2:]) != tuple(item["target"].shape[-2:]):
                raise BadInputError(f"prediction for {item['name']} is {tuple(pred.shape[-2:])}, label is {tuple(item['target'].shape[-2:])}")
        update_metric(metric, task, pred, item)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise BadInputError(f"{len(missing)} prediction(s) missing in {pred_dir}: {', '.join(missing[:5])}{more}")
    return metric.compute()


def _read_prediction(task: str, pred_dir: Path, name: str, depth_scale: float) -> torch.Tensor | None:
    for suffix in (".png", ".npy"):
        path = pred_dir / f"{name}{suffix}"
        if path.exists():
            break
    else:
        return None
    if task == "seg":
        return torch.from_numpy(load_mask(path))
    if task == "depth":
        return torch.from_numpy(load_depth(path, depth_scale))
    e = load_edges(path)
    return torch.from_numpy(e if e.ndim == 2 else e.mean(0))


def format_metrics(task: str, m: Mapping[str, Any]) -> str:
    """One summary line (per-class IoU is printed separately by the CLI)."""
    if task == "seg":
        return f"mIoU {m['mIoU']:.2f}  aAcc {m['aAcc']:.2f}  mAcc {m['mAcc']:.2f}"
    if task == "depth":
        return ("AbsRel {abs_rel:.4f}  RMSE {rmse:.4f}  d1 {d1:.4f}  d2 {d2:.4f}  d3 {d3:.4f}  "
                "SqRel {sq_rel:.4f}  RMSElog {rmse_log:.4f}  log10 {log10:.4f}").format(**m)
    return f"ODS {m['ODS']:.4f}  OIS {m['OIS']:.4f}  AP {m['AP']:.4f}"

