"""What each tab of the explore app computes: plain functions, PIL images and text out.

Each function takes a :class:`~difffeat.explore.session.Session` and the tab's inputs and
calls the library's own methods (no re-implementation of any method here):

* :func:`click_match` - DIFT's demo (Tang et al. 2023): the cosine map of a clicked source
  point over the target, with the argmax, GeoAware-SC's window soft-argmax (Zhang et al.
  2024) and the mutual-NN check, all from :func:`difffeat.heads.matching.match_points`
  on the :class:`~difffeat.tasks.correspond.CorrespondPipeline` descriptors;
* :func:`features_view`, :func:`sweep_grid` - SD-DINO's visualisation (Zhang et al. 2023):
  co-PCA of two images' features as RGB and k-means parts; a layer x t grid;
* :func:`classify_image` - the Diffusion Classifier (Li et al. 2023) with live progress;
* :func:`dense_view` - k-means or DiffSeg (Tian et al. 2024) zero-shot segments, or a head
  folder from ``difffeat train`` (seg / depth / edges);
* :func:`detect_view` - DIRE (Wang et al. 2023) or AEROBLADE (Ricker et al. 2024) score
  and error map.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from difffeat.errors import BadInputError
from difffeat.heads import matching as M
from difffeat.viz import co_pca_rgb, colormap, tile

from .session import Session, enlarge, view_scale

Progress = Callable[[float, str], Any]
GRID_TIMESTEPS = (25, 100, 250, 500)  # the Features tab's layer x t sweep
GRID_CELL, GRID_PAD, GRID_CAPTION = 96, 4, 12  # its panel side and tile layout (pixels)
XY = tuple[float, float]


# --------------------------------------------------------------------------- helpers
def blend(image: Image.Image, colour: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``colour`` ([H, W, 3] uint8, the image's size) over ``image`` with opacity ``alpha``."""
    base = np.asarray(image.convert("RGB"), np.float32)
    return Image.fromarray((base * (1 - alpha) + colour.astype(np.float32) * alpha + 0.5).astype(np.uint8))


def mark(image: Image.Image, points: list[tuple[XY, tuple[int, int, int], str]], scale: int) -> Image.Image:
    """Enlarge ``image`` by ``scale`` and draw markers at original-pixel points: shape "o" or "+"."""
    out = enlarge(image, scale).copy()
    d = ImageDraw.Draw(out)
    r = max(4, out.width // 40)
    for (x, y), colour, shape in points:
        cx, cy = (x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5  # pixel centre in the enlarged grid
        if shape == "+":
            d.line([(cx - r, cy), (cx + r, cy)], fill=colour, width=2)
            d.line([(cx, cy - r), (cx, cy + r)], fill=colour, width=2)
        else:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=2)
    return out


def label_colours(labels: np.ndarray, n: int) -> np.ndarray:
    """Segment ids -> colours (the task's palette without its black background)."""
    from difffeat.tasks.dense_data import default_palette

    pal = np.asarray(default_palette(n + 1)[1:], np.uint8)
    return pal[labels.clip(0, n - 1)]


# --------------------------------------------------------------------------- correspond
def correspond_presets() -> list[str]:
    """Names of the correspondence presets (``dift``, ``sd-dino``, ``geoaware-zs``, ...)."""
    from difffeat.registry import method_presets

    return sorted(n for n, p in method_presets().items() if p.task == "correspond")


def correspond_pipeline(s: Session, preset: str, layer: str, t: int) -> tuple[Any, str, tuple[Any, ...]]:
    """The preset's pipeline on the session's model, a note on what was used, and its cache key.

    A single-model preset runs on the session's model with the picked layer and t (its
    ensemble, noise and prompt kept when the model is the preset's own). A fusion preset
    (SD + DINOv2) runs its whole fixed protocol when the session runs its diffusion model;
    on another model only its matching settings apply, and the note says so.
    """
    from difffeat.registry import get_preset
    from difffeat.tasks.correspond import CorrespondPipeline, MatchSettings, build_pipeline

    if preset not in correspond_presets():
        from difffeat.errors import one_of

        raise one_of("correspondence preset", preset, correspond_presets())
    p = get_preset(preset)
    own_model = p.extract.get("model")
    if "fusion" in p.raw and s.model == own_model:
        key = ("correspond", preset)
        pipe = s.cache.get(("pipeline", preset), lambda: build_pipeline(preset, device=s.device, dtype=s.dtype))
        return pipe, f"{preset}: the preset's fixed fused features (layer and t sliders do not apply)", key
    s.check_layer(layer)
    t = s.check_t(t)
    own = p.extract if own_model == s.model else {}
    kw = {k: own[k] for k in ("ensemble", "noise", "prompt", "resolution", "resize") if own.get(k) is not None}
    settings = MatchSettings.from_dict(p.raw.get("matching"))
    pipe = CorrespondPipeline(s.extractor((layer,), (t,), **kw), settings, category_prompt=p.raw.get("category_prompt"),
                              name=preset, preset=p.raw)
    note = f"{preset} matching ({settings.metric}) on {s.model} {layer} t={t}"
    if "fusion" in p.raw:
        note += f"; its fused features need -m {own_model}"
    return pipe, note, ("correspond", preset, layer, t)


def pair_features(s: Session, pipe: Any, key: tuple[Any, ...], src: Image.Image, tgt: Image.Image) -> tuple[Any, Any]:
    """Both images' features through the pipeline, cached per (image, ``key``: the pipeline's settings)."""
    return s.cached(src, key, lambda: pipe.image_features(src)), s.cached(tgt, key, lambda: pipe.image_features(tgt))


@dataclass
class Match:
    """One click's result: the source pixel, the matches in target pixels and the views."""

    point: tuple[int, int]
    argmax: XY
    score: float
    soft: XY
    mutual: bool
    metric: str
    source_view: Image.Image
    target_view: Image.Image
    note: str

    @property
    def text(self) -> str:
        return (f"source (x={self.point[0]}, y={self.point[1]}) -> argmax (x={self.argmax[0]:.2f}, "
                f"y={self.argmax[1]:.2f}) {self.metric} {self.score:.4f}; soft-argmax (x={self.soft[0]:.2f}, "
                f"y={self.soft[1]:.2f}); mutual NN: {'yes' if self.mutual else 'no'}")


def heatmap(pipe: Any, sd: torch.Tensor, td: torch.Tensor, a: Any, b: Any, point: torch.Tensor) -> np.ndarray:
    """The similarity of the source point to every target pixel ``[H, W]`` (DIFT's upsampled map)."""
    q = M.sample_descriptors(sd[None].float(), a.frame.to_frame(point)[None], a.frame.size)
    scores = M.score_maps(q, td[None].float(), metric=pipe.settings.metric, size=b.frame.size)[0, 0]
    x0, y0, x1, y1 = b.frame.box
    crop = scores[y0:y1, x0:x1][None, None]
    h, w = b.frame.image_size
    return torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()


def click_match(s: Session, src: Image.Image, tgt: Image.Image, point: tuple[int, int], preset: str, layer: str,
                t: int) -> Match:
    """Match one source pixel into the target: argmax, soft-argmax, mutual check and the heatmap."""
    from difffeat.tasks.correspond import check_points

    pts = torch.tensor([point], dtype=torch.float32)
    check_points(pts, (src.height, src.width))
    pipe, note, key = correspond_pipeline(s, preset, layer, t)
    a, b = pair_features(s, pipe, key, src, tgt)
    sd, td = pipe.descriptors(a, b)
    found = {}
    for mode in ("argmax", "soft", "mutual"):
        kw = replace(pipe.settings, mode=mode).point_kwargs()
        m = M.match_points(sd, td, a.frame.to_frame(pts), src_size=a.frame.size, tgt_size=b.frame.size, **kw)
        found[mode] = (b.frame.from_frame(m.points)[0].tolist(), float(m.scores[0]), m.mutual)
    (ax, ay), score, _ = found["argmax"]
    (sx, sy), _, _ = found["soft"]
    mutual = bool(found["mutual"][2][0])
    hm = heatmap(pipe, sd, td, a, b, pts)
    k = view_scale(tgt.size)
    tview = mark(blend(tgt, colormap(hm), 0.55), [((ax, ay), (255, 255, 255), "+"), ((sx, sy), (0, 0, 0), "o")], k)
    sview = mark(src, [((float(point[0]), float(point[1])), (255, 255, 255), "+")], view_scale(src.size))
    return Match(point, (ax, ay), score, (sx, sy), mutual, pipe.settings.metric, sview, tview, note)


# --------------------------------------------------------------------------- features
def features_view(s: Session, images: list[Image.Image], layer: str, t: int, k: int) -> tuple[Image.Image, str]:
    """Co-PCA RGB (one PCA fitted on every image's cells) and k-means parts shared by the images."""
    from difffeat.fusion import resample
    from difffeat.heads.kmeans_seg import kmeans

    if not images:
        raise BadInputError("no image: upload one or pick a scene")
    if k < 2:
        raise BadInputError(f"k-means needs k >= 2 parts, got {k}")
    s.check_layer(layer)
    t = s.check_t(t)
    maps = [s.feature_maps(im, (layer,), (t,))[layer] for im in images]
    grid = tuple(maps[0].shape[-2:])
    stack = torch.cat([resample(m[None], grid) for m in maps])
    rgbs = co_pca_rgb(list(stack))
    _, labels = kmeans(stack.permute(0, 2, 3, 1).reshape(-1, stack.shape[1]), k, seed=s.seed)
    labels = labels.reshape(len(images), *grid).numpy()
    panels, caps = [], []
    for im, rgb, lab in zip(images, rgbs, labels):
        parts = Image.fromarray(label_colours(lab, k)).resize(im.size, Image.NEAREST)
        panels += [im, rgb.resize(im.size, Image.NEAREST), blend(im, np.asarray(parts), 0.6)]
        caps += ["image", "co-PCA RGB", f"k-means parts (k={k})"]
    scale = view_scale(images[0].size) // 2 or 1
    c, h, w = maps[0].shape
    info = f"{s.model} {layer} t={t}: {c} channels on a {h}x{w} grid; one PCA and one k-means over {len(images)} image(s)"
    return tile(panels, 3, captions=caps, scale=scale), info


@dataclass
class Grid:
    """The layer x t sweep of one image: PCA RGB cells, rows = layers, columns = timesteps."""

    image: Image.Image
    layers: tuple[str, ...]
    timesteps: tuple[int, ...]
    cell: tuple[int, int]  # (w, h) of one panel

    def pick(self, index: Any) -> tuple[str, int]:
        """The (layer, t) of the cell under a click at pixel ``index = [x, y]`` of :attr:`image`
        (the layout of :func:`difffeat.viz.tile` with a title and captions)."""
        if not isinstance(index, (list, tuple)) or len(index) != 2:
            raise BadInputError("click a cell of the layer x t grid")
        (x, y), (cw, ch) = index, self.cell
        top = GRID_CAPTION + GRID_PAD
        col, row = (int(x) - GRID_PAD) // (cw + GRID_PAD), (int(y) - top - GRID_PAD) // (ch + GRID_CAPTION + GRID_PAD)
        if not (0 <= col < len(self.timesteps) and 0 <= row < len(self.layers)):
            raise BadInputError("click a cell of the layer x t grid")
        return self.layers[row], self.timesteps[col]


def sweep_grid(s: Session, image: Image.Image, timesteps: tuple[int, ...] = GRID_TIMESTEPS) -> Grid:
    """PCA RGB of every block layer x timestep of one image (one extraction for the whole grid)."""
    from difffeat.viz import pca_rgb

    n = int(s.backbone.num_train_timesteps)
    ts = tuple(t for t in timesteps if 0 <= t < n) or (s.model_defaults()["t"],)
    layers = tuple(s.layer_names())
    maps = s.feature_maps(image, layers, ts)
    f = GRID_CELL / max(image.size)
    cell = (max(1, round(image.width * f)), max(1, round(image.height * f)))
    keys = [f"{layer}@t{t}" if len(ts) > 1 else layer for layer in layers for t in ts]
    panels = [pca_rgb(maps[key], cell) for key in keys]
    caps = [f"{layer} t={t}" for layer in layers for t in ts]
    img = tile(panels, len(ts), captions=caps, pad=GRID_PAD, caption_h=GRID_CAPTION,
               title="PCA RGB: layer (rows) x t (columns)")
    return Grid(img, layers, ts, cell)


# --------------------------------------------------------------------------- classify
def parse_class_list(text: str) -> list[str]:
    names = [c.strip() for c in (text or "").replace("\n", ",").split(",") if c.strip()]
    if len(names) < 2:
        raise BadInputError("give at least two classes, comma-separated")
    return names


def default_classes(s: Session) -> str:
    from difffeat.data.shapes import CLASSES

    return ", ".join(CLASSES) if s.model == "difffeat-tiny" else "cat, dog, car, bird"


@dataclass
class Ranking:
    rows: list[list[Any]]
    evals: int
    planned: int
    text: str


def classify_image(s: Session, image: Image.Image, classes: str, n_samples: str, to_keep: str,
                   progress: Progress | None = None) -> Ranking:
    """Zero-shot Diffusion Classifier ranking of one image; ``progress(fraction, message)`` per batch."""
    from difffeat.heads.diffusion_classifier import DiffusionClassifier, Schedule
    from difffeat.io import image_key
    from difffeat.tasks.classify import center_crop_tensor, parse_ints

    names = parse_class_list(classes)
    ids = tiny_class_ids(s, names)
    ns, tk = parse_ints(n_samples or None, "n samples"), parse_ints(to_keep or None, "to keep")
    sched = Schedule(**({"n_samples": ns} if ns else {}), **({"to_keep": tk} if tk else {}))
    bb = s.backbone
    res = s.model_defaults()["resolution"]
    clf = DiffusionClassifier(bb, ids or names, template="a photo of a {}.", schedule=sched, seed=s.seed,
                              image_size=(res, res))
    planned = sched.unet_evals(len(names), bb.num_train_timesteps)
    done = [0]

    def count(_m: Any, args: tuple[Any, ...], _out: Any) -> None:
        done[0] += int(args[0].shape[0]) if args else 0
        if progress is not None:
            progress(min(1.0, done[0] / max(planned, 1)), f"{done[0]} / {planned} denoiser evaluations")

    handle = bb.denoiser.register_forward_hook(count)
    try:
        x = center_crop_tensor(image, res)[None]
        pred = clf(x, keys=[image_key(x[0])])[0]
    finally:
        handle.remove()
    label = {str(i): n for i, n in zip(ids or names, names)}
    rows = [[r + 1, label.get(str(c), str(c)), round(e, 5), n, round(sc, 4)]  # ranked: later-stage survivors first
            for r, (c, e, n, sc) in enumerate(zip(pred.classes, pred.errors, pred.samples, pred.scores))]
    text = (f"top-1: {rows[0][1]} (score {rows[0][4]:.3f}); {pred.unet_evals} denoiser evaluations "
            f"(schedule plans {planned})")
    return Ranking(rows, pred.unet_evals, planned, text)


def tiny_class_ids(s: Session, names: list[str]) -> list[str] | None:
    """difffeat-tiny is conditioned on shape ids: its class names map to ``"0".."7"``."""
    from difffeat.data.shapes import CLASSES

    if s.model != "difffeat-tiny":
        return None
    bad = [n for n in names if n not in CLASSES and not n.isdigit()]
    if bad:
        raise BadInputError(f"difffeat-tiny knows only the shapes classes {', '.join(CLASSES)}; got {bad[0]!r}")
    return [str(CLASSES.index(n)) if n in CLASSES else n for n in names]


# --------------------------------------------------------------------------- dense
DENSE_METHODS = ("k-means", "DiffSeg", "head folder")


def dense_view(s: Session, image: Image.Image, method: str, k: int, layer: str, t: int,
               head: str | None) -> tuple[Image.Image, str]:
    """Zero-shot segments (k-means on features, DiffSeg) or a trained head's map, over the image."""
    if method == "k-means":
        return kmeans_view(s, image, k, layer, t)
    if method == "DiffSeg":
        return diffseg_view(s, image, t)
    if method == "head folder":
        return head_view(s, image, head)
    from difffeat.errors import one_of

    raise one_of("method", method, DENSE_METHODS)


def kmeans_view(s: Session, image: Image.Image, k: int, layer: str, t: int) -> tuple[Image.Image, str]:
    from difffeat.heads.kmeans_seg import kmeans_segment

    if k < 2:
        raise BadInputError(f"k-means needs k >= 2 segments, got {k}")
    s.check_layer(layer)
    t = s.check_t(t)
    ex = s.extractor((layer,), (t,))
    maps = s.feature_maps(image, (layer,), (t,))
    seg = kmeans_segment({layer: maps[layer][None]}, ex.feature_info, k, (image.height, image.width), seed=s.seed)[0]
    view = blend(image, label_colours(seg.numpy(), k))
    return enlarge(view, view_scale(image.size)), f"k-means, k={k}, on {s.model} {layer} t={t}"


def diffseg_view(s: Session, image: Image.Image, t: int) -> tuple[Image.Image, str]:
    from difffeat.heads.diffseg import diffseg_segment, self_attention_layers
    from difffeat.registry import get_preset

    cfg = dict(get_preset("diffseg").raw.get("diffseg") or {})
    layers = tuple(f"attn.self.{n}" for n in self_attention_layers(s.backbone.denoiser))
    if not layers:
        raise BadInputError(f"{s.model} has no self-attention layers for DiffSeg")
    t = s.check_t(t)
    maps = s.feature_maps(image, layers, (t,))
    seg = diffseg_segment({k: v[None] for k, v in maps.items()}, out_size=(image.height, image.width),
                          tau=float(cfg.get("kl_threshold", 1.1)), iterations=int(cfg.get("iterations", 3)),
                          points=int(cfg.get("anchors", 16)))[0].numpy()
    n = int(seg.max()) + 1
    view = blend(image, label_colours(seg, max(n, 1)))
    return enlarge(view, view_scale(image.size)), f"DiffSeg on {len(layers)} self-attention layers at t={t}: {n} segments"


def head_view(s: Session, image: Image.Image, head: str | None) -> tuple[Image.Image, str]:
    """A head folder from ``difffeat train seg|depth|edges``; one for another backbone is refused."""
    import os

    from difffeat.tasks.dense_predict import DensePredictor, final_prediction, seg_palette

    if not head:
        raise BadInputError("give the head folder written by `difffeat train seg|depth|edges`")
    path = Path(head).expanduser()
    if not path.exists():
        raise BadInputError(f"no such head folder: {path}")
    expect = {"preset": os.path.abspath(s.model) if os.path.isdir(s.model) else s.model}
    pred = s.cache.get(("head", str(path.resolve())),
                          lambda: DensePredictor.from_checkpoint(path, expect, s.device, s.dtype))
    out = final_prediction(pred.task, pred.predict([image])[0]).numpy()
    if pred.task == "seg":
        n = len(pred.loaded.config.get("classes") or []) or int(out.max()) + 1
        pal = np.asarray(seg_palette(pred.loaded.config, n), np.uint8)
        view = blend(image, pal[out.clip(0, len(pal) - 1)])
    elif pred.task == "depth":
        view = Image.fromarray(colormap(-out))  # near = warm
    else:
        view = Image.fromarray((np.clip(1 - out, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    return enlarge(view, view_scale(image.size)), f"{pred.task} head {path.name} ({s.model})"


# --------------------------------------------------------------------------- detect
DETECT_METHODS = ("DIRE", "AEROBLADE")


def detect_view(s: Session, image: Image.Image, method: str, steps: int) -> tuple[Image.Image, str]:
    """DIRE (training-free mean |x - DDIM reconstruction|) or AEROBLADE (min AE distance) + map."""
    if method == "DIRE":
        det = dire_detector(s, steps)
        x = det.prepare(image)[None]
        out = det(x)
        emap = out["maps"][0].float().mean(0).numpy()
        text = f"DIRE score {float(out['score'][0]):.4f} ({det.settings.steps} DDIM steps; low = generated)"
        return Image.fromarray(colormap(emap)), text
    if method == "AEROBLADE":
        return aeroblade_view(s, image)
    from difffeat.errors import one_of

    raise one_of("detection method", method, DETECT_METHODS)


def dire_detector(s: Session, steps: int) -> Any:
    """A raw-score DIRE detector on the session's backbone (dire-adm256 for pixel models, dire-sd else)."""
    from difffeat.heads.dire import DireSettings
    from difffeat.tasks.detect import Detector, get_detect_preset

    if steps < 1:
        raise BadInputError(f"DIRE needs at least one DDIM step, got {steps}")
    bb = s.backbone
    name = "dire-adm256" if bb.vae is None else "dire-sd"
    res = s.model_defaults()["resolution"]
    settings = DireSettings.from_dict({**get_detect_preset(name)["detect"].get("dire", {}), "steps": int(steps),
                                       "resolution": res})  # the preset's spacing and pairing (its reference's)
    cfg = {"preset": name, "score": "dire", "dire": settings.to_dict()}
    return s.cache.get(("dire", settings.to_dict().__repr__()),
                          lambda: Detector(cfg, settings.resolution, settings.resize, bb=bb, settings=settings))


def aeroblade_view(s: Session, image: Image.Image) -> tuple[Image.Image, str]:
    """AEROBLADE (preset ``aeroblade``): the VGG layer-2 distance map of the best autoencoder."""
    from difffeat.tasks.detect import detector_from_preset

    det = s.cache.get(("aeroblade",), lambda: detector_from_preset("aeroblade", device=s.device, dtype=s.dtype))
    x = det.prepare(image)[None]
    out = det(x)
    best = int(torch.stack([out[f"dist:{ae.name}"] for ae in det.autoencoders], 1).argmin(1)[0])
    ae, dist = det.autoencoders[best], det.distance
    dev = next(dist.buffers()).device
    xd = x.float().to(dev)
    emap = (dist.feats(xd) - dist.feats(ae(xd).to(dev))).pow(2).sum(1)[0].cpu().numpy()
    text = f"AEROBLADE distance {float(out['score'][0]):.5f} (best autoencoder {ae.name}; low = generated)"
    return Image.fromarray(colormap(emap)).resize(image.size, Image.BILINEAR), text
