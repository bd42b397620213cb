"""``difffeat demo`` (the work is in :mod:`difffeat.tasks.demo`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ..options import ExtractorOptions
from ..tasks.demo import DemoOptions, format_table, run_demo, use_threads
from .schema import use

# the demo runs its own model (difffeat-tiny) at fixed settings: of the shared options only --seed and --device
_FIXED = tuple(f.name for f in dataclasses.fields(ExtractorOptions) if f.name not in ("seed", "device"))


@click.command("demo")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("demo"), show_default=True,
              help="Output folder (must be empty or new unless --overwrite).")
@use(DemoOptions, "demo")
@use(ExtractorOptions, "ex", exclude=_FIXED)
def demo_cmd(out: Path, demo: DemoOptions, ex: ExtractorOptions) -> None:
    """Run every task on a few shapes scenes with the embedded difffeat-tiny model (offline, ~1 min on a CPU).

    Writes summary.json plus per-task PNGs, predictions and metrics into --out (the summary
    lists the files). difffeat-tiny knows only the shapes world: on real images use the
    task commands with -m sd21 and friends.
    """
    use_threads(demo.threads)
    summary = run_demo(out, demo, ex.seed, ex.device, echo=lambda m: click.echo(m, err=True))
    click.echo(format_table(summary))
    click.echo(f"wrote {Path(out) / 'summary.json'}")
