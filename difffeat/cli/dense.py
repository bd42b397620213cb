"""TRANSITIONAL: the dense commands, still defined in difffeat.tasks.dense."""
from difffeat.tasks.dense import EVAL_COMMANDS, TRAIN_COMMANDS, depth_cmd, edges_cmd, segment_cmd  # noqa: F401
