"""TRANSITIONAL: the detect commands, still defined in difffeat.tasks.detect."""
from difffeat.tasks.detect import detect_cmd, eval_detect_cmd, train_dire_cmd  # noqa: F401
