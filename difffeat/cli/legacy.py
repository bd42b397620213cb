"""TRANSITIONAL: the old shared-option helpers, until every task command is on the schema."""
from __future__ import annotations

from typing import Any, Callable

import click

from ..errors import BadInputError


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every extracting command shares (-m, -l, -t, -e, ...)."""
    opts = [
        click.option("-m", "--model", default=None, help="Model or method preset, local diffusers folder, hub id or .safetensors file (default: difffeat-tiny)."),
        click.option("--weights", default=None, help="A single-file .safetensors checkpoint loaded with -m's configs (e.g. -m sd15 --weights v1-5-pruned-emaonly.safetensors)."),
        click.option("-l", "--layer", "layers", multiple=True, help="Layer name (repeatable); see `difffeat layers MODEL`."),
        click.option("-t", "--timestep", "timesteps", multiple=True, type=int, help="Timestep (repeatable)."),
        click.option("-e", "--ensemble", type=int, default=None, help="Noise draws averaged per image."),
        click.option("--prompt", default=None, help="Prompt for text-conditioned models (default: empty)."),
        click.option("--noise", type=click.Choice(["random", "fixed", "clean"]), default=None),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--resolution", type=int, default=None, help="Input size (default: the model's)."),
        click.option("--resize", type=click.Choice(["resize", "pad", "crop", "snap"]), default=None),
        click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="Default: bf16 on CUDA, fp32 on CPU."),
        click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)."),
        click.option("--max-batch", type=int, default=16, show_default=True, help="Denoiser rows per call."),
        click.option("--compile", "compile_", is_flag=True, help="torch.compile the denoiser's blocks."),
        click.option("--denoiser-weights", default=None,
                     help="Replace the denoiser's weights: a diffusers-format state dict, FILE.safetensors or REPO:FILE "
                     "(CleanDIFT: -m sd15 --denoiser-weights CompVis/cleandift:cleandift_sd15_unet.safetensors)."),
        click.option("--adaln/--no-adaln", default=None, help="DiTF: AdaLN-modulated block features (FLUX, SD3 block.K)."),
        click.option("--discard-channels", default=None,
                     help="DiTF: comma-separated massive-activation channels zeroed before the AdaLN norm ('none': none)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def model_with_weights(model: str | None, weights: str | None) -> str | None:
    """``-m PRESET --weights FILE``: the model name that loads FILE with PRESET's configs."""
    if not weights:
        return model
    from ..checkpoints import single_file
    from ..registry import MODELS, is_feature_model

    if is_feature_model(MODELS.get(model)):  # timm loads the file itself
        import os

        os.environ["DIFFFEAT_DINOV2_WEIGHTS"] = weights
        return model
    return single_file(weights, model)


def postprocess_options(adaln: bool | None = None, discard_channels: str | None = None,
                        denoiser_weights: str | None = None, **_: Any) -> dict[str, Any]:
    """The shared options beyond layer/timestep/ensemble (DiTF's post-processing, CleanDIFT's
    weights), as ``create`` keywords."""
    channels = None
    if discard_channels is not None:
        text = discard_channels.strip().lower()
        try:
            channels = [] if text in ("", "none") else [int(c) for c in text.split(",")]
        except ValueError:
            raise BadInputError(f"--discard-channels takes comma-separated integers, got {discard_channels!r}") from None
    return {"adaln": adaln, "discard_channels": channels, "denoiser_weights": denoiser_weights}


def extractor_from_options(model: str | None, layers: tuple[str, ...], timesteps: tuple[int, ...], ensemble: int | None,
                           prompt: str | None, noise: str | None, seed: int, resolution: int | None, resize: str | None,
                           dtype: str | None, device: str | None, max_batch: int, compile_: bool,
                           weights: str | None = None, **rest: Any) -> Any:
    """Build the extractor the shared options describe (on this rank's GPU under torchrun:
    every loader resolves devices through :func:`difffeat.distributed.resolve_device`)."""
    from ..factory import create

    model = model_with_weights(model, weights)
    return create(model, layers=list(layers) or None, timesteps=list(timesteps) or None, ensemble=ensemble, prompt=prompt,
                  noise=noise, seed=seed, resolution=resolution, resize=resize, dtype=dtype, device=device,
                  max_batch=max_batch, compile=compile_, **postprocess_options(**rest))
