"""Stable Diffusion 1.x / 2.x: ``UNet2DConditionModel`` with one CLIP text encoder.

Text: the last hidden state of the CLIP encoder (``StableDiffusionPipeline.encode_prompt``).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import TextFamily


class SD(TextFamily):
    name = "sd"

    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ == "UNet2DConditionModel" and denoiser.config.get("addition_embed_type") != "text_time"

    def encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        key = self.clip_keys()[0]
        return {"encoder_hidden_states": self.parts.text_encoders()[key](self.parts.tokenize(key, prompt)[0])[0]}
