"""Swap a pipeline's denoiser weights for a diffusers-format state dict (CleanDIFT and friends).

CleanDIFT (Stracke et al., "CleanDIFT: Diffusion Features without Noise", CVPR 2025;
github.com/CompVis/cleandift) publishes fine-tuned UNets as diffusers-format state dicts
(hub repo ``CompVis/cleandift``, e.g. ``cleandift_sd15_unet.safetensors``): its README loads them
with ``unet.load_state_dict(load_file(path), strict=True)`` into the base pipeline's UNet. Here
``load_backbone(..., denoiser_weights="CompVis/cleandift:cleandift_sd15_unet.safetensors")`` (CLI
``--denoiser-weights``) does the same, strictly: safetensors only, every key and shape must
match, else one line says what does not fit.
"""
from __future__ import annotations

import os

from torch import nn

from .errors import BadInputError, UnsafeCheckpointError, WeightsNotFoundError


def resolve_weights(spec: str) -> str:
    """``FILE`` (a local .safetensors) or ``REPO:FILE`` (a file of a hub repo, through the HF cache,
    honouring ``HF_HUB_OFFLINE``/``HF_HOME``) -> a local path."""
    if os.path.exists(spec):
        path = spec
    elif ":" in spec and spec.count("/") >= 1 and not spec.startswith((".", "/")):
        repo, filename = spec.split(":", 1)
        if not filename.endswith(".safetensors"):
            raise UnsafeCheckpointError(f"denoiser weights must be .safetensors, got {filename!r}")
        from huggingface_hub import hf_hub_download

        from .hub import cache_dir

        try:
            path = hf_hub_download(repo, filename, cache_dir=str(cache_dir()))
        except Exception as e:  # offline and not cached, no such repo/file, gated ...
            raise WeightsNotFoundError(f"denoiser weights {spec} not available ({type(e).__name__}); download it with "
                                       f"`hf download {repo} {filename}` where there is network") from None
    else:
        raise WeightsNotFoundError(f"denoiser weights file not found: {spec} (give FILE.safetensors or REPO:FILE)")
    if not path.endswith(".safetensors"):
        raise UnsafeCheckpointError(f"denoiser weights must be .safetensors (never unpickled), got {path}")
    return path


def swap_denoiser_weights(denoiser: nn.Module, spec: str) -> str:
    """Load the state dict ``spec`` into ``denoiser`` (strict: same keys, same shapes); returns the path."""
    from safetensors.torch import load_file

    path = resolve_weights(spec)
    state = load_file(path)
    own = denoiser.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        what = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
                (f"{len(shapes)} of other shape (e.g. {shapes[0]}: {list(state[shapes[0]].shape)} vs "
                 f"{list(own[shapes[0]].shape)})") if shapes else ""]
        raise BadInputError(f"denoiser weights {os.path.basename(path)} do not fit this {type(denoiser).__name__}: "
                            + ", ".join(w for w in what if w) + " keys")
    denoiser.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return path


__all__ = ["resolve_weights", "swap_denoiser_weights"]
