"""``difffeat-tiny``: a small class-conditional pixel-space DDPM trained on ``shapes``.

It exists so that every difffeat pipeline can run end to end (extraction, heads, fake-image
detection) with a real, trained diffusion model that is small enough to ship and to run on
a CPU. It is trained by ``scripts/train_tiny.py``.

Architecture (:func:`tiny_unet_config`): a diffusers ``UNet2DModel`` on 64x64 RGB in
[-1, 1], block channels (64, 128, 128, 128) at resolutions 64/32/16/8 with two ResNet
blocks per level, self-attention at 16x16 and 8x8 (and in the 8x8 mid block), AdaGN
("scale_shift") time conditioning as in improved DDPM / ADM (Nichol & Dhariwal 2021;
Dhariwal & Nichol 2021), about 9.3M parameters (18.6 MB as float16 safetensors).

Conditioning: ``num_class_embeds = len(CLASSES) + 1``; labels ``0..7`` are the shape
classes of :data:`difffeat.data.shapes.CLASSES` and :data:`NULL_CLASS` (= 8) is the "no
class" label used for unconditional prediction. Training replaces the label by the null
class with probability 0.1, so classifier-free guidance (Ho & Salimans 2022) works.

Noise: DDPM (Ho et al. 2020), 1000 steps, epsilon prediction, cosine ("squaredcos_cap_v2")
betas of Nichol & Dhariwal 2021, which are better than linear betas for small images.
"""
from __future__ import annotations

from typing import Any

import torch

from difffeat.data.shapes import CLASSES

NUM_CLASSES = len(CLASSES)
NULL_CLASS = NUM_CLASSES
"""Class label meaning "unconditional" (the extra embedding row)."""


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """The ``UNet2DModel`` config of difffeat-tiny; keyword arguments override entries."""
    cfg: dict[str, Any] = dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(64, 128, 128, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=32,
        resnet_time_scale_shift="scale_shift",
        num_class_embeds=NUM_CLASSES + 1,
    )
    cfg.update(overrides)
    return cfg


def tiny_scheduler_config() -> dict[str, Any]:
    """The ``DDPMScheduler`` config difffeat-tiny is trained with."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)


def build_tiny_unet(**overrides: Any):
    """A randomly initialised difffeat-tiny ``UNet2DModel``."""
    from diffusers import UNet2DModel

    return UNet2DModel(**tiny_unet_config(**overrides))


@torch.no_grad()
def generate(unet, scheduler_config: dict[str, Any], labels: torch.Tensor, steps: int = 50,
             guidance: float = 2.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample images [B,3,H,W] in [0,1] for class ``labels`` with DDIM (Song et al. 2021).

    ``guidance`` is the classifier-free guidance scale (1.0 = plain conditional sampling);
    use ``NULL_CLASS`` labels for unconditional samples.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    size, dev = unet.config.sample_size, unet.device
    labels = labels.to(dev)
    x = torch.randn((len(labels), unet.config.in_channels, size, size), generator=generator,
                    device=dev if generator is None else generator.device).to(dev, unet.dtype)
    null = torch.full_like(labels, NULL_CLASS)
    for t in sched.timesteps:
        if guidance == 1.0:
            eps = unet(x, t, class_labels=labels).sample
        else:
            both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
            cond, unc = both.chunk(2)
            eps = unc + guidance * (cond - unc)
        x = sched.step(eps, t, x).prev_sample
    return ((x.float() + 1) / 2).clamp(0, 1)
