"""``difffeat explore``: start the browser app (Gradio is imported only when it runs)."""
from __future__ import annotations

import os

import click


@click.command("explore")
@click.option("-m", "--model", default=None, help="Model preset, local diffusers folder or hub id (default: the "
              "preset's model with --preset, else difffeat-tiny, offline).")
@click.option("--preset", default=None, help="Correspondence preset shown first (dift, sd-dino, geoaware-zs, ...).")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--share", is_flag=True, help="Also open a public gradio.live link (needs internet).")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="Default: bf16 on CUDA, fp32 on CPU.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed of every extraction.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's).")
def explore_cmd(model: str | None, preset: str | None, port: int, host: str, share: bool, device: str | None,
                dtype: str | None, seed: int, threads: int | None) -> None:
    """Start the interactive browser app: correspondence by clicking, co-PCA features, classification,
    zero-shot or trained dense heads and generated-image detection on one model.

    With no options it runs offline on difffeat-tiny with the shapes scenes preloaded. It binds
    127.0.0.1 (this machine only) unless --host or --share say otherwise.
    """
    from ..explore.launch import check_gradio, exposure_warning, serve
    from ..explore.session import Session

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    check_gradio()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    session = Session(model=model, preset=preset, device=device, dtype=dtype, seed=seed)
    click.echo(f"difffeat explore: loading {session.model} ...", err=True)
    session.layer_names()  # load the model now, not on the first click
    warning = exposure_warning(host, share)
    if warning:
        click.echo(warning, err=True)
    serve(session, host, port, share)
