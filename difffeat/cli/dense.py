"""Dense commands: ``train seg|depth|edges``, ``segment``, ``depth``, ``edges``, ``eval seg|depth|edges``.

Every task of :data:`difffeat.tasks.dense_tasks.TASKS` gets a ``train`` and an ``eval``
command and a prediction command (:func:`predict_command`; segmentation's is ``segment``,
which also segments without training). The commands parse the options
(:mod:`difffeat.tasks.dense` holds the task's own option dataclasses), call the task
function and print; see :mod:`difffeat.tasks.dense` for what they do.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import click

from ..options import ExtractorOptions, FolderOptions
from ..tasks.dense import DiffSegOptions, EvalOptions, HeadOptions, PredictOptions, SegmentOptions, TrainOptions
from ..tasks.dense_tasks import TASKS, DenseTask
from .schema import use


def _only(*keep: str) -> tuple[str, ...]:
    """The ExtractorOptions fields a command does not offer (exclude=)."""
    return tuple(f.name for f in dataclasses.fields(ExtractorOptions) if f.name not in keep)


TRAIN_FLAGS = _only("model", "layers", "timesteps", "device")  # shortcuts for backbone.* / train.device
HEAD_FLAGS = _only("model", "layers", "timesteps", "device", "dtype", "max_batch", "compile")  # -m/-l/-t: checks
EVAL_FLAGS = _only("device", "dtype")


def train_command(task: DenseTask) -> click.Command:
    """``difffeat train TASK``."""
    @click.command(task.name, help=f"Train a {task.title} head on frozen features of the labelled folder DATA.\n\n"
                   f"Settings: configs/train/{task.name}.yaml, changed by --config FILE and KEY=VALUE overrides "
                   "(e.g. train.epochs=50 train.mode=online head.kind=probe backbone.model=sd21); -m, -l, -t, "
                   "--device and --val set backbone.model, backbone.layers, backbone.timesteps, train.device "
                   "and data.val.")
    @click.argument("data", type=click.Path(path_type=Path))
    @click.argument("overrides", nargs=-1)
    @use(TrainOptions, "opts")
    @use(ExtractorOptions, "ex", exclude=TRAIN_FLAGS)
    @use(FolderOptions, "run", exclude=("batch_size",))
    def cmd(data: Path, overrides: tuple[str, ...], opts: TrainOptions, ex: ExtractorOptions,
            run: FolderOptions) -> None:
        from ..distributed import dist_info
        from ..tasks.dense import train_folder

        result = train_folder(task.name, data, overrides, opts, ex, run, echo=click.echo)
        if dist_info().is_main:  # under torchrun every rank gets here
            click.echo(f"checkpoint: {result['checkpoint']}")

    return cmd


def _writer_flags(task: DenseTask) -> Callable[[Callable[..., Any]], Any]:
    """The task's writer flags (``write_options``) as ``write``, or nothing to add."""
    return use(task.write_options, "write") if task.write_options is not None else (lambda f: f)


def predict_command(task: DenseTask) -> click.Command:
    """``difffeat COMMAND IMAGES --head RUN/head -o OUT``: a head's predictions for a folder."""
    @click.command(task.command, help=f"{task.predict_help}\n\n-m, -l and -t check that the head was trained "
                   "with them.")
    @click.argument("images", type=click.Path(path_type=Path))
    @use(HeadOptions, "head")
    @use(ExtractorOptions, "ex", exclude=HEAD_FLAGS)
    @use(PredictOptions, "opts")
    @use(FolderOptions, "run")
    @_writer_flags(task)
    def cmd(images: Path, head: HeadOptions, ex: ExtractorOptions, opts: PredictOptions, run: FolderOptions,
            write: Any = None) -> None:
        from ..tasks.dense import predict_folder

        click.echo(predict_folder(task.name, images, head.head, ex, opts, run, write))

    return cmd


@click.command("segment")
@click.argument("images", type=click.Path(path_type=Path))
@use(SegmentOptions, "seg")
@use(DiffSegOptions, "merging")
@use(ExtractorOptions, "ex")
@use(PredictOptions, "opts")
@use(FolderOptions, "run")
def segment_cmd(images: Path, seg: SegmentOptions, merging: DiffSegOptions, ex: ExtractorOptions,
                opts: PredictOptions, run: FolderOptions) -> None:
    """Segment every image under IMAGES: indexed PNG masks + colour overlays (original resolution).

    With a trained head (--head), or without training: K-means over the features
    (--zero-shot K) or DiffSeg's self-attention merging (--diffseg). With --head, -m, -l
    and -t check that the head was trained with them.
    """
    from ..tasks.dense import segment_folder

    click.echo(segment_folder(images, seg, merging, ex, opts, run))


def eval_command(task: DenseTask) -> click.Command:
    """``difffeat eval TASK DATA (--head | --pred)``."""
    @click.command(task.name, help=f"Score {task.title} on the labelled folder DATA, with a head (--head) "
                   "or saved predictions (--pred, files named like the labels).")
    @click.argument("data", type=click.Path(path_type=Path))
    @use(EvalOptions, "opts")
    @use(ExtractorOptions, "ex", exclude=EVAL_FLAGS)
    def cmd(data: Path, opts: EvalOptions, ex: ExtractorOptions) -> None:
        from ..tasks.dense import evaluate_folder

        metrics, images = evaluate_folder(task.name, data, opts, ex)
        for line in task.details(metrics):
            click.echo(line)
        click.echo(f"{images} images: {task.summary(metrics)}")

    return cmd


TRAIN_COMMANDS = [train_command(t) for t in TASKS.values()]
EVAL_COMMANDS = [eval_command(t) for t in TASKS.values()]
PREDICT_COMMANDS = [segment_cmd] + [predict_command(t) for t in TASKS.values() if t.name != "seg"]
depth_cmd, edges_cmd = (next(c for c in PREDICT_COMMANDS if c.name == name) for name in ("depth", "edges"))
