#!/usr/bin/env python
"""Train ``difffeat-tiny`` (see :mod:`difffeat.data.tiny_model`) on ``shapes``, on the fly.

DDPM epsilon-prediction (Ho et al. 2020) with cosine betas, AdamW, bf16 autocast on CUDA,
an EMA of the weights (decay 0.999 with the usual (1+n)/(10+n) warm-up) and 10% class-label
dropout to the null class for classifier-free guidance. Every step renders a fresh batch of
train-split scenes (on the training device), so no image is seen twice.

Output folder::

    OUT/model_index.json  a diffusers pipeline folder: difffeat.load_backbone(OUT) loads it
    OUT/unet/          EMA weights, save_pretrained, float16 safetensors (~20 MB; load with
                       UNet2DModel.from_pretrained(OUT/"unet"), which upcasts to float32)
    OUT/scheduler/     DDPMScheduler config
    OUT/training.json  steps, samples, time, parameters, loss curve summary, arguments
    OUT/model_card.md  what the model is and how to use it
    OUT/samples.png    DDIM samples, one row per class (when --preview > 0)
    OUT/train_state/   float32 weights, EMA and AdamW state for --resume (not for shipping)

Examples::

    python scripts/train_tiny.py --out runs/tiny --minutes 8 --compile        # H100
    python scripts/train_tiny.py --out /tmp/t --minutes 0.1 --device cpu       # smoke test
    python scripts/train_tiny.py --out runs/tiny2 --resume runs/tiny --minutes 8
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from difffeat.data.shapes import CLASSES, render
from difffeat.data.tiny_model import (NULL_CLASS, build_tiny_unet, generate,
                                      tiny_scheduler_config)
from difffeat.errors import BadInputError, CheckpointMismatchError

EMA_DECAY = 0.999
LABEL_DROPOUT = 0.1
WARMUP_STEPS = 200


def _save_state(d: Path, unet, ema, opt, info: dict[str, Any]) -> None:
    """Weights, EMA and optimizer state as safetensors (+ JSON), for --resume."""
    d.mkdir(parents=True, exist_ok=True)
    cpu = lambda sd: {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    save_file(cpu(unet.state_dict()), str(d / "model.safetensors"))
    save_file(cpu(ema.state_dict()), str(d / "ema.safetensors"))
    sd = opt.state_dict()
    tensors = cpu({f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()})
    save_file(tensors, str(d / "optimizer.safetensors"),
              metadata={"param_groups": json.dumps(sd["param_groups"])})
    (d / "state.json").write_text(json.dumps(info, indent=1))


def _load_state(d: Path, unet, ema, opt, device) -> dict[str, Any]:
    if not (d / "state.json").exists():
        raise BadInputError(f"--resume {d.parent}: no train_state/state.json there")
    try:
        unet.load_state_dict(load_file(str(d / "model.safetensors"), device=str(device)))
        ema.load_state_dict(load_file(str(d / "ema.safetensors"), device=str(device)))
    except RuntimeError as e:
        raise CheckpointMismatchError(f"--resume {d.parent}: weights do not fit this UNet config "
                                      f"(different --size or architecture?): {str(e)[:200]}") from e
    from safetensors import safe_open

    with safe_open(str(d / "optimizer.safetensors"), "pt", device=str(device)) as f:
        groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key in f.keys():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = f.get_tensor(key)
    for st in state.values():                       # AdamW keeps its step counter on the CPU
        if "step" in st:
            st["step"] = st["step"].cpu()
    opt.load_state_dict({"state": state, "param_groups": groups})
    return json.loads((d / "state.json").read_text())


def _model_card(info: dict[str, Any]) -> str:
    cls = ", ".join(f"{i} {c}" for i, c in enumerate(CLASSES))
    return f"""# difffeat-tiny

A class-conditional pixel-space DDPM (diffusers `UNet2DModel`, {info['params'] / 1e6:.2f}M
parameters, EMA weights stored as {info['storage_dtype']}) trained on the procedural
`shapes` scenes of difffeat ({info['size']}x{info['size']} RGB in [-1, 1]). It is a test and
demo model: small, fast, with known ground truth for every downstream task.

- Classes (`class_labels`): {cls}; {NULL_CLASS} = null class (unconditional; trained with
  {LABEL_DROPOUT:.0%} label dropout, so classifier-free guidance works).
- Noise: DDPMScheduler, 1000 steps, cosine (`squaredcos_cap_v2`) betas, epsilon prediction.
- Training: {info['steps']} steps x batch {info['batch']} ({info['samples']} fresh scenes),
  {info['train_seconds'] / 60:.1f} min on {info['device_name']}, AdamW lr {info['lr']},
  EMA decay {EMA_DECAY}. Final loss {info['loss_last']:.4f} (first {info['loss_first']:.4f}).

```python
import torch
from diffusers import UNet2DModel, DDPMScheduler
from difffeat.data.tiny_model import generate
unet = UNet2DModel.from_pretrained("OUT/unet")            # upcasts to float32
sched = DDPMScheduler.from_pretrained("OUT/scheduler")
images = generate(unet, sched.config, torch.tensor([0, 3, 5]))   # [3,3,64,64] in [0,1]
```

Trained by `scripts/train_tiny.py`; see `training.json` for the loss curve and arguments.
"""


def train(out: str | Path, minutes: float = 8.0, batch: int | None = None, lr: float = 3e-4,
          resume: str | Path | None = None, device: str | None = None, compile: bool = False,
          size: int = 64, seed: int = 0, log_every: int = 50, max_steps: int | None = None,
          preview: int | None = None, save_every: float = 2.0, train_state: bool = True,
          unet_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train for ``minutes`` of wall time (or ``max_steps``), save to ``out``, return the info dict.

    The output folder is also written every ``save_every`` minutes, so an interrupted run
    still leaves a usable model; ``train_state=False`` skips the (large) resume state.
    """
    from diffusers import DDPMScheduler

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    batch = batch or (256 if cuda else 8)
    preview = (8 if cuda else 0) if preview is None else preview
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(out)
    torch.manual_seed(seed)
    overrides = {"sample_size": size, **(unet_overrides or {})}
    unet = build_tiny_unet(**overrides).to(dev).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    sched = DDPMScheduler(**tiny_scheduler_config())
    state = {"step": 0, "samples": 0, "train_seconds": 0.0, "loss_log": []}
    if resume:
        state = _load_state(Path(resume) / "train_state", unet, ema, opt, dev)
    base_seconds = state["train_seconds"]
    model = torch.compile(unet) if compile else unet
    gen = torch.Generator(dev).manual_seed(seed * 1_000_003 + state["step"])
    params = sum(p.numel() for p in unet.parameters())
    print(f"difffeat-tiny: {params / 1e6:.2f}M params, batch {batch}, {size}px, {dev}, "
          f"start step {state['step']}", flush=True)

    run = dict(params=params, batch=batch, lr=lr, size=size, seed=seed, compile=compile,
               minutes=minutes, resumed_from=str(resume) if resume else None,
               device_name=torch.cuda.get_device_name(dev) if cuda else "cpu",
               unet_overrides=unet_overrides or {})
    start, run_loss, run_n, logged_at = time.perf_counter(), 0.0, 0, 0.0
    saved_at = 0.0
    while True:
        step = state["step"]
        b = render(batch, seed=seed, split="train", size=size, start=state["samples"], device=dev)
        x0 = b.images01() * 2 - 1
        drop = torch.rand(batch, device=dev, generator=gen) < LABEL_DROPOUT
        labels = torch.where(drop, NULL_CLASS, b.label)
        noise = torch.randn(x0.shape, device=dev, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=dev, generator=gen)
        xt = sched.add_noise(x0, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            pred = model(xt, t, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / WARMUP_STEPS)
        opt.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        state["step"] += 1
        state["samples"] += batch
        run_loss, run_n = run_loss + loss.detach(), run_n + 1
        elapsed = time.perf_counter() - start
        done = elapsed >= minutes * 60 or (max_steps is not None and state["step"] >= max_steps)
        if state["step"] % log_every == 0 or done:
            mean = float(run_loss) / run_n
            if not math.isfinite(mean):
                raise RuntimeError(f"loss became {mean} at step {state['step']}")
            state["loss_log"].append([state["step"], round(mean, 5)])
            speed = batch * run_n / max(elapsed - logged_at, 1e-9)
            print(f"step {state['step']:6d}  loss {mean:.4f}  {speed:7.1f} img/s  "
                  f"{elapsed / 60:5.2f} min", flush=True)
            run_loss, run_n, logged_at = 0.0, 0, elapsed
        state["train_seconds"] = base_seconds + elapsed
        if done:
            return _finish(out, unet, ema, opt, state, run, sched, preview, train_state)
        if elapsed - saved_at >= save_every * 60:
            _finish(out, unet, ema, opt, state, run, sched, 0, train_state)
            saved_at = elapsed


def _finish(out: Path, unet, ema, opt, state: dict[str, Any], run: dict[str, Any], sched,
            preview: int, train_state: bool) -> dict[str, Any]:
    """Write the output folder (see the module docstring); returns training.json's content."""
    log = state["loss_log"]
    tail = max(1, len(log) // 20)                   # first / last 5% of the logged losses
    info = {**run, "steps": state["step"], "samples": state["samples"],
            "train_seconds": round(state["train_seconds"], 1),
            "loss_first": sum(v for _, v in log[:tail]) / tail,
            "loss_last": sum(v for _, v in log[-tail:]) / tail,
            "loss_log": log, "classes": list(CLASSES), "null_class": NULL_CLASS,
            "storage_dtype": "float16", "ema_decay": EMA_DECAY, "label_dropout": LABEL_DROPOUT}
    out.mkdir(parents=True, exist_ok=True)
    shipped = copy.deepcopy(ema).half()         # nn.Module.half: no diffusers dtype warning
    shipped.save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    import diffusers

    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
         "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}, indent=1))
    if train_state:
        _save_state(out / "train_state", unet, ema, opt,
                    {k: state[k] for k in ("step", "samples", "train_seconds", "loss_log")})
    (out / "training.json").write_text(json.dumps(info, indent=1))
    (out / "model_card.md").write_text(_model_card(info))
    if preview > 0:
        from PIL import Image

        labels = torch.arange(len(CLASSES)).repeat_interleave(preview)
        g = torch.Generator(ema.device).manual_seed(0)
        cuda = ema.device.type == "cuda"
        with torch.autocast(ema.device.type, dtype=torch.bfloat16, enabled=cuda):
            imgs = generate(ema, sched.config, labels, generator=g)
        s = imgs.shape[-1]
        grid = imgs.view(len(CLASSES), preview, 3, s, s).permute(0, 3, 1, 4, 2).reshape(
            len(CLASSES) * s, preview * s, 3)
        Image.fromarray((grid * 255).round().byte().cpu().numpy()).save(out / "samples.png")
    mb = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 1e6
    print(f"saved {out} (unet {mb:.1f} MB, {info['steps']} steps, loss {info['loss_last']:.4f})",
          flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget of this run")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default 256 on CUDA, 8 on CPU)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--resume", default=None, help="an earlier --out folder to continue from")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--size", type=int, default=64, help="training resolution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--preview", type=int, default=None,
                   help="samples per class in samples.png (default 8 on CUDA, 0 on CPU)")
    p.add_argument("--save-every", type=float, default=2.0, help="minutes between checkpoints")
    p.add_argument("--no-train-state", action="store_true",
                   help="do not write train_state/ (160 MB; needed only for --resume)")
    a = p.parse_args(argv)
    train(a.out, minutes=a.minutes, batch=a.batch, lr=a.lr, resume=a.resume, device=a.device,
          compile=a.compile, size=a.size, seed=a.seed, log_every=a.log_every,
          max_steps=a.max_steps, preview=a.preview, save_every=a.save_every,
          train_state=not a.no_train_state)


if __name__ == "__main__":
    main()
