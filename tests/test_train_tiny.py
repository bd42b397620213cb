"""scripts/train_tiny.py: a few CPU steps of a reduced difffeat-tiny, save, reload, resume."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from difffeat.data.shapes import CLASSES
from difffeat.data.tiny_model import NULL_CLASS, build_tiny_unet, generate, tiny_unet_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"
SMALL = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
             attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_config_fits_the_size_budget():
    cfg = tiny_unet_config()
    assert cfg["num_class_embeds"] == len(CLASSES) + 1 == NULL_CLASS + 1
    with torch.device("meta"):                                # count without allocating
        n = sum(p.numel() for p in build_tiny_unet().parameters())
    assert 5e6 <= n <= 15e6 and 2 * n <= 25e6          # float16 safetensors <= 25 MB


def test_train_save_reload_resume(script, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    out = tmp_path / "run"
    info = script.train(out, minutes=5, batch=4, size=16, device="cpu", max_steps=3,
                        log_every=1, preview=0, unet_overrides=SMALL)
    assert info["steps"] == 3 and info["samples"] == 12
    assert len(info["loss_log"]) == 3 and all(math.isfinite(v) for _, v in info["loss_log"])
    assert json.loads((out / "training.json").read_text())["steps"] == 3
    assert "difffeat-tiny" in (out / "model_card.md").read_text()

    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.dtype == torch.float32 and unet.config.num_class_embeds == NULL_CLASS + 1
    from safetensors import safe_open
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.float16    # shipped as float16
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000
    imgs = generate(unet, sched.config, torch.tensor([0, NULL_CLASS]), steps=2,
                    generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (2, 3, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1

    import difffeat                                  # the folder is a difffeat backbone too
    bb = difffeat.load_backbone(str(out), dtype="fp32", device="cpu")
    x = bb.add_noise(torch.zeros(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([500, 500]))
    cond = bb.conditioning(class_labels=[1, 2], batch=2)
    assert bb.predict(x, torch.tensor([500, 500]), cond).shape == (2, 3, 16, 16)

    more = script.train(tmp_path / "run2", minutes=5, batch=4, size=16, device="cpu",
                        max_steps=5, log_every=1, preview=0, unet_overrides=SMALL, resume=out)
    assert more["steps"] == 5 and more["samples"] == 20 and len(more["loss_log"]) == 5
    assert more["loss_log"][:3] == info["loss_log"]
    with pytest.raises(Exception, match="train_state"):
        script.train(tmp_path / "x", max_steps=1, batch=2, size=16, device="cpu",
                     unet_overrides=SMALL, resume=tmp_path / "nothing")
