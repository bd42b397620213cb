"""DIRE: diffusion reconstruction error, and detectors of diffusion-generated images.

DIRE (Wang et al., "DIRE for Diffusion-Generated Image Detection", ICCV 2023) inverts an
image to noise with deterministic DDIM, reconstructs it, and keeps |x - x̂|: images a
diffusion model generated are reconstructed almost exactly, real photos are not. The
paper used the ADM 256² unconditional model with 20 DDIM steps (``ddim20``) and trained
an ImageNet-initialised ResNet-50 on the maps (Adam, lr 1e-4, batch 64, random 224 crops
of the 256² maps, flips); trained on ADM LSUN-Bedroom fakes it reports 100.0 ACC / 100.0
AP on that test set (DiffusionForensics).

What difffeat does differently, and why:

* The reference is ``compute_dire.py`` (guided-diffusion with ``--timestep_respacing
  ddim20 --use_ddim True``, ``clip_denoised=True``). ``DireSettings()`` reproduces it:
  the ``guided-diffusion`` inversion pairing of :mod:`difffeat.heads.ddim`, the
  reference's ``center_crop_arr`` preprocessing (``resize: guided-diffusion``, which also
  upsamples images smaller than the input size, as the reference does) and its uint8
  cast of ``|x - x̂| * 255/2`` (a floor, :func:`quantize`). ``pairing: diffusers`` and
  ``resize: resize`` (one bicubic step; refuses small images) are named deviations.
* Maps are quantised to 8 bits once, exactly what :func:`save_dire` writes losslessly as
  PNG, so a classifier sees the same numbers whether maps come from memory or disk. The
  reference code writes each map in its *input's* file format, so JPEG reals get JPEG maps and PNG
  fakes PNG maps, and its released classifier separates the two by that alone (DIRE
  issues #30/#41); see ``docs/detect.md``.
* Latent models (SD): the image is encoded once (posterior mean), the latent is inverted
  and reconstructed, and the error is measured between the input pixels and the decoded
  reconstruction; |z - ẑ| is returned too (``DireOutput.latent``).

Detectors in this module:

* :class:`DireClassifier`: a timm ResNet (default ResNet-50) on DIRE maps, as the paper.
* :class:`PooledFeatureHead`: a light alternative, a linear classifier on globally pooled
  diffusion features of one denoiser pass (no inversion; 1 forward instead of 40).
* :class:`Calibration`: a threshold for training-free scores (mean DIRE, latent DIRE,
  AEROBLADE in :mod:`difffeat.heads.aeroblade`) set on a small calibration set.

Checkpoints are a folder ``detector.safetensors`` + ``detector.json`` (no pickle);
``difffeat.tasks.detect.load_detector`` refuses one made for another backbone with
:class:`~difffeat.errors.CheckpointMismatchError`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from difffeat.backbone import DiffusionBackbone
from difffeat.errors import BadInputError
from difffeat.io import pil_to_tensor, save_png

from .checkpoint import read_checkpoint, read_tensors, write_checkpoint
from .ddim import SPACINGS, check_ddim_support, check_pairing, default_conditioning, invert_and_reconstruct

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_POLICIES = ("guided-diffusion", "resize", "crop")


# --------------------------------------------------------------------------- inputs
def fit_square(img: Image.Image, size: int, policy: str = "guided-diffusion") -> Image.Image:
    """A ``size``² square from the image centre.

    ``guided-diffusion``: DIRE's input, guided-diffusion's ``center_crop_arr``
    (image_datasets.py): halve with BOX while the short side is >= 2·size, resize the
    short side to ``size`` (bicubic; this upsamples smaller images), centre-crop.
    ``resize``: one bicubic resize of the short side to ``size``, then centre-crop.
    ``crop``: centre-crop only, no resampling.
    ``resize`` and ``crop`` raise :class:`BadInputError` when the image is smaller than
    ``size``: upsampling makes any image smooth, hence "easy to reconstruct", hence
    fake-looking.
    """
    if policy not in RESIZE_POLICIES:
        raise BadInputError(f"unknown resize policy {policy!r}; valid: {', '.join(RESIZE_POLICIES)}")
    if policy == "guided-diffusion":
        return _center_crop_arr(img, size)
    w, h = img.size
    if min(w, h) < size:
        raise BadInputError(
            f"image is {w}x{h}, smaller than the detector's {size}px input; upsampled images "
            "reconstruct unrealistically well, so they cannot be scored"
        )
    if policy == "resize" and min(w, h) != size:
        s = size / min(w, h)
        w, h = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


# --------------------------------------------------------------------------- DIRE maps
@dataclass(frozen=True)
class DireSettings:
    """How DIRE maps are computed (a preset's ``dire:`` section); the defaults are DIRE's
    ``compute_dire.py`` with ``ddim20`` and ``clip_denoised=True``."""

    steps: int = 20
    spacing: str = "leading"
    resolution: int = 256
    resize: str = "guided-diffusion"
    clip_x0: bool = True
    pairing: str = "guided-diffusion"
    prompt: str = ""
    max_batch: int = 16

    def __post_init__(self) -> None:
        check_pairing(self.pairing)
        if self.spacing not in SPACINGS:
            raise BadInputError(f"unknown DDIM spacing {self.spacing!r}; valid: {', '.join(SPACINGS)}")
        if self.resize not in RESIZE_POLICIES:
            raise BadInputError(f"unknown resize policy {self.resize!r}; valid: {', '.join(RESIZE_POLICIES)}")
        if self.steps < 1 or self.resolution < 1:
            raise BadInputError(f"DIRE needs steps >= 1 and resolution >= 1, got {self.steps}, {self.resolution}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DireSettings":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise BadInputError(f"unknown DIRE settings {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**known)


@dataclass
class DireOutput:
    """DIRE of a batch (all on CPU, fp32)."""

    maps: torch.Tensor  # [B,3,H,W] |x - x̂| in [0,1], quantised to 8 bits
    recon: torch.Tensor  # [B,3,H,W] reconstruction in [0,1]
    latent: torch.Tensor | None = None  # [B,C,h,w] |z - ẑ| for latent models

    @property
    def pixel_error(self) -> torch.Tensor:
        """Mean DIRE per image [B] (a training-free score: low = looks generated)."""
        return self.maps.mean(dim=(1, 2, 3))

    @property
    def latent_error(self) -> torch.Tensor | None:
        return None if self.latent is None else self.latent.mean(dim=(1, 2, 3))


def quantize(err255: torch.Tensor) -> torch.Tensor:
    """Errors in grey levels -> maps in [0,1] on the 8-bit grid a PNG stores.

    A floor, as the reference's ``(dire * 255 / 2).clamp(0, 255).to(uint8)`` (compute_dire.py).
    """
    return torch.floor(err255.clamp(0, 255)) / 255


def check_resolution(bb: DiffusionBackbone, resolution: int) -> None:
    if resolution % bb.size_multiple:
        raise BadInputError(f"resolution {resolution} is not a multiple of {bb.size_multiple} for {bb.name}")


@torch.no_grad()
def compute_dire(bb: DiffusionBackbone, images: torch.Tensor, settings: DireSettings = DireSettings()) -> DireOutput:
    """DIRE maps of ``images`` ([B,3,H,W] in [0,1]) with DDIM inversion + reconstruction.

    Pixel models invert 2x-1 directly; latent models invert the VAE posterior mean and
    decode. The ODE state stays in fp32; only the denoiser runs in ``bb.dtype``. Each
    image costs ``2 * settings.steps`` denoiser calls.
    """
    check_ddim_support(bb)
    if images.dim() != 4 or images.shape[1] != 3:
        raise BadInputError(f"images must have shape [B,3,H,W], got {list(images.shape)}")
    m = bb.size_multiple
    if images.shape[-1] % m or images.shape[-2] % m:
        raise BadInputError(f"image size {images.shape[-1]}x{images.shape[-2]} is not a multiple of {m} for {bb.name}")
    x = images.float().to(bb.device)
    z = x * 2 - 1 if bb.vae is None else bb.encode(x)[0].float()
    cond = default_conditioning(bb, z, settings.prompt)
    z_hat = invert_and_reconstruct(bb, z, settings.steps, cond, settings.clip_x0, settings.max_batch, settings.spacing,
                                   settings.pairing)
    if bb.vae is None:  # as the reference: |x - x̂| in [-1, 1] units * 255/2, x̂ unclamped
        recon, err255 = ((z_hat + 1) / 2).clamp(0, 1), (z - z_hat).abs() * 127.5
    else:
        recon = bb.decode(z_hat).float()
        err255 = (x - recon).abs() * 255
    maps = quantize(err255)
    latent = None if bb.vae is None else (z - z_hat).abs().cpu()
    return DireOutput(maps.cpu(), recon.cpu(), latent)


def dire_to_pil(dire_map: torch.Tensor) -> Image.Image:
    """One map [3,H,W] in [0,1] -> 8-bit RGB image."""
    arr = (dire_map.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def save_dire(path: str | os.PathLike, dire_map: torch.Tensor) -> None:
    """Write a map losslessly (PNG, whatever the input image's format was)."""
    if Path(path).suffix.lower() != ".png":
        raise BadInputError(f"DIRE maps are written as PNG only (lossless), got {path}")
    save_png(path, dire_to_pil(dire_map))


def load_dire(path: str | os.PathLike) -> torch.Tensor:
    """Read a DIRE map as [3,H,W] in [0,1]."""
    from difffeat.io import load_image

    return pil_to_tensor(load_image(path))


# --------------------------------------------------------------------------- classifiers
def build_resnet(arch: str = "resnet50.tv_in1k", pretrained: bool | None = None,
                 echo: Callable[[str], Any] | None = None) -> nn.Module:
    """A timm classifier with one output logit.

    ``pretrained=None``: ImageNet weights when they are in the local timm/HF cache (or
    downloadable), otherwise random with one warning line. DIRE used torchvision's
    ImageNet ResNet-50, which timm names ``resnet50.tv_in1k``.
    """
    import timm

    if not timm.is_model(arch.split(".")[0]):
        raise BadInputError(f"unknown timm architecture {arch!r} (see timm.list_models())")
    if pretrained is not False:
        try:
            return timm.create_model(arch, pretrained=True, num_classes=1)
        except Exception as e:  # offline and not cached, or no weights for this tag
            if pretrained:
                raise BadInputError(f"ImageNet weights for {arch} are not available: {type(e).__name__}") from None
            (echo or (lambda m: print(m, file=sys.stderr)))(
                f"warning: ImageNet weights for {arch} not available locally ({type(e).__name__}); training from random init")
    return timm.create_model(arch, pretrained=False, num_classes=1)


class DireClassifier(nn.Module):
    """A CNN on DIRE maps -> one logit per image (positive = generated).

    Training: random ``crop``² crops and horizontal flips; evaluation: centre crop. Maps
    are normalised with ImageNet statistics (as the DIRE reference, ``aug_norm``).
    """

    def __init__(self, net: nn.Module, crop: int = 224) -> None:
        super().__init__()
        self.net, self.crop = net, int(crop)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = crop_maps(maps, self.crop, train=self.training)
        return self.net((x - self.mean) / self.std).squeeze(-1)


def crop_maps(maps: torch.Tensor, crop: int, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Centre crop (eval) or random crop + flip (train) of a batch of maps to ``crop``²."""
    h, w = maps.shape[-2:]
    c = min(crop, h, w)
    if train:
        top = int(torch.randint(0, h - c + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - c + 1, (1,), generator=generator))
        out = maps[..., top : top + c, left : left + c]
        flip = torch.rand(maps.shape[0], generator=generator) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1).to(out.device), out.flip(-1), out)
    top, left = (h - c) // 2, (w - c) // 2
    return maps[..., top : top + c, left : left + c]


class PooledFeatureHead(nn.Module):
    """Light detector: global-average-pool each diffusion feature, concat, LayerNorm, linear -> logit."""

    def __init__(self, feature_info: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.names = [str(f["name"]) for f in feature_info]
        dim = sum(int(f["channels"]) for f in feature_info)
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, 1)

    @staticmethod
    def pool(feats: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
        missing = [n for n in names if n not in feats]
        if missing:
            raise BadInputError(f"head expects features {list(names)}, missing {missing}")
        return torch.cat([feats[n].float().mean(dim=(-2, -1)) for n in names], dim=1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled``: [B, D] from :meth:`pool`."""
        return self.linear(self.norm(pooled)).squeeze(-1)


def fit_binary(
    model: nn.Module,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    lr: float = 1e-4,
    device: torch.device | str = "cpu",
    echo: Callable[[str], Any] | None = None,
) -> list[float]:
    """Train ``model`` (inputs -> logits) with BCE and Adam; returns the mean loss per epoch.

    ``batches(epoch)`` yields (inputs, labels in {0,1}) — a fresh shuffle per epoch.
    """
    model.to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    history: list[float] = []
    for ep in range(int(epochs)):
        total, n = 0.0, 0
        for x, y in batches(ep):
            logits = model(x.to(device))
            loss = F.binary_cross_entropy_with_logits(logits.float(), y.to(device).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        history.append(total / max(n, 1))
        if echo:
            echo(f"epoch {ep + 1}/{epochs}: loss {history[-1]:.4f}")
    model.eval()
    return history


def map_batches(paths: Sequence[Path], labels: Sequence[int], batch_size: int, seed: int = 0) -> Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """Shuffled batches of DIRE maps read from PNG files (all maps the same size)."""
    y_all = torch.tensor(list(labels), dtype=torch.float32)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            maps = [load_dire(paths[j]) for j in idx]
            if len({tuple(m.shape) for m in maps}) > 1:
                raise BadInputError("DIRE maps of different sizes in one training set; compute them at one resolution")
            yield torch.stack(maps), y_all[idx]

    return batches


# --------------------------------------------------------------------------- training-free
@dataclass(frozen=True)
class Calibration:
    """Maps a training-free score (lower = more likely generated) to P(generated).

    ``prob = sigmoid((threshold - score) / scale)``: 0.5 at the threshold.
    """

    threshold: float
    scale: float
    method: str = ""
    n_real: int = 0
    n_fake: int = 0

    def prob(self, score: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.threshold - score.double()) / self.scale).float()


def calibrate(real: Sequence[float] | np.ndarray, fake: Sequence[float] | np.ndarray | None = None,
              target_fpr: float = 0.05) -> Calibration:
    """Set a threshold for a "low score = generated" statistic from a calibration set.

    With both classes: 1-D logistic regression on the score (Platt scaling); the
    threshold is where P = 0.5. With reals only: the ``target_fpr`` quantile of the real
    scores (so that fraction of reals is flagged), scale = their standard deviation.
    """
    r = np.asarray(real, dtype=np.float64).ravel()
    if r.size < 2:
        raise BadInputError(f"calibration needs at least 2 real images, got {r.size}")
    spread = float(np.std(r)) or 1e-6
    if fake is None or len(fake) == 0:
        thr = float(np.quantile(r, target_fpr))
        return Calibration(thr, spread, f"real-quantile@{target_fpr}", int(r.size), 0)
    f = np.asarray(fake, dtype=np.float64).ravel()
    from sklearn.linear_model import LogisticRegression

    s = np.concatenate([r, f])
    mu, sd = float(s.mean()), float(s.std()) or 1e-6
    lr = LogisticRegression(C=1e4, max_iter=1000).fit(((s - mu) / sd)[:, None], np.r_[np.zeros(r.size), np.ones(f.size)])
    w, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if w >= 0:  # fakes do not score lower than reals: no usable direction
        raise BadInputError("on the calibration set the fakes do not have lower scores than the reals; "
                            "this score cannot separate them")
    # P(fake) = sigmoid(w (s - mu)/sd + b) = sigmoid((thr - s)/scale)
    scale = sd / -w
    return Calibration(mu + b * scale, scale, "platt", int(r.size), int(f.size))


# --------------------------------------------------------------------------- checkpoints
FORMAT, VERSION = "difffeat.detector", 1
STEM = "detector"  # detector.safetensors + detector.json
WEIGHTS, CONFIG = f"{STEM}.safetensors", f"{STEM}.json"
KINDS = ("dire-classifier", "pooled-features", "training-free")


def save_detector(folder: str | os.PathLike, config: Mapping[str, Any], module: nn.Module | None = None) -> Path:
    """Write ``detector.json`` (+ ``detector.safetensors`` with the module's weights; the one checkpoint format)."""
    if config.get("kind") not in KINDS:
        raise BadInputError(f"unknown detector kind {config.get('kind')!r}; valid: {', '.join(KINDS)}")
    return write_checkpoint(folder, STEM, FORMAT, VERSION, config, {} if module is None else module.state_dict())


def read_detector_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a detector checkpoint folder (or of a file in it)."""
    from difffeat.validate import DETECTOR_SCHEMA

    return read_checkpoint(folder, STEM, FORMAT, "detector", "; make one with `difffeat train dire`", DETECTOR_SCHEMA)


def load_detector_weights(folder: str | os.PathLike, module: nn.Module) -> nn.Module:
    """Load the checkpoint's tensors into ``module`` (strict) and return it in eval mode."""
    state = read_tensors(folder, STEM, "detector")
    try:
        module.load_state_dict(state, strict=True)
    except Exception as e:
        raise BadInputError(f"cannot load detector weights of {folder}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return module.eval()



__all__ = [
    "Calibration", "DireClassifier", "DireOutput", "DireSettings", "PooledFeatureHead", "build_resnet",
    "calibrate", "compute_dire", "crop_maps", "dire_to_pil", "fit_binary", "fit_square",
    "load_detector_weights", "load_dire", "map_batches", "quantize", "read_detector_config", "save_detector",
    "save_dire",
]
