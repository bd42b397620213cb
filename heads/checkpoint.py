"""The one checkpoint format: a folder with ``STEM.safetensors`` (tensors; the JSON also in its
metadata) and ``STEM.json`` (how to rebuild them). Nothing is pickled.

Every kind writes it through :func:`write_checkpoint` / :func:`read_checkpoint`: dense heads
(``head.*``, :func:`save_head`), classification probes (``probe.*``,
:class:`~difffeat.heads.probe_cls.ProbeClassifier`) and detectors (``detector.*``,
:func:`~difffeat.heads.dire.save_detector`). The JSON holds ``format``, ``version``, ``kind``,
the module spec, and under ``backbone.extractor`` the extractor's **whole** ``ex.config``:
loading rebuilds the extractor with ``difffeat.create(**config)``
(:func:`rebuild_extractor`), so a default changed after training cannot change what an old
checkpoint computes. A head checkpoint::

    ckpt/head.json          {"format", "version", "kind", "head": {kind, args, aggregator},
                             "feature_info", "backbone": {preset, layers, timesteps, extractor, ...},
                             "task", "image_size", "classes", "palette", "extra"}

:func:`check_backbone` refuses a checkpoint trained on other features (preset, layers,
timesteps, the full extractor config, or feature channels) with one
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
# extractor settings that change speed or placement in memory, not the features a head sees
RUNTIME_KEYS = ("device", "dtype", "max_batch", "compile", "early_exit", "prompt_cache")


# --------------------------------------------------------------------------- the one format
def write_checkpoint(folder: str | Path, stem: str, fmt: str, version: int, config: Mapping[str, Any],
                     tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``STEM.safetensors`` (tensors + the config in its metadata) and ``STEM.json`` atomically."""
    from safetensors.torch import save_file

    cfg = json.loads(json.dumps({"format": fmt, "version": version, **config}, default=json_default))  # fail early
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()} or {"_empty": torch.zeros(1)}
    with atomic_path(out / f"{stem}.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"config": json.dumps(cfg)})
    save_json(out / f"{stem}.json", cfg)
    return out


def checkpoint_folder(path: str | Path, stem: str, what: str, hint: str = "") -> Path:
    """The checkpoint folder of ``path`` (a folder or a file in it); one line if it holds none."""
    p = Path(path)
    folder = p.parent if p.suffix in (".json", ".safetensors") else p
    if not (folder / f"{stem}.safetensors").exists():
        raise BadInputError(f"no {what} checkpoint at {path} (expected {stem}.safetensors and {stem}.json{hint})")
    return folder


def read_checkpoint(path: str | Path, stem: str, fmt: str, what: str, hint: str = "",
                    schema: Any = None) -> dict[str, Any]:
    """The JSON of a checkpoint (from ``STEM.json``, else the safetensors metadata), format- and
    ``schema``-checked (:func:`difffeat.validate.check_schema`): every problem is one line."""
    folder = checkpoint_folder(path, stem, what, hint)
    cfg_path = folder / f"{stem}.json"
    try:
        if cfg_path.exists():
            config = json.loads(cfg_path.read_text())
        else:
            from safetensors import safe_open

            with safe_open(str(folder / f"{stem}.safetensors"), framework="pt") as f:
                config = json.loads((f.metadata() or {})["config"])
    except Exception as e:  # noqa: BLE001 - JSON, safetensors and OS errors alike: one line
        raise BadInputError(f"cannot read {what} config of {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(config, dict) or config.get("format") != fmt:
        found = config.get("format") if isinstance(config, dict) else None
        raise BadInputError(f"{folder} is not a difffeat {what} checkpoint (format {found!r})")
    if schema is not None:
        check_schema(config, schema, str(cfg_path))
    return config


def read_tensors(path: str | Path, stem: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint (CPU), one line if the file is unreadable."""
    from safetensors.torch import load_file

    weights = checkpoint_folder(path, stem, what) / f"{stem}.safetensors"
    try:
        return load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own types
        raise BadInputError(f"cannot load {what} weights {weights}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def feature_record(ex: Any, preset: str | None = None, **extra: Any) -> dict[str, Any]:
    """The one backbone record of every checkpoint: ``preset``, ``layers``, ``timesteps`` (what
    :func:`check_backbone` compares cheaply), any ``extra`` settings, and ``extractor``: the
    extractor's ``ex.config`` whole, from which loading rebuilds it (:func:`rebuild_extractor`)."""
    config = dict(ex.config)
    return {"preset": preset or config.get("name"), "layers": list(getattr(ex, "layers", None) or []),
            "timesteps": [int(t) for t in getattr(ex, "timesteps", None) or []], **extra, "extractor": config}


def rebuild_extractor(record: Mapping[str, Any], device: str | None = None, dtype: str | None = None,
                      backbone: Any = None, **runtime: Any) -> Any:
    """The extractor a checkpoint was made with: ``difffeat.create(**record["extractor"])``.

    Only :data:`RUNTIME_KEYS` may change. ``device``/``dtype`` are this machine's (``None`` = the
    default: CUDA and bf16 when there is a GPU), never the recorded ones; other ``runtime``
    values of ``None`` keep the recorded ones. ``backbone`` reuses an already loaded backbone.
    """
    from difffeat.factory import create

    bad = [k for k in runtime if k not in RUNTIME_KEYS]
    if bad:
        raise BadInputError(f"a checkpoint's extractor can change only {', '.join(RUNTIME_KEYS)} (got {', '.join(bad)})")
    cfg = {**record["extractor"], **{k: v for k, v in runtime.items() if v is not None}, "device": device, "dtype": dtype}
    if backbone is not None:
        cfg.update(backbone=backbone, device=None, dtype=None)
    return create(**cfg)


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
    spec = getattr(head, "spec", None)
    if spec is None:
        raise BadInputError("only heads made by difffeat.heads.build_head can be saved (no .spec)")
    config = {
        "kind": "dense-head",
        "head": {"kind": spec["kind"], "args": spec["args"], "aggregator": spec["aggregator"]},
        "feature_info": spec["feature_info"],
        "backbone": dict(backbone),
        "task": task,
        "image_size": image_size if image_size is None or isinstance(image_size, int) else list(image_size),
        "classes": None if classes is None else list(classes),
        "palette": None if palette is None else [list(map(int, c)) for c in palette],
        "extra": dict(extra or {}),
    }
    return write_checkpoint(path, WEIGHTS.split(".")[0], FORMAT, VERSION, config, head.state_dict())


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON config of a checkpoint folder (or of its ``.safetensors``/``.json`` file)."""
    return read_checkpoint(path, WEIGHTS.split(".")[0], FORMAT, "head", schema=HEAD_SCHEMA)


def check_backbone(config: Mapping[str, Any], expect: Mapping[str, Any], where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` if ``expect`` disagrees with the checkpoint.

    ``expect`` may give ``preset``, ``layers``, ``timesteps``, ``extractor`` (an ``ex.config``,
    compared key by key except :data:`RUNTIME_KEYS`) and/or ``feature_info``; only the keys
    given are compared.
    """
    have = config.get("backbone", {})
    diffs = []
    for key in ("preset", "layers", "timesteps"):
        if key in expect and expect[key] is not None and _norm(expect[key]) != _norm(have.get(key)):
            diffs.append(f"{key} {have.get(key)!r} (got {expect[key]!r})")
    if expect.get("extractor") and have.get("extractor"):  # the full extractor config, runtime keys aside
        mine, theirs = have["extractor"], expect["extractor"]
        for key in sorted(set(mine) | set(theirs)):
            if key not in RUNTIME_KEYS and _norm(mine.get(key)) != _norm(theirs.get(key)):
                diffs.append(f"{key} {mine.get(key)!r} (got {theirs.get(key)!r})")
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
    config = read_config(path)
    if expect_backbone is not None:
        check_backbone(config, expect_backbone, where=str(path))
    spec = config["head"]
    try:
        head = build_head(spec["kind"], config["feature_info"], aggregator=spec.get("aggregator"), **spec.get("args", {}))
    except (TypeError, ValueError, KeyError) as e:  # args that do not fit the head kind
        raise BadInputError(f"head {path} cannot be rebuilt from its config: {type(e).__name__}: {e}") from None
    state = read_tensors(path, WEIGHTS.split(".")[0], "head")
    try:
        head.load_state_dict(state, strict=True)
    except Exception as e:  # shape errors
        raise BadInputError(f"cannot load head weights of {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return LoadedHead(head.to(device).eval(), config)


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v

