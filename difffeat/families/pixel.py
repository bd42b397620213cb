"""Pixel-space ``UNet2DModel`` (DDPM / ADM-style, e.g. difffeat-tiny): no VAE, unconditional or
class-conditional with the null class ``num_class_embeds - 1``.
"""
from __future__ import annotations

from torch import nn

from .base import ClassFamily


class Pixel(ClassFamily):
    name = "pixel"

    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ == "UNet2DModel"
