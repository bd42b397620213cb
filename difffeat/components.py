"""Access to a pipeline's components (denoiser config, tokenizers, lazily loaded text
encoders), below the backbone and the family adapters.

:class:`ModelParts` is what a family adapter (:mod:`difffeat.families`) may touch; the
:class:`~difffeat.backbone.DiffusionBackbone` owns one and never hands adapters itself.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import DiffFeatError
from .loading import load_component

TEXT_ENCODER_KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_KEYS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def place(m: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to device; cast only if needed (diffusers warns on redundant casts)."""
    m = m.to(device)
    if next(m.parameters()).dtype != dtype:
        m = m.to(dtype)
    return m.eval().requires_grad_(False)


def is_t5(module_or_class: Any) -> bool:
    """Whether a text encoder (or its class name in model_index.json) is a T5."""
    name = module_or_class if isinstance(module_or_class, str) else type(module_or_class).__name__
    return name.startswith("T5")


class ModelParts:
    """The loaded denoiser plus tokenizers and (lazily) text encoders of one pipeline."""

    def __init__(self, source: str, name: str, denoiser: nn.Module, components: dict[str, Any], index: dict[str, Any],
                 dtype: torch.dtype, device: torch.device, random_weights: bool, use_t5: bool) -> None:
        self.source, self.name, self.denoiser, self.index = source, name, denoiser, index
        self.dtype, self.device, self.random_weights, self.use_t5 = dtype, device, random_weights, use_t5
        self.scheduler_config = dict(getattr(components.get("scheduler"), "config", None) or {})
        self.tokenizers = {k: components[k] for k in TOKENIZER_KEYS if components.get(k) is not None}
        self._text_encoders: dict[str, nn.Module] | None = None

    @property
    def config(self) -> Any:
        return self.denoiser.config

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name", ""))

    def text_encoders(self) -> dict[str, nn.Module]:
        """{key: encoder}, loaded on first use; T5 encoders are skipped with ``use_t5=False``."""
        if self._text_encoders is None:
            encs = {}
            for key in TEXT_ENCODER_KEYS:
                spec = self.index.get(key)
                if not spec or spec[0] is None or (not self.use_t5 and is_t5(str(spec[1]))):
                    continue
                m = load_component(self.source, key, spec, self.dtype, self.random_weights)
                encs[key] = place(m, self.device, self.dtype)
            self._text_encoders = encs
        return self._text_encoders

    def tokenize(self, key: str, prompt: str, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [1, L] of ``prompt`` for text encoder ``key``."""
        tok = self.tokenizers.get(key.replace("text_encoder", "tokenizer"))
        if tok is None:
            raise DiffFeatError(f"{self.name} has no tokenizer for {key}; pass prompt_embeds instead of a prompt")
        out = tok([prompt], padding="max_length", max_length=max_length or tok.model_max_length, truncation=True,
                  add_special_tokens=True, return_tensors="pt")
        return out.input_ids.to(self.device), out.attention_mask.to(self.device)


__all__ = ["ModelParts", "place", "is_t5", "TEXT_ENCODER_KEYS"]
