"""``difffeat.create``: one entry point for every extractor (timm's ``create_model`` style).

Settings resolve by one rule (:func:`difffeat.presets.precedence`): the keywords given here
over the method preset over the model preset over the library defaults.
"""
from __future__ import annotations

from typing import Any, Sequence

from .backbone import DiffusionBackbone, load_backbone
from .errors import BadInputError
from .presets import precedence
from .protocol import Extractor
from .registry import DEFAULT_MODEL, MODELS, get_preset, is_feature_model, method_presets, resolve

# what a fusion preset fixes per source (give them in its YAML, or build the FusedExtractor yourself)
_PER_SOURCE = ("layers", "timesteps", "ensemble", "noise", "latent", "prompt", "class_label", "resolution", "resize",
               "freeu", "window", "adaln", "discard_channels")


def create(
    name: str | None = None,
    *,
    model: str | None = None,
    layers: Sequence[str] | str | None = None,
    timesteps: Sequence[int] | int | None = None,
    ensemble: int | None = None,
    noise: str | None = None,
    seed: int = 0,
    latent: str | None = None,
    prompt: str | None = None,
    class_label: int | None = None,
    resolution: int | None = None,
    resize: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    max_batch: int = 16,
    compile: bool = False,
    early_exit: bool = True,
    random_weights: bool = False,
    attention_heads: str = "mean",
    use_t5: bool = True,
    prompt_cache: str | None = None,
    fusion: dict[str, Any] | None = None,
    weights: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    backbone: DiffusionBackbone | None = None,
    freeu: Any = None,
    window: int | None = None,
    adaln: bool | None = None,
    discard_channels: Sequence[int] | None = None,
    denoiser_weights: str | None = None,
    time_shift: bool | None = None,
) -> Extractor:
    """Create a feature extractor from a model preset, a method preset, a local folder or a hub id.

    Model presets (``difffeat.list_models()``) bring their native resolution and the
    recommended layer/timestep; method presets (``difffeat.list_presets()``, YAML in
    ``configs/``) bring a paper's whole protocol. Any keyword given here overrides them;
    ``model=`` runs a method preset's protocol on another model. Returns an
    :class:`~difffeat.protocol.Extractor`: a :class:`~difffeat.extractor.FeatureExtractor`,
    :class:`~difffeat.dino.DinoExtractor` or :class:`~difffeat.fusion.FusedExtractor`;
    ``create(**ex.config)`` rebuilds it.

    ``attention_heads`` ("mean" or "all") shapes ``attn.*`` layers; ``use_t5=False`` never loads
    T5 text encoders (SD3, PixArt); ``prompt_cache`` is a folder of cached prompt embeddings
    (see :func:`~difffeat.backbone.load_backbone`). ``fusion`` is a fusion spec as the YAML
    presets write it; ``weights`` / ``model_kwargs`` go to DINOv2 (a local file, timm kwargs).
    ``freeu`` turns FreeU on in the decoder (:mod:`difffeat.freeu`, GeoAware-SC); ``window`` runs
    ODISE's sliding window of that crop size over the prepared image (:mod:`difffeat.sliding`,
    SD-DINO / GeoAware-SC).
    ``adaln`` / ``discard_channels``: DiTF's post-processing (FLUX, SD3; :mod:`difffeat.adaln`).
    ``denoiser_weights``: a diffusers-format state dict (``FILE`` or ``REPO:FILE``) replacing the
    denoiser's weights (CleanDIFT; :mod:`difffeat.denoiser_weights`); method presets may set it.
    ``time_shift``: FLUX's resolution-dependent shift of t (see :func:`~difffeat.backbone.load_backbone`).
    """
    given = dict(layers=layers, timesteps=timesteps, ensemble=ensemble, noise=noise, latent=latent, prompt=prompt,
                 class_label=class_label, resolution=resolution, resize=resize, freeu=freeu, window=window,
                 adaln=adaln, discard_channels=discard_channels)
    common = dict(dtype=dtype, device=device, random_weights=random_weights, max_batch=max_batch, compile=compile,
                  seed=seed, use_t5=use_t5, prompt_cache=prompt_cache)
    settings: dict[str, Any] = {}
    preset = get_preset(name) if name in method_presets() and name not in MODELS else None
    if fusion is not None or (preset is not None and "fusion" in preset.raw):
        return _create_fused(name or "fused", fusion or preset.raw["fusion"], preset, model, given, common)  # type: ignore[union-attr]
    if preset is not None:  # a method preset's extraction settings (its other keys belong to its task)
        settings = {k: v for k, v in preset.extract.items() if k in _PER_SOURCE}
        name = str(preset.extract["model"])
    elif model is not None and name is not None and model != name:
        raise BadInputError(f"model={model!r} conflicts with {name!r}; pass one model (model= overrides method presets)")
    name = model or name or DEFAULT_MODEL
    _, mp = resolve(name)
    model_defaults = {} if mp is None else dict(layers=mp.layers, timesteps=mp.timesteps, ensemble=mp.ensemble,
                                                resolution=mp.resolution, resize=mp.resize)
    if is_feature_model(mp):
        from .dino import DinoExtractor

        opts = precedence(given, settings, model_defaults)
        return DinoExtractor(name, layers=opts["layers"], resolution=opts["resolution"], resize=opts["resize"],
                             dtype=dtype, device=device, random_weights=random_weights, weights=weights, **(model_kwargs or {}))
    swap = denoiser_weights or (preset.extract.get("denoiser_weights") if preset is not None else None)
    bb = backbone or load_backbone(name, dtype=dtype, device=device, random_weights=random_weights,
                                   use_t5=use_t5, prompt_cache=prompt_cache, denoiser_weights=swap,
                                   time_shift=bool(time_shift))
    return _create_diffusion(bb, precedence(given, settings, model_defaults), seed=seed, max_batch=max_batch,
                             compile=compile, early_exit=early_exit, attention_heads=attention_heads)


def _create_diffusion(bb: DiffusionBackbone, opts: dict[str, Any], **fixed: Any) -> Extractor:
    """The diffusion extractor of merged options (library defaults last), in ODISE's sliding window
    when ``window`` is set."""
    from .extractor import FeatureExtractor

    library = dict(layers=_default_layers(bb), timesteps=(min(261, bb.num_train_timesteps - 1),), ensemble=1,
                   noise="random", latent="mean", prompt="", resize="resize", adaln=False, discard_channels=())
    opts = precedence(opts, library)
    window = opts.pop("window")
    ex = FeatureExtractor(bb, **fixed, **{**opts, "ensemble": int(opts["ensemble"])})
    if window:
        from .sliding import SlidingWindow

        return SlidingWindow(ex, int(window))
    return ex


def _create_fused(name: str, spec: dict[str, Any], preset: Any, model: str | None, given: dict[str, Any],
                  common: dict[str, Any]) -> Extractor:
    """A fusion preset (or spec): its sources fix their own layers, timesteps and geometry."""
    from .fusion import FusedExtractor

    fixed = [k for k in _PER_SOURCE if given.get(k) is not None]
    if fixed:
        raise BadInputError(f"{name} is a fusion preset whose sources fix {', '.join(fixed)}; "
                            "copy its YAML (difffeat models lists it) and edit the sources instead")
    spec = dict(spec)
    if model is not None:  # model= replaces the preset's diffusion model in its sources
        base = (preset.extract.get("model") if preset is not None else None)
        spec["sources"] = [dict(s, model=model) if s.get("model") == base else s for s in spec["sources"]]
    return FusedExtractor.from_spec(spec, name=name, **common)


def _default_layers(bb: DiffusionBackbone) -> tuple[str, ...]:
    d = bb.denoiser
    if hasattr(d, "up_blocks"):
        return ("up.1",) if len(d.up_blocks) > 1 else ("mid",)
    if hasattr(d, "transformer_blocks"):
        return (f"block.{len(d.transformer_blocks) // 2}",)
    raise BadInputError(f"no default layer for {type(d).__name__}; pass layers=")


__all__ = ["create", "load_backbone"]
