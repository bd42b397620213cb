"""Classify commands: ``classify``, ``train probe``, ``sweep probe``.

They parse the options, call :func:`difffeat.tasks.classify.classify`, :func:`.train_probe`
or :func:`.sweep_probe`, and print what those return.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..options import ExtractorOptions, FolderOptions
from ..tasks.classify import (
    ClassifyOptions, ClassifyReport, ProbeOptions, ProbeSweep, classify, sweep_probe, train_probe,
)
from .schema import use

# zero-shot classify loads the backbone itself and a probe brings its own features: the
# extractor's feature options do not apply
NOT_CLASSIFY = ("weights", "layers", "timesteps", "ensemble", "prompt", "noise", "resize", "denoiser_weights", "adaln",
                "discard_channels")


@click.command("classify")
@click.argument("images", type=click.Path(path_type=Path))
@use(ClassifyOptions, "opts")
@use(ExtractorOptions, "ex", exclude=NOT_CLASSIFY)
@use(FolderOptions, "run", exclude=("batch_size",))
def classify_cmd(images: Path, opts: ClassifyOptions, ex: ExtractorOptions, run: FolderOptions) -> None:
    """Classify IMAGES zero-shot (Diffusion Classifier) or with a trained probe; write a CSV."""
    report = classify(images, opts, ex, overwrite=run.overwrite)
    echo_report(report, opts.out)
    report.run.finish("images")


def echo_report(report: ClassifyReport, out: Path | None) -> None:
    """Print what a classify run wrote, its denoiser cost and (``--eval``) its accuracy."""
    if not report.merged:
        from ..distributed import dist_info

        click.echo(f"rank {dist_info().rank}: {report.run.done} new rows; another rank merges {out}")
        return
    click.echo(f"wrote {out}: {report.run.done} new, {report.run.skipped} already there")
    used = report.evals
    if used:
        click.echo(f"denoiser evaluations per image: mean {sum(used) / len(used):.0f}, max {max(used)} "
                   f"(the paper schedule: {report.paper_evals})")
    r = report.evaluation
    if r is not None:
        click.echo(f"accuracy: {100 * r['accuracy']:.2f}% ({r['correct']}/{r['total']}); "
                   f"confusion matrix: {r['confusion_png']}")
        if "fitted_temperature" in r:
            click.echo(f"fitted score temperature: {r['fitted_temperature']:.4g} "
                       "(pass --temperature to calibrate scores)")


@click.command("probe")
@click.argument("images", type=click.Path(path_type=Path))
@use(ExtractorOptions, "ex")
@use(ProbeOptions, "opts")
@use(FolderOptions, "run", exclude=("overwrite",))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder.")
def train_probe_cmd(images: Path, ex: ExtractorOptions, opts: ProbeOptions, run: FolderOptions, out: Path) -> None:
    """Fit a linear probe and a k-NN on pooled features of IMAGES (one sub-folder per class)."""
    probe, dim = train_probe(images, opts, ex, out, batch_size=run.batch_size)
    m = probe.metrics
    if "val_linear_acc" in m:
        click.echo(f"validation accuracy: linear {100 * m['val_linear_acc']:.2f}%, "
                   f"k-NN {100 * m['val_knn_acc']:.2f}% ({m['val_images']} images)")
    click.echo(f"wrote probe {out} ({len(probe.classes)} classes, {m['train_images']} training images, "
               f"{dim}-d features)")


@click.command("probe")
@click.argument("images", type=click.Path(path_type=Path))
@use(ExtractorOptions, "ex")
@use(ProbeOptions, "opts")
@use(FolderOptions, "run", exclude=("overwrite",))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Also write the table as CSV.")
def sweep_probe_cmd(images: Path, ex: ExtractorOptions, opts: ProbeOptions, run: FolderOptions,
                    out: Path | None) -> None:
    """Validation accuracy of a linear probe and a k-NN for every (layer, t) of -l/-t (one extraction pass)."""
    echo_sweep(sweep_probe(images, opts, ex, out, batch_size=run.batch_size))
    if out is not None:
        click.echo(f"wrote {out}")


def echo_sweep(sweep: ProbeSweep) -> None:
    """The sweep table, best row marked."""
    best = sweep.best
    click.echo(f"{'layer':<14} {'t':>5} {'dim':>7} {'linear':>8} {'k-NN':>8}   ({len(sweep.classes)} classes, "
               f"{sweep.train_images} train / {sweep.val_images} val images)")
    for r in sweep.rows:
        mark = "  <- best" if r is best else ""
        click.echo(f"{r['layer']:<14} {r['t']:>5} {r['dim']:>7} {100 * r['linear_acc']:>7.2f}% "
                   f"{100 * r['knn_acc']:>7.2f}%{mark}")
