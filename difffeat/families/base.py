"""The family-adapter contract: what one model family owns.

A :class:`Family` owns everything that differs between model families: how prompts become
embeddings (each diffusers pipeline's ``encode_prompt``), how embeddings or class labels
become the denoiser's keyword arguments, how layers are named and token outputs read,
what timestep value the denoiser is fed, which input sizes it accepts, and which blocks
``torch.compile`` targets. The :class:`~difffeat.backbone.DiffusionBackbone` keeps the VAE,
the noising process, the regression target and ``predict``, and delegates the rest here.

Adding a family = one module here (a ``Family`` subclass) + one entry in
:data:`difffeat.families.FAMILIES` + a tiny test model.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..adaln import adaln_zero_input
from ..components import TEXT_ENCODER_KEYS, ModelParts, is_t5
from ..conditioning import batch_rows
from ..errors import BadInputError, DiffFeatError
from ..layers import as_map, layer_modules


class Family:
    """Base adapter: an unconditional denoiser with uniform layer names and no quirks."""

    name: ClassVar[str] = ""
    text: ClassVar[bool] = False  # conditioned on text prompts
    compile_targets: ClassVar[tuple[str, ...]] = ("BasicTransformerBlock", "ResnetBlock2D")
    adaln: ClassVar[bool] = False  # blocks carry diffusers' AdaLN-Zero norms (DiTF post-processing applies)
    supports_time_shift: ClassVar[bool] = False  # flow_sigma can apply the pipeline's resolution shift
    time_shift: bool = False  # set by load_backbone(time_shift=True)

    def __init__(self, parts: ModelParts) -> None:
        self.parts = parts

    # ------------------------------------------------------------------ detection
    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        """Whether this family runs ``denoiser`` (checked in :data:`FAMILIES` order)."""
        raise NotImplementedError

    @classmethod
    def fuses_qkv(cls, denoiser: nn.Module) -> bool:
        """Whether diffusers' fused QKV projections are exact for this denoiser."""
        return True

    # ------------------------------------------------------------------ layers and inputs
    @property
    def patch(self) -> int:
        return int(self.parts.config.get("patch_size", 1) or 1)

    def layer_modules(self) -> dict[str, nn.Module]:
        """Uniform layer names -> modules (see :mod:`difffeat.layers`)."""
        return layer_modules(self.parts.denoiser)

    def image_stream(self, module: nn.Module, output: Any) -> Any:
        """The image-token part of a layer's output (identity unless a block returns several streams)."""
        return output

    def feature_map(self, name: str, module: nn.Module, output: Any, latent_hw: tuple[int, int]) -> torch.Tensor:
        """A hooked layer's output as [B, C, h, w]: the image stream, tokens unpacked to the patch
        grid, ``final`` unpatchified like the model's own output (see :func:`difffeat.layers.as_map`)."""
        return as_map(self.image_stream(module, output), latent_hw, self.patch, unpatchify=name == "final")

    def adaln_input(self, module: nn.Module, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(image tokens, shift, scale, eps) entering an AdaLN-Zero block (DiTF; see :mod:`difffeat.adaln`)."""
        return adaln_zero_input(module, kwargs)

    def check_input(self, x_t: torch.Tensor) -> None:
        """Refuse latents the denoiser cannot run (one line)."""

    def timestep_input(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the denoiser is fed (t itself for every family so far)."""
        return t.to(self.parts.device)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the backbone noises (the denoiser's input unless it packs)."""
        return int(self.parts.config.in_channels)

    def flow_sigma(self, t: torch.Tensor, latent_hw: tuple[int, int], num_train_timesteps: int) -> torch.Tensor:
        """Flow matching: the σ of timestep ``t`` (σ = t / T, the scheduler's ``timesteps = sigmas * T``)."""
        return t.float() / num_train_timesteps

    def denoiser_inputs(self, x_t: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any],
                        num_train_timesteps: int) -> tuple[Any, dict[str, Any]]:
        """The denoiser's first argument and keyword arguments for latents ``x_t`` at timesteps ``t``
        ([B]) with conditioning ``kwargs`` (FLUX packs the latents and adds its RoPE ids here)."""
        return x_t, {**kwargs, "timestep": self.timestep_input(t)}

    def denoiser_output(self, out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The denoiser's output in the latent's layout (FLUX unpacks its tokens)."""
        return out

    # ------------------------------------------------------------------ conditioning
    @property
    def num_classes(self) -> int | None:
        return None

    @property
    def text_length(self) -> int:
        """Text tokens the denoiser attends to (the key count of its cross-attention)."""
        tok = self.parts.tokenizers.get("tokenizer")
        return int(tok.model_max_length) if tok is not None else 77

    @property
    def t5_zeros(self) -> bool:
        """Whether prompt embeddings hold zeros in place of a T5 that is not loaded (prompt-cache key)."""
        return False

    def encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """One prompt -> {encoder_hidden_states [1,L,D], pooled [1,P]?, attention_mask [1,L]?}."""
        raise DiffFeatError(f"{self.parts.name} is not text-conditioned")

    def text_kwargs(self, emb: dict[str, torch.Tensor | None], batch: int, image_size: tuple[int, int]) -> dict[str, Any]:
        """Prompt embeddings (batch of 1 or ``batch``) -> denoiser keyword arguments."""
        return {"encoder_hidden_states": batch_rows(emb["encoder_hidden_states"], batch)}  # type: ignore[arg-type]

    def dummy_text(self) -> dict[str, torch.Tensor]:
        """Zero embeddings of the right shapes (probing layers needs no text encoder)."""
        raise DiffFeatError(f"{self.parts.name} is not text-conditioned")

    def label_kwargs(self, class_labels: Any, batch: int) -> dict[str, Any]:
        """Class labels (None = the null class) -> denoiser keyword arguments."""
        return {}

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=self.parts.device, dtype=self.parts.dtype)


class TextFamily(Family):
    """Prompt-conditioned families (cross-attention on ``encoder_hidden_states``)."""

    text = True
    embed_dim_key: ClassVar[str] = "cross_attention_dim"

    def clip_keys(self) -> list[str]:
        encs = self.parts.text_encoders()
        keys = [k for k in TEXT_ENCODER_KEYS if k in encs and not is_t5(encs[k])]
        if not keys:
            raise DiffFeatError(f"{self.parts.name} has no text encoder; pass prompt_embeds instead of a prompt")
        return keys

    def clip_penultimate(self, prompt: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Penultimate hidden states of every CLIP encoder, concatenated on channels, and their
        pooled projections (SDXL's and SD3's ``encode_prompt``)."""
        encs, hidden, pooled = self.parts.text_encoders(), [], []
        for key in self.clip_keys():
            out = encs[key](self.parts.tokenize(key, prompt)[0], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if getattr(out, "text_embeds", None) is not None:
                pooled.append(out.text_embeds)
        return torch.cat(hidden, dim=-1), pooled

    def dummy_text(self) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": self.zeros(1, self.text_length, int(self.parts.config[self.embed_dim_key]))}


class ClassFamily(Family):
    """Class-conditional families (``class_labels``; unconditional = a null class)."""

    compile_targets = ("BasicTransformerBlock", "ResnetBlock2D")
    null_is_extra: ClassVar[bool] = False  # the null class is index num_classes (DiT) or num_classes - 1

    @property
    def num_classes(self) -> int | None:
        cfg = self.parts.config
        return cfg.get("num_class_embeds") or cfg.get("num_embeds_ada_norm")

    def label_kwargs(self, class_labels: Any, batch: int) -> dict[str, Any]:
        limit = int(self.num_classes or 0)
        if not limit:
            return {}
        if class_labels is None:
            labels = torch.full((batch,), limit if self.null_is_extra else limit - 1, dtype=torch.long)
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() == 1 and batch > 1:
                labels = labels.expand(batch)
            if labels.numel() != batch:
                raise BadInputError(f"got {labels.numel()} class labels for {batch} images")
            if (labels < 0).any() or (labels >= limit + int(self.null_is_extra)).any():
                raise BadInputError(f"class label out of range [0, {limit}) for {self.parts.name}")
        return {"class_labels": labels.to(self.parts.device)}


__all__ = ["Family", "TextFamily", "ClassFamily"]
