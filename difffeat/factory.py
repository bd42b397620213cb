"""``difffeat.create``: one entry point for every extractor (timm's ``create_model`` style)."""
from __future__ import annotations

from typing import Any, Sequence

from .backbone import DiffusionBackbone, load_backbone
from .errors import BadInputError
from .registry import MODELS, DEFAULT_MODEL, get_preset, method_presets, resolve


def _pick(value: Any, *defaults: Any) -> Any:
    if value is not None:
        return value
    for d in defaults:
        if d is not None:
            return d
    return None


def create(
    name: str | None = None,
    *,
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
    backbone: DiffusionBackbone | None = None,
    freeu: Any = None,
    window: int | None = None,
) -> Any:
    """Create a feature extractor from a model preset, a method preset, a local folder or a hub id.

    Model presets (``difffeat.list_models()``) bring their native resolution and the
    recommended layer/timestep; method presets (``difffeat.list_presets()``, YAML in
    ``configs/``) bring a paper's whole protocol. Any keyword given here overrides them.
    Returns a :class:`~difffeat.extractor.FeatureExtractor`, a
    :class:`~difffeat.dino.DinoExtractor` or a :class:`~difffeat.fusion.FusedExtractor`.

    ``attention_heads`` ("mean" or "all") shapes ``attn.*`` layers; ``use_t5=False`` never loads
    T5 text encoders (SD3, PixArt); ``prompt_cache`` is a folder of cached prompt embeddings
    (see :func:`~difffeat.backbone.load_backbone`). ``freeu`` turns FreeU on in the decoder
    (:mod:`difffeat.freeu`, GeoAware-SC); ``window`` runs ODISE's sliding window of that crop
    size over the prepared image (:mod:`difffeat.sliding`, SD-DINO / GeoAware-SC).
    """
    name = name or DEFAULT_MODEL
    settings: dict[str, Any] = {}
    if name in method_presets() and name not in MODELS:
        preset = get_preset(name)
        if "fusion" in preset.raw:
            from .fusion import FusedExtractor

            return FusedExtractor.from_preset(preset, dtype=dtype, device=device, random_weights=random_weights)
        settings = dict(preset.extract)
        name = str(settings.pop("model"))
    source, mp = resolve(name)
    if mp is not None and mp.family == "dinov2":
        from .dino import DinoExtractor

        return DinoExtractor(
            name, layers=_pick(layers, settings.get("layers"), mp.layers),
            resolution=_pick(resolution, settings.get("resolution"), mp.resolution),
            dtype=dtype, device=device, random_weights=random_weights,
        )
    bb = backbone or load_backbone(name, dtype=dtype, device=device, random_weights=random_weights,
                                   use_t5=use_t5, prompt_cache=prompt_cache)
    from .extractor import FeatureExtractor

    default_layers = mp.layers if mp else _default_layers(bb)
    ex = FeatureExtractor(
        bb,
        layers=_pick(layers, settings.get("layers"), default_layers),
        timesteps=_pick(timesteps, settings.get("timesteps"), mp.timesteps if mp else None, (min(261, bb.num_train_timesteps - 1),)),
        ensemble=int(_pick(ensemble, settings.get("ensemble"), mp.ensemble if mp else None, 1)),
        noise=_pick(noise, settings.get("noise"), "random"),
        seed=seed,
        latent=_pick(latent, settings.get("latent"), "mean"),
        prompt=_pick(prompt, settings.get("prompt"), ""),
        class_label=class_label,
        resolution=_pick(resolution, settings.get("resolution"), mp.resolution if mp else None),
        resize=_pick(resize, settings.get("resize"), mp.resize if mp else None, "resize"),
        max_batch=max_batch,
        compile=compile,
        early_exit=early_exit,
        attention_heads=attention_heads,
        freeu=_pick(freeu, settings.get("freeu")),
    )
    window = _pick(window, settings.get("window"))
    if window:
        from .sliding import SlidingWindow

        return SlidingWindow(ex, int(window))
    return ex


def _default_layers(bb: DiffusionBackbone) -> tuple[str, ...]:
    d = bb.denoiser
    if hasattr(d, "up_blocks"):
        return ("up.1",) if len(d.up_blocks) > 1 else ("mid",)
    if hasattr(d, "transformer_blocks"):
        return (f"block.{len(d.transformer_blocks) // 2}",)
    raise BadInputError(f"no default layer for {type(d).__name__}; pass layers=")


__all__ = ["create", "load_backbone"]
