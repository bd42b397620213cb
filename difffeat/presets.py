"""One precedence rule for every place settings are merged: **CLI over preset over model default**.

``precedence(cli, preset, model_defaults, library_defaults)`` merges dicts of settings;
a value of ``None`` means "not given" and falls through to the next layer. Every merge of a
method preset with user options (``difffeat.create``, the task commands) goes through it, so
an option given by the user always wins and nothing silently reverts to a default.
"""
from __future__ import annotations

from typing import Any, Mapping


def pick(*values: Any) -> Any:
    """The first value that is not ``None`` (``None`` if all are)."""
    return next((v for v in values if v is not None), None)


def precedence(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge settings, earlier layers winning per key; ``None`` values do not count as given."""
    keys: list[str] = []
    for layer in layers:
        keys.extend(k for k in (layer or {}) if k not in keys)
    return {k: pick(*((layer or {}).get(k) for layer in layers)) for k in keys}


__all__ = ["pick", "precedence"]
