"""The ``difffeat`` command line.

Core commands live here (``models``, ``layers``, ``extract``, ``download``, ``convert``). The
task modules in ``difffeat.tasks`` define plain click commands; :func:`register_commands` is
the one place that adds them to the groups below (``cli``, ``train``, ``eval``, ``sweep``), so
``difffeat``, ``python -m difffeat`` and ``python -m difffeat.cli`` see the same commands
(a module run as ``__main__`` is a second copy: nothing registers on it by import).

Every user error becomes one line ``error: ...`` on stderr and a non-zero exit.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import BadInputError, DiffFeatError


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
    from .checkpoints import single_file
    from .registry import MODELS, is_feature_model

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
    from .factory import create

    model = model_with_weights(model, weights)
    return create(model, layers=list(layers) or None, timesteps=list(timesteps) or None, ensemble=ensemble, prompt=prompt,
                  noise=noise, seed=seed, resolution=resolution, resize=resize, dtype=dtype, device=device,
                  max_batch=max_batch, compile=compile_, **postprocess_options(**rest))


# ---------------------------------------------------------------- core commands
@cli.command("models")
@click.option("--check-cache/--no-check-cache", default=True, show_default=True,
              help="Look each model up in the local HF cache (no network either way).")
def models_cmd(check_cache: bool) -> None:
    """List model presets (source, local cache, licence, gating, size) and method presets."""
    from .registry import MODELS, WEIGHT_SOURCES, method_presets, task_configs

    click.echo("models:")
    for name, p in sorted(MODELS.items()):
        click.echo(f"  {name:<16} {p.family:<7} {p.resolution:>5}px  layers={','.join(p.layers)} t={','.join(map(str, p.timesteps))}")
        click.echo(f"  {'':<16} {_source_line(p, check_cache)}")
    click.echo("weight sources (parts loaded by method presets):")
    for name, p in sorted(WEIGHT_SOURCES.items()):
        click.echo(f"  {name:<16} {','.join(p.components):<7} {_source_line(p, check_cache)}")
    from .registry import ADM_NOTE

    click.echo(f"  {'adm (DIRE)':<16} {ADM_NOTE}")
    click.echo("method presets (difffeat.create / --preset):")
    for name, p in sorted(method_presets().items()):
        click.echo(f"  {name:<16} task={p.task:<11} {p.citation[:70]}")
    click.echo("task configs (--preset of detect, --config of train):")
    for path, data in task_configs():
        click.echo(f"  {data.get('name', path.stem):<16} task={str(data.get('task', '')):<11} {path.parent.name}/{path.name}")


def _source_line(p: Any, check_cache: bool) -> str:
    """``source [cached|not cached] licence, gated, size``: where the preset's weights come from."""
    import os

    from .hub import cached_snapshot, spec_for

    if os.path.isdir(p.hub_id):
        return f"embedded ({p.hub_id})"
    spec = spec_for(p.name) if p.family != "autoencoder" else spec_for(p.hub_id)
    where = ""
    if check_cache:
        hit = next((rid for rid in spec.cache_order if cached_snapshot(rid, spec.kind) is not None), None)
        where = f" [cached: {hit}]" if hit else " [not cached]"
    via = f" (then {', '.join(spec.candidates[1:])})" if spec.candidates[1:] else ""
    old = f" (was {', '.join(p.aliases)})" if p.aliases else ""
    gate = "GATED (accept the licence on the hub)" if p.gated else "not gated"
    return f"{spec.candidates[0]}{via}{old}{where}  {p.license or '?'}, {gate}, {p.size or '?'}"


@cli.command("layers")
@click.argument("model", required=False)
@click.option("--random-weights", is_flag=True,
              help="Build from the config only, on the meta device (no weights, no memory: any model size).")
@click.option("--device", default="cpu", show_default=True)
def layers_cmd(model: str | None, random_weights: bool, device: str) -> None:
    """List a model's layers with channels and stride (input pixels per feature cell)."""
    import torch

    from .backbone import load_backbone
    from .extractor import probe_layers
    from .registry import CONFIG_SKELETONS, DEFAULT_MODEL, MODELS, is_feature_model

    preset = MODELS.get(model or DEFAULT_MODEL)  # folders and hub ids resolve in load_backbone
    if is_feature_model(preset):
        assert preset is not None
        depth = int(preset.layers[0].split(".")[1]) + 1
        for i in range(depth):
            click.echo(f"block.{i}")
        return
    if random_weights:  # shapes only: nothing is allocated, so the 12B FLUX transformer probes anywhere
        source = str(CONFIG_SKELETONS.get(model or "", model or DEFAULT_MODEL))
        with torch.device("meta"):
            bb = load_backbone(source, dtype="fp32", device="meta", random_weights=True)
    else:
        bb = load_backbone(model or DEFAULT_MODEL, dtype="fp32", device=device)
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
    if not ex.per_image:
        raise BadInputError(f"{opts.get('model')} fits its co-PCA on each image pair, so per-image features would depend "
                            "on the batch; use `difffeat correspond`, or extract its sources (e.g. -m sd15, -m dinov2-b) apart")
    if latent is not None and hasattr(ex, "latent"):
        ex.latent = latent
    if shard_size is not None:
        from .shards import extract_folder_sharded

        extract_folder_sharded(ex, images, out_dir, shard_size=shard_size, batch_size=batch_size,
                               save_dtype=save_dtype, overwrite=overwrite)
        return
    extract_folder(ex, images, out_dir, batch_size=batch_size, save_dtype=save_dtype, viz_key=viz_layer, overwrite=overwrite)


# ---------------------------------------------------------------- download / convert
@cli.command("download")
@click.argument("models", nargs=-1, required=True)
@click.option("--components", default=None, help="Comma-separated components to fetch (default: those difffeat loads).")
@click.option("--variant", default=None, help="Weight variant, e.g. fp16 (half the size; default: full precision, "
              "else the variant the repo has).")
@click.option("--configs-only", is_flag=True, help="Only configs, tokenizers and scheduler (for --weights FILE).")
def download_cmd(models: tuple[str, ...], components: str | None, variant: str | None, configs_only: bool) -> None:
    """Fetch MODELS (presets, method presets, hub ids) into the HF cache, exactly the parts difffeat loads.

    Resumable (rerun after an interruption) and shown with a progress bar. Run it on a connected
    login node, then run difffeat on the GPU nodes with HF_HUB_OFFLINE=1 and the same HF_HOME.
    """
    from .download import download, targets

    comps = tuple(c.strip() for c in components.split(",") if c.strip()) if components else None
    for target, parts in targets(models):
        got = download(target, components=comps or parts, variant=variant, configs_only=configs_only)
        click.echo(f"{target}: {got.repo_id} -> {got.path} ({got.size_text})")


@cli.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def convert_cmd(src: Path, dst: Path, overwrite: bool) -> None:
    """Convert a pickled checkpoint (.ckpt/.pt/.pth/.bin) to safetensors, reading tensors only
    (torch.load(weights_only=True): no code in the pickle runs)."""
    from .checkpoints import convert_to_safetensors

    n = convert_to_safetensors(src, dst, overwrite=overwrite)
    click.echo(f"wrote {dst} ({n} tensors)")


# ---------------------------------------------------------------- task commands
# (group, module of difffeat.tasks (or a dotted module path), attribute: a click command or a list of them). The one
# place where task commands join the CLI.
TASK_COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("", "classify", "classify_cmd"), ("train", "classify", "train_probe_cmd"), ("sweep", "classify", "sweep_probe_cmd"),
    ("", "correspond", "correspond_cmd"), ("eval", "correspond", "eval_correspond_cmd"),
    ("", "demo", "demo_cmd"),
    ("", "dense", "segment_cmd"), ("", "dense", "depth_cmd"), ("", "dense", "edges_cmd"),
    ("train", "dense", "TRAIN_COMMANDS"), ("eval", "dense", "EVAL_COMMANDS"),
    ("", "detect", "detect_cmd"), ("train", "detect", "train_dire_cmd"), ("eval", "detect", "eval_detect_cmd"),
    ("", "difffeat.explore.command", "explore_cmd"),  # the browser app (gradio imported only when it runs)
)


def register_commands() -> click.Group:
    """Add every task command to its group (idempotent) and return the ``difffeat`` group."""
    groups = {"": cli, "train": train, "eval": eval_group, "sweep": sweep}
    for group, module, attr in TASK_COMMANDS:
        name = module if "." in module else f"difffeat.tasks.{module}"
        obj = getattr(importlib.import_module(name), attr)
        for command in obj if isinstance(obj, (list, tuple)) else [obj]:
            groups[group].add_command(command)
    return cli


load_task_commands = register_commands  # the name tests and scripts used before


def main(argv: list[str] | None = None) -> None:
    register_commands().main(args=argv, prog_name="difffeat")


if __name__ == "__main__":  # pragma: no cover  (python -m difffeat.cli: run the imported module's CLI)
    from difffeat.cli import main as _main

    _main(sys.argv[1:])
