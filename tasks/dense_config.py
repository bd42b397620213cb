"""Training configs for the dense tasks: packaged YAML defaults + a user YAML + ``key=value``.

``configs/train/{seg,depth,edges}.yaml`` hold every setting with its default. A user file
(``--config``) and command-line overrides (``train.lr=3e-4``, ``backbone.layers=[up.1]``,
values parsed as YAML) may only change keys that exist there, so a typo is an error
instead of a silently ignored setting; ``head.args``, ``head.aggregator`` and
``backbone`` are open (their keys go to the head / :func:`difffeat.create`).
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from difffeat.errors import BadInputError, one_of
from difffeat.presets import precedence

from .dense_tasks import get_task

OPEN_SECTIONS = ("head.args", "head.aggregator", "backbone")


def _config_dir() -> Path:
    try:
        return Path(str(resources.files("difffeat.configs"))) / "train"
    except ModuleNotFoundError:  # source tree without install
        return Path(__file__).resolve().parent.parent / "configs" / "train"


def default_config(task: str) -> dict[str, Any]:
    """The packaged defaults of ``task`` (its record's ``config``, else configs/train/TASK.yaml)."""
    return get_task(task).default_config(_config_dir())


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", yaml-parsed value)``."""
    if "=" not in item:
        raise BadInputError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


def set_key(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in ``cfg``; only existing keys, except inside the open sections."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[: i + 1])
        if not isinstance(node, dict):
            raise BadInputError(f"cannot set {key}: {'.'.join(parts[:i])} is not a section")
        if node.get(part) is None and prefix in OPEN_SECTIONS:
            node[part] = {}
        if part not in node:
            raise one_of("config key", prefix, _keys(cfg))
        node = node[part]
    if not isinstance(node, dict):
        raise BadInputError(f"cannot set {key}: {'.'.join(parts[:-1])} is not a section")
    parent = ".".join(parts[:-1])
    if parts[-1] not in node and parent not in OPEN_SECTIONS:
        raise one_of("config key", key, _keys(cfg))
    node[parts[-1]] = value


def _keys(cfg: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        out.extend(_keys(v, name + ".") if isinstance(v, dict) and name not in OPEN_SECTIONS else [name])
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "", into_open: bool = False) -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and (into_open or name not in OPEN_SECTIONS):
            yield from _flatten(v, name + ".", into_open)
        else:
            yield name, v


def get_key(cfg: Mapping[str, Any], key: str) -> Any:
    """The value of dotted ``key`` in ``cfg`` (None where a section or the key is missing)."""
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _file_pairs(task: str, config_file: str | Path | None) -> list[tuple[str, Any]]:
    """The dotted settings of a user YAML (``--config``), checked to be a ``task`` mapping."""
    if config_file is None:
        return []
    path = Path(config_file)
    if not path.exists():
        raise BadInputError(f"config file not found: {path}")
    from difffeat.registry import read_yaml

    user = read_yaml(path) or {}
    if not isinstance(user, dict):
        raise BadInputError(f"{path} must be a YAML mapping")
    if user.get("task", task) != task:
        raise BadInputError(f"{path} is a {user['task']!r} config, not {task!r}")
    return [(k, copy.deepcopy(v)) for k, v in _flatten(user, into_open=True)]


def load_train_config(task: str, config_file: str | Path | None = None, overrides: Iterable[str] = (),
                      flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of ``task``, then ``config_file`` (partial YAML), then ``key=value`` overrides,
    then ``flags``: dotted keys set by command-line options, ``None`` for an option not given.

    The flags merge by :func:`difffeat.presets.precedence` (a flag given wins over the file
    and the overrides, one not given keeps their value). Overrides and the file are applied
    in order, where ``key=null`` is a value (``data.max_depth=null``: no limit).
    """
    cfg = default_config(task)
    default_kind = cfg["head"]["kind"]
    pairs = _file_pairs(task, config_file) + [parse_override(item) for item in overrides]
    for key, value in pairs:
        set_key(cfg, key, value)
    if cfg["head"]["kind"] != default_kind:  # the defaults' head args belong to another head
        cfg["head"]["args"] = {}
        for key, value in pairs:
            if key.startswith("head.args"):
                set_key(cfg, key, value)
    flags = dict(flags or {})
    for key, value in precedence(flags, {k: get_key(cfg, k) for k in flags}).items():
        set_key(cfg, key, value)
    return cfg


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (for resume checks)."""
    fa, fb = dict(_flatten(a)), dict(_flatten(b))
    skip = set(ignore)
    return sorted(k for k in set(fa) | set(fb) if k not in skip and fa.get(k) != fb.get(k))
