"""TRANSITIONAL: the correspond commands, still defined in difffeat.tasks.correspond."""
from difffeat.tasks.correspond import correspond_cmd, eval_correspond_cmd  # noqa: F401
