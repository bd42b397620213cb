"""Validation of files from outside: checkpoint configs and preset YAML, refused in one line.

Checkpoints and presets may come from anyone. They are read as data only (JSON,
``yaml.safe_load``, safetensors; never ``eval``, never pickle) and checked here against a
small schema before any value is used, so a file that does not match fails with one
:class:`~difffeat.errors.BadInputError` line naming the key, not with a traceback deep
inside a loader.

A schema maps keys to a type, a tuple of types (``None`` allowed), a nested schema (a dict)
or ``[schema]`` (a list whose every element matches). A key ending in ``?`` is optional.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from .errors import BadInputError, one_of

Schema = Mapping[str, Any]

#: what :func:`difffeat.heads.load_head` reads from ``head.json``
HEAD_SCHEMA: Schema = {
    "format": str, "version": int,
    "head": {"kind": str, "args?": dict, "aggregator?": (dict, str, None)},
    "feature_info": [{"name": str, "channels": int}],
    "backbone": {"preset": str, "layers?": (list, None), "timesteps?": (list, None)},
    "task?": (str, None), "image_size?": (int, list, None), "classes?": (list, None),
    "palette?": (list, None), "extra?": (dict, None),
}
#: what :func:`difffeat.tasks.detect.load_detector` reads from ``detector.json``
DETECTOR_SCHEMA: Schema = {
    "format": str, "kind": str, "backbone": {"preset?": (str, None)},
    "resolution?": (int, None), "calibration?": (dict, None), "dire?": (dict, None),
    "classifier?": {"arch": str, "crop": int}, "seed?": int, "score?": (str, None),
}
#: what :meth:`difffeat.heads.probe_cls.ProbeClassifier.load` reads from ``probe.json``
PROBE_SCHEMA: Schema = {
    "format": str, "classes": [str], "feature_dim": int, "backbone": dict,
    "linear?": (dict, bool, None), "knn?": (dict, None), "metrics?": (dict, None),
}


def check_schema(obj: Any, schema: Schema, where: str, _path: str = "") -> None:
    """Raise one :class:`BadInputError` line if ``obj`` does not match ``schema``."""
    if not isinstance(obj, dict):
        raise BadInputError(f"{where}: {_path.rstrip('.') or 'the file'} must be a mapping, got {type(obj).__name__}")
    for key, spec in schema.items():
        name = key.rstrip("?")
        if name not in obj:
            if key.endswith("?"):
                continue
            raise BadInputError(f"{where} does not match the schema: key {_path + name!r} is missing")
        _check_value(obj[name], spec, where, _path + name)


def _check_value(value: Any, spec: Any, where: str, path: str) -> None:
    if isinstance(spec, Mapping):
        check_schema(value, spec, where, path + ".")
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise BadInputError(f"{where} does not match the schema: {path!r} must be a list, got {type(value).__name__}")
        for i, v in enumerate(value):
            _check_value(v, spec[0], where, f"{path}[{i}]")
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    allowed = tuple(type(None) if t is None else t for t in types)
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        names = "/".join("null" if t is None else t.__name__ for t in types)
        raise BadInputError(f"{where} does not match the schema: {path!r} must be {names}, got {type(value).__name__}")


def check_preset(data: Any, where: str) -> None:
    """A method preset: a mapping with ``name`` and an ``extract`` block of :func:`difffeat.create` options.

    An unknown ``extract`` key is named in the error, with the valid ones.
    """
    from .factory import create

    check_schema(data, {"name": str, "extract": dict, "task?": str}, where)
    valid = [p for p in inspect.signature(create).parameters if p not in ("name", "backbone")] + ["model"]
    for key in data["extract"]:
        if key not in valid:
            raise one_of(f"key in the extract block of {where}:", key, valid)


__all__ = ["DETECTOR_SCHEMA", "HEAD_SCHEMA", "PROBE_SCHEMA", "check_preset", "check_schema"]
