"""Extraction throughput for the DIFT protocol (GPU benchmark, not a test).

Builds the SD-2.1 architecture with random weights from a diffusers-format config folder
(speed does not depend on weight values) and runs DIFT's protocol: 768², t=261, ``up.1``,
ensemble 8, empty prompt — one image at a time and batched. Prints one JSON line per
setting: images/s, ms/image, peak GiB and achieved TFLOP/s (torch.utils.flop_counter,
counted over one call) against the H100's ~800 dense bf16 TFLOP/s.

    python benchmarks/extract.py --skeleton ../shared/model-skeletons/sd21
    python benchmarks/extract.py --skeleton tests-tiny --device cpu --resolution 64   # smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import difffeat

PEAK_TFLOPS = 800.0  # H100 SXM dense bf16, as measured on the device (8192³ matmul)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn) -> float:  # type: ignore[no-untyped-def]
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def bench(ex, batch: int, iters: int, device: torch.device) -> dict:  # type: ignore[no-untyped-def,type-arg]
    res = ex.resolution or 64
    imgs = [torch.rand(batch, 3, res, res, device=device) for _ in range(3)]
    ex(imgs[0])  # warm-up (prompt embedding, cudnn autotune, compile)
    ex(imgs[1])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(iters):
        sync(device)
        t0 = time.perf_counter()
        ex(imgs[i % 3])
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = count_flops(lambda: ex(imgs[0]))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "batch": batch, "images_per_s": round(batch / med, 2), "ms_per_image": round(1000 * med / batch, 2),
        "peak_gib": round(peak, 2), "tflop_per_image": round(flops / batch / 1e12, 3),
        "tflops_achieved": round(flops / med / 1e12, 1), "pct_of_peak": round(100 * flops / med / 1e12 / PEAK_TFLOPS, 1),
        "median_s": round(med, 4), "iters": iters,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skeleton", default="../shared/model-skeletons/sd21")
    ap.add_argument("--resolution", type=int, default=768)
    ap.add_argument("--timestep", type=int, default=261)
    ap.add_argument("--layer", default="up.1")
    ap.add_argument("--ensemble", type=int, default=8)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--family", choices=["sd", "sdxl", "dit"], default="sd",
                    help="sdxl (1024²) / dit (DiT-XL/2, 256²): run benchmarks/extract_transformers.py (see its --help)")
    args, _ = ap.parse_known_args()
    if args.family != "sd":
        import extract_transformers

        extract_transformers.main(sys.argv[1:])
        return
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    bb = difffeat.load_backbone(args.skeleton, dtype=args.dtype, device=args.device, random_weights=True)
    for b in [int(v) for v in args.batches.split(",")]:
        ex = difffeat.create(args.skeleton, backbone=bb, layers=[args.layer], timesteps=[args.timestep],
                             ensemble=args.ensemble, prompt="", resolution=args.resolution,
                             max_batch=max(args.max_batch, args.ensemble), compile=args.compile)
        row = {"bench": "extract", "protocol": "dift", "model": args.skeleton, "resolution": args.resolution,
               "ensemble": args.ensemble, "layer": args.layer, "dtype": args.dtype, "compile": args.compile,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        row.update(bench(ex, b, args.iters, device))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
