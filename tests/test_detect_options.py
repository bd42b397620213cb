"""The detect commands on the options schema: another method's flags are refused, and whole
images of several sizes are batched per size in one place (difffeat.tasks.detect.detect_batch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from difffeat.errors import BadInputError
from difffeat.io import FolderRun


def _run(args: list[str]):  # type: ignore[no-untyped-def]
    from difffeat.cli import register_commands

    return CliRunner().invoke(register_commands(), args, catch_exceptions=False)


class _SizeDetector:
    """Scores an image by its mean and counts forwards and their batch shapes."""

    size, resize = 0, "none"

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def prepare(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append(tuple(x.shape))
        return {"score": x.mean(dim=(1, 2, 3)), "width": torch.full((len(x),), float(x.shape[-1]))}


def test_detect_batch_runs_one_forward_per_size_and_keeps_the_order() -> None:
    from difffeat.tasks.detect import detect_batch

    xs = [torch.rand(3, 8, w, generator=torch.Generator().manual_seed(i)) for i, w in enumerate((16, 8, 16, 24, 8))]
    det = _SizeDetector()
    out = detect_batch(det, xs)  # type: ignore[arg-type]
    assert sorted(det.calls) == [(1, 3, 8, 24), (2, 3, 8, 8), (2, 3, 8, 16)]
    torch.testing.assert_close(out["score"], torch.stack([x.mean() for x in xs]))
    assert out["width"].tolist() == [16, 8, 16, 24, 8]


def test_score_paths_batches_mixed_sizes_through_detect_batch(tmp_path: Path) -> None:
    from difffeat.tasks.detect import score_paths

    rng = np.random.default_rng(0)
    paths = []
    for i, w in enumerate((16, 24, 16, 24, 16)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (8, w, 3), dtype=np.uint8)).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    det, run = _SizeDetector(), FolderRun(echo=lambda m: None)
    names, out = score_paths(det, [*paths[:2], tmp_path / "bad.png", *paths[2:]], 4, run)  # type: ignore[arg-type]
    assert names == paths and run.done == 5 and len(run.failed) == 1
    assert out["width"].tolist() == [16, 24, 16, 24, 16]
    assert len(det.calls) == 3  # batch 1: two sizes; batch 2: one
    want = [float(det.prepare(Image.open(p).convert("RGB")).mean()) for p in paths]
    np.testing.assert_allclose(out["score"].numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["detect", "IMG", "--training-free", "--preset", "aeroblade", "--steps", "3"], "--steps does not apply to AEROBLADE"),
    (["detect", "IMG", "--training-free", "-m", "sd15"], "-m/--model does not apply to AEROBLADE"),
    (["detect", "IMG", "--training-free", "--compile"], "--compile does not apply to AEROBLADE"),
    (["detect", "IMG", "--training-free", "--preset", "dire-sd", "--autoencoder", "sd15"],
     "--autoencoder does not apply to DIRE"),
    (["eval", "detect", "R", "F", "--training-free", "--score", "aeroblade", "--preset", "dire-sd", "-m", "sd15"],
     "-m/--model does not apply to AEROBLADE"),
    (["train", "dire", "R", "F", "--head", "pooled", "--steps", "3", "--crop", "8"],
     "--crop, --steps do not apply to --head pooled"),
    (["train", "dire", "R", "F", "--head", "classifier", "--score", "dire-latent"],
     "--score does not apply to --head classifier"),
    (["train", "dire", "R", "F", "--head", "training-free", "--preset", "aeroblade", "--arch", "resnet18", "--epochs", "2"],
     "--arch, --epochs do not apply to AEROBLADE"),
    (["eval", "detect", "R", "F", "--training-free", "--size", "16"], "add --normalize-format"),
])
def test_flags_of_another_method_are_refused_before_loading(args: list[str], message: str, tmp_path: Path) -> None:
    r = _run([*args, "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and message in r.output, r.output


def test_check_flags_allows_what_the_mode_reads() -> None:
    from difffeat.options import ExtractorOptions
    from difffeat.tasks.detect import DetectOptions, TrainDireOptions, check_flags

    check_flags("dire", DetectOptions(steps=3, score="dire-latent"), ExtractorOptions(model="sd15", compile=True))
    check_flags("aeroblade", DetectOptions(autoencoders=("sd15",)), ExtractorOptions(resolution=64))
    check_flags("classifier", TrainDireOptions(arch="resnet18", crop=8, epochs=2), DetectOptions(steps=2))
    with pytest.raises(BadInputError, match="--lr does not apply to AEROBLADE"):
        check_flags("aeroblade", TrainDireOptions(head="training-free", lr=0.1))
