"""DiffSeg (Tian et al., CVPR 2024): aggregation, symmetric KL, merging, NMS, and the CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from difffeat.heads.diffseg import aggregate, anchor_grid, diffseg_segment, merge, self_attention_layers, symmetric_kl


def block_attention(regions: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[N, N] self-attention where every query attends uniformly to its own region."""
    flat = regions.flatten()
    a = (flat[:, None] == flat[None, :]).float() + eps
    return a / a.sum(1, keepdim=True)


def regions_8x8() -> torch.Tensor:
    r = torch.zeros(8, 8, dtype=torch.long)
    r[:, 5:] = 1
    r[5:, :3] = 2
    return r


def test_symmetric_kl_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(3, 10, generator=g).softmax(-1), torch.rand(4, 10, generator=g).softmax(-1)
    want = torch.tensor([[0.5 * ((pi * (pi / qj).log()).sum() + (qj * (qj / pi).log()).sum()) for qj in q] for pi in p])
    torch.testing.assert_close(symmetric_kl(p, q), want, rtol=1e-5, atol=1e-6)
    assert symmetric_kl(p, p).diagonal().abs().max() < 1e-5


def test_aggregation_keeps_rows_normalised_and_weights_by_resolution() -> None:
    fine = block_attention(regions_8x8())[None]
    assert torch.allclose(aggregate([fine]), fine)  # one resolution: unchanged
    coarse = torch.full((1, 16, 16), 1 / 16)  # 4x4 uniform attention
    agg = aggregate([fine, coarse, fine])  # the two 8x8 maps are averaged first
    torch.testing.assert_close(agg.sum(-1), torch.ones(1, 64))
    # weights proportional to resolution: 8/12 for the 8x8 level, 4/12 for the 4x4 one (uniform after upsampling)
    torch.testing.assert_close(agg, fine * 8 / 12 + torch.full_like(fine, 1 / 64) * 4 / 12, rtol=1e-5, atol=1e-7)


def test_anchor_grid_is_centred_and_regular() -> None:
    idx = anchor_grid(64, 16)  # the release's grid: step 63 // 15 = 4, start (63 - 60) // 2 = 1
    rows, cols = idx // 64, idx % 64
    assert len(idx) == 256 and rows.unique().tolist() == list(range(1, 62, 4)) and cols.unique().tolist() == list(range(1, 62, 4))


def test_merging_recovers_the_regions_that_queries_attend_to() -> None:
    regions = regions_8x8()
    attn = block_attention(regions)
    props = merge(attn, [1.1] * 3, points=4)
    assert len(props) == 3  # 16 anchors collapse onto the 3 regions
    seg = diffseg_segment([attn[None]], out_size=(8, 8), points=4)[0]
    assert torch.equal(seg, regions)  # ids by first appearance: region 0 at (0,0), 1 at (0,5), 2 at (5,0)
    big = diffseg_segment([attn[None]], out_size=(32, 32), points=4)[0]
    assert torch.equal(big[2::4, 2::4], regions)  # NMS after bilinear upsampling keeps the layout (cell centres)
    # a threshold above every distance merges everything into one segment
    assert int(diffseg_segment([attn[None]], points=4, tau=1e6)[0].max()) == 0


def test_self_attention_layers_of_a_unet(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    names = self_attention_layers(tiny_sd.denoiser)
    assert names[0].startswith("down.") and names[-1].startswith("up.") and "mid.attn.0" in names
    assert all(".attn." in n for n in names)  # one map per module: resolutions average over modules
    assert names == sorted(names, key=lambda n: ({"down": 0, "mid": 1, "up": 2}[n.split(".")[0]], n))


def test_the_preset_reads_sixteen_modules_of_the_clean_latent_after_a_centre_crop() -> None:
    """The release: 2 down + 3 up modules at 64/32/16 (each 1/5) and the mid module at 8;
    the clean posterior mean with the t=300 embedding; centre crop + bilinear 512."""
    from difffeat.registry import get_preset

    ex = get_preset("diffseg").extract
    layers = [n.removeprefix("attn.self.") for n in ex["layers"]]
    per_block = {b: sum(n.startswith(b + ".") for n in layers) for b in ("down.0", "down.1", "down.2", "mid", "up.1", "up.2", "up.3")}
    assert per_block == {"down.0": 2, "down.1": 2, "down.2": 2, "mid": 1, "up.1": 3, "up.2": 3, "up.3": 3}
    assert (ex["noise"], ex["latent"], ex["timesteps"], ex["resize"], ex["resolution"]) == ("clean", "mean", [300], "crop", 512)
    assert get_preset("diffseg").raw["diffseg"]["kl_precision"] == "release-fp16"


def test_aggregation_weights_every_module_equally_within_a_resolution() -> None:
    # 2 "down" modules with map A and 3 "up" modules with map B: the release gives (2A + 3B) / 5;
    # averaging per block would give (A + B) / 2
    a, b = block_attention(regions_8x8())[None], torch.full((1, 64, 64), 1 / 64)
    torch.testing.assert_close(aggregate([a, a, b, b, b]), (2 * a + 3 * b) / 5)


def test_centre_crop_policy_is_the_release_process_image() -> None:
    from difffeat.io import centre_square, prepare_image

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)
    p = prepare_image(Image.fromarray(arr), 16, "crop")
    assert centre_square(50, 30) == (10, 0, 40, 30)
    crop = torch.from_numpy(arr[:, 10:40].copy()).permute(2, 0, 1).float()[None] / 255
    want = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(p.image, want)  # no squashing, no antialias, not quantised


def test_release_fp16_merge_drops_anchors_whose_kl_underflows() -> None:
    from difffeat.heads.diffseg import release_fp16_kl

    regions = regions_8x8()
    soft = block_attention(regions, eps=1e-4)  # every probability representable in fp16
    sharp = block_attention(regions, eps=1e-12)  # off-region probabilities underflow to 0 in fp16
    d = release_fp16_kl(soft, soft)
    torch.testing.assert_close(d, symmetric_kl(soft.half().float(), soft.half().float()))
    assert release_fp16_kl(sharp, soft).isnan().all() and release_fp16_kl(soft, sharp).isnan().all()
    assert len(merge(soft, [1.1] * 3, points=4, kl_precision="release-fp16")) == 3
    mixed = soft.clone()
    mixed[regions.flatten() == 2] = sharp[regions.flatten() == 2]  # region 2's rows underflow
    fp32 = merge(mixed, [1.1] * 3, points=4)
    rel = merge(mixed, [1.1] * 3, points=4, kl_precision="release-fp16")
    assert len(fp32) == 3 and len(rel) == 2  # region 2's anchors are NaN and silently dropped
    with pytest.raises(Exception, match="kl_precision"):
        merge(mixed, [1.1], points=4, kl_precision="fp8")


def test_cli_segment_diffseg_writes_masks_at_original_size(tiny_sd_dir: Path, tmp_path: Path) -> None:
    from difffeat.cli import cli, load_task_commands

    load_task_commands()
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "a.png")
    out = tmp_path / "seg"
    r = CliRunner().invoke(cli, ["segment", str(root), "--diffseg", "-m", str(tiny_sd_dir), "--anchors", "4",
                                 "--resolution", "64", "--device", "cpu", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    mask = Image.open(out / "a.png")
    assert mask.size == (56, 40) and mask.mode == "P"
    labels = np.asarray(mask)
    assert (labels[:, :8] == 255).all() and (labels[:, 48:] == 255).all()  # outside the centre 40x40 crop
    assert (labels[:, 8:48] != 255).all()
    bad = CliRunner().invoke(cli, ["segment", str(root), "--diffseg", "--zero-shot", "3", "-o", str(out)])
    assert bad.exit_code != 0 and "exactly one of" in bad.output
    bad = CliRunner().invoke(cli, ["segment", str(root), "--diffseg", "-m", str(tiny_sd_dir), "-l", "up.1",
                                   "--device", "cpu", "-o", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "attn.self" in bad.output
