"""DIRE fidelity: difffeat's ``dire-adm256`` / ``dire-sd`` against DIRE's own ``compute_dire.py``.

The reference (github.com/ZhendongWang6/DIRE, ``guided-diffusion/``) is imported from the
checkout given with ``--reference`` and *run*: its ``center_crop_arr``
(guided_diffusion/image_datasets.py:233), its ``SpacedDiffusion`` with
``space_timesteps(1000, "ddimN")`` (respace.py), ``ddim_reverse_sample_loop`` and
``ddim_sample_loop`` (gaussian_diffusion.py:587-800) with ``clip_denoised``, and the map
formula of compute_dire.py:106-115 (``(|x - x̂| * 255 / 2).clamp(0, 255).to(uint8)``),
which is the only part re-written here (it is inline in the script's ``main``). Only
``blobfile`` and ``mpi4py`` (imported at the top of image_datasets.py, unused by
``center_crop_arr``) are stubbed. Both sides get the same pixels and the same denoiser:
the tiny random UNet of the tests (``tests/tiny_models.py``) and the weights-free
Gaussian denoiser. Nothing is fetched at run time.

    python benchmarks/fidelity/dire.py --reference .refs/DIRE
    python benchmarks/fidelity/dire.py --reference .refs/DIRE --write-fixture tests/fixtures/dire_golden.safetensors

One JSON line per comparison: ``max_abs_diff`` (DIRE maps, grey levels), ``rel_l2``
(reconstructions), ``pixels_identical`` (fraction of map values equal) and
``rank_agreement`` (Spearman of the per-image mean DIRE).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import difffeat  # noqa: E402
from difffeat.heads.dire import DireSettings, compute_dire, fit_square  # noqa: E402
from tests import tiny_models  # noqa: E402

SIZES = [(45, 37), (70, 33), (16, 16), (12, 20)]  # (w, h): BOX halving, halving + crop, as is, upsampled


def reference_commit(path: Path, given: str | None) -> str:
    """The checkout's commit (``--commit`` for an unpacked archive, which has no .git)."""
    if given:
        return given
    if not (path / ".git").exists():
        return "unknown (not a git checkout; pass --commit)"
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def import_reference(path: Path, commit: str | None = None) -> types.SimpleNamespace:
    """guided-diffusion's modules from a DIRE (or guided-diffusion) checkout."""
    gd = path / "guided-diffusion" if (path / "guided-diffusion").is_dir() else path
    for name in ("blobfile", "mpi4py"):  # image_datasets.py imports them at the top
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["mpi4py"].MPI = types.SimpleNamespace()  # type: ignore[attr-defined]
    sys.path.insert(0, str(gd))
    from guided_diffusion import gaussian_diffusion as G
    from guided_diffusion import image_datasets, respace

    return types.SimpleNamespace(G=G, respace=respace, center_crop_arr=image_datasets.center_crop_arr,
                                 commit=reference_commit(path, commit))


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for w, h in SIZES:  # smooth + noise: natural-ish statistics at a tiny size
        base = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.float64)
        out.append(Image.fromarray(np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)))
    return out


def reference_dire(ref: types.SimpleNamespace, model: Callable[..., torch.Tensor], betas: np.ndarray, x11: torch.Tensor,
                   steps: int, clip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_T, reconstruction, uint8 map) by compute_dire.py's calls on images in [-1, 1]."""
    G = ref.G
    diffusion = ref.respace.SpacedDiffusion(
        use_timesteps=ref.respace.space_timesteps(len(betas), f"ddim{steps}"), betas=betas,
        model_mean_type=G.ModelMeanType.EPSILON, model_var_type=G.ModelVarType.FIXED_SMALL,
        loss_type=G.LossType.MSE, rescale_timesteps=False)
    shape = tuple(x11.shape)
    with torch.no_grad():
        latent = diffusion.ddim_reverse_sample_loop(model, shape, noise=x11, clip_denoised=clip, model_kwargs={},
                                                    device=x11.device, real_step=0)
        recons = diffusion.ddim_sample_loop(model, shape, noise=latent, clip_denoised=clip, model_kwargs={},
                                            device=x11.device, real_step=0)
    dire = (torch.abs(x11 - recons) * 255.0 / 2.0).clamp(0, 255).to(torch.uint8)  # compute_dire.py:106,115
    return latent, recons, dire


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float(np.all(np.argsort(a) == np.argsort(b)))


def row(method: str, ref_maps: torch.Tensor, maps255: torch.Tensor, ref_rec: torch.Tensor, rec: torch.Tensor,
        **extra: Any) -> dict[str, Any]:
    d = (ref_maps.double() - maps255.double()).abs()
    return {"method": method, "max_abs_diff": float(d.max()), "pixels_identical": float((d == 0).double().mean()),
            "rel_l2": float((ref_rec - rec).norm() / ref_rec.norm()),
            "rank_agreement": spearman(ref_maps.double().mean(dim=(1, 2, 3)).numpy(), maps255.double().mean(dim=(1, 2, 3)).numpy()),
            **extra}


def unet_eps(bb: Any) -> Callable[..., torch.Tensor]:
    cond = None

    def model(x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        nonlocal cond
        if cond is None or cond.batch_size != x.shape[0]:
            cond = difffeat.heads.ddim.default_conditioning(bb, x)
        return bb.predict(x, t, cond).float()

    return model


def pixel_rows(ref: types.SimpleNamespace, crops: torch.Tensor, steps: int, size: int, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    import difffeat.heads.ddim  # noqa: F401

    bb = difffeat.load_backbone(str(tiny_models.build_tiny_pixel(tmp / "pixel")), dtype="fp32", device="cpu")
    betas = ref.G.get_named_beta_schedule("linear", 1000)  # = the tiny model's DDPMScheduler betas
    x01 = crops.float() / 255
    x11 = torch.from_numpy(crops.numpy().astype(np.float32) / 127.5 - 1)  # image_datasets.py:180
    rows, golden = [], {}
    for name, den in (("tiny-unet", None), ("gaussian", tiny_models.GaussianDenoiser(bb.alphas_cumprod))):
        if den is not None:
            bb.denoiser = den
        _, ref_rec, ref_map = reference_dire(ref, unet_eps(bb), betas, x11, steps, clip=True)
        for pairing in ("guided-diffusion", "diffusers"):
            out = compute_dire(bb, x01, DireSettings(steps=steps, resolution=size, pairing=pairing))
            rows.append(row(f"dire-adm256[{pairing}]", ref_map, (out.maps * 255).round(), (ref_rec + 1) / 2,
                            out.recon, model=name, steps=steps))
        if den is not None:
            for s in (steps, 3):
                _, rr, rm = reference_dire(ref, unet_eps(bb), betas, x11, s, clip=True)
                golden[f"gaussian_ddim{s}_map"], golden[f"gaussian_ddim{s}_recon11"] = rm, rr.float()
            _, rr, rm = reference_dire(ref, unet_eps(bb), betas, x11, steps, clip=False)
            golden[f"gaussian_ddim{steps}_noclip_map"] = rm
    return rows, golden


def sd_row(ref: types.SimpleNamespace, crops: torch.Tensor, steps: int, tmp: Path) -> dict[str, Any]:
    """dire-sd: the same reference loops on the tiny SD's VAE latents (clip off), pixels after decoding."""
    bb = difffeat.load_backbone(str(tiny_models.build_tiny_sd(tmp / "sd")), dtype="fp32", device="cpu")
    x01 = torch.nn.functional.interpolate(crops.float() / 255, size=64, mode="nearest")
    sched = bb.scheduler.config  # scaled_linear, as SD 1.x
    betas = np.linspace(sched.beta_start**0.5, sched.beta_end**0.5, sched.num_train_timesteps, dtype=np.float64) ** 2
    z = bb.encode(x01)[0].float()
    _, z_rec, _ = reference_dire(ref, unet_eps(bb), betas, z, steps, clip=False)
    dec = bb.decode(z_rec).float()
    ref_map = ((x01 - dec).abs() * 255).clamp(0, 255).to(torch.uint8)
    out = compute_dire(bb, x01, DireSettings(steps=steps, resolution=64, resize="resize", clip_x0=False))
    return row("dire-sd", ref_map, (out.maps * 255).round(), dec, out.recon, model="tiny-sd", steps=steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="a DIRE checkout (github.com/ZhendongWang6/DIRE)")
    ap.add_argument("--commit", default=None, help="the reference's commit, when --reference is an unpacked archive")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--write-fixture", type=Path, default=None, help="store the golden numbers the tests pin")
    args = ap.parse_args()
    torch.manual_seed(0)
    ref = import_reference(args.reference, args.commit)
    pil = images()
    ref_crops = [np.asarray(ref.center_crop_arr(im, args.size)) for im in pil]
    ours = [np.asarray(fit_square(im, args.size, "guided-diffusion")) for im in pil]
    pre = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(ref_crops, ours))
    print(json.dumps({"method": "dire-preprocessing", "max_abs_diff": pre, "sizes": SIZES, "reference": ref.commit}))
    crops = torch.from_numpy(np.stack(ref_crops)).permute(0, 3, 1, 2).contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        rows, golden = pixel_rows(ref, crops, args.steps, args.size, Path(tmp))
        rows.append(sd_row(ref, crops, args.steps, Path(tmp)))
    for r in rows:
        print(json.dumps({**r, "reference": ref.commit}))
    if args.write_fixture:
        from safetensors.torch import save_file

        tensors = {f"image{i}": torch.from_numpy(np.asarray(im)).contiguous() for i, im in enumerate(pil)}
        tensors.update({f"crop{i}": torch.from_numpy(c).contiguous() for i, c in enumerate(ref_crops)})
        tensors.update({k: v.contiguous() for k, v in golden.items()})
        meta = {"reference": f"github.com/ZhendongWang6/DIRE@{ref.commit}",
                "command": f"python benchmarks/fidelity/dire.py --reference REF --commit {ref.commit} --steps {args.steps} --size {args.size} "
                           f"--write-fixture {args.write_fixture}",
                "denoiser": "tests/tiny_models.py GaussianDenoiser() on DDPMScheduler(1000) linear betas"}
        args.write_fixture.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(args.write_fixture), metadata=meta)


if __name__ == "__main__":
    main()
