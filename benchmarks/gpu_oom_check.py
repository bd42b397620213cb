"""A real CUDA out-of-memory inside a folder run (GPU check, not a benchmark).

Each item of a batch allocates ``--gib`` GiB on the GPU, so a batch of 8 does not fit on one
H200 (~139 GiB) while a batch of 4 does: the runner must print its one-line note, retry the
batch at half size, go on at that size, and finish every item.

    python benchmarks/gpu_oom_check.py --gib 30
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from difffeat.runner import Job, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=30.0)
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp())
    sizes: list[int] = []

    def process(batch: list[int]) -> None:
        sizes.append(len(batch))
        x = torch.empty(int(a.gib * 2**30 * len(batch)), dtype=torch.uint8, device="cuda")
        del x
        for i in batch:
            (out / f"{i}.txt").write_text("ok")

    res = run(Job(list(range(a.items)), process, done=lambda i: (out / f"{i}.txt").exists()), out=out,
              batch_size=a.batch)
    print(json.dumps({"bench": "gpu_oom_check", "gib_per_item": a.gib, "calls": sizes, "failed": len(res.failed),
                      "written": len(list(out.glob("*.txt"))), "items": a.items}))


if __name__ == "__main__":
    main()
