"""State behind the explore app: one backbone, extractors per setting, cached features.

Everything here is plain Python (no Gradio): the app's callbacks call it, and the tests
drive it directly. A :class:`Session` loads its model once; extractors for other layers or
timesteps share that backbone (``difffeat.create(..., backbone=bb)``), and features of an
image are computed once per (image content, settings) and then served from an LRU cache,
so clicking around an image pair costs a matmul, never a denoiser forward.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from difffeat.errors import BadInputError
from difffeat.io import load_image

#: Largest accepted upload (pixels): beyond this a CPU session would stall for minutes.
MAX_PIXELS = 4096 * 4096
#: Feature maps kept per session (each a few MB for difffeat-tiny, tens of MB for SD).
CACHE_ENTRIES = 32
#: Images shown smaller than this (longest side, pixels) are enlarged by an integer factor.
VIEW_SIDE = 256
#: Block-level layer names offered in the pickers, when the model has them.
BLOCK_PREFIXES = ("down.", "mid", "up.")


def load_upload(path: str | os.PathLike | None, what: str = "image") -> Image.Image:
    """An uploaded file as RGB, through :func:`difffeat.io.load_image`; bad files raise one line.

    The header is read first so a huge image is refused before it is decoded.
    """
    if path is None or str(path) == "":
        raise BadInputError(f"no {what}: upload one or pick a scene")
    name = Path(path).name
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise BadInputError(f"cannot read {what} {name}: {e}") from None
    except Exception:  # noqa: BLE001 - unreadable: the loader below reports it in one line
        w = h = 0
    if w * h > MAX_PIXELS:
        raise BadInputError(f"{what} {name} is {w}x{h} pixels; the explorer takes at most "
                            f"{MAX_PIXELS / 1e6:.0f} megapixels: downscale it first")
    return load_image(path)


def content_key(image: Image.Image) -> str:
    """A hash of the pixels and size of a PIL image (the feature cache's image key)."""
    h = hashlib.sha1(f"{image.size}{image.mode}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def view_scale(size_wh: tuple[int, int]) -> int:
    """Integer enlargement for display: small images (64x64 scenes) are shown at >= VIEW_SIDE."""
    return max(1, VIEW_SIDE // max(1, max(size_wh)))


def enlarge(image: Image.Image, scale: int) -> Image.Image:
    return image if scale == 1 else image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def click_to_pixel(index: Any, size_wh: tuple[int, int], scale: int) -> tuple[int, int]:
    """The original pixel ``(x, y)`` under a click at display pixel ``index`` (Gradio's
    ``SelectData.index``: ``[x, y]`` in the shown image, or None outside it)."""
    if index is None or not isinstance(index, (list, tuple)) or len(index) != 2:
        raise BadInputError("the click was outside the source image: click on the image itself")
    x, y = int(index[0]) // scale, int(index[1]) // scale
    w, h = size_wh
    if not (0 <= x < w and 0 <= y < h):
        raise BadInputError(f"point (x={x}, y={y}) is outside the source image ({w}x{h} pixels)")
    return x, y


class LRU:
    """A small least-recently-used cache; ``computed`` counts misses (what the tests check)."""

    def __init__(self, size: int = CACHE_ENTRIES) -> None:
        self.size, self.computed = size, 0
        self._d: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        value = make()
        self.computed += 1
        self._d[key] = value
        if len(self._d) > self.size:
            self._d.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._d)


@dataclass
class Scene:
    """A bundled shapes scene and its second view under a known homography."""

    name: str
    image: Image.Image
    view2: Image.Image
    label: str


def shapes_scenes(n: int = 6, seed: int = 0) -> list[Scene]:
    """Held-out scenes of :mod:`difffeat.data.shapes` (``split="test"``), rendered in memory."""
    from difffeat.data.shapes import CLASSES, render_pair

    b = render_pair(n, seed=seed, split="test")
    return [Scene(f"scene {i} ({CLASSES[int(b.label[i])]})", Image.fromarray(b.image[i].numpy()),
                  Image.fromarray(b.image2[i].numpy()), CLASSES[int(b.label[i])]) for i in range(n)]


class Session:
    """One model for the app's lifetime, its extractors and the feature cache.

    Args:
        model: model preset, local diffusers folder or hub id (default: the preset's model,
            else ``difffeat-tiny``).
        preset: the default correspondence preset of the Correspond tab.
        device, dtype: where and how the model runs (defaults: cuda + bf16 if available).
        seed: noise seed of every extraction (features are deterministic per image).
    """

    def __init__(self, model: str | None = None, preset: str | None = None, device: str | None = None,
                 dtype: str | None = None, seed: int = 0, scenes: int = 6) -> None:
        from difffeat.registry import DEFAULT_MODEL, get_preset

        self.preset = preset or "dift"
        p = get_preset(self.preset)  # an unknown --preset fails at start, with the valid names
        if p.task != "correspond":
            raise BadInputError(f"--preset {self.preset} is a {p.task or 'feature'} preset; explore takes a "
                                "correspondence preset (difffeat models lists them)")
        own = p.extract.get("model") if preset else None  # a fusion preset: its diffusion model
        self.model = model or own or DEFAULT_MODEL
        self.device, self.dtype, self.seed = device, dtype, seed
        self.scenes = shapes_scenes(scenes, seed)
        self.cache = LRU()
        self._extractors = LRU(8)
        self._bb: Any = None

    # ---------------------------------------------------------------- model
    @property
    def backbone(self) -> Any:
        """The session's diffusion backbone, loaded on first use."""
        if self._bb is None:
            from difffeat.backbone import load_backbone

            self._bb = load_backbone(self.model, dtype=self.dtype, device=self.device)
        return self._bb

    def model_defaults(self) -> dict[str, Any]:
        """Resolution, layer, t and ensemble of the session's model preset (or the backbone's)."""
        from difffeat.registry import MODELS

        p = MODELS.get(self.model)
        if p is not None:
            return {"resolution": p.resolution, "layer": p.layers[0], "t": int(p.timesteps[0]), "ensemble": p.ensemble}
        bb = self.backbone
        res = int(bb.denoiser.config.get("sample_size", 64) or 64) * bb.latent_scale
        return {"resolution": res, "layer": "up.1", "t": 261, "ensemble": 1}

    def layer_names(self) -> list[str]:
        """Block-level layer names of the model, in run order (the pickers' choices)."""
        from difffeat.extractor import probe_layers

        bb = self.backbone
        if getattr(bb, "_layer_probe", None) is None:
            bb._layer_probe = probe_layers(bb)
        info = sorted(bb._layer_probe.items(), key=lambda kv: kv[1][0])
        names = [n for n, _ in info if n.startswith(BLOCK_PREFIXES) and n.count(".") <= 1]
        return names or [n for n, _ in info]

    def check_layer(self, layer: str) -> None:
        names = self.layer_names()
        if layer not in names and not layer.startswith("attn."):
            from difffeat.errors import one_of

            raise one_of("layer", layer, names)

    def check_t(self, t: int) -> int:
        n = int(self.backbone.num_train_timesteps)
        if not 0 <= int(t) < n:
            raise BadInputError(f"t={t} is outside [0, {n - 1}] for {self.model}")
        return int(t)

    def extractor(self, layers: tuple[str, ...], timesteps: tuple[int, ...], **kw: Any) -> Any:
        """An extractor on the session's backbone for these settings (built once per setting)."""
        from difffeat.factory import create

        d = self.model_defaults()
        opts = {"ensemble": d["ensemble"], "resolution": d["resolution"], "seed": self.seed, **kw}
        key = (tuple(layers), tuple(int(t) for t in timesteps), tuple(sorted(opts.items())))
        return self._extractors.get(key, lambda: create(self.model, backbone=self.backbone, layers=list(layers),
                                                        timesteps=[int(t) for t in timesteps], **opts))

    def cached(self, image: Image.Image, settings: Hashable, make: Callable[[], Any]) -> Any:
        """``make()`` once per (image content, settings); later calls hit the cache."""
        return self.cache.get((content_key(image), settings), make)

    def feature_maps(self, image: Image.Image, layers: tuple[str, ...], timesteps: tuple[int, ...],
                     **kw: Any) -> dict[str, torch.Tensor]:
        """``{key: [C, h, w]}`` float32 maps of one image (cached)."""
        ex = self.extractor(layers, timesteps, **kw)

        def make() -> dict[str, torch.Tensor]:
            out = ex([image])
            return {k: v[0].float().cpu() for k, v in out.items()}

        return self.cached(image, ("maps", tuple(layers), tuple(timesteps), tuple(sorted(kw.items()))), make)
