"""Noise for the ensemble: per-image deterministic, shared, or none.

* ``random`` (default): each image gets its own generator seeded from ``(seed, key)``,
  where the key is a content hash of the prepared image (or a caller-given id). An
  image's noise — hence its features — does not depend on which other images share
  its batch, nor on the batch size.
* ``fixed``: one noise tensor drawn from ``seed`` is shared by every image
  (the SD-DINO protocol, which fixes the noise across images).
* ``clean``: no noise (x_t = x_0; the timestep is still fed to the denoiser).

Draw order for one image (documented because it fixes the numbers):
``latent_eps`` [E, C, h, w] (only when sampling the VAE posterior), then
``noise`` [T, E, C, h, w].
"""
from __future__ import annotations

import hashlib
from typing import Literal, Sequence

import torch

from .errors import BadInputError

NoiseMode = Literal["random", "fixed", "clean"]
NOISE_MODES = ("random", "fixed", "clean")


def key_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from a global seed and an image key."""
    h = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def draw(
    mode: str,
    keys: Sequence[str],
    seed: int,
    shape: tuple[int, ...],
    ensemble: int,
    n_timesteps: int,
    with_latent_eps: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return (latent_eps [B,E,*shape] or None, noise [B,T,E,*shape] or None), on CPU in fp32."""
    if mode not in NOISE_MODES:
        raise BadInputError(f"unknown noise mode {mode!r}; valid: {', '.join(NOISE_MODES)}")
    lat, noi = [], []
    shared: tuple[torch.Tensor | None, torch.Tensor] | None = None
    for key in keys:
        if mode == "fixed" and shared is not None:
            le, nz = shared
        else:
            g = torch.Generator().manual_seed(key_seed(seed, "shared" if mode == "fixed" else key))
            le = torch.randn((ensemble, *shape), generator=g) if with_latent_eps else None
            nz = torch.randn((n_timesteps, ensemble, *shape), generator=g)
            shared = (le, nz)
        if le is not None:
            lat.append(le)
        noi.append(nz)
    latent_eps = torch.stack(lat) if with_latent_eps else None
    noise = None if mode == "clean" else torch.stack(noi)
    return latent_eps, noise
