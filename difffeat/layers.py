"""Uniform layer names for every denoiser.

UNets (SD 1.x/2.x/XL and pixel-space ``UNet2DModel``)::

    conv_in
    down.i          output of down block i (after its downsampler)
    down.i.res.j    resnet j of down block i         down.i.attn.j   its attention j
    down.i.down     the downsampler
    mid             output of the mid block          mid.res.j / mid.attn.j
    up.i            output of up block i (after its upsampler) — DIFT's ``up_ft_index=i``
    up.i.res.j / up.i.attn.j / up.i.up
    out             the denoiser output (conv_out)

Transformers (DiT, PixArt, SD3)::

    embed           patch embedding           block.i    output of transformer block i
    final           the final projection (tokens unpatchified to the output grid)

A layer's output is always read as a tensor: tuples yield their first element, which is
the hidden state for every diffusers block except SD3's ``JointTransformerBlock``, whose
``(text, image)`` pair yields the **image** stream (the SD3 adapter's ``image_stream``,
:mod:`difffeat.families.sd3`). Token outputs
``[B, h*w, C]`` are reshaped to ``[B, C, h, w]`` (:func:`as_map`, through the family
adapter's ``feature_map``), h and w being the latent
size divided by the patch size; ``final`` is unpatchified like the model's own output,
to ``[B, C_out, H_latent, W_latent]`` (DiT/PixArt with learned sigma keep both halves:
2 x latent channels).

Attention maps (every model whose attention runs through diffusers ``Attention``)::

    attn.cross.LAYER   cross-attention probabilities, image queries -> text tokens:
                       [B, h*w, n_tokens], each row sums to 1
    attn.self.LAYER    self-attention probabilities, image queries -> image keys:
                       [B, h*w, h*w], each row sums to 1

``LAYER`` is any name above (``up.1``, ``up.1.attn.0``, ``mid``, ``block.7`` ...); the map
is averaged over heads and over every attention module of that kind inside ``LAYER``
(so a coarse name averages layers, a fine name selects one). h*w is the query grid of
those modules (row-major, the latent grid at that depth; for UNet down/up blocks the
resolution *inside* the block, i.e. before its down/upsampler). ``n_tokens`` is the text
length fed to the model: 77 for CLIP models, 77 CLIP + 256 T5 for SD3 (the T5 part is
zeros without T5), 120 (PixArt-α) / 300 (PixArt-Σ). DiT and pixel UNets have no
cross-attention.
``FeatureExtractor(attention_heads="all")`` keeps the heads: ``[B, heads, h*w, N]``.
SD3's joint attention is split into its image->image and image->text blocks, each
renormalised (see :mod:`difffeat.attention`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _unet_layers(m: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"conv_in": m.conv_in}
    for prefix, blocks in (("down", m.down_blocks), ("up", m.up_blocks)):
        for i, block in enumerate(blocks):
            out[f"{prefix}.{i}"] = block
            for j, r in enumerate(getattr(block, "resnets", None) or []):
                out[f"{prefix}.{i}.res.{j}"] = r
            for j, a in enumerate(getattr(block, "attentions", None) or []):
                if a is not None:
                    out[f"{prefix}.{i}.attn.{j}"] = a
            for sampler, short in (("downsamplers", "down"), ("upsamplers", "up")):
                if getattr(block, sampler, None):
                    out[f"{prefix}.{i}.{short}"] = getattr(block, sampler)[0]
    mid = getattr(m, "mid_block", None)
    if mid is not None:
        out["mid"] = mid
        for j, r in enumerate(mid.resnets):
            out[f"mid.res.{j}"] = r
        for j, a in enumerate(getattr(mid, "attentions", None) or []):
            if a is not None:
                out[f"mid.attn.{j}"] = a
    out["out"] = m.conv_out
    return out


def _transformer_layers(m: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    embed = getattr(m, "pos_embed", None) or getattr(m, "patch_embed", None)
    if embed is not None:
        out["embed"] = embed
    for i, blk in enumerate(m.transformer_blocks):
        out[f"block.{i}"] = blk
    final = getattr(m, "proj_out", None) or getattr(m, "proj_out_2", None)
    if final is not None:
        out["final"] = final
    return out


def layer_modules(denoiser: nn.Module) -> dict[str, nn.Module]:
    """Map uniform layer names to the denoiser's modules (insertion order is not run order)."""
    if hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks"):
        return _unet_layers(denoiser)
    if hasattr(denoiser, "transformer_blocks"):
        return _transformer_layers(denoiser)
    raise TypeError(f"no layer naming for {type(denoiser).__name__}")


def block_level(names: list[str]) -> list[str]:
    """The coarse names (down.i, mid, up.i, block.i, ...) for short error messages."""
    return [n for n in names if n.count(".") <= 1]


def as_map(output: Any, latent_hw: tuple[int, int], patch: int, unpatchify: bool = False) -> torch.Tensor:
    """A hooked module's output as a [B, C, h, w] tensor (tuples -> first; tokens -> map).

    Tokens [B, h*w, C] (row-major over the h x w patch grid, h = H_latent / patch) become
    [B, C, h, w]. With ``unpatchify`` (the transformers' ``final`` projection, C = p*p*C_out)
    they become [B, C_out, h*p, w*p] exactly as diffusers unpatchifies the model output.
    """
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "sample"):
        output = output.sample
    if output.dim() == 3:  # tokens [B, N, C] -> [B, C, h, w]
        h, w = latent_hw[0] // patch, latent_hw[1] // patch
        b, n, c = output.shape
        if n != h * w:
            raise RuntimeError(f"cannot reshape {n} tokens to a {h}x{w} grid")
        if unpatchify and patch > 1:
            x = output.reshape(b, h, w, patch, patch, c // (patch * patch))
            return x.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, h * patch, w * patch)
        output = output.transpose(1, 2).reshape(b, c, h, w)
    return output
