"""CleanDIFT-style denoiser weight swap (--denoiser-weights FILE | REPO:FILE, safetensors only)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import difffeat
from difffeat.errors import BadInputError, UnsafeCheckpointError, WeightsNotFoundError


def _shifted_unet_weights(tiny_sd_dir: Path, path: Path) -> Path:
    """A 'fine-tuned' UNet: the tiny SD UNet's state dict with every tensor changed."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_dir), subfolder="unet")
    g = torch.Generator().manual_seed(3)
    save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in unet.state_dict().items()},
              str(path))
    return path


def test_weight_swap_changes_features_and_is_recorded(tiny_sd_dir: Path, tmp_path: Path) -> None:
    weights = _shifted_unet_weights(tiny_sd_dir, tmp_path / "clean_unet.safetensors")
    kw = dict(layers=["up.1"], timesteps=[0], noise="clean", device="cpu", resolution=64)
    base = difffeat.create(str(tiny_sd_dir), **kw)
    swapped = difffeat.create(str(tiny_sd_dir), denoiser_weights=str(weights), **kw)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = base(x)["up.1"], swapped(x)["up.1"]
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)
    from safetensors.torch import load_file

    want = load_file(str(weights))["conv_in.weight"]
    assert torch.equal(swapped.backbone.denoiser.conv_in.weight, want)  # the file's tensors, exactly
    assert swapped.metadata()["denoiser_weights"] == str(weights)
    again = difffeat.create(**swapped.config)  # checkpoints rebuild the same features
    assert torch.equal(again(x)["up.1"], b)


def test_hub_file_through_the_cache_and_one_line_refusals(tiny_sd_dir: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    snap = tmp_path / "hf" / "hub" / "models--CompVis--cleandift" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    _shifted_unet_weights(tiny_sd_dir, snap / "cleandift_sd15_unet.safetensors")
    (tmp_path / "hf" / "hub" / "models--CompVis--cleandift" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--CompVis--cleandift" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = difffeat.load_backbone(str(tiny_sd_dir), device="cpu",
                                denoiser_weights="CompVis/cleandift:cleandift_sd15_unet.safetensors")
    assert bb.denoiser_weights.endswith(":cleandift_sd15_unet.safetensors")
    # a wrong-shaped state dict: one line naming what does not fit, nothing loaded
    from diffusers import UNet2DConditionModel

    state = UNet2DConditionModel.from_pretrained(str(tiny_sd_dir), subfolder="unet").state_dict()
    state["conv_in.weight"] = torch.zeros(16, 4, 1, 1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(BadInputError) as e:
        difffeat.load_backbone(str(tiny_sd_dir), device="cpu", denoiser_weights=str(tmp_path / "bad.safetensors"))
    msg = str(e.value)
    assert "\n" not in msg and "conv_in.weight: [16, 4, 1, 1] vs [16, 4, 3, 3]" in msg
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(UnsafeCheckpointError):
        difffeat.load_backbone(str(tiny_sd_dir), device="cpu", denoiser_weights=str(tmp_path / "w.ckpt"))
    with pytest.raises(WeightsNotFoundError, match="not available"):
        difffeat.load_backbone(str(tiny_sd_dir), device="cpu", denoiser_weights="CompVis/cleandift:nope.safetensors")


def test_cleandift_preset() -> None:
    p = difffeat.registry.get_preset("cleandift-sd15")
    e = p.extract
    assert (e["model"], e["layers"], e["noise"], e["ensemble"]) == ("sd15", ["up.1"], "clean", 1)
    assert e["denoiser_weights"] == "CompVis/cleandift:cleandift_sd15_unet.safetensors"
    p21 = difffeat.registry.get_preset("cleandift-sd21").extract
    assert (p21["model"], p21["denoiser_weights"], p21["noise"]) == ("sd21", "CompVis/cleandift:cleandift_sd21_unet.safetensors", "clean")
