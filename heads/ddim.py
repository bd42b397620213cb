"""Deterministic DDIM inversion (x_0 -> x_T) and reconstruction (x_T -> x_0).

DDIM with eta = 0 (Song, Meng & Ermon, ICLR 2021) turns a diffusion model into an ODE;
running it backwards ("inversion") maps an image to a noise latent, and running it
forwards again reconstructs the image. DIRE (Wang et al., ICCV 2023) measures how well
that round trip reproduces an image.

Schedule. ``steps`` timesteps t_0 < ... < t_{n-1} with levels ᾱ_i = ᾱ(t_i). Spacing
``leading`` (default) is guided-diffusion's ``ddimN`` respacing, which DIRE used: the
smallest integer stride from 0 that gives exactly N timesteps, so ``ddim20`` on a
1000-step model gives 0, 50, ..., 950 and ``ddim3`` 0, 334, 668 (diffusers' "leading"
takes stride T // N, the same whenever N divides T; the deepest timestep moves with N). ``linspace`` spreads the steps over [0, T-1], so
every step count inverts to the same depth (use it to compare step counts).

One step from noise level ᾱ_a to ᾱ_b with a noise estimate ε::

    x̂_0 = (x - sqrt(1-ᾱ_a) ε) / sqrt(ᾱ_a)          (clip_x0: clamped to [-1, 1])
    x'  = sqrt(ᾱ_b) x̂_0 + sqrt(1-ᾱ_b) ε

Reconstruction step i (ᾱ_i -> ᾱ_{i-1}, and ᾱ_{-1} = 1) uses ε(x_i, t_i) in both pairings.
Inversion comes in two pairings of ε with the step:

* ``guided-diffusion`` (default; DIRE's ``compute_dire.py``, i.e. guided-diffusion's
  ``GaussianDiffusion.ddim_reverse_sample``): the clean image is taken as the t_0 level
  (ᾱ_0 = ᾱ(0) < 1); step i evaluates ε at the *current* (x_i, t_i) and moves ᾱ_i ->
  ᾱ_{i+1}, the last step to ``alphas_cumprod_next``'s final 0.0, so x_T is the noise
  estimate itself. Both directions re-derive ε from the (clipped) x̂_0,
  ε = (x - sqrt(ᾱ) x̂_0) / sqrt(1-ᾱ), as ``ddim_sample``/``ddim_reverse_sample`` do.
* ``diffusers`` (diffusers' ``DDIMInverseScheduler``/``DDIMScheduler``): the clean end is
  ᾱ = 1; step i moves ᾱ_{i-1} -> ᾱ_i with ε(x_{i-1}, t_i), the denoiser at the *target*
  timestep, and the clipped x̂_0 is not fed back into ε. Both directions then query the
  denoiser at the same timesteps, so the round trip is exact whenever ε does not depend
  on x. A deviation from DIRE's code: its maps differ by a few grey levels.

Model outputs are converted to ε: v-prediction ε = sqrt(ᾱ)·v + sqrt(1-ᾱ)·x_t, sample
prediction ε = (x_t - sqrt(ᾱ)·x̂_0)/sqrt(1-ᾱ). Flow-matching models (SD3) have no DDIM
ODE in this parametrisation and are refused with one line.
"""
from __future__ import annotations

from typing import Sequence

import torch

from difffeat.backbone import Conditioning, DiffusionBackbone
from difffeat.errors import BadInputError, DiffFeatError


SPACINGS = ("leading", "linspace")
PAIRINGS = ("guided-diffusion", "diffusers")


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """The ``steps`` DDIM timesteps, ascending (``leading``: guided-diffusion's ``ddimN``; ``linspace``: 0 .. T-1)."""
    if not 1 <= int(steps) <= num_train_timesteps:
        raise BadInputError(f"DDIM steps must be in [1, {num_train_timesteps}], got {steps}")
    n, T = int(steps), int(num_train_timesteps)
    if spacing == "leading":  # respace.space_timesteps(T, "ddimN"): the smallest stride giving exactly N steps
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise BadInputError(f"no integer stride gives exactly {n} of {T} timesteps (guided-diffusion's ddim{n}); "
                            "use spacing linspace")
    if spacing == "linspace":
        return [round(i * (T - 1) / max(n - 1, 1)) for i in range(n)] if n > 1 else [T - 1]
    raise BadInputError(f"unknown DDIM spacing {spacing!r}; valid: {', '.join(SPACINGS)}")


def check_ddim_support(bb: DiffusionBackbone) -> None:
    """Raise one line if the backbone's parametrisation has no DDIM inversion here."""
    if bb.prediction_type == "flow":
        raise DiffFeatError(
            f"{bb.name} is a flow-matching model; DDIM inversion/DIRE needs an epsilon-, v- or "
            "sample-prediction diffusion model (e.g. ADM, SD 1.x/2.x)"
        )
    if bb.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise DiffFeatError(f"{bb.name}: unsupported prediction type {bb.prediction_type!r} for DDIM")


def to_eps(bb: DiffusionBackbone, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoiser output ``out`` at ``(x_t, t)`` as a noise estimate ε (fp32)."""
    out, x = out.float(), x_t.float()
    if bb.prediction_type == "epsilon":
        return out
    a = bb.alphas_cumprod.to(x.device)[t.to(x.device).long()].view(-1, *([1] * (x.dim() - 1)))
    if bb.prediction_type == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x
    if bb.prediction_type == "sample":
        return (x - a.sqrt() * out) / (1 - a).sqrt().clamp_min(1e-8)
    check_ddim_support(bb)
    raise AssertionError("unreachable")


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor, clip_x0: bool = False,
              rederive: bool = False) -> torch.Tensor:
    """Move ``x`` from noise level ᾱ=``a_from`` to ᾱ=``a_to`` along the DDIM ODE with noise ``eps``.

    ``rederive``: recompute ε from the (clipped) x̂_0, as guided-diffusion does. The
    x̂_0's coefficients sqrt(1/ᾱ), sqrt(1/ᾱ - 1) are formed in float64 and applied in fp32,
    the target's sqrt(ᾱ), sqrt(1-ᾱ) in fp32, operation for operation as guided-diffusion
    (its float64 tables cast by ``_extract_into_tensor``).
    """
    a_from, a_to = (torch.as_tensor(a, dtype=torch.float64, device=x.device) for a in (a_from, a_to))
    c1, c2 = (1 / a_from).sqrt().float(), (1 / a_from - 1).sqrt().float()
    x0 = c1 * x - c2 * eps
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    if rederive:
        eps = (c1 * x - x0) / c2
    a_to = a_to.float()
    return x0 * a_to.sqrt() + (1 - a_to).sqrt() * eps


def check_pairing(pairing: str) -> None:
    if pairing not in PAIRINGS:
        raise BadInputError(f"unknown DDIM pairing {pairing!r}; valid: {', '.join(PAIRINGS)}")


def _eps(bb: DiffusionBackbone, x: torch.Tensor, t: int, cond: Conditioning, max_batch: int) -> torch.Tensor:
    """ε(x, t) for a batch, in chunks of ``max_batch`` rows, fp32."""
    outs = []
    for r0 in range(0, x.shape[0], max_batch):
        xs = x[r0 : r0 + max_batch]
        tt = torch.full((xs.shape[0],), int(t), device=bb.device, dtype=torch.long)
        out = bb.predict(xs.to(bb.device, bb.dtype), tt, cond.select(slice(r0, r0 + xs.shape[0])))
        outs.append(to_eps(bb, out, xs, tt))
    return torch.cat(outs)


def _levels(bb: DiffusionBackbone, steps: int, spacing: str, device: torch.device) -> tuple[list[int], list[torch.Tensor]]:
    ts = ddim_timesteps(bb.num_train_timesteps, steps, spacing)
    betas = getattr(bb.scheduler, "betas", None)  # ᾱ in float64, as guided-diffusion (fp32 ᾱ(0) = 0.9999 is coarse)
    ac = torch.cumprod(1 - betas.double(), 0) if betas is not None else bb.alphas_cumprod.double()
    ac = ac.to(device)
    return ts, [ac[t] for t in ts]


def _start(bb: DiffusionBackbone, x: torch.Tensor, steps: int, cond: Conditioning | None, spacing: str,
           pairing: str) -> tuple[torch.Tensor, Conditioning, list[int], list[torch.Tensor]]:
    """What inversion and sampling both begin with: checks, conditioning, the levels, fp32 input."""
    check_ddim_support(bb)
    check_pairing(pairing)
    cond = cond if cond is not None else default_conditioning(bb, x)
    ts, a = _levels(bb, steps, spacing, bb.device)
    return x.to(bb.device, torch.float32), cond, ts, a


@torch.no_grad()
def ddim_invert(
    bb: DiffusionBackbone,
    x0: torch.Tensor,
    steps: int,
    cond: Conditioning | None = None,
    clip_x0: bool = False,
    max_batch: int = 16,
    spacing: str = "leading",
    pairing: str = "guided-diffusion",
) -> torch.Tensor:
    """Invert clean model inputs ``x0`` (pixels in [-1,1] or scaled latents) to x_T (fp32).

    ``cond``: the denoiser conditioning for the batch (default: unconditional / empty
    prompt / null class). Batched over images in chunks of ``max_batch``. ``pairing``:
    which ε each step uses (module docstring). ``steps`` denoiser calls per image.
    """
    x, cond, ts, a = _start(bb, x0, steps, cond, spacing, pairing)
    zero, one = torch.zeros((), device=bb.device, dtype=torch.float64), torch.ones((), device=bb.device, dtype=torch.float64)
    for i, t in enumerate(ts):
        if pairing == "guided-diffusion":  # ε(x_i, t_i), ᾱ_i -> alphas_cumprod_next[i]
            a_next = a[i + 1] if i + 1 < len(ts) else zero
            x = ddim_step(x, _eps(bb, x, t, cond, max_batch), a[i], a_next, clip_x0, rederive=True)
        else:  # ε(x_{i-1}, t_i), ᾱ_{i-1} -> ᾱ_i
            x = ddim_step(x, _eps(bb, x, t, cond, max_batch), a[i - 1] if i else one, a[i], clip_x0)
    return x


@torch.no_grad()
def ddim_reconstruct(
    bb: DiffusionBackbone,
    xT: torch.Tensor,
    steps: int,
    cond: Conditioning | None = None,
    clip_x0: bool = False,
    max_batch: int = 16,
    spacing: str = "leading",
    pairing: str = "guided-diffusion",
) -> torch.Tensor:
    """Run the DDIM sampler (eta = 0) from ``xT`` at the last of ``steps`` timesteps to x_0 (fp32).

    ``guided-diffusion`` re-derives ε from the clipped x̂_0 (``ddim_sample``); ``diffusers``
    does not (``DDIMScheduler`` with ``use_clipped_model_output=False``).
    """
    x, cond, ts, a = _start(bb, xT, steps, cond, spacing, pairing)
    for i in range(len(ts) - 1, -1, -1):
        a_prev = a[i - 1] if i > 0 else torch.ones((), device=bb.device, dtype=torch.float64)
        x = ddim_step(x, _eps(bb, x, ts[i], cond, max_batch), a[i], a_prev, clip_x0, pairing == "guided-diffusion")
    return x


def invert_and_reconstruct(
    bb: DiffusionBackbone,
    x0: torch.Tensor,
    steps: int,
    cond: Conditioning | None = None,
    clip_x0: bool = False,
    max_batch: int = 16,
    spacing: str = "leading",
    pairing: str = "guided-diffusion",
) -> torch.Tensor:
    """``ddim_reconstruct(ddim_invert(x0))`` with the same schedule, conditioning and pairing."""
    xT = ddim_invert(bb, x0, steps, cond, clip_x0, max_batch, spacing, pairing)
    return ddim_reconstruct(bb, xT, steps, cond, clip_x0, max_batch, spacing, pairing)


def _image_size(bb: DiffusionBackbone, x: torch.Tensor) -> tuple[int, int]:
    return (int(x.shape[-2]) * bb.latent_scale, int(x.shape[-1]) * bb.latent_scale)


def default_conditioning(bb: DiffusionBackbone, x: torch.Tensor, prompt: str = "") -> Conditioning:
    """Unconditional: the empty prompt for text models, the null class for class-conditional ones."""
    return bb.conditioning(prompts=prompt, batch=int(x.shape[0]), image_size=_image_size(bb, x))


def forward_flops(bb: DiffusionBackbone, shape: Sequence[int]) -> int:
    """FLOPs of one denoiser forward on a batch of ``shape`` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(*shape, device=bb.device, dtype=bb.dtype)
    cond = bb.dummy_conditioning(int(shape[0]), _image_size(bb, x))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        bb.predict(x, torch.zeros(int(shape[0]), dtype=torch.long, device=bb.device), cond)
    return int(fc.get_total_flops())


__all__ = [
    "check_ddim_support", "check_pairing", "ddim_invert", "default_conditioning", "ddim_reconstruct", "ddim_step", "ddim_timesteps",
    "forward_flops", "invert_and_reconstruct", "to_eps", "PAIRINGS", "SPACINGS",
]
