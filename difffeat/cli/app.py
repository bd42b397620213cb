"""The ``difffeat`` groups, their error handling and the one registration table.

The CLI is the top layer: one module per command group under :mod:`difffeat.cli` parses the
options (:mod:`difffeat.cli.schema`), calls a plain task function and prints. The task
modules import no click. :func:`register_commands` is the one place that adds the commands to
the groups below (``cli``, ``train``, ``eval``, ``sweep``), so ``difffeat``, ``python -m
difffeat`` and ``python -m difffeat.cli`` see the same commands (a module run as
``__main__`` is a second copy: nothing registers on it by import).

Every user error becomes one line ``error: ...`` on stderr and a non-zero exit.
"""
from __future__ import annotations

import importlib
from typing import Any

import click

from ..errors import DiffFeatError


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
    from ..io import set_max_pixels

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


# ---------------------------------------------------------------- registration
# (group, module under difffeat.cli, attribute: a click command or a list of them). The one place where
# commands join the CLI: nothing registers by being imported.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("", "core", "models_cmd"), ("", "core", "layers_cmd"), ("", "core", "extract_cmd"),
    ("", "core", "download_cmd"), ("", "core", "convert_cmd"),
    ("", "classify", "classify_cmd"), ("train", "classify", "train_probe_cmd"), ("sweep", "classify", "sweep_probe_cmd"),
    ("", "correspond", "correspond_cmd"), ("eval", "correspond", "eval_correspond_cmd"),
    ("", "demo", "demo_cmd"),
    ("", "dense", "segment_cmd"), ("", "dense", "PREDICT_COMMANDS"),
    ("train", "dense", "TRAIN_COMMANDS"), ("eval", "dense", "EVAL_COMMANDS"),
    ("", "detect", "detect_cmd"), ("train", "detect", "train_dire_cmd"), ("eval", "detect", "eval_detect_cmd"),
    ("", "explore", "explore_cmd"),  # the browser app (gradio imported only when it runs)
)


def register_commands() -> click.Group:
    """Add every command to its group (idempotent) and return the ``difffeat`` group."""
    groups = {"": cli, "train": train, "eval": eval_group, "sweep": sweep}
    for group, module, attr in COMMANDS:
        obj = getattr(importlib.import_module(f"difffeat.cli.{module}"), attr)
        for command in obj if isinstance(obj, (list, tuple)) else [obj]:
            groups[group].add_command(command)
    return cli


load_task_commands = register_commands  # the name tests and scripts used before


def main(argv: list[str] | None = None) -> None:
    """The ``difffeat`` script, ``python -m difffeat`` and ``python -m difffeat.cli``."""
    register_commands().main(args=argv, prog_name="difffeat")
