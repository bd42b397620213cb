"""Multi-GPU scaling of DIFT-protocol extraction, and byte-identity of its outputs (issue #7).

Builds SD-2.1 with random weights from a diffusers config folder (speed does not depend on
weight values; every rank seeds torch identically, so all ranks hold the same weights), writes
N synthetic 768² JPEGs, and runs the DIFT protocol (768², t=261, ``up.1``, ensemble 8, empty
prompt) end to end — read, prepare, extract, write — through ``torchrun`` on 1 and on 2 (or
``--worlds``) GPUs. For each world size it prints one JSON line: images/s overall and per GPU,
the speed-up over one GPU, and whether every output is byte-identical to the one-GPU run
(sha256 per file) and identical in content (sha256 over tensor bytes + sorted metadata).

Modes: ``shards`` (``difffeat.shards.extract_folder_sharded``: safetensors shards + JSONL
index) and ``files`` (``difffeat.pipeline.extract_folder``: one file per image; needs
``run_folder`` to take its rank's share through ``difffeat.distributed.rank_share``; a run
where each rank wrote every image is reported as not data-parallel).

    python benchmarks/scaling.py --skeleton ../shared/model-skeletons/sd21            # GPU machine
    python benchmarks/scaling.py --skeleton tiny --device cpu --resolution 64 \\
        --ensemble 2 --images 8 --batch-size 2 --shard-size 4                          # CPU smoke

Timing starts after model build and one warm-up batch, between two barriers (gloo, CPU:
no NCCL is needed), so it covers exactly the extraction of the N images. cuDNN autotuning is
off: its algorithm choice may differ between processes and would break byte-identity.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


# ---------------------------------------------------------------- inputs
def make_images(folder: Path, n: int, size: int) -> None:
    """``n`` deterministic JPEGs (smooth colour fields + rectangles), generated once."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        path = folder / f"img-{i:05d}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        a = rng.uniform(-1, 1, (3, 3))
        img = np.stack([0.5 + 0.5 * np.sin(3 * (a[c, 0] * xx + a[c, 1] * yy) + a[c, 2] * 6) for c in range(3)], -1)
        for _ in range(6):
            x0, y0 = rng.integers(0, size - size // 4, 2)
            w, h = rng.integers(size // 16, size // 4, 2)
            img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.03, img.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, quality=95)


# ---------------------------------------------------------------- digests
def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every output file (relative path -> hex)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith((".", "bench-"))}


def content_digests(folder: Path) -> dict[str, str]:
    """sha256 over the tensors (name, dtype, shape, bytes) and sorted metadata of each .safetensors file.

    Independent of the order safetensors writes its metadata map in (which varies by process).
    """
    from safetensors import safe_open

    out = {}
    for p in sorted(folder.rglob("*.safetensors")):
        h = hashlib.sha256()
        with safe_open(str(p), framework="pt") as f:
            h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
            for k in sorted(f.keys()):
                t = f.get_tensor(k).contiguous()
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[p.relative_to(folder).as_posix()] = h.hexdigest()
    return out


# ---------------------------------------------------------------- one rank (run by torchrun)
def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import difffeat
    from difffeat.distributed import dist_info, rank_device, rank_share
    from difffeat.io import list_images
    from difffeat.pipeline import extract_folder
    from difffeat.shards import extract_folder_sharded

    info = dist_info()
    if info.world_size > 1:
        dist.init_process_group("gloo")  # barriers for timing only; extraction itself never communicates
    device = rank_device(args.device, info)
    if device and device.startswith("cuda"):
        if ":" in device:
            torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    ex = difffeat.create(args.skeleton, layers=[args.layer], timesteps=[args.timestep], ensemble=args.ensemble,
                         prompt="", resolution=args.resolution, dtype=args.dtype, device=device,
                         max_batch=max(args.max_batch, args.ensemble), random_weights=True, seed=0)
    warm = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1))
    ex(warm)  # prompt cache, kernels, allocator
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()
    out = Path(args.out)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    if args.mode == "shards":
        res = extract_folder_sharded(ex, args.image_dir, out, shard_size=args.shard_size, batch_size=args.batch_size,
                                     save_dtype=args.save_dtype, info=info)
        written = res.computed
    else:
        written = extract_folder(ex, args.image_dir, out, batch_size=args.batch_size, save_dtype=args.save_dtype).done
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()
    mine_s = time.perf_counter() - t0
    if dist.is_initialized():
        dist.barrier()
    total_s = time.perf_counter() - t0
    n = len(list_images(args.image_dir))
    row = {"rank": info.rank, "written": written, "expected": len(rank_share(list_images(args.image_dir), args.batch_size, info))
           if args.mode == "files" else None, "rank_s": round(mine_s, 3)}
    rows = [row] * info.world_size
    if dist.is_initialized():
        rows = [None] * info.world_size  # type: ignore[list-item]
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    if info.is_main:
        (out / f"bench-{args.mode}.json").write_text(json.dumps({
            "world_size": info.world_size, "images": n, "seconds": round(total_s, 3), "ranks": rows,
            "device": torch.cuda.get_device_name() if device and device.startswith("cuda") else "cpu",
        }))


# ---------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skeleton", default="../shared/model-skeletons/sd21", help="diffusers config folder, or 'tiny'")
    ap.add_argument("--work", default="/tmp/difffeat-scaling", help="images and outputs go here")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--worlds", default=None, help="comma-separated world sizes (default: 1 and all visible GPUs)")
    ap.add_argument("--modes", default="shards,files")
    ap.add_argument("--resolution", type=int, default=768)
    ap.add_argument("--timestep", type=int, default=261)
    ap.add_argument("--layer", default="up.1")
    ap.add_argument("--ensemble", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--save-dtype", default="fp16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="shards", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--image-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    work = Path(args.work)
    if args.skeleton == "tiny":  # CPU smoke: the test suite's tiny SD
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import tiny_models

        if not (work / "tiny-sd" / "model_index.json").exists():
            tiny_models.build_tiny_sd(work / "tiny-sd")
        args.skeleton = str(work / "tiny-sd")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else sorted({1, max(gpus, 1)})
    make_images(work / "images", args.images, args.resolution)
    passthrough = ["--skeleton", args.skeleton, "--image-dir", str(work / "images"), "--resolution", str(args.resolution),
                   "--timestep", str(args.timestep), "--layer", args.layer, "--ensemble", str(args.ensemble),
                   "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--max-batch", str(args.max_batch),
                   "--dtype", args.dtype, "--save-dtype", args.save_dtype, "--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"), DIFFFEAT_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    ok = True
    for mode in args.modes.split(","):
        base: dict[str, float] = {}
        ref_files: dict[str, str] = {}
        ref_content: dict[str, str] = {}
        for w in worlds:
            out = work / f"out-{mode}-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(w),
                   __file__, "--worker", "--mode", mode, "--out", str(out), *passthrough]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(json.dumps({"bench": "scaling", "mode": mode, "world_size": w, "error": "\n".join(l for l in proc.stderr.splitlines()
                                                  if "Error" in l or "error:" in l)[-2500:] or proc.stderr[-1500:]}), flush=True)
                ok = False
                continue
            res = json.loads((out / f"bench-{mode}.json").read_text())
            files, content = file_digests(out), content_digests(out)
            if w == worlds[0]:
                base, ref_files, ref_content = res, files, content
            row = {
                "bench": "scaling", "protocol": "dift", "mode": mode, "model": args.skeleton, "resolution": args.resolution,
                "ensemble": args.ensemble, "layer": args.layer, "dtype": args.dtype, "batch_size": args.batch_size,
                "device": res["device"], "world_size": w, "images": res["images"], "seconds": res["seconds"],
                "images_per_s": round(res["images"] / res["seconds"], 2),
                "images_per_s_per_gpu": round(res["images"] / res["seconds"] / w, 2),
                "speedup": round(base["seconds"] / res["seconds"], 3),
                "rank_seconds": [r["rank_s"] for r in res["ranks"]],
                "files": len(files), "files_identical": files == ref_files,
                "content_identical": content == ref_content,
                "files_differing": sum(files.get(k) != v for k, v in ref_files.items()),
            }
            if mode == "files" and any(r["written"] != r["expected"] for r in res["ranks"]):
                row["error"] = "each rank did not take its own share: run_folder is not data-parallel yet (use rank_share)"
            ok &= row["files_identical"] and "error" not in row
            print(json.dumps(row), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
