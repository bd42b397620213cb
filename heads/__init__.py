"""Trainable dense heads on frozen backbone features (native torch).

Each head is built from a backbone's ``feature_info`` and called with the feature dict
the extractor returns: ``head(feats, out_size=(H, W))``.

* :class:`SemanticFPNHead` (``fpn``): segmentation, as VPD uses on ADE20K.
* :class:`DepthHead` (``depth``): VPD/GLPDepth-style depth decoder.
* :class:`HEDHead` (``hed``): side outputs per scale + learned fusion for edges.
* :class:`LinearProbeHead` (``probe``): BN + 1x1 conv probe for any dense task.
* :class:`HyperfeatureAggregator`: Diffusion-Hyperfeatures mixing of layers x timesteps,
  usable in front of any head (``build_head(..., aggregator={...})``).
* :func:`kmeans_segment`: zero-shot segmentation by K-means over features (no training).
"""
from .aggregator import HyperfeatureAggregator
from .checkpoint import LoadedHead, check_backbone, load_head, read_config, save_head
from .depth import DepthHead
from .edges import HEDHead
from .fpn import SemanticFPNHead
from .kmeans_seg import kmeans, kmeans_segment
from .losses import align_scale_shift, class_balanced_bce, hed_loss, silog_loss, ssi_l1_loss
from .probe import LinearProbeHead
from .registry import HEADS, AggregatedHead, build_head

__all__ = [
    "HEADS", "AggregatedHead", "DepthHead", "HEDHead", "HyperfeatureAggregator", "LinearProbeHead",
    "LoadedHead", "SemanticFPNHead", "align_scale_shift", "build_head", "check_backbone",
    "class_balanced_bce", "hed_loss", "kmeans", "kmeans_segment", "load_head", "read_config", "save_head", "silog_loss",
    "ssi_l1_loss",
]
