"""Correspondence commands: ``difffeat correspond`` and ``difffeat eval correspond``
(the work is in :mod:`difffeat.tasks.correspond`)."""
from __future__ import annotations

from pathlib import Path

import click

from ..options import ExtractorOptions, FolderOptions
from ..tasks.correspond import EvalOptions, MatchOptions, PairOptions, correspond, eval_report, evaluate_dataset
from .schema import use

# pairs are matched one at a time: no -b/--batch-size
_RUN_EXCLUDE = ("batch_size",)


@click.command("correspond")
@click.argument("source", type=click.Path(path_type=Path), required=False)
@click.argument("target", type=click.Path(path_type=Path), required=False)
@use(PairOptions, "pairs")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output folder.")
@use(FolderOptions, "run", exclude=_RUN_EXCLUDE)
@use(MatchOptions, "match", exclude=("flip_test",))  # the flip test needs annotated mirror partners: eval only
@use(ExtractorOptions, "ex")
def correspond_cmd(source: Path | None, target: Path | None, pairs: PairOptions, out_dir: Path, run: FolderOptions,
                   match: MatchOptions, ex: ExtractorOptions) -> None:
    """Match points (or every pixel, --dense) from SOURCE into TARGET, or every pair of --pairs.

    Writes <name>.json (matched points in target pixels) and <name>.png (side by side,
    one coloured line per match) into --out; --dense adds <name>.flow.npy and
    <name>.warped.png. Finished pairs are skipped unless --overwrite.
    """
    done = correspond(source, target, out_dir, pairs, match, ex, overwrite=run.overwrite)
    click.echo(f"{done.done} pair(s) matched, {done.skipped} skipped -> {out_dir}")


@click.command("correspond")
@click.argument("root", type=click.Path(path_type=Path))
@use(EvalOptions, "ev")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for predictions.jsonl (resumable) and pck.json.")
@use(FolderOptions, "run", exclude=_RUN_EXCLUDE)
@use(MatchOptions, "match")
@use(ExtractorOptions, "ex")
def eval_correspond_cmd(root: Path, ev: EvalOptions, out_dir: Path | None, run: FolderOptions, match: MatchOptions,
                        ex: ExtractorOptions) -> None:
    """PCK of a correspondence preset on SPair-71k or PF-Pascal (published folder formats)."""
    summary = evaluate_dataset(root, ev, match, ex, out_dir=out_dir, overwrite=run.overwrite)
    for line in eval_report(summary, ev, out_dir):
        click.echo(line)
