"""Attention maps (attn.cross.LAYER / attn.self.LAYER) through the one extraction path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import difffeat
import tiny_models
from difffeat.backbone import _speed_up
from difffeat.attention import AttentionCapture, CapturingProcessor, attention_modules
from difffeat.errors import BadInputError, UnknownNameError
from difffeat.extractor import FeatureExtractor
from difffeat.layers import layer_modules
from difffeat.noise import draw


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = tiny_models.build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3-attn"))
    return difffeat.load_backbone(str(path), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def pixart(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = tiny_models.build_tiny_pixart(tmp_path_factory.mktemp("tiny-pixart-attn"))
    return difffeat.load_backbone(str(path), dtype="fp32", device="cpu")


def _img(n: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _all_attention_names(bb) -> list[str]:  # type: ignore[no-untyped-def]
    mods = layer_modules(bb.denoiser)
    return [f"attn.{kind}.{n}" for kind in ("self", "cross") for n in mods
            if n.count(".") <= 1 and attention_modules(mods[n], kind)]


def test_shapes_rows_sum_to_one_and_strides(tiny_sd, pixart, sd3) -> None:  # type: ignore[no-untyped-def]
    cases = [  # backbone, layers, n_tokens
        (tiny_sd, ["attn.cross.up.1", "attn.self.up.1", "attn.self.down.0", "up.1"], 77),
        (pixart, ["attn.cross.block.1", "attn.self.block.0"], 300),
        (sd3, ["attn.cross.block.0", "attn.self.block.0", "attn.cross.block.1"], 77 + 256),
    ]
    H, W = 64, 128
    for bb, layers, n_tok in cases:
        ex = difffeat.create(bb.source, backbone=bb, layers=layers, timesteps=[100], ensemble=2)
        out = ex(_img(2, H, W), prompts="a cat")
        for info in ex.feature_info:
            a = out[info["name"]]
            hw = (H // info["stride"]) * (W // info["stride"])
            if info["kind"] == "feature":
                assert a.shape == (2, info["channels"], H // info["stride"], W // info["stride"])
                continue
            n_keys = n_tok if info["kind"] == "attn.cross" else hw
            assert a.shape == (2, hw, n_keys), info
            assert info["channels"] == (n_tok if info["kind"] == "attn.cross" else None)
            torch.testing.assert_close(a.sum(-1), torch.ones(2, hw), rtol=0, atol=1e-5)
            assert (a >= 0).all()
    # UNet block attention runs inside the block, before its upsampler: half up.1's output resolution
    sd_ex = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["attn.self.up.1", "up.1"])
    strides = {i["name"]: i["stride"] for i in sd_ex.feature_info}
    assert strides["attn.self.up.1"] == 2 * strides["up.1"]


def test_capturing_leaves_every_familys_output_unchanged(tiny_sdxl_dir: Path, tiny_pixel_dir: Path, tiny_sd,
                                                         pixart, sd3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sdxl = difffeat.load_backbone(str(tiny_sdxl_dir), dtype="fp32", device="cpu")
    pixel = difffeat.load_backbone(str(tiny_pixel_dir), dtype="fp32", device="cpu")
    sd3_medium = difffeat.load_backbone(str(tiny_models.build_tiny_sd3(tmp_path / "sd3m", with_t5=False, sd35=False)),
                                        dtype="fp32", device="cpu")
    for fused in (sdxl, sd3_medium):  # what load_backbone does on CUDA: fused QKV processors
        _speed_up(fused.denoiser)
    assert {type(p).__name__ for p in sd3_medium.denoiser.attn_processors.values()} == {"FusedJointAttnProcessor2_0"}
    for bb in (tiny_sd, sdxl, pixel, pixart, sd3, sd3_medium):
        side = 64 if bb.vae is not None else 16
        x = torch.randn(2, bb.in_channels, side // bb.latent_scale, side // bb.latent_scale,
                        generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 500])
        cond = bb.conditioning(prompts=["a cat", "a dog"], batch=2, image_size=(side, side)) if bb.text_conditioned \
            else bb.conditioning(batch=2)
        ref = bb.predict(x, t, cond)
        names = _all_attention_names(bb)
        cap = AttentionCapture(layer_modules(bb.denoiser), names)
        before = {id(m): type(m.processor).__name__ for m in bb.denoiser.modules() if hasattr(m, "processor")}
        with cap.capture() as sinks:
            out = bb.predict(x, t, cond)
            swapped = {id(m) for m in bb.denoiser.modules() if isinstance(getattr(m, "processor", None), CapturingProcessor)}
        assert swapped == cap.contains() and swapped  # only the captured modules lost SDPA
        after = {id(m): type(m.processor).__name__ for m in bb.denoiser.modules() if hasattr(m, "processor")}
        assert after == before  # originals restored
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert all(s.count > 0 for s in sinks.values())


def test_cross_attention_equals_manual_softmax(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    bb = tiny_sd
    attn = bb.denoiser.up_blocks[1].attentions[0].transformer_blocks[0].attn2
    ex = FeatureExtractor(bb, layers=["attn.cross.up.1.attn.0"], attention_heads="all")
    seen = {}
    h = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], ctx=kw["encoder_hidden_states"]), with_kwargs=True)
    try:
        x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        a = ex.run_denoiser(x_t, torch.tensor([300]), bb.conditioning(prompts="a cat", batch=1))["attn.cross.up.1.attn.0"]
    finally:
        h.remove()
    d = attn.to_q.out_features // attn.heads
    q = attn.to_q(seen["x"]).view(1, -1, attn.heads, d).transpose(1, 2)
    k = attn.to_k(seen["ctx"]).view(1, -1, attn.heads, d).transpose(1, 2)
    manual = (q @ k.transpose(-1, -2) / d**0.5).softmax(-1)
    assert a.shape == (1, attn.heads, 4, 77)  # up.1 attends on the 2x2 grid of an 8x8 latent
    torch.testing.assert_close(a, manual, rtol=1e-5, atol=1e-6)
    per_head = difffeat.create(bb.source, backbone=bb, layers=["attn.cross.up.1.attn.0"], attention_heads="all").run_denoiser(
        x_t, torch.tensor([300]), bb.conditioning(prompts="a cat", batch=1))["attn.cross.up.1.attn.0"]
    torch.testing.assert_close(per_head, manual, rtol=1e-5, atol=1e-6)
    mean = difffeat.create(bb.source, backbone=bb, layers=["attn.cross.up.1.attn.0"]).run_denoiser(
        x_t, torch.tensor([300]), bb.conditioning(prompts="a cat", batch=1))["attn.cross.up.1.attn.0"]
    torch.testing.assert_close(mean, manual.mean(1), rtol=1e-5, atol=1e-6)


def test_block_maps_average_their_modules(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    bb = tiny_sd
    fine = ["attn.self.up.1.attn.0", "attn.self.up.1.attn.1"]
    ex = difffeat.create(bb.source, backbone=bb, layers=["attn.self.up.1", *fine], noise="clean")
    out = ex(_img(1, seed=1))
    torch.testing.assert_close(out["attn.self.up.1"], (out[fine[0]] + out[fine[1]]) / 2)


def test_pixart_cross_attention_ignores_masked_tokens(pixart) -> None:  # type: ignore[no-untyped-def]
    ex = difffeat.create(pixart.source, backbone=pixart, layers=["attn.cross.block.0"], timesteps=[200])
    a = ex(_img(1), prompts="a cat")["attn.cross.block.0"]
    mask = pixart.conditioning(prompts="a cat", batch=1).kwargs["encoder_attention_mask"][0].bool()
    assert 1 < int(mask.sum()) < 300
    assert a[..., ~mask].sum(-1).max() < 1e-3  # padding tokens get (almost) no attention


def test_ensemble_average_and_early_exit(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    bb = tiny_sd
    kw = dict(backbone=bb, layers=["down.2", "attn.cross.up.1"], timesteps=[261], ensemble=2, seed=4)
    x = _img(1, seed=3)
    fast = difffeat.create(bb.source, early_exit=True, **kw)
    full = difffeat.create(bb.source, early_exit=False, **kw)
    out = fast(x, keys=["img"])
    for k, v in full(x, keys=["img"]).items():
        assert torch.equal(out[k], v)
    calls: list[int] = []
    h = bb.denoiser.up_blocks[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        fast(x, keys=["img"])
    finally:
        h.remove()
    assert calls == []  # nothing after up.1 ran
    # the ensemble mean over the two noise draws, computed member by member
    mean = bb.encode(x)[0]
    _, noise = draw("random", ["img"], 4, tuple(mean.shape[1:]), 2, 1, False)
    cond = bb.conditioning(prompts="", batch=1)
    members = [fast.run_denoiser(bb.add_noise(mean, noise[:, 0, e], torch.tensor([261])), torch.tensor([261]), cond)
               for e in range(2)]
    torch.testing.assert_close(out["attn.cross.up.1"], (members[0]["attn.cross.up.1"] + members[1]["attn.cross.up.1"]) / 2)


def test_attention_name_errors_are_one_line(tiny_sd, pixart) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadInputError, match="no cross-attention") as e1:
        difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["attn.cross.down.3"])
    with pytest.raises(BadInputError, match="attn.cross.LAYER") as e2:
        difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["attn.foo.up.1"])
    with pytest.raises(UnknownNameError, match="up.9") as e3:
        difffeat.create(pixart.source, backbone=pixart, layers=["attn.self.up.9"])
    with pytest.raises(BadInputError, match="head mode"):
        FeatureExtractor(tiny_sd, layers=["attn.self.up.1"], attention_heads="max")
    for e in (e1, e2, e3):
        assert "\n" not in str(e.value)
