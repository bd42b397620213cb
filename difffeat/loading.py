"""Load diffusers-format checkpoints with the real ``from_pretrained``.

A source is a local folder in diffusers layout (``model_index.json`` + one sub-folder per
component): a user's folder or a snapshot of the HF cache that :mod:`difffeat.hub` resolved
from a preset or hub id (so ``HF_HUB_OFFLINE`` and ``HF_HOME`` are honoured), or a
single-file ``.safetensors`` checkpoint (:mod:`difffeat.checkpoints`). When the weights are
not there, the user gets one line saying what is missing and what to download.

``random_weights=True`` builds every model from its config only (for benchmarks on
weight-less skeleton folders: speed does not depend on weight values).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import PartialDownloadError, WeightsNotFoundError

DENOISER_KEYS = ("unet", "transformer")
TOKENIZER_CLASSES = ("Tokenizer",)


def quiet_hf() -> None:
    """Silence diffusers/transformers progress bars and warnings; difffeat reports progress itself."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def hf_home() -> str:
    from .hub import hf_home as home

    return home()


def missing_weights_error(source: str, detail: str = "") -> WeightsNotFoundError:
    """The one-line error for weights that are not where ``source`` says."""
    from .hub import snapshot_repo

    where = snapshot_repo(source) if os.path.isdir(source) else None
    if where is not None:
        return PartialDownloadError(
            f"incomplete download of {where[0]} in {source} ({detail or 'files missing'}); run "
            f"`difffeat download {where[0]}` (resumes) or `hf download {where[0]}`")
    if os.path.isdir(source):
        return WeightsNotFoundError(
            f"weights missing in local folder {source} ({detail or 'no weight files'}); put the checkpoint's "
            f"*.safetensors there")
    from .hub import offline_error, spec_for

    return offline_error(spec_for(source))


def read_model_index(source: str) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (or a layout inferred from sub-folders).

    ``source`` is a local folder (a diffusers folder or a hub snapshot), a single-file checkpoint
    seen by :func:`difffeat.checkpoints.resolve_checkpoint` (its preset's index), or a hub id
    (resolved through :mod:`difffeat.hub` first).
    """
    from .checkpoints import registered

    sf = registered(source)
    if sf is not None:
        source = sf.config_dir
    elif not os.path.isdir(source):
        from .registry import resolve_hub

        source = str(resolve_hub(source))
    p = Path(source) / "model_index.json"
    if p.exists():
        return json.loads(p.read_text())
    index: dict[str, Any] = {}
    for sub in sorted(Path(source).iterdir()):
        cfg = sub / "config.json" if (sub / "config.json").exists() else sub / "scheduler_config.json"
        if sub.is_dir() and cfg.exists():
            cls = json.loads(cfg.read_text()).get("_class_name")
            if cls:
                index[sub.name] = ["diffusers", cls]
    if not index:
        raise missing_weights_error(source, "no model_index.json and no component folders")
    return index


def component_class(lib: str, name: str) -> type:
    return getattr(importlib.import_module(lib), name)


def load_component(
    source: str,
    name: str,
    spec: list[str],
    dtype: torch.dtype | None = None,
    random_weights: bool = False,
) -> Any:
    """Load one component (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` ...).

    ``source`` is a local folder or hub snapshot (weights of a hub snapshot are fetched now when
    online, see :func:`difffeat.hub.ensure_weights`; an ``fp16``-only folder loads its variant) or a
    registered single-file checkpoint (weights from the file, the rest from its preset's folder).
    """
    from .checkpoints import load_single_file_component, registered

    quiet_hf()
    lib, cls_name = spec[0], spec[1]
    if lib is None or cls_name is None:
        return None
    cls = component_class(lib, cls_name)
    is_model = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    sf = registered(source)
    folder = sf.config_dir if sf is not None else source
    try:
        if not is_model:  # schedulers, tokenizers, feature extractors
            return cls.from_pretrained(folder, subfolder=name)
        if random_weights:
            return _from_config(cls, folder, name, dtype)
        if sf is not None:
            return load_single_file_component(sf, name, list(spec), dtype)
        variant = _weights_variant(folder, name)
        return cls.from_pretrained(folder, subfolder=name, torch_dtype=dtype, **({"variant": variant} if variant else {}))
    except (OSError, EnvironmentError, ValueError) as e:
        if isinstance(e, WeightsNotFoundError):
            raise
        text = str(e)
        if any(s in text for s in ("does not appear to have", "no file named", "Can't load", "offline", "not found", "couldn't connect", "Cannot find")) or isinstance(e, OSError):
            raise missing_weights_error(folder, f"{name}: {text.splitlines()[0][:160]}") from None
        raise


def _weights_variant(folder: str, name: str) -> str | None:
    """The variant to load (``fp16`` when only ``*.fp16.safetensors`` are there); fetches a hub
    snapshot's missing weights when online; one line naming the missing file otherwise."""
    from .hub import ensure_weights, snapshot_repo, weight_status

    if snapshot_repo(folder) is not None:
        return ensure_weights(Path(folder), name).variant
    status = weight_status(Path(folder), name)
    if not status.ok:
        raise missing_weights_error(folder, f"{name}: no {status.missing}")
    return status.variant


def _from_config(cls: type, source: str, name: str, dtype: torch.dtype | None) -> torch.nn.Module:
    if cls.__module__.startswith("transformers"):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(source, subfolder=name)
        model = cls(cfg)
    else:
        model = cls.from_config(cls.load_config(source, subfolder=name))
    return model.to(dtype) if dtype is not None else model
