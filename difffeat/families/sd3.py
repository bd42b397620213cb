"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` (MM-DiT), flow matching.

Text (``StableDiffusion3Pipeline.encode_prompt``): CLIP-L/G penultimate states concatenated
(pooled concatenated), zero-padded to the T5 width and followed by 256 T5 tokens (zeros
without T5, as diffusers does with ``text_encoder_3=None``). Joint blocks return
``(text, image)``: features are the image stream. SD3.5 (QK-norm / extra image attention)
keeps its unfused attention: diffusers' fused joint processor skips QK-norm.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..conditioning import batch_rows
from ..errors import BadInputError
from .base import TextFamily

T5_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default


class SD3(TextFamily):
    name = "sd3"
    embed_dim_key = "joint_attention_dim"
    adaln = True
    compile_targets = ("JointTransformerBlock",)

    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ == "SD3Transformer2DModel"

    @classmethod
    def fuses_qkv(cls, denoiser: nn.Module) -> bool:
        return not (denoiser.config.get("qk_norm") or denoiser.config.get("dual_attention_layers"))

    def image_stream(self, module: nn.Module, output: Any) -> Any:
        if type(module).__name__ == "JointTransformerBlock" and isinstance(output, tuple):
            return output[1]
        return output

    @property
    def text_length(self) -> int:
        return 77 + T5_LENGTH

    @property
    def t5_zeros(self) -> bool:
        return not self.parts.use_t5

    def encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        clip, pooled = self.clip_penultimate(prompt)
        dim, encs = int(self.parts.config.joint_attention_dim), self.parts.text_encoders()
        if "text_encoder_3" in encs:
            t5 = encs["text_encoder_3"](self.parts.tokenize("text_encoder_3", prompt, T5_LENGTH)[0])[0]
        else:
            t5 = torch.zeros(1, T5_LENGTH, dim, device=self.parts.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, dim - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=1), "pooled": torch.cat(pooled, dim=-1)}

    def text_kwargs(self, emb: dict[str, torch.Tensor | None], batch: int, image_size: tuple[int, int]) -> dict[str, Any]:
        p = self.parts
        if emb.get("pooled") is None:
            raise BadInputError("SD3 needs pooled_prompt_embeds together with prompt_embeds")
        pooled = batch_rows(emb["pooled"].to(p.device, p.dtype), batch)  # type: ignore[union-attr]
        return {**super().text_kwargs(emb, batch, image_size), "pooled_projections": pooled}

    def dummy_text(self) -> dict[str, torch.Tensor]:
        return {**super().dummy_text(), "pooled": self.zeros(1, int(self.parts.config.pooled_projection_dim))}
