"""Click options generated from the options dataclasses (:mod:`difffeat.options`).

``@use(ExtractorOptions)`` adds one click option per field and hands the command one
instance, so every command that offers ``--max-batch`` offers the same flag, default and
help. A command that must not offer a flag excludes it (``exclude=("ensemble",)``): the field
then keeps its dataclass default.

    @click.command("extract")
    @use(ExtractorOptions, "ex")
    @use(FolderOptions, "run")
    def extract_cmd(ex: ExtractorOptions, run: FolderOptions) -> None: ...
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from ..options import Flag, cli_fields, flag_of


def _param_name(cls: type) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__.removesuffix("Options")).lower() or "options"


def _click_type(f: dataclasses.Field, spec: Flag) -> Any:
    if spec.choices is not None:
        return click.Choice(list(spec.choices))
    if spec.path:
        return click.Path(path_type=Path)
    kind = spec.type if spec.type is not None else (type(f.default) if f.default not in (None, ()) else str)
    if spec.min is not None:
        return click.IntRange(min=spec.min) if kind is int else click.FloatRange(min=spec.min)
    return kind


def click_option(f: dataclasses.Field) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one dataclass field (its destination is the field's name)."""
    spec = flag_of(f)
    assert spec is not None
    flags = list(spec.flags) or ["--" + f.name.replace("_", "-")]
    if spec.secondary:  # --x/--no-x, default None: unset keeps the model's choice
        return click.option(f"{flags[-1]}/{spec.secondary}", f.name, default=f.default, help=spec.help,
                            hidden=spec.hidden)
    if spec.is_flag:
        return click.option(*flags, f.name, is_flag=True, default=bool(f.default), help=spec.help, hidden=spec.hidden,
                            envvar=spec.envvar)
    default = None if spec.required else f.default
    return click.option(*flags, f.name, type=_click_type(f, spec), multiple=spec.multiple, default=default,
                        required=spec.required, help=spec.help, hidden=spec.hidden, envvar=spec.envvar,
                        show_default=spec.show_default and default not in (None, ()))


def use(cls: type, name: str | None = None, exclude: Sequence[str] = (),
        only: Sequence[str] | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Offer ``cls``'s fields as options and pass the command one ``cls`` instance as ``name``
    (default: the class name in snake case without ``Options``). ``only`` / ``exclude``: the
    fields offered; the others keep their dataclass defaults."""
    if only is not None:
        exclude = tuple(f.name for f in cli_fields(cls) if f.name not in only) + tuple(exclude)
    fields = cli_fields(cls, exclude)
    param = name or _param_name(cls)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[param] = cls(**{f.name: _value(f, kwargs.pop(f.name)) for f in fields})
            return command(*args, **kwargs)

        for f in reversed(fields):
            wrapper = click_option(f)(wrapper)
        return wrapper

    return decorate


def _value(f: dataclasses.Field, value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
