"""Training a dense head (segmentation, depth, edges) on frozen backbone features.

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
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import yaml

from difffeat.distributed import DistInfo, dist_info, prepare_ddp, progress_bar, shard_items
from difffeat.errors import BadInputError, DiffFeatError
from difffeat.heads import build_head, class_balanced_bce, hed_loss, save_head, silog_loss, ssi_l1_loss
from difffeat.heads.checkpoint import feature_record
from difffeat.io import atomic_path, load_features, load_image, save_features, save_json

from .dense_config import config_diff
from .dense_data import DenseFolder
from .dense_predict import (autocast, extractor_device, final_prediction, format_metrics, head_outputs, make_metric,
                            size_multiple, update_metric)

STATE_WEIGHTS, STATE_JSON = "train_state.safetensors", "train_state.json"
HEAD_KINDS = {"seg": ("fpn", "probe"), "depth": ("depth", "probe"), "edges": ("hed", "probe")}
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
    if task == "seg":
        return F.cross_entropy(pred.float(), target, ignore_index=ignore_index)
    if task == "depth":
        loss = cfg.get("loss", {})
        p, t = pred.float().squeeze(1), target
        if loss.get("kind", "silog") == "ssi":
            return ssi_l1_loss(p, t, trim=float(loss.get("trim", 0.0)))
        if loss.get("kind", "silog") != "silog":
            raise BadInputError(f"unknown loss.kind {loss.get('kind')!r}; valid: silog, ssi")
        return silog_loss(p, t, lambd=float(loss.get("lambd", 0.5)), scale=float(loss.get("scale", 1.0)))
    t = target.unsqueeze(1)
    return hed_loss(pred.float(), [s.float() for s in sides], t) if sides else class_balanced_bce(pred.float(), t)


def loss_weight(task: str, cfg: Mapping[str, Any], target: torch.Tensor, ignore_index: int) -> float:
    """What :func:`task_loss` averages over in ``target``: its share of a global batch's loss.

    Valid pixels for cross-entropy and SILog, images with >= 2 valid pixels for SSI, images
    for the edge losses. A rank weighting its part's loss by this (over the global sum) makes
    the DDP-averaged gradient that of the whole batch (exact except SILog, whose variance
    term is a batch statistic).
    """
    if task == "seg":
        return float((target != ignore_index).sum())
    if task == "depth":
        valid = target > 0
        if cfg.get("loss", {}).get("kind", "silog") == "ssi":
            return float((valid.flatten(1).sum(1) >= 2).sum())
        return float(valid.sum())
    return float(target.shape[0])


def resize_target(target: torch.Tensor, size: tuple[int, int], task: str) -> torch.Tensor:
    """Labels to ``size``: nearest for class ids and depth (keeps invalid pixels), bilinear for soft edges."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    x = target[None, None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if task == "edges" else F.interpolate(x, size=size, mode="nearest")
    return x[0, 0].to(target.dtype)


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
    """Random scale (shorter side = crop x s), random crop (padding if needed), random flip."""
    _, h, w = image.shape
    s = scale_range[0] + (scale_range[1] - scale_range[0]) * float(torch.rand(1, generator=g))
    scale = crop * s / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    target = resize_target(target, (nh, nw), task)
    ph, pw = max(0, crop - nh), max(0, crop - nw)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph))
        target = F.pad(target[None].float(), (0, pw, 0, ph), value=float(ignore_index if task == "seg" else 0))[0].to(target.dtype)
    y = int(torch.randint(image.shape[1] - crop + 1, (1,), generator=g))
    x = int(torch.randint(image.shape[2] - crop + 1, (1,), generator=g))
    image, target = image[:, y : y + crop, x : x + crop], target[y : y + crop, x : x + crop]
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
def train_dense(task: str, data: str | Path, out: str | Path, cfg: dict[str, Any], overwrite: bool = False,
                echo: Callable[[str], Any] = print, ex: Any = None) -> dict[str, Any]:
    """Train (or resume) a head; returns ``{"epochs": [...per-epoch records...], "checkpoint": path}``.

    ``ex``: an already built extractor matching ``cfg["backbone"]`` (else one is created).
    Under a launcher with ``WORLD_SIZE`` > 1 every rank calls this and trains with DDP
    (module docstring); only rank 0 echoes and writes ``out``, and all ranks return once the
    last checkpoint is written.
    """
    out = Path(out)
    dist = dist_info()
    if not dist.is_main:
        echo = lambda message: None  # noqa: E731  (rank 0 speaks for all)
    tcfg, dcfg = cfg["train"], cfg["data"]
    if tcfg["mode"] not in ("cached", "online"):
        raise BadInputError(f"unknown train.mode {tcfg['mode']!r}; valid: cached, online")
    if cfg["head"]["kind"] not in HEAD_KINDS[task]:
        raise BadInputError(f"head.kind {cfg['head']['kind']!r} cannot be trained for {task}; valid: {', '.join(HEAD_KINDS[task])}")
    if overwrite and dist.is_main:
        for name in ("head", STATE_WEIGHTS, STATE_JSON, "metrics.jsonl", "config.yaml"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    resume = not overwrite and (out / STATE_JSON).exists()  # the same answer on every rank
    if resume:
        old = yaml.safe_load((out / "config.yaml").read_text())
        diff = config_diff(old, cfg, ignore=RESUMABLE_CHANGES)
        if diff:
            raise BadInputError(f"{out} holds a run with other settings ({', '.join(diff[:5])}); "
                                "use --overwrite or another -o")
        info = json.loads((out / STATE_JSON).read_text())
        if int(info["epoch"]) >= int(tcfg["epochs"]):
            echo(f"{out} already finished {info['epoch']} epochs; raise train.epochs to continue or use --overwrite")
            return {"epochs": info.get("history", []), "checkpoint": out / "head"}

    seed = int(tcfg["seed"])
    torch.manual_seed(seed)
    ignore = int(dcfg.get("ignore_index", 255))
    ds_kw = dict(depth_scale=float(dcfg.get("depth_scale", 1000.0)), ignore_index=ignore,
                 reduce_zero_label=bool(dcfg.get("reduce_zero_label", False)))
    train_ds = DenseFolder(data, task, classes=dcfg.get("classes"), **ds_kw)  # type: ignore[arg-type]
    val_ds = None
    if dcfg.get("val"):
        val_ds = DenseFolder(dcfg["val"], task, classes=dcfg.get("classes") or train_ds.classes, **ds_kw)  # type: ignore[arg-type]

    ex = ex if ex is not None else make_extractor(cfg["backbone"], tcfg.get("device"), tcfg.get("dtype"))
    device = extractor_device(ex)
    res = int(cfg["backbone"]["resolution"])
    multiple = size_multiple(ex)
    if res % multiple:
        raise BadInputError(f"backbone.resolution {res} is not a multiple of {multiple} for this model")

    head_args = dict(cfg["head"].get("args") or {})
    num_classes = train_ds.num_classes if task == "seg" else None
    if cfg["head"]["kind"] == "probe":
        head_args.setdefault("num_outputs", num_classes or 1)
    elif task == "seg":
        head_args.setdefault("num_classes", num_classes)
    head = build_head(cfg["head"]["kind"], ex.feature_info, aggregator=cfg["head"].get("aggregator"), **head_args).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))

    # ---- data
    flips = (False, True) if tcfg.get("cache_flip", True) else (False,)
    cache = None
    if tcfg["mode"] == "cached":
        cache = FeatureCache(Path(tcfg.get("cache_dir") or out / "cache"), ex, res)
        items = cache.items(train_ds, flips) + (cache.items(val_ds, (False,)) if val_ds is not None else [])
        cache.build(items, batch_size=int(tcfg["batch_size"]), info=dist)  # this rank's share; all meet below
    else:
        crop = int(tcfg["crop_size"])
        if crop % multiple:
            raise BadInputError(f"train.crop_size {crop} is not a multiple of {multiple} for this model")
    bs = int(tcfg["batch_size"])
    steps_per_epoch = max(1, math.ceil(len(train_ds) / bs))
    total = int(tcfg["epochs"]) * steps_per_epoch

    start_epoch, step, history = 0, 0, []
    if resume:
        info = load_train_state(out, opt, head)  # head and optimizer of the same finished epoch
        start_epoch, step = int(info["epoch"]), int(info["step"])
        history = info.get("history", [])
        echo(f"resuming {out} after epoch {start_epoch}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    acc, net, step_opt = None, head, opt  # net/step_opt: what the steps use; head/opt: the plain objects
    if dist.world_size > 1:
        acc, net, step_opt = _prepare(head, opt, device, echo)
        acc.wait_for_everyone()  # every rank's cache share is written

    save_kw = dict(backbone=backbone_record(cfg["backbone"], ex), task=task, image_size=res,
                   classes=train_ds.classes or ([str(i) for i in range(num_classes)] if num_classes else None),
                   palette=train_ds.palette)
    params = [p for p in head.parameters() if p.requires_grad]
    for epoch in range(start_epoch, int(tcfg["epochs"])):
        head.train()
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(train_ds), generator=g).tolist()
        t0, seen, losses, window = time.time(), 0, [], []
        bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{tcfg['epochs']}", dist, unit="step")
        for b in range(steps_per_epoch):
            idx = batch = order[b * bs : (b + 1) * bs]  # the global batch, the same on every rank
            # this rank's positions in it; a rank left without any (a last batch smaller than the
            # world) recomputes sample 0 with weight 0, since every rank must join each all-reduce
            mine = shard_items(range(len(idx)), dist.rank, dist.world_size) or [0]
            idle = dist.world_size > 1 and len(idx) <= dist.rank
            if cache is not None:
                flipped = [flips[-1] and float(torch.rand(1, generator=g)) < 0.5 for _ in idx]  # g in step on all ranks
                idx, flipped = [idx[j] for j in mine], [flipped[j] for j in mine]
                loaded = [cache.load(train_ds.samples[i].image, f) for i, f in zip(idx, flipped)]
                feats = {k: torch.stack([f[k] for f in loaded]).to(device) for k in loaded[0]}
                targets = [train_ds.labels(i)["target"] for i in idx]
                targets = [resize_target(t.flip(-1) if f else t, (res, res), task) for t, f in zip(targets, flipped)]
                target = torch.stack(targets).to(device)
            else:
                # every rank augments the whole global batch (g stays in step), the backbone runs on its part
                data_items = [train_ds[i] for i in idx]
                pairs = [augment(it["image"], it["target"], task, crop, tuple(tcfg["scale_range"]), bool(tcfg["flip"]), g, ignore)
                         for it in data_items]
                pairs = [pairs[j] for j in mine]
                feats = ex(torch.stack([p[0] for p in pairs]))
                target = torch.stack([p[1] for p in pairs]).to(device)
            lr = float(tcfg["lr"]) * lr_factor(step, total, tcfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(device, bool(tcfg.get("amp", True))):
                out_maps = head_outputs(net, feats, target.shape[-2:], task, cfg, with_sides=True)
                loss = task_loss(task, cfg, out_maps, target, ignore)
            value = loss.item()
            if acc is not None:  # weight this part by its share of the global batch (see loss_weight)
                loss, value = _global_loss(loss, 0.0 if idle else loss_weight(task, cfg, target, ignore), out_maps, dist)
            if not math.isfinite(value):
                raise DiffFeatError(f"training diverged (loss {value}) at epoch {epoch + 1} step {b + 1}; lower train.lr")
            step_opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP: averages the gradients over the ranks
            if float(tcfg.get("grad_clip") or 0) > 0:
                torch.nn.utils.clip_grad_norm_(params, float(tcfg["grad_clip"]))
            step_opt.step()
            step += 1
            seen += len(batch)
            losses.append(value)
            window.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            if step % int(tcfg.get("log_every", 10)) == 0 and dist.is_main:
                _log(out, {"epoch": epoch + 1, "step": step, "loss": sum(window) / len(window), "lr": lr})
                window = []
        bar.close()
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / len(losses),
                                  "images_per_s": seen / max(time.time() - t0, 1e-9)}
        if not dist.is_main:  # the other ranks go on to the next epoch and wait in its first all-reduce
            history.append(record)
            continue
        if val_ds is not None and (epoch + 1) % int(tcfg.get("val_every", 1)) == 0:
            val = validate(task, head, ex, val_ds, cfg, cache, device)  # the plain head: no collectives
            record.update({f"val_{k}": v for k, v in val.items() if not isinstance(v, dict)})
            echo(f"epoch {epoch + 1}: val {format_metrics(task, val)}")
        history.append(record)
        _log(out, record)
        echo(f"epoch {epoch + 1}/{tcfg['epochs']}: loss {record['train_loss']:.4f} ({record['images_per_s']:.1f} img/s)")
        save_train_state(out, opt, {"epoch": epoch + 1, "step": step, "history": history}, head)
        save_head(head, out / "head", extra={"train_config": cfg, "history": history}, **save_kw)  # type: ignore[arg-type]
    if acc is not None:
        acc.wait_for_everyone()  # the checkpoint exists when any rank returns
        acc.end_training()
    return {"epochs": history, "checkpoint": out / "head"}


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

    d = cfg["data"]
    metric = make_metric(task, num_classes=ds.num_classes, class_names=ds.classes, ignore_index=int(d.get("ignore_index", 255)),
                         min_depth=float(d.get("min_depth", 1e-3)), max_depth=d.get("max_depth"), align=d.get("align"),
                         thresholds=int(d.get("thresholds", 99)), max_dist=float(d.get("max_dist", 0.0075)))
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
