"""Benchmark: zero-shot Diffusion Classifier throughput (issue #8).

Runs :class:`difffeat.heads.diffusion_classifier.DiffusionClassifier` with the SD-2.1-base
architecture (random weights: speed does not depend on weight values) at 512², 10 classes
and the paper's CIFAR-10 adaptive schedule (to_keep 5,1 / n_samples 50,500 / l1: 2,750
denoiser evaluations per image), and reports seconds per image and denoiser evaluations
per second *inside the classification loop*, next to the standalone denoiser at the same
batch size (the physical bound). Prints one JSON line.

    python benchmarks/classify.py --skeleton ../shared/model-skeletons/sd21-base --compile
    python benchmarks/classify.py --device cpu --tiny          # CPU smoke test (tiny model)

Target (issue #8): >= 420 evaluations/s on one H100 (>= 80 % of the compiled standalone UNet
at batch 64, measured at about 517/s), i.e. <= 6.5 s per image.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skeleton", default="../shared/model-skeletons/sd21-base", help="diffusers folder (configs only is fine)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny test SD model instead (CPU smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="bf16 (default on CUDA), fp16, fp32 (default on CPU)")
    ap.add_argument("--resolution", type=int, default=None, help="default 512 (64 with --tiny)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--n-samples", default=None, help="default 50,500 (2,8 with --tiny)")
    ap.add_argument("--to-keep", default="5,1")
    ap.add_argument("--loss", default="l1")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=3, help="timed images")
    ap.add_argument("--warmup", type=int, default=1, help="untimed images first (compilation)")
    ap.add_argument("--standalone-iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile the whole denoiser (static batch shapes)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default, max-autotune, ...)")
    args = ap.parse_args(argv)

    import difffeat
    from difffeat.heads.diffusion_classifier import DiffusionClassifier, Schedule, compile_denoiser

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import tiny_models

        source = str(tiny_models.build_tiny_sd(Path(tempfile.mkdtemp(prefix="difffeat-bench-")) / "tiny-sd"))
        bb = difffeat.load_backbone(source, dtype=args.dtype or ("bf16" if dev.type == "cuda" else "fp32"), device=dev)
    else:
        source = args.skeleton
        bb = difffeat.load_backbone(source, random_weights=True, dtype=args.dtype or "bf16", device=dev)
    res = args.resolution or (64 if args.tiny else 512)
    n_samples = tuple(int(v) for v in (args.n_samples or ("2,8" if args.tiny else "50,500")).split(","))
    schedule = Schedule(n_samples, tuple(int(v) for v in args.to_keep.split(",")), args.loss)
    names = (CIFAR10 + [f"class {i}" for i in range(10, args.classes)])[: args.classes]
    clf = DiffusionClassifier(bb, names, template="a blurry photo of a {}.", schedule=schedule,
                              max_batch=args.max_batch, static_batches=args.compile, image_size=(res, res))
    if args.compile:
        compile_denoiser(bb, args.compile_mode)

    # standalone denoiser at the loop's batch size (same module, same conditioning shapes)
    B, h = args.max_batch, res // bb.latent_scale
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, bb.in_channels, h, h, generator=g, device=dev).to(bb.dtype)
    t = torch.randint(0, bb.num_train_timesteps, (B,), generator=g, device=dev)
    cond = clf.cond.select(torch.arange(B, device=dev) % len(names))
    with torch.no_grad():
        for _ in range(3):
            bb.predict(x, t, cond)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.standalone_iters):
            bb.predict(x, t, cond)
        sync(dev)
    standalone = B * args.standalone_iters / (time.perf_counter() - t0)

    # the classification loop (VAE encode + all stages), one image at a time
    images = torch.rand(args.warmup + args.images, 3, res, res, generator=torch.Generator().manual_seed(1))
    for i in range(args.warmup):
        clf(images[i : i + 1])
    sync(dev)
    evals, t0 = 0, time.perf_counter()
    for i in range(args.warmup, args.warmup + args.images):
        evals += clf(images[i : i + 1])[0].unet_evals
    sync(dev)
    elapsed = time.perf_counter() - t0
    padded = sum(math.ceil(st["evals"] / B) * B - st["evals"] for st in schedule.plan(len(names), bb.num_train_timesteps)) if args.compile else 0
    result = {
        "bench": "classify", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "model": "tiny-sd" if args.tiny else source, "dtype": str(bb.dtype).replace("torch.", ""), "resolution": res,
        "classes": len(names), "schedule": schedule.as_dict(), "unet_evals_per_image": evals // max(1, args.images),
        "images": args.images, "s_per_image": elapsed / max(1, args.images), "evals_per_s": evals / elapsed,
        "standalone_batch": B, "standalone_evals_per_s": standalone, "ratio_to_standalone": evals / elapsed / standalone,
        "compile": bool(args.compile), "compile_mode": args.compile_mode, "padded_rows_per_image": padded,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "target_evals_per_s": 420,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
