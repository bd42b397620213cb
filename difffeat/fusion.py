"""Feature fusion after "A Tale of Two Features" (Zhang et al., NeurIPS 2023; SD-DINO).

Recipe (the paper's released zero-shot protocol):

1. per SD layer, reduce channels with PCA to ``k`` dims — fitted jointly on the images of
   one call (*co-PCA*, the paper's default for a pair) or a :class:`PCA` fitted on a set;
2. resample every map to one grid (SD-DINO: the DINOv2 patch grid, 60x60 at 840 px); with
   ``resample="pyramid"`` (SD-DINO's ``co_pca`` in ``utils/utils_correspondence.py``) each
   coarser layer is upsampled to the next finer layer's size and concatenated to it, then on
   (s5 15→30, [s4, s5] 30→60); ``"direct"`` (GeoAware-SC's ``pck_train.py``) resamples each
   layer to the grid in one step;
3. concatenate the SD layers and L2-normalise that descriptor; L2-normalise DINOv2's;
4. weight the two sources (α = 0.5 each) and concatenate.

PCA uses ``torch.pca_lowrank`` on centred features, as the reference does; signs and
rotations of the basis are irrelevant because both images share one basis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadInputError
from .geometry import Geometry, common


def l2_normalize(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Unit L2 norm along ``dim`` (channels for [B,C,h,w] maps)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def resample(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of [B,C,h,w] maps to ``size`` (align_corners=False)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@dataclass
class PCA:
    """A linear projection to ``k`` dims: ``(x - mean) @ components``."""

    mean: torch.Tensor  # [C]
    components: torch.Tensor  # [C, k]

    @classmethod
    def fit(cls, x: torch.Tensor, k: int, seed: int = 0) -> "PCA":
        """Fit on samples ``x`` [N, C] (or maps [B,C,h,w], each pixel a sample)."""
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        x = x.float()
        k = min(k, x.shape[0], x.shape[1])
        mean = x.mean(0)
        with torch.random.fork_rng(devices=[]):  # pca_lowrank is randomised; keep it reproducible
            torch.manual_seed(seed)
            _, _, v = torch.pca_lowrank(x - mean, q=k, center=False)
        return cls(mean, v[:, :k])

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        """Project [B,C,h,w] maps to [B,k,h,w]."""
        b, c, h, w = maps.shape
        flat = maps.permute(0, 2, 3, 1).reshape(-1, c).float() - self.mean.to(maps.device)
        out = flat @ self.components.to(maps.device)
        return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.cpu(), "components": self.components.cpu()}


def co_pca(maps: torch.Tensor, k: int) -> torch.Tensor:
    """PCA fitted jointly on all images of ``maps`` [B,C,h,w] and applied to them."""
    return PCA.fit(maps, k)(maps)


RESAMPLE_MODES = ("direct", "pyramid")


def pyramid_resample(maps: Sequence[torch.Tensor], grid: int | tuple[int, int]) -> torch.Tensor:
    """Coarse-to-fine: upsample the running stack to the next finer map's size, put that map
    in front, repeat; finally resample to ``grid`` (SD-DINO's s5 15→30→60 path)."""
    order = sorted(maps, key=lambda m: m.shape[-1] * m.shape[-2])
    stack = order[0]
    for finer in order[1:]:
        stack = torch.cat([finer, resample(stack, tuple(finer.shape[-2:]))], dim=1)
    return resample(stack, grid)


def fuse(
    groups: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    grid: int | tuple[int, int],
    pca_dims: Sequence[int | None] | None = None,
    pcas: Sequence[PCA | None] | None = None,
    resample_mode: str = "direct",
) -> torch.Tensor:
    """Fuse several sources into one descriptor map [B, D, *grid].

    ``groups[s]`` is the list of layer maps of source ``s``; each layer is reduced
    (``pcas[i]`` if given, else co-PCA to ``pca_dims[s]`` if set), resampled to ``grid``,
    the layers of a source are concatenated and L2-normalised, then the sources are
    weighted and concatenated. ``resample_mode``: see step 2 of the module docstring.
    """
    if len(groups) != len(weights):
        raise BadInputError(f"{len(groups)} sources but {len(weights)} weights")
    if resample_mode not in RESAMPLE_MODES:
        raise BadInputError(f"unknown fusion resample mode {resample_mode!r}; valid: {', '.join(RESAMPLE_MODES)}")
    parts, li = [], 0
    for s, layers in enumerate(groups):
        k = None if pca_dims is None else pca_dims[s]
        reduced = []
        for f in layers:
            p = None if pcas is None else pcas[li]
            li += 1
            reduced.append(p(f) if p is not None else (co_pca(f, k) if k else f.float()))
        if resample_mode == "pyramid":
            joined = pyramid_resample(reduced, grid)
        else:
            joined = torch.cat([resample(f, grid) for f in reduced], dim=1)
        parts.append(weights[s] * l2_normalize(joined))
    return torch.cat(parts, dim=1)


class FusedExtractor(nn.Module):
    """Several extractors fused into one descriptor map ``{"fused": [B, D, g, g]}``.

    Each source sees the images prepared with its own geometry (SD at 960 px padded,
    DINOv2 at 840 px padded for SD-DINO): PIL images are prepared by each source, a tensor
    is re-prepared by each source's :meth:`~difffeat.geometry.Geometry.prepare_tensor`, so a
    location falls in the same grid cell of every source. Sources must place the image alike
    (all ``pad``, or none; :func:`difffeat.geometry.common`). With ``pca_mode="co"`` the PCA of
    each layer is fitted on the images of the call, so call it on a pair (as the paper);
    ``fit_pca(images)`` instead fixes one PCA per layer from a set of images.
    """

    def __init__(self, sources: list[Any], weights: Sequence[float], pca_dims: Sequence[int | None],
                 grid: int, pca_mode: str = "co", name: str = "fused", resample_mode: str = "direct") -> None:
        super().__init__()
        self.sources = nn.ModuleList(sources)
        self.weights, self.pca_dims, self.grid = list(weights), list(pca_dims), int(grid)
        if pca_mode not in ("co", "fitted", "none"):
            raise BadInputError(f"unknown pca_mode {pca_mode!r}; valid: co, fitted, none")
        self.pca_mode, self.name, self.resample_mode = pca_mode, name, resample_mode
        self.pcas: list[PCA | None] | None = None
        self._geometry = common([s.geometry for s in sources])

    @classmethod
    def from_spec(cls, spec: dict[str, Any], name: str = "fused", **common_kw: Any) -> "FusedExtractor":
        """Build from a fusion spec as the YAML presets write it (``sources``, ``grid``, ``pca_mode``, ``resample``);
        ``common_kw`` (dtype, device, random_weights, max_batch, compile) go to every source that takes them."""
        from .factory import create

        srcs, weights, dims = [], [], []
        for s in spec["sources"]:
            s = dict(s)
            weights.append(float(s.pop("weight", 1.0)))
            dims.append(s.pop("pca", None))
            srcs.append(create(s.pop("model"), **{**common_kw, **s}))
        return cls(srcs, weights, dims, int(spec["grid"]), spec.get("pca_mode", "co"), name=name,
                   resample_mode=spec.get("resample", "direct"))

    @classmethod
    def from_preset(cls, preset: Any, **common_kw: Any) -> "FusedExtractor":
        return cls.from_spec(preset.raw["fusion"], name=preset.name, **common_kw)

    @property
    def keys(self) -> list[str]:
        return ["fused"]

    @property
    def geometry(self) -> Geometry:
        """The sources' common placement at the largest source resolution (what :meth:`prepare` gives)."""
        return self._geometry

    @property
    def device(self) -> torch.device:
        return self.sources[0].device

    @property
    def config(self) -> dict[str, Any]:
        """``difffeat.create(**config)`` rebuilds this fusion (a fitted PCA is state, not config)."""
        sources = []
        for src, w, k in zip(self.sources, self.weights, self.pca_dims):
            c = dict(src.config)
            sources.append({"model": c.pop("name"), **c, "pca": k, "weight": w})
        return {"name": self.name, "fusion": {"sources": sources, "grid": self.grid, "pca_mode": self.pca_mode,
                                              "resample": self.resample_mode}}

    @property
    def per_image(self) -> bool:
        """False with co-PCA: each call fits its PCA on the images it is given (a pair)."""
        return self.pca_mode != "co"

    def prepare(self, images: Sequence[Any]) -> torch.Tensor:
        return self._geometry.prepare(images)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        ch = 0
        for src, k in zip(self.sources, self.pca_dims):
            ch += sum(min(k, i["channels"]) if k else i["channels"] for i in src.feature_info)
        stride = max(i["stride"] for i in self.sources[-1].feature_info)
        return [{"name": "fused", "layer": "fused", "t": None, "channels": ch, "stride": stride}]

    def metadata(self) -> dict[str, Any]:
        return {"model": self.name, "sources": [s.metadata() for s in self.sources], "weights": self.weights,
                "pca_dims": self.pca_dims, "pca_mode": self.pca_mode, "grid": self.grid, "resample": self.resample_mode}

    def source_maps(self, images: Any, **kw: Any) -> list[list[torch.Tensor]]:
        """Every source's layer maps of ``images`` (PIL list or tensor), each source with its geometry."""
        out = []
        for src in self.sources:
            x = images
            if isinstance(images, torch.Tensor):
                x = src.geometry.prepare_tensor(images if images.dim() == 4 else images.unsqueeze(0))
            feats = src(x, **kw)
            out.append([feats[k] for k in src.keys])
        return out

    def fuse_maps(self, groups: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """Fuse :meth:`source_maps` output (of one call, or of a pair concatenated) to [B, D, g, g]."""
        if self.pca_mode == "fitted" and self.pcas is None:
            raise BadInputError("pca_mode 'fitted' needs fit_pca(images) first")
        dims = None if self.pca_mode == "none" else self.pca_dims
        pcas = self.pcas if self.pca_mode == "fitted" else None
        return fuse(groups, self.weights, self.grid, dims, pcas, self.resample_mode)

    @torch.no_grad()
    def fit_pca(self, images: Any, **kw: Any) -> None:
        """Fit one PCA per reduced layer on ``images`` and use it for every later call."""
        pcas: list[PCA | None] = []
        for maps, k in zip(self.source_maps(images, **kw), self.pca_dims):
            pcas.extend(PCA.fit(m, k) if k else None for m in maps)
        self.pcas, self.pca_mode = pcas, "fitted"

    @torch.no_grad()
    def forward(self, images: Any, **kw: Any) -> dict[str, torch.Tensor]:
        if self.pca_mode == "fitted" and self.pcas is None:
            raise BadInputError("pca_mode 'fitted' needs fit_pca(images) first")
        return {"fused": self.fuse_maps(self.source_maps(images, **kw))}
