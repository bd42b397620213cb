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

Beside the reference (issue #16), in the same process, on the same random weights, latents,
prompts and noise: ``--reference DIR`` (a diffusion-classifier checkout, git-ignored, e.g.
``.refs/diffusion-classifier``) also runs the reference's ``eval_prob_adaptive`` as
published (fp16, batch 32, diffusers' default SDPA attention, no difffeat speed-ups: a
fresh copy of the UNet), then difffeat with the paper schedule and difffeat-fast (the
sequential schedule, ``--delta``), and reports s/image and evaluations/image for the three,
the speed ratios and the decision agreement (paper schedule vs reference; fast vs paper).

    python benchmarks/classify.py --skeleton ../shared/model-skeletons/sd21-base --compile \
        --reference .refs/diffusion-classifier --images 8
    python benchmarks/classify.py --device cpu --tiny --reference .refs/diffusion-classifier --images 2
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import types
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
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default, reduce-overhead = CUDA graphs, max-autotune)")
    ap.add_argument("--reference", default=None, help="diffusion-classifier checkout: also run its eval_prob_adaptive")
    ap.add_argument("--delta", type=float, default=0.05, help="difffeat-fast racing error rate (with --reference)")
    ap.add_argument("--check-every", type=int, default=8, help="difffeat-fast pairs per racing round")
    ap.add_argument("--ref-batch", type=int, default=32, help="the reference's --batch_size (published default 32)")
    args = ap.parse_args(argv)
    if args.reference:
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's inner progress bars

    import difffeat
    from difffeat.heads.diffusion_classifier import DiffusionClassifier, Schedule, compile_denoiser

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)  # tiny models on a shared CPU: threads spin (10-100x slower)
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
    side = beside_reference(args, bb, clf, names, res, dev) if args.reference else None
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
    if side is not None:
        result["beside_reference"] = side(args.images, args.warmup)
    print(json.dumps(result))
    return result


def reference_unet(bb, dtype: torch.dtype) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """A fresh copy of the denoiser with the same weights, as the reference builds it (no fused
    QKV, no channels-last, diffusers' default attention processors), in ``dtype``."""
    fresh = type(bb.denoiser).from_config(bb.denoiser.config)
    missing, _ = fresh.load_state_dict(bb.denoiser.state_dict(), strict=False)
    if missing:
        raise SystemExit(f"error: reference UNet copy misses weights: {missing[:3]}")
    return fresh.to(bb.device, dtype).eval().requires_grad_(False)


def beside_reference(args, bb, clf, names, res, dev):  # type: ignore[no-untyped-def]
    """Set up reference / difffeat-paper / difffeat-fast before compiling; return the timed run."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "fidelity"))
    from diffusion_classifier import load_reference, noise_in_grid_order, reference_args

    from difffeat.heads.diffusion_classifier import DiffusionClassifier

    eval_prob_adaptive = load_reference(args.reference)
    sch = clf.schedule
    ref_dtype = "float16" if dev.type == "cuda" else "float32"
    unet = reference_unet(bb, torch.float16 if ref_dtype == "float16" else torch.float32)
    embeds = clf.cond.kwargs["encoder_hidden_states"].to(unet.dtype)
    ref_args = reference_args(sch.n_samples, sch.to_keep, sch.loss, args.ref_batch, ref_dtype)
    fast = DiffusionClassifier(bb, names, template="a blurry photo of a {}.", schedule=sch, max_batch=args.max_batch,
                               static_batches=args.compile, image_size=(res, res), delta=args.delta,
                               check_every=args.check_every)
    g = torch.Generator().manual_seed(2)
    n_img = args.warmup + args.images
    images = torch.rand(n_img, 3, res, res, generator=g)
    with torch.no_grad():
        latents = torch.cat([bb.encode(images[i: i + 1])[0] for i in range(n_img)]).float()
    h = latents.shape[-1]
    noises = [torch.randn((len(clf.grid) * sch.trials, bb.in_channels, h, h), generator=g).to(dev) for _ in range(n_img)]

    def reference(i: int) -> int:
        sched = types.SimpleNamespace(alphas_cumprod=bb.alphas_cumprod.detach().float().cpu().clone())
        pred, _ = eval_prob_adaptive(unet, latents[i: i + 1].to(dev, unet.dtype), embeds, sched, ref_args, h,
                                     noises[i].clone())
        return int(pred)

    def ours(c, i: int):  # type: ignore[no-untyped-def]
        return c.classify_latent(latents[i], f"bench{i}", noise=noise_in_grid_order(noises[i], sch, len(c.grid)))

    def timed(fn, n0: int, n1: int):  # type: ignore[no-untyped-def]
        sync(dev)
        t0 = time.perf_counter()
        out = [fn(i) for i in range(n0, n1)]
        sync(dev)
        return out, (time.perf_counter() - t0) / max(1, n1 - n0)

    def run(n: int, warm: int) -> dict:
        for i in range(warm):  # compilation / CUDA graphs for every shape both schedules use
            ours(clf, i), ours(fast, i)
        ref, s_ref = timed(reference, warm, warm + n)
        paper, s_paper = timed(lambda i: ours(clf, i), warm, warm + n)
        quick, s_fast = timed(lambda i: ours(fast, i), warm, warm + n)
        ref_evals = sch.unet_evals(len(names), bb.num_train_timesteps)
        return {
            "reference": {"s_per_image": s_ref, "evals_per_image": ref_evals, "dtype": ref_dtype, "batch": args.ref_batch},
            "difffeat_paper": {"s_per_image": s_paper, "evals_per_image": sum(p.unet_evals for p in paper) / n},
            "difffeat_fast": {"s_per_image": s_fast, "evals_per_image": sum(p.unet_evals for p in quick) / n,
                              "delta": args.delta, "check_every": args.check_every},
            "speedup_paper_vs_reference": s_ref / s_paper, "speedup_fast_vs_reference": s_ref / s_fast,
            "decision_agreement_paper_vs_reference": sum(names[r] == p.top1 for r, p in zip(ref, paper)) / n,
            "decision_agreement_fast_vs_paper": sum(q.top1 == p.top1 for q, p in zip(quick, paper)) / n,
            "target_speedup_fast": 5.0,
        }

    return run


if __name__ == "__main__":
    main()
