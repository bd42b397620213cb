"""`difffeat explore` in a real browser: Debian's chromium, headless, driven by Playwright.

One server start (difffeat-tiny, offline, a free localhost port) and one test, so that
pytest-xdist cannot split it over two workers. It clicks a source point in the Correspond
tab and checks the reported match against difffeat.heads.matching on the same features,
uploads a corrupt file and reads the error line, and runs and screenshots every tab (screenshots in $DIFFFEAT_EXPLORE_ARTIFACTS or
tests/artifacts/explore; not asserted on pixels).

Skips (with the reason) when chromium, gradio (``[explore]``) or playwright (``[test]``) is
missing; CI installs all three.
"""
from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

CHROMIUM = os.environ.get("DIFFFEAT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]
ARTIFACTS = Path(os.environ.get("DIFFFEAT_EXPLORE_ARTIFACTS", Path(__file__).parent / "artifacts" / "explore"))
START_TIMEOUT = 90
TIMEOUT_MS = 60_000
POINT = (20, 37)  # the source pixel clicked (on the first scene)

if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
if importlib.util.find_spec("gradio") is None:  # the server imports it; this process needs not
    pytest.skip("the [explore] extra (gradio) is not installed", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the [test] extra) is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen, log: Path) -> None:
    end = time.time() + START_TIMEOUT
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"difffeat explore exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"difffeat explore did not answer on {url} within {START_TIMEOUT} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    port = free_port()
    log = tmp_path_factory.mktemp("explore") / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", DIFFFEAT_NO_PROGRESS="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    cmd = [sys.executable, "-c", "from difffeat.cli import main; main()", "explore", "--port", str(port),
           "--threads", "1", "--device", "cpu"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, proc, log)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    url, _ = server
    profile = tmp_path_factory.mktemp("chromium-profile")  # an empty user-data-dir
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                   args=FLAGS, viewport={"width": 1280, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(url)
        pg.locator("#src-view img").wait_for()
        yield pg
        ctx.close()


def box_text(pg, elem_id: str) -> str:  # type: ignore[no-untyped-def]
    return pg.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def wait_text(pg, elem_id: str, pattern: str) -> str:  # type: ignore[no-untyped-def]
    """Wait until the textbox ``elem_id`` matches ``pattern``; return its text."""
    sel = f"#{elem_id} textarea, #{elem_id} input"
    pg.wait_for_function("([sel, pat]) => { const e = document.querySelector(sel); "
                         "return e && new RegExp(pat).test(e.value); }", arg=[sel, pattern])
    return box_text(pg, elem_id)


def click_natural(pg, elem_id: str, nx: float, ny: float) -> None:  # type: ignore[no-untyped-def]
    """Click natural-pixel (nx, ny) of the image shown in ``elem_id`` (scaled to fit, letterboxed)."""
    img = pg.locator(f"#{elem_id} img").first
    img.scroll_into_view_if_needed()
    left, top, w, h, nw, nh = img.evaluate("(e) => { const r = e.getBoundingClientRect(); "
                                           "return [r.left, r.top, r.width, r.height, e.naturalWidth, e.naturalHeight]; }")
    r = min(w / nw, h / nh, 1)  # Gradio's own mapping of a click to image pixels
    pg.mouse.click(left + (w - nw * r) / 2 + nx * r, top + (h - nh * r) / 2 + ny * r)


def click_source_pixel(pg, x: int, y: int) -> None:  # type: ignore[no-untyped-def]
    """Click the centre of original pixel (x, y) of the shown source image (the 64x64 scenes are enlarged)."""
    nw = pg.locator("#src-view img").first.evaluate("(e) => e.naturalWidth")
    scale = nw // 64
    click_natural(pg, "src-view", (x + 0.5) * scale, (y + 0.5) * scale)


def expected_matches(point: tuple[int, int]) -> dict[str, tuple[float, float]]:
    """difffeat.heads.matching on the same features, computed here without the app."""
    import difffeat
    from difffeat.data.shapes import render_pair
    from difffeat.heads import matching as M
    from difffeat.registry import MODELS, get_preset
    from difffeat.tasks.correspond import MatchSettings
    from PIL import Image

    p = MODELS["difffeat-tiny"]
    b = render_pair(6, seed=0, split="test")
    src, tgt = Image.fromarray(b.image[0].numpy()), Image.fromarray(b.image2[0].numpy())
    ex = difffeat.create("difffeat-tiny", layers=[p.layers[0]], timesteps=[p.timesteps[0]], ensemble=p.ensemble,
                         resolution=p.resolution, seed=0, device="cpu")
    sd, td = (ex([im])[p.layers[0]][0].float() for im in (src, tgt))
    settings = MatchSettings.from_dict(get_preset("dift").raw.get("matching"))
    out = {}
    for mode in ("argmax", "soft"):
        kw = {**settings.point_kwargs(), "mode": mode}
        m = M.match_points(sd, td, torch.tensor([point], dtype=torch.float32), src_size=(64, 64), tgt_size=(64, 64), **kw)
        out[mode] = tuple(m.points[0].tolist())
    return out


def parse_xy(text: str, label: str) -> tuple[float, float]:
    m = re.search(rf"{label} \(x=([-\d.]+), y=([-\d.]+)\)", text)
    assert m, f"no {label} in {text!r}"
    return float(m.group(1)), float(m.group(2))


def shot(pg, name: str) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def check_click_reports_the_library_match(page) -> None:  # type: ignore[no-untyped-def]
    click_source_pixel(page, *POINT)
    text = wait_text(page, "match-result", rf"source \(x={POINT[0]}, y={POINT[1]}\)")
    want = expected_matches(POINT)
    got_arg, got_soft = parse_xy(text, "argmax"), parse_xy(text, "soft-argmax")
    assert got_arg == pytest.approx(want["argmax"], abs=0.006), text  # the page shows 2 decimals
    assert got_soft == pytest.approx(want["soft"], abs=0.006), text
    assert "mutual NN: " in text
    assert box_text(page, "correspond-status") == "ok"
    assert page.locator("#tgt-view img").first.get_attribute("src")
    shot(page, "correspond")


def check_corrupt_upload_shows_one_error_line_and_server_keeps_serving(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    page.locator("#src-upload input[type=file]").set_input_files(str(bad))
    err = wait_text(page, "correspond-status", "^error: ")
    assert "\n" not in err and "broken.png" in err and "cannot read image" in err, err
    # the server still answers: a click on another pixel gives a new match
    click_source_pixel(page, 40, 12)
    wait_text(page, "match-result", r"source \(x=40, y=12\)")
    assert box_text(page, "correspond-status") == "ok"


TABS = [("Features", "feat", "features"), ("Classify", "cls", "classify"),
        ("Segment / depth / edges", "dense", "dense"), ("Detect", "det", "detect")]


def check_tab_runs(page, tab: str, prefix: str, status: str) -> None:  # type: ignore[no-untyped-def]
    page.get_by_role("tab", name=tab).click()
    page.locator(f"#{prefix}-run").click()
    result, status_sel = (f"#{i} textarea, #{i} input" for i in (f"{prefix}-result", f"{status}-status"))
    page.wait_for_function("([r, s]) => { const a = document.querySelector(r), b = document.querySelector(s); "
                           "return (a && a.value) || (b && b.value.startsWith('error')); }", arg=[result, status_sel])
    assert box_text(page, f"{status}-status") == "ok", box_text(page, f"{status}-status")
    text = box_text(page, f"{prefix}-result")
    if status == "classify":
        assert re.search(r"top-1: \w+ .*; 34 denoiser evaluations", text), text
    if status == "detect":
        assert re.search(r"DIRE score \d\.\d{4}", text), text
    if status != "classify":  # the others show an image; classify a ranking table
        page.locator(f"#{prefix}-view img").first.wait_for()
    shot(page, status)


def check_grid_cell_picks_layer_and_t(page) -> None:  # type: ignore[no-untyped-def]
    """Features tab: the layer x t grid; clicking the cell of up.1, t=250 shows that setting."""
    from difffeat.explore.views import GRID_CAPTION, GRID_CELL, GRID_PAD, GRID_TIMESTEPS

    page.locator("#feat-grid").click()
    wait_text(page, "feat-result", "click a cell")
    page.locator("#feat-grid-view img").first.wait_for()
    row, col = 6, 2  # down.0..3, mid, up.0, up.1 | t 25, 100, 250
    x = GRID_PAD + col * (GRID_CELL + GRID_PAD) + GRID_CELL / 2
    y = GRID_CAPTION + 2 * GRID_PAD + row * (GRID_CELL + GRID_CAPTION + GRID_PAD) + GRID_CELL / 2
    click_natural(page, "feat-grid-view", x, y)
    wait_text(page, "feat-result", f"up.1 t={GRID_TIMESTEPS[col]}: ")
    assert box_text(page, "features-status") == "ok"
    shot(page, "features")


def test_explore_in_a_real_browser(page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One test (so pytest-xdist keeps it on one worker: one server start), in steps."""
    check_click_reports_the_library_match(page)
    check_corrupt_upload_shows_one_error_line_and_server_keeps_serving(page, tmp_path)
    for tab, prefix, status in TABS:
        check_tab_runs(page, tab, prefix, status)
        if prefix == "feat":
            check_grid_cell_picks_layer_and_t(page)
