"""Throughput of the DIFT correspondence protocol, and dense matching speed.

Builds the SD-2.1 architecture from a diffusers config folder with random weights (speed
does not depend on weight values), extracts ``up.1`` features at 768x768, t=261 with an
ensemble of 8 (the ``dift`` preset) for distinct images, and matches 20 keypoints per pair
at the original image resolution (DIFT's upsampled cosine argmax). Separately times dense
matching of two 96x96 feature maps (every target cell against every source cell).

    python benchmarks/correspond.py --skeleton ../shared/model-skeletons/sd21

Prints one JSON line. Targets from the issue: >= 10 pairs/s and <= 5 ms per dense 96x96
match on an H100.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from difffeat.backbone import load_backbone
from difffeat.extractor import FeatureExtractor
from difffeat.heads import matching as M


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skeleton", default="../shared/model-skeletons/sd21", help="diffusers folder (configs suffice)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--resolution", type=int, default=768)
    ap.add_argument("--ensemble", type=int, default=8)
    ap.add_argument("--timestep", type=int, default=261)
    ap.add_argument("--layer", default="up.1")
    ap.add_argument("--pairs-per-call", type=int, default=4, help="pairs whose 2 images are extracted in one call")
    ap.add_argument("--max-batch", type=int, default=64, help="denoiser rows per call (images x ensemble)")
    ap.add_argument("--points", type=int, default=20, help="keypoints matched per pair")
    ap.add_argument("--image-size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"),
                    help="original image size the matches are upsampled to (SPair-like)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dense-size", type=int, default=96)
    ap.add_argument("--dense-channels", type=int, default=1280)
    ap.add_argument("--matmul-precision", default="high", choices=["highest", "high", "medium"],
                    help="torch.set_float32_matmul_precision for the fp32 similarity matmuls (high = TF32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the denoiser blocks")
    args = ap.parse_args()
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)

    bb = load_backbone(args.skeleton, dtype=args.dtype, device=args.device, random_weights=True)
    ex = FeatureExtractor(bb, layers=[args.layer], timesteps=[args.timestep], ensemble=args.ensemble,
                          resolution=args.resolution, resize="resize", max_batch=args.max_batch, compile=args.compile)
    n_img = 2 * args.pairs_per_call
    prompts = ["a photo of a cat"] * n_img
    gen = torch.Generator(device="cpu").manual_seed(0)
    counter = {"i": 0}

    def extract() -> dict[str, torch.Tensor]:
        # Fresh images every call: per-image noise keys and hashing are part of the cost.
        counter["i"] += 1
        x = torch.rand(n_img, 3, args.resolution, args.resolution, generator=gen).to(device)
        return ex(x, prompts=prompts)

    feats = extract()[args.layer]
    h, w = args.image_size
    pts = torch.rand(args.points, 2, generator=gen) * torch.tensor([w - 1, h - 1])
    pts = pts.to(device)

    def match_all() -> None:
        for p in range(args.pairs_per_call):
            M.match_points(feats[2 * p], feats[2 * p + 1], pts, src_size=(h, w), tgt_size=(h, w))

    t_extract = _timed(extract, device, args.repeats)
    t_match = _timed(match_all, device, args.repeats)
    per_call = sorted(t_extract)[len(t_extract) // 2] + sorted(t_match)[len(t_match) // 2]
    pairs_per_s = args.pairs_per_call / per_call

    c, s = args.dense_channels, args.dense_size
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    a = torch.randn(c, s, s, device=device, dtype=dtype)
    b = torch.randn(c, s, s, device=device, dtype=dtype)
    t_dense = _timed(lambda: M.dense_flow(a, b, src_size=(s, s), tgt_size=(s, s), backend="torch"), device, 20)
    dense_ms = 1000 * sorted(t_dense)[len(t_dense) // 2]

    print(json.dumps({
        "benchmark": "correspond", "protocol": "dift", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "resolution": args.resolution, "layer": args.layer, "timestep": args.timestep,
        "ensemble": args.ensemble, "pairs_per_call": args.pairs_per_call, "max_batch": args.max_batch,
        "feature_shape": list(feats.shape[1:]), "points_per_pair": args.points, "image_size": [h, w],
        "extract_ms_per_call": round(1000 * sorted(t_extract)[len(t_extract) // 2], 2),
        "match_ms_per_pair": round(1000 * sorted(t_match)[len(t_match) // 2] / args.pairs_per_call, 3),
        "pairs_per_s": round(pairs_per_s, 3),
        "dense_size": s, "dense_channels": c, "dense_ms": round(dense_ms, 3),
        "matmul_precision": args.matmul_precision, "compile": args.compile,
        "targets": {"pairs_per_s": 10, "dense_ms": 5},
    }))


if __name__ == "__main__":
    main()
