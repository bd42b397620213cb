"""GeoAware-SC zero-shot (Zhang et al., CVPR 2024) against Junyi42/GeoAware-SC's own functions.

The SD half runs through ODISE (not installable here): SD maps s5/s4/s3 and DINOv2 maps come
from difffeat (tiny random models; FreeU itself is pinned against a re-implementation of the
fork's ``ldm.py`` in tests/test_fidelity_protocol.py). After them the release's code runs:
``utils/utils_correspondence.py`` ``kpts_to_patch_idx`` and ``calculate_keypoint_transformation``
(SOFT_EVAL, window soft-argmax ``get_flow`` / ``soft_argmax``), imported as is (only
``get_flow``'s ``num_patches=60`` default is set to the tiny 16 x 16 grid); ``pck_train.py``
L25-39 ``normalize_feats`` (DUMMY_NET: SD and DINO normalised apart, then together) and L55-60
(s3 + s4, s5 bilinearly to the grid + DINO) are re-typed because that script imports wandb etc.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from common import correspondence_utils, emit, keypoints, pair_setup, parse_args


def reference_descriptors(sd, dino):  # type: ignore[no-untyped-def]
    """pck_train.py L55-60 + L25-39 (DUMMY_NET): [2, N, D] unit descriptors."""
    g = dino.shape[-1]
    gathered = torch.cat([sd[2], F.interpolate(sd[1], size=(g, g), mode="bilinear", align_corners=False),
                          F.interpolate(sd[0], size=(g, g), mode="bilinear", align_corners=False), dino], 1)
    feats = gathered.reshape(2, gathered.shape[1], -1).permute(0, 2, 1)
    n_sd = sum(m.shape[1] for m in sd)  # the release hard-codes 640 + 1280 + 1280
    f_sd, f_dino = feats[..., :n_sd], feats[..., n_sd:]
    feats = torch.cat([f_sd / (f_sd.norm(dim=-1, keepdim=True) + 1e-10), f_dino / (f_dino.norm(dim=-1, keepdim=True) + 1e-10)], -1)
    return feats / (feats.norm(dim=-1, keepdim=True) + 1e-10)


def main() -> None:
    args = parse_args("GeoAware-SC", __doc__)
    from difffeat.fusion import fuse
    from difffeat.heads.matching import match_points

    sd, dino = pair_setup(50, args.seed)
    utils = correspondence_utils(args.ref)
    g, side = dino.shape[-1], 224
    utils.get_flow.__defaults__ = (0, g)  # its num_patches default is the release's 60; the tiny grid is 16
    with torch.no_grad():
        ref = reference_descriptors(sd, dino)
        ours = fuse([sd, [dino]], [0.5, 0.5], grid=g, resample_mode="direct")
        # cosine similarities: the release's unit descriptors = difffeat's x sqrt(2) (channel order aside)
        sim_ref = ref[0] @ ref[1].T
        sim_ours = 2 * ours[0].flatten(1).T @ ours[1].flatten(1)
        kps = keypoints(60, side, args.seed)
        opts = types.SimpleNamespace(ANNO_SIZE=side, SOFT_EVAL=True, SOFT_EVAL_WINDOW=5)
        idx = torch.as_tensor(utils.kpts_to_patch_idx(opts, kps, g)).long()
        ref_pts = utils.calculate_keypoint_transformation(opts, ref[:1], ref[1:], idx, g)
        ours_pts = match_points(ours[0], ours[1], kps, src_size=(side, side), tgt_size=(side, side), mode="soft",
                                upsample=False, window_radius=5, temperature=0.02, src_read="cell").points
    stride = side / g
    ref_cells = (ref_pts - stride // 2) / stride       # release: cell * stride + stride // 2
    ours_cells = (ours_pts + 0.5) / stride - 0.5       # difffeat: the cell centre convention
    err = (ref_cells - ours_cells).abs().max(1).values
    emit("geoaware-zs", "Junyi42/GeoAware-SC utils/utils_correspondence.py (imported) + pck_train.py (re-typed)",
         args.ref, max_abs=float((sim_ours - sim_ref).abs().max()),
         rel_l2=float((sim_ours - sim_ref).norm() / sim_ref.norm()),
         agreement=f"{int((err < 1e-3).sum())}/{len(err)} soft-argmax points within 1e-3 cell",
         max_cell_error=float(err.max()),
         pixel_convention="the release reports cell * 14 + 7, difffeat (cell + 0.5) * 14 - 0.5: 0.5 px apart",
         note="SD maps from difffeat (ODISE cannot run); compared: cosine similarities and soft-argmax points")


if __name__ == "__main__":
    main()
