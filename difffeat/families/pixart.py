"""PixArt-α / Σ: ``PixArtTransformer2DModel`` (or ``Transformer2DModel`` with ada-norm-single),
cross-attention to T5 tokens with their attention mask.

Text (``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline.encode_prompt``): T5 last hidden state,
120 tokens (α) or 300 (Σ). PixArt-α 1024 adds resolution / aspect-ratio conditioning.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..conditioning import batch_rows
from ..errors import DiffFeatError
from .base import TextFamily


class PixArt(TextFamily):
    name = "pixart"
    embed_dim_key = "caption_channels"

    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        name = type(denoiser).__name__
        return name == "PixArtTransformer2DModel" or (
            name in ("DiTTransformer2DModel", "Transformer2DModel") and denoiser.config.get("norm_type") == "ada_norm_single")

    @property
    def text_length(self) -> int:  # the pipelines' max_sequence_length defaults
        return 300 if "Sigma" in self.parts.pipeline_class else 120

    def encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        encs = self.parts.text_encoders()
        if "text_encoder" not in encs:
            raise DiffFeatError(f"{self.parts.name} runs without its T5 text encoder; pass prompt_embeds and "
                                f"prompt_attention_mask, or a prompt cache holding {prompt!r}")
        ids, mask = self.parts.tokenize("text_encoder", prompt, self.text_length)
        return {"encoder_hidden_states": encs["text_encoder"](ids, attention_mask=mask)[0], "attention_mask": mask}

    def text_kwargs(self, emb: dict[str, torch.Tensor | None], batch: int, image_size: tuple[int, int]) -> dict[str, Any]:
        p, ehs, mask = self.parts, emb["encoder_hidden_states"], emb.get("attention_mask")
        if mask is None:
            mask = torch.ones(ehs.shape[:2], dtype=torch.long)  # type: ignore[union-attr]
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(p.denoiser, "use_additional_conditions", False):  # PixArt-α 1024: size conditioning
            h, w = image_size
            added = {"resolution": torch.tensor([[h, w]], device=p.device, dtype=p.dtype).expand(batch, -1),
                     "aspect_ratio": torch.tensor([[h / w]], device=p.device, dtype=p.dtype).expand(batch, -1)}
        return {**super().text_kwargs(emb, batch, image_size), "encoder_attention_mask": batch_rows(mask.to(p.device), batch),
                "added_cond_kwargs": added}
