"""TRANSITIONAL: the classify commands, still defined in difffeat.tasks.classify."""
from difffeat.tasks.classify import classify_cmd, sweep_probe_cmd, train_probe_cmd  # noqa: F401
