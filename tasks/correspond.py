"""Zero-shot semantic correspondence: ``difffeat correspond`` and ``difffeat eval correspond``.

Given a source and a target image and points on the source, find the corresponding
points on the target (or, with ``--dense``, the source point of every target pixel) by
matching frozen features. Three method presets reproduce published protocols
(``difffeat.list_presets("correspond")``):

* ``dift`` (configs/correspond/dift.yaml) — Tang et al., "Emergent Correspondence from
  Image Diffusion", NeurIPS 2023: SD-2.1, 768^2, t=261, ``up.1``, ensemble 8, prompt
  "a photo of a {category}"; cosine argmax after bilinear upsampling to the image size.
  Paper: SPair-71k PCK@0.1 (bbox, per image) 52.9; PF-Pascal not reported.
* ``sd-dino`` (configs/fusion/sd-dino.yaml) — Zhang et al., "A Tale of Two Features",
  NeurIPS 2023: SD-1.5 + DINOv2-B/14 fusion with co-PCA, L2 nearest neighbour on the 60x60
  grid. Paper (zero-shot): SPair-71k PCK@0.1 64.0; PF-Pascal PCK@0.05/0.1/0.15
  73.0/86.1/91.1 (recalled, flagged ``verified: false`` in the YAML).
* ``geoaware-zs`` (configs/correspond/geoaware-zs.yaml) — Zhang et al., "Telling Left from
  Right", CVPR 2024, zero-shot: SD-1.5 + DINOv2-B fusion without PCA, window soft-argmax
  (radius 5, temperature 0.02), flip test. Paper: SPair-71k PCK@0.1 65.4 (zero-shot).

Geometry: every image gets a :class:`Frame`, the pixel grid its feature map covers. With
the DIFT ``resize`` policy that is the original image itself (the map is stretched over
it); with ``pad``/``snap`` it is the prepared canvas, and points are carried in and out
through the image's content box. Matching runs in frames, results come back in original
``(x, y)`` pixels (pixel centres at integer coordinates, see :mod:`difffeat.heads.matching`).

Features of an image used by several pairs are computed once: runs count how many pairs
use each (image, prompt, flip) and drop the features after their last use.
"""
from __future__ import annotations

import contextlib
import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from difffeat.distributed import DistInfo, dist_info, progress_bar, rank_units
from difffeat.errors import BadInputError, one_of
from difffeat.fusion import l2_normalize, resample
from difffeat.geometry import Geometry
from difffeat.heads import matching as M
from difffeat.io import FolderRun, atomic_path, load_image, pil_to_tensor, save_json, save_png, tensor_to_pil
from difffeat.options import ExtractorOptions, option
from difffeat.options import replace as replace_options
from difffeat.tasks import correspond_data as D

COORDINATES = "(x, y) pixels; pixel centres at integer coordinates, (0, 0) is the centre of the top-left pixel"
FLOW_CONVENTION = "flow[y, x] = (x_src - x, y_src - y): target pixel (x, y) corresponds to source (x_src, y_src)"


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class MatchSettings:
    """How descriptors are compared (the ``matching:`` block of a preset)."""

    metric: str = "cosine"
    mode: str = "argmax"
    upsample: bool = True
    window_radius: int = M.GEOAWARE_WINDOW_RADIUS
    temperature: float = M.GEOAWARE_TEMPERATURE
    flip_test: bool = False
    src_read: str = "bilinear"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, **overrides: Any) -> "MatchSettings":
        d = {**(d or {}), **{k: v for k, v in overrides.items() if v is not None}}
        valid = [f.name for f in fields(cls)]
        for key in d:
            if key not in valid:
                raise one_of("matching setting", key, valid)
        s = cls(**d)
        if s.metric not in M.METRICS:
            raise one_of("metric", s.metric, M.METRICS)
        if s.mode not in M.POINT_MODES:
            raise one_of("matching mode", s.mode, M.POINT_MODES)
        if s.src_read not in M.SRC_READS:
            raise one_of("source read", s.src_read, M.SRC_READS)
        return s

    def point_kwargs(self) -> dict[str, Any]:
        return dict(metric=self.metric, mode=self.mode, upsample=self.upsample,
                    window_radius=self.window_radius, temperature=self.temperature, src_read=self.src_read)


@dataclass(frozen=True)
class Frame:
    """The pixel grid a feature map covers, and where the original image sits in it.

    ``size`` is ``(H, W)`` of the grid; ``box`` is ``(x0, y0, x1, y1)``, the original image's
    extent in that grid (pixel edges). For the ``resize`` policy the frame is the image.
    """

    image_size: tuple[int, int]
    size: tuple[int, int]
    box: tuple[int, int, int, int]

    def _box_size(self) -> tuple[int, int]:
        return self.box[3] - self.box[1], self.box[2] - self.box[0]

    def to_frame(self, points: torch.Tensor) -> torch.Tensor:
        off = points.new_tensor(self.box[:2], dtype=torch.float32)
        return M.rescale_points(points.float(), self.image_size, self._box_size()) + off

    def from_frame(self, points: torch.Tensor) -> torch.Tensor:
        off = points.new_tensor(self.box[:2], dtype=torch.float32)
        return M.rescale_points(points.float() - off, self._box_size(), self.image_size)


@dataclass
class ImageFeatures:
    """One image's features: a ``[C, h, w]`` map, or per-source layer maps for a fusion preset."""

    raw: Any
    frame: Frame
    image: Image.Image


def _geometry(ex: Any) -> Geometry:
    """How ``ex`` prepares PIL images: its ``geometry`` (:class:`difffeat.protocol.Extractor`; a
    fusion's covers every source's alike-placed canvas), else a custom module's own attributes."""
    if hasattr(ex, "geometry"):
        return ex.geometry
    res = getattr(ex, "resolution", None)  # None: the native size
    return Geometry(res, getattr(ex, "resize", "resize"), int(getattr(ex, "size_multiple", 1)))


def _pairwise(ex: Any) -> bool:
    """Whether ``ex``'s features of an image depend on the other images of the call
    (``per_image`` False: co-PCA fusion, whose PCA is fitted on a pair, as SD-DINO)."""
    if getattr(ex, "per_image", True):
        return False
    if not (hasattr(ex, "source_maps") and hasattr(ex, "fuse_maps")):
        raise BadInputError(f"{type(ex).__name__} fits its features on each call's images (per_image is False) "
                            "and offers no source_maps/fuse_maps to fuse a pair: correspondence needs one of them")
    return True


# --------------------------------------------------------------------------- pipeline
class CorrespondPipeline:
    """Features + matching for image pairs.

    Args:
        extractor: anything ``difffeat.create`` returns (or a module with ``keys`` whose call
            on a list of PIL images returns ``{key: [1, C, h, w]}``).
        settings: matching settings.
        category_prompt: template such as ``"a photo of a {category}"`` used when a pair has
            a category (DIFT); ignored when ``prompt`` is set.
        prompt: one prompt for every image (overrides the template).
    """

    def __init__(self, extractor: Any = None, settings: MatchSettings | None = None, *,
                 category_prompt: str | None = None, prompt: str | None = None, name: str = "custom",
                 preset: dict[str, Any] | None = None, factory: Callable[[], Any] | None = None) -> None:
        if extractor is None and factory is None:
            raise BadInputError("a correspondence pipeline needs an extractor or a factory")
        self._extractor, self._factory = extractor, factory
        self.settings = settings or MatchSettings()
        self.category_prompt, self.prompt, self.name = category_prompt, prompt, name
        self.preset = preset or {}

    @property
    def extractor(self) -> Any:
        """The feature extractor, built on first use (a finished run never loads a model)."""
        if self._extractor is None:
            self._extractor = self._factory()  # type: ignore[misc]
        return self._extractor

    @extractor.setter
    def extractor(self, value: Any) -> None:
        self._extractor = value

    # ---------------------------------------------------------------- features
    def prompt_for(self, category: str | None) -> str | None:
        if self.prompt is not None:
            return self.prompt
        if category and self.category_prompt:
            return self.category_prompt.format(category=category)
        return None

    def frame(self, image: Image.Image) -> Frame:
        geometry = _geometry(self.extractor)
        h, w = image.height, image.width
        if geometry.policy == "resize":
            return Frame((h, w), (h, w), (0, 0, w, h))
        p = geometry.prepare_one(image)
        return Frame((h, w), (int(p.image.shape[-2]), int(p.image.shape[-1])), p.content_box)

    @torch.no_grad()
    def image_features(self, image: Image.Image, category: str | None = None, flip: bool = False) -> ImageFeatures:
        """Features of one PIL image (mirrored left-right when ``flip``); for a pairwise extractor
        (co-PCA fusion) its sources' layer maps, fused per pair by :meth:`descriptors`."""
        if flip:
            image = ImageOps.mirror(image)
        prompt = self.prompt_for(category)
        kw = {} if prompt is None else {"prompts": [prompt]}
        ex = self.extractor
        if _pairwise(ex):
            raw: Any = ex.source_maps([image], **kw)  # co-PCA sees both images of the pair
        else:
            out = ex([image], **kw)
            maps = [out[k] for k in ex.keys]
            if len(maps) == 1:
                raw = maps[0][0].float()
            else:  # several layers/timesteps: normalise each, bring to the finest grid, concatenate
                size = max((tuple(m.shape[-2:]) for m in maps), key=lambda s: s[0] * s[1])
                raw = torch.cat([resample(l2_normalize(m.float()), size) for m in maps], 1)[0]
        return ImageFeatures(raw=raw, frame=self.frame(image), image=image)

    def descriptors(self, a: ImageFeatures, b: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``[C, h, w]`` descriptor maps of a pair (a co-PCA fusion fuses the pair jointly)."""
        ex = self.extractor
        if not _pairwise(ex):
            return a.raw, b.raw
        groups = [[torch.cat([la, lb]) for la, lb in zip(sa, sb)] for sa, sb in zip(a.raw, b.raw)]
        fused = ex.fuse_maps(groups)
        return fused[0], fused[1]

    # ---------------------------------------------------------------- matching
    def _match(self, src: ImageFeatures, tgt: ImageFeatures, sd: torch.Tensor, td: torch.Tensor,
               points: torch.Tensor) -> M.PointMatches:
        m = M.match_points(sd, td, src.frame.to_frame(points.to(sd.device)), src_size=src.frame.size,
                           tgt_size=tgt.frame.size, **self.settings.point_kwargs())
        m.points = tgt.frame.from_frame(m.points)
        return m

    def match(self, src: ImageFeatures, tgt: ImageFeatures, points: torch.Tensor, *,
              flipped_src: ImageFeatures | None = None,
              partners: Sequence[int | None] | None = None) -> tuple[M.PointMatches, bool]:
        """Match source ``points [N, 2]`` into the target; returns (matches, used the flipped source).

        With ``flipped_src`` and ``partners`` (the flip test), the mirrored source replaces
        the original when its mutual-NN distance to the target is smaller (GeoAware-SC);
        keypoint ``k`` is then matched from the mirrored location of ``partners[k]``, its
        mirror-symmetric counterpart, and keeps its direct match when that is ``None``.
        """
        sd, td = self.descriptors(src, tgt)
        m = self._match(src, tgt, sd, td, points)
        if flipped_src is None or partners is None or len(points) == 0:
            return m, False
        fd, td_f = self.descriptors(flipped_src, tgt)
        flat = lambda x: x.flatten(1).T  # noqa: E731
        if float(M.mutual_nn_distance(flat(fd), flat(td_f))) >= float(M.mutual_nn_distance(flat(sd), flat(td))):
            return m, False
        use = torch.tensor([p is not None for p in partners], dtype=torch.bool)
        if not bool(use.any()):
            return m, False
        rows = torch.tensor([p for p in partners if p is not None], dtype=torch.long)
        mirrored = points[rows].clone().float()
        mirrored[:, 0] = (src.frame.image_size[1] - 1) - mirrored[:, 0]
        mf = self._match(flipped_src, tgt, fd, td_f, mirrored)
        m.points[use.to(m.points.device)] = mf.points
        m.scores[use.to(m.scores.device)] = mf.scores
        if m.mutual is not None and mf.mutual is not None:
            m.mutual[use.to(m.mutual.device)] = mf.mutual
        return m, True

    def dense(self, src: ImageFeatures, tgt: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """For every target pixel, the matched source point: (``[Ht, Wt, 2]`` source ``(x, y)``, scores ``[Ht, Wt]``).

        Matches are found for the target feature cells against the source cells (window
        soft-argmax refinement when the preset uses ``mode: soft``) and read bilinearly at
        every target pixel.
        """
        sd, td = self.descriptors(src, tgt)
        s = self.settings
        d = M.dense_flow(sd, td, src_size=src.frame.size, tgt_size=tgt.frame.size, metric=s.metric,
                         mode="soft" if s.mode == "soft" else "argmax", window_radius=s.window_radius,
                         temperature=s.temperature)
        ht, wt = tgt.frame.image_size
        pix = tgt.frame.to_frame(M.pixel_grid((ht, wt), d.mapping.device).reshape(1, -1, 2))
        # Interpolate the offset from each target cell centre, not the raw mapping: near the
        # border the read clamps, and a clamped offset extrapolates a translation (exact for
        # identical or shifted images) where a clamped mapping would freeze.
        centres = M.rescale_points(M.pixel_grid(d.size, d.mapping.device), d.size, tgt.frame.size)
        grid_vals = torch.cat([d.mapping - centres, d.scores.unsqueeze(-1)], -1).permute(2, 0, 1).unsqueeze(0)
        vals = M.sample_descriptors(grid_vals, pix, tgt.frame.size)[0]  # the grid spans the frame
        mapping = src.frame.from_frame(vals[:, :2] + pix[0]).reshape(ht, wt, 2)
        return mapping, vals[:, 2].reshape(ht, wt)


# --------------------------------------------------------------------------- building
_EXTRACT_KEYS = ("model", "layers", "timesteps", "ensemble", "noise", "resolution", "resize")


def build_pipeline(preset: str | None = "dift", *, matching: dict[str, Any] | None = None,
                   options: ExtractorOptions | None = None, **overrides: Any) -> CorrespondPipeline:
    """A pipeline from a correspondence preset plus the shared model options.

    ``options`` (and ``overrides``, any :class:`~difffeat.options.ExtractorOptions` field such as
    ``model=``, ``timesteps=``, ``device=``; ``None`` keeps the option) override the preset's
    extraction settings; ``model`` swaps the preset's model. ``matching`` overrides the preset's
    matching settings. The extractor is built on first use.
    """
    from difffeat.registry import get_preset

    p = get_preset(preset or "dift")
    if p.task != "correspond":
        raise BadInputError(f"preset {p.name!r} is a {p.task or 'feature'} preset, not a correspondence preset")
    ex = replace_options(options or ExtractorOptions(), **overrides)
    settings = MatchSettings.from_dict(p.raw.get("matching"), **(matching or {}))
    if "fusion" in p.raw:
        given = [k for k in _EXTRACT_KEYS if getattr(ex, k)]
        if given:
            raise BadInputError(f"preset {p.name!r} fuses several models with fixed settings; "
                                f"drop --{given[0].replace('_', '-')} or use a single-model preset")

    def factory() -> Any:  # options over the preset over the model's defaults: create's one precedence
        return ex.create(name=p.name, model=ex.model_name())  # -m PRESET --weights FILE: the file with PRESET's configs

    return CorrespondPipeline(settings=settings, category_prompt=p.raw.get("category_prompt"), prompt=ex.prompt,
                              name=p.name, preset=p.raw, factory=factory)


@dataclass
class MatchOptions:
    """The correspondence preset and overrides of its matching settings (``None``: the preset's)."""

    preset: str = option("dift", "Correspondence preset: dift, sd-dino, geoaware-zs (difffeat models lists them).")
    metric: str | None = option(None, "Override the preset's metric.", choices=M.METRICS)
    mode: str | None = option(None, "argmax, mutual (adds mutual flags) or soft (window soft-argmax).",
                              choices=M.POINT_MODES)
    upsample: bool | None = option(None, "Score every image pixel (DIFT) or only feature cells.",
                                   secondary="--no-upsample")
    flip_test: bool | None = option(None, "GeoAware-SC pose alignment: match from the mirrored source when it fits "
                                    "the target better (annotated keypoint pairs only).", secondary="--no-flip-test")

    def pipeline(self, extractor: ExtractorOptions) -> CorrespondPipeline:
        """The preset's pipeline with these matching overrides and ``extractor``'s options."""
        overrides = dict(metric=self.metric, mode=self.mode, upsample=self.upsample, flip_test=self.flip_test)
        return build_pipeline(self.preset, matching=overrides, options=extractor)


# --------------------------------------------------------------------------- runs
@dataclass
class PairJob:
    """One pair to match: images, optional category, optional points ``[N, 2]``."""

    name: str
    src: Path
    tgt: Path
    category: str | None = None
    points: torch.Tensor | None = None
    partners: list[int | None] | None = None


class FeatureCache:
    """Per-image features shared by the pairs of a run, each computed once.

    ``uses`` counts the pairs needing each (image, category, flip) key; features are
    dropped after their last use, so memory holds only images still to be paired.
    """

    def __init__(self, pipeline: CorrespondPipeline, keys: Iterable[tuple[Path, str | None, bool]]) -> None:
        self.pipeline = pipeline
        self.uses: Counter[tuple[Path, str | None, bool]] = Counter(self.key(*k) for k in keys)
        self._feats: dict[tuple[Path, str | None, bool], ImageFeatures] = {}
        self._images: dict[Path, Image.Image] = {}
        self.computed = 0

    def image(self, path: Path) -> Image.Image:
        if path not in self._images:
            self._images[path] = load_image(path)
        return self._images[path]

    def key(self, path: Path, category: str | None, flip: bool = False) -> tuple[Path, str | None, bool]:
        """Images are shared across categories unless the category changes the prompt."""
        return path, category if self.pipeline.prompt_for(category) else None, flip

    def get(self, path: Path, category: str | None, flip: bool = False) -> ImageFeatures:
        key = self.key(path, category, flip)
        if key not in self._feats:
            self._feats[key] = self.pipeline.image_features(self.image(path), category, flip)
            self.computed += 1
        return self._feats[key]

    def release(self, path: Path, category: str | None, flip: bool = False) -> None:
        key = self.key(path, category, flip)
        self.uses[key] -= 1
        if self.uses[key] <= 0:
            self._feats.pop(key, None)
            if not any(k[0] == path and n > 0 for k, n in self.uses.items()):
                self._images.pop(path, None)


def check_points(points: torch.Tensor, size_hw: tuple[int, int], what: str = "source image") -> None:
    """Raise one line if a point lies outside the image (pixel edges at -0.5 and W - 0.5)."""
    h, w = size_hw
    for i, (x, y) in enumerate(points.tolist()):
        if not (-0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
            raise BadInputError(f"point {i + 1} (x={x:g}, y={y:g}) is outside the {what} ({w}x{h} pixels: "
                                f"x in [-0.5, {w - 0.5:g}], y in [-0.5, {h - 0.5:g}])")


_PALETTE_SAT, _PALETTE_VAL = 0.85, 1.0


def match_colour(i: int, n: int) -> tuple[int, int, int]:
    """Distinct colours around the hue circle."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((i / max(n, 1)) % 1.0, _PALETTE_SAT, _PALETTE_VAL)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_matches(src: Image.Image, tgt: Image.Image, src_pts: torch.Tensor, tgt_pts: torch.Tensor,
                 gap: int = 8) -> Image.Image:
    """Source and target side by side (top-aligned) with a coloured line per match."""
    w, h = src.width + gap + tgt.width, max(src.height, tgt.height)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    canvas.paste(src, (0, 0))
    canvas.paste(tgt, (src.width + gap, 0))
    draw = ImageDraw.Draw(canvas)
    r = max(2, round(0.012 * max(h, w / 2)))
    n = len(src_pts)
    for i, ((xs, ys), (xt, yt)) in enumerate(zip(src_pts.tolist(), tgt_pts.tolist())):
        c = match_colour(i, n)
        xt = xt + src.width + gap
        draw.line([(xs, ys), (xt, yt)], fill=c, width=max(1, r // 2))
        for x, y in ((xs, ys), (xt, yt)):
            draw.ellipse([x - r, y - r, x + r, y + r], outline=(0, 0, 0), fill=c)
    return canvas


def parse_points(text: str) -> torch.Tensor:
    """``"x,y;x,y"`` -> ``[N, 2]`` float tensor."""
    pts = []
    for part in (p.strip() for p in text.strip().strip(";").split(";")):
        xy = part.split(",")
        try:
            if len(xy) != 2:
                raise ValueError
            pts.append([float(xy[0]), float(xy[1])])
        except ValueError:
            raise BadInputError(f"bad point {part!r} in {text!r}: write points as 'x,y;x,y'") from None
    if not pts:
        raise BadInputError("no points given")
    return torch.tensor(pts, dtype=torch.float32)


def read_points_file(path: Path) -> torch.Tensor:
    """Points from JSON: ``[[x, y], ...]`` or ``{"points": [[x, y], ...]}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"points file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"cannot read points file {path}: {e}") from None
    pts = data.get("points") if isinstance(data, dict) else data
    try:
        t = torch.tensor(pts, dtype=torch.float32)
    except (TypeError, ValueError):
        t = torch.zeros(0)
    if t.dim() != 2 or t.shape[1] != 2 or len(t) == 0:
        raise BadInputError(f"points file {path} must hold [[x, y], ...] or {{\"points\": [[x, y], ...]}}")
    return t


def _stem(p: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem)


def read_pairs_file(path: Path, points: torch.Tensor | None = None) -> list[PairJob]:
    """Pairs from a CSV with columns ``source,target`` and optional ``category``, ``points``.

    Relative image paths are resolved against the CSV's folder; a ``points`` cell uses the
    ``x,y;x,y`` syntax and overrides ``points`` (the points given for every pair).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            rows = list(reader)
    except FileNotFoundError:
        raise BadInputError(f"pairs file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BadInputError(f"cannot read pairs file {path}: {e}") from None
    if "source" not in header or "target" not in header:
        raise BadInputError(f"pairs file {path} needs a header with columns source,target "
                            f"(optional: category, points); found: {','.join(header) or 'nothing'}")
    jobs = []
    for n, row in enumerate(rows, start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise BadInputError(f"pairs file {path} line {n} has {len(row)} fields, the header has {len(header)}")
        rec = dict(zip(header, (c.strip() for c in row)))
        if not rec["source"] or not rec["target"]:
            raise BadInputError(f"pairs file {path} line {n}: empty source or target")
        src, tgt = (p if (p := Path(rec[k])).is_absolute() else path.parent / p for k in ("source", "target"))
        pts = parse_points(rec["points"]) if rec.get("points") else points
        jobs.append(PairJob(f"{len(jobs):05d}_{_stem(src)}__{_stem(tgt)}", src, tgt, rec.get("category") or None, pts))
    if not jobs:
        raise BadInputError(f"pairs file {path} lists no pairs")
    return jobs


def run_pairs(pipeline: CorrespondPipeline, jobs: Sequence[PairJob], out_dir: Path, *, dense: bool = False,
              overwrite: bool = False, progress: bool = True) -> FolderRun:
    """Match every job, writing ``<name>.json`` + ``<name>.png`` (and dense outputs) into ``out_dir``.

    Finished pairs (their JSON exists) are skipped unless ``overwrite``; every file is
    written atomically, the JSON last. With several jobs a failing pair is reported in one
    line and the run goes on (the run then ends with an error naming the failures).
    """
    from difffeat.runner import Job, run

    out_dir = Path(out_dir)
    done = lambda j: (out_dir / f"{j.name}.json").exists()  # noqa: E731
    todo = [j for j in jobs if overwrite or not done(j)]
    for j in todo:
        if j.points is None and not dense:
            raise BadInputError(f"pair {j.name} has no points; give --points, --points-file or --dense")
    mine = {id(j) for u in rank_units(list(jobs), 1, dist_info(), blocks=True) for j in u}
    cache = FeatureCache(pipeline, [k for j in todo if id(j) in mine
                                    for k in ((j.src, j.category, False), (j.tgt, j.category, False))])

    def process(batch: list[PairJob]) -> None:
        for j in batch:
            try:
                _run_one(pipeline, cache, j, out_dir, dense)
            finally:
                cache.release(j.src, j.category)
                cache.release(j.tgt, j.category)

    # data-parallel (torchrun): each rank takes one contiguous block of the pair list, so an
    # image shared by neighbouring pairs is still extracted once per rank
    res = run(Job(list(jobs), process, done=done, name=lambda j: j.name, split="blocks"), out=out_dir, batch_size=1,
              overwrite=overwrite, desc="pairs", unit_name="pair", single_raises=True)
    res.finish("pairs")
    return res


def _run_one(pipeline: CorrespondPipeline, cache: FeatureCache, j: PairJob, out_dir: Path, dense: bool) -> None:
    src_img, tgt_img = cache.image(j.src), cache.image(j.tgt)
    if j.points is not None:
        check_points(j.points, (src_img.height, src_img.width))
    src, tgt = cache.get(j.src, j.category), cache.get(j.tgt, j.category)
    record: dict[str, Any] = {
        "source": str(j.src), "target": str(j.tgt), "category": j.category,
        "source_size": [src_img.width, src_img.height], "target_size": [tgt_img.width, tgt_img.height],
        "coordinates": COORDINATES, "preset": pipeline.name, "matching": asdict(pipeline.settings),
    }
    if pipeline.settings.flip_test and j.points is not None:
        record["flip_test"] = ("skipped: free points have no mirror-symmetric partners "
                               "(the flip test runs in `difffeat eval correspond`)")
    src_pts = tgt_pts = torch.zeros(0, 2)
    if j.points is not None:
        m, _ = pipeline.match(src, tgt, j.points)
        src_pts, tgt_pts = j.points, m.points.cpu()
        record["matches"] = [
            {"source": [round(float(a), 3) for a in s], "target": [round(float(b), 3) for b in t],
             "score": round(float(sc), 6), **({"mutual": bool(mu)} if m.mutual is not None else {})}
            for s, t, sc, mu in zip(src_pts, tgt_pts, m.scores.cpu(),
                                    m.mutual.cpu() if m.mutual is not None else [None] * len(src_pts))
        ]
    if dense:
        mapping, _ = pipeline.dense(src, tgt)
        mapping = mapping.cpu()
        flow = (mapping - M.pixel_grid(tuple(mapping.shape[:2]))).numpy().astype(np.float32)
        with atomic_path(out_dir / f"{j.name}.flow.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, flow)
        warped = M.warp_image(pil_to_tensor(src_img), mapping)
        save_png(out_dir / f"{j.name}.warped.png", tensor_to_pil(warped))
        record["dense"] = {"flow": f"{j.name}.flow.npy", "warped": f"{j.name}.warped.png",
                           "shape": list(flow.shape), "convention": FLOW_CONVENTION}
    save_png(out_dir / f"{j.name}.png", draw_matches(src_img, tgt_img, src_pts, tgt_pts))
    save_json(out_dir / f"{j.name}.json", record)


# --------------------------------------------------------------------------- difffeat correspond
@dataclass
class PairOptions:
    """Which pairs ``difffeat correspond`` matches, and what it writes for each."""

    points: str | None = option(None, "Source points 'x,y;x,y' (pixels, centres at integers).")
    points_file: Path | None = option(None, "JSON [[x, y], ...].", path=True)
    pairs: Path | None = option(None, "CSV with columns source,target[,category][,points]: match every row.", path=True)
    category: str | None = option(None, "Object category (DIFT prompts 'a photo of a {category}').")
    dense: bool = option(False, "Also write per-pixel flow (.npy) and the warped source (.png).", is_flag=True)

    def jobs(self, source: Path | None, target: Path | None) -> list[PairJob]:
        """SOURCE TARGET as one job, or every row of ``--pairs``; raises one line on a bad combination."""
        if self.points and self.points_file:
            raise BadInputError("give --points or --points-file, not both")
        points = parse_points(self.points) if self.points else (
            read_points_file(self.points_file) if self.points_file else None)
        if self.pairs is not None:
            if source or target:
                raise BadInputError("give SOURCE TARGET or --pairs, not both")
            jobs = read_pairs_file(self.pairs, points)
            for j in jobs:
                j.category = j.category or self.category
        elif source is None or target is None:
            raise BadInputError("give SOURCE and TARGET images (or --pairs FILE)")
        else:
            jobs = [PairJob(f"{_stem(source)}__{_stem(target)}", source, target, self.category, points)]
        if points is None and not self.dense and any(j.points is None for j in jobs):
            raise BadInputError("give --points, --points-file or --dense")
        return jobs


def correspond(source: Path | None, target: Path | None, out_dir: Path, pairs: PairOptions, match: MatchOptions,
               extractor: ExtractorOptions, overwrite: bool = False) -> FolderRun:
    """``difffeat correspond``: match SOURCE into TARGET (or every pair of ``pairs.pairs``) into ``out_dir``.

    A single pair's images and points are checked before a model loads; finished pairs are
    skipped unless ``overwrite`` (see :func:`run_pairs`).
    """
    jobs = pairs.jobs(source, target)
    if len(jobs) == 1 and (overwrite or not (Path(out_dir) / f"{jobs[0].name}.json").exists()):
        src_img, _ = load_image(jobs[0].src), load_image(jobs[0].tgt)  # fail before loading a model
        if jobs[0].points is not None:
            check_points(jobs[0].points, (src_img.height, src_img.width))
    return run_pairs(match.pipeline(extractor), jobs, Path(out_dir), dense=pairs.dense, overwrite=overwrite)


# --------------------------------------------------------------------------- evaluation
def _read_predictions(pred_path: Path | None, overwrite: bool) -> dict[str, list[list[float]]]:
    """The target keypoints an earlier run appended to ``pred_path``, by pair id (``overwrite``: none,
    the file is deleted)."""
    done: dict[str, list[list[float]]] = {}
    if pred_path is None:
        return done
    pred_path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and pred_path.exists():
        pred_path.unlink()
    if pred_path.exists():
        for line in pred_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                done[rec["pair_id"]] = rec["pred"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by an interrupted run: recompute that pair
    return done


def _predict(pipeline: CorrespondPipeline, todo: Sequence[D.CorrespondencePair], done: dict[str, list[list[float]]],
             pred_path: Path | None, progress: bool) -> int:
    """Match the source keypoints of ``todo`` into ``done`` (one JSON line each to ``pred_path``);
    returns how many pairs the flip test flipped."""
    flip = pipeline.settings.flip_test
    partners = {p.pair_id: D.flip_partners(p) if flip else None for p in todo}
    keys = [k for p in todo for k in ((p.src_image, p.category, False), (p.tgt_image, p.category, False))]
    keys += [(p.src_image, p.category, True) for p in todo if partners[p.pair_id] is not None]
    cache = FeatureCache(pipeline, keys)
    flipped_pairs = 0
    bar = progress_bar(len(todo), "pairs", DistInfo(), unit="pair", enabled=progress)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(pred_path, "a", encoding="utf-8")) if pred_path is not None else None
        for p in todo:
            bar.update(1)
            src, tgt = cache.get(p.src_image, p.category), cache.get(p.tgt_image, p.category)
            fsrc = cache.get(p.src_image, p.category, True) if partners[p.pair_id] is not None else None
            m, used_flip = pipeline.match(src, tgt, p.src_kps, flipped_src=fsrc, partners=partners[p.pair_id])
            flipped_pairs += used_flip
            done[p.pair_id] = m.points.cpu().tolist()
            if sink is not None:
                sink.write(json.dumps({"pair_id": p.pair_id, "category": p.category, "pred": done[p.pair_id],
                                       "flipped": used_flip}) + "\n")
                sink.flush()
            cache.release(p.src_image, p.category)
            cache.release(p.tgt_image, p.category)
            if fsrc is not None:
                cache.release(p.src_image, p.category, True)
    return flipped_pairs


@torch.no_grad()
def evaluate(pipeline: CorrespondPipeline, pairs: Sequence[D.CorrespondencePair], *, normaliser: str,
             alphas: Sequence[float] = D.PCK_ALPHAS, out_dir: Path | None = None, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """PCK of ``pipeline`` on annotated pairs; resumable through ``out_dir/predictions.jsonl``.

    Each finished pair appends one JSON line (its predicted target keypoints, in original
    pixels); a rerun reads them back and computes only the missing pairs. The summary is
    written atomically to ``out_dir/pck.json``.
    """
    acc = D.PCKAccumulator(normaliser=normaliser, alphas=tuple(alphas))
    pred_path = None if out_dir is None else Path(out_dir) / "predictions.jsonl"
    done = _read_predictions(pred_path, overwrite)
    todo = [p for p in sorted(pairs, key=lambda p: p.category) if p.pair_id not in done]
    flipped_pairs = _predict(pipeline, todo, done, pred_path, progress)
    for p in pairs:
        pred = torch.tensor(done[p.pair_id], dtype=torch.float32).reshape(-1, 2)
        acc.add(pred, p.tgt_kps, D.pck_threshold(p, normaliser), p.category)
    summary = acc.summary()
    summary.update(preset=pipeline.name, matching=asdict(pipeline.settings), flipped_pairs=flipped_pairs,
                   paper_results=pipeline.preset.get("paper_results"))
    if out_dir is not None:
        save_json(Path(out_dir) / "pck.json", summary)
    return summary


# --------------------------------------------------------------------------- difffeat eval correspond
@dataclass
class EvalOptions:
    """Which benchmark pairs ``difffeat eval correspond`` scores, and how."""

    dataset: str = option("spair", "spair (SPair-71k) or pfpascal.", choices=D.DATASETS, required=True)
    split: str = option("test", "Dataset split.")
    normaliser: str | None = option(None, "PCK threshold: bbox (SPair default) or image (PF-Pascal default).",
                                    choices=D.NORMALISERS)
    alphas: tuple[float, ...] = option((), "PCK alphas (default 0.05, 0.1, 0.15).", "--alpha", multiple=True,
                                       type=float)
    categories: tuple[str, ...] = option((), "Only these categories (repeatable).", "--category", multiple=True,
                                         type=str)
    limit: int | None = option(None, "At most this many pairs (per category for SPair).", type=int)

    def pairs(self, root: Path) -> list[D.CorrespondencePair]:
        """The annotated pairs under ``root`` (the published folder formats)."""
        kw: dict[str, Any] = {"limit": self.limit}
        if self.categories:
            if self.dataset != "spair":
                raise BadInputError("--category filters SPair-71k only")
            kw["categories"] = self.categories
        return D.load_pairs(self.dataset, root, self.split, **kw)


def evaluate_dataset(root: Path, ev: EvalOptions, match: MatchOptions, extractor: ExtractorOptions,
                     out_dir: Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``difffeat eval correspond``: PCK of a correspondence preset on SPair-71k or PF-Pascal (:func:`evaluate`)."""
    pairs = ev.pairs(root)
    pipeline = match.pipeline(extractor)
    return evaluate(pipeline, pairs, normaliser=ev.normaliser or D.default_normaliser(ev.dataset),
                    alphas=ev.alphas or D.PCK_ALPHAS, out_dir=out_dir, overwrite=overwrite)


def eval_report(summary: dict[str, Any], ev: EvalOptions, out_dir: Path | None) -> list[str]:
    """What ``difffeat eval correspond`` prints: counts, the PCK table, the paper's numbers at the
    paper's averaging next to ours, then where pck.json went (or the summary as JSON)."""
    lines = [f"{ev.dataset} {ev.split}: {summary['pairs']} pairs, {summary['keypoints']} keypoints, "
             f"preset {summary['preset']}", D.format_pck_table(summary)]
    paper = (summary.get("paper_results") or {}).get("spair71k" if ev.dataset == "spair" else "pfpascal")
    if paper:
        nums = ", ".join(f"{k}: {v}" for k, v in paper.items() if k.startswith("pck"))
        averaging = str(paper.get("averaging", "per image"))
        lines.append(f"paper ({paper.get('normaliser', '?')} normaliser, {averaging}): {nums}")
        ours = summary["category_mean"] if "categor" in averaging else summary["per_image"]
        lines.append("difffeat, same averaging: " + ", ".join(f"pck@{a}: {v:.1f}" for a, v in ours.items()))
    if out_dir is not None:
        lines.append(f"wrote {Path(out_dir) / 'pck.json'}")
    else:
        keys = ("normaliser", "alphas", "per_image", "per_keypoint", "category_mean", "pairs", "keypoints")
        lines.append(json.dumps({k: summary[k] for k in keys}))
    return lines
