"""TRANSITIONAL: the demo commands, still defined in difffeat.tasks.demo."""
from difffeat.tasks.demo import demo_cmd  # noqa: F401
