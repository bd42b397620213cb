"""AEROBLADE fidelity: difffeat's ``aeroblade`` against jonasricker/aeroblade's ``compute_distances``.

The reference's distance is *run*: ``_PatchedLPIPS`` (src/aeroblade/distances.py:61-123,
the ``lpips`` package's LPIPS with per-layer maps) is imported from the checkout given
with ``--reference`` (``pyiqa``, imported at the top and unused for LPIPS, is stubbed),
built with ``net="vgg", spatial=True`` as ``_compute_lpips`` does (distances.py:139) and
given difffeat's VGG16 trunk (random here, seed 0; ``pnet_rand=True`` so that nothing is
downloaded); its learned ``lin`` weights come from the installed ``lpips`` package, as in
the reference. The layer-2 map is rounded to fp16 and averaged (distances.py:157,213).
The reconstruction step cannot run on tiny models (it loads a hub pipeline with fp16
variants and CPU offload, image.py:69-86), so image.py:89-119 is re-implemented here:
``retrieve_latents(ae.encode(2x-1), generator=Generator().manual_seed(1))`` (the same
diffusers function), ``decode(..., force_not_quantize=True)`` for ``VQModel``,
``(x/2 + .5).clamp(0, 1)``, then the PNG round trip (``to_pil_image`` and
``ToImage/ToDtype``). Each image gets a fresh generator (difffeat's rule; the reference
streams one generator over a folder, which equals it for the first image). The score is
high_level_funcs.py:101-119: the maximum of ``-LPIPS`` over autoencoders.

Autoencoders: the tests' tiny SD VAE and a tiny MoVQ-style ``VQModel`` (random weights).

    python benchmarks/fidelity/aeroblade.py --reference .refs/aeroblade
    python benchmarks/fidelity/aeroblade.py --reference .refs/aeroblade --write-fixture tests/fixtures/aeroblade_golden.safetensors

One JSON line: ``max_abs_diff`` and ``rel_l2`` of the distances [image, AE],
``closest_ae_agreement`` (argmin per image) and ``rank_agreement`` (Spearman of the scores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from difffeat.heads.aeroblade import Autoencoder, VGGLayer2Distance, aeroblade_distances, load_autoencoder  # noqa: E402
from tests import tiny_models  # noqa: E402

SIZES = [(64, 48), (40, 56), (64, 64)]  # (w, h), multiples of 8: scored whole, as the reference


def import_reference(path: Path) -> Any:
    """aeroblade.distances from a checkout (its joblib cache is created in a temporary folder)."""
    sys.modules.setdefault("pyiqa", types.ModuleType("pyiqa"))
    here = str(Path(__file__).resolve().parent)  # this script is also named aeroblade.py
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    sys.modules.pop("aeroblade", None)
    sys.path.insert(0, str(path.resolve() / "src"))
    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp())  # distances.py makes Memory(location="cache") at import
    try:
        from aeroblade import distances
    finally:
        os.chdir(cwd)
    return distances


def tiny_movq() -> torch.nn.Module:
    from diffusers import VQModel

    torch.manual_seed(0)
    return VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   layers_per_block=1, norm_num_groups=8, num_vq_embeddings=16, vq_embed_dim=4, sample_size=64)


def images(seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = []
    for w, h in SIZES:
        smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.random((1, 3, h // 8, w // 8))).float(),
                                                 size=(h, w), mode="bilinear", align_corners=False)
        noisy = (smooth + torch.from_numpy(rng.normal(0, 0.05, (1, 3, h, w))).float()).clamp(0, 1)
        out.append(torch.floor(noisy[0] * 255) / 255)  # on the 8-bit grid, as a file
    return out


def reference_reconstruction(ae: torch.nn.Module, x01: torch.Tensor) -> torch.Tensor:
    """image.py:89-119 and the PNG round trip of ImageFolder (see the module docstring)."""
    import torchvision.transforms.v2 as tf
    from diffusers import VQModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
    from torchvision.transforms.v2.functional import to_pil_image

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        latents = retrieve_latents(ae.encode(x01[None] * 2.0 - 1.0), generator=generator)
        if isinstance(ae, VQModel):
            rec = ae.decode(latents, force_not_quantize=True, return_dict=False)[0]
        else:
            rec = ae.decode(latents, return_dict=False)[0]
    rec = (rec / 2 + 0.5).clamp(0, 1)
    return tf.Compose([tf.ToImage(), tf.ToDtype(torch.float32, scale=True)])(to_pil_image(rec[0]))


def reference_lpips2(distances: Any, dist: VGGLayer2Distance, a01: torch.Tensor, b01: torch.Tensor, fp16: bool = True) -> torch.Tensor:
    """LPIPS layer 2 of the reference's _PatchedLPIPS on difffeat's trunk: [B]."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = distances._PatchedLPIPS(spatial=True, net="vgg", pnet_rand=True).eval()
    trunk = {str(i): m for i, m in enumerate(dist.features)}
    for sl in (model.net.slice1, model.net.slice2):
        for name, mod in sl.named_children():
            mod.load_state_dict(trunk[name].state_dict())
    with torch.no_grad():
        _, layers = model(a01, b01, retPerLayer=True, normalize=True)
    m = layers[1].to(torch.float16) if fp16 else layers[1]
    return m.mean((2, 3)).flatten().float()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="a jonasricker/aeroblade checkout")
    ap.add_argument("--commit", default="unknown", help="the reference's commit (for the record)")
    ap.add_argument("--write-fixture", type=Path, default=None)
    args = ap.parse_args()
    distances = import_reference(args.reference)
    dist = VGGLayer2Distance()  # random trunk, seed 0 (no weights offline)
    with tempfile.TemporaryDirectory() as tmp:
        vae = load_autoencoder(str(tiny_models.build_tiny_sd(Path(tmp) / "sd")), device="cpu", dtype="fp32")
        aes = [vae, Autoencoder(tiny_movq(), "tiny-movq")]
        imgs = images()
        ref = torch.stack([torch.stack([reference_lpips2(distances, dist, x[None], reference_reconstruction(ae.module, x)[None])[0]
                                        for ae in aes]) for x in imgs])  # [image, AE], LPIPS >= 0
        ours = torch.cat([aeroblade_distances(x[None], aes, dist) for x in imgs])
    d = (ref - ours).abs()
    row = {"method": "aeroblade", "max_abs_diff": float(d.max()), "rel_l2": float(d.norm() / ref.norm()),
           "closest_ae_agreement": float((ref.argmin(1) == ours.argmin(1)).double().mean()),
           "rank_agreement": spearman((-ref).max(1).values.numpy(), ours.min(1).values.numpy() * -1),
           "images": len(imgs), "autoencoders": [a.name.split("/")[-1] for a in aes], "reference": args.commit,
           "reconstruction": "re-implemented (image.py:89-119)", "distance": "run (_PatchedLPIPS)"}
    print(json.dumps(row))
    if args.write_fixture:  # the LPIPS-2 distance on fixed pairs, trunk = VGGLayer2Distance() (seed 0)
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(3)
        a8 = torch.randint(0, 256, (3, 3, 32, 40), generator=g, dtype=torch.uint8)
        b8 = (a8.float() + 25 * torch.randn(a8.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
        golden = reference_lpips2(distances, dist, a8.float() / 255, b8.float() / 255, fp16=False)
        meta = {"reference": f"github.com/jonasricker/aeroblade@{args.commit}",
                "command": f"python benchmarks/fidelity/aeroblade.py --reference REF --commit {args.commit} "
                           f"--write-fixture {args.write_fixture}",
                "what": "_PatchedLPIPS(net=vgg, spatial=True) layer-2 map mean (fp32) of a/255 vs b/255, trunk VGGLayer2Distance()"}
        args.write_fixture.parent.mkdir(parents=True, exist_ok=True)
        save_file({"a": a8.contiguous(), "b": b8.contiguous(), "lpips_vgg_2": golden.contiguous()}, str(args.write_fixture), metadata=meta)


if __name__ == "__main__":
    main()
