"""Head checkpoints: ``head.safetensors`` (weights) + ``head.json`` (how to rebuild them).

A checkpoint is a folder::

    ckpt/head.safetensors   tensors only (the JSON config is also stored in its metadata)
    ckpt/head.json          {"format", "version", "head": {kind, args, aggregator},
                             "feature_info", "backbone": {preset, layers, timesteps, ...},
                             "task", "image_size", "classes", "palette", "extra"}

Nothing is pickled. :func:`load_head` refuses a checkpoint trained on other features
(backbone preset, layers, timesteps, or feature channels) with one
:class:`~difffeat.errors.CheckpointMismatchError` line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from difffeat.errors import BadInputError, CheckpointMismatchError
from difffeat.io import atomic_path, json_default, save_json
from difffeat.validate import HEAD_SCHEMA, check_schema

from .registry import build_head

FORMAT = "difffeat.head"
VERSION = 1
WEIGHTS, CONFIG = "head.safetensors", "head.json"


@dataclass
class LoadedHead:
    """A rebuilt head (in eval mode) and its checkpoint config."""

    head: nn.Module
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def backbone(self) -> dict[str, Any]:
        return self.config.get("backbone", {})

    @property
    def classes(self) -> list[str] | None:
        return self.config.get("classes")

    @property
    def task(self) -> str | None:
        return self.config.get("task")


def save_head(
    head: nn.Module,
    path: str | Path,
    *,
    backbone: Mapping[str, Any],
    task: str,
    image_size: int | Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``head`` (built by :func:`build_head`) to the folder ``path``; return the folder.

    ``backbone`` names the features the head was trained on: ``preset``, ``layers``,
    ``timesteps`` (and any extractor options worth recording, e.g. ``ensemble``).
    """
    from safetensors.torch import save_file

    spec = getattr(head, "spec", None)
    if spec is None:
        raise BadInputError("only heads made by difffeat.heads.build_head can be saved (no .spec)")
    config = {
        "format": FORMAT,
        "version": VERSION,
        "head": {"kind": spec["kind"], "args": spec["args"], "aggregator": spec["aggregator"]},
        "feature_info": spec["feature_info"],
        "backbone": dict(backbone),
        "task": task,
        "image_size": image_size if image_size is None or isinstance(image_size, int) else list(image_size),
        "classes": None if classes is None else list(classes),
        "palette": None if palette is None else [list(map(int, c)) for c in palette],
        "extra": dict(extra or {}),
    }
    config = json.loads(json.dumps(config, default=json_default))  # fail early if not JSON-able
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"config": json.dumps(config)})
    save_json(folder / CONFIG, config)
    return folder


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of a checkpoint folder (or of its ``.safetensors``/``.json`` file)."""
    weights, cfg_path = _locate(path)
    try:
        if cfg_path.exists():
            config = json.loads(cfg_path.read_text())
        else:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                config = json.loads((f.metadata() or {})["config"])
    except Exception as e:  # noqa: BLE001 - JSON, safetensors and OS errors alike: one line
        raise BadInputError(f"cannot read head config of {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        fmt = config.get("format") if isinstance(config, dict) else None
        raise BadInputError(f"{cfg_path} is not a difffeat head checkpoint (format {fmt!r})")
    check_schema(config, HEAD_SCHEMA, str(cfg_path))
    return config


def check_backbone(config: Mapping[str, Any], expect: Mapping[str, Any], where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` if ``expect`` disagrees with the checkpoint.

    ``expect`` may give ``preset``, ``layers``, ``timesteps`` and/or ``feature_info``;
    only the keys given are compared.
    """
    have = config.get("backbone", {})
    diffs = []
    for key in ("preset", "layers", "timesteps"):
        if key in expect and expect[key] is not None and _norm(expect[key]) != _norm(have.get(key)):
            diffs.append(f"{key} {have.get(key)!r} (got {expect[key]!r})")
    if "feature_info" in expect and expect["feature_info"] is not None:
        want = [(str(f["name"]), int(f["channels"])) for f in expect["feature_info"]]
        got = [(str(f["name"]), int(f["channels"])) for f in config.get("feature_info", [])]
        if sorted(want) != sorted(got) and not diffs:
            diffs.append(f"features {got} (got {want})")
    if diffs:
        raise CheckpointMismatchError(
            f"head {where} was trained with {', '.join(diffs)}; "
            "extract features with the checkpoint's backbone settings or retrain the head"
        )


def load_head(
    path: str | Path,
    expect_backbone: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> LoadedHead:
    """Rebuild a head from a checkpoint folder and load its weights (eval mode).

    ``expect_backbone``: see :func:`check_backbone`; a mismatch raises
    :class:`CheckpointMismatchError` before any weights are read.
    """
    from safetensors.torch import load_file

    weights, _ = _locate(path)
    config = read_config(path)
    if expect_backbone is not None:
        check_backbone(config, expect_backbone, where=str(path))
    spec = config["head"]
    try:
        head = build_head(spec["kind"], config["feature_info"], aggregator=spec.get("aggregator"), **spec.get("args", {}))
    except (TypeError, ValueError, KeyError) as e:  # args that do not fit the head kind
        raise BadInputError(f"head {path} cannot be rebuilt from its config: {type(e).__name__}: {e}") from None
    try:
        state = load_file(str(weights), device="cpu")
        head.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors / shape errors
        raise BadInputError(f"cannot load head weights {weights}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return LoadedHead(head.to(device).eval(), config)


def _locate(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    folder = p.parent if p.suffix in (".safetensors", ".json") else p
    weights, cfg = folder / WEIGHTS, folder / CONFIG
    if not weights.exists():
        raise BadInputError(f"no head checkpoint at {path} (expected {WEIGHTS} and {CONFIG} in that folder)")
    return weights, cfg


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v

