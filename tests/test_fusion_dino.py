"""DINOv2 through timm and SD-DINO fusion."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import difffeat
from difffeat.dino import DinoExtractor
from difffeat.errors import UnknownNameError, WeightsNotFoundError
from difffeat.fusion import PCA, FusedExtractor, co_pca, fuse, l2_normalize


@pytest.fixture(scope="module")
def tiny_dino() -> DinoExtractor:
    torch.manual_seed(0)
    return DinoExtractor("dinov2-s", layers=["block.1"], random_weights=True, device="cpu", dtype="fp32", depth=2)


def test_dino_maps_and_dynamic_size(tiny_dino: DinoExtractor) -> None:
    f = tiny_dino(torch.rand(2, 3, 56, 42))["block.1"]
    assert f.shape == (2, 384, 4, 3)
    assert tiny_dino.feature_info == [{"name": "block.1", "layer": "block.1", "t": None, "channels": 384, "stride": 14}]
    g = tiny_dino(torch.rand(1, 3, 50, 50))["block.1"]  # snapped to 56x56
    assert g.shape == (1, 384, 4, 4)
    with pytest.raises(UnknownNameError, match="block.1"):
        DinoExtractor("dinov2-s", layers=["block.5"], random_weights=True, device="cpu", depth=2)


def test_dino_local_weights_file_and_missing_weights(tiny_dino: DinoExtractor, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    full = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, dynamic_img_size=True)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = DinoExtractor("dinov2-s", layers=["block.1"], weights=str(tmp_path / "w.safetensors"), device="cpu", dtype="fp32", depth=2)
    x = torch.rand(1, 3, 28, 28)
    ref = full.forward_intermediates(((x - loaded.mean) / loaded.std), indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(loaded(x)["block.1"], ref)
    with pytest.raises(WeightsNotFoundError, match="not available"):
        DinoExtractor("dinov2-s", layers=["block.1"], device="cpu", depth=2)  # offline, nothing cached


def test_pca_and_co_pca() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(2, 16, generator=g)
    x = torch.randn(500, 2, generator=g) @ basis + 0.01 * torch.randn(500, 16, generator=g)
    p = PCA.fit(x, 2)
    recon = (x - p.mean) @ p.components @ p.components.T + p.mean
    assert (recon - x).norm() / x.norm() < 0.02  # 2 components explain the data
    maps = torch.randn(2, 32, 5, 5, generator=g)
    red = co_pca(maps, 8)
    assert red.shape == (2, 8, 5, 5)
    assert co_pca(maps[:1], 100).shape[1] == 25  # k is capped by the samples


def test_fuse_shapes_and_norms() -> None:
    g = torch.Generator().manual_seed(1)
    sd = [torch.randn(2, 64, 4, 4, generator=g), torch.randn(2, 32, 8, 8, generator=g)]
    dino = [torch.randn(2, 48, 6, 6, generator=g)]
    out = fuse([sd, dino], [0.5, 0.5], grid=6, pca_dims=[8, None])
    assert out.shape == (2, 8 + 8 + 48, 6, 6)
    sd_part, dino_part = out[:, :16], out[:, 16:]
    torch.testing.assert_close(sd_part.norm(dim=1), torch.full((2, 6, 6), 0.5))
    torch.testing.assert_close(dino_part.norm(dim=1), torch.full((2, 6, 6), 0.5))
    torch.testing.assert_close(l2_normalize(dino[0]).norm(dim=1), torch.ones(2, 6, 6))


def test_fused_extractor_end_to_end(tiny_sd, tiny_dino: DinoExtractor) -> None:  # type: ignore[no-untyped-def]
    sd = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.0", "up.1"], timesteps=[100], noise="fixed", resolution=64)
    fx = FusedExtractor([sd, tiny_dino], [0.5, 0.5], [4, None], grid=4)
    x = torch.rand(2, 3, 56, 56)
    out = fx(x)["fused"]
    assert out.shape == (2, 4 + 4 + 384, 4, 4)
    assert fx.feature_info[0]["channels"] == 392
    fx.fit_pca(torch.rand(3, 3, 56, 56))
    assert fx(x)["fused"].shape == out.shape


def test_sd_dino_preset_is_faithful() -> None:
    p = difffeat.registry.get_preset("sd-dino")
    src_sd, src_dino = p.raw["fusion"]["sources"]
    assert (src_sd["model"], src_sd["timesteps"], src_sd["layers"], src_sd["pca"]) == ("sd15", [100], ["up.0.res.1", "up.1.attn.1", "up.2.attn.1"], 256)
    assert (src_sd["resolution"], src_dino["resolution"], p.raw["fusion"]["grid"]) == (960, 840, 60)
    assert (src_dino["model"], src_dino["layers"]) == ("dinov2-b", ["block.11"])
    assert src_sd["weight"] == src_dino["weight"] == 0.5


def test_dinov3_patch16_registers_dropped_and_fusion(tmp_path: Path, tiny_sd) -> None:  # type: ignore[no-untyped-def]
    """DINOv3 through timm: 16-px patches, CLS + 4 register tokens dropped, saved/loaded weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    full = timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=2, dynamic_img_size=True)
    assert full.num_prefix_tokens == 5  # CLS + 4 registers
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "v3.safetensors"))
    v3 = DinoExtractor("dinov3-s", layers=["block.1"], weights=str(tmp_path / "v3.safetensors"), device="cpu",
                       dtype="fp32", depth=2)
    assert v3.feature_info[0]["stride"] == 16 and v3.geometry.multiple == 16
    x = torch.rand(1, 3, 48, 64)
    tokens = full.forward_intermediates((x - v3.mean) / v3.std, indices=[1], return_prefix_tokens=True,
                                        intermediates_only=False, output_fmt="NCHW")[1][0]
    torch.testing.assert_close(v3(x)["block.1"], tokens[0])  # patch tokens only, as a 3x4 map
    assert v3(x)["block.1"].shape == (1, 384, 3, 4)
    sd = difffeat.create(tiny_sd.source, backbone=tiny_sd, layers=["up.0", "up.1"], timesteps=[100], noise="fixed",
                         resolution=64)
    fx = FusedExtractor([sd, v3], [0.5, 0.5], [4, None], grid=4)
    out = fx(torch.rand(2, 3, 64, 64))["fused"]
    assert out.shape == (2, 4 + 4 + 384, 4, 4)
    torch.testing.assert_close(out[:, :8].norm(dim=1), torch.full((2, 4, 4), 0.5))
    torch.testing.assert_close(out[:, 8:].norm(dim=1), torch.full((2, 4, 4), 0.5))


def test_dinov3_presets_and_new_fusion_combinations() -> None:
    from difffeat.registry import MODELS, is_feature_model

    for size, arch, last in (("s", "small", 11), ("b", "base", 11), ("l", "large", 23)):
        p = MODELS[f"dinov3-{size}"]
        assert p.hub_id == f"vit_{arch}_patch16_dinov3.lvd1689m" and p.layers == (f"block.{last}",)
        assert is_feature_model(p) and p.gated and "DINOv3 License" in p.license
    for name, diffusion in (("sd-dinov3", "sd15"), ("flux-dinov3", "flux-dev")):
        p = difffeat.registry.get_preset(name)
        src, dino = p.raw["fusion"]["sources"]
        assert p.raw["paper_results"] is None and "NEW COMBINATION" in Path(p.path).read_text()
        assert (src["model"], src["pca"], dino["model"], dino["pca"], p.raw["fusion"]["grid"]) == (diffusion, 256, "dinov3-b", None, 60)
        assert src["weight"] == dino["weight"] == 0.5 and p.raw["matching"]["metric"] == "l2"
    assert difffeat.registry.get_preset("flux-dinov3").raw["fusion"]["sources"][0]["adaln"] is True
