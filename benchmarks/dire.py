"""DIRE throughput: maps/s for an ADM-size 256² pixel UNet, 20 + 20 DDIM steps (GPU benchmark).

The model is a diffusers ``UNet2DModel`` built with random weights from the published
config of ADM's 256² unconditional model (Dhariwal & Nichol 2021; guided-diffusion flags
``--num_channels 256 --channel_mult 1,1,2,2,4,4 --num_res_blocks 2 --attention_resolutions
32,16,8 --num_head_channels 64 --resblock_updown True --use_scale_shift_norm True
--learn_sigma True``): 552.8M parameters, 6 output channels (ε and the variance; DDIM
reads ε). Speed does not depend on weight values. One DIRE map = 20 inversion + 20
reconstruction denoiser passes on the whole batch (:func:`difffeat.heads.dire.compute_dire`,
``clip_x0`` as in the paper).

Prints one JSON line per batch size: images/s, peak GiB, FLOPs per forward as counted by
``torch.utils.flop_counter`` (a multiply-add counts 2; the count is ~2.24e12 per image,
i.e. ~1.1e12 multiply-adds) and the sustained TFLOP/s over the 40 passes.

    python benchmarks/dire.py --batches 16,32,64 [--compile]
    python benchmarks/dire.py --tiny --device cpu          # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from difffeat.backbone import DiffusionBackbone, compile_denoiser, parse_dtype
from difffeat.heads.ddim import forward_flops
from difffeat.heads.dire import DireSettings, compute_dire

PEAK_TFLOPS = 800.0  # H100 SXM dense bf16, as measured on the device (8192³ matmul)


def adm_config(tiny: bool = False) -> dict[str, Any]:
    """UNet2DModel arguments of ADM 256² unconditional (or a tiny stand-in for smoke runs)."""
    if tiny:
        return dict(sample_size=32, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(32, 32, 64),
                    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"), attention_head_dim=16,
                    resnet_time_scale_shift="scale_shift", downsample_type="resnet", upsample_type="resnet", norm_num_groups=8)
    return dict(
        sample_size=256, in_channels=3, out_channels=6, layers_per_block=2,
        block_out_channels=(256, 256, 512, 512, 1024, 1024),           # 256 x channel_mult (1,1,2,2,4,4)
        down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,  # attention at 32,16,8
        up_block_types=("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",) * 3,
        attention_head_dim=64,                                          # num_head_channels 64
        resnet_time_scale_shift="scale_shift",                          # use_scale_shift_norm
        downsample_type="resnet", upsample_type="resnet",               # resblock_updown
        norm_num_groups=32,
    )


def build(tiny: bool, dtype: str, device: str) -> DiffusionBackbone:
    from diffusers import DDPMScheduler, UNet2DModel

    from difffeat.loading import quiet_hf

    quiet_hf()
    dev = torch.device(device)
    torch.manual_seed(0)
    with dev:
        unet = UNet2DModel(**adm_config(tiny)).to(parse_dtype(dtype, dev))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")  # ADM's linear schedule
    return DiffusionBackbone("adm256-random", {"unet": unet, "scheduler": sched}, {}, parse_dtype(dtype, dev), dev,
                             random_weights=True, name="adm256-uncond (random weights)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(bb: DiffusionBackbone, settings: DireSettings, batch: int, iters: int) -> dict[str, Any]:
    dev, res = bb.device, settings.resolution
    imgs = [torch.rand(batch, 3, res, res, device=dev) for _ in range(2)]
    compute_dire(bb, imgs[0], settings)  # warm-up: cudnn autotune, compile
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        compute_dire(bb, imgs[i % 2], settings)
        sync(dev)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops_fwd = forward_flops(bb, (1, 3, res, res))  # per image, one pass
    flops = flops_fwd * batch * 2 * settings.steps
    peak = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None
    return {
        "batch": batch, "images_per_s": round(batch / med, 3), "ms_per_image": round(1000 * med / batch, 2),
        "peak_gib": peak, "tflop_per_forward": float(f"{flops_fwd / 1e12:.4g}"),
        "tflops_sustained": round(flops / med / 1e12, 1), "pct_of_peak": round(100 * flops / med / 1e12 / PEAK_TFLOPS, 1),
        "median_s": round(med, 4), "iters": iters,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="32", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps each way")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the whole UNet")
    ap.add_argument("--compile-mode", default=None, help="e.g. max-autotune (CUDA graphs)")
    ap.add_argument("--tiny", action="store_true", help="tiny UNet at 32², 2 steps: a CPU smoke run")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype = "fp32" if args.tiny and dev.type == "cpu" else args.dtype
    bb = build(args.tiny, dtype, args.device)
    if args.compile:
        compile_denoiser(bb, args.compile_mode)
    steps = 2 if args.tiny else args.steps
    settings = DireSettings(steps=steps, resolution=32 if args.tiny else 256, clip_x0=True, max_batch=1 << 30)
    params = sum(p.numel() for p in bb.denoiser.parameters())
    for b in [int(v) for v in args.batches.split(",")]:
        row = {"bench": "dire", "model": "adm256-uncond" if not args.tiny else "tiny", "params_m": round(params / 1e6, 1),
               "resolution": settings.resolution, "steps": f"{steps}+{steps}", "dtype": dtype, "compile": args.compile,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
        row.update(bench(bb, settings, b if not args.tiny else min(b, 2), 1 if args.tiny else args.iters))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
