"""Reliability of folder runs: awkward and broken inputs, kill -9 and resume, concurrent runs,
output paths, unwritable outputs, untrusted checkpoints, out-of-memory, rank devices.

Every file of the corpus is generated here (no binaries are committed). Each command runs
in-process on the tiny model at 32-64 px; the kill test forks a child (cheap: torch is
already imported), lets it write some outputs, stops it in the middle of a write and
``kill -9``s it, then resumes in-process.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from difffeat.errors import BadInputError, DiffFeatError

GOOD = ["ok.png", "CMYK.JPG", "g16.png", "pal.png", "one px.png", "exif.jpg", "ünïcödé.png"]
BAD = ["bomb.png", "zero.png", "text.jpg", "trunc.png", "dir.png", "dangling.png", "fifo.png", "dev.png"]
EXTRACT = ["-l", "up.1", "-t", "261", "-e", "1", "--resolution", "64", "--device", "cpu", "--dtype", "fp32"]


def invoke(*args: Any):  # type: ignore[no-untyped-def]
    from difffeat.cli import cli, load_task_commands

    load_task_commands()
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR with correct CRC) for a huge RGB image, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    noise = lambda h, w, c=3: rng.integers(0, 255, (h, w, c), dtype=np.uint8)  # noqa: E731
    Image.fromarray(noise(40, 56)).save(root / "ok.png")
    Image.fromarray(noise(32, 32)).convert("CMYK").save(root / "CMYK.JPG")
    Image.fromarray(rng.integers(0, 65535, (32, 48), dtype=np.uint16)).save(root / "g16.png")
    Image.fromarray(noise(24, 24)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(root / "pal.png")
    Image.fromarray(noise(1, 1)).save(root / "one px.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noise(20, 40)).save(root / "exif.jpg", exif=exif.tobytes())
    Image.fromarray(noise(24, 24)).save(root / "ünïcödé.png")
    (root / "bomb.png").write_bytes(png_claiming(30000, 30000))
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a jpeg\n")
    (root / "trunc.png").write_bytes((root / "ok.png").read_bytes()[:300])
    (root / "dir.png").mkdir()
    os.symlink(root / "missing.png", root / "dangling.png")
    os.mkfifo(root / "fifo.png")
    os.symlink("/dev/null", root / "dev.png")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "imgs")


def assert_one_line_per_bad_file(output: str, bad: list[str], good: list[str]) -> None:
    lines = [ln for ln in output.splitlines() if "failed (first:" not in ln]
    for name in bad:
        hits = [ln for ln in lines if name in ln]
        assert len(hits) == 1, (name, hits, output)
    for name in good:
        assert not [ln for ln in lines if ln.startswith("error") and name in ln], (name, output)
    assert f"{len(bad)} of " in output and "failed" in output


# ------------------------------------------------------------------ the corpus through every command
def test_guarded_loader_on_the_corpus(corpus: Path) -> None:
    from difffeat.io import list_images, load_image, original_size

    listed = {p.name for p in list_images(corpus)}
    assert listed == set(GOOD) | set(BAD)
    for name in BAD:
        with pytest.raises(BadInputError) as e:
            load_image(corpus / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    assert "claims 30000x30000" in str(pytest.raises(BadInputError, load_image, corpus / "bomb.png").value)
    for name in GOOD:
        assert load_image(corpus / name).mode == "RGB"
    assert load_image(corpus / "exif.jpg").size == (20, 40) == original_size(load_image(corpus / "exif.jpg"))


def test_huge_images_are_reduced_while_decoding(tmp_path: Path, tiny_sd_dir: Path) -> None:
    from difffeat.io import load_image, original_size, set_max_pixels

    big = Image.linear_gradient("L").resize((2400, 800)).convert("RGB")
    big.save(tmp_path / "big.jpg", quality=90)
    big.save(tmp_path / "big.png")
    for name in ("big.jpg", "big.png"):
        im = load_image(tmp_path / name, max_side=300)
        assert 300 <= max(im.size) < 600 and original_size(im) == (2400, 800)
        ref = big.resize(im.size, Image.BICUBIC)
        assert np.abs(np.asarray(im, float) - np.asarray(ref, float)).mean() < 2.0  # same picture
    assert load_image(tmp_path / "big.png").size == (2400, 800)  # no working size: untouched
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated on display: reduced, then turned upright like the full-size image
    big.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    im = load_image(tmp_path / "rot.jpg", max_side=300)
    assert im.size[1] > im.size[0] and original_size(im) == (800, 2400)
    (tmp_path / "rot.jpg").unlink()
    set_max_pixels(1_000_000)
    try:
        with pytest.raises(BadInputError, match="claims 2400x800 = 1920000 pixels, over the limit of 1000000"):
            load_image(tmp_path / "big.png")
    finally:
        set_max_pixels(None)
    hdr = tmp_path / "hdr"
    hdr.mkdir()
    (hdr / "claims.png").write_bytes(png_claiming(3000, 3000))  # 9 M pixels claimed, no pixel data
    big.resize((64, 64)).save(hdr / "small.png")
    args = ["extract", hdr, "-m", tiny_sd_dir, *EXTRACT, "-o", tmp_path / "o"]
    r = invoke("--max-pixels", 5_000_000, *args)
    assert r.exit_code == 2 and "claims 3000x3000 = 9000000 pixels, over the limit of 5000000" in r.output
    assert (tmp_path / "o" / "small.safetensors").exists()
    r = invoke(*args)  # under the default limit the header passes; the missing pixel data is the error
    assert r.exit_code == 2 and "over the limit" not in r.output and "claims.png: OSError: image file is truncated" in r.output
    # two inputs that would write one output are both refused, neither overwrites the other
    r = invoke("extract", tmp_path, "-m", tiny_sd_dir, *EXTRACT, "-o", tmp_path / "o2")
    assert r.output.count("both map to") == 2 and not (tmp_path / "o2" / "big.safetensors").exists()


def test_extract_over_the_corpus(corpus: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    from difffeat.io import load_features

    out = tmp_path / "feats"
    r = invoke("extract", corpus, "-m", tiny_sd_dir, *EXTRACT, "-o", out, "-b", 3)
    assert r.exit_code == 2
    assert_one_line_per_bad_file(r.output, BAD, GOOD)
    for name in GOOD:
        feats, meta = load_features(out / (Path(name).stem + ".safetensors"))
        assert feats["up.1"].shape[-1] == 4 and meta["image"] == str(corpus / name)
    # sharded output: the same per-file lines, bad files recorded as errors in the index
    r = invoke("extract", corpus, "-m", tiny_sd_dir, *EXTRACT, "-o", tmp_path / "sh", "--shard-size", 4)
    assert r.exit_code != 0
    assert_one_line_per_bad_file(r.output.replace("See the 'error' lines", ""), BAD, GOOD)


def test_classify_and_segment_over_the_corpus(corpus: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    from difffeat.io import load_image

    out = tmp_path / "preds.csv"
    r = invoke("classify", corpus, "-m", tiny_sd_dir, "--classes", "cat,dog", "--n-samples", "1", "--resolution", "64",
               "--device", "cpu", "-o", out)
    assert r.exit_code == 2
    assert_one_line_per_bad_file(r.output, BAD, GOOD)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [row["image"] for row in rows] == [str(corpus / g) for g in sorted(GOOD)]  # each once, in order
    r = invoke("segment", corpus, "--zero-shot", 2, "-m", tiny_sd_dir, *EXTRACT, "-o", tmp_path / "seg")
    assert r.exit_code == 2
    assert_one_line_per_bad_file(r.output, BAD, GOOD)
    for name in GOOD:
        mask = Image.open(tmp_path / "seg" / (Path(name).stem + ".png"))
        assert mask.size == load_image(corpus / name).size  # the upright original size


def test_detect_and_correspond_over_the_corpus(corpus: Path, tiny_sd_dir: Path, tiny_pixel_dir: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    r = invoke("detect", corpus, "--training-free", "--preset", "dire-adm256", "-m", tiny_pixel_dir, "--steps", 2,
               "--resolution", 16, "--device", "cpu", "--dtype", "fp32", "-o", out)
    assert r.exit_code == 2
    usable = GOOD  # dire-adm256 upsamples small images (1x1 too), as the reference's center_crop_arr
    assert_one_line_per_bad_file(r.output, BAD, usable)
    assert [row["image"] for row in csv.DictReader(out.open(encoding="utf-8"))] == [str(corpus / g) for g in sorted(usable)]

    pairs = tmp_path / "pairs.csv"
    rows = [("ok.png", "ünïcödé.png"), ("ok.png", "bomb.png"), ("zero.png", "ok.png"), ("fifo.png", "ok.png"),
            ("dir.png", "pal.png"), ("CMYK.JPG", "dangling.png")]
    pairs.write_text("source,target\n" + "".join(f"{corpus / a},{corpus / b}\n" for a, b in rows), encoding="utf-8")
    r = invoke("correspond", "--pairs", pairs, "--points", "2,2", "-m", tiny_sd_dir, *EXTRACT, "-o", tmp_path / "c")
    assert r.exit_code == 2 and "5 of 6 pairs failed" in r.output
    for bad in ("bomb.png", "zero.png", "fifo.png", "dir.png", "dangling.png"):
        assert len([ln for ln in r.output.splitlines() if bad in ln and "failed (first" not in ln]) == 1, r.output
    assert len(list((tmp_path / "c").glob("*.json"))) == 1


def _save_head(folder: Path, tiny_sd_dir: Path, task: str, outputs: int) -> Path:
    import difffeat
    from difffeat.heads import build_head
    from difffeat.heads.checkpoint import save_head

    ex = difffeat.create(str(tiny_sd_dir), layers=["up.1"], timesteps=[261], ensemble=1, resolution=64, device="cpu",
                         dtype="fp32")
    torch.manual_seed(0)
    head = build_head("probe", ex.feature_info, num_outputs=outputs)
    record = {"preset": str(tiny_sd_dir), "layers": ["up.1"], "timesteps": [261], "ensemble": 1, "resolution": 64}
    train = {"head": {"kind": "probe", "args": {"num_outputs": outputs}}, "loss": {"kind": "ssi"}}
    classes = [f"c{i}" for i in range(outputs)] if task == "seg" else None
    return save_head(head, folder, backbone=record, task=task, image_size=64, classes=classes,
                     extra={"train_config": train})


@pytest.fixture(scope="module")
def heads(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heads")
    return {t: _save_head(root / t, tiny_sd_dir, t, 3 if t == "seg" else 1) for t in ("seg", "depth", "edges")}


def test_dense_predictors_over_the_corpus(corpus: Path, heads: dict[str, Path], tmp_path: Path) -> None:
    for cmd, task in (("segment", "seg"), ("depth", "depth"), ("edges", "edges")):
        out = tmp_path / task
        r = invoke(cmd, corpus, "--head", heads[task], "--device", "cpu", "-o", out, "-b", 2)
        assert r.exit_code == 2, r.output
        assert_one_line_per_bad_file(r.output, BAD, GOOD)
        for name in GOOD:
            assert (out / (Path(name).stem + ".png")).exists(), (cmd, name)


# ------------------------------------------------------------------ kill -9 and resume
def fork_and_hang(args: list[str], hang: Callable[[], None], marker: Path) -> int:
    """Run the CLI in a forked child that calls ``hang`` where it should stop; return its pid
    once it is stopped there (``marker`` written), ready to be killed."""
    pid = os.fork()
    if pid == 0:  # the child: a folder run that will be killed
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            hang()
            from difffeat.cli import main

            main([str(a) for a in args])
        finally:
            os._exit(0)
    deadline = time.time() + 120
    while not marker.exists():
        if time.time() > deadline or os.waitpid(pid, os.WNOHANG) != (0, 0):
            raise AssertionError("the child run did not reach the point where it is killed")
        time.sleep(0.01)
    return pid


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def hang_before_replacing(name: str, marker: Path) -> Callable[[], None]:
    """In the child: stop for good just before the temporary file of output ``name`` is renamed."""
    def install() -> None:
        real = os.replace

        def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            if Path(dst).name == name:
                marker.write_text(str(os.getpid()))
                time.sleep(600)
            real(src, dst, *a, **k)

        os.replace = replace  # type: ignore[assignment]
    return install


def hang_mid_row(n: int, marker: Path) -> Callable[[], None]:
    """In the child: the ``n``-th CSV row is cut in the middle of its write."""
    def install() -> None:
        from difffeat import runner

        real, calls = runner.CsvSink.append, [0]

        def append(self: Any, row: dict[str, Any], path: Path | None = None) -> None:
            calls[0] += 1
            if calls[0] == n:
                with open(path or self.path, "a", encoding="utf-8") as f:
                    f.write(",".join(str(row[k]) for k in self.fields)[:12])
                marker.write_text(str(os.getpid()))
                time.sleep(600)
            real(self, row, path)

        runner.CsvSink.append = append  # type: ignore[method-assign]
    return install


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "imgs"
    root.mkdir()
    rng = np.random.default_rng(1)
    for name in "abcde":
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


@pytest.mark.parametrize("mode", ["files", "shards"])
def test_kill9_mid_write_then_resume_is_bit_identical(mode: str, clean: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    from difffeat.io import load_features
    from difffeat.shards import ShardedFeatures

    extra, hang_at = (["-b", 2], "d.safetensors") if mode == "files" else (["--shard-size", 2, "-b", 1], "shard-000001.jsonl")
    args = ["extract", clean, "-m", tiny_sd_dir, *EXTRACT, *extra]
    assert invoke(*args, "-o", tmp_path / "ref").exit_code == 0
    out, marker = tmp_path / "run", tmp_path / "stopped"
    pid = fork_and_hang([*args, "-o", out], hang_before_replacing(hang_at, marker), marker)
    before = digests(out)
    assert any(Path(n).name.startswith(f".{hang_at}.") for n in before), before  # killed mid-write
    if mode == "files":
        assert {"a.safetensors", "b.safetensors", "c.safetensors"} <= set(before) and "d.safetensors" not in before
    else:  # shard 1's tensors are in place, its index (the 'finished' mark) is not
        assert {"shard-000000.jsonl", "shard-000001.safetensors"} <= set(before) and "shard-000001.jsonl" not in before
    kill9(pid)
    r = invoke(*args, "-o", out)
    assert r.exit_code == 0, r.output
    assert "resuming:" in r.output
    assert digests(out) == digests(tmp_path / "ref")  # every file, byte for byte; no temporary file left
    if mode == "files":
        for p in out.glob("*.safetensors"):
            load_features(p)
        assert sorted(p.name for p in out.glob("*.safetensors")) == [f"{c}.safetensors" for c in "abcde"]
    else:
        feats = ShardedFeatures(out)
        assert sorted(feats) == [f"{c}.png" for c in "abcde"] and all(feats[k]["up.1"].ndim == 3 for k in feats)


def test_kill9_mid_csv_row_then_resume(clean: Path, tiny_sd_dir: Path, tiny_pixel_dir: Path, tmp_path: Path) -> None:
    args = ["classify", clean, "-m", tiny_sd_dir, "--classes", "cat,dog", "--n-samples", "1", "--resolution", "64",
            "--device", "cpu"]
    assert invoke(*args, "-o", tmp_path / "ref.csv").exit_code == 0
    out, marker = tmp_path / "preds.csv", tmp_path / "stopped"
    kill9(fork_and_hang([*args, "-o", out], hang_mid_row(3, marker), marker))
    assert not out.read_text().endswith("\n") and len(out.read_text().splitlines()) == 4  # header, 2 rows, a cut row
    r = invoke(*args, "-o", out)
    assert r.exit_code == 0 and "resuming: 2 of 5" in r.output, r.output
    assert out.read_bytes() == (tmp_path / "ref.csv").read_bytes()  # each image once, in image order
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # detect: per-image rows are atomic JSON parts, assembled in image order
    dargs = ["detect", clean, "--training-free", "--preset", "dire-adm256", "-m", tiny_pixel_dir, "--steps", 2,
             "--resolution", 16, "--device", "cpu", "--dtype", "fp32", "-b", 2]
    assert invoke(*dargs, "-o", tmp_path / "dref.csv").exit_code == 0
    out, marker = tmp_path / "scores.csv", tmp_path / "stopped2"
    kill9(fork_and_hang([*dargs, "-o", out], hang_before_replacing("d.json", marker), marker))
    r = invoke(*dargs, "-o", out)
    assert r.exit_code == 0 and "resuming: 3 of 5" in r.output, r.output
    assert out.read_bytes() == (tmp_path / "dref.csv").read_bytes()
    assert not list((tmp_path / "scores.csv.parts").rglob("*.tmp"))


# ------------------------------------------------------------------ concurrency, paths, unwritable outputs
def test_a_second_run_on_a_locked_folder_is_refused_and_a_dead_holder_is_taken_over(
        clean: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    out, marker = tmp_path / "feats", tmp_path / "stopped"
    args = ["extract", clean, "-m", tiny_sd_dir, *EXTRACT, "-b", 1]
    pid = fork_and_hang([*args, "-o", out], hang_before_replacing("b.safetensors", marker), marker)
    try:
        r = invoke(*args, "-o", out)  # a second process while the first one writes
        assert r.exit_code == 2 and r.output.count("\n") == 1
        assert r.output.startswith(f"error: another difffeat run (pid {pid}) is writing to {out}")
        assert (out / "a.safetensors").exists() and not (out / "c.safetensors").exists()
    finally:
        kill9(pid)
    r = invoke(*args, "-o", out)  # the lock of the killed run is stale: taken over
    assert r.exit_code == 0 and "resuming: 1 of 5" in r.output


def test_outputs_never_leave_the_output_folder(clean: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    from difffeat.io import inside

    for bad in ("../x.safetensors", "/etc/x", "a/../../x"):
        with pytest.raises(BadInputError, match="would leave the output folder"):
            inside(tmp_path, bad)
    imgs, out, outside = tmp_path / "imgs", tmp_path / "out", tmp_path / "outside"
    (imgs / "sub").mkdir(parents=True)
    outside.mkdir()
    for name in ("a.png", "b.png"):
        os.symlink(clean / name, imgs / name)  # inputs reached through links map by their own name
    os.symlink(clean / "c.png", imgs / "sub" / "c.png")
    (out / "sub").parent.mkdir()
    os.symlink(outside, out / "sub")  # a folder in the output that leads out of it
    r = invoke("extract", imgs, "-m", tiny_sd_dir, *EXTRACT, "-o", out)
    assert r.exit_code == 2 and "would be written outside" in r.output and "1 of 3 images failed" in r.output
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["a.safetensors", "b.safetensors"]
    assert not list(outside.iterdir())
    pairs = tmp_path / "pairs.csv"  # names such as '..' in a pairs file stay inside too
    pairs.write_text(f"source,target\n../{tmp_path.name}/imgs/a.png,imgs/../imgs/b.png\n")
    r = invoke("correspond", "--pairs", pairs, "--points", "2,2", "-m", tiny_sd_dir, *EXTRACT, "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert [p.parent for p in (tmp_path / "c").rglob("*.json")] == [tmp_path / "c"]


def test_unwritable_or_full_output_fails_at_the_start(clean: Path, tiny_sd_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, for whom chmod 0o555 is no barrier: os.access and the disk usage are
    mocked (what a non-root user on a read-only or full disk would see)."""
    import difffeat.runner as runner
    from difffeat.extractor import FeatureExtractor

    calls = []
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, *a, **k: calls.append(1))
    import types

    ro_os = types.SimpleNamespace(**{**vars(os), "access": lambda path, mode: False})  # the runner's view only
    monkeypatch.setattr(runner, "os", ro_os)
    r = invoke("extract", clean, "-m", tiny_sd_dir, *EXTRACT, "-o", tmp_path / "ro")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "is read-only" in r.output
    monkeypatch.undo()
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, *a, **k: calls.append(1))
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    r = invoke("extract", clean, "-m", tiny_sd_dir, *EXTRACT, "-o", tmp_path / "full")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "not enough free space" in r.output
    assert not calls  # no forward pass ran
    monkeypatch.undo()  # a disk that fills up during the run: one line, what was written is kept

    def full(path: Any, *a: Any) -> None:
        raise OSError(28, "No space left on device", str(path))

    import difffeat.pipeline as pipeline

    monkeypatch.setattr(pipeline, "save_features", full)
    r = invoke("extract", clean, "-m", tiny_sd_dir, *EXTRACT, "-o", tmp_path / "filling")
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert r.output.startswith("error: No space left on device: ") and "rerun to resume" in r.output


# ------------------------------------------------------------------ untrusted checkpoints and presets
def test_untrusted_heads_and_presets_are_refused_in_one_line(heads: dict[str, Path], corpus: Path, tmp_path: Path,
                                                             tiny_sd_dir: Path) -> None:
    import shutil

    from difffeat.validate import check_preset

    def refused(folder: Path, *extra: Any) -> str:
        r = invoke("depth", corpus / "ok.png", "--head", folder, "--device", "cpu", "-o", tmp_path / "o", *extra)
        assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: "), r.output
        return r.output

    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "head.safetensors").write_bytes(os.urandom(200))
    assert "cannot read head config" in refused(bad)  # no JSON, corrupt safetensors
    for name, edit in (("schema", lambda c: c.update(feature_info="all of them")),
                       ("nokind", lambda c: c["head"].pop("kind")),
                       ("notjson", None)):
        d = tmp_path / name
        shutil.copytree(heads["depth"], d)
        if edit is None:
            (d / "head.json").write_text("{not json")
        else:
            cfg = json.loads((d / "head.json").read_text())
            edit(cfg)
            (d / "head.json").write_text(json.dumps(cfg))
        msg = refused(d)
        assert ("feature_info" in msg or "head.kind" in msg or "cannot read head config" in msg), msg
    d = tmp_path / "weights"
    shutil.copytree(heads["depth"], d)
    (d / "head.safetensors").write_bytes(b"\0" * 64)
    assert "cannot load head weights" in refused(d)
    assert "trained with preset" in refused(heads["depth"], "-m", tmp_path / "another-model")  # another backbone
    d = tmp_path / "channels"  # a head for other features (channels)
    shutil.copytree(heads["depth"], d)
    cfg = json.loads((d / "head.json").read_text())
    cfg["feature_info"][0]["channels"] += 1
    (d / "head.json").write_text(json.dumps(cfg))
    assert "features" in refused(d)
    from difffeat.heads.dire import FORMAT as DETECTOR_FORMAT, read_detector_config
    from difffeat.heads.probe_cls import FORMAT as PROBE_FORMAT, ProbeClassifier

    det = tmp_path / "detector"
    det.mkdir()
    (det / "detector.safetensors").write_bytes(b"")
    (det / "detector.json").write_text(json.dumps({"format": DETECTOR_FORMAT, "kind": 5, "backbone": {}}))
    with pytest.raises(BadInputError, match="'kind' must be str, got int"):
        read_detector_config(det)
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "probe.safetensors").write_bytes(b"")
    (probe / "probe.json").write_text(json.dumps({"format": PROBE_FORMAT, "classes": "ab", "feature_dim": 4,
                                                  "backbone": {}}))
    with pytest.raises(BadInputError, match="'classes' must be a list, got str"):
        ProbeClassifier.load(probe)
    with pytest.raises(DiffFeatError, match="unknown key in the extract block of x.yaml: 'layer'"):
        check_preset({"name": "p", "extract": {"model": "sd21", "layer": "up.1"}}, "x.yaml")
    from difffeat.registry import get_preset, method_presets

    for name in method_presets():  # every shipped preset passes its own validation
        get_preset(name)


# ------------------------------------------------------------------ out of memory and rank devices
def test_out_of_memory_retries_at_half_size_then_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    from difffeat.runner import Job, run

    sizes: list[int] = []

    def process(batch: list[int]) -> None:
        sizes.append(len(batch))
        if len(batch) > 2 or 13 in batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

    res = run(Job(list(range(12)), process), batch_size=4)
    assert sizes == [4, 2, 2, 2, 2, 2, 2]  # the first batch once at 4, retried as two halves; the rest at 2
    assert res.done == 12 and not res.failed
    assert capsys.readouterr().err.count("out of GPU memory at batch size 4; retrying at 2") == 1
    sizes.clear()
    res = run(Job([10, 11, 12, 13, 14, 15], process), batch_size=4)  # the half holding 13 fails again
    assert sizes[:3] == [4, 2, 2] and res.done == 4
    assert [name for name, _ in res.failed] == ["12", "13"]
    assert all("out of GPU memory at batch size 2: lower -b/--batch-size" in msg for _, msg in res.failed)
    res = run(Job([13, 14], process), batch_size=1)  # at batch size 1 there is nothing left to halve
    assert res.done == 1 and "out of GPU memory at batch size 1" in res.failed[0][1]


@pytest.mark.parametrize("rank", [0, 1])
def test_every_path_puts_each_rank_on_its_own_gpu(rank: int, heads: dict[str, Path], clean: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import difffeat.backbone as backbone
    from difffeat.distributed import resolve_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == resolve_device("cuda") == torch.device(f"cuda:{rank}")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:0") == torch.device("cuda:0")

    class Reached(DiffFeatError):
        pass

    def fake_backbone(source: Any, comps: Any, index: Any, dtype: Any, device: Any, *a: Any, **k: Any) -> None:
        raise Reached(f"backbone loaded on {device}")

    monkeypatch.setattr(backbone, "DiffusionBackbone", fake_backbone)
    for cmd, task in (("segment", "seg"), ("depth", "depth"), ("edges", "edges")):  # the paths that were missed
        r = invoke(cmd, clean, "--head", heads[task], "-o", tmp_path / task, "-b", 1)  # both ranks have images
        assert f"backbone loaded on cuda:{rank}" in r.output, r.output
    r = invoke("extract", clean, "-m", "difffeat-tiny", "-o", tmp_path / "x")
    assert f"backbone loaded on cuda:{rank}" in r.output, r.output
