"""AEROBLADE: training-free detection by autoencoder reconstruction distance.

AEROBLADE (Ricker, Lukovnikov & Fischer, CVPR 2024) observes that a latent diffusion
model's autoencoder reconstructs images that were *generated through it* better than
real images. The score of an image is the distance between it and its AE reconstruction,
minimised over several AEs (SD1, SD2, Kandinsky 2.1); the distance is LPIPS restricted
to the second VGG16 layer (``lpips_vgg_2``). It reports a mean AP of 0.992 over
SD1/SD2/Kandinsky/Midjourney images, with no training.

This module follows the reference's ``compute_distances`` (jonasricker/aeroblade,
src/aeroblade/high_level_funcs.py, image.py, distances.py):

* reconstruction ``D(E(x))`` of the whole image as it is (no crop, no resize), with a
  posterior *sample* drawn from a generator seeded with 1 (``retrieve_latents``), MoVQ
  decoded with ``force_not_quantize=True``, and the reconstruction quantised as the
  reference's PNG write does (``to_pil_image``: ``uint8(x * 255)``, a floor);
* LPIPS layer 2 (:class:`VGGLayer2Distance`): LPIPS's input scaling, VGG16 relu2_2,
  unit-normalised per position, squared difference weighted by LPIPS's learned ``lin1``
  channel weights, spatial mean. The weights are read from the ``lpips`` package's own
  ``weights/v0.1/vgg.pth`` with ``torch.load(weights_only=True)`` (five plain tensors;
  the package itself is not imported, its VGG would download torchvision weights).
  The VGG16 trunk is read from the local Hugging Face cache (``timm/vgg16.tv_in1k``,
  the same torchvision ImageNet weights) when present, else random with a fixed seed
  (one warning line): random conv features still rank reconstruction errors, but the
  published numbers need the real weights;
* the score is the minimum distance over the autoencoders (the reference keeps
  ``-LPIPS`` and takes the maximum: the same image ranking).

Deviations: each image draws its posterior noise from its own generator seeded with 1,
where the reference draws from one generator for a whole folder in file order (so only
its first image gets the same noise; the two are statistically equivalent and
difffeat's score does not depend on batch mates or resume order). The reference stores
the LPIPS map in fp16 before averaging; difffeat keeps fp32 (a difference below fp16
resolution, ~1e-3 relative). An image whose sides are not multiples of the AE's
downsampling factor (8) cannot be scored by the reference (the reconstruction's shape
differs); difffeat drops the last rows/columns to the next multiple. The reference runs
the SD VAEs in fp32 and MoVQ in fp16; difffeat runs all in the chosen dtype (bf16 on
CUDA by default).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from difffeat.errors import BadInputError, DiffFeatError

VGG_REPO = "timm/vgg16.tv_in1k"
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # lpips.pretrained_networks ScalingLayer, on inputs in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)
POSTERIOR_SEED = 1  # aeroblade compute_reconstructions(seed=1)


def lpips_lin_weights(layer: int = 1) -> torch.Tensor:
    """LPIPS v0.1 VGG ``lin{layer}`` channel weights [C] from the installed ``lpips`` package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise DiffFeatError("AEROBLADE needs LPIPS's learned weights: pip install lpips")
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state[f"lin{layer}.model.1.weight"].float().flatten()


class VGGLayer2Distance(nn.Module):
    """LPIPS (v0.1, VGG) layer-2 distance: relu2_2 features, learned ``lin1`` weights."""

    def __init__(self) -> None:
        super().__init__()
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        with torch.random.fork_rng(devices=[]):  # random fallback weights are the same in every run
            torch.manual_seed(0)
            # the first 9 modules of torchvision/timm vgg16.features (indices kept for weight names)
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 3, padding=1), relu(), nn.Conv2d(64, 64, 3, padding=1), relu(),
                nn.MaxPool2d(2, 2), nn.Conv2d(64, 128, 3, padding=1), relu(), nn.Conv2d(128, 128, 3, padding=1), relu(),
            )
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lin", lpips_lin_weights(1).view(1, -1, 1, 1), persistent=False)
        self.pretrained = False
        self.requires_grad_(False).eval()

    def load_imagenet(self, echo: Callable[[str], Any] | None = None) -> "VGGLayer2Distance":
        """Load ImageNet VGG16 weights from the local HF cache if there; else warn once."""
        echo = echo or (lambda m: print(m, file=sys.stderr))
        try:
            from huggingface_hub import hf_hub_download
            from safetensors import safe_open

            path = hf_hub_download(VGG_REPO, "model.safetensors", local_files_only=True)
            with safe_open(path, framework="pt") as f:
                state = {k.removeprefix("features."): f.get_tensor(k) for k in f.keys()
                         if k.split(".")[0] == "features" and int(k.split(".")[1]) < len(self.features)}
            self.features.load_state_dict(state, strict=True)
            self.pretrained = True
        except Exception as e:  # not cached / offline
            echo(f"warning: VGG16 ImageNet weights ({VGG_REPO}) not in the local cache ({type(e).__name__}); "
                 "AEROBLADE distances use random VGG layers")
        return self

    def feats(self, x01: torch.Tensor) -> torch.Tensor:
        """relu2_2 features, unit-normalised over channels at each position (lpips.normalize_tensor)."""
        f = self.features(((2 * x01.float() - 1) - self.shift) / self.scale)
        return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)

    @torch.no_grad()
    def forward(self, a01: torch.Tensor, b01: torch.Tensor) -> torch.Tensor:
        """Distance per image [B] between two batches in [0,1]."""
        return ((self.feats(a01) - self.feats(b01)).pow(2) * self.lin).sum(dim=1).mean(dim=(1, 2))


class Autoencoder(nn.Module):
    """An LDM autoencoder used as a reconstruction operator x -> D(E(x)), as the reference.

    diffusers ``AutoencoderKL`` (SD): a posterior sample, noise from a generator seeded
    with 1 for each image; ``VQModel`` (Kandinsky's MoVQ): the unquantised latents,
    decoded with ``force_not_quantize=True``. Reconstructions are floored to 8 bits.
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module, self.name = module.eval().requires_grad_(False), name

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.module.encode(x)
        if not hasattr(enc, "latent_dist"):
            return enc.latents
        dist = enc.latent_dist
        noise = torch.cat([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(POSTERIOR_SEED))[None]
                           for _ in range(x.shape[0])])
        return dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)

    @torch.no_grad()
    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        p = next(self.module.parameters())
        z = self._latents(x01.to(p.device, p.dtype) * 2 - 1)
        kw = {"force_not_quantize": True} if hasattr(self.module, "quantize") else {}  # VQModel (MoVQ)
        rec = ((self.module.decode(z, **kw).sample.float() + 1) / 2).clamp(0, 1)
        return torch.floor(rec * 255) / 255


def whole_image(img: Image.Image, multiple: int = 8) -> Image.Image:
    """The image as it is, less the last rows/columns beyond a multiple of the AE factor."""
    w, h = img.size
    if w < multiple or h < multiple:
        raise BadInputError(f"image is {w}x{h}; AEROBLADE needs at least {multiple}x{multiple} pixels")
    return img if (w % multiple, h % multiple) == (0, 0) else img.crop((0, 0, w - w % multiple, h - h % multiple))


def load_autoencoder(name: str, component: str = "vae", dtype: str | torch.dtype | None = None,
                     device: str | torch.device | None = None) -> Autoencoder:
    """Load only the autoencoder ``component`` of a model preset, hub id or local diffusers folder."""
    from difffeat.backbone import parse_device, parse_dtype
    from difffeat.loading import load_component, read_model_index
    from difffeat.registry import resolve

    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    source, _ = resolve(name)
    index = read_model_index(source)
    spec = index.get(component)
    if not isinstance(spec, (list, tuple)) or spec[0] is None:
        comps = [k for k, v in index.items() if isinstance(v, (list, tuple)) and not k.startswith("_")]
        raise BadInputError(f"{name} has no component {component!r}; it has {', '.join(comps)}")
    module = load_component(source, component, list(spec), dt)
    return Autoencoder(module.to(dev, dt), f"{name}:{component}")


@torch.no_grad()
def aeroblade_distances(images01: torch.Tensor, autoencoders: Sequence[Autoencoder], distance: VGGLayer2Distance) -> torch.Tensor:
    """Distances [B, n_AE] between each image and each AE's reconstruction of it."""
    if not autoencoders:
        raise BadInputError("AEROBLADE needs at least one autoencoder")
    dev = next(distance.buffers()).device
    x = images01.float().to(dev)
    return torch.stack([distance(x, ae(x).to(dev)) for ae in autoencoders], dim=1).cpu()


__all__ = ["Autoencoder", "VGGLayer2Distance", "aeroblade_distances", "load_autoencoder", "lpips_lin_weights", "whole_image"]
