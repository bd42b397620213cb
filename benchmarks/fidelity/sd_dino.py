"""SD-DINO (Zhang et al., NeurIPS 2023) against Junyi42/sd-dino's own functions, on identical tensors.

The SD half of the release runs through ODISE/detectron2 (not installable here), so the SD maps
s5/s4/s3 and the DINOv2 maps come from difffeat (tiny random models); everything after them runs
the release's code: ``utils/utils_correspondence.py`` ``co_pca`` (joint PCA of the pair, s5
15->30->60 pyramid) and ``pairwise_sim``, and ``pck_spair_pascal.py`` L283-299 (normalise SD and
DINO, WEIGHT 1,1,1,1,1) and L371-386 (nearest neighbour of the keypoint's cell, cell centre
``(j - 1) * stride + stride + patch // 2 - 0.5``), re-typed here because that script needs
ODISE at import. The randomised ``torch.pca_lowrank`` is reseeded to 0 before every call on
both sides (difffeat does that itself), so both draw the same random matrix.
"""
from __future__ import annotations

import torch

from common import correspondence_utils, diff, emit, keypoints, pair_setup, parse_args

K = 8  # PCA dims per SD layer (the release: 256 of 1280/1280/640; the tiny layers have 32/32/16)


def reference_descriptors(utils, sd, dino):  # type: ignore[no-untyped-def]
    """co_pca + normalisation + concatenation: [2, N, D] as pck_spair_pascal.py builds them."""
    f1 = {"s5": sd[0][:1], "s4": sd[1][:1], "s3": sd[2][:1]}
    f2 = {"s5": sd[0][1:], "s4": sd[1][1:], "s3": sd[2][1:]}
    orig = torch.pca_lowrank

    def seeded(*a, **k):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        return orig(*a, **k)

    torch.pca_lowrank = seeded
    try:
        p1, p2 = utils.co_pca(f1, f2, [K, K, K])
    finally:
        torch.pca_lowrank = orig
    out = []
    for p, d in ((p1, dino[:1]), (p2, dino[1:])):
        desc = p.reshape(1, 1, -1, p.shape[-1] ** 2).permute(0, 1, 3, 2)
        dd = d.reshape(1, 1, d.shape[1], -1).permute(0, 1, 3, 2)
        desc = desc / desc.norm(dim=-1, keepdim=True)
        dd = dd / dd.norm(dim=-1, keepdim=True)
        out.append(torch.cat([desc, dd], -1)[0, 0])
    return torch.stack(out)


def reference_match(utils, desc, kps, side, g):  # type: ignore[no-untyped-def]
    """pck_spair_pascal.py L200-203 (patch index of the keypoint) and L371-386 (l2 nearest neighbour)."""
    patch_idx = g * (g / side * kps[:, 1]).long() + (g / side * kps[:, 0]).long()
    sim = utils.pairwise_sim(desc[0][None, None], desc[1][None, None], p=2).squeeze()
    nn = torch.argmax(sim[patch_idx], dim=1)
    stride = patch = side // g
    ny, nx = nn // g, nn % g
    return torch.stack([(nx - 1) * stride + stride + patch // 2 - .5, (ny - 1) * stride + stride + patch // 2 - .5], 1)


def main() -> None:
    args = parse_args("sd-dino", __doc__)
    from difffeat.fusion import fuse
    from difffeat.heads.matching import match_points

    sd, dino = pair_setup(100, args.seed)
    utils = correspondence_utils(args.ref)
    with torch.no_grad():
        g, side = dino.shape[-1], 224
        ref = reference_descriptors(utils, sd, dino)
        ours = fuse([sd, [dino]], [0.5, 0.5], grid=g, pca_dims=[K, None], resample_mode="pyramid")
        ours_flat = 2 * ours.flatten(2).transpose(1, 2)  # weights 0.5 vs the release's 1: one common scale
        kps = keypoints(60, side, args.seed)
        ref_pts = reference_match(utils, ref, kps, side, g)
        our_pts = match_points(ours[0], ours[1], kps, src_size=(side, side), tgt_size=(side, side), metric="l2",
                               upsample=False, src_read="cell").points
    d = diff(ours_flat, ref)
    same = (ref_pts - our_pts).abs().max(1).values < 1e-4
    emit("sd-dino", "Junyi42/sd-dino utils/utils_correspondence.py co_pca, pairwise_sim + pck_spair_pascal.py (re-typed)",
         args.ref, max_abs=d["max_abs"], rel_l2=d["rel_l2"],
         agreement=f"{int(same.sum())}/{len(same)} predicted points identical",
         note="SD maps from difffeat (ODISE cannot run); the SD extraction is covered by dift.py and tests")


if __name__ == "__main__":
    main()
