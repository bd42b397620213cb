"""Family adapters: one module per model family, and the one registry of them.

``FAMILIES`` is checked in order by :func:`family_of` (SDXL before SD, PixArt before DiT:
the later ones match more loosely). See :mod:`difffeat.families.base` for the contract.
"""
from __future__ import annotations

from torch import nn

from ..errors import DiffFeatError
from .base import ClassFamily, Family, TextFamily
from .dit import DiT
from .flux import Flux
from .pixart import PixArt
from .pixel import Pixel
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL

FAMILIES: tuple[type[Family], ...] = (SDXL, SD, Pixel, SD3, Flux, PixArt, DiT)


def family_of(denoiser: nn.Module, source: str = "") -> type[Family]:
    """The adapter class that runs ``denoiser`` (one line listing the class if none does)."""
    for fam in FAMILIES:
        if fam.matches(denoiser):
            return fam
    raise DiffFeatError(f"unsupported denoiser class {type(denoiser).__name__} in {source or 'this model'}")


__all__ = ["FAMILIES", "Family", "TextFamily", "ClassFamily", "family_of"]
