"""DiTF feature post-processing (Gan et al., NeurIPS 2025, arXiv:2505.18584; code
github.com/ganchaofan0000/DiTF): AdaLN-modulated block features and massive-activation channel discard.

What DiTF's released code computes at block index ``k`` (``eval_spair.py`` + ``feat_flux.py``
+ ``Flux.forward_feat``), checked against that code:

1. the **input** hidden state of block ``k`` (for single-stream blocks, ``k = 19 + i``:
   ``SingleStreamBlock.forward_feat`` returns ``x.clone()`` before the block runs), image tokens
   only, averaged over the ensemble;
2. **channel discard** (``--cd``): the massive-activation channels are set to zero
   (FLUX.1-dev: channels 154 and 1446 of 3072, fixed in ``eval_spair.py``);
3. ``LayerNorm(3072, elementwise_affine=False, eps=1e-6)`` over channels, per token;
4. the **AdaLN modulation of block k** itself: ``(1 + scale) * x + shift`` with the
   (shift, scale) block ``k``'s modulation computes from the timestep + guidance + pooled-text
   vector (ensemble-averaged, as the code averages ``mod.shift``/``mod.scale``).

In difffeat names, DiTF's ``k`` is ``block.k`` (:mod:`difffeat.families.flux`), and
``adaln=True`` makes ``block.k`` mean steps 1, 3, 4 above: the block's own AdaLN output on its
input, i.e. what block ``k`` feeds its attention (diffusers: ``block.norm(hidden_states,
temb)``; single blocks' ``AdaLayerNormZeroSingle``, double blocks' ``norm1``). Without
``adaln``, DiTF's raw baseline at ``k`` (29.9 PCK in its README) is ``block.{k-1}``'s output.
Exactness: steps are done in DiTF's order (ensemble mean first, then discard, norm,
modulation), in fp32 on the backbone's output. DiTF's released evaluation supports
single-stream blocks only (its double-stream ``forward_feat`` returns no modulation); for a
double-stream (FLUX) or joint (SD3/SD3.5) block difffeat applies the same recipe with that
block's ``norm1`` (shift/scale = its first two modulation chunks): the same construction, not
measured by DiTF. Discarded channels are zero before the norm, so after it they hold
``(1 + scale) * (-mean/std) + shift`` like DiTF's; their input values have no influence.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .errors import BadInputError

# Massive-activation channels DiTF discards (eval_spair.py, `--cd`), per checkpoint width.
DITF_FLUX_CHANNELS = (154, 1446)


def adaln_zero_input(module: nn.Module, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(image tokens [B,N,C], shift [B,C], scale [B,C], eps) entering a block with diffusers'
    AdaLN-Zero norm (``norm1`` of FLUX double / SD3 joint blocks, ``norm`` of FLUX single blocks),
    read from its forward pre-hook keyword arguments."""
    norm = getattr(module, "norm1", None) or getattr(module, "norm", None)
    if norm is None or not hasattr(norm, "linear") or kwargs.get("temb") is None:
        raise BadInputError(f"{type(module).__name__} has no AdaLN-Zero modulation (adaln needs block.* of FLUX or SD3)")
    x = kwargs["hidden_states"]
    emb = norm.linear(norm.silu(kwargs["temb"]))
    chunks = emb.shape[-1] // x.shape[-1]
    shift, scale = emb.chunk(chunks, dim=-1)[:2]  # every diffusers AdaLN-Zero: shift, scale, gate, ...
    return x, shift, scale, float(norm.norm.eps)


def discard(feat: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """``feat`` [B,C,h,w] with ``channels`` set to zero (DiTF's channel discard)."""
    if not channels:
        return feat
    bad = [c for c in channels if not 0 <= int(c) < feat.shape[1]]
    if bad:
        raise BadInputError(f"discard channel {bad[0]} out of range for {feat.shape[1]} channels")
    out = feat.clone()
    out[:, list(channels)] = 0
    return out


def modulate(feat: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
             channels: Sequence[int] = ()) -> torch.Tensor:
    """DiTF: discard ``channels``, LayerNorm over channels (no affine), then ``(1+scale)*x + shift``.

    ``feat`` [B,C,h,w] (ensemble-averaged block input), ``shift``/``scale`` [B,C]."""
    x = discard(feat.float(), channels)
    x = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)
    return (1 + scale.float()[:, :, None, None]) * x + shift.float()[:, :, None, None]


@torch.no_grad()
def massive_channels(feat: torch.Tensor, n: int = 2) -> list[int]:
    """The ``n`` channels with the largest median |activation| over all positions of ``feat``
    [B,C,h,w] (massive activations are a few channels that are huge at almost every token, Sun et
    al. 2024; DiTF fixes them per model). A tool for models without published channels."""
    med = feat.float().abs().permute(1, 0, 2, 3).reshape(feat.shape[1], -1).median(dim=1).values
    return sorted(int(c) for c in med.topk(n).indices)


__all__ = ["DITF_FLUX_CHANNELS", "adaln_zero_input", "discard", "modulate", "massive_channels"]
