"""The one extractor contract (#14): protocol, config round trip, model override, precedence,
and the fused geometry of SD-DINO (#18 point 6: both halves placed alike on non-square images)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import difffeat
from difffeat.dino import DinoExtractor
from difffeat.errors import BadInputError
from difffeat.fusion import FusedExtractor
from difffeat.protocol import Extractor
from difffeat.presets import precedence
from difffeat.registry import MethodPreset, get_preset, method_presets


@pytest.fixture(scope="module")
def dino_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    full = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, dynamic_img_size=True)
    path = tmp_path_factory.mktemp("dino") / "w.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    return str(path)


def _dino(weights: str, **kw):  # type: ignore[no-untyped-def]
    return difffeat.create("dinov2-s", layers=["block.1"], weights=weights, model_kwargs={"depth": 2},
                           dtype="fp32", device="cpu", **kw)


def _sd_dino_spec(sd_dir: Path, weights: str) -> dict:  # type: ignore[type-arg]
    """The real sd-dino preset's fusion, its models swapped for tiny ones at small resolutions:
    every resize policy, layer and weight comes from configs/fusion/sd-dino.yaml."""
    spec = get_preset("sd-dino").raw["fusion"]
    sd, dino = (dict(s) for s in spec["sources"])
    sd.update(model=str(sd_dir), resolution=128, pca=4)
    dino.update(model="dinov2-s", layers=["block.1"], resolution=112, weights=weights, model_kwargs={"depth": 2})
    return {**spec, "sources": [sd, dino], "grid": 8}


def _tall_block_image() -> Image.Image:
    """64 wide x 32 high, black, with a white 8x8 block centred at (x, y) = (12, 12)."""
    im = Image.new("RGB", (64, 32))
    im.paste((255, 255, 255), (8, 8, 16, 16))
    return im


def _centroid(x: torch.Tensor) -> tuple[float, float]:
    """Normalised (x, y) centroid of the bright pixels of [3, H, W]."""
    m = (x.mean(0) > 0.5).float()
    ys, xs = torch.nonzero(m, as_tuple=True)
    return (float(xs.float().mean() + 0.5) / x.shape[-1], float(ys.float().mean() + 0.5) / x.shape[-2])


def test_protocol_on_all_three_extractors(tiny_sd_dir: Path, dino_weights: str) -> None:
    sd = difffeat.create(str(tiny_sd_dir), layers=["up.1"], timesteps=[50], resolution=64, dtype="fp32", device="cpu")
    dino = _dino(dino_weights, resolution=56)
    fused = FusedExtractor([sd, dino], [0.5, 0.5], [4, None], grid=4)
    for ex, multiple in ((sd, 64), (dino, 14), (fused, 1)):
        assert isinstance(ex, Extractor)
        assert ex.device == torch.device("cpu") and ex.geometry.multiple == multiple
        x = ex.prepare([_tall_block_image()])
        assert x.shape[0] == 1 and x.shape[1] == 3
        out = ex(x)
        assert list(out) == ex.keys and [i["name"] for i in ex.feature_info] == ex.keys
        assert out[ex.keys[0]].shape[1] == ex.feature_info[0]["channels"]
    assert fused.per_image is False and sd.per_image and dino.per_image


def test_create_from_config_gives_the_same_features(tiny_sd_dir: Path, dino_weights: str) -> None:
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sd = difffeat.create(str(tiny_sd_dir), layers=["up.1", "up.2"], timesteps=[50, 400], ensemble=2, noise="random",
                         seed=7, latent="sample", prompt="a red cube", resolution=64, dtype="fp32", device="cpu")
    again = difffeat.create(**sd.config)
    assert again.config == sd.config
    a, b = sd(x), again(x)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    other_seed = difffeat.create(**{**sd.config, "seed": 8})(x)  # the config is what makes the features
    assert not torch.equal(other_seed["up.1@t50"], a["up.1@t50"])

    dino = _dino(dino_weights, resolution=56, resize="pad")
    assert torch.equal(difffeat.create(**dino.config)(x)["block.1"], dino(x)["block.1"])

    big = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    odise = difffeat.create(str(tiny_sd_dir), layers=["up.1"], timesteps=[50], noise="fixed", freeu="geoaware",
                            window=64, resolution=128, dtype="fp32", device="cpu")  # GeoAware-SC's SD half
    assert isinstance(odise, Extractor) and odise.config["window"] == 64 and odise.config["freeu"] == "geoaware"
    assert torch.equal(difffeat.create(**odise.config)(big)["up.1"], odise(big)["up.1"])

    fused = difffeat.create("tiny-fused", fusion={"sources": [
        {"model": str(tiny_sd_dir), "layers": ["up.1"], "timesteps": [50], "noise": "fixed", "resolution": 64, "resize": "pad", "pca": 4, "weight": 0.3},
        {"model": "dinov2-s", "layers": ["block.1"], "resolution": 56, "resize": "pad", "weights": dino_weights, "model_kwargs": {"depth": 2}, "weight": 0.7},
    ], "grid": 4, "pca_mode": "co"}, dtype="fp32", device="cpu")
    rebuilt = difffeat.create(**fused.config)
    assert isinstance(rebuilt, FusedExtractor) and rebuilt.weights == [0.3, 0.7]
    torch.testing.assert_close(rebuilt(x)["fused"], fused(x)["fused"], rtol=0, atol=1e-6)


def test_model_override_keeps_the_method_protocol(tiny_sd_dir: Path) -> None:
    dift = get_preset("dift").extract
    ex = difffeat.create("dift", model=str(tiny_sd_dir), resolution=64, ensemble=1, dtype="fp32", device="cpu")
    assert ex.backbone.source == str(tiny_sd_dir)
    assert ex.layers == list(dift["layers"]) and ex.timesteps == list(dift["timesteps"])
    assert (ex.resolution, ex.ensemble, ex.latent) == (64, 1, dift.get("latent", "mean"))  # given over preset
    with pytest.raises(BadInputError, match="conflicts"):
        difffeat.create("sd15", model="sd21")
    with pytest.raises(BadInputError, match="fusion preset"):
        difffeat.create("sd-dino", layers=["up.1"])


def test_precedence_cli_over_preset_over_default() -> None:
    merged = precedence({"t": None, "layers": ["up.2"]}, {"t": [100], "layers": ["up.1"], "prompt": ""}, {"t": [261], "e": 8})
    assert merged == {"t": [100], "layers": ["up.2"], "prompt": "", "e": 8}


def test_sd_dino_halves_are_placed_alike_on_non_square_images(tiny_sd_dir: Path, dino_weights: str) -> None:
    fx = difffeat.create("sd-dino-tiny", fusion=_sd_dino_spec(tiny_sd_dir, dino_weights), dtype="fp32", device="cpu")
    sd, dino = fx.sources
    assert sd.geometry.policy == dino.geometry.policy == "pad"  # the preset's resize reaches DINOv2 too
    im = _tall_block_image()
    # PIL path: each source letterboxes; the DINO map is the square patch grid (not 8 x 4 snapped)
    maps = fx.source_maps([im])
    assert maps[1][0].shape[-2:] == (8, 8) and all(m.shape[-1] == m.shape[-2] for m in maps[0])
    # the block sits at the same normalised place in what every source sees, the letterboxed place
    want = (12 / 64, (16 + 12) / 64)  # content 64x32 -> centred vertically on a 64x64 square (a stretch gives 12 / 32)
    seen: list[torch.Tensor] = []
    hooks = [s.register_forward_pre_hook(lambda m, a: seen.append(a[0][0])) for s in fx.sources]
    try:
        fx(difffeat.io.pil_to_tensor(im)[None])  # tensor path: re-prepared per source, never stretched
    finally:
        for h in hooks:
            h.remove()
    assert [tuple(t.shape[-2:]) for t in seen] == [(128, 128), (112, 112)]
    for t in seen + [fx.prepare([im])[0], sd.prepare([im])[0], dino.prepare([im])[0]]:
        cx, cy = _centroid(t)
        assert abs(cx - want[0]) < 0.02 and abs(cy - want[1]) < 0.02, (cx, cy)
    mixed = [s for s in _sd_dino_spec(tiny_sd_dir, dino_weights)["sources"]]
    mixed[1] = dict(mixed[1], resize="snap")
    with pytest.raises(BadInputError, match="place the image alike"):
        difffeat.create("mixed", fusion={"sources": mixed, "grid": 8}, dtype="fp32", device="cpu")


def _with_preset(name: str, spec: dict) -> MethodPreset:  # type: ignore[type-arg]
    extract = {"model": spec["sources"][0]["model"]}
    p = MethodPreset(name, "correspond", "<test>", extract, {"name": name, "task": "correspond", "extract": extract, "fusion": spec})
    method_presets()[name] = p
    return p


def test_extract_fusion_preset_on_a_folder(tiny_sd_dir: Path, dino_weights: str, tmp_path: Path) -> None:
    from test_io_cli import run_cli

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _tall_block_image().save(imgs / "a.png")
    Image.new("RGB", (40, 56), (90, 30, 200)).save(imgs / "b.png")
    res = run_cli("extract", str(imgs), "-m", "sd-dino", "-o", str(tmp_path / "o0"))  # offline: no SD-1.5 weights
    assert res.exit_code != 0 and res.output.count("\n") == 1 and res.output.startswith("error: ")
    spec = _sd_dino_spec(tiny_sd_dir, dino_weights)
    try:
        _with_preset("tiny-sd-dino", spec)
        res = run_cli("extract", str(imgs), "-m", "tiny-sd-dino", "-o", str(tmp_path / "o1"), "--dtype", "fp32", "--device", "cpu")
        assert res.exit_code != 0 and res.output.strip().count("\n") == 0 and "co-PCA" in res.output
        _with_preset("tiny-sd-dino-nopca", {**spec, "pca_mode": "none"})
        res = run_cli("extract", str(imgs), "-m", "tiny-sd-dino-nopca", "-o", str(tmp_path / "o2"), "--dtype", "fp32", "--device", "cpu")
        assert res.exit_code == 0, res.output
    finally:
        method_presets().pop("tiny-sd-dino", None)
        method_presets().pop("tiny-sd-dino-nopca", None)
    feats, meta = difffeat.io.load_features(tmp_path / "o2" / "a.safetensors")
    assert list(feats) == ["fused"] and feats["fused"].shape == (32 + 32 + 16 + 384, 8, 8)
    assert meta["model"] == "tiny-sd-dino-nopca"


def test_a_default_changed_after_training_does_not_change_a_loaded_checkpoint(tiny_sd_dir: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from difffeat.errors import CheckpointMismatchError
    from difffeat.heads import build_head, save_head
    from difffeat.heads.checkpoint import check_backbone, read_config
    from difffeat.registry import MODELS, ModelPreset
    from difffeat.tasks.dense_predict import DensePredictor
    from difffeat.tasks.dense_train import backbone_record

    MODELS["tiny-sd-ckpt"] = ModelPreset("tiny-sd-ckpt", str(tiny_sd_dir), "sd", 64, ("up.1",), (100,), 2)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    try:
        ex = difffeat.create("tiny-sd-ckpt", dtype="fp32", device="cpu")  # layers, t, ensemble: the preset's defaults
        head = build_head("probe", ex.feature_info, num_outputs=3)
        save_head(head, tmp_path / "ckpt", backbone=backbone_record({"model": "tiny-sd-ckpt", "resolution": 64}, ex),
                  task="seg", image_size=64)
        want = ex(x)["up.1"]
        MODELS["tiny-sd-ckpt"] = replace(MODELS["tiny-sd-ckpt"], layers=("up.2",), timesteps=(600,), ensemble=1)
        changed = difffeat.create("tiny-sd-ckpt", layers=["up.1"], dtype="fp32", device="cpu")
        assert not torch.allclose(changed(x)["up.1"], want)  # the new defaults do change fresh extractors
        loaded = DensePredictor.from_checkpoint(tmp_path / "ckpt", device="cpu", dtype="fp32")
        assert (loaded.ex.layers, loaded.ex.timesteps, loaded.ex.ensemble) == (["up.1"], [100], 2)
        assert torch.equal(loaded.ex(x)["up.1"], want)
        cfg = read_config(tmp_path / "ckpt")
        assert cfg["kind"] == "dense-head" and cfg["backbone"]["extractor"] == ex.config
        with pytest.raises(CheckpointMismatchError, match="ensemble 2"):
            check_backbone(cfg, {"extractor": {**ex.config, "ensemble": 4, "device": "cuda"}})
        check_backbone(cfg, {"extractor": {**ex.config, "device": "cuda:1", "max_batch": 64}})  # runtime keys may differ
    finally:
        MODELS.pop("tiny-sd-ckpt", None)


def test_family_knowledge_lives_only_in_the_adapters() -> None:
    """A new family is one file in difffeat/families + a registry entry: no other core module
    switches on a family name or a family's denoiser/block class."""
    import re

    import difffeat.families as fam

    root = Path(difffeat.__file__).parent
    names = [f.name for f in fam.FAMILIES]
    pattern = re.compile(r"[\"'](%s|UNet2DConditionModel|UNet2DModel|SD3Transformer2DModel|"
                         r"PixArtTransformer2DModel|DiTTransformer2DModel|JointTransformerBlock|FluxTransformer2DModel)[\"']" % "|".join(names))
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if "families" not in p.parts and p.name != "registry.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
    assert sorted(names) == ["dit", "flux", "pixart", "pixel", "sd", "sd3", "sdxl"]
