"""``Conditioning``: the denoiser's keyword arguments for a batch, below every family adapter.

It lives apart from :mod:`difffeat.backbone` so that the family adapters
(:mod:`difffeat.families`) can build it without importing the backbone (imports point down).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


def _tree_map(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return obj


def batch_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a batch-of-one tensor to ``batch`` rows (a view, no copy)."""
    return x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 and batch > 1 else x


@dataclass
class Conditioning:
    """Keyword arguments for the denoiser, every tensor with the batch first.

    ``kwargs`` holds e.g. ``encoder_hidden_states``, ``added_cond_kwargs`` or
    ``class_labels``. An empty dict means unconditional.
    """

    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1

    def select(self, idx: torch.Tensor | Sequence[int] | slice) -> "Conditioning":
        if isinstance(idx, slice):
            n = len(range(*idx.indices(self.batch_size)))
            return Conditioning(_tree_map(lambda t: t[idx], self.kwargs), n)
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return Conditioning(_tree_map(lambda t: t[idx_t.to(t.device)], self.kwargs), len(idx_t))

    def repeat_interleave(self, n: int) -> "Conditioning":
        return Conditioning(_tree_map(lambda t: t.repeat_interleave(n, dim=0), self.kwargs), self.batch_size * n)

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        first = items[0].kwargs

        def merge(path: tuple[str, ...], ref: Any) -> Any:
            if isinstance(ref, dict):
                return {k: merge(path + (k,), v) for k, v in ref.items()}
            if isinstance(ref, torch.Tensor):
                parts = []
                for it in items:
                    v: Any = it.kwargs
                    for p in path:
                        v = v[p]
                    parts.append(v)
                return torch.cat(parts, dim=0)
            return ref

        return Conditioning(merge((), first), sum(it.batch_size for it in items))


__all__ = ["Conditioning", "batch_rows"]
