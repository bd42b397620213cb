"""Correspondence on the public extractor protocol (#14): a fusion is fused per pair only when its
features depend on the call (``per_image`` False, co-PCA), its frame is its ``geometry``, and the
commands offer exactly the flags their mode uses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

from difffeat.cli import cli, load_task_commands
from difffeat.errors import BadInputError
from difffeat.fusion import FusedExtractor
from difffeat.geometry import Geometry
from difffeat.tasks import correspond as C


class Source(nn.Module):
    """A model-free fusion source: fixed random projections of 4x4-pooled pixels, padded to a square."""

    def __init__(self, key: str, resolution: int, channels: int, seed: int) -> None:
        super().__init__()
        self.keys, self.geometry = [key], Geometry(resolution, "pad", 1)
        self.proj = torch.randn(channels, 3, generator=torch.Generator().manual_seed(seed))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, images, **_):  # type: ignore[no-untyped-def]
        x = images if isinstance(images, torch.Tensor) else self.geometry.prepare(images)
        pooled = F.avg_pool2d(x.float(), 4)
        return {self.keys[0]: torch.einsum("oc,bchw->bohw", self.proj, pooled)}


def _fused(pca_mode: str) -> FusedExtractor:
    return FusedExtractor([Source("a", 32, 6, 0), Source("b", 24, 5, 1)], [0.5, 0.5], [3, None], grid=6,
                          pca_mode=pca_mode)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 32), (32, 32), (32, 16))]


def test_per_image_fusion_is_called_per_image_and_its_frame_is_its_geometry() -> None:
    fx = _fused("none")
    assert fx.per_image
    a, b, _ = _images()
    pipe = C.CorrespondPipeline(fx)
    fa, fb = pipe.image_features(a), pipe.image_features(b)
    assert torch.equal(fa.raw, fx([a])["fused"][0].float())  # the extractor's own output: no pair fusion
    sd, td = pipe.descriptors(fa, fb)
    assert sd is fa.raw and td is fb.raw
    # the frame is the fused geometry's canvas (the largest source resolution, letterboxed)
    assert fa.frame.size == (32, 32) and fa.frame.box == (0, 6, 32, 26)


def test_co_pca_fusion_is_fused_per_pair() -> None:
    fx = _fused("co")
    assert not fx.per_image
    a, b, c = _images()
    pipe = C.CorrespondPipeline(fx)
    fa, fb, fc = (pipe.image_features(im) for im in (a, b, c))
    assert isinstance(fa.raw, list)  # per-source layer maps, cached per image
    sd, td = pipe.descriptors(fa, fb)
    sd2, _ = pipe.descriptors(fa, fc)
    assert sd.shape == (3 + 5, 6, 6) and td.shape == sd.shape
    assert not torch.allclose(sd[:3], sd2[:3])  # the PCA is fitted on the pair: another partner, another basis
    want = fx.fuse_maps([[torch.cat([x, y]) for x, y in zip(sa, sb)] for sa, sb in zip(fa.raw, fb.raw)])
    assert torch.equal(sd, want[0]) and torch.equal(td, want[1])


def test_a_call_dependent_extractor_without_pair_fusion_fails_in_one_line() -> None:
    class Batchwise(nn.Module):
        keys = ["x"]
        per_image = False

        def forward(self, images, **_):  # type: ignore[no-untyped-def]
            return {"x": torch.zeros(len(images), 2, 4, 4)}

    with pytest.raises(BadInputError, match="per_image is False"):
        C.CorrespondPipeline(Batchwise()).image_features(Image.new("RGB", (8, 8)))


def test_the_flip_test_is_offered_where_it_runs() -> None:
    load_task_commands()
    match = CliRunner().invoke(cli, ["correspond", "--help"]).output
    scored = CliRunner().invoke(cli, ["eval", "correspond", "--help"]).output
    assert "--flip-test" not in match and "--flip-test / --no-flip-test" in scored
    for text in (match, scored):  # pairs run one at a time: no batch size; the shared flags otherwise
        assert "--batch-size" not in text and "--overwrite" in text and "--max-batch" in text and "-m, --model" in text
    r = CliRunner().invoke(cli, ["correspond", "a.png", "b.png", "--points", "1,1", "--flip-test", "-o", "x"])
    assert r.exit_code == 2 and "No such option '--flip-test'" in r.output
