"""One registry of model presets and method presets, with timm-like ergonomics.

* **Model presets** name a checkpoint (hub id) and its native extraction defaults.
* **Method presets** are YAML files in ``configs/`` (installed as ``difffeat.configs``)
  that reproduce a paper's protocol: model, timesteps, layers, ensemble, resolution,
  prompt, fusion and matching. Each carries its citation and published numbers.

``create(name, **overrides)`` accepts either kind, a diffusers-format local folder or
a hub id, and returns a ready feature extractor.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import one_of


@dataclass(frozen=True)
class ModelPreset:
    """A named checkpoint and the extraction defaults recommended for it."""

    name: str
    hub_id: str
    family: str  # sd | sdxl | pixel | dit | sd3 | pixart | dinov2
    resolution: int
    layers: tuple[str, ...]
    timesteps: tuple[int, ...] = (0,)
    ensemble: int = 1
    resize: str = "resize"
    source: str = ""  # where the default layer/t come from ("unvalidated" if nowhere)
    description: str = ""


_DIFT_SRC = "DIFT (Tang et al., NeurIPS 2023): SD-2.1 up.1 at t=261, ensemble 8 — SPair-71k PCK@0.1(bbox) 52.9"
_DDAE_SRC = (
    "DDAE++ (Xiang et al. 2025, arXiv:2505.10999): for DiT, linear probing is best on the middle blocks at "
    "small t; the exact block (14 of 28) and t=100 here are unvalidated"
)
_CLEANDIFT_SRC = (
    "CleanDIFT (Stracke et al., CVPR 2025) reports PixArt (and FLUX) features underperform SD 1.x/2.x for "
    "semantic correspondence: prefer sd21 there"
)
# middle block; t with the signal-to-noise ratio of DIFT's t=261 on SD (alpha_bar = 0.656)
_SNR_SRC = "unvalidated: middle block, t={t} = the {model} timestep ({what}) with the SNR of DIFT's SD t=261"

MODELS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset(
            "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, ("up.1",), (261,), 8,
            source="DIFT's SD-1.5 setting (up.1, t=261); SD-DINO uses t=100 on up.0-up.2",
            description="Stable Diffusion 1.5, 512², epsilon-prediction, CLIP ViT-L/14 text encoder.",
        ),
        ModelPreset(
            "sd21-base", "stabilityai/stable-diffusion-2-1-base", "sd", 512, ("up.1",), (261,), 8,
            source="DIFT layer/t transferred to the 512² base model (unvalidated for this checkpoint)",
            description="Stable Diffusion 2.1-base, 512², epsilon-prediction, OpenCLIP ViT-H text encoder.",
        ),
        ModelPreset(
            "sd21", "stabilityai/stable-diffusion-2-1", "sd", 768, ("up.1",), (261,), 8,
            source=_DIFT_SRC,
            description="Stable Diffusion 2.1, 768², v-prediction, OpenCLIP ViT-H text encoder.",
        ),
        ModelPreset(
            "sdxl-base", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024, ("up.0",), (261,), 8,
            source="unvalidated: DIFT-style choice (first up block at stride 16, 1280 ch, t=261)",
            description="SDXL base 1.0, 1024², two text encoders, added size conditioning.",
        ),
        # Transformers. Layer names: block.i (0-based) and final; see difffeat.layers.
        *[
            ModelPreset(
                f"dit-xl-2-{res}", f"facebook/DiT-XL-2-{res}", "dit", res, ("block.14",), (100,), 1,
                source=_DDAE_SRC,
                description=f"DiT-XL/2 (Peebles & Xie 2023), ImageNet class-conditional {res}², 28 blocks x 1152, "
                "patch 2, learned sigma; unconditional = null class 1000 (the default).",
            )
            for res in (256, 512)
        ],
        ModelPreset(
            "sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", 1024, ("block.12",), (420,), 1,
            source=_SNR_SRC.format(model="SD3", t=420, what="flow sigma = t/1000"),
            description="Stable Diffusion 3 medium: MM-DiT, 24 joint blocks x 1536, rectified flow, CLIP-L + CLIP-G "
            "(+ T5, optional: use_t5=False feeds zeros as diffusers does without text_encoder_3).",
        ),
        ModelPreset(
            "sd35-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", 1024, ("block.12",), (420,), 1,
            source=_SNR_SRC.format(model="SD3.5", t=420, what="flow sigma = t/1000"),
            description="Stable Diffusion 3.5 medium: MMDiT-X, 24 joint blocks x 1536 (blocks 0-12 with an extra "
            "image self-attention), QK-norm, rectified flow, CLIP-L + CLIP-G (+ optional T5).",
        ),
        ModelPreset(
            "pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart", 1024, ("block.14",), (200,), 1,
            source=_CLEANDIFT_SRC + "; " + _SNR_SRC.format(model="PixArt", t=200, what="linear betas"),
            description="PixArt-Σ XL/2 1024² (diffusers format): 28 blocks x 1152, cross-attention to 300 T5 tokens.",
        ),
        ModelPreset(
            "pixart-alpha", "PixArt-alpha/PixArt-XL-2-1024-MS", "pixart", 1024, ("block.14",), (200,), 1,
            source=_CLEANDIFT_SRC + "; " + _SNR_SRC.format(model="PixArt", t=200, what="linear betas"),
            description="PixArt-α XL/2 1024²: 28 blocks x 1152, 120 T5 tokens, resolution/aspect-ratio conditioning.",
        ),
    ]
}

# The embedded default model: trained by difffeat on its procedural shapes world only
# (see difffeat/assets/difffeat-tiny/model_card.md). Real images need sd21 and friends.
TINY_DIR = Path(__file__).parent / "assets" / "difffeat-tiny"
MODELS["difffeat-tiny"] = ModelPreset(
    "difffeat-tiny", str(TINY_DIR), "pixel", 64, ("up.0",), (100,), 1, resize="resize",
    source="measured on held-out shapes scenes (model card): up.0 (stride 4) beats up.1, mid and up.2 on "
    "linear-probe accuracy (1024 val / 256 test scenes: 35.5% vs 27.7% for up.1) and PCK@0.1 (64 warped pairs, "
    "image-normalised: 96.1% vs 91.1%); t in 25-100 is flat, 200 and 400 are worse; ensemble 4 instead of 1 "
    "changes up.0 by under 1 point at 4x the cost",
    description="Tiny class-conditional pixel UNet trained on difffeat.data.shapes (64², knows only that world).",
)
DEFAULT_MODEL = "difffeat-tiny"

# DINOv2 through timm (Oquab et al. 2023). Layer names are block.i (0-based).
for _size, _depth in (("s", 12), ("b", 12), ("l", 24), ("g", 40)):
    _arch = {"s": "small", "b": "base", "l": "large", "g": "giant"}[_size]
    for _reg in ("", "_reg4"):
        _name = f"dinov2-{_size}{'-reg4' if _reg else ''}"
        MODELS[_name] = ModelPreset(
            _name, f"vit_{_arch}_patch14{_reg}_dinov2.lvd142m", "dinov2", 518 if _size != "s" else 518,
            (f"block.{_depth - 1}",), (0,), 1, resize="snap",
            source="SD-DINO uses DINOv2-B/14 block 11 tokens",
            description=f"DINOv2 ViT-{_size.upper()}/14{' with 4 registers' if _reg else ''} (timm).",
        )


@dataclass(frozen=True)
class MethodPreset:
    """A paper protocol loaded from a YAML file in configs/."""

    name: str
    task: str
    path: str
    extract: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def citation(self) -> str:
        return str(self.raw.get("citation", ""))


def _config_root() -> Path:
    try:
        return Path(str(resources.files("difffeat.configs")))
    except ModuleNotFoundError:  # running from a source tree without installing
        return Path(__file__).resolve().parent.parent / "configs"


@functools.lru_cache(maxsize=1)
def method_presets() -> dict[str, MethodPreset]:
    """All YAML method presets (files with top-level ``name`` and ``extract`` keys)."""
    out: dict[str, MethodPreset] = {}
    for path in sorted(_config_root().rglob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and "name" in data and "extract" in data:
            out[str(data["name"])] = MethodPreset(
                str(data["name"]), str(data.get("task", "")), str(path), dict(data["extract"]), data
            )
    return out


def task_configs() -> list[tuple[Path, dict[str, Any]]]:
    """The YAML files under ``configs/`` that are not method presets: a task command's own
    settings (``detect --preset``, ``train seg --config``), each with a top-level ``task``."""
    presets = {Path(p.path) for p in method_presets().values()}
    out = []
    for path in sorted(_config_root().rglob("*.yaml")):
        if path in presets:
            continue
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and "task" in data:
            out.append((path, data))
    return out


def list_models(pattern: str = "*") -> list[str]:
    """Model preset names matching a glob ``pattern`` (timm-style)."""
    import fnmatch

    return sorted(n for n in MODELS if fnmatch.fnmatch(n, pattern))


def list_presets(task: str | None = None) -> list[str]:
    """Method preset names, optionally only those of one task."""
    return sorted(n for n, p in method_presets().items() if task is None or p.task == task)


def get_model(name: str) -> ModelPreset:
    if name not in MODELS:
        raise one_of("model", name, list(MODELS))
    return MODELS[name]


def get_preset(name: str) -> MethodPreset:
    presets = method_presets()
    if name not in presets:
        raise one_of("preset", name, list(presets))
    from .validate import check_preset

    check_preset(presets[name].raw, presets[name].path)
    return presets[name]


def is_local_or_hub(name: str) -> bool:
    """A local folder, or something shaped like a hub id (``org/name``)."""
    return os.path.isdir(name) or (name.count("/") == 1 and not name.startswith((".", "/")))


def resolve(name: str) -> tuple[str, ModelPreset | None]:
    """Map a preset name, local folder or hub id to (source, preset or None).

    Unknown plain names raise one line that lists the valid model and preset names.
    """
    if name in MODELS:
        return MODELS[name].hub_id, MODELS[name]
    if is_local_or_hub(name):
        return name, None
    raise one_of("model", name, list(MODELS) + list(method_presets()))


def with_overrides(preset: ModelPreset, **kw: Any) -> ModelPreset:
    return replace(preset, **{k: v for k, v in kw.items() if v is not None})
