"""Image I/O, feature files, and `difffeat extract` / `models` / `layers` end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from difffeat.errors import BadInputError
from difffeat.io import atomic_path, list_images, load_features, load_image, prepare_image, save_features


def run_cli(*args: str):  # type: ignore[no-untyped-def]
    from difffeat.cli import cli, load_task_commands

    load_task_commands()
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_image_modes_are_converted_to_rgb(image_folder: Path) -> None:
    files = list_images(image_folder)
    assert [p.relative_to(image_folder).as_posix() for p in files] == ["a.png", "c.png", "d16.png", "e.jpg", "sub/b.jpg"]
    for p in files:
        im = load_image(p)
        assert im.mode == "RGB"
    rgba = load_image(image_folder / "c.png")
    src = np.asarray(Image.open(image_folder / "c.png")).astype(float)
    a = src[..., 3:4] / 255
    expect = src[..., :3] * a + 255 * (1 - a)  # composited on white
    assert np.abs(np.asarray(rgba).astype(float) - expect).max() <= 1.0
    g16 = np.asarray(load_image(image_folder / "d16.png"))
    raw = np.asarray(Image.open(image_folder / "d16.png")).astype(float)
    assert np.abs(g16[..., 0] - raw / 65535 * 255).max() <= 1.0  # full 16-bit range kept


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_corrupt_image_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BadInputError, match="cannot read image") as e:
        load_image(tmp_path / "bad.png")
    assert "\n" not in str(e.value)


def test_resize_policies() -> None:
    img = Image.new("RGB", (100, 50))
    assert prepare_image(img, 64, "resize").image.shape == (3, 64, 64)
    p = prepare_image(img, 64, "pad")
    assert p.image.shape == (3, 64, 64) and p.content_box == (0, 16, 64, 48)
    assert prepare_image(img, None, "snap", 8).image.shape == (3, 48, 96)
    with pytest.raises(BadInputError):
        prepare_image(img, None, "none", 64)


def test_metadata_round_trip_and_atomic_write(tmp_path: Path) -> None:
    t = {"up.1": torch.randn(4, 3, 3)}
    meta = {"model": "sd21", "timesteps": [261], "ensemble": 8, "original_size": [640, 480]}
    save_features(tmp_path / "x.safetensors", t, meta)
    back, m = load_features(tmp_path / "x.safetensors")
    assert torch.equal(back["up.1"], t["up.1"]) and m == meta
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "y.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == [tmp_path / "x.safetensors"]  # nothing half-written left


def test_cli_extract_folder_with_corrupt_file_and_resume(tiny_sd_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "zz_corrupt.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "feats"
    args = ["extract", str(image_folder), "-m", str(tiny_sd_dir), "-l", "up.1", "-l", "mid", "-t", "261", "-e", "2",
            "-o", str(out), "--device", "cpu", "--viz", "up.1"]
    r = run_cli(*args)
    assert r.exit_code != 0
    assert "zz_corrupt.jpg" in r.output and "1 of 6 images failed" in r.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert written == ["a.safetensors", "c.safetensors", "d16.safetensors", "e.safetensors", "sub/b.safetensors"]
    assert (out / "a.png").exists()
    feats, meta = load_features(out / "a.safetensors")
    assert feats["up.1"].shape == (32, 4, 4) and feats["up.1"].dtype == torch.float16
    assert meta["timesteps"] == [261] and meta["ensemble"] == 2 and meta["original_size"] == [56, 40]
    assert meta["layers"] == ["up.1", "mid"] and "difffeat_version" in meta and meta["seed"] == 0
    # resume: nothing is recomputed, nothing overwritten
    (image_folder / "zz_corrupt.jpg").unlink()
    before = (out / "a.safetensors").stat().st_mtime_ns
    r2 = run_cli(*args)
    assert r2.exit_code == 0, r2.output
    assert "5 of 5 images already done" in r2.output
    assert (out / "a.safetensors").stat().st_mtime_ns == before
    r3 = run_cli(*args, "--overwrite")
    assert r3.exit_code == 0 and (out / "a.safetensors").stat().st_mtime_ns != before


def test_cli_errors_and_listing(tiny_sd_dir: Path, image_folder: Path, tmp_path: Path) -> None:
    r = run_cli("extract", str(image_folder), "-m", "sd99", "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and r.output.startswith("error: unknown model 'sd99'") and r.output.count("\n") == 1
    r = run_cli("extract", str(image_folder), "-m", str(tiny_sd_dir), "-l", "up.7", "-o", str(tmp_path / "o"), "--device", "cpu")
    assert r.exit_code == 2 and "unknown layer 'up.7'" in r.output
    r = run_cli("extract", str(image_folder), "-m", str(tiny_sd_dir), "-t", "1000", "-o", str(tmp_path / "o"), "--device", "cpu")
    assert r.exit_code == 2 and "t must be in [0, 1000)" in r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.safetensors"))
    r = run_cli("models")
    assert r.exit_code == 0 and "sd21" in r.output and "stabilityai/stable-diffusion-2-1" in r.output and "sd-dino" in r.output
    assert "dire-adm256      task=detect" in r.output and "train/seg.yaml" in r.output  # task configs are listed too
    r = run_cli("layers", str(tiny_sd_dir))
    assert r.exit_code == 0
    rows = {line.split()[0]: line.split()[1:] for line in r.output.splitlines()[1:]}
    assert rows["up.1"] == ["32", "16"] and rows["down.0"] == ["16", "16"] and "up.1.res.0" in rows


def test_cli_extract_data_parallel_ranks_split_work_and_match_one_process(
        tiny_sd_dir: Path, image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two torchrun ranks (simulated by RANK/WORLD_SIZE) each write their own share; together
    they produce exactly the one-process files, byte for byte, in both output modes."""
    import hashlib

    def digests(folder: Path, pattern: str) -> dict[str, str]:
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob(pattern))}

    base = ["extract", str(image_folder), "-m", str(tiny_sd_dir), "-l", "up.1", "-t", "261", "-e", "2",
            "-b", "2", "--device", "cpu"]
    assert run_cli(*base, "-o", str(tmp_path / "one")).exit_code == 0
    single = digests(tmp_path / "one", "*.safetensors")
    assert len(single) == 5
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        r = run_cli(*base, "-o", str(tmp_path / f"rank{rank}"))
        assert r.exit_code == 0, r.output
        shares.append(digests(tmp_path / f"rank{rank}", "*.safetensors"))
    assert not set(shares[0]) & set(shares[1]), "an image was processed by both ranks"
    assert {**shares[0], **shares[1]} == single
    # sharded mode: ranks write into one folder; the last rank to finish merges the index
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        r = run_cli(*base, "-o", str(tmp_path / "sh2"), "--shard-size", "2")
        assert r.exit_code == 0, r.output
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert run_cli(*base, "-o", str(tmp_path / "sh1"), "--shard-size", "2").exit_code == 0
    assert digests(tmp_path / "sh2", "shard-*.safetensors") == digests(tmp_path / "sh1", "shard-*.safetensors")
    assert (tmp_path / "sh2" / "index.jsonl").read_bytes() == (tmp_path / "sh1" / "index.jsonl").read_bytes()
    bad = run_cli(*base, "-o", str(tmp_path / "x"), "--shard-size", "2", "--viz", "up.1")
    assert bad.exit_code != 0 and "--viz" in bad.output
