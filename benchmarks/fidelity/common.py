"""Shared pieces of the reference-comparison harness (see docs/fidelity.md).

Every script compares difffeat with a reference implementation on the same tiny random-weight
model, the same images and the same noise, and prints ONE JSON line:
``{"method", "reference", "commit", "max_abs", "rel_l2", "agreement", ...}``.
Nothing is fetched at run time: ``--ref PATH`` is a checkout of the reference repository that
the user made (default ``.refs/<name>`` in the repository root, git-ignored, never committed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parents[2]


def parse_args(name: str, doc: str | None) -> argparse.Namespace:
    """``--ref PATH`` (the reference checkout) and ``--seed``."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    ap.add_argument("--ref", type=Path, default=ROOT / ".refs" / name, help=f"checkout of the reference (default .refs/{name})")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.ref.is_dir():
        sys.exit(f"reference checkout not found: {args.ref} (clone the repository there, or pass --ref PATH)")
    torch.set_num_threads(1)
    return args


def ref_commit(path: Path) -> str:
    """The checkout's commit: a ``COMMIT`` file (exported trees), its own git, or 'unknown'."""
    if (path / "COMMIT").exists():
        return (path / "COMMIT").read_text().strip()
    if not (path / ".git").exists():
        return "unknown"
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


class _Anything:
    """Any attribute or call of a stubbed module (used only in figure code and annotations)."""

    def __getattr__(self, attr: str) -> "_Anything":
        return self

    def __call__(self, *a: Any, **k: Any) -> "_Anything":
        return self


@contextlib.contextmanager
def stub_modules(*names: str) -> Iterator[None]:
    """Stand-ins for plotting/IO imports a reference module needs only for figures, present
    while the reference is imported (diffusers must never see them: it probes matplotlib)."""
    added = [n for n in names if n not in sys.modules]
    for name in added:
        mod = types.ModuleType(name)
        mod.__getattr__ = lambda attr: _Anything()  # type: ignore[attr-defined]
        sys.modules[name] = mod
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def tiny_sd(tmp: Path | None = None) -> Any:
    """The test suite's tiny random-weight SD (tests/tiny_models.py), loaded through difffeat."""
    import difffeat

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tiny_sd

    root = Path(tmp or tempfile.mkdtemp(prefix="fidelity-"))
    path = build_tiny_sd(root / "sd")
    return difffeat.load_backbone(str(path), dtype="fp32", device="cpu")


def images(n: int, size: int = 64, seed: int = 0, second: bool = False) -> torch.Tensor:
    """``n`` procedural scenes [n, 3, size, size] in [0, 1] (difffeat.data.shapes, test split)."""
    from difffeat.data.shapes import render

    return render(n, seed=seed, split="test", size=size, pair=second).images01(second=second)


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max absolute difference and relative L2 ``|a - b| / |b|``."""
    a, b = a.double(), b.double()
    return {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30))}


def emit(method: str, reference: str, ref: Path, **fields: Any) -> None:
    """Print the one JSON line of a method."""
    print(json.dumps({"method": method, "reference": reference, "commit": ref_commit(ref), **fields}))


SD_LAYERS = ["up.0.res.1", "up.1.attn.1", "up.2.attn.1"]  # ODISE's s5, s4, s3 (decoder_only)


def sd_dino_pair_features(bb: Any, t: int, sd_side: int = 256, dino_side: int = 224, seed: int = 0):  # type: ignore[no-untyped-def]
    """A pair's SD maps (s5, s4, s3 at sd_side / 64, 32, 16) and tiny random DINOv2 maps
    (dino_side / 14 cells), through difffeat: the inputs both harnesses hand to the reference
    functions and to difffeat's fusion. Returns ([s5, s4, s3] each [2, C, h, w], dino [2, C, g, g])."""
    import difffeat
    from difffeat.dino import DinoExtractor

    x1, x2 = images(1, sd_side, seed), images(1, sd_side, seed, second=True)
    x = torch.cat([x1, x2])
    ex = difffeat.create(bb.source, backbone=bb, layers=SD_LAYERS, timesteps=[t], noise="fixed", seed=seed)
    sd = ex(x)
    torch.manual_seed(seed)
    dino = DinoExtractor("dinov2-s", layers=["block.1"], random_weights=True, device="cpu", dtype="fp32", depth=2)
    small = torch.nn.functional.interpolate(x, size=(dino_side, dino_side), mode="bicubic", align_corners=False).clamp(0, 1)
    return [sd[k] for k in SD_LAYERS], dino(small)["block.1"]


def keypoints(n: int, side: int, seed: int = 0) -> torch.Tensor:
    """``n`` integer (x, y) source keypoints in a ``side`` x ``side`` frame."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, side, (n, 2), generator=g).float()


def correspondence_utils(path: Path) -> Any:
    """The release's ``utils/utils_correspondence.py`` (SD-DINO or GeoAware-SC), imported with
    its figure-only imports stubbed (fresh each time: both releases name the package ``utils``)."""
    for name in [n for n in sys.modules if n == "utils" or n.startswith("utils.")]:
        del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        with stub_modules("matplotlib", "matplotlib.pyplot", "matplotlib.colors", "matplotlib.patches", "cv2"):
            from utils import utils_correspondence
    finally:
        sys.path.remove(str(path))
    return utils_correspondence


def pair_setup(t: int, seed: int) -> tuple[Any, Any]:
    """The tiny SD's pair features (see :func:`sd_dino_pair_features`) without gradients."""
    bb = tiny_sd()
    with torch.no_grad():
        return sd_dino_pair_features(bb, t=t, seed=seed)
