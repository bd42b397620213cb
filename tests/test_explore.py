"""The explore app's logic without a browser (difffeat-tiny, the bundled shapes scenes).

The page itself is tested in tests/test_explore_browser.py; here: the feature cache (a
second click costs no denoiser forward), the matches against difffeat.heads.matching,
co-PCA colours, the Diffusion Classifier's progress and evaluation count, a head for
another backbone, the upload guards and the command's safety defaults.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difffeat.errors import BadInputError, CheckpointMismatchError, DiffFeatError, UnknownNameError
from difffeat.explore import session as S
from difffeat.explore import views as V
from difffeat.heads import matching as M


@pytest.fixture(scope="module")
def sess() -> S.Session:
    return S.Session(scenes=2, device="cpu")


@pytest.fixture()
def forwards(sess: S.Session):  # type: ignore[no-untyped-def]
    """A counter of denoiser forward calls during the test (a pre-hook: early exit skips post-hooks)."""
    calls = [0]
    h = sess.backbone.denoiser.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    yield calls
    h.remove()


def test_second_click_on_the_same_pair_runs_no_denoiser_forward(sess: S.Session, forwards: list[int]) -> None:
    sc = sess.scenes[1]
    V.click_match(sess, sc.image, sc.view2, (10, 10), "dift", "up.0", 60)
    first = forwards[0]
    assert first >= 2  # both images were extracted
    m = V.click_match(sess, sc.image, sc.view2, (33, 21), "dift", "up.0", 60)
    assert forwards[0] == first  # another point on the same pair: cached features, one matmul
    V.click_match(sess, sc.image, sc.view2, (33, 21), "dift", "up.1", 60)
    assert forwards[0] > first  # other settings: extracted again ...
    n = forwards[0]
    again = V.click_match(sess, sc.image, sc.view2, (33, 21), "dift", "up.0", 60)
    assert forwards[0] == n and again.argmax == m.argmax  # ... and the first setting is still cached


def test_click_match_is_the_library_match_on_the_same_features(sess: S.Session) -> None:
    import difffeat

    sc = sess.scenes[0]
    m = V.click_match(sess, sc.image, sc.view2, (20, 37), "dift", "up.0", 100)
    ex = difffeat.create("difffeat-tiny", layers=["up.0"], timesteps=[100], ensemble=1, resolution=64, seed=0)
    sd, td = (ex([im])["up.0"][0] for im in (sc.image, sc.view2))
    pts = torch.tensor([[20.0, 37.0]])
    want = M.match_points(sd, td, pts, src_size=(64, 64), tgt_size=(64, 64), metric="cosine", mode="argmax")
    soft = M.match_points(sd, td, pts, src_size=(64, 64), tgt_size=(64, 64), metric="cosine", mode="soft")
    back = M.match_points(td, sd, want.points, src_size=(64, 64), tgt_size=(64, 64), metric="cosine")
    assert m.argmax == pytest.approx(tuple(want.points[0].tolist()), abs=1e-4)
    assert m.soft == pytest.approx(tuple(soft.points[0].tolist()), abs=1e-4)
    assert m.score == pytest.approx(float(want.scores[0]), abs=1e-5)
    assert m.mutual == bool((back.points[0] - pts[0]).norm() <= 4 + 1e-4)  # one feature stride of up.0
    assert m.target_view.size == (256, 256) and m.source_view.size == (256, 256)  # 64x64 shown at 4x
    assert "argmax (x=" in m.text and "mutual NN: " in m.text


def test_heatmap_peaks_at_the_argmax(sess: S.Session) -> None:
    sc = sess.scenes[0]
    pipe, _, key = V.correspond_pipeline(sess, "dift", "up.0", 100)
    a, b = V.pair_features(sess, pipe, key, sc.image, sc.view2)
    sd, td = pipe.descriptors(a, b)
    hm = V.heatmap(pipe, sd, td, a, b, torch.tensor([[20.0, 37.0]]))
    m = V.click_match(sess, sc.image, sc.view2, (20, 37), "dift", "up.0", 100)
    y, x = np.unravel_index(hm.argmax(), hm.shape)
    assert (float(x), float(y)) == m.argmax and hm.max() == pytest.approx(m.score, abs=1e-5)


def test_a_fusion_preset_on_another_model_applies_only_its_matching(sess: S.Session) -> None:
    sc = sess.scenes[0]
    m = V.click_match(sess, sc.image, sc.view2, (20, 37), "sd-dino", "up.0", 100)
    assert m.metric == "l2" and "need -m sd15" in m.note  # SD-DINO's L2 nearest neighbour, said plainly
    assert "-> argmax (x=" in m.text and m.score <= 0  # negative squared distance


def test_clicks_outside_the_image_and_unknown_names_are_one_line_errors(sess: S.Session) -> None:
    assert S.click_to_pixel([130, 7], (64, 64), 4) == (32, 1)  # display pixel -> the original pixel under it
    with pytest.raises(BadInputError, match="outside the source image"):
        S.click_to_pixel(None, (64, 64), 4)
    with pytest.raises(BadInputError, match="outside the source image"):
        S.click_to_pixel([300, 10], (64, 64), 4)
    sc = sess.scenes[0]
    with pytest.raises(BadInputError, match="outside the source image"):
        V.click_match(sess, sc.image, sc.view2, (64, 3), "dift", "up.0", 100)
    with pytest.raises(UnknownNameError, match="dift"):
        V.click_match(sess, sc.image, sc.view2, (3, 3), "nope", "up.0", 100)
    with pytest.raises(UnknownNameError, match="up.0"):
        V.click_match(sess, sc.image, sc.view2, (3, 3), "dift", "up.9", 100)
    with pytest.raises(BadInputError, match="outside"):
        V.click_match(sess, sc.image, sc.view2, (3, 3), "dift", "up.0", 1000)
    with pytest.raises(UnknownNameError):
        S.Session(preset="no-such-preset")
    with pytest.raises(BadInputError, match="correspondence preset"):
        S.Session(preset="diffseg")


def test_uploads_go_through_the_loader_and_huge_images_are_refused(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadInputError, match="cannot read image .*broken.jpg"):
        S.load_upload(bad)
    with pytest.raises(BadInputError, match="no image"):
        S.load_upload(None)
    good = tmp_path / "rgba.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(good)
    assert S.load_upload(good).mode == "RGB"  # the library's conversions (alpha on white)
    monkeypatch.setattr(S, "MAX_PIXELS", 1000)
    with pytest.raises(BadInputError, match="40x30 pixels"):
        S.load_upload(good)


def test_co_pca_colours_match_across_images_and_pca_rgb_is_unchanged() -> None:
    from difffeat.viz import co_pca_rgb, pca_rgb

    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 6, 6, generator=g)
    b = a.flip(-1)  # the same features, mirrored
    ra, rb = co_pca_rgb([a, b])
    assert np.array_equal(np.asarray(ra)[:, ::-1], np.asarray(rb))  # one PCA: same feature, same colour
    assert np.array_equal(np.asarray(pca_rgb(a)), np.asarray(co_pca_rgb([a])[0]))


def test_features_view_and_sweep_grid(sess: S.Session) -> None:
    from difffeat.viz import pca_rgb

    sc = sess.scenes[0]
    img, info = V.features_view(sess, [sc.image, sc.view2], "up.0", 100, 4)
    assert "128 channels on a 16x16 grid" in info and img.width > 3 * 64
    grid = V.sweep_grid(sess, sc.image, timesteps=(50, 400))
    assert grid.layers == tuple(sess.layer_names()) and grid.timesteps == (50, 400)
    pad, cap, (cw, ch) = V.GRID_PAD, V.GRID_CAPTION, grid.cell
    maps = sess.feature_maps(sc.image, grid.layers, grid.timesteps)
    for row, col in ((0, 0), (3, 1), (len(grid.layers) - 1, 1)):  # a pixel inside cell (row, col) ...
        x = pad + col * (cw + pad) + cw // 3
        y = cap + pad + pad + row * (ch + cap + pad) + ch // 3
        layer, t = grid.pick([x, y])
        assert (layer, t) == (grid.layers[row], grid.timesteps[col])
        panel = pca_rgb(maps[f"{layer}@t{t}"], grid.cell)  # ... shows that layer and t there
        assert grid.image.getpixel((x, y)) == panel.getpixel((cw // 3, ch // 3))
    assert grid.image.height >= len(grid.layers) * (ch + cap)
    with pytest.raises(BadInputError, match="click a cell"):
        grid.pick([grid.image.width - 1, 2])
    with pytest.raises(BadInputError, match="k >= 2"):
        V.features_view(sess, [sc.image], "up.0", 100, 1)


def test_classify_reports_progress_and_the_evaluations_used(sess: S.Session) -> None:
    seen: list[float] = []
    r = V.classify_image(sess, sess.scenes[0].image, "disk, square, triangle, star", "2", "1",
                         lambda f, _m: seen.append(f))
    assert r.evals == r.planned == 2 * 4  # one stage: every class on 2 timesteps
    assert "8 denoiser evaluations" in r.text
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    assert sorted(row[1] for row in r.rows) == ["disk", "square", "star", "triangle"]
    assert [row[0] for row in r.rows] == [1, 2, 3, 4]
    assert all(row[3] == 2 for row in r.rows)  # every class scored on the same 2 (t, noise) pairs ...
    assert [row[2] for row in r.rows] == sorted(row[2] for row in r.rows)  # ... so ranked by mean error
    with pytest.raises(BadInputError, match="shapes classes"):
        V.classify_image(sess, sess.scenes[0].image, "cat, dog", "2", "1")


def _head(folder: Path, sess: S.Session, preset: str, task: str = "seg") -> Path:
    from difffeat.heads import build_head, save_head

    info = sess.extractor(("up.0",), (100,)).feature_info
    head = build_head("probe", info, num_outputs=3 if task == "seg" else 1)
    return save_head(head, folder, backbone={"preset": preset, "layers": ["up.0"], "timesteps": [100]},
                     task=task, image_size=64)


def test_dense_heads_zero_shot_and_another_backbone(sess: S.Session, tmp_path: Path) -> None:
    img = sess.scenes[0].image
    view, info = V.dense_view(sess, img, "k-means", 3, "up.0", 100, None)
    assert view.size == (256, 256) and "k=3" in info
    for task in ("seg", "depth", "edges"):
        mine = _head(tmp_path / task, sess, "difffeat-tiny", task)
        view, info = V.dense_view(sess, img, "head folder", 3, "up.0", 100, str(mine))
        assert view.size == (256, 256) and info.startswith(f"{task} head")
    other = _head(tmp_path / "sd15", sess, "sd15")
    with pytest.raises(CheckpointMismatchError, match="preset 'sd15'"):
        V.dense_view(sess, img, "head folder", 3, "up.0", 100, str(other))
    with pytest.raises(BadInputError, match="no such head folder"):
        V.dense_view(sess, img, "head folder", 3, "up.0", 100, str(tmp_path / "missing"))


def test_dire_score_matches_the_detect_task(sess: S.Session) -> None:
    from difffeat.io import pil_to_tensor
    from difffeat.tasks.detect import detector_from_preset

    img = sess.scenes[0].image
    emap, text = V.detect_view(sess, img, "DIRE", 2)
    det = detector_from_preset("dire-adm256", "difffeat-tiny", dire={"resolution": 64, "steps": 2},
                               device="cpu")
    want = float(det(pil_to_tensor(img)[None])["score"][0])
    assert f"DIRE score {want:.4f}" in text and emap.size == (64, 64)


def test_command_defaults_are_local_and_exposure_warns(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    from click.testing import CliRunner

    from difffeat.cli import cli, load_task_commands
    from difffeat.explore.launch import check_gradio, exposure_warning

    load_task_commands()
    out = CliRunner().invoke(cli, ["explore", "--help"]).output
    assert "[default: 127.0.0.1]" in out
    assert exposure_warning("127.0.0.1", False) is None
    assert "every machine" in str(exposure_warning("0.0.0.0", False))
    assert "public" in str(exposure_warning("127.0.0.1", True))
    monkeypatch.setitem(sys.modules, "gradio", None)  # the extra not installed
    with pytest.raises(DiffFeatError, match=r"difffeat\[explore\]"):
        check_gradio()


def test_a_failing_callback_leaves_outputs_and_shows_one_line() -> None:
    pytest.importorskip("gradio", reason="the [explore] extra is not installed")
    from difffeat.explore.app import guarded

    def boom(x: int) -> tuple[int, int]:
        raise BadInputError("image broken.png is 9000x9000 pixels")

    out = guarded(boom, 2)(1)
    assert out[-1] == "error: image broken.png is 9000x9000 pixels" and len(out) == 3
    assert guarded(lambda x: (x, x + 1), 2)(1) == (1, 2, "ok")
    crash = guarded(lambda: (_ for _ in ()).throw(RuntimeError("cuda\nsecond line")), 1)()
    assert crash[-1] == "error: RuntimeError: cuda"
