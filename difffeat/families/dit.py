"""DiT (Peebles & Xie 2023): ``DiTTransformer2DModel`` / ``Transformer2DModel``, class-conditional,
null class = ``num_classes`` (index 1000 for ImageNet), learned sigma.

DiT unpatchifies a square grid, so it refuses non-square latents.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BadInputError
from .base import ClassFamily


class DiT(ClassFamily):
    name = "dit"
    null_is_extra = True
    compile_targets = ("BasicTransformerBlock", "DiTTransformer2DModelBlock")

    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ in ("DiTTransformer2DModel", "Transformer2DModel")

    def check_input(self, x_t: torch.Tensor) -> None:
        if x_t.shape[-1] != x_t.shape[-2]:
            raise BadInputError(f"DiT needs square images (it unpatchifies a square grid); got {x_t.shape[-1]}x{x_t.shape[-2]} latents")
