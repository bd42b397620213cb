"""Where weights come from: the Hugging Face hub, its local cache, mirrors and renamed repositories.

A model preset names its sources in order (``ModelPreset.sources``: the canonical id, then
known mirrors) and the old ids it replaced (``aliases``). :func:`resolve_repo` turns a preset
or a hub id into a local snapshot folder of the HF cache, in this order:

1. a snapshot already in the local cache, under the requested id, a source or an old alias
   (used offline or not: a cluster node with ``HF_HUB_OFFLINE=1`` and a copied ``HF_HOME``);
2. offline and nothing cached: one line naming the ids looked for and ``difffeat download``;
3. online: each source in order (``model_index.json`` first, then the small config, tokenizer
   and scheduler files). Weights are fetched per component when a component is loaded
   (:func:`ensure_weights`), so AEROBLADE's autoencoders fetch only ``vae``/``movq``.

The four ways this fails are told apart, each in one line: offline with nothing cached
(:class:`~difffeat.errors.OfflineNotCachedError`), no such repository, tried A then B
(:class:`~difffeat.errors.RepoNotFoundError`), a gated repository
(:class:`~difffeat.errors.GatedRepoAccessError`) and a partial download
(:class:`~difffeat.errors.PartialDownloadError`).

Everything goes through huggingface_hub (``hf_hub_download``, ``snapshot_download``,
``try_to_load_from_cache``), so ``HF_HOME``/``HF_HUB_CACHE``/``HF_HUB_OFFLINE``/``HF_TOKEN`` are
honoured; they are read when a function runs, not when huggingface_hub was imported.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from .errors import (GatedRepoAccessError, OfflineNotCachedError, PartialDownloadError, RepoNotFoundError,
                     WeightsNotFoundError)

MARKER = {"diffusers": "model_index.json", "timm": "config.json"}
SMALL_PREFIXES = ("tokenizer", "scheduler")  # fetched whole with the configs
SKIPPED = ("safety_checker", "feature_extractor", "image_encoder")  # never loaded by difffeat
DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS = "diffusion_pytorch_model", "model"
AUTO_VARIANTS = ("fp16", "bf16")  # picked when a folder holds only these weight files
_NOTICES: set[str] = set()
T = TypeVar("T")


# ---------------------------------------------------------------- environment
def cache_dir() -> Path:
    """The hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``), read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_home() -> str:
    return os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (or as huggingface_hub read it at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in ("1", "on", "yes", "true") or (env == "" and bool(constants.HF_HUB_OFFLINE))


def notice(message: str) -> None:
    """One line on stderr, once per process."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------- what to look for
@dataclass(frozen=True)
class RepoSpec:
    """The hub ids to try for one request, in order, and what they hold."""

    label: str  # what the user typed (preset name or hub id)
    candidates: tuple[str, ...]  # tried online, in order
    aliases: tuple[str, ...] = ()  # old ids: looked up in the cache only
    kind: str = "diffusers"  # diffusers | timm
    gated: bool = False

    @property
    def cache_order(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.candidates + self.aliases))


def spec_for(name: str) -> RepoSpec:
    """The :class:`RepoSpec` of a preset name, or of a hub id (known ids bring their preset's sources)."""
    from .registry import MODELS, find_repo_preset, is_feature_model

    if name in MODELS:
        p = MODELS[name]
        kind = "timm" if is_feature_model(p) else "diffusers"
        cands = tuple(f"timm/{s}" for s in p.sources) if kind == "timm" else p.sources
        return RepoSpec(name, cands, p.aliases, kind, p.gated)
    p = find_repo_preset(name)
    if p is None:
        return RepoSpec(name, (name,))
    if name in p.aliases:
        return RepoSpec(name, p.sources, (name,) + tuple(a for a in p.aliases if a != name), gated=p.gated)
    rest = tuple(s for s in p.sources if s != name)
    return RepoSpec(name, (name,) + rest, p.aliases, gated=p.gated)


# ---------------------------------------------------------------- the cache
def cached_snapshot(repo_id: str, kind: str = "diffusers") -> Path | None:
    """The local snapshot folder of ``repo_id`` if its marker file is in the cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, MARKER[kind], cache_dir=str(cache_dir()))
    return Path(path).parent if isinstance(path, str) else None


def snapshot_repo(path: str | os.PathLike) -> tuple[str, str] | None:
    """(repo id, revision) of a folder ``.../models--ORG--NAME/snapshots/REV``, else None."""
    p = Path(path)
    if p.parent.name != "snapshots" or not p.parent.parent.name.startswith("models--"):
        return None
    return p.parent.parent.name[len("models--"):].replace("--", "/"), p.name


def repo_url(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}"


# ---------------------------------------------------------------- resolution
def resolve_repo(spec: RepoSpec, components: Sequence[str] | None = None) -> Path:
    """A local snapshot folder for ``spec``: the cache first, then each source in order online."""
    for rid in spec.cache_order:
        found = cached_snapshot(rid, spec.kind)
        if found is not None:
            if rid in spec.aliases:
                notice(f"using the cached copy of {rid} (removed from the hub; its successor is {spec.candidates[0]})")
            elif spec.label in spec.aliases:
                notice(f"{spec.label} is no longer on the hub; using {rid} instead")
            return found
    if spec.label in spec.aliases:
        notice(f"{spec.label} is no longer on the hub; trying {', then '.join(spec.candidates)} instead")
    if is_offline():
        raise offline_error(spec)
    return first_source(spec, lambda rid: fetch_metadata(rid, spec.kind, components))[1]


def first_source(spec: RepoSpec, fetch: Callable[[str], T]) -> tuple[str, T]:
    """(id, ``fetch(id)``) for the first of ``spec.candidates`` that exists on the hub.

    A gated repository stops the search with its own error; when none exists, the error names
    every id tried, in order.
    """
    errors = _hub_errors()
    tried: list[str] = []
    for rid in spec.candidates:
        try:
            return rid, fetch(rid)
        except errors.GatedRepoError:
            raise gated_error(rid) from None
        except errors.RepositoryNotFoundError:
            tried.append(rid)
        except errors.LocalEntryNotFoundError:  # no connection, and not in the cache
            raise OfflineNotCachedError(
                f"cannot reach the hub for {rid} and {spec.label!r} is not in the local cache (HF_HOME={hf_home()}); "
                f"check the connection, or run `difffeat download {spec.label}` where there is one and use its "
                f"HF_HOME with HF_HUB_OFFLINE=1") from None
        except errors.EntryNotFoundError:
            raise WeightsNotFoundError(
                f"{rid} exists but has no {MARKER[spec.kind]}: not a diffusers-format repository; download its "
                f".safetensors file (`hf download {rid} FILE`) and pass -m PRESET --weights FILE") from None
        except errors.HfHubHTTPError as e:
            raise WeightsNotFoundError(f"the hub refused {rid}: {str(e).splitlines()[0][:160]}") from None
    raise RepoNotFoundError(
        f"no hub repository for {spec.label}: tried {', then '.join(tried)} (not found or private); check the id, "
        f"or pass a local diffusers folder or a .safetensors file with -m")


def offline_error(spec: RepoSpec) -> OfflineNotCachedError:
    first = spec.candidates[0]
    return OfflineNotCachedError(
        f"{spec.label!r} is not available: nothing cached under {', '.join(spec.cache_order)} in "
        f"HF_HOME={hf_home()} and HF_HUB_OFFLINE is set; on a connected machine run `difffeat download "
        f"{spec.label}` (or `hf download {first}`) and copy its HF_HOME here, or pass a local folder with -m PATH")


def gated_error(repo_id: str) -> GatedRepoAccessError:
    return GatedRepoAccessError(
        f"{repo_id} is gated: accept its licence at {repo_url(repo_id)} while logged in, then run `hf auth login` "
        f"(or set HF_TOKEN) on this machine and retry")


def _hub_errors() -> Any:
    import huggingface_hub.errors as errors

    return errors


def fetch_metadata(repo_id: str, kind: str = "diffusers", components: Sequence[str] | None = None) -> Path:
    """Download the marker file (the existence probe), then the configs, tokenizers and scheduler."""
    from huggingface_hub import hf_hub_download, snapshot_download

    marker = Path(hf_hub_download(repo_id, MARKER[kind], cache_dir=str(cache_dir())))
    if kind == "diffusers":
        comps = list(components or usable_components(json.loads(marker.read_text())))
        snapshot_download(repo_id, revision=marker.parent.name, cache_dir=str(cache_dir()),
                          allow_patterns=metadata_patterns(comps))
    return marker.parent


def usable_components(index: dict[str, Any]) -> list[str]:
    """The components of a ``model_index.json`` that difffeat loads."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple))
            and v[0] is not None and k not in SKIPPED]


def is_small(component: str) -> bool:
    return component.startswith(SMALL_PREFIXES)


def metadata_patterns(components: Iterable[str]) -> list[str]:
    """``model_index.json``, each component's JSON files, and the whole small folders."""
    out = ["model_index.json"]
    for c in components:
        out.append(f"{c}/*" if is_small(c) else f"{c}/*.json")
    return out


def weight_patterns(component: str, variant: str | None = None) -> list[str]:
    """The weight files of one component: single or sharded safetensors, of one variant.

    ``variant="bin"`` names the legacy pickles of repos without safetensors (diffusers and
    transformers read them with ``torch.load(weights_only=True)``)."""
    if variant == "bin":
        return [f"{component}/{stem}{tail}" for stem in (DIFFUSERS_WEIGHTS, "pytorch_model")
                for tail in (".bin", "-*-of-*.bin", ".bin.index.json")]
    if variant:
        return [f"{component}/*.{variant}.safetensors", f"{component}/*.{variant}-*-of-*.safetensors",
                f"{component}/*.safetensors.index.{variant}.json"]
    return [f"{component}/{stem}{tail}" for stem in (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS)
            for tail in (".safetensors", "-*-of-*.safetensors", ".safetensors.index.json")]


def component_patterns(component: str, variant: str | None = None) -> list[str]:
    """Everything of one component that difffeat reads."""
    if is_small(component):
        return [f"{component}/*"]
    return [f"{component}/*.json", *weight_patterns(component, variant)]


# ---------------------------------------------------------------- weights of one component
@dataclass(frozen=True)
class WeightStatus:
    """What a component folder holds: ``variant`` to pass to ``from_pretrained``, or what is missing."""

    ok: bool
    variant: str | None = None
    missing: str = ""  # a file name relative to the snapshot, when not ok


def weight_status(folder: Path, component: str) -> WeightStatus:
    """Whether ``folder/component`` holds a config and complete weights (fp32 or one variant)."""
    sub = folder / component
    if not (sub / "config.json").exists():
        return WeightStatus(False, missing=f"{component}/config.json")
    names = {p.name for p in sub.iterdir() if p.exists()}  # exists(): a broken cache symlink is missing
    for index in sorted((n for n in names if ".safetensors.index." in n), key=lambda n: not n.endswith(".index.json")):
        shards = sorted(set(json.loads((sub / index).read_text()).get("weight_map", {}).values()))
        lost = [s for s in shards if s not in names]
        if lost:
            return WeightStatus(False, missing=f"{component}/{lost[0]}")
        variant = index.split(".index.")[1].removesuffix("json").rstrip(".")
        return WeightStatus(True, variant or None)
    for stem in (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, "pytorch_model"):
        if f"{stem}.safetensors" in names or f"{stem}.bin" in names:
            return WeightStatus(True)
    # reduced-precision variants only: a non_ema/ema-only folder is not silently read as the release weights
    variants = {n.split(".")[-2] for n in names if n.endswith(".safetensors") and n.count(".") >= 2}
    for variant in AUTO_VARIANTS:
        if variant in variants:
            return WeightStatus(True, variant)
    return WeightStatus(False, missing=f"{component}/{_expected_weights(sub)}")


def _expected_weights(sub: Path) -> str:
    cfg = json.loads((sub / "config.json").read_text())
    return f"{TRANSFORMERS_WEIGHTS if 'architectures' in cfg or 'model_type' in cfg else DIFFUSERS_WEIGHTS}.safetensors"


def ensure_weights(folder: Path, component: str, label: str | None = None) -> WeightStatus:
    """Make sure a hub snapshot holds ``component``'s weights, fetching them when online.

    Tries the full-precision safetensors first, then the ``fp16`` variant (repos that ship only
    that), then legacy ``.bin`` files.
    Raises :class:`PartialDownloadError` naming the component and the missing file.
    """
    status = weight_status(folder, component)
    where = snapshot_repo(folder)
    if status.ok or where is None:
        return status
    repo, rev = where
    if not is_offline():
        from huggingface_hub import snapshot_download

        for variant in (None, "fp16", "bin"):
            snapshot_download(repo, revision=rev, cache_dir=str(cache_dir()),
                              allow_patterns=[f"{component}/*.json", *weight_patterns(component, variant)])
            status = weight_status(folder, component)
            if status.ok:
                return status
    raise PartialDownloadError(
        f"incomplete download of {label or repo} in {folder}: component {component!r} is missing {status.missing}; "
        f"run `difffeat download {label or repo}` (resumes){' on a connected machine' if is_offline() else ''} "
        f"or `hf download {repo} --include '{component}/*'`")


__all__ = ["RepoSpec", "WeightStatus", "cache_dir", "cached_snapshot", "component_patterns", "ensure_weights",
           "fetch_metadata", "first_source", "is_offline", "metadata_patterns", "notice", "resolve_repo", "snapshot_repo", "spec_for",
           "weight_patterns", "weight_status"]
