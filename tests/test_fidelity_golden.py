"""Golden numbers from the reference code (tests/fixtures/fidelity/*.safetensors).

Made once by ``python benchmarks/fidelity/make_fixtures.py`` from Junyi42/sd-dino,
Junyi42/GeoAware-SC and (re-implemented from its TensorFlow code) google/diffseg at the commits
in each file's metadata, on synthetic model-free inputs; difffeat must reproduce them here
without the reference code.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from difffeat.fusion import fuse
from difffeat.heads.diffseg import aggregate, diffseg_segment
from difffeat.heads.matching import match_points

FIX = Path(__file__).parent / "fixtures" / "fidelity"


def _load(name: str) -> dict[str, torch.Tensor]:
    with safe_open(str(FIX / f"{name}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert len(meta["commit"]) == 40 and meta["command"].startswith("python benchmarks/fidelity/make_fixtures.py")
    return load_file(str(FIX / f"{name}.safetensors"))


def test_sd_dino_descriptors_and_matches_equal_the_release() -> None:
    x = _load("sd_dino")
    fused = fuse([[x["s5"], x["s4"], x["s3"]], [x["dino"]]], [0.5, 0.5], grid=16, pca_dims=[8, None], resample_mode="pyramid")
    # joint co-PCA, the s5 15->30->60 pyramid, normalisation; the release weights 1/1, difffeat 0.5/0.5
    torch.testing.assert_close(2 * fused.flatten(2).transpose(1, 2), x["ref_descriptors"], rtol=1e-4, atol=1e-4)
    m = match_points(fused[0], fused[1], x["kps"], src_size=(224, 224), tgt_size=(224, 224), metric="l2",
                     upsample=False, src_read="cell")
    torch.testing.assert_close(m.points, x["ref_points"])  # the containing cell; cell centres j*14 + 6.5


def test_geoaware_similarities_and_soft_argmax_equal_the_release() -> None:
    x = _load("geoaware")
    fused = fuse([[x["s5"], x["s4"], x["s3"]], [x["dino"]]], [0.5, 0.5], grid=16, resample_mode="direct")
    a, b = fused[0].flatten(1), fused[1].flatten(1)
    cells = (x["kps"] * 16 / 224).long()
    rows = cells[:, 1] * 16 + cells[:, 0]  # kpts_to_patch_idx
    torch.testing.assert_close(2 * a[:, rows].T @ b, x["ref_similarity_rows"], rtol=1e-4, atol=1e-5)
    m = match_points(fused[0], fused[1], x["kps"], src_size=(224, 224), tgt_size=(224, 224), mode="soft",
                     upsample=False, window_radius=5, temperature=0.02, src_read="cell")
    ours_cells = (m.points + 0.5) / 14 - 0.5
    ref_cells = (x["ref_points"] - 7) / 14  # the release reports cell * 14 + 14 // 2
    torch.testing.assert_close(ours_cells, ref_cells, rtol=0, atol=1e-3)


@pytest.mark.parametrize("tau", [1.1, 0.9])
def test_diffseg_aggregation_and_release_fp16_segments_equal_the_release(tau: float) -> None:
    x = _load("diffseg")
    maps = [v for k, v in x.items() if k.startswith("attn.")]  # one map per module, 5 + 5 + 1
    torch.testing.assert_close(aggregate(maps)[0], x["ref_aggregate"], rtol=1e-5, atol=1e-8)
    seg = diffseg_segment(maps, out_size=(32, 32), tau=tau, points=4, kl_precision="release-fp16")[0]
    assert torch.equal(seg, x[f"ref_seg_tau{tau}"])
    fp32 = diffseg_segment(maps, out_size=(32, 32), tau=tau, points=4, kl_precision="fp32")[0]
    assert int(fp32.max()) > int(seg.max())  # the fp16 NaN drop loses the sharp region's anchors
