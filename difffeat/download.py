"""``difffeat download``: fetch exactly the parts of a model that difffeat loads, into the HF cache.

The cluster workflow: a connected login node runs ``difffeat download sd21 dinov2-b`` (or a
method preset: ``dift``, ``sd-dino``, ``cifar10``, ``aeroblade``), then GPU nodes run offline
with ``HF_HUB_OFFLINE=1`` and the same ``HF_HOME``. Files go through huggingface_hub's
``snapshot_download`` with ``allow_patterns`` naming the preset's components (never the
safety checker or feature extractor), so an interrupted download resumes when rerun, and the
hub's progress bar is shown.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import BadInputError, one_of

TIMM_FILES = ["config.json", "model.safetensors"]


@dataclass(frozen=True)
class Downloaded:
    """Where a download landed and how big that snapshot is on disk."""

    target: str
    repo_id: str
    path: Path
    size: int

    @property
    def size_text(self) -> str:
        return f"{self.size / 1e9:.2f} GB" if self.size >= 1e8 else f"{self.size / 1e6:.1f} MB"


def targets(names: Iterable[str]) -> list[tuple[str, tuple[str, ...] | None]]:
    """(model or hub id, components or None) for each name; method presets and task configs
    expand into every model they use (AEROBLADE: each autoencoder's component only)."""
    from .registry import MODELS, WEIGHT_SOURCES, is_local_or_hub, method_presets, task_configs

    configs = {str(d.get("name", p.stem)): d for p, d in task_configs()}
    configs.update({k: v.raw for k, v in method_presets().items()})
    out: list[tuple[str, tuple[str, ...] | None]] = []
    for name in names:
        if name in MODELS:
            out.append((name, None))
        elif name in WEIGHT_SOURCES:
            out.append((WEIGHT_SOURCES[name].hub_id, WEIGHT_SOURCES[name].components))
        elif name in configs or f"dc-{name}" in configs:
            found = list(_models_in(configs.get(name) or configs[f"dc-{name}"]))
            if not found:
                raise BadInputError(f"{name} names no downloadable model (pass -m with a local folder)")
            out.extend(found)
        elif is_local_or_hub(name) and not os.path.exists(name):
            out.append((name, None))
        else:
            raise one_of("model", name, list(MODELS) + list(WEIGHT_SOURCES) + list(configs))
    return list(dict.fromkeys(out))


def _models_in(data: Any) -> Iterable[tuple[str, tuple[str, ...] | None]]:
    """Every ``model:`` string of a YAML preset, with its sibling ``component:`` if any."""
    from .registry import MODELS, find_repo_preset

    if isinstance(data, dict):
        model = data.get("model")
        if isinstance(model, str) and (model in MODELS or find_repo_preset(model) or model.count("/") == 1):
            comp = data.get("component")
            yield model, (str(comp),) if comp else None
        for v in data.values():
            yield from _models_in(v)
    elif isinstance(data, list):
        for v in data:
            yield from _models_in(v)


def download(target: str, components: Sequence[str] | None = None, variant: str | None = None,
             configs_only: bool = False) -> Downloaded:
    """Fetch ``target`` (a preset or hub id) from its first source that exists; see the module doc."""
    from .hub import first_source, is_offline, spec_for

    if is_offline():
        raise BadInputError("difffeat download needs the network but HF_HUB_OFFLINE is set; unset it on a "
                            "connected machine")
    spec = spec_for(target)
    fetch = _fetch_timm if spec.kind == "timm" else (lambda rid: _fetch(rid, target, components, variant, configs_only))
    rid, path = first_source(spec, fetch)
    return Downloaded(target, rid, path, snapshot_size(path))


def _fetch_timm(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    from .hub import cache_dir

    return Path(snapshot_download(repo_id, allow_patterns=TIMM_FILES, cache_dir=str(cache_dir())))


def _fetch(repo_id: str, target: str, components: Sequence[str] | None, variant: str | None,
           configs_only: bool) -> Path:
    """``model_index.json`` (the existence probe), then the chosen components' files."""
    import json

    from huggingface_hub import hf_hub_download, snapshot_download

    from .hub import cache_dir, component_patterns, ensure_weights, is_small, metadata_patterns, usable_components
    from .registry import MODELS, find_repo_preset

    marker = Path(hf_hub_download(repo_id, "model_index.json", cache_dir=str(cache_dir())))
    available = usable_components(json.loads(marker.read_text()))
    preset = MODELS.get(target) or find_repo_preset(target)
    comps = list(components or (preset.components if preset and preset.components else available))
    unknown = [c for c in comps if c not in available]
    if unknown:
        raise BadInputError(f"{repo_id} has no component {unknown[0]!r}; it has {', '.join(available)}")
    patterns = metadata_patterns(comps) if configs_only else \
        ["model_index.json", *(p for c in comps for p in component_patterns(c, variant))]
    path = Path(snapshot_download(repo_id, revision=marker.parent.name, allow_patterns=patterns,
                                  cache_dir=str(cache_dir())))
    if not configs_only:
        for c in comps:
            if not is_small(c):
                ensure_weights(path, c, target)  # falls back to fp16 / .bin when the repo lacks these files
    return path


def snapshot_size(path: Path) -> int:
    """Bytes on disk of a snapshot (each cached blob counted once)."""
    blobs = {os.path.realpath(p) for p in Path(path).rglob("*") if p.is_file()}
    return sum(os.path.getsize(b) for b in blobs)


__all__ = ["Downloaded", "download", "snapshot_size", "targets"]
