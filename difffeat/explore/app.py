"""The Gradio page of ``difffeat explore`` (Gradio 6; the ``difffeat[explore]`` extra).

Thin wiring only: every callback resolves its inputs, calls one function of
:mod:`difffeat.explore.views` and shows its images and text. Any error becomes one line in
the tab's ``status`` box and the server keeps serving. Every event shares one concurrency
group, so the model runs one request at a time (the caches are not thread-safe).
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio: no telemetry, no network

import sys
import traceback
from collections.abc import Callable
from typing import Any

import gradio as gr

from difffeat.errors import DiffFeatError

from . import views as V
from .session import Session, click_to_pixel, enlarge, load_upload, view_scale

CONCURRENCY = "model"
UPLOAD = "upload…"


def error_line(e: BaseException) -> str:
    """One line for the page: the library's own message, or the exception's first line."""
    if isinstance(e, DiffFeatError):
        return f"error: {e}"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"error: {type(e).__name__}: {first}" if first else f"error: {type(e).__name__}"


def guarded(fn: Callable[..., tuple[Any, ...]], n_out: int) -> Callable[..., tuple[Any, ...]]:
    """Run ``fn``; on failure leave its ``n_out`` outputs unchanged and put the error in the status."""
    import functools

    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> tuple[Any, ...]:
        try:
            return (*fn(*args, **kw), "ok")
        except Exception as e:  # noqa: BLE001 - a server keeps serving; the page gets one line
            if not isinstance(e, DiffFeatError):
                traceback.print_exc(file=sys.stderr)
            return (*[gr.skip()] * n_out, error_line(e))

    return run


def pick(s: Session, scene: str | None, upload: str | None, second: bool = False) -> Any:
    """The image a tab works on: the uploaded file if any, else the chosen scene (or its second view)."""
    if scene == UPLOAD or upload:
        return load_upload(upload)
    for sc in s.scenes:
        if sc.name == scene:
            return sc.view2 if second else sc.image
    raise DiffFeatError(f"unknown scene {scene!r}")


def image_input(s: Session, label: str, tab: str, default: int = 0) -> tuple[Any, Any]:
    """A scene picker and an upload box (gr.File: the file goes through difffeat.io's loader)."""
    names = [sc.name for sc in s.scenes] + [UPLOAD]
    scene = gr.Dropdown(names, value=names[default], label=f"{label}: scene", elem_id=f"{tab}-scene")
    upload = gr.File(label=f"{label}: or upload an image", file_types=["image"], type="filepath", height=150,
                     elem_id=f"{tab}-upload")
    return scene, upload


def status_box(tab: str) -> Any:
    return gr.Textbox(label="status", value="ok", interactive=False, max_lines=1, elem_id=f"{tab}-status")


def view(label: str, elem_id: str, value: Any = None) -> Any:
    return gr.Image(value=value, label=label, type="pil", format="png", interactive=False, elem_id=elem_id,
                    buttons=["download"])


# --------------------------------------------------------------------------- tabs
def correspond_tab(s: Session) -> None:
    d = s.model_defaults()
    with gr.Row():
        with gr.Column():
            src_scene, src_up = image_input(s, "source", "src")
        with gr.Column():
            tgt_scene, tgt_up = image_input(s, "target (default: the scene's second view)", "tgt")
    with gr.Row():
        preset = gr.Dropdown(V.correspond_presets(), value=s.preset, label="preset", elem_id="preset")
        layer = gr.Dropdown(s.layer_names(), value=d["layer"], label="layer", elem_id="corr-layer")
        t = gr.Slider(0, s.backbone.num_train_timesteps - 1, value=d["t"], step=1, label="t", elem_id="corr-t")
    first = s.scenes[0]
    with gr.Row():
        src_view = view("source: click a point", "src-view", enlarge(first.image, view_scale(first.image.size)))
        tgt_view = view("target: similarity, + argmax, o soft-argmax", "tgt-view",
                        enlarge(first.view2, view_scale(first.view2.size)))
    result = gr.Textbox(label="match", interactive=False, max_lines=2, elem_id="match-result")
    status = status_box("correspond")
    images, point = gr.State((first.image, first.view2)), gr.State(None)

    def load(sc: str, up: str | None, tsc: str, tup: str | None) -> tuple[Any, ...]:
        src = pick(s, sc, up)
        tgt = pick(s, tsc, tup, second=tsc == sc)  # the same scene: its second view
        return ((src, tgt), None, enlarge(src, view_scale(src.size)), enlarge(tgt, view_scale(tgt.size)), "")

    def clicked(ims: Any, p: str, ly: str, tt: float, evt: gr.SelectData) -> tuple[Any, ...]:
        if ims is None:
            raise DiffFeatError("load a source and a target image first")
        xy = click_to_pixel(evt.index, ims[0].size, view_scale(ims[0].size))
        return (xy, *rematch(ims, xy, p, ly, tt))

    def rematch(ims: Any, xy: Any, p: str, ly: str, tt: float) -> tuple[Any, ...]:
        if ims is None or xy is None:
            return gr.skip(), gr.skip(), gr.skip()
        m = V.click_match(s, ims[0], ims[1], xy, p, ly, int(tt))
        return m.source_view, m.target_view, m.text + f"  [{m.note}]"

    ins = [src_scene, src_up, tgt_scene, tgt_up]
    for comp in ins:
        comp.change(guarded(load, 5), ins, [images, point, src_view, tgt_view, result, status],
                    concurrency_id=CONCURRENCY)
    src_view.select(guarded(clicked, 4), [images, preset, layer, t], [point, src_view, tgt_view, result, status],
                    concurrency_id=CONCURRENCY)
    for comp in (preset, layer, t):
        comp.change(guarded(rematch, 3), [images, point, preset, layer, t], [src_view, tgt_view, result, status],
                    concurrency_id=CONCURRENCY)


def features_tab(s: Session) -> None:
    d = s.model_defaults()
    with gr.Row():
        with gr.Column():
            a_scene, a_up = image_input(s, "image A", "feat-a")
        with gr.Column():
            b_scene, b_up = image_input(s, "image B (optional)", "feat-b", default=1)
            use_b = gr.Checkbox(value=True, label="co-PCA with image B")
    with gr.Row():
        layer = gr.Dropdown(s.layer_names(), value=d["layer"], label="layer")
        t = gr.Slider(0, s.backbone.num_train_timesteps - 1, value=d["t"], step=1, label="t")
        k = gr.Slider(2, 12, value=5, step=1, label="k-means parts")
    with gr.Row():
        show = gr.Button("co-PCA + parts", variant="primary", elem_id="feat-run")
        sweep = gr.Button("layer × t grid of image A (click a cell to pick)", elem_id="feat-grid")
    with gr.Row():
        out = view("co-PCA RGB and k-means parts", "feat-view")
        grid_view = view("layer × t grid", "feat-grid-view")
    info = gr.Textbox(label="features", interactive=False, max_lines=1, elem_id="feat-result")
    status = status_box("features")
    grid_state = gr.State(None)
    ins = [a_scene, a_up, b_scene, b_up, use_b, layer, t, k]

    def run(sa: str, ua: str | None, sb: str, ub: str | None, both: bool, ly: str, tt: float, kk: float) -> tuple[Any, ...]:
        ims = [pick(s, sa, ua)] + ([pick(s, sb, ub)] if both else [])
        return V.features_view(s, ims, ly, int(tt), int(kk))

    def grid(sa: str, ua: str | None) -> tuple[Any, ...]:
        g = V.sweep_grid(s, pick(s, sa, ua))
        return g, g.image, f"{len(g.layers)} layers x t in {g.timesteps}: click a cell to show it"

    def on_select(g: Any, sa: str, ua: str | None, sb: str, ub: str | None, both: bool, _ly: str, _t: float,
                  kk: float, evt: gr.SelectData) -> tuple[Any, ...]:
        if g is None:
            raise DiffFeatError("make the layer x t grid first")
        ly, tt = g.pick(evt.index)
        return (ly, tt, *run(sa, ua, sb, ub, both, ly, tt, kk))

    show.click(guarded(run, 2), ins, [out, info, status], concurrency_id=CONCURRENCY)
    sweep.click(guarded(grid, 3), [a_scene, a_up], [grid_state, grid_view, info, status], concurrency_id=CONCURRENCY)
    grid_view.select(guarded(on_select, 4), [grid_state, *ins], [layer, t, out, info, status],
                     concurrency_id=CONCURRENCY)


def classify_tab(s: Session) -> None:
    tiny = s.model == "difffeat-tiny"
    scene, up = image_input(s, "image", "cls")
    classes = gr.Textbox(value=V.default_classes(s), label="classes (comma-separated)")
    with gr.Row():
        ns = gr.Textbox(value="3,8" if tiny else "", label="timesteps per stage (n_samples; empty = paper default)")
        tk = gr.Textbox(value="2,1" if tiny else "", label="classes kept per stage (to_keep)")
    go = gr.Button("classify", variant="primary", elem_id="cls-run")
    table = gr.Dataframe(headers=["rank", "class", "mean error", "(t, noise) pairs scored", "score"], label="ranking",
                         interactive=False)
    info = gr.Textbox(label="result", interactive=False, max_lines=1, elem_id="cls-result")
    status = status_box("classify")

    def run(sc: str, u: str | None, cl: str, n: str, k: str, progress: Any = gr.Progress()) -> tuple[Any, ...]:
        r = V.classify_image(s, pick(s, sc, u), cl, n, k, lambda f, m: progress(f, desc=m))
        return r.rows, r.text

    go.click(guarded(run, 2), [scene, up, classes, ns, tk], [table, info, status], concurrency_id=CONCURRENCY)


def dense_tab(s: Session) -> None:
    d = s.model_defaults()
    scene, up = image_input(s, "image", "dense")
    with gr.Row():
        method = gr.Radio(list(V.DENSE_METHODS), value="k-means", label="method")
        k = gr.Slider(2, 12, value=4, step=1, label="k (k-means)")
        layer = gr.Dropdown(s.layer_names(), value=d["layer"], label="layer (k-means)")
        t = gr.Slider(0, s.backbone.num_train_timesteps - 1, value=d["t"], step=1, label="t")
    head = gr.Textbox(label="head folder (from `difffeat train seg|depth|edges`)", placeholder="runs/seg/head")
    go = gr.Button("predict", variant="primary", elem_id="dense-run")
    out = view("prediction over the image", "dense-view")
    info = gr.Textbox(label="result", interactive=False, max_lines=1, elem_id="dense-result")
    status = status_box("dense")

    def run(sc: str, u: str | None, m: str, kk: float, ly: str, tt: float, h: str) -> tuple[Any, ...]:
        return V.dense_view(s, pick(s, sc, u), m, int(kk), ly, int(tt), h)

    go.click(guarded(run, 2), [scene, up, method, k, layer, t, head], [out, info, status], concurrency_id=CONCURRENCY)


def detect_tab(s: Session) -> None:
    scene, up = image_input(s, "image", "det")
    with gr.Row():
        method = gr.Radio(list(V.DETECT_METHODS), value="DIRE", label="method")
        steps = gr.Slider(1, 50, value=3 if s.model == "difffeat-tiny" else 20, step=1, label="DDIM steps (DIRE)")
    go = gr.Button("score", variant="primary", elem_id="det-run")
    out = view("error map", "det-view")
    info = gr.Textbox(label="score", interactive=False, max_lines=1, elem_id="det-result")
    status = status_box("detect")

    def run(sc: str, u: str | None, m: str, n: float) -> tuple[Any, ...]:
        img, text = V.detect_view(s, pick(s, sc, u), m, int(n))
        return enlarge(img, view_scale(img.size)), text

    go.click(guarded(run, 2), [scene, up, method, steps], [out, info, status], concurrency_id=CONCURRENCY)


TABS: tuple[tuple[str, Callable[[Session], None]], ...] = (
    ("Correspond", correspond_tab), ("Features", features_tab), ("Classify", classify_tab),
    ("Segment / depth / edges", dense_tab), ("Detect", detect_tab),
)


def build_app(s: Session) -> Any:
    """The ``gr.Blocks`` page of a session (not launched)."""
    with gr.Blocks(title="difffeat explore", analytics_enabled=False) as demo:
        gr.Markdown(f"## difffeat explore · `{s.model}`" + (" (knows only the shapes world: use `-m sd21` on photos)"
                                                          if s.model == "difffeat-tiny" else ""))
        for name, build in TABS:
            with gr.Tab(name, elem_id=f"tab-{name.split()[0].lower()}"):
                build(s)
    return demo


def theme() -> Any:
    """Gradio's default look with local fonts only (the default theme fetches Google Fonts)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
