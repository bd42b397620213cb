"""Peak memory of the guarded loader on a huge valid image (CPU; no GPU needed).

    python benchmarks/huge_image_rss.py [--width 20000 --height 8000] [--keep DIR]

Writes a W x H RGB JPEG and PNG (smooth content, so the files stay small), then loads each
in a fresh process, as a folder run would for a 512-px model (``max_side = 4 x 512``), and
once at full size, and prints each child's peak RSS (``ru_maxrss``) next to the size of one
decoded full-size RGB copy. The reduced JPEG is decoded at 1/8 scale in the DCT
(``Image.draft``); the PNG must be decoded whole once, then reduced before any conversion.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from difffeat.io import load_image, original_size
path, side = sys.argv[1], (int(sys.argv[2]) or None)
t = time.perf_counter()
im = load_image(path, max_side=side)
dt = time.perf_counter() - t
print(json.dumps({"size": im.size, "original": original_size(im), "seconds": round(dt, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""

BASELINE = r"""
import json, resource
import difffeat.io, PIL.Image
print(json.dumps({"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def make(folder: Path, w: int, h: int) -> list[Path]:
    from PIL import Image

    small = Image.linear_gradient("L").resize((w // 8, h // 8)).convert("RGB")
    img = small.resize((w, h), Image.BILINEAR)
    paths = [folder / "huge.jpg", folder / "huge.png"]
    img.save(paths[0], quality=90)
    img.save(paths[1], compress_level=1)
    return paths


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=20000)
    ap.add_argument("--height", type=int, default=8000)
    ap.add_argument("--side", type=int, default=4 * 512, help="max_side of the reduced loads (4 x the working size)")
    ap.add_argument("--keep", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = make(folder, a.width, a.height)
        base = child(BASELINE)["peak_rss_mib"]
        full_copy = a.width * a.height * 3 / 2**20
        print(f"image {a.width}x{a.height}: one RGB copy = {full_copy:.0f} MiB; interpreter+imports = {base} MiB")
        for p in paths:
            for side in (a.side, 0):
                r = child(CHILD, str(p), str(side))
                print(f"{p.name:9s} max_side={side or 'none':>5}: -> {tuple(r['size'])}, peak RSS {r['peak_rss_mib']} MiB "
                      f"(+{r['peak_rss_mib'] - base:.0f} over imports), {r['seconds']} s")


if __name__ == "__main__":
    main()
