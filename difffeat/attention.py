"""Attention maps from diffusers attention modules, captured inside the one extraction path.

What VPD (Zhao et al., ICCV 2023: cross-attention maps concatenated to UNet features,
NYUv2 depth RMSE 0.254) and DiffSeg (Tian et al., CVPR 2024: merging SD self-attention
maps, COCO-Stuff-27 unsupervised mIoU 43.6) consume.

A :class:`CapturingProcessor` is installed **only** on the attention modules of the
requested layers, for the duration of one denoiser call; it computes the attention with
an explicit softmax (so the probabilities exist) and otherwise mirrors diffusers'
``AttnProcessor2_0`` / ``JointAttnProcessor2_0`` (and their fused-QKV variants) step for
step, so the model output is unchanged up to floating-point rounding. Every other module
keeps its SDPA processor. Cost: the captured modules materialise their fp32 probabilities,
B x heads x N_q x N_k (self-attention at SD's 96x96 level: 9216² x 4 B = 340 MB per head and
image), so capture coarse levels or lower ``max_batch`` at high resolution.

Kinds (see :mod:`difffeat.layers` for the names):

* ``cross``: image queries -> text tokens, rows sum to 1: ``[B, h*w, n_tokens]``.
* ``self``: image queries -> image keys, rows sum to 1: ``[B, h*w, h*w]``.

SD3's joint attention (MM-DiT) has one softmax over image *and* text keys; its image-query
rows are split into the image->image and image->text blocks and each block is
renormalised to sum to 1 (the attention a query pays *within* that block). SD3.5's
extra image-only attention (``attn2``) counts as self-attention.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .errors import BadInputError

KINDS = ("cross", "self")
PREFIX = "attn."
# processors whose math the capturing processor reproduces; the fused ones keep the unfused
# to_q/to_k/to_v (add_*_proj) weights next to their concatenation, which is what we use
_SUPPORTED = ("AttnProcessor2_0", "AttnProcessor", "JointAttnProcessor2_0", "FusedAttnProcessor2_0", "FusedJointAttnProcessor2_0")


def parse_attention_name(name: str) -> tuple[str, str] | None:
    """``attn.cross.up.1`` -> ``("cross", "up.1")``; ``None`` for feature layer names."""
    if not name.startswith(PREFIX):
        return None
    kind, _, layer = name[len(PREFIX):].partition(".")
    if kind not in KINDS or not layer:
        raise BadInputError(f"bad attention layer name {name!r}; use attn.cross.LAYER or attn.self.LAYER (e.g. attn.cross.up.1)")
    return kind, layer


def _is_joint(attn: nn.Module) -> bool:
    return getattr(attn, "add_k_proj", None) is not None


def attention_modules(root: nn.Module, kind: str) -> list[nn.Module]:
    """The diffusers ``Attention`` modules under ``root`` (itself included) that yield ``kind``.

    Cross: modules built for text keys (``is_cross_attention``) and joint (MM-DiT) modules.
    Self: every module that is not pure cross-attention (joint ones give their image block).
    """
    from diffusers.models.attention_processor import Attention

    out = []
    for m in root.modules():
        if not isinstance(m, Attention):
            continue
        joint, cross = _is_joint(m), bool(getattr(m, "is_cross_attention", False))
        if (kind == "cross" and (cross or joint)) or (kind == "self" and not cross):
            out.append(m)
    return out


class _Sink:
    """Running sums of head-averaged (or per-head) probabilities for one output key."""

    def __init__(self, heads: str) -> None:
        self.heads, self.total, self.count = heads, None, 0

    def add(self, probs: torch.Tensor) -> None:  # probs [B, H, Nq, Nk], fp32
        p = probs.mean(1) if self.heads == "mean" else probs
        self.total = p if self.total is None else self.total + p
        self.count += 1

    def result(self) -> torch.Tensor:
        assert self.total is not None
        return self.total / self.count


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention (SDPA's default scale 1/sqrt(d)); returns (output, fp32 probs)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1)
    return torch.matmul(probs.to(v.dtype), v), probs


def _renorm(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


class CapturingProcessor:
    """A diffusers attention processor that records attention probabilities into sinks.

    ``sinks`` maps a kind (``cross``/``self``) to the sinks that want it from this module.
    """

    def __init__(self, sinks: dict[str, list[_Sink]]) -> None:
        self.sinks = sinks

    def _record(self, kind: str, probs: torch.Tensor) -> None:
        for s in self.sinks.get(kind, ()):
            s.add(probs)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if _is_joint(attn) and encoder_hidden_states is not None:
            return self._joint(attn, hidden_states, encoder_hidden_states)
        return self._standard(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _heads(self, attn: nn.Module, x: torch.Tensor, batch: int, head_dim: int) -> torch.Tensor:
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    def _standard(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        # mirrors diffusers AttnProcessor2_0
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        kind = "self" if encoder_hidden_states is None else "cross"
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (self._heads(attn, x, batch, head_dim) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out, probs = _attend(query, key, value, attention_mask)
        self._record(kind, probs)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _joint(self, attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # mirrors diffusers JointAttnProcessor2_0 (SD3 MM-DiT): one softmax over [image; text]
        batch, n_img = hidden_states.shape[:2]
        head_dim = attn.to_k.out_features // attn.heads
        q, k, v = (self._heads(attn, f(hidden_states), batch, head_dim) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq, ck, cv = (self._heads(attn, f(context), batch, head_dim) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        out, probs = _attend(torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2), None)
        rows = probs[:, :, :n_img]
        if self.sinks.get("self"):
            self._record("self", _renorm(rows[..., :n_img]))
        if self.sinks.get("cross"):
            self._record("cross", _renorm(rows[..., n_img:]))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, ctx


class AttentionCapture:
    """Which attention modules feed which output key; installs processors per call.

    Args:
        denoiser_layers: uniform layer name -> module (from :func:`difffeat.layers.layer_modules`).
        names: attention output keys (``attn.cross.up.1`` ...).
        heads: ``mean`` (average over heads) or ``all`` (keep [B, heads, Nq, Nk]).
    """

    def __init__(self, denoiser_layers: dict[str, nn.Module], names: Sequence[str], heads: str = "mean") -> None:
        if heads not in ("mean", "all"):
            raise BadInputError(f"unknown attention head mode {heads!r}; valid: mean, all")
        self.heads = heads
        self.modules: dict[str, list[nn.Module]] = {}
        for name in names:
            parsed = parse_attention_name(name)
            assert parsed is not None
            kind, layer = parsed
            mods = attention_modules(denoiser_layers[layer], kind)
            if not mods:
                raise BadInputError(f"layer {layer} has no {kind}-attention modules; cannot give {name}")
            for m in mods:
                proc = type(m.processor).__name__
                if proc not in _SUPPORTED and not isinstance(m.processor, CapturingProcessor):
                    raise BadInputError(f"cannot capture attention through processor {proc} ({name}); supported: {', '.join(_SUPPORTED)}")
            self.modules[name] = mods

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, _Sink]]:
        """Install capturing processors on the captured modules only; restore the originals after."""
        sinks = {name: _Sink(self.heads) for name in self.modules}
        per_module: dict[int, tuple[nn.Module, dict[str, list[_Sink]]]] = {}
        for name, mods in self.modules.items():
            kind = name[len(PREFIX):].split(".", 1)[0]
            for m in mods:
                per_module.setdefault(id(m), (m, {}))[1].setdefault(kind, []).append(sinks[name])
        originals = [(m, m.processor) for m, _ in per_module.values()]
        try:
            for m, by_kind in per_module.values():
                m.processor = CapturingProcessor(by_kind)
            yield sinks
        finally:
            for m, proc in originals:
                m.processor = proc

    def contains(self) -> set[int]:
        """ids of every captured attention module (callers must not compile their parents)."""
        return {id(m) for mods in self.modules.values() for m in mods}


__all__ = ["AttentionCapture", "CapturingProcessor", "attention_modules", "parse_attention_name", "KINDS"]
