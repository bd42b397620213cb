"""Load diffusers-format checkpoints with the real ``from_pretrained``.

A source is a hub id (``stabilityai/stable-diffusion-2-1``) or a local folder in
diffusers layout (``model_index.json`` + one sub-folder per component). Downloads go
through huggingface_hub, so ``HF_HUB_OFFLINE`` and ``HF_HOME`` are honoured. When the
weights are not there, the user gets one line saying what to download and where.

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

from .errors import WeightsNotFoundError

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
    return os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))


def missing_weights_error(source: str, detail: str = "") -> WeightsNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    where = f"HF_HOME={hf_home()}"
    if os.path.isdir(source):
        msg = f"weights missing in local folder {source} ({detail or 'no weight files'}); put the checkpoint's *.safetensors there"
    else:
        msg = (
            f"weights for {source!r} are not available{' (HF_HUB_OFFLINE is set)' if offline else ''}; "
            f"run `huggingface-cli download {source}` on a connected machine and copy the cache to {where}, "
            f"or pass a local diffusers folder with -m PATH"
        )
    return WeightsNotFoundError(msg)


def read_model_index(source: str) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (or a layout inferred from sub-folders)."""
    if os.path.isdir(source):
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
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source, "model_index.json")
    except Exception as e:  # offline, missing repo, no network: all end the same way
        raise missing_weights_error(source, type(e).__name__) from None
    return json.loads(Path(path).read_text())


def component_class(lib: str, name: str) -> type:
    return getattr(importlib.import_module(lib), name)


def load_component(
    source: str,
    name: str,
    spec: list[str],
    dtype: torch.dtype | None = None,
    random_weights: bool = False,
) -> Any:
    """Load one component (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` ...)."""
    quiet_hf()
    lib, cls_name = spec[0], spec[1]
    if lib is None or cls_name is None:
        return None
    cls = component_class(lib, cls_name)
    is_model = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    try:
        if not is_model:  # schedulers, tokenizers, feature extractors
            return cls.from_pretrained(source, subfolder=name)
        if random_weights:
            return _from_config(cls, source, name, dtype)
        return cls.from_pretrained(source, subfolder=name, torch_dtype=dtype)
    except (OSError, EnvironmentError, ValueError) as e:
        text = str(e)
        if any(s in text for s in ("does not appear to have", "no file named", "Can't load", "offline", "not found", "couldn't connect", "Cannot find")) or isinstance(e, OSError):
            raise missing_weights_error(source, f"{name}: {text.splitlines()[0][:160]}") from None
        raise


def _from_config(cls: type, source: str, name: str, dtype: torch.dtype | None) -> torch.nn.Module:
    if cls.__module__.startswith("transformers"):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(source, subfolder=name)
        model = cls(cfg)
    else:
        model = cls.from_config(cls.load_config(source, subfolder=name))
    return model.to(dtype) if dtype is not None else model
