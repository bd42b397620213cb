"""Core commands: ``models``, ``layers``, ``extract``, ``download``, ``convert``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..options import ExtractorOptions, FolderOptions
from .schema import use


@click.command("models")
@click.option("--check-cache/--no-check-cache", default=True, show_default=True,
              help="Look each model up in the local HF cache (no network either way).")
def models_cmd(check_cache: bool) -> None:
    """List model presets (source, local cache, licence, gating, size) and method presets."""
    from ..registry import MODELS, WEIGHT_SOURCES, method_presets, task_configs

    click.echo("models:")
    for name, p in sorted(MODELS.items()):
        click.echo(f"  {name:<16} {p.family:<7} {p.resolution:>5}px  layers={','.join(p.layers)} t={','.join(map(str, p.timesteps))}")
        click.echo(f"  {'':<16} {_source_line(p, check_cache)}")
    click.echo("weight sources (parts loaded by method presets):")
    for name, p in sorted(WEIGHT_SOURCES.items()):
        click.echo(f"  {name:<16} {','.join(p.components):<7} {_source_line(p, check_cache)}")
    from ..registry import ADM_NOTE

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

    from ..hub import cached_snapshot, spec_for

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


@click.command("layers")
@click.argument("model", required=False)
@click.option("--random-weights", is_flag=True,
              help="Build from the config only, on the meta device (no weights, no memory: any model size).")
@click.option("--device", default="cpu", show_default=True)
def layers_cmd(model: str | None, random_weights: bool, device: str) -> None:
    """List a model's layers with channels and stride (input pixels per feature cell)."""
    import torch

    from ..backbone import load_backbone
    from ..extractor import probe_layers
    from ..registry import CONFIG_SKELETONS, DEFAULT_MODEL, MODELS, is_feature_model

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


@click.command("extract")
@click.argument("images", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@use(ExtractorOptions, "opts")
@use(FolderOptions, "run")
@click.option("--latent", type=click.Choice(["mean", "sample"]), default=None, help="VAE posterior mean or a draw per member.")
@click.option("--save-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--viz", "viz_layer", default=None, help="Also write a PCA->RGB PNG of this output key.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Write N images per safetensors shard (+ JSONL index) instead of one file per image.")
def extract_cmd(images: Path, out_dir: Path, opts: ExtractorOptions, run: FolderOptions, latent: str | None,
                save_dtype: str, viz_layer: str | None, shard_size: int | None) -> None:
    """Extract features of every image under IMAGES into one safetensors file per image.

    Under torchrun / accelerate launch every rank takes its share of the images on its own
    GPU; the outputs are byte-identical to a one-process run (docs/scaling.md).
    """
    from ..pipeline import extract_images

    if shard_size is not None and viz_layer is not None:
        raise click.UsageError("--viz writes one PNG per image and cannot be combined with --shard-size")
    extract_images(opts.create(), images, out_dir, run, latent=latent, save_dtype=save_dtype, viz_key=viz_layer,
                   shard_size=shard_size, model=opts.model)


# ---------------------------------------------------------------- download / convert
@click.command("download")
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
    from ..download import download, targets

    comps = tuple(c.strip() for c in components.split(",") if c.strip()) if components else None
    for target, parts in targets(models):
        got = download(target, components=comps or parts, variant=variant, configs_only=configs_only)
        click.echo(f"{target}: {got.repo_id} -> {got.path} ({got.size_text})")


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def convert_cmd(src: Path, dst: Path, overwrite: bool) -> None:
    """Convert a pickled checkpoint (.ckpt/.pt/.pth/.bin) to safetensors, reading tensors only
    (torch.load(weights_only=True): no code in the pickle runs)."""
    from ..checkpoints import convert_to_safetensors

    n = convert_to_safetensors(src, dst, overwrite=overwrite)
    click.echo(f"wrote {dst} ({n} tensors)")
