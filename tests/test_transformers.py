"""Transformer denoisers (DiT, PixArt, SD3) and SDXL through the one extraction path.

Every model is a tiny random config saved in diffusers layout and loaded with the
public loader; references are diffusers' own pipelines and schedulers.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import difffeat
import tiny_models
from difffeat.errors import BadInputError, DiffFeatError
from difffeat.noise import draw


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_dit(tmp_path_factory.mktemp("tiny-dit"))


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_pixart(tmp_path_factory.mktemp("tiny-pixart"))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def _load(path: Path, **kw):  # type: ignore[no-untyped-def]
    return difffeat.load_backbone(str(path), dtype="fp32", device="cpu", **kw)


def _img(n: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_families_load_and_give_documented_shapes(dit_dir: Path, pixart_dir: Path, sd3_dir: Path) -> None:
    expect = {  # family, denoiser class, prediction type, block channels (inner dim)
        dit_dir: ("dit", "DiTTransformer2DModel", "epsilon", 16),
        pixart_dir: ("pixart", "PixArtTransformer2DModel", "epsilon", 24),
        sd3_dir: ("sd3", "SD3Transformer2DModel", "flow", 16),
    }
    for path, (family, cls, pred, inner) in expect.items():
        ex = difffeat.create(str(path), layers=["embed", "block.0", "block.1", "final"], timesteps=[100],
                             device="cpu", dtype="fp32")
        bb = ex.backbone
        assert (bb.family, type(bb.denoiser).__name__, bb.prediction_type) == (family, cls, pred)
        h, w = (64, 64) if family == "dit" else (64, 128)  # DiT unpatchifies a square grid only
        f = ex(_img(2, h, w), prompts="a red cube" if bb.text_conditioned else None)
        for info in ex.feature_info:
            t = f[info["name"]]
            assert t.shape == (2, info["channels"], h // info["stride"], w // info["stride"])
        assert f["block.1"].shape[1] == inner and f["block.1"].shape[-1] == w // 16  # VAE x8, patch 2
        latent_c = bb.in_channels * (2 if family in ("dit", "pixart") else 1)  # learned sigma keeps both halves
        assert f["final"].shape == (2, latent_c, h // 8, w // 8)
    with pytest.raises(BadInputError, match="square"):
        difffeat.create(str(dit_dir), layers=["block.0"], device="cpu", dtype="fp32")(_img(1, 64, 128))


def test_token_maps_and_final_match_manual_reshape(dit_dir: Path, sd3_dir: Path) -> None:
    for path in (dit_dir, sd3_dir):
        bb = _load(path)
        ex = difffeat.create(str(path), backbone=bb, layers=["block.1", "final"], early_exit=False)
        d = bb.denoiser
        x_t = torch.randn(2, bb.in_channels, 8, 12 if bb.family == "sd3" else 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([50, 700])
        cond = bb.dummy_conditioning(2, (64, 64)) if bb.family == "sd3" else bb.conditioning(class_labels=[0, 3], batch=2)
        raw = {}
        hook = d.transformer_blocks[1].register_forward_hook(lambda m, a, o: raw.update(tokens=o))
        try:
            maps = ex.run_denoiser(x_t, t, cond)
            with torch.no_grad():
                full = d(x_t, timestep=t, **cond.kwargs, return_dict=False)[0]
        finally:
            hook.remove()
        tokens = raw["tokens"][1] if bb.family == "sd3" else raw["tokens"]  # SD3 blocks return (text, image)
        h, w = x_t.shape[-2] // 2, x_t.shape[-1] // 2
        assert tokens.shape[1] == h * w
        manual = torch.empty(2, tokens.shape[-1], h, w)
        for i in range(h):
            for j in range(w):
                manual[:, :, i, j] = tokens[:, i * w + j, :]  # row-major patch grid
        torch.testing.assert_close(maps["block.1"], manual, rtol=0, atol=0)
        # `final` unpatchified like diffusers' own output: identical to the denoiser output
        torch.testing.assert_close(maps["final"], full, rtol=1e-6, atol=1e-6)


def _fed_inputs(ex, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Run the extractor; return the (x_t, timestep) the denoiser was called with."""
    seen = {}

    def pre(module, args, kwargs):  # type: ignore[no-untyped-def]
        seen["x"], seen["t"] = args[0].clone(), kwargs["timestep"].clone()

    h = ex.backbone.denoiser.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        ex(x, keys=["a", "b"])
    finally:
        h.remove()
    return seen["x"], seen["t"]


def test_each_family_is_fed_its_schedulers_noisy_input(tiny_sd_dir: Path, tiny_sd_v_dir: Path, sd3_dir: Path) -> None:
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    x = _img(2, seed=3)
    for path in (tiny_sd_dir, tiny_sd_v_dir, sd3_dir):
        bb = _load(path)
        ex = difffeat.create(str(path), backbone=bb, layers=["block.0" if bb.family == "sd3" else "down.0"],
                             timesteps=[261], seed=5)
        x_t, t_fed = _fed_inputs(ex, x)
        mean = bb.encode(x)[0]
        _, noise = draw("random", ["a", "b"], 5, tuple(mean.shape[1:]), 1, 1, False)
        eps, t = noise[:, 0, 0], torch.tensor([261, 261])
        if bb.prediction_type == "flow":
            # sigma = t/1000 and the model is fed t: diffusers' scale_noise at timestep t (shift 1 keeps t = 1000 sigma)
            ref = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler.config, shift=1.0)
            ref.set_timesteps(sigmas=[0.261], timesteps=[261.0])
            expected = ref.scale_noise(mean, t.float(), eps)
            # ... and on the model's own shifted schedule, add_noise agrees with scale_noise at every timestep
            own = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler.config)
            own.set_timesteps(8)
            ts = own.timesteps[:4]
            z0, z1 = torch.randn(4, 16, 2, 2), torch.randn(4, 16, 2, 2)
            torch.testing.assert_close(bb.add_noise(z0, z1, ts), own.scale_noise(z0, ts, z1))
            torch.testing.assert_close(bb.target(z0, z1, ts), z1 - z0)
        else:  # eps and v share q(x_t | x_0); they differ in the target
            expected = DDIMScheduler.from_config(bb.scheduler.config).add_noise(mean, eps, t)
        torch.testing.assert_close(x_t, expected, rtol=1e-5, atol=1e-5)
        assert t_fed.tolist() == [261, 261]


def test_sdxl_conditioning_matches_the_diffusers_pipeline(tiny_sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    bb = _load(tiny_sdxl_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt("a photo of a cat", device="cpu", do_classifier_free_guidance=False)
    cond = bb.conditioning(prompts="a photo of a cat", batch=2, image_size=(64, 96)).kwargs
    torch.testing.assert_close(cond["encoder_hidden_states"], pe.expand(2, -1, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled.expand(2, -1), rtol=1e-5, atol=1e-6)
    ids = pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), dtype=pe.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], ids.expand(2, -1))


def test_sd3_conditioning_matches_the_pipeline_with_and_without_t5(sd3_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    for use_t5 in (True, False):
        bb = _load(sd3_dir, use_t5=use_t5)
        extra = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), **extra)
        with torch.no_grad():
            pe, _, pooled, _ = pipe.encode_prompt("a cat", "a cat", "a cat", device="cpu", do_classifier_free_guidance=False)
        cond = bb.conditioning(prompts="a cat", batch=1).kwargs
        assert cond["encoder_hidden_states"].shape == (1, 77 + 256, 48) == pe.shape
        torch.testing.assert_close(cond["encoder_hidden_states"], pe, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=1e-4, atol=1e-5)
        assert len(bb.text_encoders()) == (3 if use_t5 else 2)
        if not use_t5:
            assert not cond["encoder_hidden_states"][:, 77:].any()  # T5 part is zeros
    with pytest.raises(BadInputError, match="pooled_prompt_embeds"):
        bb.conditioning(prompt_embeds=torch.zeros(1, 333, 48), batch=1)


def test_pixart_t5_mask_precomputed_embeddings_and_disk_cache(pixart_dir: Path, tmp_path: Path) -> None:
    from diffusers import PixArtSigmaPipeline

    cache = tmp_path / "prompts"
    bb = _load(pixart_dir, prompt_cache=str(cache))
    pipe = PixArtSigmaPipeline.from_pretrained(str(pixart_dir))
    with torch.no_grad():
        pe, mask, _, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False, device="cpu", clean_caption=False)
    cond = bb.conditioning(prompts="a cat", batch=2, image_size=(64, 128)).kwargs
    assert pe.shape == (1, 300, 24)  # PixArt-Σ: 300 T5 tokens
    torch.testing.assert_close(cond["encoder_hidden_states"][:1], pe, rtol=1e-5, atol=1e-6)
    assert torch.equal(cond["encoder_attention_mask"][:1], mask) and int(mask.sum()) < 300
    # PixArt-α-style size conditioning from the image size
    assert cond["added_cond_kwargs"]["resolution"].tolist() == [[64.0, 128.0]] * 2
    assert cond["added_cond_kwargs"]["aspect_ratio"].tolist() == [[0.5]] * 2
    assert len(list(cache.glob("*.safetensors"))) == 1
    # a backbone without T5 reads the cached prompt, and refuses prompts it cannot embed
    no_t5 = _load(pixart_dir, use_t5=False, prompt_cache=str(cache))
    ex = difffeat.create(str(pixart_dir), backbone=no_t5, layers=["block.1"], timesteps=[200], noise="clean")
    x = _img(1)
    from_cache = ex(x, prompts="a cat")["block.1"]
    assert no_t5.text_encoders() == []
    with pytest.raises(DiffFeatError, match="without its T5") as err:
        ex(x, prompts="a dog")
    assert "\n" not in str(err.value)
    # precomputed embeddings + mask give the same features as the prompt
    via = ex(x, prompt_embeds=pe, prompt_attention_mask=mask)["block.1"]
    torch.testing.assert_close(via, from_cache, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ex(x, prompt_embeds=pe)["block.1"], via)  # the mask matters
    # the same options through difffeat.create alone (no hand-built backbone)
    ex2 = difffeat.create(str(pixart_dir), use_t5=False, prompt_cache=str(cache), layers=["block.1"], timesteps=[200],
                          noise="clean", dtype="fp32", device="cpu")
    assert ex2.backbone.text_encoders() == []
    torch.testing.assert_close(ex2(x, prompts="a cat")["block.1"], from_cache, rtol=1e-5, atol=1e-5)


def test_dit_class_labels_and_null_class(dit_dir: Path) -> None:
    bb = _load(dit_dir)
    assert bb.num_classes == 4
    assert bb.conditioning(batch=2).kwargs["class_labels"].tolist() == [4, 4]  # null class = num_classes
    ex = difffeat.create(str(dit_dir), backbone=bb, layers=["block.2"], noise="clean")
    x = _img(1)
    a, b, null = (ex(x, class_labels=[c])["block.2"] for c in (0, 3, 4))
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    torch.testing.assert_close(ex(x)["block.2"], null)
    with pytest.raises(BadInputError, match="class label out of range"):
        ex(x, class_labels=[5])


def test_early_exit_exact_for_transformers(dit_dir: Path, sd3_dir: Path) -> None:
    for path in (dit_dir, sd3_dir):
        bb = _load(path)
        kw = dict(backbone=bb, layers=["block.0", "attn.self.block.0"], timesteps=[10, 600], ensemble=2)
        x = _img(1, seed=4)
        fast = difffeat.create(str(path), early_exit=True, **kw)(x)
        full = difffeat.create(str(path), early_exit=False, **kw)(x)
        assert set(fast) == set(full) and len(fast) == 4
        for k in fast:
            assert torch.equal(fast[k], full[k])
        calls: list[int] = []
        h = bb.denoiser.transformer_blocks[1].register_forward_hook(lambda *a: calls.append(1))
        try:
            difffeat.create(str(path), early_exit=True, **kw)(x)
        finally:
            h.remove()
        assert calls == []


def test_transformer_presets_are_registered_with_sources() -> None:
    from difffeat.registry import MODELS

    hub = {"dit-xl-2-256": "facebook/DiT-XL-2-256", "dit-xl-2-512": "facebook/DiT-XL-2-512",
           "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
           "sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
           "pixart-sigma": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}
    for name, hub_id in hub.items():
        p = MODELS[name]
        assert p.hub_id == hub_id and p.layers[0].startswith("block.") and p.source
    assert "CleanDIFT" in MODELS["pixart-sigma"].source and "DDAE++" in MODELS["dit-xl-2-256"].source
    assert "unvalidated" in MODELS["sd3-medium"].source and "unvalidated" in MODELS["sdxl-base"].source


def test_gpu_speedups_keep_outputs(sd3_dir: Path, tmp_path: Path) -> None:
    """load_backbone fuses QKV on CUDA; diffusers' fused joint processor would drop SD3.5's QK-norm."""
    from difffeat.backbone import _speed_up

    sd3m_dir = tiny_models.build_tiny_sd3(tmp_path / "sd3m", with_t5=False, sd35=False)
    for path in (sd3_dir, sd3m_dir):
        bb = _load(path)
        x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        cond, t = bb.dummy_conditioning(1, (64, 64)), torch.tensor([300])
        ref = bb.predict(x, t, cond)
        _speed_up(bb.denoiser)
        torch.testing.assert_close(bb.predict(x, t, cond), ref, rtol=1e-5, atol=1e-5)
