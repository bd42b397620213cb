"""Inference with trained dense heads, output files, and evaluation against labelled folders.

* :class:`DensePredictor` runs extractor + head and returns maps at the **original image
  resolution**: whole-image mode (the image resized to the training resolution, outputs
  resized back, batched) or sliding-window mode (the image scaled so its shorter side is
  the training resolution, overlapping square windows averaged, as mmseg's ``slide``
  inference), for images much larger than the training size.
* What a map means, how it is scored and written is the task's record
  (:mod:`difffeat.tasks.dense_tasks`); the writers live in :mod:`.dense_io` (re-exported here).
* :func:`evaluate` scores a head (in memory) or saved predictions against a labelled folder
  with :mod:`difffeat.tasks.dense_metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

from difffeat.errors import BadInputError
from difffeat.heads import LoadedHead, load_head
from difffeat.heads.blocks import resize
from difffeat.io import load_image, pil_to_tensor, prepare_image

from .dense_data import DenseFolder
from .dense_io import IGNORE_INDEX, seg_palette, write_depth, write_edges, write_seg
from .dense_tasks import LabelSettings, MetricSettings, get_task, is_relative_depth, train_config_of

# --------------------------------------------------------------------------- head outputs
def head_outputs(head: torch.nn.Module, feats: Mapping[str, torch.Tensor], out_size: Sequence[int] | None,
                 task: str, config: Mapping[str, Any], with_sides: bool = False) -> Any:
    """The task's map from a head (seg logits, depth, edge logits: the task's ``decode``).

    ``with_sides``: also return the side outputs the task's loss supervises (HED's, for edges;
    an empty list for other heads).
    """
    spec, kind = get_task(task), config["head"]["kind"]
    size = None if out_size is None else tuple(int(s) for s in out_size)
    if with_sides and kind in spec.side_outputs:
        fused, sides = head(feats, size, return_sides=True)
    else:
        fused, sides = head(feats, size), []
    out = spec.decode(fused, config)
    return (out, sides) if with_sides else out


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


# --------------------------------------------------------------------------- evaluation
def make_metric(task: str, **settings: Any) -> Any:
    """The metric of ``task`` (keywords: the fields of :class:`MetricSettings`)."""
    return get_task(task).metric(MetricSettings(**settings))


def final_prediction(task: str, out: torch.Tensor) -> torch.Tensor:
    """A head map ``[C, H, W]`` as what is scored and saved: class ids, depth, edge probability."""
    return get_task(task).predict(out)


def update_metric(metric: Any, task: str, pred: torch.Tensor, item: Mapping[str, Any]) -> None:
    """Add one final prediction (class ids, depth, edge probabilities; ``[H, W]``) for a dataset item."""
    get_task(task).score(metric, pred.reshape(item["target"].shape).cpu(), item)


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
    """A saved prediction, read as the task reads its labels (annotator stacks averaged)."""
    for suffix in (".png", ".npy"):
        path = pred_dir / f"{name}{suffix}"
        if path.exists():
            break
    else:
        return None
    spec, settings = get_task(task), LabelSettings(depth_scale=depth_scale)
    return spec.targets(spec.read_label(path, settings), settings)["target"]


def format_metrics(task: str, m: Mapping[str, Any]) -> str:
    """One summary line (per-class IoU is printed separately by the CLI)."""
    return get_task(task).summary(m)


__all__ = ["DensePredictor", "IGNORE_INDEX", "autocast", "evaluate", "extractor_device", "extractor_for",
           "final_prediction", "format_metrics", "head_outputs", "is_relative_depth", "make_metric", "seg_palette",
           "size_multiple", "train_config_of", "update_metric", "write_depth", "write_edges", "write_seg"]
