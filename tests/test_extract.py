"""The extraction core: loading, hooks, early exit, noise, ensembles, conditioning."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import difffeat
from difffeat.errors import BadInputError, UnknownNameError, WeightsNotFoundError
from difffeat.noise import draw


def _manual_up(unet, x, t, ehs, upto: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Re-implement the UNet forward by hand up to the output of up block ``upto``."""
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    h = unet.conv_in(x)
    res: tuple = (h,)
    for b in unet.down_blocks:
        if getattr(b, "has_cross_attention", False):
            h, r = b(h, emb, encoder_hidden_states=ehs)
        else:
            h, r = b(h, emb)
        res += r
    h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    for i, b in enumerate(unet.up_blocks):
        r, res = res[-len(b.resnets):], res[: -len(b.resnets)]
        if getattr(b, "has_cross_attention", False):
            h = b(hidden_states=h, temb=emb, res_hidden_states_tuple=r, encoder_hidden_states=ehs)
        else:
            h = b(hidden_states=h, temb=emb, res_hidden_states_tuple=r)
        if i == upto:
            return h
    raise AssertionError


def test_hook_features_equal_manual_forward(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler

    ex = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1"], timesteps=[261], ensemble=1, seed=3)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = ex(x, keys=["a", "b"])["up.1"]
    # the reference path: VAE posterior mean, diffusers' own add_noise, a hand-written UNet forward
    bb = tiny_sd
    mean = bb.vae.encode(x * 2 - 1).latent_dist.mean * bb.vae.config.scaling_factor
    _, noise = draw("random", ["a", "b"], 3, tuple(mean.shape[1:]), 1, 1, False)
    sched = DDIMScheduler.from_config(bb.scheduler.config)
    t = torch.tensor([261, 261])
    x_t = sched.add_noise(mean, noise[:, 0, 0], t)
    ehs = bb.conditioning(prompts="", batch=2).kwargs["encoder_hidden_states"]
    with torch.no_grad():
        ref = _manual_up(bb.denoiser, x_t, t, ehs, upto=1)
    assert feats.shape == (2, 32, 4, 4)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)


def test_early_exit_is_exact_and_skips_the_rest(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    kw = dict(backbone=tiny_sd, layers=["down.1", "up.1"], timesteps=[10, 500], ensemble=2)
    fast = difffeat.create(tiny_sd.source, early_exit=True, **kw)(x)
    full = difffeat.create(tiny_sd.source, early_exit=False, **kw)(x)
    assert set(fast) == {"down.1@t10", "down.1@t500", "up.1@t10", "up.1@t500"}
    for k in fast:
        assert torch.equal(fast[k], full[k])
    calls = []
    h = tiny_sd.denoiser.up_blocks[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        difffeat.create(tiny_sd.source, early_exit=True, **kw)(x)
        assert calls == []  # nothing after up.1 ran
        difffeat.create(tiny_sd.source, early_exit=False, **kw)(x)
        assert calls  # the full forward does run it
    finally:
        h.remove()


def test_same_seed_same_features_alone_or_in_a_batch(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(2)
    imgs = torch.rand(3, 3, 64, 64, generator=g)
    ex = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1"], ensemble=3, seed=7)
    batch = ex(imgs)["up.1"]
    alone = ex(imgs[1:2])["up.1"]
    reordered = ex(imgs.flip(0))["up.1"]
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reordered.flip(0), batch, rtol=1e-4, atol=1e-5)
    # small max_batch splits rows across calls: same numbers
    ex.max_batch = 2
    torch.testing.assert_close(ex(imgs)["up.1"], batch, rtol=1e-4, atol=1e-5)
    other_seed = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1"], ensemble=3, seed=8)(imgs)["up.1"]
    assert not torch.allclose(other_seed, batch)


def test_ensemble_mean_converges(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))

    def spread(ensemble: int) -> float:
        outs = [difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1"], timesteps=[700], ensemble=ensemble, seed=s)(x)["up.1"]
                for s in range(6)]
        return torch.stack(outs).std(0).mean().item()

    s1, s8 = spread(1), spread(8)
    assert s8 < 0.6 * s1  # 1/sqrt(8) ~ 0.35 in expectation


def test_vae_runs_once_and_latent_modes(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    calls = []
    h = tiny_sd.vae.encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    try:
        mean_f = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1"], ensemble=4, latent="mean")(x)["up.1"]
    finally:
        h.remove()
    assert calls == [2]  # one encoder pass for 2 images x 4 members
    samp_f = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1"], ensemble=4, latent="sample")(x)["up.1"]
    assert samp_f.shape == mean_f.shape and not torch.allclose(samp_f, mean_f)


def test_noise_modes() -> None:
    le, nz = draw("random", ["a", "b"], 0, (4, 2, 2), 3, 2, True)
    assert le.shape == (2, 3, 4, 2, 2) and nz.shape == (2, 2, 3, 4, 2, 2)
    assert not torch.equal(nz[0], nz[1])
    _, again = draw("random", ["b"], 0, (4, 2, 2), 3, 2, True)
    assert torch.equal(again[0], nz[1])  # depends on the key, not the position
    _, fixed = draw("fixed", ["a", "b"], 0, (4, 2, 2), 3, 2, False)
    assert torch.equal(fixed[0], fixed[1])
    assert draw("clean", ["a"], 0, (4, 2, 2), 1, 1, False)[1] is None
    with pytest.raises(BadInputError):
        draw("gaussian", ["a"], 0, (1,), 1, 1, False)


def test_clean_mode_ignores_seed(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    a = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["mid"], noise="clean", seed=1)(x)["mid"]
    b = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["mid"], noise="clean", seed=2)(x)["mid"]
    assert torch.equal(a, b)


def test_noising_follows_the_scheduler(tiny_sd_v_dir: Path) -> None:
    from diffusers import DDPMScheduler

    bb = difffeat.load_backbone(str(tiny_sd_v_dir), dtype="fp32", device="cpu")
    assert bb.prediction_type == "v_prediction"
    ref = DDPMScheduler.from_config(bb.scheduler.config)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 261, 999])
    torch.testing.assert_close(bb.add_noise(x0, eps, t), ref.add_noise(x0, eps, t))
    torch.testing.assert_close(bb.target(x0, eps, t), ref.get_velocity(x0, eps, t))


def test_prompt_embeddings_cached_and_per_image(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    enc = tiny_sd.text_encoders()[0]
    calls = []
    h = enc.register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny_sd._prompt_cache.clear()
        c1 = tiny_sd.conditioning(prompts=["a cat", "a dog", "a cat"], batch=3)
        tiny_sd.conditioning(prompts="a cat", batch=5)
    finally:
        h.remove()
    assert len(calls) == 2  # "a cat" and "a dog", each once
    e = c1.kwargs["encoder_hidden_states"]
    assert torch.equal(e[0], e[2]) and not torch.equal(e[0], e[1])
    ex = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1"])
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    per = ex(x, prompts=["a cat", "a dog"], keys=["k1", "k2"])["up.1"]
    single = ex(x[:1], prompts="a cat", keys=["k1"])["up.1"]
    torch.testing.assert_close(per[:1], single, rtol=1e-4, atol=1e-5)
    embeds = tiny_sd.conditioning(prompts="a dog", batch=1).kwargs["encoder_hidden_states"]
    via_embeds = ex(x[1:], prompt_embeds=embeds, keys=["k2"])["up.1"]
    torch.testing.assert_close(via_embeds, per[1:], rtol=1e-4, atol=1e-5)


def test_sdxl_and_pixel_families(tiny_sdxl_dir: Path, tiny_pixel_dir: Path, tiny_pixel_cls_dir: Path) -> None:
    ex = difffeat.create(str(tiny_sdxl_dir), layers=["up.0", "mid"], device="cpu", dtype="fp32")
    assert ex.backbone.family == "sdxl"
    cond = ex.backbone.conditioning(prompts="x", batch=2, image_size=(64, 128))
    assert cond.kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[64, 128, 0, 0, 64, 128]] * 2
    assert cond.kwargs["encoder_hidden_states"].shape[-1] == 64  # both encoders concatenated
    f = ex(torch.rand(1, 3, 64, 128))
    assert f["up.0"].shape == (1, 32, 4, 8)
    px = difffeat.create(str(tiny_pixel_dir), layers=["up.1"], device="cpu", dtype="fp32")
    assert px.backbone.family == "pixel" and px.backbone.vae is None
    assert px(torch.rand(2, 3, 16, 16))["up.1"].shape == (2, 16, 16, 16)
    cls = difffeat.create(str(tiny_pixel_cls_dir), layers=["mid"], device="cpu", dtype="fp32", noise="clean")
    x = torch.rand(1, 3, 16, 16)
    a, b = cls(x, class_labels=[0])["mid"], cls(x, class_labels=[3])["mid"]
    assert not torch.allclose(a, b)
    with pytest.raises(BadInputError, match="class label out of range"):
        cls(x, class_labels=[9])


def test_feature_info_matches_outputs(tiny_sd) -> None:  # type: ignore[no-untyped-def]
    ex = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["down.0", "mid", "up.1.res.0", "up.2.attn.0", "up.3"])
    f = ex(torch.rand(1, 3, 128, 64))
    for info in ex.feature_info:
        t = f[info["name"]]
        assert t.shape[1] == info["channels"]
        assert t.shape[-1] == 64 // info["stride"] and t.shape[-2] == 128 // info["stride"]


def test_errors_are_one_clear_line(tiny_sd, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownNameError, match="unknown layer 'up.9'.*up.1"):
        difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.9"])
    with pytest.raises(BadInputError, match=r"t must be in \[0, 1000\)"):
        difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1"], timesteps=[1000])
    with pytest.raises(UnknownNameError, match="unknown model 'sd99'.*sd21"):
        difffeat.create("sd99")
    with pytest.raises(BadInputError, match="not a multiple of 64"):
        difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.1"])(torch.rand(1, 3, 60, 64))
    with pytest.raises(WeightsNotFoundError, match="not available.*HF_HUB_OFFLINE"):
        difffeat.load_backbone("nobody-here/no-such-model", device="cpu")
    # a skeleton folder (configs, no weights) tells the user what is missing
    skel = tmp_path / "skel"
    (skel / "unet").mkdir(parents=True)
    (skel / "unet" / "config.json").write_text((Path(tiny_sd.source) / "unet" / "config.json").read_text())
    (skel / "scheduler").mkdir()
    (skel / "scheduler" / "scheduler_config.json").write_text((Path(tiny_sd.source) / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(WeightsNotFoundError, match="weights missing in local folder") as e:
        difffeat.load_backbone(str(skel), device="cpu")
    assert "\n" not in str(e.value)
    bb = difffeat.load_backbone(str(skel), device="cpu", random_weights=True)  # benchmarks build from configs
    assert bb.family == "sd"


def test_shared_skeleton_tokenizer_when_available() -> None:
    root = Path(__file__).resolve().parents[2] / "shared" / "model-skeletons" / "sd21" / "tokenizer"
    if not root.exists():
        pytest.skip("../shared/model-skeletons not present (optional)")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(root))
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
