"""AEROBLADE-style training-free detection by autoencoder reconstruction distance.

AEROBLADE (Ricker, Lukovnikov & Fischer, CVPR 2024) observes that a latent diffusion
model's autoencoder reconstructs images that were *generated through it* better than
real images. The score of an image is the distance between it and its AE reconstruction,
minimised over several AEs (SD1, SD2, Kandinsky 2.1); the distance is LPIPS restricted
to the second VGG16 layer (``lpips_vgg_2``). It reports a mean AP of 0.992 over
SD1/SD2/Kandinsky/Midjourney images, with no training.

Deviation: LPIPS proper (the ``lpips`` package) builds its VGG with a torchvision
download and loads its learned per-channel weights from pickled ``.pth`` files, so it
cannot run offline here. :class:`VGGLayer2Distance` computes LPIPS's layer-2 term with
*uniform* channel weights: unit-normalise the relu2_2 features per position, squared
difference summed over channels, spatial mean. VGG16 ImageNet weights are read from the
local Hugging Face cache (``timm/vgg16.tv_in1k``, safetensors) when present, else the
layers are random with a fixed seed (one warning line; a calibration stays valid across
runs): random conv features still rank reconstruction errors, but the published numbers
need the real weights.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import torch
from torch import nn

from difffeat.errors import BadInputError

from .dire import IMAGENET_MEAN, IMAGENET_STD

VGG_REPO = "timm/vgg16.tv_in1k"


class VGGLayer2Distance(nn.Module):
    """LPIPS-style distance on VGG16 relu2_2 features (uniform channel weights)."""

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
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
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
        f = self.features((x01.float() - self.mean) / self.std)
        return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)

    @torch.no_grad()
    def forward(self, a01: torch.Tensor, b01: torch.Tensor) -> torch.Tensor:
        """Distance per image [B] between two batches in [0,1]."""
        return (self.feats(a01) - self.feats(b01)).pow(2).sum(dim=1).mean(dim=(1, 2))


class Autoencoder(nn.Module):
    """An LDM autoencoder used as a reconstruction operator x -> D(E(x)).

    Works with diffusers ``AutoencoderKL`` (SD: posterior mean) and ``VQModel``
    (Kandinsky's MoVQ: quantised latents).
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module, self.name = module.eval().requires_grad_(False), name

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @torch.no_grad()
    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        p = next(self.module.parameters())
        x = (x01.to(p.device, p.dtype) * 2 - 1)
        enc = self.module.encode(x)
        z = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc.latents
        return ((self.module.decode(z).sample.float() + 1) / 2).clamp(0, 1)


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


__all__ = ["Autoencoder", "VGGLayer2Distance", "aeroblade_distances", "load_autoencoder"]
