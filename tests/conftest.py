"""Shared fixtures: tiny random models saved in diffusers layout, loaded offline."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# On small shared CPUs torch's default intra-op threads make tiny ops 100x slower.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFFEAT_NO_PROGRESS", "1")

import tiny_models  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread per module, restored after it (a command under test, e.g. the demo, may
    change it): tiny models are dispatch-bound, and on a busy 2-core box threads spin (10-100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_pixel(tmp_path_factory.mktemp("tiny-pixel"))


@pytest.fixture(scope="session")
def tiny_pixel_cls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build_tiny_pixel(tmp_path_factory.mktemp("tiny-pixel-cls"), num_classes=4)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir: Path):  # type: ignore[no-untyped-def]
    import difffeat

    return difffeat.load_backbone(str(tiny_sd_dir), dtype="fp32", device="cpu")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder of small, varied images (PNG/JPEG, RGBA, grayscale, 16-bit, CMYK, EXIF-rotated)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "RGBA").save(root / "c.png")
    Image.fromarray(rng.integers(0, 65535, (32, 48), dtype=np.uint16)).save(root / "d16.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).convert("CMYK").save(root / "e.jpg")
    return root
