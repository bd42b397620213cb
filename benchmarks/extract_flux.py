"""FLUX.1 DiTF extraction and denoiser throughput — GPU benchmark (random weights, bf16).

The FLUX.1-dev architecture is built from its published config (``FLUX1_DEV`` below: 19
double-stream + 38 single-stream blocks x 3072, 24 heads x 128, RoPE axes (16, 56, 56), T5 width
4096, pooled CLIP 768, guidance embedding; the 16-channel autoencoder ``FLUX_VAE``) directly on the
device in bf16 (12B parameters: never materialised on the CPU). T5-XXL and CLIP are not built:
the prompt embeddings are random tensors of the right shapes ([1, 512, 4096] and [1, 768]),
stored as the backbone's cached empty prompt (speed does not depend on weight values).

It prints one JSON line per measurement:

* ``extract``: difffeat's DiTF protocol (preset ``ditf``: 640², block.28 = k=28, t=260,
  ensemble 8, AdaLN + channel discard) through ``FeatureExtractor``: images/s, peak GiB,
  TFLOP/s (``torch.utils.flop_counter``) incl. VAE encode, early exit after block 27;
* ``denoiser_forward``: the full transformer at batch >= 8 (640²): TFLOP/s and % of peak;
* ``baseline``: a straightforward diffusers implementation of the same protocol in the same
  process (fp32, the full forward every time, the ensemble as a Python loop, one image at a
  time, DiTF's post-processing by hand) and ``speedup`` = difffeat images/s / baseline images/s.

    source benchmarks/device_setup.sh; python3 benchmarks/extract_flux.py
    python benchmarks/extract_flux.py --tiny --device cpu       # CPU smoke test (tests/test_flux.py runs it)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import difffeat  # noqa: E402
from difffeat.adaln import modulate  # noqa: E402
from difffeat.backbone import DiffusionBackbone  # noqa: E402
from difffeat.extractor import FeatureExtractor  # noqa: E402
from difffeat.families.flux import image_ids, pack  # noqa: E402
from extract import PEAK_TFLOPS, bench, count_flops, sync  # noqa: E402
from extract_transformers import bench_denoiser  # noqa: E402

PEAK = 790.0 if torch.cuda.is_available() and "H200" in torch.cuda.get_device_name(0) else PEAK_TFLOPS

# black-forest-labs/FLUX.1-dev transformer/config.json and vae/config.json (published values)
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=32, act_fn="silu", scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, sample_size=1024)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
TINY = dict(FLUX1_DEV, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(FLUX_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64)
DITF = dict(layer="block.28", t=260, ensemble=8, resolution=640, channels=(154, 1446))
TINY_DITF = dict(layer="block.3", t=260, ensemble=8, resolution=64, channels=(3, 7))
T5_LEN = 512


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> DiffusionBackbone:
    """A random-weight FLUX.1 backbone, initialised on ``device`` in ``dtype`` (no CPU copy)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            torch.manual_seed(0)
            tr = FluxTransformer2DModel(**(TINY if tiny else FLUX1_DEV))
            vae = AutoencoderKL(**(TINY_VAE if tiny else FLUX_VAE))
    finally:
        torch.set_default_dtype(old)
    comps = {"transformer": tr, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)}
    bb = DiffusionBackbone("flux-dev-random", comps, {"_class_name": "FluxPipeline"}, dtype, device,
                           random_weights=True, name="flux-dev-random", use_t5=False)
    cfg = tr.config
    g = torch.Generator(device=device).manual_seed(1)
    bb._prompt_cache[""] = {  # the random "empty prompt" (T5 [1, 512, 4096], pooled CLIP [1, 768])
        "encoder_hidden_states": torch.randn(1, T5_LEN, cfg.joint_attention_dim, generator=g, device=device).to(dtype),
        "pooled": torch.randn(1, cfg.pooled_projection_dim, generator=g, device=device).to(dtype)}
    return bb


def _timed(fn, iters: int, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def baseline_ditf(bb: DiffusionBackbone, image: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """The DiTF protocol written plainly on diffusers (as a research script would): fp32, the whole
    transformer forward per ensemble member, hooks read block k's input and modulation."""
    tr, vae, emb = bb.denoiser, bb.vae, bb._prompt_cache[""]
    x = image.to(bb.device, torch.float32)[None] * 2 - 1
    k = int(p["layer"].split(".")[1])
    nd = len(tr.transformer_blocks)
    block = tr.transformer_blocks[k] if k < nd else tr.single_transformer_blocks[k - nd]
    feats, mods = [], []

    def grab(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        h = kwargs["hidden_states"]
        shift, scale, _ = block.norm.linear(torch.nn.functional.silu(kwargs["temb"])).chunk(3, dim=1)
        feats.append(h)
        mods.append((shift, scale))

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for _ in range(p["ensemble"]):
            dist = vae.encode(x).latent_dist
            z = (dist.sample() - bb.shift_factor) * bb.scaling_factor
            sigma = p["t"] / 1000
            zt = (1 - sigma) * z + sigma * torch.randn_like(z)
            hw = (zt.shape[-2], zt.shape[-1])
            tr(hidden_states=pack(zt), timestep=torch.tensor([sigma], device=bb.device),
               guidance=torch.tensor([3.5], device=bb.device), pooled_projections=emb["pooled"].float(),
               encoder_hidden_states=emb["encoder_hidden_states"].float(),
               txt_ids=torch.zeros(T5_LEN, 3, device=bb.device), img_ids=image_ids(hw, bb.device, torch.float32),
               return_dict=False)
    finally:
        handle.remove()
    h, w = hw[0] // 2, hw[1] // 2
    mean = torch.stack(feats).mean(0).transpose(1, 2).reshape(1, -1, h, w)
    shift = torch.stack([m[0] for m in mods]).mean(0)
    scale = torch.stack([m[1] for m in mods]).mean(0)
    return modulate(mean, shift, scale, 1e-6, p["channels"])


def run(tiny: bool, device: str, batch: int, forward_batch: int, max_batch: int, iters: int, compile: bool,
        baseline_images: int) -> list[dict[str, Any]]:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    p = TINY_DITF if tiny else DITF
    bb = build(tiny, dev, dtype)
    base = {"model": "FLUX.1-dev architecture, random weights" + (" (tiny)" if tiny else ""), "dtype": str(dtype)[6:],
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "peak_tflops": PEAK}
    rows = []
    ex = FeatureExtractor(bb, layers=[p["layer"]], timesteps=[p["t"]], ensemble=p["ensemble"], latent="sample",
                          resolution=p["resolution"], resize="resize", max_batch=max_batch, compile=compile,
                          adaln=True, discard_channels=p["channels"])
    row = dict(base, bench="extract", protocol="ditf", layer=p["layer"], t=p["t"], ensemble=p["ensemble"],
               resolution=p["resolution"], max_batch=max_batch, compile=compile, **bench(ex, batch, iters, dev))
    row["pct_of_peak"] = round(100 * row["tflops_achieved"] / PEAK, 1)
    print(json.dumps(row), flush=True)
    rows.append(row)
    fwd = dict(base, bench="denoiser_forward", resolution=p["resolution"],
               **bench_denoiser(bb, forward_batch, p["resolution"], iters, p["t"]))
    fwd["pct_of_peak"] = round(100 * fwd["tflops_achieved"] / PEAK, 1)
    print(json.dumps(fwd), flush=True)
    rows.append(fwd)
    rows.append(_baseline(bb, p, base, row, baseline_images, dev))
    return rows


def _baseline(bb: DiffusionBackbone, p: dict[str, Any], base: dict[str, Any], ours: dict[str, Any], n: int,
              dev: torch.device) -> dict[str, Any]:
    """Time the plain fp32 diffusers implementation on the same (fp32-cast) weights."""
    bb.denoiser.float()
    bb.vae.float()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    img = torch.rand(3, p["resolution"], p["resolution"], device=dev)
    baseline_ditf(bb, img, p)  # warm-up
    med = _timed(lambda: baseline_ditf(bb, img, p), n, dev)
    flops = count_flops(lambda: baseline_ditf(bb, img, p))
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    row = dict(base, bench="baseline", dtype="float32", what="diffusers full forward, fp32, ensemble loop, 1 image",
               images_per_s=round(1 / med, 3), peak_gib=round(peak, 2), tflops_achieved=round(flops / med / 1e12, 1),
               speedup=round(ours["images_per_s"] * med, 2))
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny FLUX-shaped model (CPU smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4, help="images per extraction call (x ensemble 8 rows)")
    ap.add_argument("--forward-batch", type=int, default=8, help="batch of the denoiser-forward measurement")
    ap.add_argument("--max-batch", type=int, default=16, help="denoiser rows per call in the extraction")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--baseline-images", type=int, default=2, help="timed runs of the baseline (1 image each)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    a = ap.parse_args(argv)
    ctx = torch.inference_mode() if a.device != "cpu" else contextlib.nullcontext()
    with ctx:
        return run(a.tiny, a.device, a.batch, a.forward_batch, a.max_batch, a.iters, a.compile, a.baseline_images)


if __name__ == "__main__":
    main()
