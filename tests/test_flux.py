"""FLUX.1 family (tiny random FluxTransformer2DModel through the public loader) and DiTF's
post-processing (AdaLN modulation, massive-activation channel discard) on FLUX and SD3."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import difffeat
from difffeat.adaln import massive_channels, modulate
from difffeat.errors import BadInputError
from difffeat.families.flux import image_ids, pack, unpack

import tiny_models


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    return tiny_models.build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="module")
def flux(flux_dir):  # type: ignore[no-untyped-def]
    return difffeat.load_backbone(str(flux_dir), device="cpu")


def _images(n: int = 2, h: int = 64, w: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_pack_matches_manual_2x2_patches() -> None:
    lat = torch.randn(2, 16, 6, 4)
    tok = pack(lat)
    assert tok.shape == (2, 3 * 2, 64)
    for i, j, c, dy, dx in [(0, 0, 0, 0, 0), (2, 1, 5, 1, 0), (1, 0, 15, 1, 1), (2, 0, 3, 0, 1)]:
        assert tok[1, i * 2 + j, c * 4 + dy * 2 + dx] == lat[1, c, 2 * i + dy, 2 * j + dx]
    assert torch.equal(unpack(tok, (6, 4)), lat)
    ids = image_ids((6, 4), torch.device("cpu"), torch.float32)
    assert ids[2 * 2 + 1].tolist() == [0.0, 2.0, 1.0]  # (0, row, col) of token (2, 1)


def test_layers_streams_and_feature_map(flux) -> None:  # type: ignore[no-untyped-def]
    names = list(flux.layer_modules())
    assert names == ["embed"] + [f"block.{i}" for i in range(5)] + ["final"]
    d = flux.denoiser
    assert flux.layer_modules()["block.2"] is d.single_transformer_blocks[0]  # 2 double-stream blocks first
    assert flux.size_multiple == 16 and flux.in_channels == 16
    ex = difffeat.create(str(flux.source), backbone=flux, layers=["block.1", "block.3", "final"], timesteps=[500])
    info = {i["layer"]: (i["channels"], i["stride"]) for i in ex.feature_info}
    assert info == {"block.1": (32, 16), "block.3": (32, 16), "final": (16, 8)}
    seen = {}
    h = d.single_transformer_blocks[1].register_forward_hook(lambda m, a, o: seen.update(img=o[1]))
    try:
        feats = ex(_images(1), prompts="a cat")
    finally:
        h.remove()
    tok = seen["img"].float()  # [1, 4*3, 32] image tokens, row-major over the 4x3 packed grid
    assert torch.allclose(feats["block.3"][0, :, 2, 1], tok[0, 2 * 3 + 1], atol=1e-6)
    assert feats["final"].shape == (1, 16, 8, 6)


def test_predict_is_the_pipeline_call_and_early_exit_is_exact(flux) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 16, 8, 6)
    t = torch.tensor([260, 700])
    cond = flux.conditioning(prompts=["a cat", "a dog"], batch=2)
    got = flux.predict(x, t, cond)
    d = flux.denoiser
    ref = d(hidden_states=pack(x), timestep=t.float() / 1000, guidance=torch.full((2,), 3.5),
            pooled_projections=cond.kwargs["pooled_projections"], encoder_hidden_states=cond.kwargs["encoder_hidden_states"],
            txt_ids=torch.zeros(512, 3), img_ids=image_ids((8, 6), x.device, x.dtype), return_dict=False)[0]
    assert torch.allclose(got, unpack(ref, (8, 6)), atol=1e-6)
    kw = dict(backbone=flux, layers=["block.1", "block.2"], timesteps=[260], ensemble=2)
    a = difffeat.create(str(flux.source), early_exit=True, **kw)(_images(), prompts="x")
    b = difffeat.create(str(flux.source), early_exit=False, **kw)(_images(), prompts="x")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_pooled_clip_and_t5_zeros(flux_dir) -> None:  # type: ignore[no-untyped-def]
    full = difffeat.load_backbone(str(flux_dir), device="cpu")
    no_t5 = difffeat.load_backbone(str(flux_dir), device="cpu", use_t5=False)
    e, z = full._embed_prompt("a red car"), no_t5._embed_prompt("a red car")
    assert e["encoder_hidden_states"].shape == (1, 512, 24) and e["pooled"].shape == (1, 32)
    clip = full.parts.text_encoders()["text_encoder"]
    ids = full.parts.tokenize("text_encoder", "a red car")[0]
    assert torch.allclose(e["pooled"], clip(ids).pooler_output)
    assert torch.equal(z["pooled"], e["pooled"]) and not z["encoder_hidden_states"].any()
    assert "text_encoder_2" not in no_t5.parts.text_encoders() and e["encoder_hidden_states"].abs().sum() > 0


@pytest.mark.parametrize("shift", [False, True])
def test_flow_noising_equals_scheduler_scale_noise(flux_dir, shift: bool) -> None:  # type: ignore[no-untyped-def]
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    x0, noise, hw = torch.randn(1, 16, 40, 40), torch.randn(1, 16, 40, 40), (40, 40)
    flux = difffeat.load_backbone(str(flux_dir), device="cpu", time_shift=shift)
    got = flux.add_noise(x0, noise, torch.tensor([260]))
    fed = {}
    h = flux.denoiser.register_forward_pre_hook(lambda m, a, k: fed.update(k), with_kwargs=True)
    try:
        flux.predict(torch.zeros(1, 16, *hw), torch.tensor([260]), flux.dummy_conditioning(1, (320, 320)))
    finally:
        h.remove()
    ex = difffeat.create(str(flux_dir), backbone=flux, layers=["block.0"])
    assert ex.metadata()["time_shift"] is shift and ("time_shift" in ex.config) is shift
    sched = FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler.config)
    mu = calculate_shift(20 * 20, 256, 4096, 0.5, 1.15) if shift else 0.0  # mu=0: no shift
    sched.set_timesteps(sigmas=np.array([0.26]), mu=mu)
    ref = sched.scale_noise(x0, sched.timesteps[:1], noise)
    assert torch.allclose(got, ref, atol=1e-6)
    sigma = float(sched.sigmas[0])
    assert (sigma > 0.26) == shift and abs(float(fed["timestep"][0]) - sigma) < 1e-6  # the model sees the same sigma


def _block_input(bb, block, images, t, prompt):  # type: ignore[no-untyped-def]
    """Hand computation: the ensemble-1 clean input of `block` and its temb, from a plain forward."""
    seen = {}
    h = block.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        ex = difffeat.create(str(bb.source), backbone=bb, layers=["final"], timesteps=[t], noise="clean")
        ex(images, prompts=prompt)
    finally:
        h.remove()
    return seen["hidden_states"].float(), seen["temb"].float()


def test_adaln_feature_equals_hand_computation(flux) -> None:  # type: ignore[no-untyped-def]
    imgs = _images(2)
    blk = flux.denoiser.single_transformer_blocks[1]  # block.3
    x, temb = _block_input(flux, blk, imgs, 260, "a cat")
    lin = blk.norm.linear.weight.float() @ torch.nn.functional.silu(temb).T + blk.norm.linear.bias.float()[:, None]
    shift, scale = lin.T[:, :32], lin.T[:, 32:64]  # AdaLayerNormZeroSingle: shift, scale, gate
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (1 + scale[:, None]) * (x - mean) / torch.sqrt(var + 1e-6) + shift[:, None]  # [2, 12, 32]
    ex = difffeat.create(str(flux.source), backbone=flux, layers=["block.3"], timesteps=[260], noise="clean", adaln=True)
    got = ex(imgs, prompts="a cat")["block.3"]
    assert torch.allclose(got.flatten(2).transpose(1, 2), ref, atol=1e-4)
    assert ex.metadata()["adaln"] is True and difffeat.create(**ex.config, backbone=flux).adaln
    ran = []
    h = flux.denoiser.single_transformer_blocks[1].register_forward_hook(lambda m, a, o: ran.append(1))
    try:
        early = ex(imgs, prompts="a cat")["block.3"]
        assert ran == []  # the pre-hook of block.3 ends the forward before block.3 runs
        full = difffeat.create(**{**ex.config, "early_exit": False}, backbone=flux)(imgs, prompts="a cat")["block.3"]
        assert ran and torch.equal(early, full)
    finally:
        h.remove()


def test_channel_discard_removes_exactly_the_recorded_channels() -> None:
    g = torch.Generator().manual_seed(1)
    feat, shift, scale = torch.randn(2, 8, 3, 3, generator=g), torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    feat[:, 5] += 300.0  # a massive activation
    assert massive_channels(feat, 1) == [5]
    out = modulate(feat, shift, scale, 1e-6, [2, 5])
    bumped = feat.clone()
    bumped[:, [2, 5]] = torch.randn(2, 2, 3, 3, generator=g) * 50
    assert torch.allclose(modulate(bumped, shift, scale, 1e-6, [2, 5]), out)  # no influence left
    other = feat.clone()
    other[:, 3] += 1.0
    assert not torch.allclose(modulate(other, shift, scale, 1e-6, [2, 5]), out)
    kept = feat.clone()
    kept[:, [2, 5]] = 0  # == DiTF: zero the channels, then LayerNorm + modulation
    x = torch.nn.functional.layer_norm(kept.permute(0, 2, 3, 1), (8,), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(out, (1 + scale[..., None, None]) * x + shift[..., None, None], atol=1e-5)


def test_discard_in_extractor_metadata_and_refusals(flux) -> None:  # type: ignore[no-untyped-def]
    kw = dict(backbone=flux, layers=["block.2"], timesteps=[260], noise="clean")
    raw = difffeat.create(str(flux.source), **kw)(_images(1))["block.2"]
    ex = difffeat.create(str(flux.source), discard_channels=[7, 3], **kw)
    cut = ex(_images(1))["block.2"]
    assert not cut[:, [3, 7]].any() and torch.equal(cut[:, [0, 1, 2, 4, 5, 6]], raw[:, [0, 1, 2, 4, 5, 6]])
    assert ex.metadata()["discard_channels"] == [3, 7]
    with pytest.raises(BadInputError, match="block.K only"):
        difffeat.create(str(flux.source), backbone=flux, layers=["final"], adaln=True)


def test_adaln_on_sd3_joint_blocks_and_refused_on_unets(tmp_path, tiny_sd_dir) -> None:  # type: ignore[no-untyped-def]
    sd3 = difffeat.load_backbone(str(tiny_models.build_tiny_sd3(tmp_path / "sd3", with_t5=False, sd35=False)), device="cpu")
    imgs = _images(1, 32, 32)
    blk = sd3.denoiser.transformer_blocks[1]
    x, temb = _block_input(sd3, blk, imgs, 300, "")
    shift, scale = blk.norm1.linear(torch.nn.functional.silu(temb)).chunk(6, dim=1)[:2]
    ref = (1 + scale[:, None]) * torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-6) + shift[:, None]
    ex = difffeat.create(str(sd3.source), backbone=sd3, layers=["block.1"], timesteps=[300], noise="clean", adaln=True)
    assert torch.allclose(ex(imgs)["block.1"].flatten(2).transpose(1, 2), ref, atol=1e-4)
    with pytest.raises(BadInputError, match="AdaLN-Zero"):
        difffeat.create(str(tiny_sd_dir), layers=["up.1"], adaln=True, device="cpu")
    with pytest.raises(BadInputError, match="time_shift applies to FLUX"):
        difffeat.load_backbone(str(tiny_sd_dir), device="cpu", time_shift=True)


def test_ditf_preset_end_to_end_on_the_cli(flux_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner
    from PIL import Image

    from difffeat.cli import cli, load_task_commands
    from difffeat.registry import get_preset

    load_task_commands()
    ext = get_preset("ditf").extract
    assert (ext["model"], ext["layers"], ext["timesteps"], ext["ensemble"], ext["resolution"]) == (
        "flux-dev", ["block.28"], [260], 8, 640)
    assert ext["adaln"] is True and ext["discard_channels"] == [154, 1446]
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (64, 80, 3)), ("b.png", (48, 64, 3))):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / name)
    args = ["correspond", tmp_path / "a.png", tmp_path / "b.png", "--points", "10,12;30,40", "--preset", "ditf",
            "-m", flux_dir, "-l", "block.3", "-e", "1", "--resolution", "64", "--device", "cpu", "--dtype", "fp32",
            "-o", tmp_path / "out"]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert "discard channel 154 out of range for 32 channels" in r.output and r.exit_code != 0  # FLUX.1's channels
    r = CliRunner().invoke(cli, [str(a) for a in args + ["--discard-channels", "3,7"]])
    assert r.exit_code == 0, r.output
    assert len(__import__("json").loads((tmp_path / "out" / "a__b.json").read_text())["matches"]) == 2


def test_flux_benchmark_runs_tiny_on_cpu() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "extract_flux.py"
    spec = importlib.util.spec_from_file_location("extract_flux", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    rows = mod.main(["--tiny", "--device", "cpu", "--iters", "1", "--batch", "1", "--forward-batch", "8",
                     "--baseline-images", "1"])
    assert [r["bench"] for r in rows] == ["extract", "denoiser_forward", "baseline"]
    assert rows[0]["ensemble"] == 8 and rows[0]["tflop_per_image"] >= 0 and rows[1]["batch"] == 8
    assert rows[2]["speedup"] > 0 and rows[2]["dtype"] == "float32"


def test_layers_command_flux_schnell_random_weights_on_meta() -> None:
    """The real FLUX.1 architecture (12B) probed from the bundled configs on the meta device."""
    from click.testing import CliRunner

    from difffeat.cli import cli

    r = CliRunner().invoke(cli, ["layers", "flux-schnell", "--random-weights"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split()[1:] for line in r.output.splitlines()[1:]}
    assert [n for n in rows if n.startswith("block.")] == [f"block.{i}" for i in range(19 + 38)]
    assert rows["block.28"] == ["3072", "16"] and rows["embed"] == ["3072", "16"] and rows["final"] == ["16", "8"]


def test_schnell_without_t5_and_the_prompt_cache(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """FLUX.1-schnell shape (no guidance embedding) without T5 files; prompt embeddings cached on
    disk per (model, T5 zeros or not, prompt)."""
    root = tiny_models.build_tiny_flux(tmp_path / "schnell", guidance=False, with_t5=False)
    bb = difffeat.load_backbone(str(root), device="cpu", use_t5=False, prompt_cache=str(tmp_path / "cache"))
    seen = {}
    h = bb.denoiser.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        ex = difffeat.create(str(root), backbone=bb, layers=["block.4"], timesteps=[500], noise="fixed")
        out = ex(_images(1), prompts="a bird")["block.4"]
    finally:
        h.remove()
    assert "guidance" not in seen and out.shape == (1, 32, 4, 3)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    again = difffeat.load_backbone(str(root), device="cpu", use_t5=False, prompt_cache=str(tmp_path / "cache"))
    again.parts._text_encoders = {}  # a cached prompt needs no text encoder
    assert torch.equal(again._embed_prompt("a bird")["pooled"], bb._embed_prompt("a bird")["pooled"])
    assert "adaln" not in ex.config and "denoiser_weights" not in ex.config  # plain configs keep their keys


def test_flux_dinov3_fusion_spec_passes_ditf_options(flux_dir) -> None:  # type: ignore[no-untyped-def]
    """flux-dinov3's shape: a fusion spec whose FLUX source carries adaln + discard_channels."""
    from difffeat.fusion import FusedExtractor

    spec = {"sources": [
        {"model": str(flux_dir), "layers": ["block.3"], "timesteps": [260], "ensemble": 1, "noise": "fixed",
         "resolution": 64, "resize": "pad", "adaln": True, "discard_channels": [3, 7], "pca": 4, "weight": 0.5},
        {"model": "dinov3-s", "layers": ["block.1"], "resolution": 64, "resize": "pad", "pca": None, "weight": 0.5,
         "model_kwargs": {"depth": 2}}],
        "pca_mode": "co", "grid": 4}
    fx = FusedExtractor.from_spec(spec, random_weights=True, device="cpu", dtype="fp32")
    flux_src = fx.sources[0]
    assert flux_src.adaln and flux_src.discard_channels == [3, 7]
    out = fx(_images(2, 64, 64))["fused"]
    assert out.shape == (2, 4 + 384, 4, 4)
    torch.testing.assert_close(out[:, :4].norm(dim=1), torch.full((2, 4, 4), 0.5))
    torch.testing.assert_close(out[:, 4:].norm(dim=1), torch.full((2, 4, 4), 0.5))
