"""Shared pieces of the reference-comparison harness (see docs/fidelity.md).

Every script compares difffeat with a reference implementation on the same tiny random-weight
model, the same images and the same noise, and prints ONE JSON line:
``{"method", "reference", "commit", "max_abs", "rel_l2", "agreement", ...}``.
Nothing is fetched at run time: ``--ref PATH`` is a checkout of the reference repository that
the user made (default ``.refs/<name>`` in the repository root, git-ignored, never committed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

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


def stub_modules(*names: str) -> None:
    """Empty stand-ins for plotting/IO imports a reference module needs only for figures."""
    for name in names:
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__getattr__ = lambda attr: None  # type: ignore[attr-defined]
            sys.modules[name] = mod


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
