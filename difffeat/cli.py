"""The ``difffeat`` command line.

Core commands live here (``models``, ``layers``, ``extract``); every module in
``difffeat.tasks`` adds its own commands to the groups defined below (``cli``, ``train``,
``eval_group``, ``sweep``), and :func:`main` imports them all.

Every user error becomes one line ``error: ...`` on stderr and a non-zero exit.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import DiffFeatError


class _Group(click.Group):
    """A click group that turns DiffFeatError (and CUDA OOM) into one line + exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DiffFeatError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; finished outputs are kept, rerun to resume", err=True)
            ctx.exit(130)
        except RuntimeError as e:  # out of GPU memory outside a folder run's batches (which retry)
            import torch

            if not isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            click.echo("error: out of GPU memory: lower -b/--batch-size, --max-batch or --resolution, "
                       "or use --dtype bf16", err=True)
            ctx.exit(3)
        except OSError as e:  # a disk that fills up or turns read-only during a run
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}; finished outputs are kept, rerun to resume", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="difffeat")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, envvar="DIFFFEAT_MAX_PIXELS",
              help="Refuse images whose header claims more pixels (default: PIL's bomb limit, ~179M).")
def cli(max_pixels: int | None) -> None:
    """Discriminative perception with diffusion features."""
    from .io import set_max_pixels

    set_max_pixels(max_pixels)


@cli.group("train", cls=_Group)
def train() -> None:
    """Train heads on frozen features."""


@cli.group("eval", cls=_Group)
def eval_group() -> None:
    """Evaluate predictions against ground truth."""


@cli.group("sweep", cls=_Group)
def sweep() -> None:
    """Sweep layers and timesteps."""


# ---------------------------------------------------------------- shared options
def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options every extracting command shares (-m, -l, -t, -e, ...)."""
    opts = [
        click.option("-m", "--model", default=None, help="Model or method preset, local diffusers folder or hub id (default: difffeat-tiny)."),
        click.option("-l", "--layer", "layers", multiple=True, help="Layer name (repeatable); see `difffeat layers MODEL`."),
        click.option("-t", "--timestep", "timesteps", multiple=True, type=int, help="Timestep (repeatable)."),
        click.option("-e", "--ensemble", type=int, default=None, help="Noise draws averaged per image."),
        click.option("--prompt", default=None, help="Prompt for text-conditioned models (default: empty)."),
        click.option("--noise", type=click.Choice(["random", "fixed", "clean"]), default=None),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--resolution", type=int, default=None, help="Input size (default: the model's)."),
        click.option("--resize", type=click.Choice(["resize", "pad", "snap"]), default=None),
        click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="Default: bf16 on CUDA, fp32 on CPU."),
        click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)."),
        click.option("--max-batch", type=int, default=16, show_default=True, help="Denoiser rows per call."),
        click.option("--compile", "compile_", is_flag=True, help="torch.compile the denoiser's blocks."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def extractor_from_options(model: str | None, layers: tuple[str, ...], timesteps: tuple[int, ...], ensemble: int | None,
                           prompt: str | None, noise: str | None, seed: int, resolution: int | None, resize: str | None,
                           dtype: str | None, device: str | None, max_batch: int, compile_: bool, **_: Any) -> Any:
    """Build the extractor the shared options describe (on this rank's GPU under torchrun:
    every loader resolves devices through :func:`difffeat.distributed.resolve_device`)."""
    from .factory import create

    return create(model, layers=list(layers) or None, timesteps=list(timesteps) or None, ensemble=ensemble, prompt=prompt,
                  noise=noise, seed=seed, resolution=resolution, resize=resize, dtype=dtype, device=device,
                  max_batch=max_batch, compile=compile_)


# ---------------------------------------------------------------- core commands
@cli.command("models")
def models_cmd() -> None:
    """List model presets and method presets."""
    from .registry import MODELS, method_presets, task_configs

    click.echo("models:")
    for name, p in sorted(MODELS.items()):
        click.echo(f"  {name:<16} {p.family:<7} {p.resolution:>5}px  layers={','.join(p.layers)} t={','.join(map(str, p.timesteps))}  {p.hub_id}")
    click.echo("method presets (difffeat.create / --preset):")
    for name, p in sorted(method_presets().items()):
        click.echo(f"  {name:<16} task={p.task:<11} {p.citation[:70]}")
    click.echo("task configs (--preset of detect, --config of train):")
    for path, data in task_configs():
        click.echo(f"  {data.get('name', path.stem):<16} task={str(data.get('task', '')):<11} {path.parent.name}/{path.name}")


@cli.command("layers")
@click.argument("model", required=False)
@click.option("--random-weights", is_flag=True, help="Build from the config only (no weights needed).")
@click.option("--device", default="cpu", show_default=True)
def layers_cmd(model: str | None, random_weights: bool, device: str) -> None:
    """List a model's layers with channels and stride (input pixels per feature cell)."""
    from .backbone import load_backbone
    from .extractor import probe_layers
    from .registry import DEFAULT_MODEL, resolve

    _, preset = resolve(model or DEFAULT_MODEL)
    if preset is not None and preset.family == "dinov2":
        from .dino import DinoExtractor

        depth = int(preset.layers[0].split(".")[1]) + 1
        for i in range(depth):
            click.echo(f"block.{i}")
        return
    bb = load_backbone(model or DEFAULT_MODEL, dtype="fp32", device=device, random_weights=random_weights)
    info = probe_layers(bb)
    click.echo(f"{'layer':<16} {'channels':>8} {'stride':>6}")
    for name, (_, (c, s)) in sorted(info.items(), key=lambda kv: kv[1][0]):
        click.echo(f"{name:<16} {c:>8} {s:>6}")


@cli.command("extract")
@click.argument("images", type=click.Path(path_type=Path))
@model_options
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("-b", "--batch-size", type=int, default=4, show_default=True, help="Images per batch.")
@click.option("--latent", type=click.Choice(["mean", "sample"]), default=None, help="VAE posterior mean or a draw per member.")
@click.option("--save-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--viz", "viz_layer", default=None, help="Also write a PCA->RGB PNG of this output key.")
@click.option("--overwrite", is_flag=True, help="Recompute outputs that already exist.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Write N images per safetensors shard (+ JSONL index) instead of one file per image.")
def extract_cmd(images: Path, out_dir: Path, batch_size: int, latent: str | None, save_dtype: str,
                viz_layer: str | None, overwrite: bool, shard_size: int | None, **opts: Any) -> None:
    """Extract features of every image under IMAGES into one safetensors file per image.

    Under torchrun / accelerate launch every rank takes its share of the images on its own
    GPU; the outputs are byte-identical to a one-process run (docs/scaling.md).
    """
    from .pipeline import extract_folder

    if shard_size is not None and viz_layer is not None:
        raise click.UsageError("--viz writes one PNG per image and cannot be combined with --shard-size")
    ex = extractor_from_options(**opts)
    if latent is not None and hasattr(ex, "latent"):
        ex.latent = latent
    if shard_size is not None:
        from .shards import extract_folder_sharded

        extract_folder_sharded(ex, images, out_dir, shard_size=shard_size, batch_size=batch_size,
                               save_dtype=save_dtype, overwrite=overwrite)
        return
    extract_folder(ex, images, out_dir, batch_size=batch_size, save_dtype=save_dtype, viz_key=viz_layer, overwrite=overwrite)


# ---------------------------------------------------------------- entry point
def load_task_commands() -> None:
    """Import every module of difffeat.tasks so its commands register on the groups above."""
    import difffeat.tasks as tasks

    for mod in pkgutil.iter_modules(tasks.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"difffeat.tasks.{mod.name}")


def main(argv: list[str] | None = None) -> None:
    load_task_commands()
    cli.main(args=argv, prog_name="difffeat")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
