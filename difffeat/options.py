"""The one options schema: dataclasses whose fields say their command-line flag.

Every option a user can set lives once, as a field of a dataclass here (shared options) or in
the task module that uses it (task options), with its default, its help and its flags in the
field's metadata. The task functions take these dataclasses; the CLI
(:mod:`difffeat.cli.schema`) turns them into click options, so a flag has the same name,
default and help in every command that offers it. This module imports no click.

    @dataclass
    class MyOptions:
        topk: int = option(5, "Classes listed in the topk column.")

The idea is diffusers' ``ConfigMixin``: the options object is plain data a task can store
(``dataclasses.asdict``) and rebuild.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import BadInputError

_CLI = "difffeat.cli"


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line (read by :mod:`difffeat.cli.schema`)."""

    help: str
    flags: tuple[str, ...] = ()  # default: --field-name
    choices: tuple[str, ...] | None = None
    type: Any = None  # the element type for multiple; default: from the default value
    multiple: bool = False
    is_flag: bool = False  # a boolean switch (--x); bool fields with a None default become --x/--no-x
    secondary: str | None = None  # --x/--no-x: the off switch
    required: bool = False
    hidden: bool = False
    envvar: str | None = None
    min: int | None = None
    path: bool = False  # a filesystem path (pathlib.Path)
    show_default: bool = True


def option(default: Any, help: str, *flags: str, **how: Any) -> Any:
    """A dataclass field with its flag: ``option(DEFAULT, HELP, "-x", "--long", choices=...)``.

    Mutable defaults (lists) are given as tuples; ``multiple=True`` fields default to ``()``.
    """
    spec = Flag(help=help, flags=tuple(flags), **how)
    return field(default=default, metadata={_CLI: spec})


def flag_of(f: dataclasses.Field) -> Flag | None:
    """The :class:`Flag` of a dataclass field (None: not on the command line)."""
    return f.metadata.get(_CLI)


def cli_fields(cls: type, exclude: Sequence[str] = ()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a flag, in declaration order, minus ``exclude``."""
    unknown = set(exclude) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    return [f for f in dataclasses.fields(cls) if flag_of(f) is not None and f.name not in exclude]


def replace(opts: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that ignores ``None`` values (an unset override keeps the field)."""
    return dataclasses.replace(opts, **{k: v for k, v in changes.items() if v is not None})


# ---------------------------------------------------------------- shared options
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class ExtractorOptions:
    """What every extracting command shares: the arguments of :func:`difffeat.create`.

    ``None`` means "the preset's, else the model's default" (:func:`difffeat.presets.precedence`).
    """

    model: str | None = option(None, "Model or method preset, local diffusers folder, hub id or .safetensors file "
                               "(default: the preset's, else difffeat-tiny).", "-m", "--model")
    weights: str | None = option(None, "A single-file .safetensors checkpoint loaded with -m's configs "
                                 "(e.g. -m sd15 --weights v1-5-pruned-emaonly.safetensors).")
    layers: tuple[str, ...] = option((), "Layer name (repeatable); see `difffeat layers MODEL`.", "-l", "--layer",
                                     multiple=True, type=str)
    timesteps: tuple[int, ...] = option((), "Timestep (repeatable).", "-t", "--timestep", multiple=True, type=int)
    ensemble: int | None = option(None, "Noise draws averaged per image.", "-e", "--ensemble", type=int, min=1)
    prompt: str | None = option(None, "Prompt for text-conditioned models (default: empty).")
    noise: str | None = option(None, "Noise per member: random draws, one fixed draw, or none (clean).",
                               choices=("random", "fixed", "clean"))
    seed: int = option(0, "Seed of the noise and of anything else drawn at random.")
    resolution: int | None = option(None, "Input size (default: the preset's / model's).", type=int, min=1)
    resize: str | None = option(None, "How images meet the resolution.", choices=("resize", "pad", "crop", "snap"))
    dtype: str | None = option(None, "Default: bf16 on CUDA, fp32 on CPU.", choices=DTYPES)
    device: str | None = option(None, "cuda, cuda:1, cpu (default: cuda if available; cuda:LOCAL_RANK under torchrun).")
    max_batch: int = option(16, "Denoiser rows per call.", min=1)
    compile: bool = option(False, "torch.compile the denoiser.", is_flag=True)
    denoiser_weights: str | None = option(
        None, "Replace the denoiser's weights: a diffusers-format state dict, FILE.safetensors or REPO:FILE "
        "(CleanDIFT: -m sd15 --denoiser-weights CompVis/cleandift:cleandift_sd15_unet.safetensors).")
    adaln: bool | None = option(None, "DiTF: AdaLN-modulated block features (FLUX, SD3 block.K).", secondary="--no-adaln")
    discard_channels: str | None = option(
        None, "DiTF: comma-separated massive-activation channels zeroed before the AdaLN norm ('none': none).")

    def model_name(self) -> str | None:
        """``-m PRESET --weights FILE``: the model name that loads FILE with PRESET's configs."""
        if not self.weights:
            return self.model
        from .checkpoints import single_file
        from .registry import MODELS, is_feature_model

        if is_feature_model(MODELS.get(self.model)):  # timm loads the file itself
            import os

            os.environ["DIFFFEAT_DINOV2_WEIGHTS"] = self.weights
            return self.model
        return single_file(self.weights, self.model)

    def channels(self) -> list[int] | None:
        """``--discard-channels`` parsed ('none' or '' is the empty list)."""
        if self.discard_channels is None:
            return None
        text = self.discard_channels.strip().lower()
        try:
            return [] if text in ("", "none") else [int(c) for c in text.split(",")]
        except ValueError:
            raise BadInputError(f"--discard-channels takes comma-separated integers, got {self.discard_channels!r}") from None

    def create_kwargs(self) -> dict[str, Any]:
        """These options as :func:`difffeat.create` keywords (the model name as ``name``)."""
        return dict(name=self.model_name(), layers=list(self.layers) or None, timesteps=list(self.timesteps) or None,
                    ensemble=self.ensemble, prompt=self.prompt, noise=self.noise, seed=self.seed,
                    resolution=self.resolution, resize=self.resize, dtype=self.dtype, device=self.device,
                    max_batch=self.max_batch, compile=self.compile, adaln=self.adaln,
                    discard_channels=self.channels(), denoiser_weights=self.denoiser_weights)

    def create(self, **overrides: Any) -> Any:
        """Build the extractor these options describe (on this rank's GPU under torchrun: every
        loader resolves devices through :func:`difffeat.distributed.resolve_device`)."""
        from .factory import create

        return create(**{**self.create_kwargs(), **overrides})


@dataclass
class FolderOptions:
    """What every folder run shares (:mod:`difffeat.runner`)."""

    batch_size: int = option(4, "Images per batch.", "-b", "--batch-size", min=1)
    overwrite: bool = option(False, "Replace outputs that already exist (without it they are kept: a rerun resumes).", is_flag=True)
