"""Build heads by name, optionally behind a Diffusion-Hyperfeatures aggregator.

Every module returned by :func:`build_head` carries ``.spec`` (kind, args, aggregator,
feature_info): everything :mod:`.checkpoint` needs to rebuild it without pickle.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from difffeat.errors import BadInputError, one_of

from .aggregator import HyperfeatureAggregator
from .blocks import FeatureInfo, check_feature_info
from .depth import DepthHead
from .edges import HEDHead
from .fpn import SemanticFPNHead
from .probe import LinearProbeHead

HEADS: dict[str, type[nn.Module]] = {
    "fpn": SemanticFPNHead,
    "depth": DepthHead,
    "hed": HEDHead,
    "probe": LinearProbeHead,
}


class AggregatedHead(nn.Module):
    """A :class:`HyperfeatureAggregator` feeding one head: ``head({"hyperfeatures": agg(feats)})``."""

    def __init__(self, aggregator: HyperfeatureAggregator, head: nn.Module) -> None:
        super().__init__()
        self.aggregator, self.head = aggregator, head

    def forward(self, feats: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        return self.head({self.aggregator.out_name: self.aggregator(feats)}, *args, **kwargs)


def build_head(
    kind: str,
    feature_info: FeatureInfo,
    aggregator: Mapping[str, Any] | None = None,
    **args: Any,
) -> nn.Module:
    """Create head ``kind`` (``fpn``, ``depth``, ``hed``, ``probe``) for ``feature_info``.

    ``aggregator``: keyword arguments of :class:`HyperfeatureAggregator` to put one in front
    (``{}`` for its defaults), or None for none. ``args`` go to the head's constructor.
    """
    if kind not in HEADS:
        raise one_of("head", kind, list(HEADS))
    info = check_feature_info(feature_info)
    try:
        if aggregator is not None:
            agg = HyperfeatureAggregator(info, **aggregator)
            module: nn.Module = AggregatedHead(agg, HEADS[kind](agg.out_feature_info, **args))
        else:
            module = HEADS[kind](info, **args)
    except TypeError as e:  # unknown / missing constructor arguments
        raise BadInputError(f"bad arguments for head {kind!r}: {e}") from None
    module.spec = {  # type: ignore[assignment]
        "kind": kind,
        "args": copy.deepcopy(dict(args)),
        "aggregator": None if aggregator is None else copy.deepcopy(dict(aggregator)),
        "feature_info": info,
    }
    return module
