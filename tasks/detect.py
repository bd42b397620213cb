"""Detecting diffusion-generated images: ``difffeat detect``, ``train dire``, ``eval detect``.

A :class:`Detector` turns prepared images into P(generated) and the statistics behind it.
It is built from a detector checkpoint (``--head``: a ResNet on DIRE maps, a pooled
diffusion-feature head, or a calibrated training-free score) or from a preset in
``configs/detect/`` (``--training-free``): ``dire-adm256`` (the DIRE paper), ``dire-sd``
(latent variant) and ``aeroblade``.

Evaluation reports ACC (at P = 0.5) and AP (fakes positive), both on the files as they are
and, with ``--normalize-format``, after passing *both* classes through the same resize and
the same JPEG quality, so a detector cannot win by telling JPEG reals from PNG fakes
(docs/detect.md explains why this matters for DIRE).
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import click
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from difffeat.backbone import compile_denoiser
from difffeat.errors import BadInputError, DiffFeatError, one_of
from difffeat.heads.aeroblade import Autoencoder, VGGLayer2Distance, aeroblade_distances, load_autoencoder, whole_image
from difffeat.heads.checkpoint import check_backbone, feature_record
from difffeat.presets import precedence
from difffeat.heads.dire import (
    Calibration, DireClassifier, DireSettings, PooledFeatureHead, build_resnet, calibrate,
    check_resolution, compute_dire, fit_binary, fit_square, load_detector_weights, map_batches, read_detector_config,
    save_detector, save_dire,
)
from difffeat.io import FolderRun, list_images, load_image, output_path, pil_to_tensor, save_json

SCORES = ("dire", "dire-latent", "aeroblade")


# --------------------------------------------------------------------------- presets
def detect_presets() -> dict[str, dict[str, Any]]:
    """Presets in configs/detect/*.yaml: {name: parsed YAML} (the registry's one preset loader)."""
    from difffeat.registry import presets_with

    return presets_with("detect", "detect")


def get_detect_preset(name: str) -> dict[str, Any]:
    presets = detect_presets()
    if name not in presets:
        raise one_of("detect preset", name, list(presets))
    return presets[name]


# --------------------------------------------------------------------------- detectors
class Detector:
    """P(generated) for batches of images; one of three kinds.

    * DIRE (``bb`` + ``settings``) with a ``classifier`` or a ``calibration`` (or neither:
      raw scores only),
    * pooled diffusion features (``extractor`` + ``head``),
    * AEROBLADE (``autoencoders`` + ``distance``, optionally a ``calibration``).

    ``config`` is what a checkpoint records about it (backbone, settings).
    """

    def __init__(self, config: dict[str, Any], size: int, resize: str, *, bb: Any = None,
                 settings: DireSettings | None = None, classifier: DireClassifier | None = None,
                 extractor: Any = None, head: PooledFeatureHead | None = None,
                 autoencoders: Sequence[Autoencoder] = (), distance: VGGLayer2Distance | None = None,
                 calibration: Calibration | None = None, score: str = "dire") -> None:
        self.config, self.size, self.resize = config, int(size), resize
        self.bb, self.settings, self.classifier = bb, settings, classifier
        self.extractor, self.head = extractor, head
        self.autoencoders, self.distance = list(autoencoders), distance
        self.calibration, self.score_name = calibration, score
        if score not in SCORES:
            raise one_of("score", score, list(SCORES))
        if bb is not None:
            check_resolution(bb, self.size)

    def compile(self) -> "Detector":
        """``torch.compile`` the diffusion model: the whole denoiser for DIRE (exact up to
        kernel rounding; one graph per batch shape), the blocks for pooled features.
        AEROBLADE's autoencoders stay eager."""
        if self.settings is not None:
            compile_denoiser(self.bb)
        elif self.extractor is not None:
            self.extractor.compile_denoiser()
        return self

    @property
    def makes_maps(self) -> bool:
        return self.settings is not None

    def prepare(self, img: Image.Image) -> torch.Tensor:
        """One PIL image -> [3,S,S] in [0,1] (``resize: none``: the whole image); too-small images raise one line."""
        if self.resize == "none":
            return pil_to_tensor(whole_image(img))
        return pil_to_tensor(fit_square(img, self.size, self.resize))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``prob`` (absent when uncalibrated), ``score`` and per-image extras; ``maps`` for DIRE."""
        out: dict[str, torch.Tensor] = {}
        if self.settings is not None:
            d = compute_dire(self.bb, x, self.settings)
            out["maps"], out["dire"] = d.maps, d.pixel_error
            if d.latent_error is not None:
                out["dire_latent"] = d.latent_error
            if self.classifier is not None:
                dev = next(self.classifier.parameters()).device
                out["score"] = self.classifier(d.maps.to(dev)).float().cpu()
                out["prob"] = torch.sigmoid(out["score"])
                return out
            if self.score_name == "dire-latent" and d.latent_error is None:
                raise BadInputError(f"score dire-latent needs a latent model; {self.bb.name} works in pixels")
            out["score"] = d.latent_error if self.score_name == "dire-latent" else d.pixel_error
        elif self.head is not None:
            feats = self.extractor(x)
            pooled = PooledFeatureHead.pool(feats, self.head.names)
            out["score"] = self.head(pooled.to(next(self.head.parameters()).device)).float().cpu()
            out["prob"] = torch.sigmoid(out["score"])
            return out
        else:
            dists = aeroblade_distances(x, self.autoencoders, self.distance)  # type: ignore[arg-type]
            for i, ae in enumerate(self.autoencoders):
                out[f"dist:{ae.name}"] = dists[:, i]
            out["score"] = dists.min(dim=1).values
        if self.calibration is not None:
            out["prob"] = self.calibration.prob(out["score"])
        return out


def _backbone_record(bb: Any, extractor: Any = None) -> dict[str, Any]:
    if extractor is not None:  # ex.config whole: loading rebuilds exactly this extractor
        return feature_record(extractor, bb.name, source=bb.source)
    return {"preset": bb.name, "source": bb.source, "layers": None, "timesteps": None}


def _load_bb(model: str, dtype: str | None, device: str | None) -> Any:
    from difffeat.backbone import load_backbone

    return load_backbone(model, dtype=dtype, device=device)


def _model_of(preset: Mapping[str, Any], model: str | None) -> str:
    m = model or preset["detect"].get("model")
    if not m:
        raise BadInputError(
            f"preset {preset['name']} has no downloadable model; pass -m with a local diffusers folder "
            "(for dire-adm256: a UNet2DModel converted from guided-diffusion's 256x256_diffusion_uncond.pt)"
        )
    return str(m)


def parse_autoencoder(spec: str) -> tuple[str, str]:
    """``MODEL[:COMPONENT]`` -> (model, component); the component defaults to ``vae``."""
    model, sep, comp = spec.rpartition(":")
    return (model, comp) if sep and comp and "/" not in comp else (spec, "vae")


def detector_from_preset(name: str, model: str | None = None, *, dire: Mapping[str, Any] | None = None,
                         score: str | None = None, autoencoders: Sequence[str] | None = None,
                         dtype: str | None = None, device: str | None = None, calibration: Calibration | None = None,
                         echo: Callable[[str], Any] | None = None) -> Detector:
    """An uncalibrated (raw-score) training-free detector from a preset.

    ``dire`` overrides the preset's DIRE settings (``resolution`` also applies to AEROBLADE);
    ``autoencoders`` (``MODEL[:COMPONENT]``) replaces AEROBLADE's list.
    """
    p = get_detect_preset(name)["detect"]
    score = score or p.get("score", "dire")
    if score == "aeroblade":
        specs = list(autoencoders or [f"{a['model']}:{a.get('component', 'vae')}" for a in p.get("autoencoders", [])])
        aes = [load_autoencoder(*parse_autoencoder(a), dtype=dtype, device=device) for a in specs]
        from difffeat.distributed import resolve_device

        dist = VGGLayer2Distance().load_imagenet(echo).to(resolve_device(device))
        size = int((dire or {}).get("resolution") or 0)  # a resolution: centre crops of that size, not whole images
        cfg = {"preset": name, "score": score, "resolution": size, "resize": "crop" if size else p.get("resize", "none"),
               "backbone": {"preset": "aeroblade", "autoencoders": [a.name for a in aes], "layers": None, "timesteps": None},
               "distance": {"name": p.get("distance", "vgg16-layer2"), "pretrained": dist.pretrained}}
        return Detector(cfg, size, cfg["resize"], autoencoders=aes, distance=dist, calibration=calibration, score=score)
    settings = DireSettings.from_dict(precedence(dire, p.get("dire")))  # options over the preset
    bb = _load_bb(_model_of(get_detect_preset(name), model), dtype, device)
    cfg = {"preset": name, "score": score, "dire": settings.to_dict(), "backbone": _backbone_record(bb)}
    return Detector(cfg, settings.resolution, settings.resize, bb=bb, settings=settings, calibration=calibration, score=score)


def load_detector(path: str | os.PathLike, model: str | None = None, dtype: str | None = None,
                  device: str | None = None, echo: Callable[[str], Any] | None = None) -> Detector:
    """Rebuild a detector from a checkpoint made by ``difffeat train dire``.

    ``model`` (optional) must be the backbone the checkpoint was made with; by default the
    checkpoint's own source is loaded.
    """
    cfg = read_detector_config(path)
    rec = cfg.get("backbone", {})
    kind = cfg["kind"]
    calib = Calibration(**cfg["calibration"]) if cfg.get("calibration") else None
    if rec.get("preset") == "aeroblade":  # rebuilt from the autoencoders it was calibrated with
        det = detector_from_preset(cfg.get("preset", "aeroblade"), score="aeroblade", dire={"resolution": cfg["resolution"]},
                                   autoencoders=rec["autoencoders"], dtype=dtype, device=device, calibration=calib, echo=echo)
        det.config = cfg
        return det
    if model is not None:  # refuse before loading anything heavy
        from difffeat.registry import resolve

        resolve(model)
        check_backbone(cfg, {"preset": model}, str(path))
    bb = _load_bb(model or rec["preset"], dtype, device)  # the name it was trained with
    check_backbone(cfg, {"preset": bb.name}, str(path))
    if kind == "pooled-features":
        import difffeat

        from difffeat.heads.checkpoint import rebuild_extractor

        ex = rebuild_extractor(rec, backbone=bb) if rec.get("extractor") else difffeat.create(
            bb.source, backbone=bb, layers=rec["layers"], timesteps=rec["timesteps"], resolution=cfg["resolution"],
            resize="resize", seed=int(cfg.get("seed", 0)))
        head = load_detector_weights(path, PooledFeatureHead(ex.feature_info)).to(bb.device)
        return Detector(cfg, cfg["resolution"], cfg.get("resize", "resize"), bb=bb, extractor=ex, head=head)
    settings = DireSettings.from_dict(cfg["dire"])
    clf = None
    if kind == "dire-classifier":
        c = cfg["classifier"]
        clf = load_detector_weights(path, DireClassifier(build_resnet(c["arch"], pretrained=False), c["crop"])).to(bb.device)
    return Detector(cfg, settings.resolution, settings.resize, bb=bb, settings=settings, classifier=clf,
                    calibration=calib, score=cfg.get("score", "dire"))


# --------------------------------------------------------------------------- running
def normalize_format(img: Image.Image, size: int, quality: int) -> Image.Image:
    """Resize + centre-crop to ``size``² and round-trip through JPEG at ``quality``.

    Applied to reals and fakes alike it removes format and size as a cue: every image
    then carries fresh JPEG artefacts of one quality on one grid, and any earlier JPEG
    grid is resampled away.
    """
    sq = fit_square(img, size, "resize")
    buf = io.BytesIO()
    sq.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def score_paths(det: Detector, paths: Sequence[Path], batch_size: int, run: FolderRun,
                transform: Callable[[Image.Image], Image.Image] | None = None,
                desc: str = "images") -> tuple[list[Path], dict[str, torch.Tensor]]:
    """Score image files in batches; unreadable or too-small ones are reported in ``run`` and skipped."""
    names: list[Path] = []
    parts: dict[str, list[torch.Tensor]] = {}
    from difffeat.distributed import progress_bar

    bar = progress_bar(len(paths), desc)
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        out = det(torch.stack([x for _, x in batch]))
        names.extend(p for p, _ in batch)
        for k, v in out.items():
            if k != "maps":
                parts.setdefault(k, []).append(v.float().cpu())
        run.done += len(batch)
        batch.clear()

    for p in paths:
        try:
            img = load_image(p)
            x = det.prepare(transform(img) if transform else img)
            if batch and batch[-1][1].shape != x.shape:  # whole images (AEROBLADE): a batch per run of one size
                flush()
            batch.append((p, x))
        except DiffFeatError as e:
            run.fail(p, f"{p}: {e}")
        bar.update(1)
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.close()
    return names, {k: torch.cat(v) for k, v in parts.items()}


def detection_metrics(prob_or_score: np.ndarray, labels: np.ndarray, calibrated: bool) -> dict[str, float]:
    """AP (fakes positive) and, for probabilities, ACC at 0.5 plus per-class accuracy."""
    from sklearn.metrics import average_precision_score

    s, y = np.asarray(prob_or_score, float), np.asarray(labels, int)
    if len(set(y.tolist())) < 2:
        raise BadInputError("evaluation needs both real and fake images")
    # uncalibrated scores are 'low = generated': flip so that higher = more likely fake
    ap = float(average_precision_score(y, s if calibrated else -s))
    res = {"ap": ap, "n_real": int((y == 0).sum()), "n_fake": int((y == 1).sum())}
    if calibrated:
        pred = s >= 0.5
        res.update(acc=float((pred == y).mean()), real_acc=float((~pred[y == 0]).mean()), fake_acc=float(pred[y == 1].mean()))
    return res


def evaluate(det: Detector, real: Sequence[Path], fake: Sequence[Path], batch_size: int = 8,
             normalize: tuple[int, int] | None = None, run: FolderRun | None = None) -> dict[str, float]:
    """ACC/AP of ``det`` on real and fake files; ``normalize=(size, quality)`` re-encodes both classes."""
    run = run or FolderRun(echo=lambda m: tqdm.write(m, file=sys.stderr))
    tf = None if normalize is None else (lambda im: normalize_format(im, normalize[0], normalize[1]))
    tag = "normalised" if normalize else "as-is"
    _, r = score_paths(det, real, batch_size, run, tf, desc=f"real ({tag})")
    _, f = score_paths(det, fake, batch_size, run, tf, desc=f"fake ({tag})")
    if "score" not in r or "score" not in f:
        raise BadInputError("no scorable images in one of the classes")
    key = "prob" if "prob" in r else "score"
    s = torch.cat([r[key], f[key]]).numpy()
    y = np.r_[np.zeros(len(r[key])), np.ones(len(f[key]))]
    return detection_metrics(s, y, calibrated=key == "prob")


def claim_folder(folder: Path, config: Mapping[str, Any], overwrite: bool) -> None:
    """Record which detector fills ``folder``; refuse to resume into one made by another."""
    from difffeat.runner import preflight

    preflight(folder)  # a read-only or full folder: one line, before anything is written
    stamp = folder / ".difffeat-detector.json"
    want = json.loads(json.dumps(config, default=str))
    if stamp.exists() and not overwrite and json.loads(stamp.read_text()) != want:
        raise BadInputError(f"{folder} holds results of another detector configuration; "
                            "use --overwrite or another output")
    save_json(stamp, want)


# --------------------------------------------------------------------------- CLI
def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--preset", default=None, help="Detect preset: dire-adm256, dire-sd, aeroblade."),
        click.option("-m", "--model", default=None, help="Diffusion model (preset name, local diffusers folder or hub id)."),
        click.option("--steps", type=int, default=None, help="DDIM steps (inversion and reconstruction each)."),
        click.option("--resolution", type=int, default=None, help="Square input size (DIRE: the preset's resize policy; AEROBLADE: centre crops of this size instead of whole images)."),
        click.option("--score", type=click.Choice(SCORES), default=None, help="Training-free statistic."),
        click.option("--autoencoder", "autoencoders", multiple=True,
                     help="AEROBLADE autoencoder MODEL[:COMPONENT] (repeatable; default: the preset's SD1, SD2, Kandinsky 2.1)."),
        click.option("-b", "--batch-size", type=int, default=8, show_default=True),
        click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None),
        click.option("--device", default=None),
        click.option("--compile", "compile_", is_flag=True,
                     help="torch.compile the denoiser (DIRE: ~2.4x on an H200; the first batch compiles)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _dire_overrides(steps: int | None, resolution: int | None) -> dict[str, Any]:
    return {k: v for k, v in (("steps", steps), ("resolution", resolution)) if v is not None}


def _echo(m: str) -> None:
    tqdm.write(m, file=sys.stderr)


def _detector(head: Path | None, training_free: bool, preset: str | None, model: str | None, steps: int | None,
              resolution: int | None, score: str | None, autoencoders: tuple[str, ...], dtype: str | None,
              device: str | None, compile_: bool = False) -> Detector:
    det = _make_detector(head, training_free, preset, model, steps, resolution, score, autoencoders, dtype, device)
    return det.compile() if compile_ else det


def _make_detector(head: Path | None, training_free: bool, preset: str | None, model: str | None, steps: int | None,
                   resolution: int | None, score: str | None, autoencoders: tuple[str, ...], dtype: str | None,
                   device: str | None) -> Detector:
    if head is not None and training_free:
        raise BadInputError("give either --head CKPT or --training-free, not both")
    if head is not None:
        if preset or steps or resolution or score or autoencoders:
            raise BadInputError("--preset/--steps/--resolution/--score/--autoencoder come from the checkpoint with --head")
        return load_detector(head, model, dtype, device, _echo)
    if not training_free:
        raise BadInputError("give --head CKPT (from `difffeat train dire`) or --training-free")
    return detector_from_preset(preset or "aeroblade", model, dire=_dire_overrides(steps, resolution), score=score,
                                autoencoders=autoencoders, dtype=dtype, device=device, echo=_echo)


@click.command("detect")
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--head", "head", type=click.Path(path_type=Path), default=None, help="Detector checkpoint folder.")
@click.option("--training-free", is_flag=True, help="Raw reconstruction-error score from --preset (default aeroblade).")
@_common
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Output CSV.")
@click.option("--save-dire", "dire_dir", type=click.Path(path_type=Path), default=None, help="Also write DIRE maps (PNG) here.")
@click.option("--overwrite", is_flag=True, help="Recompute images already scored.")
def detect_cmd(images: Path, head: Path | None, training_free: bool, preset: str | None, model: str | None,
               steps: int | None, resolution: int | None, score: str | None, autoencoders: tuple[str, ...],
               batch_size: int, dtype: str | None, device: str | None, compile_: bool, out: Path,
               dire_dir: Path | None, overwrite: bool) -> None:
    """Score every image under IMAGES: P(generated) per image into a CSV (resumable).

    Per-image rows are kept in OUT's sibling folder ``<name>.parts/`` until the CSV is
    assembled, so an interrupted run continues where it stopped.
    """
    from difffeat.pipeline import run_folder

    # under torchrun each rank scores its share (run_folder) on its GPU; every rank then
    # assembles the CSV from the parts present, so the last one to finish writes it whole
    det = _detector(head, training_free, preset, model, steps, resolution, score, autoencoders, dtype,
                    device, compile_)
    if dire_dir is not None and not det.makes_maps:
        raise BadInputError("--save-dire needs a DIRE detector; this one computes no DIRE maps")
    if det.calibration is None and det.classifier is None and det.head is None:
        _echo("note: uncalibrated training-free score: the prob column stays empty "
              "(calibrate with `difffeat train dire REAL FAKE --head training-free`)")
    parts = out.with_name(out.name + ".parts")
    claim_folder(parts, det.config, overwrite)
    root = Path(images)

    done: set[Path] = set()

    def process(items: list[Any]) -> None:
        todo, errors = [], []
        for it in items:
            try:
                todo.append((it, det.prepare(it.image)))
            except DiffFeatError as e:
                errors.append(e)
        sizes: dict[tuple[int, ...], list[tuple[Any, torch.Tensor]]] = {}
        for it, x in todo:  # whole images (AEROBLADE): one forward per image size in the batch
            sizes.setdefault(tuple(x.shape), []).append((it, x))
        for group in sizes.values():
            res = det(torch.stack([x for _, x in group]))
            for i, (it, _) in enumerate(group):
                if it.written or it.out in done:  # finished earlier, or before a bad image in its batch
                    continue
                if dire_dir is not None:
                    save_dire(output_path(dire_dir, root, it.path, ".png"), res["maps"][i])
                row = {k: float(v[i]) for k, v in res.items() if k != "maps"}
                save_json(it.out, {"image": str(it.path), **row})
                done.add(it.out)
        if errors:
            raise errors[0]

    failure: DiffFeatError | None = None
    try:
        run_folder(images, parts, ".json", process, batch_size=batch_size, overwrite=overwrite, desc="images", echo=_echo,
                   max_side=4 * det.size)
    except DiffFeatError as e:
        failure = e
    n = write_scores_csv(out, [output_path(parts, root, p, ".json") for p in list_images(root)], root)
    _echo(f"wrote {n} rows to {out}")
    if failure is not None:
        raise failure


def write_scores_csv(out: Path, part_files: Sequence[Path], root: Path) -> int:
    """Assemble per-image JSON rows into one CSV (image, prob, pred, score, extras...)."""
    from difffeat.io import atomic_path

    rows = [json.loads(p.read_text()) for p in part_files if p.exists()]
    extras = sorted({k for r in rows for k in r} - {"image", "prob", "score"})
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "prob", "pred", "score", *extras])
        for r in rows:
            prob = r.get("prob")
            pred = "" if prob is None else ("fake" if prob >= 0.5 else "real")
            w.writerow([r["image"], "" if prob is None else f"{prob:.6f}", pred, f"{r['score']:.6g}",
                        *[f"{r[k]:.6g}" if k in r else "" for k in extras]])
    return len(rows)


@click.command("dire")
@click.argument("real_dir", type=click.Path(path_type=Path))
@click.argument("fake_dir", type=click.Path(path_type=Path))
@click.option("--head", "head_kind", type=click.Choice(["classifier", "pooled", "training-free"]), default="classifier",
              show_default=True, help="ResNet on DIRE maps, linear head on pooled diffusion features, or calibrate a training-free score.")
@_common
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder.")
@click.option("--maps-dir", type=click.Path(path_type=Path), default=None, help="Where DIRE maps are cached (default OUT/maps).")
@click.option("--arch", default=None, help="timm architecture (default from the preset: resnet50.tv_in1k).")
@click.option("--pretrained/--no-pretrained", default=None, help="ImageNet init (default: if available locally).")
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--crop", type=int, default=None, help="Training crop of the maps.")
@click.option("--seed", type=int, default=0, show_default=True)
def train_dire_cmd(real_dir: Path, fake_dir: Path, head_kind: str, preset: str | None, model: str | None,
                   steps: int | None, resolution: int | None, score: str | None, autoencoders: tuple[str, ...],
                   batch_size: int, dtype: str | None, device: str | None, compile_: bool,
                   out: Path, maps_dir: Path | None, arch: str | None, pretrained: bool | None,
                   epochs: int | None, lr: float | None, crop: int | None, seed: int) -> None:
    """Train a detector on REAL_DIR vs FAKE_DIR (or calibrate a training-free score on them).

    -b sets the images per DIRE / feature batch; the classifier's own batch size, crop and
    learning rate come from the preset (``classifier:``) unless given here.
    """
    torch.manual_seed(seed)
    preset = preset or ("aeroblade" if score == "aeroblade" else "dire-adm256")
    p = get_detect_preset(preset)
    if head_kind != "training-free" and "dire" not in p["detect"]:
        raise BadInputError(f"preset {preset} has no diffusion model settings; --head {head_kind} needs dire-adm256 or dire-sd")
    dire_over = _dire_overrides(steps, resolution)
    run = FolderRun(echo=_echo)
    if head_kind == "training-free":
        det = detector_from_preset(preset, model, dire=dire_over, score=score, autoencoders=autoencoders,
                                   dtype=dtype, device=device, echo=_echo)
        if compile_:
            det.compile()
        _, r = score_paths(det, list_images(real_dir), batch_size, run, desc="real")
        _, f = score_paths(det, list_images(fake_dir), batch_size, run, desc="fake")
        if "score" not in r:
            raise BadInputError(f"no usable real images under {real_dir}")
        cal = calibrate(r["score"].numpy(), f["score"].numpy() if "score" in f else None)
        _echo(f"threshold {cal.threshold:.6g} (scale {cal.scale:.3g}, {cal.method}) from {cal.n_real} real / {cal.n_fake} fake")
        save_detector(out, {**det.config, "kind": "training-free", "calibration": cal.__dict__})
    elif head_kind == "pooled":
        cfg, head = _train_pooled(p, model, dire_over, real_dir, fake_dir, batch_size, epochs, lr, seed, dtype, device, run,
                                  compile_)
        save_detector(out, cfg, head)
    else:
        det = detector_from_preset(preset, model, dire=dire_over, score="dire", dtype=dtype, device=device, echo=_echo)
        if compile_:
            det.compile()
        maps_root = maps_dir or out / "maps"
        paths, labels = [], []
        for label, name, src in ((0, "real", real_dir), (1, "fake", fake_dir)):
            written = compute_maps_folder(det, src, maps_root / name, batch_size)
            paths += written
            labels += [label] * len(written)
        c = {**p["detect"].get("classifier", {}),
             **{k: v for k, v in (("arch", arch), ("crop", crop), ("lr", lr), ("epochs", epochs)) if v is not None}}
        arch_, lr_ = str(c.get("arch", "resnet50.tv_in1k")), float(c.get("lr", 1e-4))
        clf = DireClassifier(build_resnet(arch_, pretrained, _echo), min(int(c.get("crop", 224)), det.size))
        hist = fit_binary(clf, map_batches(paths, labels, int(c.get("batch_size", 64)), seed), int(c.get("epochs", 20)),
                          lr_, det.bb.device, _echo)
        save_detector(out, {**det.config, "kind": "dire-classifier", "history": hist, "maps": str(maps_root),
                            "classifier": {"arch": arch_, "crop": clf.crop, "lr": lr_}}, clf)
    _echo(f"saved detector to {out}")
    run.finish("images")


def _train_pooled(p: Mapping[str, Any], model: str | None, dire_over: Mapping[str, Any], real_dir: Path, fake_dir: Path,
                  batch_size: int, epochs: int | None, lr: float | None, seed: int, dtype: str | None,
                  device: str | None, run: FolderRun, compile_: bool = False) -> tuple[dict[str, Any], PooledFeatureHead]:
    """Extract pooled features of both folders once, then fit the linear head on them."""
    import difffeat

    feat = p["detect"].get("features", {})
    settings = DireSettings.from_dict(precedence(dire_over, p["detect"].get("dire")))  # options over the preset
    bb = _load_bb(_model_of(p, model), dtype, device)
    ex = difffeat.create(bb.source, backbone=bb, layers=feat.get("layers"), timesteps=feat.get("timesteps"),
                         resolution=settings.resolution, resize="resize", seed=seed, compile=compile_)
    head = PooledFeatureHead(ex.feature_info)
    xs = [_pooled_features(ex, head.names, settings, list_images(d), batch_size, run, name)
          for name, d in (("real", real_dir), ("fake", fake_dir))]
    x = torch.cat(xs)
    y = torch.cat([torch.zeros(len(xs[0])), torch.ones(len(xs[1]))])

    def batches(ep: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + ep))
        for i in range(0, len(y), max(1, batch_size)):
            idx = order[i : i + max(1, batch_size)]
            yield x[idx], y[idx]

    hist = fit_binary(head, batches, int(epochs or feat.get("epochs", 200)), float(lr or feat.get("lr", 1e-3)), "cpu")
    _echo(f"loss {hist[0]:.4f} -> {hist[-1]:.4f} over {len(hist)} epochs")
    cfg = {"kind": "pooled-features", "preset": p["name"], "backbone": _backbone_record(bb, ex),
           "resolution": settings.resolution, "resize": settings.resize, "seed": seed, "history": hist}
    return cfg, head


def _pooled_features(ex: Any, names: Sequence[str], settings: DireSettings, paths: Sequence[Path], batch_size: int,
                     run: FolderRun, desc: str) -> torch.Tensor:
    out: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            out.append(PooledFeatureHead.pool(ex(torch.stack(batch)), names).cpu())
            batch.clear()

    from difffeat.distributed import progress_bar

    bar = progress_bar(len(paths), desc)
    for p in paths:
        bar.update(1)
        try:
            batch.append(pil_to_tensor(fit_square(load_image(p), settings.resolution, settings.resize)))
        except DiffFeatError as e:
            run.fail(p, f"{p}: {e}")
        if len(batch) >= batch_size:
            flush()
    flush()
    if not out:
        raise BadInputError(f"no usable {desc} images")
    return torch.cat(out)


def compute_maps_folder(det: Detector, images: Path, out_dir: Path, batch_size: int) -> list[Path]:
    """DIRE maps of every image under ``images`` as PNGs under ``out_dir`` (resumable); returns the map paths."""
    from difffeat.pipeline import run_folder

    claim_folder(out_dir, {"backbone": det.config["backbone"], "dire": det.config["dire"]}, overwrite=False)

    def process(items: list[Any]) -> None:
        todo, errors = [], []
        for it in items:
            try:
                todo.append((it, det.prepare(it.image)))
            except DiffFeatError as e:
                errors.append(e)
        if todo:
            maps = compute_dire(det.bb, torch.stack([x for _, x in todo]), det.settings).maps  # type: ignore[arg-type]
            for i, (it, _) in enumerate(todo):
                if not it.out.exists():  # finished earlier, or before a bad image in its batch
                    save_dire(it.out, maps[i])
        if errors:
            raise errors[0]

    try:
        run_folder(images, out_dir, ".png", process, batch_size=batch_size, desc=f"DIRE {out_dir.name}", echo=_echo,
                   max_side=4 * det.size)
    except DiffFeatError as e:
        _echo(f"warning: {e}")
    paths = [output_path(out_dir, Path(images), p, ".png") for p in list_images(images)]
    return [p for p in paths if p.exists()]


@click.command("detect")
@click.argument("real_dir", type=click.Path(path_type=Path))
@click.argument("fake_dir", type=click.Path(path_type=Path))
@click.option("--head", "head", type=click.Path(path_type=Path), default=None, help="Detector checkpoint folder.")
@click.option("--training-free", is_flag=True, help="Evaluate the raw score of --preset (AP only unless calibrated).")
@_common
@click.option("--normalize-format", is_flag=True, help="Also report with both classes resized and JPEG re-encoded identically.")
@click.option("--jpeg-quality", type=int, default=96, show_default=True, help="JPEG quality of --normalize-format (ImageNet's typical 96).")
@click.option("--size", type=int, default=None, help="Square size of --normalize-format (default: the detector's input size).")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None, help="Write the metrics as JSON.")
def eval_detect_cmd(real_dir: Path, fake_dir: Path, head: Path | None, training_free: bool, preset: str | None,
                    model: str | None, steps: int | None, resolution: int | None, score: str | None,
                    autoencoders: tuple[str, ...], batch_size: int,
                    dtype: str | None, device: str | None, compile_: bool, normalize_format: bool, jpeg_quality: int, size: int | None,
                    out: Path | None) -> None:
    """ACC and AP of a detector on REAL_DIR vs FAKE_DIR, as-is and (--normalize-format) format-normalised."""
    det = _detector(head, training_free, preset, model, steps, resolution, score, autoencoders, dtype, device, compile_)
    real, fake = list_images(real_dir), list_images(fake_dir)
    run = FolderRun(echo=_echo)
    results = {"as-is": evaluate(det, real, fake, batch_size, None, run)}
    if normalize_format:
        results["normalized"] = evaluate(det, real, fake, batch_size, (size or det.size or 512, jpeg_quality), run)
        results["normalized"].update(jpeg_quality=jpeg_quality, size=size or det.size or 512)
    click.echo(f"{'setting':<12} {'ACC':>7} {'AP':>7} {'real ACC':>9} {'fake ACC':>9} {'n real':>7} {'n fake':>7}")
    for name, m in results.items():
        acc = lambda k: f"{100 * m[k]:.1f}" if k in m else "n/a"  # noqa: E731
        click.echo(f"{name:<12} {acc('acc'):>7} {100 * m['ap']:>7.1f} {acc('real_acc'):>9} {acc('fake_acc'):>9} "
                   f"{m['n_real']:>7} {m['n_fake']:>7}")
    if out is not None:
        save_json(out, results)
    if run.failed:
        _echo(f"{len(run.failed)} images could not be scored and were left out (first: {run.failed[0][0]})")
