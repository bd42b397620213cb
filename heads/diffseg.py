"""DiffSeg: unsupervised zero-shot segmentation by merging self-attention maps.

Tian, Aggarwal, Colaco, Kira, Gonzalez-Franco. *Diffuse, Attend, and Segment: Unsupervised
Zero-Shot Segmentation using Stable Diffusion.* CVPR 2024 (arXiv:2308.12469). The paper
reports, without any training or labels, COCO-Stuff-27 pixel accuracy 72.5 / mIoU 43.6 and
Cityscapes 76.0 / 21.2 (recalled from the paper's table; not re-checked here).

Protocol (preset ``diffseg`` in ``configs/segment/diffseg.yaml``), as the release
(google/diffseg, ``diffseg.ipynb`` + ``third_party/keras_cv``): the image is centre-cropped to a
square and resized bilinearly to 512² (``utils.process_image``); the VAE posterior **mean** ×
0.18215 (keras-cv ``ImageEncoder``'s last layer) is fed **without noise** with the t=300
embedding and the empty prompt (``text_to_image(latent=..., timestep=300)``); the
self-attention probabilities of all 16 transformer modules are read, averaged over heads.
Then, per image:

1. **Aggregation.** The maps of one resolution ``r`` are averaged over their **modules**
   (``diffusion_model.py`` adds ``temp / 5`` for the 2 down + 3 up modules at 64/32/16; the
   mid module alone at 8); each ``[r², r²]`` map has its key dimensions upsampled bilinearly
   to the finest grid ``G`` (and renormalised to sum to one), its query dimensions repeated
   ``G/r`` times, and the resolutions are summed with weights proportional to ``r``
   (``segmentor.py`` ``get_weight_rato``). Pass one map per module (the preset's layer
   names are module-level, :func:`self_attention_layers`).
2. **Iterative merging.** ``M × M`` anchors on a regular grid (M=16); every query map whose
   symmetric KL distance ``(KL(p‖q) + KL(q‖p)) / 2`` to an anchor is below τ is averaged
   into that anchor's proposal; then, for the remaining iterations (3 in all), proposals
   within τ of each other are merged greedily in order.
3. **Non-maximum suppression.** Proposals are upsampled bilinearly to the output size; every
   pixel takes the proposal with the largest value.

Two merging precisions (``kl_precision``):

* ``release-fp16`` (the preset's default, the behaviour behind the published numbers): the
  release casts anchors and maps to float16 for the first merge (``segmentor.py``
  ``mask_merge``, ``tf.cast(..., tf.float16)``) and takes ``log`` without an epsilon, so any
  probability that underflows to 0 in fp16 makes that row's KL NaN, ``NaN < τ`` is False, and
  anchors that match nothing become NaN proposals that the later merges drop silently. This
  mode reproduces that NaN pattern exactly (a KL is NaN iff either fp16-rounded row holds a
  zero) and computes the remaining distances in fp32 on the fp16-rounded maps (the release
  does the arithmetic in fp16: values within fp16 rounding of τ may decide differently).
* ``fp32``: the same distances in fp32 with an epsilon, no NaN, nothing dropped (many more,
  smaller segments on sharp attention).

τ defaults to 1.1 as in the paper's main setting; the release's demo notebook uses 0.9.
The optional K-means refinement of the release (``refine=True``) re-clusters all query maps
from the merged proposals. Deviations from the release: SD-1.5 weights instead of SD-1.4
(same architecture); the attention is computed in fp32 from the model's own q/k (the
release's keras-cv model runs in its default precision); diffusers' VAE/UNet instead of the
keras-cv port of the same weights; bf16 UNet on CUDA by default (pass fp32 for the
release's precision).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from difffeat.attention import attention_modules
from difffeat.errors import BadInputError

from .kmeans_seg import relabel_by_first_appearance

EPS = 1e-12


def self_attention_layers(denoiser: torch.nn.Module) -> list[str]:
    """Module-level names (``down.i.attn.j``, ``mid.attn.0``, ``up.i.attn.j``) of a UNet's
    self-attention transformers, in forward order: one map per module, as DiffSeg averages."""
    from difffeat.layers import layer_modules

    modules = layer_modules(denoiser)
    order = {"down": 0, "mid": 1, "up": 2}
    blocks = sorted((n for n in modules if n == "mid" or (n.count(".") == 1 and n.split(".")[0] in ("down", "up"))),
                    key=lambda n: (order[n.split(".")[0]], int(n.split(".")[1]) if "." in n else 0))
    names = [sub for n in blocks for sub in _attention_children(modules, n) if attention_modules(modules[sub], "self")]
    if not names:
        raise BadInputError(f"{type(denoiser).__name__} has no self-attention blocks; DiffSeg needs a UNet with attention")
    return names


def _attention_children(modules: Mapping[str, torch.nn.Module], block: str) -> list[str]:
    """``BLOCK.attn.j`` names under ``block`` in index order."""
    subs = [n for n in modules if n.startswith(block + ".attn.") and n.count(".") == block.count(".") + 2]
    return sorted(subs, key=lambda n: int(n.rsplit(".", 1)[1]))


def aggregate(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Aggregate self-attention maps ``[B, r², r²]`` (several resolutions) into ``[B, G², G²]``.

    Rows (queries) of the result sum to one; ``G`` is the finest resolution. Maps of one
    resolution are averaged with equal weights: pass one map per attention module.
    """
    by_res: dict[int, list[torch.Tensor]] = {}
    for m in maps:
        r = int(round(m.shape[-1] ** 0.5))
        if r * r != m.shape[-1] or m.shape[-1] != m.shape[-2]:
            raise BadInputError(f"self-attention map of shape {tuple(m.shape)} is not [B, r*r, r*r]")
        by_res.setdefault(r, []).append(m.float())
    G = max(by_res)
    weights = {r: r / sum(by_res) for r in by_res}
    out = None
    for r, ms in sorted(by_res.items()):
        if G % r:
            raise BadInputError(f"attention resolution {r} does not divide the finest one, {G}")
        a = torch.stack(ms).mean(0)  # [B, r², r²]
        B = a.shape[0]
        keys = F.interpolate(a.reshape(B * r * r, 1, r, r), size=(G, G), mode="bilinear", align_corners=False)
        keys = keys.reshape(B, r, r, G * G)
        keys = keys / keys.sum(-1, keepdim=True).clamp_min(EPS)
        f = G // r
        q = keys.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2).reshape(B, G * G, G * G)
        out = q * weights[r] if out is None else out + q * weights[r]
    assert out is not None
    return out


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(KL(p‖q) + KL(q‖p)) / 2`` between every row of ``p`` [A, N] and of ``q`` [M, N] -> [A, M]."""
    lp, lq = p.clamp_min(EPS).log(), q.clamp_min(EPS).log()
    self_p = (p * lp).sum(-1, keepdim=True)
    self_q = (q * lq).sum(-1)[None]
    return 0.5 * (self_p + self_q - p @ lq.T - lp @ q.T)


def anchor_grid(size: int, points: int) -> torch.Tensor:
    """Flat indices of ``points × points`` regularly spaced anchors on a ``size × size`` grid."""
    points = min(points, size)
    step = (size - 1) // max(points - 1, 1)
    start = (size - 1 - step * (points - 1)) // 2
    coords = torch.arange(points) * step + start
    return (coords[:, None] * size + coords[None, :]).flatten()


KL_PRECISIONS = ("release-fp16", "fp32")


def release_fp16_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The release's first-merge distance: :func:`symmetric_kl` of the fp16-rounded rows, NaN
    where either row holds an fp16 zero (``log(0)`` without epsilon, ``segmentor.py`` ``KL``)."""
    p16, q16 = p.half(), q.half()
    d = symmetric_kl(p16.float(), q16.float())
    nan = (p16 == 0).any(-1, keepdim=True) | (q16 == 0).any(-1)[None]
    return d.masked_fill(nan, float("nan"))


def merge(attn: torch.Tensor, tau: Sequence[float], points: int = 16, kl_precision: str = "fp32") -> torch.Tensor:
    """Iterative attention merging of one image's ``[N, N]`` query maps -> proposals ``[P, N]``."""
    if kl_precision not in KL_PRECISIONS:
        raise BadInputError(f"unknown DiffSeg kl_precision {kl_precision!r}; valid: {', '.join(KL_PRECISIONS)}")
    G = int(round(attn.shape[0] ** 0.5))
    anchors = attn[anchor_grid(G, points).to(attn.device)]
    if kl_precision == "fp32":
        close = (symmetric_kl(anchors, attn) < tau[0]).float()  # each anchor matches at least itself
    else:
        close = (release_fp16_kl(anchors, attn) < tau[0]).float()  # NaN compares False
    props = (close @ attn) / close.sum(1, keepdim=True)
    props = props[~props.isnan().any(1)]  # release-fp16: anchors that matched nothing are dropped
    if len(props) == 0:
        raise BadInputError("DiffSeg: every anchor's fp16 KL is NaN (attention underflows); use kl_precision fp32")
    for t in tau[1:]:
        near = symmetric_kl(props, props) < t
        taken = torch.zeros(len(props), dtype=torch.bool, device=props.device)
        merged = []
        for i in range(len(props)):
            if taken[i]:
                continue
            group = near[i] | (torch.arange(len(props), device=props.device) == i)
            taken |= group
            merged.append(props[group].mean(0))
        props = torch.stack(merged)
    return props


def refine(attn: torch.Tensor, props: torch.Tensor) -> torch.Tensor:
    """The release's optional refinement: K-means (sklearn, one run) of all query maps,
    initialised at the proposals; proposals become the cluster means."""
    from sklearn.cluster import KMeans

    x = attn.double().cpu().numpy()
    labels = KMeans(n_clusters=len(props), init=props.double().cpu().numpy(), n_init=1).fit(x).labels_
    labels_t = torch.as_tensor(labels, device=attn.device)
    return torch.stack([attn[labels_t == c].mean(0) for c in labels_t.unique()])


def diffseg_segment(
    maps: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    out_size: tuple[int, int] | None = None,
    tau: float | Sequence[float] = 1.1,
    iterations: int = 3,
    points: int = 16,
    refine_kmeans: bool = False,
    kl_precision: str = "fp32",
) -> list[torch.Tensor]:
    """DiffSeg segment ids for a batch: one ``[H, W]`` long tensor per image (0..P-1, numbered
    by first appearance in raster order; P, the number of segments, varies per image).

    ``maps``: self-attention maps ``[B, r², r²]`` (rows summing to one) of the layers to
    aggregate, e.g. the ``attn.self.*`` outputs of :func:`difffeat.create` (one per module).
    ``kl_precision``: ``fp32`` or ``release-fp16`` (see the module docstring).
    """
    taus = [float(tau)] * iterations if isinstance(tau, (int, float)) else [float(t) for t in tau]
    if not taus:
        raise BadInputError("DiffSeg needs at least one merging iteration")
    agg = aggregate(list(maps.values()) if isinstance(maps, Mapping) else list(maps))
    G = int(round(agg.shape[-1] ** 0.5))
    out = []
    for a in agg:
        props = merge(a, taus, points, kl_precision)
        if refine_kmeans:
            props = refine(a, props)
        up = F.interpolate(props.reshape(1, -1, G, G), size=out_size or (G, G), mode="bilinear", align_corners=False)[0]
        out.append(relabel_by_first_appearance(up.argmax(0)))
    return out
