"""Throughput of the dense heads: prediction (extract + head) and cached-feature training.

Builds the SD-2.1 architecture from a diffusers config folder with random weights (speed
does not depend on weight values), extracts VPD's feature taps (``up.0.res.1``,
``up.1.attn.1``, ``up.2.attn.1``, ``up.3``; t=1, ensemble 1) at 512x512 and times

* **prediction**: extractor + head + logits resized to 512x512 + arg-max (seg) per batch,
  fresh images every call (what ``difffeat segment --head`` does per batch, minus file I/O);
* **cached training**: forward + backward + AdamW step of the head on stored features at
  label resolution (what every epoch of ``train.mode=cached`` costs per image).

    python benchmarks/dense.py --skeleton ../shared/model-skeletons/sd21 [--task seg|depth|edges]

Prints one JSON line. Target from the issue: prediction >= 20 images/s at 512x512 on an H100.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from difffeat.backbone import load_backbone
from difffeat.extractor import FeatureExtractor
from difffeat.heads import build_head
from difffeat.tasks.dense_train import task_loss

HEAD = {"seg": ("fpn", {"num_classes": 150}), "depth": ("depth", {"embed_channels": 512, "out_channels": 64}),
        "edges": ("hed", {"hidden": 64})}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skeleton", default="../shared/model-skeletons/sd21", help="diffusers folder (configs suffice)")
    ap.add_argument("--task", default="seg", choices=list(HEAD))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--layers", nargs="+", default=["up.0.res.1", "up.1.attn.1", "up.2.attn.1", "up.3"])
    ap.add_argument("--timestep", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16, help="images per prediction call")
    ap.add_argument("--train-batch", type=int, default=8, help="images per training step")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile the denoiser blocks")
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = device.type == "cuda"

    bb = load_backbone(args.skeleton, dtype=args.dtype, device=args.device, random_weights=True)
    ex = FeatureExtractor(bb, layers=args.layers, timesteps=[args.timestep], resolution=args.resolution,
                          resize="resize", max_batch=args.max_batch, compile=args.compile)
    kind, head_args = HEAD[args.task]
    head = build_head(kind, ex.feature_info, **head_args).to(device)
    cfg = {"head": {"kind": kind, "args": head_args}, "loss": {"kind": "silog"}}
    r = args.resolution
    gen = torch.Generator(device="cpu").manual_seed(0)

    @torch.no_grad()
    def predict() -> None:
        x = torch.rand(args.batch, 3, r, r, generator=gen).to(device)  # fresh images: per-image noise keys
        feats = ex(x)
        head.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = head(feats, (r, r))
        if args.task == "seg":
            out.argmax(1)

    t_pred = _median_time(predict, device, args.repeats)

    feats = ex(torch.rand(args.train_batch, 3, r, r, generator=gen).to(device))
    feats = {k: v.half().float() for k, v in feats.items()}  # as loaded from the fp16 cache
    if args.task == "seg":
        target = torch.randint(0, 150, (args.train_batch, r, r), device=device)
    elif args.task == "depth":
        target = torch.rand(args.train_batch, r, r, device=device) * 9 + 0.5
    else:
        target = (torch.rand(args.train_batch, r, r, device=device) > 0.9).float()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)

    def train_step() -> None:
        head.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            if kind == "hed":
                out = head(feats, (r, r), return_sides=True)
            else:
                out = (head(feats, (r, r)), [])
            loss = task_loss(args.task, cfg, out, target, 255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_train = _median_time(train_step, device, args.repeats)
    print(json.dumps({
        "benchmark": "dense", "task": args.task, "head": kind,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "resolution": r, "layers": args.layers, "timestep": args.timestep,
        "feature_shapes": {k: list(v.shape[1:]) for k, v in feats.items()},
        "head_params_m": round(sum(p.numel() for p in head.parameters()) / 1e6, 3),
        "predict_batch": args.batch, "predict_ms_per_batch": round(1000 * t_pred, 2),
        "predict_images_per_s": round(args.batch / t_pred, 2),
        "train_batch": args.train_batch, "train_ms_per_step": round(1000 * t_train, 2),
        "cached_train_images_per_s": round(args.train_batch / t_train, 2),
        "compile": args.compile, "targets": {"predict_images_per_s": 20},
    }))


if __name__ == "__main__":
    main()
