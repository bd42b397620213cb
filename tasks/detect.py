"""Detecting diffusion-generated images: the work of ``difffeat detect``, ``train dire`` and ``eval detect``.

A :class:`Detector` turns prepared images into P(generated) and the statistics behind it.
It is built from a detector checkpoint (:func:`load_detector`: a ResNet on DIRE maps, a
pooled diffusion-feature head, or a calibrated training-free score) or from a preset in
``configs/detect/`` (:func:`detector_from_preset`): ``dire-adm256`` (DIRE, Wang et al.,
ICCV 2023), ``dire-sd`` (its latent variant) and ``aeroblade`` (Ricker et al., CVPR 2024).

The commands' options are the dataclasses below (:class:`DetectOptions`, :class:`DetectorOptions`,
:class:`TrainDireOptions`, :class:`NormalizeOptions`) plus the shared
:class:`~difffeat.options.ExtractorOptions` / :class:`~difffeat.options.FolderOptions`; a flag
the chosen method does not read is refused (:func:`check_flags`), not ignored. The functions
:func:`detect`, :func:`train_dire` and :func:`evaluate_detection` do the commands' work.

Evaluation reports ACC (at P = 0.5) and AP (fakes positive), both on the files as they are
and, with ``--normalize-format``, after passing *both* classes through the same resize and
the same JPEG quality, so a detector cannot win by telling JPEG reals from PNG fakes
(docs/detect.md explains why this matters for DIRE).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from difffeat.backbone import compile_denoiser
from difffeat.errors import BadInputError, DiffFeatError, one_of
from difffeat.heads.aeroblade import Autoencoder, VGGLayer2Distance, aeroblade_distances, load_autoencoder, whole_image
from difffeat.heads.checkpoint import check_backbone, feature_record
from difffeat.heads.dire import (
    Calibration, DireClassifier, DireSettings, PooledFeatureHead, build_resnet, calibrate,
    check_resolution, compute_dire, fit_binary, fit_square, load_detector_weights, map_batches, read_detector_config,
    save_detector, save_dire,
)
from difffeat.io import FolderRun, list_images, load_image, output_path, pil_to_tensor, save_json
from difffeat.options import ExtractorOptions, FolderOptions, flag_of, option
from difffeat.presets import precedence

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


# --------------------------------------------------------------------------- options
HEADS = ("classifier", "pooled", "training-free")


@dataclass
class DetectOptions:
    """The method: a preset of ``configs/detect/`` and its overrides.

    DIRE reads ``steps``, AEROBLADE ``autoencoders``; ``-m``/``--resolution`` come from
    :class:`~difffeat.options.ExtractorOptions`. A flag the method does not read is refused.
    """

    preset: str | None = option(None, "Detect preset: dire-adm256, dire-sd, aeroblade.")
    steps: int | None = option(None, "DIRE: DDIM steps (inversion and reconstruction each).", type=int, min=1)
    score: str | None = option(None, "Training-free statistic (default: the preset's).", choices=SCORES)
    autoencoders: tuple[str, ...] = option((), "AEROBLADE autoencoder MODEL[:COMPONENT] (repeatable; default: the "
                                           "preset's SD1, SD2, Kandinsky 2.1).", "--autoencoder", multiple=True, type=str)


@dataclass
class DetectorOptions:
    """Which detector ``detect`` and ``eval detect`` run: a checkpoint or a preset's raw score."""

    head: Path | None = option(None, "Detector checkpoint folder (from `difffeat train dire`).", path=True)
    training_free: bool = option(False, "No checkpoint: the raw score of --preset (default aeroblade); uncalibrated, "
                                 "so no prob column and AP only.", is_flag=True)


@dataclass
class TrainDireOptions:
    """What ``train dire`` fits; unset values come from the preset's ``classifier:`` / ``features:``."""

    head: str = option("classifier", "ResNet on DIRE maps, linear head on pooled diffusion features, or calibrate "
                       "a training-free score.", choices=HEADS)
    maps_dir: Path | None = option(None, "Where DIRE maps are cached (default OUT/maps).", path=True)
    arch: str | None = option(None, "timm architecture (default from the preset: resnet50.tv_in1k).")
    pretrained: bool | None = option(None, "ImageNet init (default: if available locally).", secondary="--no-pretrained")
    epochs: int | None = option(None, "Training epochs (default: the preset's).", type=int, min=1)
    lr: float | None = option(None, "Learning rate (default: the preset's).", type=float)
    crop: int | None = option(None, "Training crop of the maps.", type=int, min=1)


@dataclass
class NormalizeOptions:
    """``eval detect --normalize-format``: both classes resized and JPEG re-encoded alike."""

    normalize_format: bool = option(False, "Also report with both classes resized and JPEG re-encoded identically.",
                                    is_flag=True)
    jpeg_quality: int = option(96, "JPEG quality of --normalize-format (ImageNet's typical 96).", min=1)
    size: int | None = option(None, "Square size of --normalize-format (default: the detector's input size).",
                              type=int, min=1)

    def __post_init__(self) -> None:
        if not self.normalize_format and (self.size is not None or self.jpeg_quality != 96):
            raise BadInputError("--size and --jpeg-quality set up --normalize-format; add --normalize-format")


#: the modes that read each flag: ``dire`` / ``aeroblade`` (a preset's score, raw or calibrated)
#: and the trained heads ``classifier`` / ``pooled``; flags not listed apply everywhere
_READ_BY: dict[str, tuple[str, ...]] = {
    "model": ("dire", "classifier", "pooled"), "compile": ("dire", "classifier", "pooled"),
    "steps": ("dire", "classifier"), "score": ("dire", "aeroblade"), "autoencoders": ("aeroblade",),
    "maps_dir": ("classifier",), "arch": ("classifier",), "pretrained": ("classifier",), "crop": ("classifier",),
    "epochs": ("classifier", "pooled"), "lr": ("classifier", "pooled"),
}
_MODE_NAMES = {"dire": "DIRE", "aeroblade": "AEROBLADE (its models are --autoencoder MODEL[:COMPONENT])",
               "classifier": "--head classifier", "pooled": "--head pooled"}


def check_flags(mode: str, *opts: Any) -> None:
    """Refuse the flags set in ``opts`` (options dataclasses) that ``mode`` does not read."""
    given = [f for o in opts for f in dataclasses.fields(o)
             if mode not in _READ_BY.get(f.name, (mode,)) and getattr(o, f.name) != f.default]
    if given:
        names = ", ".join("/".join(flag_of(f).flags or ["--" + f.name.replace("_", "-")]) for f in given)  # type: ignore[union-attr]
        raise BadInputError(f"{names} {'does' if len(given) == 1 else 'do'} not apply to {_MODE_NAMES[mode]}")


def method_of(preset: str, score: str | None = None) -> str:
    """``aeroblade`` or ``dire``: the training-free method of ``preset`` under ``--score``."""
    chosen = score or get_detect_preset(preset)["detect"].get("score", "dire")
    return "aeroblade" if chosen == "aeroblade" else "dire"


def _checkpoint_mode(path: Path) -> str:
    cfg = read_detector_config(path)
    if cfg.get("backbone", {}).get("preset") == "aeroblade":
        return "aeroblade"
    return "pooled" if cfg["kind"] == "pooled-features" else "dire"


def _dire_overrides(steps: int | None, resolution: int | None) -> dict[str, Any]:
    return {k: v for k, v in (("steps", steps), ("resolution", resolution)) if v is not None}


def _echo(m: str) -> None:
    tqdm.write(m, file=sys.stderr)


def build_detector(source: DetectorOptions, method: DetectOptions, ex: ExtractorOptions) -> Detector:
    """The detector of ``detect`` / ``eval detect``: the checkpoint ``source.head``, or with
    ``source.training_free`` the raw score of ``method.preset`` (default ``aeroblade``)."""
    if source.head is not None and source.training_free:
        raise BadInputError("give either --head CKPT or --training-free, not both")
    if source.head is not None:
        if method != DetectOptions() or ex.resolution is not None:
            raise BadInputError("--preset/--steps/--resolution/--score/--autoencoder come from the checkpoint with --head")
        check_flags(_checkpoint_mode(source.head), ex)
        det = load_detector(source.head, ex.model, ex.dtype, ex.device, _echo)
    elif not source.training_free:
        raise BadInputError("give --head CKPT (from `difffeat train dire`) or --training-free")
    else:
        preset = method.preset or "aeroblade"
        check_flags(method_of(preset, method.score), method, ex)
        det = detector_from_preset(preset, ex.model, dire=_dire_overrides(method.steps, ex.resolution),
                                   score=method.score, autoencoders=method.autoencoders, dtype=ex.dtype,
                                   device=ex.device, echo=_echo)
    return det.compile() if ex.compile else det


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


def detect_batch(det: Detector, xs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``det`` on prepared images, outputs in the order of ``xs``.

    Whole images (AEROBLADE, ``resize: none``) differ in size: one forward per size. The one
    place detection batches by shape (folder runs, :func:`score_paths`).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(tuple(x.shape), []).append(i)
    outs = [det(torch.stack([xs[i] for i in idx])) for idx in groups.values()]
    if len(outs) == 1:
        return outs[0]
    where = torch.argsort(torch.tensor([i for idx in groups.values() for i in idx]))
    return {k: torch.cat([o[k] for o in outs])[where] for k in outs[0]}


def _map_paths(paths: Sequence[Path], prepare: Callable[[Image.Image], torch.Tensor],
               forward: Callable[[list[torch.Tensor]], Any], batch_size: int, run: FolderRun,
               desc: str) -> tuple[list[Path], list[Any]]:
    """``forward`` on batches of prepared image files; unreadable or too-small ones are reported in ``run``."""
    from difffeat.distributed import progress_bar

    names: list[Path] = []
    outs: list[Any] = []
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        if batch:
            outs.append(forward([x for _, x in batch]))
            names.extend(p for p, _ in batch)
            run.done += len(batch)
            batch.clear()

    bar = progress_bar(len(paths), desc)
    for p in paths:
        try:
            batch.append((p, prepare(load_image(p))))
        except DiffFeatError as e:
            run.fail(p, f"{p}: {e}")
        bar.update(1)
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.close()
    return names, outs


def score_paths(det: Detector, paths: Sequence[Path], batch_size: int, run: FolderRun,
                transform: Callable[[Image.Image], Image.Image] | None = None,
                desc: str = "images") -> tuple[list[Path], dict[str, torch.Tensor]]:
    """Score image files in batches; unreadable or too-small ones are reported in ``run`` and skipped."""
    prepare = (lambda im: det.prepare(transform(im))) if transform else det.prepare
    names, outs = _map_paths(paths, prepare, lambda xs: detect_batch(det, xs), batch_size, run, desc)
    keys = [k for k in (outs[0] if outs else {}) if k != "maps"]
    return names, {k: torch.cat([o[k].float().cpu() for o in outs]) for k in keys}


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
    run = run or FolderRun(echo=_echo)
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


def _prepared(det: Detector, items: Sequence[Any]) -> tuple[list[tuple[Any, torch.Tensor]], DiffFeatError | None]:
    """Each folder item's image prepared for ``det``; the first that cannot be is returned apart
    (raised after the batch, so the runner retries the batch item by item and names it)."""
    todo, error = [], None
    for it in items:
        try:
            todo.append((it, det.prepare(it.image)))
        except DiffFeatError as e:
            error = error or e
    return todo, error


# --------------------------------------------------------------------------- detect
def detect(images: Path, out: Path, det: Detector, run: FolderOptions, dire_dir: Path | None = None) -> int:
    """Score every image under ``images``: P(generated) per image into the CSV ``out``; returns its rows.

    Per-image rows are kept in ``<out>.parts/`` until the CSV is assembled, so an interrupted
    run continues where it stopped. Under torchrun each rank scores its share on its GPU and
    then assembles the CSV from the parts present, so the last one to finish writes it whole.
    """
    from difffeat.pipeline import run_folder

    if dire_dir is not None and not det.makes_maps:
        raise BadInputError("--save-dire needs a DIRE detector; this one computes no DIRE maps")
    if det.calibration is None and det.classifier is None and det.head is None:
        _echo("note: uncalibrated training-free score: the prob column stays empty "
              "(calibrate with `difffeat train dire REAL FAKE --head training-free`)")
    root = Path(images)
    parts = out.with_name(out.name + ".parts")
    claim_folder(parts, det.config, run.overwrite)
    failure: DiffFeatError | None = None
    try:
        run_folder(root, parts, ".json", _row_writer(det, root, dire_dir), batch_size=run.batch_size,
                   overwrite=run.overwrite, desc="images", echo=_echo, max_side=4 * det.size)
    except DiffFeatError as e:
        failure = e
    n = write_scores_csv(out, [output_path(parts, root, p, ".json") for p in list_images(root)], root)
    _echo(f"wrote {n} rows to {out}")
    if failure is not None:
        raise failure
    return n


def _row_writer(det: Detector, root: Path, dire_dir: Path | None) -> Callable[[list[Any]], None]:
    """The folder run's ``process``: one JSON row per image (and its DIRE map with ``dire_dir``)."""
    done: set[Path] = set()

    def process(items: list[Any]) -> None:
        todo, error = _prepared(det, items)
        if todo:
            res = detect_batch(det, [x for _, x in todo])
            for i, (it, _) in enumerate(todo):
                if it.written or it.out in done:  # finished earlier, or before a bad image in its batch
                    continue
                if dire_dir is not None:
                    save_dire(output_path(dire_dir, root, it.path, ".png"), res["maps"][i])
                save_json(it.out, {"image": str(it.path), **{k: float(v[i]) for k, v in res.items() if k != "maps"}})
                done.add(it.out)
        if error is not None:
            raise error

    return process


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


# --------------------------------------------------------------------------- train dire
@dataclass
class _Training:
    """One ``train dire`` run, as the three head kinds read it."""

    preset: Mapping[str, Any]  # the parsed configs/detect YAML
    real_dir: Path
    fake_dir: Path
    out: Path
    train: TrainDireOptions
    method: DetectOptions
    ex: ExtractorOptions
    batch_size: int
    run: FolderRun

    def settings(self) -> DireSettings:
        """The preset's DIRE settings under ``--steps`` / ``--resolution``."""
        over = _dire_overrides(self.method.steps, self.ex.resolution)
        return DireSettings.from_dict(precedence(over, self.preset["detect"].get("dire")))

    def detector(self, score: str | None) -> Detector:
        """The preset's uncalibrated detector under these options (compiled with ``--compile``)."""
        det = detector_from_preset(self.preset["name"], self.ex.model,
                                   dire=_dire_overrides(self.method.steps, self.ex.resolution), score=score,
                                   autoencoders=self.method.autoencoders, dtype=self.ex.dtype, device=self.ex.device,
                                   echo=_echo)
        return det.compile() if self.ex.compile else det


def train_dire(real_dir: Path, fake_dir: Path, out: Path, train: TrainDireOptions, method: DetectOptions,
               ex: ExtractorOptions, batch_size: int = 4) -> Path:
    """Train a detector on ``real_dir`` vs ``fake_dir`` (or calibrate a training-free score) into ``out``.

    ``train.head``: ``classifier`` (DIRE's ResNet on DIRE maps, Wang et al., ICCV 2023),
    ``pooled`` (a linear head on pooled diffusion features) or ``training-free`` (a threshold
    on the preset's raw score). ``batch_size`` is the images per DIRE / feature batch; the
    classifier's own batch size, crop and learning rate come from the preset unless given.
    The preset defaults to ``dire-adm256`` (``aeroblade`` with ``--score aeroblade``).
    """
    torch.manual_seed(ex.seed)
    name = method.preset or ("aeroblade" if method.score == "aeroblade" else "dire-adm256")
    p = get_detect_preset(name)
    if train.head != "training-free" and "dire" not in p["detect"]:
        raise BadInputError(f"preset {name} has no diffusion model settings; --head {train.head} needs dire-adm256 or dire-sd")
    check_flags(method_of(name, method.score) if train.head == "training-free" else train.head, train, method, ex)
    job = _Training(p, real_dir, fake_dir, out, train, method, ex, batch_size, FolderRun(echo=_echo))
    {"training-free": _calibrate, "pooled": _train_pooled, "classifier": _train_classifier}[train.head](job)
    _echo(f"saved detector to {out}")
    job.run.finish("images")
    return out


def _calibrate(job: _Training) -> None:
    """``--head training-free``: a threshold on the preset's raw score from both folders."""
    det = job.detector(job.method.score)
    _, r = score_paths(det, list_images(job.real_dir), job.batch_size, job.run, desc="real")
    _, f = score_paths(det, list_images(job.fake_dir), job.batch_size, job.run, desc="fake")
    if "score" not in r:
        raise BadInputError(f"no usable real images under {job.real_dir}")
    cal = calibrate(r["score"].numpy(), f["score"].numpy() if "score" in f else None)
    _echo(f"threshold {cal.threshold:.6g} (scale {cal.scale:.3g}, {cal.method}) from {cal.n_real} real / {cal.n_fake} fake")
    save_detector(job.out, {**det.config, "kind": "training-free", "calibration": cal.__dict__})


def _train_classifier(job: _Training) -> None:
    """``--head classifier``: DIRE maps of both folders (cached as PNGs), then the ResNet on them."""
    det = job.detector("dire")
    maps_root = job.train.maps_dir or job.out / "maps"
    paths, labels = [], []
    for label, name, src in ((0, "real", job.real_dir), (1, "fake", job.fake_dir)):
        written = compute_maps_folder(det, src, maps_root / name, job.batch_size)
        paths += written
        labels += [label] * len(written)
    t = job.train
    c = precedence({"arch": t.arch, "crop": t.crop, "lr": t.lr, "epochs": t.epochs}, job.preset["detect"].get("classifier"))
    arch, lr = str(c.get("arch", "resnet50.tv_in1k")), float(c.get("lr", 1e-4))
    clf = DireClassifier(build_resnet(arch, t.pretrained, _echo), min(int(c.get("crop", 224)), det.size))
    hist = fit_binary(clf, map_batches(paths, labels, int(c.get("batch_size", 64)), job.ex.seed), int(c.get("epochs", 20)),
                      lr, det.bb.device, _echo)
    save_detector(job.out, {**det.config, "kind": "dire-classifier", "history": hist, "maps": str(maps_root),
                            "classifier": {"arch": arch, "crop": clf.crop, "lr": lr}}, clf)


def _train_pooled(job: _Training) -> None:
    """``--head pooled``: pooled features of both folders, extracted once, then the linear head on them."""
    import difffeat

    p, seed = job.preset, job.ex.seed
    feat = p["detect"].get("features", {})
    settings = job.settings()
    bb = _load_bb(_model_of(p, job.ex.model), job.ex.dtype, job.ex.device)
    extractor = difffeat.create(bb.source, backbone=bb, layers=feat.get("layers"), timesteps=feat.get("timesteps"),
                                resolution=settings.resolution, resize="resize", seed=seed, compile=job.ex.compile)
    head = PooledFeatureHead(extractor.feature_info)
    xs = [_pooled_features(extractor, head.names, settings, list_images(d), job.batch_size, job.run, name)
          for name, d in (("real", job.real_dir), ("fake", job.fake_dir))]
    x = torch.cat(xs)
    y = torch.cat([torch.zeros(len(xs[0])), torch.ones(len(xs[1]))])

    def batches(ep: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + ep))
        for i in range(0, len(y), max(1, job.batch_size)):
            idx = order[i : i + max(1, job.batch_size)]
            yield x[idx], y[idx]

    epochs, lr = int(job.train.epochs or feat.get("epochs", 200)), float(job.train.lr or feat.get("lr", 1e-3))
    hist = fit_binary(head, batches, epochs, lr, "cpu")
    _echo(f"loss {hist[0]:.4f} -> {hist[-1]:.4f} over {len(hist)} epochs")
    cfg = {"kind": "pooled-features", "preset": p["name"], "backbone": _backbone_record(bb, extractor),
           "resolution": settings.resolution, "resize": settings.resize, "seed": seed, "history": hist}
    save_detector(job.out, cfg, head)


def _pooled_features(ex: Any, names: Sequence[str], settings: DireSettings, paths: Sequence[Path], batch_size: int,
                     run: FolderRun, desc: str) -> torch.Tensor:
    """Pooled features [N, C] of the readable images among ``paths``."""
    def prepare(img: Image.Image) -> torch.Tensor:
        return pil_to_tensor(fit_square(img, settings.resolution, settings.resize))

    _, out = _map_paths(paths, prepare, lambda xs: PooledFeatureHead.pool(ex(torch.stack(xs)), names).cpu(),
                        batch_size, run, desc)
    if not out:
        raise BadInputError(f"no usable {desc} images")
    return torch.cat(out)


def compute_maps_folder(det: Detector, images: Path, out_dir: Path, batch_size: int) -> list[Path]:
    """DIRE maps of every image under ``images`` as PNGs under ``out_dir`` (resumable); returns the map paths."""
    from difffeat.pipeline import run_folder

    claim_folder(out_dir, {"backbone": det.config["backbone"], "dire": det.config["dire"]}, overwrite=False)

    def process(items: list[Any]) -> None:
        todo, error = _prepared(det, items)
        if todo:
            maps = detect_batch(det, [x for _, x in todo])["maps"]
            for i, (it, _) in enumerate(todo):
                if not it.out.exists():  # finished earlier, or before a bad image in its batch
                    save_dire(it.out, maps[i])
        if error is not None:
            raise error

    try:
        run_folder(images, out_dir, ".png", process, batch_size=batch_size, desc=f"DIRE {out_dir.name}", echo=_echo,
                   max_side=4 * det.size)
    except DiffFeatError as e:
        _echo(f"warning: {e}")
    paths = [output_path(out_dir, Path(images), p, ".png") for p in list_images(images)]
    return [p for p in paths if p.exists()]


# --------------------------------------------------------------------------- eval detect
@dataclass
class Evaluation:
    """``eval detect``'s result: metrics per setting (``as-is``, ``normalized``) and the images left out."""

    metrics: dict[str, dict[str, float]]
    failed: list[tuple[str, str]]

    def table(self) -> list[str]:
        """The metrics as a text table (ACC columns ``n/a`` for uncalibrated scores)."""
        lines = [f"{'setting':<12} {'ACC':>7} {'AP':>7} {'real ACC':>9} {'fake ACC':>9} {'n real':>7} {'n fake':>7}"]
        for name, m in self.metrics.items():
            acc = lambda k: f"{100 * m[k]:.1f}" if k in m else "n/a"  # noqa: E731
            lines.append(f"{name:<12} {acc('acc'):>7} {100 * m['ap']:>7.1f} {acc('real_acc'):>9} {acc('fake_acc'):>9} "
                         f"{m['n_real']:>7} {m['n_fake']:>7}")
        return lines

    def note(self) -> str | None:
        """One line about the images that could not be scored (None: all were)."""
        if not self.failed:
            return None
        return f"{len(self.failed)} images could not be scored and were left out (first: {self.failed[0][0]})"


def evaluate_detection(real_dir: Path, fake_dir: Path, det: Detector, batch_size: int = 4,
                       norm: NormalizeOptions | None = None, out: Path | None = None) -> Evaluation:
    """ACC and AP of ``det`` on ``real_dir`` vs ``fake_dir``, as-is and (``norm.normalize_format``)
    with both classes resized and JPEG re-encoded alike; the metrics also go to the JSON ``out``."""
    norm = norm or NormalizeOptions()
    real, fake = list_images(real_dir), list_images(fake_dir)
    run = FolderRun(echo=_echo)
    results = {"as-is": evaluate(det, real, fake, batch_size, None, run)}
    if norm.normalize_format:
        size = norm.size or det.size or 512
        results["normalized"] = {**evaluate(det, real, fake, batch_size, (size, norm.jpeg_quality), run),
                                 "jpeg_quality": norm.jpeg_quality, "size": size}
    if out is not None:
        save_json(out, results)
    return Evaluation(results, list(run.failed))
