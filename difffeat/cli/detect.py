"""Detection commands: ``detect``, ``train dire``, ``eval detect`` (the work: :mod:`difffeat.tasks.detect`).

DIRE (Wang et al., ICCV 2023; presets dire-adm256, dire-sd) reads ``--steps`` and ``-m``;
AEROBLADE (Ricker et al., CVPR 2024; preset aeroblade) reads ``--autoencoder``. A flag the
chosen method does not read is refused in one line, not ignored.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..options import ExtractorOptions, FolderOptions
from ..tasks.detect import DetectOptions, DetectorOptions, NormalizeOptions, TrainDireOptions
from .schema import use

_DETECTOR = ("model", "resolution", "dtype", "device", "compile")  # the ExtractorOptions detection reads


@click.command("detect")
@click.argument("images", type=click.Path(path_type=Path))
@use(DetectorOptions, "source")
@use(DetectOptions, "method")
@use(ExtractorOptions, "ex", only=_DETECTOR)
@use(FolderOptions, "run")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output CSV.")
@click.option("--save-dire", "dire_dir", type=click.Path(path_type=Path), default=None,
              help="Also write DIRE maps (PNG) here.")
def detect_cmd(images: Path, source: DetectorOptions, method: DetectOptions, ex: ExtractorOptions,
               run: FolderOptions, out: Path, dire_dir: Path | None) -> None:
    """Score every image under IMAGES: P(generated) per image into a CSV (resumable).

    Per-image rows are kept in OUT's sibling folder ``<name>.parts/`` until the CSV is
    assembled, so an interrupted run continues where it stopped. With --training-free,
    --resolution N makes AEROBLADE score centre crops of N² instead of whole images.
    """
    from ..tasks.detect import build_detector, detect

    detect(images, out, build_detector(source, method, ex), run, dire_dir)


@click.command("dire")
@click.argument("real_dir", type=click.Path(path_type=Path))
@click.argument("fake_dir", type=click.Path(path_type=Path))
@use(TrainDireOptions, "train")
@use(DetectOptions, "method")
@use(ExtractorOptions, "ex", only=(*_DETECTOR, "seed"))
@use(FolderOptions, "run", exclude=("overwrite",))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder.")
def train_dire_cmd(real_dir: Path, fake_dir: Path, train: TrainDireOptions, method: DetectOptions,
                   ex: ExtractorOptions, run: FolderOptions, out: Path) -> None:
    """Train a detector on REAL_DIR vs FAKE_DIR (or calibrate a training-free score on them).

    -b sets the images per DIRE / feature batch; the classifier's own batch size, crop and
    learning rate come from the preset (``classifier:``) unless given here. The preset
    defaults to dire-adm256 (aeroblade with --score aeroblade).
    """
    from ..tasks.detect import train_dire

    train_dire(real_dir, fake_dir, out, train, method, ex, run.batch_size)


@click.command("detect")
@click.argument("real_dir", type=click.Path(path_type=Path))
@click.argument("fake_dir", type=click.Path(path_type=Path))
@use(DetectorOptions, "source")
@use(DetectOptions, "method")
@use(ExtractorOptions, "ex", only=_DETECTOR)
@use(FolderOptions, "run", exclude=("overwrite",))
@use(NormalizeOptions, "norm")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Write the metrics as JSON.")
def eval_detect_cmd(real_dir: Path, fake_dir: Path, source: DetectorOptions, method: DetectOptions,
                    ex: ExtractorOptions, run: FolderOptions, norm: NormalizeOptions, out: Path | None) -> None:
    """ACC and AP of a detector on REAL_DIR vs FAKE_DIR, as-is and (--normalize-format) format-normalised."""
    from ..tasks.detect import build_detector, evaluate_detection

    report = evaluate_detection(real_dir, fake_dir, build_detector(source, method, ex), run.batch_size, norm, out)
    for line in report.table():
        click.echo(line)
    if report.note():
        click.echo(report.note(), err=True)
