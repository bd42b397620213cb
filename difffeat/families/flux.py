"""FLUX.1 (Black Forest Labs): ``FluxTransformer2DModel``, rectified flow on 2x2-packed latents.

What differs from the other families, each following diffusers' ``FluxPipeline`` (0.42):

* **Packing.** The 16-channel latent [B, 16, h, w] runs as [B, h/2 * w/2, 64] tokens: 2x2
  patches, channel index ``c*4 + 2*dy + dx`` (``FluxPipeline._pack_latents``); the output is
  unpacked back (``_unpack_latents``). :func:`pack` / :func:`unpack` do exactly that.
* **RoPE positions.** ``img_ids`` [h/2*w/2, 3] = (0, row, column) of each packed token
  (``_prepare_latent_image_ids``); ``txt_ids`` = zeros [L, 3].
* **Text** (``FluxPipeline.encode_prompt``): the pooled output of CLIP-L (``text_encoder``,
  77 tokens) feeds ``pooled_projections``; the last hidden state of T5-XXL
  (``text_encoder_2``, 512 tokens, the pipeline's ``max_sequence_length``) feeds
  ``encoder_hidden_states``. ``use_t5=False`` feeds zeros for the T5 tokens (as SD3).
* **Guidance embedding** (FLUX.1-dev, ``guidance_embeds=True``): a guidance scale, 3.5 by
  default (``FluxPipeline``'s ``guidance_scale`` and DiTF's ``guidance=3.5``).
* **Timestep.** The transformer is fed σ and multiplies by 1000 itself. With the default
  ``time_shift=False``, σ = t / 1000, the scheduler's own timestep↔σ relation
  (``timesteps = sigmas * num_train_timesteps``) and DiTF's ``t = timestep / 1000``. With
  ``load_backbone(..., time_shift=True)`` (``difffeat.create(time_shift=True)``) a user's t is
  a position u = t/1000 on the unshifted schedule, mapped as the scheduler maps it in
  ``FluxPipeline``: with ``use_dynamic_shifting`` (dev) σ = e^μ / (e^μ + 1/u - 1),
  μ = ``calculate_shift(image_seq_len)`` from the scheduler config; otherwise (schnell) the static
  shift s: σ = s·u / (1 + (s-1)·u).
* **Layers.** ``block.0`` .. ``block.18`` are the double-stream blocks
  (``transformer_blocks``), ``block.19`` .. ``block.56`` the single-stream blocks
  (``single_transformer_blocks[k - 19]``); features are the image stream only (diffusers'
  single blocks take and return the text and image tokens separately). This is DiTF's block
  index ``k`` (its ``forward_feat`` numbers single block i as ``19 + i``), see
  :mod:`difffeat.adaln` for which tensor DiTF reads at ``k``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..conditioning import batch_rows
from ..errors import BadInputError
from ..layers import as_map
from .base import TextFamily

T5_LENGTH = 512  # FluxPipeline's max_sequence_length default (DiTF: load_t5(max_length=512))
GUIDANCE = 3.5  # FluxPipeline's guidance_scale default; DiTF's guidance=3.5


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C], as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[B, h/2 * w/2, 4C] -> [B, C, h, w], as ``FluxPipeline._unpack_latents``."""
    b, _, c4 = tokens.shape
    h, w = latent_hw
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(latent_hw: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RoPE positions (0, row, col) of the packed tokens, as ``_prepare_latent_image_ids``."""
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class Flux(TextFamily):
    name = "flux"
    embed_dim_key = "joint_attention_dim"
    adaln = True
    compile_targets = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    supports_time_shift = True  # load_backbone(time_shift=True); see the module docstring
    guidance: float = GUIDANCE

    @classmethod
    def matches(cls, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ == "FluxTransformer2DModel"

    # ------------------------------------------------------------------ layers and inputs
    @property
    def patch(self) -> int:
        return 2  # 2x2 packing (the transformer's own patch_size is 1)

    @property
    def latent_channels(self) -> int:
        return int(self.parts.config.in_channels) // 4

    def layer_modules(self) -> dict[str, nn.Module]:
        d = self.parts.denoiser
        out: dict[str, nn.Module] = {"embed": d.x_embedder}
        blocks = list(d.transformer_blocks) + list(d.single_transformer_blocks)
        out.update({f"block.{i}": blk for i, blk in enumerate(blocks)})
        out["final"] = d.proj_out
        return out

    def image_stream(self, module: nn.Module, output: Any) -> Any:
        return output[1] if isinstance(output, tuple) else output  # blocks return (text, image)

    def feature_map(self, name: str, module: nn.Module, output: Any, latent_hw: tuple[int, int]) -> torch.Tensor:
        if name == "final":
            return unpack(output, latent_hw)
        return as_map(self.image_stream(module, output), latent_hw, self.patch)

    def check_input(self, x_t: torch.Tensor) -> None:
        if x_t.shape[-1] % 2 or x_t.shape[-2] % 2:
            raise BadInputError(f"FLUX packs 2x2 latent patches: latent size {tuple(x_t.shape[-2:])} must be even")

    def flow_sigma(self, t: torch.Tensor, latent_hw: tuple[int, int], num_train_timesteps: int) -> torch.Tensor:
        u = t.float() / num_train_timesteps
        if not self.time_shift:
            return u
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.parts.scheduler_config
        if not cfg.get("use_dynamic_shifting", False):
            s = float(cfg.get("shift", 1.0))
            return s * u / (1 + (s - 1) * u)
        mu = calculate_shift((latent_hw[0] // 2) * (latent_hw[1] // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        e = math.exp(mu)
        return torch.where(u > 0, e / (e + 1 / u.clamp_min(1e-12) - 1), torch.zeros_like(u))

    def denoiser_inputs(self, x_t: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any],
                        num_train_timesteps: int) -> tuple[Any, dict[str, Any]]:
        hw = (x_t.shape[-2], x_t.shape[-1])
        sigma = self.flow_sigma(t, hw, num_train_timesteps).to(x_t.device, x_t.dtype)
        txt_ids = torch.zeros(kwargs["encoder_hidden_states"].shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        kw: dict[str, Any] = {**kwargs, "timestep": sigma, "img_ids": image_ids(hw, x_t.device, x_t.dtype),
                              "txt_ids": txt_ids}
        if self.parts.config.get("guidance_embeds"):
            kw["guidance"] = torch.full((x_t.shape[0],), self.guidance, device=x_t.device, dtype=x_t.dtype)
        return pack(x_t), kw

    def denoiser_output(self, out: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return unpack(out, (x_t.shape[-2], x_t.shape[-1]))

    # ------------------------------------------------------------------ conditioning
    @property
    def text_length(self) -> int:
        return T5_LENGTH

    @property
    def t5_zeros(self) -> bool:
        return not self.parts.use_t5

    def encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        encs = self.parts.text_encoders()
        clip = encs[self.clip_keys()[0]]
        pooled = clip(self.parts.tokenize("text_encoder", prompt)[0], output_hidden_states=False).pooler_output
        dim = int(self.parts.config.joint_attention_dim)
        if "text_encoder_2" in encs:
            t5 = encs["text_encoder_2"](self.parts.tokenize("text_encoder_2", prompt, T5_LENGTH)[0])[0]
        else:
            t5 = torch.zeros(1, T5_LENGTH, dim, device=self.parts.device, dtype=pooled.dtype)
        return {"encoder_hidden_states": t5.to(pooled.dtype), "pooled": pooled}

    def text_kwargs(self, emb: dict[str, torch.Tensor | None], batch: int, image_size: tuple[int, int]) -> dict[str, Any]:
        p = self.parts
        if emb.get("pooled") is None:
            raise BadInputError("FLUX needs pooled_prompt_embeds (CLIP pooled) together with prompt_embeds")
        pooled = batch_rows(emb["pooled"].to(p.device, p.dtype), batch)  # type: ignore[union-attr]
        kw = super().text_kwargs(emb, batch, image_size)
        return {**kw, "pooled_projections": pooled}

    def dummy_text(self) -> dict[str, torch.Tensor]:
        return {**super().dummy_text(), "pooled": self.zeros(1, int(self.parts.config.pooled_projection_dim))}
