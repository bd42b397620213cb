"""Denoiser-forward and extraction throughput for SDXL (1024²) and DiT-XL/2 (256²) — GPU benchmark.

Both architectures are built with random weights (speed does not depend on weight values):

* ``sdxl``: the SDXL-base 1.0 configs in ``../shared/model-skeletons/sdxl-base``.
* ``dit``: DiT-XL/2 from its published config values (Peebles & Xie 2023; facebook/DiT-XL-2-256):
  28 blocks, hidden 1152, 16 heads x 72, patch 2, 4 latent channels, learned sigma (8 out),
  1000 classes; the sd-vae-ft-EMA autoencoder; DDPM linear betas.

Per batch size it prints one JSON line for the **denoiser forward** alone (the full model at
``--resolution``, dummy conditioning: what the >= 40 %-of-peak target is about) and one for
the **extraction** (``FeatureExtractor`` call incl. VAE encode, hooks and early exit, using
``benchmarks/extract.py``'s measurement). Fields: images/s, ms/image, peak GiB, TFLOP per
image and achieved TFLOP/s (``torch.utils.flop_counter``) and % of the H100's dense bf16 peak.

    python benchmarks/extract_transformers.py --family dit  --batches 16,64,128 --compile
    python benchmarks/extract_transformers.py --family sdxl --batches 16 --compile
    python benchmarks/extract_transformers.py --family dit --tiny --device cpu --dtype fp32   # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import difffeat  # noqa: E402
from extract import PEAK_TFLOPS, bench, count_flops, sync  # noqa: E402

SDXL_SKELETON = Path(__file__).resolve().parent.parent.parent / "shared" / "model-skeletons" / "sdxl-base"
if not SDXL_SKELETON.exists():  # on the GPU machine the skeletons travel as .skel/ inside the checkout
    SDXL_SKELETON = Path(__file__).resolve().parent.parent / ".skel" / "sdxl-base"

# DiT-XL/2 (facebook/DiT-XL-2-256 transformer/config.json); sample_size = resolution / 8
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", activation_fn="gelu-approximate",
                attention_bias=True, norm_elementwise_affine=False, norm_num_groups=32)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              in_channels=3, out_channels=3, act_fn="silu", scaling_factor=0.18215)
TINY_DIT = dict(DIT_XL_2, num_attention_heads=2, attention_head_dim=8, num_layers=2, norm_num_groups=8)
TINY_VAE = dict(SD_VAE, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=8)


def _write(path: Path, cfg: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))


def dit_skeleton(root: Path, resolution: int = 256, tiny: bool = False) -> Path:
    """A diffusers-format DiT folder with configs only (load with ``random_weights=True``)."""
    _write(root / "model_index.json", {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
                                       "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]})
    _write(root / "transformer" / "config.json",
           {"_class_name": "DiTTransformer2DModel", **(TINY_DIT if tiny else DIT_XL_2), "sample_size": resolution // 8})
    _write(root / "vae" / "config.json", {"_class_name": "AutoencoderKL", **(TINY_VAE if tiny else SD_VAE), "sample_size": resolution})
    _write(root / "scheduler" / "scheduler_config.json",
           {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
            "num_train_timesteps": 1000, "clip_sample": False})
    return root


def sdxl_skeleton(root: Path, tiny: bool = False) -> Path:
    """The SDXL-base skeleton, or (``tiny``) the test suite's tiny SDXL for CPU smoke runs."""
    if not tiny:
        if not SDXL_SKELETON.is_dir():
            raise SystemExit(f"SDXL skeleton not found at {SDXL_SKELETON}")
        return SDXL_SKELETON
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import tiny_models

    return tiny_models.build_tiny_sdxl(root / "tiny-sdxl")


@torch.inference_mode()
def bench_denoiser(bb: difffeat.backbone.DiffusionBackbone, batch: int, resolution: int, iters: int,
                   t: int) -> dict[str, Any]:
    """Time the full denoiser forward on random latents (dummy conditioning, class = null for DiT)."""
    dev = bb.device
    side = resolution // bb.latent_scale
    x = torch.randn(batch, bb.in_channels, side, side, device=dev, dtype=bb.dtype)
    ts = torch.full((batch,), t, device=dev)
    cond = bb.dummy_conditioning(batch, (resolution, resolution))
    for _ in range(3):  # warm-up: cudnn autotune, compile
        bb.predict(x, ts, cond)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        bb.predict(x, ts, cond)
        sync(dev)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = count_flops(lambda: bb.predict(x, ts, cond))
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return {
        "batch": batch, "images_per_s": round(batch / med, 2), "ms_per_image": round(1000 * med / batch, 3),
        "peak_gib": round(peak, 2), "tflop_per_image": round(flops / batch / 1e12, 4),
        "tflops_achieved": round(flops / med / 1e12, 1), "pct_of_peak": round(100 * flops / med / 1e12 / PEAK_TFLOPS, 1),
        "median_s": round(med, 4), "iters": iters,
    }


def compile_blocks(bb: difffeat.backbone.DiffusionBackbone) -> None:
    """torch.compile the denoiser's blocks (the same set FeatureExtractor.compile_denoiser compiles)."""
    difffeat.create(bb.source, backbone=bb, layers=["final" if bb.family == "dit" else "out"], compile=True)


def run(family: str, tiny: bool, batches: list[int], iters: int, dtype: str, device: str, compile: bool | str,
        resolution: int | None, timestep: int, layer: str | None, extract: bool,
        compile_mode: str | None = None) -> list[dict[str, Any]]:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    tmp = Path(tempfile.mkdtemp(prefix="difffeat-bench-"))
    res = resolution or ((64 if tiny else 256) if family == "dit" else (64 if tiny else 1024))
    path = dit_skeleton(tmp / "dit", res, tiny) if family == "dit" else sdxl_skeleton(tmp, tiny)
    bb = difffeat.load_backbone(str(path), dtype=dtype, device=device, random_weights=True)  # fuses QKV, channels-last on GPU
    if compile == "whole":
        difffeat.backbone.compile_denoiser(bb, compile_mode)
    elif compile:
        compile_blocks(bb)
    layer = layer or ("block.14" if family == "dit" and not tiny else "block.1" if family == "dit" else "up.0")
    base = {"bench": "denoiser_forward", "family": family, "model": "tiny" if tiny else str(path), "resolution": res,
            "dtype": dtype, "compile": compile, "compile_mode": compile_mode, "t": timestep,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    rows = []
    for b in batches:
        row = dict(base, **bench_denoiser(bb, b, res, iters, timestep))
        print(json.dumps(row), flush=True)
        rows.append(row)
        if extract:
            ex = difffeat.create(str(path), backbone=bb, layers=[layer], timesteps=[timestep], ensemble=1,
                                 resolution=res, max_batch=b)
            row = dict(base, bench="extract", layer=layer, ensemble=1, **bench(ex, b, iters, dev))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sdxl", "dit"], required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny configs for a CPU smoke run")
    ap.add_argument("--resolution", type=int, default=None, help="default 1024 (sdxl) / 256 (dit)")
    ap.add_argument("--batches", default="16,32")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--timestep", type=int, default=261)
    ap.add_argument("--layer", default=None, help="layer for the extraction row (default up.0 / block.14)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="compile the blocks (as feature extraction does)")
    ap.add_argument("--compile-whole", action="store_true",
                    help="compile the whole denoiser (denoiser-forward rows; implies --no-extract)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for --compile-whole (e.g. max-autotune)")
    ap.add_argument("--no-extract", action="store_true", help="only time the denoiser forward")
    args, _ = ap.parse_known_args(argv)  # tolerate benchmarks/extract.py's own options when dispatched from it
    compile = "whole" if args.compile_whole else args.compile
    run(args.family, args.tiny, [int(v) for v in args.batches.split(",")], args.iters, args.dtype, args.device,
        compile, args.resolution, args.timestep, args.layer, not (args.no_extract or args.compile_whole),
        args.compile_mode)


if __name__ == "__main__":
    main()
