"""Dense heads: output shapes for several backbones, losses against hand-computed values,
checkpoints (safetensors + JSON, mismatch errors)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from difffeat.errors import BadInputError, CheckpointMismatchError
from difffeat.heads import (
    HyperfeatureAggregator,
    align_scale_shift,
    build_head,
    class_balanced_bce,
    hed_loss,
    load_head,
    save_head,
    silog_loss,
    ssi_l1_loss,
)

# SD-like UNet (strides 8..64, channels scaled down), DINO-like (one stride 14),
# and a two-timestep layout where one layer appears twice.
SD = [
    {"name": "up.0", "layer": "up.0", "t": 1, "channels": 16, "stride": 64},
    {"name": "up.1", "layer": "up.1", "t": 1, "channels": 16, "stride": 32},
    {"name": "up.2", "layer": "up.2", "t": 1, "channels": 8, "stride": 16},
    {"name": "up.3", "layer": "up.3", "t": 1, "channels": 8, "stride": 8},
]
DINO = [{"name": "blocks.11", "channels": 12, "stride": 14}]
MULTI_T = [
    {"name": "up.1@t10", "layer": "up.1", "t": 10, "channels": 16, "stride": 16},
    {"name": "up.1@t200", "layer": "up.1", "t": 200, "channels": 16, "stride": 16},
    {"name": "up.2@t10", "layer": "up.2", "t": 10, "channels": 8, "stride": 8},
]
IMAGE = {"sd": (64, 64), "dino": (56, 42), "multi": (64, 48)}
INFOS = {"sd": SD, "dino": DINO, "multi": MULTI_T}

SMALL = {
    "fpn": dict(num_classes=5, fpn_channels=16, head_channels=8),
    "depth": dict(embed_channels=16, deconv_channels=8, out_channels=8),
    "hed": dict(hidden=0),
    "probe": dict(num_outputs=3),
}
OUT_CH = {"fpn": 5, "depth": 1, "hed": 1, "probe": 3}


def make_feats(info, image_hw, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw
    return {
        f["name"]: torch.randn(batch, f["channels"], math.ceil(h / f["stride"]), math.ceil(w / f["stride"]), generator=g)
        for f in info
    }


CASES = [(b, k, False) for b in ("sd", "dino", "multi") for k in ("fpn", "depth", "hed", "probe")]
CASES += [("multi", k, True) for k in ("fpn", "depth", "hed", "probe")]  # behind a hyperfeature aggregator


@pytest.mark.parametrize("backbone, kind, aggregate", CASES)
def test_head_output_shapes(backbone, kind, aggregate):
    info, hw = INFOS[backbone], IMAGE[backbone]
    head = build_head(kind, info, aggregator={"width": 16} if aggregate else None, **SMALL[kind]).eval()
    feats = make_feats(info, hw)
    with torch.no_grad():
        full = head(feats, out_size=hw)
        native = head(feats)
    assert full.shape == (2, OUT_CH[kind], *hw)
    assert torch.isfinite(full).all()
    assert native.shape[:2] == (2, OUT_CH[kind])
    if kind in ("fpn", "hed", "probe"):
        # native resolution is the finest feature grid
        finest = min(info, key=lambda f: f["stride"])["name"]
        assert native.shape[-2:] == feats[finest].shape[-2:]


def test_heads_are_trainable_end_to_end_with_gradients_on_every_parameter():
    feats = make_feats(SD, (64, 64))
    for kind in ("fpn", "depth", "hed", "probe"):
        head = build_head(kind, SD, **SMALL[kind])
        head(feats, out_size=(64, 64)).float().square().mean().backward()
        missing = [n for n, p in head.named_parameters() if p.grad is None]
        assert not missing, (kind, missing)


def test_metric_depth_is_bounded_by_max_depth_and_relative_is_not():
    feats = make_feats(SD, (64, 64))
    metric = build_head("depth", SD, max_depth=10.0, **SMALL["depth"])
    with torch.no_grad():
        d = metric(feats)
    assert d.min() > 0 and d.max() < 10.0
    rel = build_head("depth", SD, mode="relative", **SMALL["depth"])
    with torch.no_grad():
        for h in (metric, rel):
            h.predict[-1].bias.fill_(-50.0)
        assert rel(feats).max() < -40  # unconstrained
        assert metric(feats).min() >= 0
    assert rel.fuse_stride == 32 and build_head("depth", DINO, **SMALL["depth"]).fuse_stride == 14


def test_hed_fusion_starts_as_mean_of_side_outputs():
    feats = make_feats(SD, (64, 64))
    head = build_head("hed", SD)
    with torch.no_grad():
        fused, sides = head(feats, out_size=(64, 64), return_sides=True)
    assert len(sides) == 4 and all(s.shape == (2, 1, 64, 64) for s in sides)
    assert torch.allclose(fused, torch.stack(sides).mean(0), atol=1e-6)


def test_aggregator_softmax_mixing_and_timestep_sharing():
    agg = HyperfeatureAggregator(MULTI_T, width=16)
    w = agg.mixing_weights()
    assert list(w) == [f["name"] for f in MULTI_T]
    assert all(abs(v - 1 / 3) < 1e-6 for v in w.values())  # uniform at init
    assert len(agg.proj) == 2  # up.1 shared over its two timesteps
    assert len(HyperfeatureAggregator(MULTI_T, width=16, share_timesteps=False).proj) == 3
    feats = make_feats(MULTI_T, (64, 48))
    out = agg(feats)
    assert out.shape == (2, 16, 8, 6)  # finest stride 8
    # the output is the softmax-weighted sum of the projected maps
    with torch.no_grad():
        agg.mixing_logits.copy_(torch.tensor([0.0, -1e4, -1e4]))
        only_first = agg(feats)
        proj = agg.proj["up_1"](feats["up.1@t10"])
        expect = torch.nn.functional.interpolate(proj, size=(8, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(only_first, expect, atol=1e-6)
    out.sum().backward()
    assert agg.mixing_logits.grad is not None


def test_missing_feature_is_a_clear_error():
    head = build_head("probe", SD, num_outputs=2)
    feats = make_feats(SD, (64, 64))
    del feats["up.2"]
    with pytest.raises(BadInputError, match=r"missing \['up.2'\]"):
        head(feats)


# ----------------------------------------------------------------------------- losses
def test_silog_matches_hand_computed_values():
    pred = torch.tensor([2.0, 1.0, 5.0])
    gt = torch.tensor([1.0, 1.0, 0.0])  # last pixel invalid
    ln2 = math.log(2)
    # d = [ln2, 0]; mean d^2 = ln2^2/2; mean d = ln2/2
    assert silog_loss(pred, gt).item() == pytest.approx(math.sqrt(ln2**2 / 2 - 0.5 * ln2**2 / 4), rel=1e-5)
    bts = silog_loss(pred, gt, lambd=0.85, scale=10.0).item()
    assert bts == pytest.approx(10 * math.sqrt(ln2**2 / 2 - 0.85 * ln2**2 / 4), rel=1e-5)
    # lambd = 1 makes it fully scale invariant
    assert silog_loss(gt[:2] * 3.7, gt[:2] + 0.0, lambd=1.0).item() == pytest.approx(0.0, abs=1e-4)


def test_ssi_l1_matches_hand_computed_values():
    pred = torch.tensor([[1.0, 2.0, 6.0]])
    gt = torch.tensor([[1.0, 2.0, 3.0]])
    # median/MAD: pred -> [-0.6, 0, 2.4], gt -> [-1.5, 0, 1.5]; residuals [0.9, 0, 0.9]
    assert ssi_l1_loss(pred, gt).item() == pytest.approx(1.8 / 6, rel=1e-5)
    assert ssi_l1_loss(pred, gt, trim=1 / 3).item() == pytest.approx(0.9 / 6, rel=1e-5)
    # invariant to positive scale and any shift of the prediction
    g = torch.rand(2, 1, 5, 5) + 0.5
    assert ssi_l1_loss(4.0 * g - 1.0, g).item() == pytest.approx(0.0, abs=1e-5)


def test_align_scale_shift_recovers_affine_and_ignores_invalid():
    pred = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    gt = torch.tensor([[3.0, 5.0, 7.0, 0.0]])  # gt = 2*pred + 1 on valid pixels
    out = align_scale_shift(pred, gt)
    assert torch.allclose(out[0, :3], gt[0, :3], atol=1e-5)
    assert out[0, 3].item() == pytest.approx(21.0)


def test_class_balanced_bce_matches_hed_weighting():
    ln2 = math.log(2)
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # beta = 3/4: positive pixel 0.75*ln2, three negatives 0.25*ln2 each, mean over 4
    assert class_balanced_bce(logits, target).item() == pytest.approx((0.75 + 3 * 0.25) * ln2 / 4, rel=1e-6)
    soft = torch.full((1, 1, 1, 2), 0.5)
    assert class_balanced_bce(torch.zeros(1, 1, 1, 2), soft).item() == pytest.approx(0.5 * ln2, rel=1e-6)
    sides = [torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)]
    assert hed_loss(logits, sides, target).item() == pytest.approx(3 * 1.5 * ln2 / 4, rel=1e-6)


# ----------------------------------------------------------------------------- checkpoints
BACKBONE = {"preset": "sd21", "layers": ["up.0", "up.1", "up.2", "up.3"], "timesteps": [1]}


def test_checkpoint_roundtrip_is_exact_and_pickle_free(tmp_path):
    head = build_head("fpn", SD, aggregator={"width": 16, "projection": "linear"}, **SMALL["fpn"]).eval()
    folder = save_head(head, tmp_path / "ckpt", backbone=BACKBONE, task="seg", image_size=64,
                       classes=[f"c{i}" for i in range(5)])
    cfg = json.loads((folder / "head.json").read_text())
    assert cfg["head"]["kind"] == "fpn" and cfg["head"]["args"]["num_classes"] == 5
    assert cfg["backbone"] == BACKBONE and cfg["classes"][0] == "c0" and cfg["image_size"] == 64
    from safetensors.torch import load_file

    assert set(load_file(str(folder / "head.safetensors"))) == set(head.state_dict())
    loaded = load_head(folder, expect_backbone=BACKBONE)
    feats = make_feats(SD, (64, 64))
    with torch.no_grad():
        assert torch.equal(loaded.head(feats), head(feats))
    # the config is also inside the safetensors metadata: the JSON may be lost
    (folder / "head.json").unlink()
    assert load_head(folder / "head.safetensors").classes == cfg["classes"]


@pytest.mark.parametrize(
    "expect, needle",
    [
        ({"preset": "sd15"}, "preset 'sd21'"),
        ({"layers": ["up.1"]}, "layers"),
        ({"timesteps": [261]}, "timesteps [1]"),
        ({"feature_info": DINO}, "features"),
    ],
)
def test_checkpoint_mismatch_is_one_clear_line(tmp_path, expect, needle):
    save_head(build_head("probe", SD, num_outputs=2), tmp_path, backbone=BACKBONE, task="seg")
    with pytest.raises(CheckpointMismatchError) as e:
        load_head(tmp_path, expect_backbone=expect)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_missing_checkpoint_and_bad_head_args_are_clear(tmp_path):
    with pytest.raises(BadInputError, match="no head checkpoint"):
        load_head(tmp_path / "nope")
    with pytest.raises(BadInputError, match="bad arguments for head 'fpn'"):
        build_head("fpn", SD, num_classes=3, bogus=1)
    with pytest.raises(KeyError, match="unknown head"):
        build_head("unet", SD)


def test_attention_maps_are_rejected_with_a_clear_error():
    info = SD[:1] + [{"name": "attn.cross.up.1", "channels": 77, "stride": 16, "kind": "attn.cross"}]
    with pytest.raises(BadInputError, match="attention map"):
        build_head("fpn", info, num_classes=2)


def test_kmeans_segment_recovers_planted_regions_with_stable_ids():
    from difffeat.heads import kmeans_segment

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    fmap = torch.empty(1, 8, 6, 6)
    fmap[0, :, :, :2] = a[:, None, None]  # left third: feature a, the rest: feature b
    fmap[0, :, :, 2:] = b[:, None, None]
    fmap += 0.05 * torch.randn(fmap.shape, generator=g)
    seg = kmeans_segment({"f": fmap}, [{"name": "f", "channels": 8, "stride": 8}], k=2, out_size=(48, 48))
    assert seg.shape == (1, 48, 48) and seg[0, 0, 0] == 0  # ids by first appearance
    assert (seg[0, :, :12] == 0).all() and (seg[0, :, 20:] == 1).all()
