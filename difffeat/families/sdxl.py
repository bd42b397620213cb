"""SDXL: ``UNet2DConditionModel`` with ``text_time`` added conditioning and two CLIPs.

Text (``StableDiffusionXLPipeline.encode_prompt``): penultimate hidden states of both CLIPs
concatenated; pooled from the projection encoder (text_encoder_2). Size conditioning:
``time_ids = (h, w, 0, 0, h, w)`` (original size, no crop, target size).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..conditioning import batch_rows
from ..errors import BadInputError
from .base import TextFamily


class SDXL(TextFamily):
    name = "sdxl"

    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ == "UNet2DConditionModel" and denoiser.config.get("addition_embed_type") == "text_time"

    def encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        hidden, pooled = self.clip_penultimate(prompt)
        return {"encoder_hidden_states": hidden, "pooled": pooled[0]}

    def text_kwargs(self, emb: dict[str, torch.Tensor | None], batch: int, image_size: tuple[int, int]) -> dict[str, Any]:
        p = self.parts
        if emb.get("pooled") is None:
            raise BadInputError("SDXL needs pooled_prompt_embeds together with prompt_embeds")
        h, w = image_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=p.device, dtype=p.dtype).expand(batch, -1)
        pooled = batch_rows(emb["pooled"].to(p.device, p.dtype), batch)  # type: ignore[union-attr]
        return {**super().text_kwargs(emb, batch, image_size), "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def dummy_text(self) -> dict[str, torch.Tensor]:
        cfg = self.parts.config
        pdim = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
        return {**super().dummy_text(), "pooled": self.zeros(1, pdim)}
