"""Training a dense head (segmentation, depth, edges, any task of
:data:`~difffeat.tasks.dense_tasks.TASKS`) on frozen backbone features. Everything that
differs between the tasks (loss, its normaliser, target resizing, output channels, metric)
is read from the task's record; :func:`train_dense` is the same for all of them.

Two modes:

* **cached** (default): every training image is resized to the backbone resolution and its
  features are extracted once (optionally also of the mirrored image) into
  ``cache_dir/<settings-hash>/`` as safetensors (fp16); epochs then run at head speed.
  Labels are not cached, so one cache serves all tasks and later runs on the same images.
* **online**: features are extracted at every step from augmented images (random scale
  in ``scale_range``, random ``crop_size`` crop, horizontal flip) - slower, more varied.

Optimisation: AdamW, linear warmup then poly or cosine decay (per step), gradient-norm
clipping, bf16 autocast on CUDA, deterministic seeding (the data order and augmentation of
epoch ``e`` depend only on ``(seed, e)``). After every epoch the head is saved to
``OUT/head/`` (a usable checkpoint), the optimizer to ``OUT/train_state.*`` (safetensors +
JSON, no pickle; it also holds the head weights of that epoch, so head and optimizer always
match), a line to ``OUT/metrics.jsonl``; a rerun resumes after the last finished epoch
(raise ``train.epochs`` to continue a finished run).

Data parallel: under ``torchrun --nproc_per_node N --no-python difffeat train ...`` (one
process per GPU; gloo on CPU) the same function trains with DDP (:mod:`difffeat.distributed`).
Each rank extracts its share of the missing cache files (whole extraction batches, so the
files are those of a one-process run), then all ranks meet before training. Every step uses
the same global batch as one process (``train.batch_size`` is the *global* batch, split over
the ranks); each rank's loss is weighted by its share of the loss's normaliser (valid pixels
for segmentation and SILog, images otherwise) and DDP averages the gradients, so the update
equals the one-process update up to float rounding, with the same LR schedule and number of
steps. Exceptions: dropout masks, SILog's batch statistics and BatchNorm (the probe) are
per rank (BatchNorm becomes SyncBatchNorm on CUDA). In online mode every rank decodes and
augments the whole global batch (so the random stream stays that of one process) but runs
the backbone on its part only. Only rank 0 validates and writes the checkpoint, train
state, metrics and messages.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import yaml

from difffeat.distributed import DistInfo, dist_info, prepare_ddp, progress_bar, shard_items
from difffeat.errors import BadInputError, DiffFeatError
from difffeat.heads import build_head, save_head
from difffeat.heads.checkpoint import feature_record
from difffeat.io import atomic_path, load_features, load_image, save_features, save_json

from .dense_config import config_diff
from .dense_data import DenseFolder
from .dense_predict import autocast, extractor_device, final_prediction, head_outputs, size_multiple, update_metric
from .dense_tasks import OUTPUT_ARGS, DenseTask, MetricSettings, get_task

STATE_WEIGHTS, STATE_JSON = "train_state.safetensors", "train_state.json"
# collectives wait this long: ranks meet after unequal cache shares and while rank 0 validates
DDP_TIMEOUT = timedelta(hours=2)
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.val_every", "train.device", "train.cache_dir", "data.val")


# --------------------------------------------------------------------------- setup helpers
def make_extractor(backbone: Mapping[str, Any], device: str | None, dtype: str | None) -> Any:
    """``difffeat.create`` with the config's backbone section (always square ``resize``)."""
    from difffeat.factory import create

    kw = dict(backbone)
    model = kw.pop("model", None)
    if not kw.get("resolution"):
        raise BadInputError("set backbone.resolution: dense training resizes images to one square size")
    try:
        return create(model, resize="resize", device=device, dtype=dtype, **kw)
    except TypeError as e:
        raise BadInputError(f"bad backbone setting: {e}") from None


def backbone_record(backbone: Mapping[str, Any], ex: Any) -> dict[str, Any]:
    """What the checkpoint records about the features (checked when it is loaded)."""
    model = str(backbone.get("model"))
    preset = os.path.abspath(model) if os.path.isdir(model) else model
    return feature_record(ex, preset, **{k: v for k, v in backbone.items() if k not in ("model", "layers", "timesteps")})


def lr_factor(step: int, total: int, cfg: Mapping[str, Any]) -> float:
    """Linear warmup to 1, then poly (``poly_power``) or cosine decay to ``min_lr_ratio``."""
    warm = int(cfg.get("warmup_steps", 0))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = float(cfg.get("min_lr_ratio", 0.0))
    if cfg.get("schedule", "poly") == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.get("schedule", "poly") == "poly":
        decay = (1 - progress) ** float(cfg.get("poly_power", 1.0))
    else:
        raise BadInputError(f"unknown train.schedule {cfg.get('schedule')!r}; valid: poly, cosine")
    return floor + (1 - floor) * decay


def task_loss(task: str, cfg: Mapping[str, Any], out: Any, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The task loss of head outputs (from :func:`head_outputs` with sides) at label size."""
    pred, sides = out
    return get_task(task).loss(cfg, pred, sides, target, ignore_index)


def loss_weight(task: str, cfg: Mapping[str, Any], target: torch.Tensor, ignore_index: int) -> float:
    """What :func:`task_loss` averages over in ``target``: its share of a global batch's loss.

    Valid pixels for cross-entropy and SILog, images with >= 2 valid pixels for SSI, images
    for the edge losses. A rank weighting its part's loss by this (over the global sum) makes
    the DDP-averaged gradient that of the whole batch (exact except SILog, whose variance
    term is a batch statistic).
    """
    return get_task(task).loss_weight(cfg, target, ignore_index)


def resize_target(target: torch.Tensor, size: tuple[int, int], task: str) -> torch.Tensor:
    """Labels ``[H, W]`` or ``[C, H, W]`` to ``size`` with the task's mode (nearest keeps class
    ids and invalid pixels, bilinear suits soft edges)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    mode = get_task(task).resize
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    x = F.interpolate(target.float().reshape(-1, 1, *target.shape[-2:]), size=size, mode=mode, **corners)
    return x.reshape(*target.shape[:-2], *size).to(target.dtype)


# --------------------------------------------------------------------------- feature cache
class FeatureCache:
    """Per-image feature files under ``root/<hash of extractor settings>/`` (no labels: one
    cache serves every task and run that uses the same features)."""

    def __init__(self, root: Path, ex: Any, resolution: int) -> None:
        meta = {k: v for k, v in ex.metadata().items() if k != "difffeat_version"}
        meta["resolution"] = resolution
        digest = hashlib.sha1(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.dir = Path(root) / digest
        self.ex, self.resolution, self.meta = ex, resolution, meta

    def path(self, image: Path, flip: bool) -> Path:
        """Keyed by the image's absolute path, size and modification time (and mirroring)."""
        st = Path(image).stat()
        key = hashlib.sha1(f"{Path(image).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        return self.dir / f"{Path(image).stem[:40]}-{key}{'.flip' if flip else ''}.safetensors"

    @staticmethod
    def items(ds: DenseFolder, flips: tuple[bool, ...]) -> list[tuple[Path, bool]]:
        """``(image, mirrored)`` of every feature file ``ds`` needs, in dataset order."""
        return [(s.image, f) for s in ds.samples for f in flips]

    def build(self, items: Sequence[tuple[Path, bool]], batch_size: int, info: DistInfo | None = None) -> list[Path]:
        """Extract whatever is missing of ``items`` (resumable; each file written atomically).

        Under several processes each rank takes its share of the whole item list in units of
        ``batch_size`` (:func:`rank_share`): the split does not depend on what is cached
        already, so no two ranks extract the same image, and a fresh cache holds the files
        of a one-process run. Items naming the same file count once. Returns the files
        written by this process.
        """
        from difffeat.runner import Job, preflight, run

        unique: dict[Path, tuple[Path, bool]] = {}
        for p, f in items:
            unique.setdefault(self.path(p, f), (p, f))  # insertion order: first occurrence
        written: list[Path] = []

        def load(item: tuple[Path, bool]) -> tuple[Path, bool, Any]:
            im = load_image(item[0])
            return item[0], item[1], im.transpose(0) if item[1] else im  # 0 = FLIP_LEFT_RIGHT

        def process(batch: list[tuple[Path, bool, Any]]) -> None:
            feats = self.ex(self.ex.prepare([im for _, _, im in batch]))
            for j, (p, f, _) in enumerate(batch):
                if not self.path(p, f).exists():
                    tensors = {k2: v[j].to(torch.float16) for k2, v in feats.items()}
                    save_features(self.path(p, f), tensors, {"image": str(p), "flip": f})
                    written.append(self.path(p, f))

        todo = [it for it in unique.values() if not self.path(*it).exists()]
        if todo:
            preflight(self.dir)
            save_json(self.dir / "settings.json", self.meta)
        job = Job(list(unique.values()), process, done=lambda it: self.path(*it).exists(), load=load,
                  name=lambda it: str(it[0]))
        run(job, out=self.dir if todo else None, batch_size=batch_size, desc="caching features", info=info,
            resume_note=False).finish("images")
        return written

    def load(self, image: Path, flip: bool) -> dict[str, torch.Tensor]:
        tensors, _ = load_features(self.path(image, flip))
        return {k: v.float() for k, v in tensors.items()}


# --------------------------------------------------------------------------- online augmentation
def augment(image: torch.Tensor, target: torch.Tensor, task: str, crop: int, scale_range: tuple[float, float],
            flip: bool, g: torch.Generator, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale (shorter side = crop x s), random crop (padding if needed), random flip.

    Padding of the target: the ignore index for class labels, else 0 (invalid depth, no edge).
    """
    _, h, w = image.shape
    s = scale_range[0] + (scale_range[1] - scale_range[0]) * float(torch.rand(1, generator=g))
    scale = crop * s / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    target = resize_target(target, (nh, nw), task)
    ph, pw = max(0, crop - nh), max(0, crop - nw)
    if ph or pw:
        fill = float(ignore_index if get_task(task).classes else 0)
        image = F.pad(image, (0, pw, 0, ph))
        target = F.pad(target[None].float(), (0, pw, 0, ph), value=fill)[0].to(target.dtype)
    y = int(torch.randint(image.shape[1] - crop + 1, (1,), generator=g))
    x = int(torch.randint(image.shape[2] - crop + 1, (1,), generator=g))
    image, target = image[:, y : y + crop, x : x + crop], target[..., y : y + crop, x : x + crop]
    if flip and float(torch.rand(1, generator=g)) < 0.5:
        image, target = image.flip(-1), target.flip(-1)
    return image, target


# --------------------------------------------------------------------------- optimizer state (no pickle)
def save_train_state(folder: Path, opt: torch.optim.Optimizer, info: Mapping[str, Any],
                     model: torch.nn.Module | None = None) -> None:
    """Optimizer tensors (and ``model`` weights, prefixed ``model.``) + JSON, written atomically."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in (model.state_dict() if model else {}).items()}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    with atomic_path(folder / STATE_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    save_json(folder / STATE_JSON, dict(info, param_groups=sd["param_groups"], scalars=scalars))


def load_train_state(folder: Path, opt: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Restore what :func:`save_train_state` wrote; returns its ``info``."""
    from safetensors.torch import load_file

    info = json.loads((folder / STATE_JSON).read_text())
    state: dict[int, dict[str, Any]] = {}
    weights = {}
    for key, v in load_file(str(folder / STATE_WEIGHTS)).items():
        if key.startswith("model."):
            weights[key[6:]] = v
            continue
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    if model is not None:
        model.load_state_dict(weights)
    for pid, d in info.pop("scalars").items():
        state.setdefault(int(pid), {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": info.pop("param_groups")})
    return info


# --------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """What the parts of one training run share (built by :func:`_setup`)."""

    spec: DenseTask
    cfg: dict[str, Any]
    out: Path
    dist: DistInfo
    echo: Callable[[str], Any]
    ex: Any
    train_ds: DenseFolder
    val_ds: DenseFolder | None
    head: torch.nn.Module
    opt: torch.optim.Optimizer
    cache: FeatureCache | None = None
    flips: tuple[bool, ...] = (False,)
    crop: int = 0  # online mode: the crop size
    acc: Any = None  # the accelerator under DDP
    net: torch.nn.Module | None = None  # what the steps call: the head, or its DDP wrapper
    step_opt: torch.optim.Optimizer | None = None
    save_kw: dict[str, Any] = field(default_factory=dict)

    @property
    def tcfg(self) -> dict[str, Any]:
        return self.cfg["train"]

    @property
    def device(self) -> torch.device:
        return extractor_device(self.ex)

    @property
    def res(self) -> int:
        return int(self.cfg["backbone"]["resolution"])

    @property
    def ignore(self) -> int:
        return int(self.cfg["data"].get("ignore_index", 255))

    @property
    def bs(self) -> int:
        return int(self.tcfg["batch_size"])

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train_ds) / self.bs))


def train_dense(task: str, data: str | Path, out: str | Path, cfg: dict[str, Any], overwrite: bool = False,
                echo: Callable[[str], Any] = print, ex: Any = None) -> dict[str, Any]:
    """Train (or resume) a head; returns ``{"epochs": [...per-epoch records...], "checkpoint": path}``.

    ``task``: a name in :data:`~difffeat.tasks.dense_tasks.TASKS`, whose record says what
    differs between tasks. ``ex``: an already built extractor matching ``cfg["backbone"]``
    (else one is created). Under a launcher with ``WORLD_SIZE`` > 1 every rank calls this and
    trains with DDP (module docstring); only rank 0 echoes and writes ``out``, and all ranks
    return once the last checkpoint is written.
    """
    out, dist, spec = Path(out), dist_info(), get_task(task)
    if not dist.is_main:
        echo = lambda message: None  # noqa: E731  (rank 0 speaks for all)
    _check_settings(spec, cfg)
    info = _previous_run(out, cfg, overwrite, dist)
    if info is not None and int(info["epoch"]) >= int(cfg["train"]["epochs"]):
        echo(f"{out} already finished {info['epoch']} epochs; raise train.epochs to continue or use --overwrite")
        return {"epochs": info.get("history", []), "checkpoint": out / "head"}
    torch.manual_seed(int(cfg["train"]["seed"]))
    run = _setup(spec, data, out, cfg, ex, dist, echo)
    start_epoch, step, history = _start(run, info is not None)
    for epoch in range(start_epoch, int(cfg["train"]["epochs"])):
        step, record = _epoch(run, epoch, step)
        history.append(record)
        if dist.is_main:  # the other ranks go on to the next epoch and wait in its first all-reduce
            _end_epoch(run, epoch, step, record, history)
    if run.acc is not None:
        run.acc.wait_for_everyone()  # the checkpoint exists when any rank returns
        run.acc.end_training()
    return {"epochs": history, "checkpoint": out / "head"}


def _check_settings(spec: DenseTask, cfg: Mapping[str, Any]) -> None:
    if cfg["train"]["mode"] not in ("cached", "online"):
        raise BadInputError(f"unknown train.mode {cfg['train']['mode']!r}; valid: cached, online")
    if cfg["head"]["kind"] not in spec.heads:
        raise BadInputError(f"head.kind {cfg['head']['kind']!r} cannot be trained for {spec.name}; "
                            f"valid: {', '.join(spec.heads)}")


def _previous_run(out: Path, cfg: Mapping[str, Any], overwrite: bool, dist: DistInfo) -> dict[str, Any] | None:
    """The train state of the run in ``out`` to resume (None: start afresh; ``overwrite``
    removes it). Refuses a run with other settings than ``cfg``."""
    if overwrite and dist.is_main:
        for name in ("head", STATE_WEIGHTS, STATE_JSON, "metrics.jsonl", "config.yaml"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if overwrite or not (out / STATE_JSON).exists():  # the same answer on every rank
        return None
    old = yaml.safe_load((out / "config.yaml").read_text())
    diff = config_diff(old, cfg, ignore=RESUMABLE_CHANGES)
    if diff:
        raise BadInputError(f"{out} holds a run with other settings ({', '.join(diff[:5])}); "
                            "use --overwrite or another -o")
    return json.loads((out / STATE_JSON).read_text())


def _setup(spec: DenseTask, data: str | Path, out: Path, cfg: dict[str, Any], ex: Any, dist: DistInfo,
           echo: Callable[[str], Any]) -> _Run:
    """Datasets, extractor, head, optimizer and the feature cache (cached mode) of a run."""
    tcfg, dcfg = cfg["train"], cfg["data"]
    ds_kw = dict(depth_scale=float(dcfg.get("depth_scale", 1000.0)), ignore_index=int(dcfg.get("ignore_index", 255)),
                 reduce_zero_label=bool(dcfg.get("reduce_zero_label", False)))
    train_ds = DenseFolder(data, spec, classes=dcfg.get("classes"), **ds_kw)  # type: ignore[arg-type]
    val_ds = None
    if dcfg.get("val"):
        val_ds = DenseFolder(dcfg["val"], spec, classes=dcfg.get("classes") or train_ds.classes, **ds_kw)  # type: ignore[arg-type]
    ex = ex if ex is not None else make_extractor(cfg["backbone"], tcfg.get("device"), tcfg.get("dtype"))
    multiple, res = size_multiple(ex), int(cfg["backbone"]["resolution"])
    if res % multiple:
        raise BadInputError(f"backbone.resolution {res} is not a multiple of {multiple} for this model")
    head = _build_head(spec, cfg["head"], ex, train_ds)
    opt = torch.optim.AdamW(head.parameters(), lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))
    run = _Run(spec, cfg, out, dist, echo, ex, train_ds, val_ds, head, opt)
    if tcfg["mode"] == "cached":
        run.flips = (False, True) if tcfg.get("cache_flip", True) else (False,)
        run.cache = FeatureCache(Path(tcfg.get("cache_dir") or out / "cache"), ex, res)
        items = run.cache.items(train_ds, run.flips) + (run.cache.items(val_ds, (False,)) if val_ds is not None else [])
        run.cache.build(items, batch_size=run.bs, info=dist)  # this rank's share; all meet in _start
    else:
        run.crop = int(tcfg["crop_size"])
        if run.crop % multiple:
            raise BadInputError(f"train.crop_size {run.crop} is not a multiple of {multiple} for this model")
    n = train_ds.num_classes  # None unless the labels are class ids
    run.save_kw = dict(backbone=backbone_record(cfg["backbone"], ex), task=spec.name, image_size=res,
                       classes=train_ds.classes or ([str(i) for i in range(n)] if n else None), palette=train_ds.palette)
    return run


def _build_head(spec: DenseTask, hcfg: Mapping[str, Any], ex: Any, train_ds: DenseFolder) -> torch.nn.Module:
    """The configured head, its output channels set by the task (unless ``head.args`` sets them)."""
    args = dict(hcfg.get("args") or {})
    if hcfg["kind"] in OUTPUT_ARGS:
        args.setdefault(OUTPUT_ARGS[hcfg["kind"]], spec.outputs(train_ds) or 1)
    head = build_head(hcfg["kind"], ex.feature_info, aggregator=hcfg.get("aggregator"), **args)
    return head.to(extractor_device(ex))


def _start(run: _Run, resume: bool) -> tuple[int, int, list[dict[str, Any]]]:
    """(first epoch, step, history): a resumed run's state is loaded, the config written,
    and under DDP the head wrapped and every rank's cache share awaited."""
    start_epoch, step, history = 0, 0, []
    if resume:
        info = load_train_state(run.out, run.opt, run.head)  # head and optimizer of the same finished epoch
        start_epoch, step, history = int(info["epoch"]), int(info["step"]), info.get("history", [])
        run.echo(f"resuming {run.out} after epoch {start_epoch}")
    if run.dist.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(run.cfg, sort_keys=False))
    run.net, run.step_opt = run.head, run.opt  # what the steps use; head/opt: the plain objects that are saved
    if run.dist.world_size > 1:
        run.acc, run.net, run.step_opt = _prepare(run.head, run.opt, run.device, run.echo)
        run.acc.wait_for_everyone()  # every rank's cache share is written
    return start_epoch, step, history


def _epoch(run: _Run, epoch: int, step: int) -> tuple[int, dict[str, Any]]:
    """One pass over the training set (the order and augmentation depend only on seed and
    epoch); returns the step count and the epoch's record."""
    tcfg = run.tcfg
    run.head.train()
    g = torch.Generator().manual_seed(int(tcfg["seed"]) * 100_003 + epoch)
    order = torch.randperm(len(run.train_ds), generator=g).tolist()
    t0, seen, losses, window = time.time(), 0, [], []
    bar = progress_bar(run.steps_per_epoch, f"epoch {epoch + 1}/{tcfg['epochs']}", run.dist, unit="step")
    for b in range(run.steps_per_epoch):
        batch = order[b * run.bs : (b + 1) * run.bs]  # the global batch, the same on every rank
        lr = float(tcfg["lr"]) * lr_factor(step, int(tcfg["epochs"]) * run.steps_per_epoch, tcfg)
        value = _step(run, batch, g, lr, f"epoch {epoch + 1} step {b + 1}")
        step, seen = step + 1, seen + len(batch)
        losses.append(value)
        window.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        if step % int(tcfg.get("log_every", 10)) == 0 and run.dist.is_main:
            _log(run.out, {"epoch": epoch + 1, "step": step, "loss": sum(window) / len(window), "lr": lr})
            window = []
    bar.close()
    return step, {"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / len(losses),
                  "images_per_s": seen / max(time.time() - t0, 1e-9)}


def _step(run: _Run, batch: list[int], g: torch.Generator, lr: float, where: str) -> float:
    """One optimizer step on this rank's part of the global ``batch``; returns the global loss."""
    dist = run.dist
    # this rank's positions in the batch; a rank left without any (a last batch smaller than the
    # world) recomputes sample 0 with weight 0, since every rank must join each all-reduce
    mine = shard_items(range(len(batch)), dist.rank, dist.world_size) or [0]
    idle = dist.world_size > 1 and len(batch) <= dist.rank
    feats, target = (_cached_batch if run.cache is not None else _online_batch)(run, batch, mine, g)
    for group in run.opt.param_groups:
        group["lr"] = lr
    with autocast(run.device, bool(run.tcfg.get("amp", True))):
        out_maps = head_outputs(run.net, feats, target.shape[-2:], run.spec.name, run.cfg, with_sides=True)
        loss = run.spec.loss(run.cfg, out_maps[0], out_maps[1], target, run.ignore)
    value = loss.item()
    if run.acc is not None:  # weight this part by its share of the global batch (see loss_weight)
        weight = 0.0 if idle else run.spec.loss_weight(run.cfg, target, run.ignore)
        loss, value = _global_loss(loss, weight, out_maps, dist)
    if not math.isfinite(value):
        raise DiffFeatError(f"training diverged (loss {value}) at {where}; lower train.lr")
    run.step_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
    loss.backward()  # DDP: averages the gradients over the ranks
    if float(run.tcfg.get("grad_clip") or 0) > 0:
        torch.nn.utils.clip_grad_norm_([p for p in run.head.parameters() if p.requires_grad], float(run.tcfg["grad_clip"]))
    run.step_opt.step()  # type: ignore[union-attr]
    return value


def _cached_batch(run: _Run, batch: list[int], mine: list[int], g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Cached features (mirrored at random) and labels at the backbone resolution."""
    flipped = [run.flips[-1] and float(torch.rand(1, generator=g)) < 0.5 for _ in batch]  # g in step on all ranks
    idx, flipped = [batch[j] for j in mine], [flipped[j] for j in mine]
    loaded = [run.cache.load(run.train_ds.samples[i].image, f) for i, f in zip(idx, flipped)]  # type: ignore[union-attr]
    feats = {k: torch.stack([f[k] for f in loaded]).to(run.device) for k in loaded[0]}
    targets = [run.train_ds.labels(i)["target"] for i in idx]
    targets = [resize_target(t.flip(-1) if f else t, (run.res, run.res), run.spec.name) for t, f in zip(targets, flipped)]
    return feats, torch.stack(targets).to(run.device)


def _online_batch(run: _Run, batch: list[int], mine: list[int], g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Augmented images through the backbone: every rank augments the whole global batch
    (``g`` stays in step), the backbone runs on this rank's part."""
    t = run.tcfg
    pairs = [augment(it["image"], it["target"], run.spec.name, run.crop, tuple(t["scale_range"]), bool(t["flip"]), g,
                     run.ignore) for it in (run.train_ds[i] for i in batch)]
    pairs = [pairs[j] for j in mine]
    return run.ex(torch.stack([p[0] for p in pairs])), torch.stack([p[1] for p in pairs]).to(run.device)


def _end_epoch(run: _Run, epoch: int, step: int, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Rank 0 after an epoch: validate, log, save the train state and the checkpoint."""
    if run.val_ds is not None and (epoch + 1) % int(run.tcfg.get("val_every", 1)) == 0:
        val = validate(run.spec.name, run.head, run.ex, run.val_ds, run.cfg, run.cache, run.device)  # no collectives
        record.update({f"val_{k}": v for k, v in val.items() if not isinstance(v, dict)})
        run.echo(f"epoch {epoch + 1}: val {run.spec.summary(val)}")
    _log(run.out, record)
    run.echo(f"epoch {epoch + 1}/{run.tcfg['epochs']}: loss {record['train_loss']:.4f} ({record['images_per_s']:.1f} img/s)")
    save_train_state(run.out, run.opt, {"epoch": epoch + 1, "step": step, "history": history}, run.head)
    save_head(run.head, run.out / "head", extra={"train_config": run.cfg, "history": history}, **run.save_kw)


def _prepare(head: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device,
             echo: Callable[[str], Any]) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer]:
    """DDP wrappers of ``head``/``opt`` (which keep their parameters, so the plain objects are
    what is saved: the checkpoint format of a one-process run). Mixed precision stays ours."""
    from accelerate.utils import InitProcessGroupKwargs

    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules()):
        if device.type == "cuda":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(head)  # in place below the root; same parameters
        else:
            echo("note: BatchNorm statistics are per rank on CPU (SyncBatchNorm needs CUDA)")
    acc, net, step_opt, _ = prepare_ddp(head, opt, cpu=device.type != "cuda", mixed_precision="no",
                                        kwargs_handlers=[InitProcessGroupKwargs(timeout=DDP_TIMEOUT)])
    want = device if device.type != "cuda" or device.index is not None else torch.device("cuda", torch.cuda.current_device())
    if acc.device.type != want.type or (want.type == "cuda" and acc.device.index != want.index):
        raise BadInputError(f"this rank's extractor is on {device} but accelerate chose {acc.device}; "
                            "start one process per GPU and leave train.device unset or 'cuda'")
    return acc, net, step_opt


def _global_loss(loss: torch.Tensor, weight: float, out_maps: Any, dist: DistInfo) -> tuple[torch.Tensor, float]:
    """This rank's loss rescaled so that DDP's gradient mean is the global batch's gradient, and
    the global loss value (the one-process loss): ``sum_r w_r L_r / sum_r w_r``."""
    part = loss.detach().double() * weight if weight else torch.zeros((), dtype=torch.float64, device=loss.device)
    stats = torch.stack([torch.tensor(weight, dtype=torch.float64, device=loss.device), part])
    torch.distributed.all_reduce(stats)
    total, value = float(stats[0]), float(stats[1] / stats[0])
    if not weight:  # nothing to learn here, but DDP needs every parameter's gradient: zeros
        pred, sides = out_maps
        return sum((s.float().sum() for s in sides), pred.float().sum()) * 0.0, value
    return loss * (weight * dist.world_size / total), value


@torch.no_grad()
def validate(task: str, head: torch.nn.Module, ex: Any, ds: DenseFolder, cfg: Mapping[str, Any],
             cache: FeatureCache | None, device: torch.device) -> dict[str, Any]:
    """Metrics of ``head`` on ``ds`` at label resolution (whole-image inference)."""
    from difffeat.io import prepare_image

    spec = get_task(task)
    metric = spec.metric(MetricSettings.from_config(cfg["data"], ds.num_classes, ds.classes))
    head.eval()
    res = int(cfg["backbone"]["resolution"])
    for i in range(len(ds)):
        item = ds.labels(i)
        if cache is not None:
            feats = {k: v[None].to(device) for k, v in cache.load(ds.samples[i].image, False).items()}
        else:
            feats = ex(prepare_image(load_image(ds.samples[i].image), res, "resize", size_multiple(ex)).image[None])
        with autocast(device, bool(cfg["train"].get("amp", True))):
            pred = head_outputs(head, feats, item["target"].shape[-2:], task, cfg)
        update_metric(metric, task, final_prediction(task, pred[0].float()), item)
    head.train()
    return metric.compute()


def _log(out: Path, record: Mapping[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(dict(record), default=float) + "\n")
