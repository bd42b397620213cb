"""FreeU inside the one extraction path, as GeoAware-SC's ODISE fork applies it.

FreeU (Si, Huang, Jiang, Liu. *FreeU: Free Lunch in Diffusion U-Net.* CVPR 2024) rescales the
UNet decoder: before each decoder resnet, the first half of the backbone channels ``h`` is
multiplied by ``b`` and the skip features are Fourier-filtered (the lowest frequencies, a
``2 x 2`` square around the centre of the shifted spectrum, times ``s``).

GeoAware-SC (Zhang et al., CVPR 2024) extracts its zero-shot SD features with FreeU on
(``third_party/ODISE/odise/modeling/meta_arch/ldm.py``: ``b1 = 1.2, b2 = 1.4, s1 = 0.9,
s2 = 0.2``; ``unet_forward`` applies b1/s1 where ``h`` has 1280 channels and b2/s2 where it has
640, i.e. by channel count, not by decoder stage as diffusers' ``enable_freeu`` does). Its
``decoder_only`` branch stores ``h`` *before* scaling it **in place**, so the stored feature
itself carries the ``b`` factor on its first half of channels; :meth:`FreeU.scale_stored`
reproduces that on the captured maps.

Generalised to any diffusers UNet: b1/s1 where ``h`` has ``max(block_out_channels)`` channels,
b2/s2 where it has half of that (1280 and 640 for SD 1.x/2.x).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .errors import BadInputError


@dataclass(frozen=True)
class FreeUSettings:
    """Backbone factors ``b1, b2`` and skip factors ``s1, s2`` (the two FreeU stages)."""

    b1: float
    b2: float
    s1: float
    s2: float


#: GeoAware-SC's ODISE fork (``ldm.py``: ``self.b1 = 1.2 ... self.freeu = True``).
PRESETS = {"geoaware": FreeUSettings(b1=1.2, b2=1.4, s1=0.9, s2=0.2)}


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the centred ``2*threshold`` square of the shifted 2-D spectrum by ``scale`` (fp32 FFT)."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = freq.shape[-2:]
    mask = torch.ones_like(freq.real)
    mask[..., h // 2 - threshold:h // 2 + threshold, w // 2 - threshold:w // 2 + threshold] = scale
    out = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


def _producers(i: int, j: int, block: nn.Module) -> list[str]:
    """Layer names whose output is the ``h`` fed to resnet ``j`` of up block ``i``."""
    if j > 0:
        return [f"up.{i}.attn.{j - 1}" if getattr(block, "attentions", None) else f"up.{i}.res.{j - 1}"]
    return ["mid"] if i == 0 else [f"up.{i - 1}", f"up.{i - 1}.up"]


class FreeU:
    """FreeU pre-hooks on a UNet's decoder resnets (see the module docstring)."""

    def __init__(self, denoiser: nn.Module, settings: FreeUSettings | str | dict[str, float]) -> None:
        if isinstance(settings, dict):  # the factors as an extractor's config records them
            settings = FreeUSettings(**settings)
        if isinstance(settings, str):
            if settings not in PRESETS:
                raise BadInputError(f"unknown FreeU preset {settings!r}; valid: {', '.join(PRESETS)}")
            settings = PRESETS[settings]
        if not hasattr(denoiser, "up_blocks"):
            raise BadInputError(f"FreeU needs a UNet decoder; {type(denoiser).__name__} has none")
        self.settings = settings
        top = max(denoiser.config.block_out_channels)
        factors = {top: (settings.b1, settings.s1), top // 2: (settings.b2, settings.s2)}
        self.plan: list[tuple[nn.Module, int, float, float]] = []  # (resnet, h channels, b, s)
        self.stored: dict[str, tuple[int, float]] = {}  # producer layer -> (h channels, b)
        prev = denoiser.config.block_out_channels[-1]  # the mid block's output
        for i, block in enumerate(denoiser.up_blocks):
            for j, resnet in enumerate(block.resnets):
                h_ch = prev if j == 0 else block.resnets[j - 1].out_channels
                if h_ch in factors:
                    b, s = factors[h_ch]
                    self.plan.append((resnet, h_ch, b, s))
                    self.stored.update({name: (h_ch, b) for name in _producers(i, j, block)})
            prev = block.resnets[-1].out_channels

    def _hook(self, h_ch: int, b: float, s: float):  # type: ignore[no-untyped-def]
        def pre(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            h, skip = x[:, :h_ch], x[:, h_ch:]
            h = torch.cat([h[:, :h_ch // 2] * b, h[:, h_ch // 2:]], dim=1)
            return (torch.cat([h, fourier_filter(skip, 1, s)], dim=1), *args[1:])

        return pre

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """FreeU on for the duration of the block (hooks removed afterwards)."""
        handles = [r.register_forward_pre_hook(self._hook(h_ch, b, s)) for r, h_ch, b, s in self.plan]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def scale_stored(self, captured: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fork's in-place ``h[:, :C/2] *= b`` on stored features, applied to captured maps."""
        out = dict(captured)
        for name, f in captured.items():
            if name in self.stored and f.dim() == 4:
                h_ch, b = self.stored[name]
                out[name] = torch.cat([f[:, :h_ch // 2] * b, f[:, h_ch // 2:]], dim=1)
        return out
