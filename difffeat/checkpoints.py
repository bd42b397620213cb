"""Checkpoint files users hold: single-file ``.safetensors`` and pickles (refused, then converted).

* A single ``.safetensors`` file from a model-sharing site (original LDM/SGM key layout, e.g.
  ``v1-5-pruned-emaonly.safetensors``) loads through diffusers' ``from_single_file`` machinery,
  one component at a time, with the configs, tokenizers and scheduler of a model preset:
  ``-m sd15 --weights FILE`` (:func:`single_file`) or ``-m FILE`` (the preset is inferred from
  the keys with diffusers' ``infer_diffusers_model_type``). A file holding both EMA and raw UNet
  weights gives its EMA weights (what the released diffusers repos hold). Only the preset's small config files
  are needed (``difffeat download sd15 --configs-only`` on a connected machine).
* ``.ckpt``/``.pt``/``.pth``/``.bin`` pickles can run code when unpickled: difffeat never loads
  them as models. :func:`convert_to_safetensors` (``difffeat convert IN OUT``) reads their
  tensors once with ``torch.load(weights_only=True)`` and writes a safetensors file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import BadInputError, OfflineNotCachedError, UnknownNameError, UnsafeCheckpointError
from .registry import MODEL_TYPE_PRESETS  # diffusers' single-file model type -> preset (registry data)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors",)


@dataclass
class SingleFile:
    """A single-file checkpoint and the local folder holding its preset's configs."""

    path: str
    preset: str
    config_dir: str
    pending: set[str] = field(default_factory=set)  # weight components not loaded yet
    _state: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            from safetensors.torch import load_file

            self._state = load_file(self.path)
        return self._state

    def loaded(self, component: str) -> None:
        """Forget the tensors once every weight component has been built from them."""
        self.pending.discard(component)
        if not self.pending:
            self._state = None


_FILES: dict[str, SingleFile] = {}
_PRESET_OF: dict[str, str] = {}


def is_checkpoint_file(name: str) -> bool:
    return str(name).lower().endswith(PICKLE_SUFFIXES + SINGLE_FILE_SUFFIXES)


def refuse_pickle(path: str | os.PathLike) -> UnsafeCheckpointError:
    p = Path(path)
    return UnsafeCheckpointError(
        f"{p} is a pickled checkpoint ({p.suffix}) and difffeat never unpickles model files (they can run code); "
        f"convert it once with `difffeat convert {p} {p.with_suffix('.safetensors').name}` (reads tensors only, "
        f"torch.load(weights_only=True)) and pass the .safetensors file")


def single_file(path: str | os.PathLike, preset: str | None = None) -> str:
    """Register a ``.safetensors`` file to load with ``preset``'s configs; returns the name to pass as model."""
    from .registry import MODELS, single_file_preset

    key = str(path)
    if str(key).lower().endswith(PICKLE_SUFFIXES):
        raise refuse_pickle(key)
    if preset is not None:
        if preset not in MODELS or not single_file_preset(MODELS[preset]):
            valid = [n for n, p in MODELS.items() if single_file_preset(p)]
            raise UnknownNameError(f"--weights needs a diffusers model preset for its configs, not {preset!r}; "
                                   f"valid: {', '.join(sorted(valid))}")
        if key in _FILES and _FILES[key].preset != preset:
            del _FILES[key]  # seen before with other configs
        _PRESET_OF[key] = preset
    return key


def resolve_checkpoint(path: str) -> tuple[str, Any]:
    """(source, preset) of a checkpoint file: refuses pickles, finds the configs of a ``.safetensors``."""
    from .hub import usable_components
    from .loading import read_model_index
    from .registry import MODELS, resolve

    if path.lower().endswith(PICKLE_SUFFIXES):
        raise refuse_pickle(path)
    if not os.path.isfile(path):
        raise BadInputError(f"checkpoint file not found: {path}")
    if path not in _FILES:
        sf = SingleFile(path, "", "")
        sf.preset = _PRESET_OF.get(path) or infer_preset(sf)
        try:
            sf.config_dir, _ = resolve(sf.preset)
        except OfflineNotCachedError:
            raise OfflineNotCachedError(
                f"{path} needs the configs of {sf.preset}, which are not in the local cache (HF_HUB_OFFLINE is set); "
                f"on a connected machine run `difffeat download {sf.preset} --configs-only` and copy its HF_HOME "
                f"here") from None
        index = read_model_index(sf.config_dir)
        sf.pending = {c for c in usable_components(index) if not c.startswith(("tokenizer", "scheduler"))}
        _FILES[path] = sf
    return path, MODELS[_FILES[path].preset]


def infer_preset(sf: SingleFile) -> str:
    """The preset whose configs fit a single file, from its keys (diffusers' own detection)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    kind = infer_diffusers_model_type(sf.state_dict())
    if kind == "v2":
        raise BadInputError(f"{sf.path} is a Stable Diffusion 2.x file, and its keys do not tell 768-v from 512-base: "
                            f"pass -m sd21 --weights FILE (768, v-prediction) or -m sd21-base --weights FILE (512)")
    if kind not in MODEL_TYPE_PRESETS:
        raise BadInputError(f"cannot tell which model {sf.path} is (diffusers says {kind!r}); pass the preset "
                            f"its configs come from: -m PRESET --weights {sf.path}")
    return MODEL_TYPE_PRESETS[kind]


def registered(source: str) -> SingleFile | None:
    """The single file behind a source string, once :func:`resolve_checkpoint` has seen it."""
    return _FILES.get(source)


def load_single_file_component(sf: SingleFile, name: str, spec: list[str], dtype: torch.dtype | None) -> Any:
    """One component built from the single file (weights) and the preset's folder (config)."""
    from diffusers import pipelines
    from diffusers.loaders.single_file import load_single_file_sub_model
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        module = load_single_file_sub_model(
            library_name=spec[0], class_name=spec[1], name=name, checkpoint=sf.state_dict(), pipelines=pipelines,
            is_pipeline_module=False, cached_model_config_path=sf.config_dir, local_files_only=True, torch_dtype=dtype,
            **({"extract_ema": True} if name == "unet" else {}))  # EMA weights when both are stored (as released)
    except SingleFileComponentError:
        raise BadInputError(f"{sf.path} holds no {name} weights ({spec[1]}) in a layout diffusers reads for "
                            f"{sf.preset}; pass the preset it was trained from with -m PRESET --weights FILE") from None
    sf.loaded(name)
    return module


def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> int:
    """Read a pickled checkpoint's tensors with ``weights_only=True`` and write them as safetensors.

    Nested ``state_dict``/``model``/``module`` wrappers are unwrapped; keys are kept as they are.
    Returns the number of tensors written.
    """
    from safetensors.torch import save_file

    from .io import atomic_path

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise BadInputError(f"checkpoint file not found: {src}")
    if src.suffix == ".safetensors":
        raise BadInputError(f"{src} is already safetensors; pass it with -m FILE or --weights FILE")
    if dst.suffix != ".safetensors":
        raise BadInputError(f"output must end in .safetensors, not {dst.name}")
    if dst.exists() and not overwrite:
        raise BadInputError(f"{dst} exists; pass --overwrite to replace it")
    try:
        obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling anything but tensors and containers is refused by torch
        raise BadInputError(f"cannot read {src} with weights_only=True ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}); it holds more than tensors") from None
    state = _tensors(obj)
    if not state:
        raise BadInputError(f"{src} holds no tensors")
    with atomic_path(dst) as tmp:
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp), metadata={"converted_from": src.name})
    return len(state)


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and len(obj) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model", "module", "ema") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        return {}
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


__all__ = ["SingleFile", "convert_to_safetensors", "is_checkpoint_file", "refuse_pickle", "resolve_checkpoint",
           "single_file"]
