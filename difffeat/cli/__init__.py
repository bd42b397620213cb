"""The ``difffeat`` command line: the top layer (it imports the tasks; nothing imports it).

:mod:`.app` holds the groups and the one registration table, :mod:`.schema` turns the
options dataclasses of :mod:`difffeat.options` into click options, and each command group is
one module (:mod:`.core`, :mod:`.classify`, :mod:`.detect`, :mod:`.correspond`, :mod:`.dense`,
:mod:`.demo`, :mod:`.explore`).
"""
from .app import cli, eval_group, load_task_commands, main, register_commands, sweep, train

__all__ = ["cli", "eval_group", "load_task_commands", "main", "register_commands", "sweep", "train"]
