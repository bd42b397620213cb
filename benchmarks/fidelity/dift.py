"""DIFT (Tang et al., NeurIPS 2023) against Tsingularity/dift's own code, on the tiny SD.

Runs the reference's ``MyUNet2DConditionModel.forward`` and ``OneStepSDPipeline.__call__``
(``src/models/dift_sd.py``) on the tiny model (two shims: diffusers' moved
``unet_2d_condition`` module and a stub matplotlib), then:

1. **same eps and noise** — the reference's posterior sample and noise are re-drawn from the same
   seed and fed to difffeat's own encode / add_noise / hooked denoiser: max abs / rel L2 of the
   ``up_ft[1]`` features;
2. **ensemble statistics** — DIFT's 8-member ensemble mean (its global RNG) vs difffeat's
   ``dift``-protocol ensemble (``latent="sample"``, its per-image RNG): rel L2 between them,
   next to DIFT-vs-DIFT with two seeds (the noise floor);
3. **matching** — ``eval_spair.py``'s loop (bilinear upsample both maps to the image, cosine
   argmax of the source pixel's vector) vs ``difffeat.heads.matching.match_points`` on the same
   features: the fraction of identical predicted pixels.
"""
from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from common import diff, emit, images, parse_args, stub_modules, tiny_sd


def load_reference(path):  # type: ignore[no-untyped-def]
    import diffusers.models.unets.unet_2d_condition as moved

    sys.modules.setdefault("diffusers.models.unet_2d_condition", moved)
    sys.path.insert(0, str(path))
    with stub_modules("matplotlib", "matplotlib.pyplot"):
        from src.models import dift_sd
    return dift_sd


def reference_features(dift_sd, bb, x01, t, ensemble, seed):  # type: ignore[no-untyped-def]
    """OneStepSDPipeline.__call__ (dift_sd.py L163-188) on the image repeated ``ensemble`` times."""
    unet = bb.denoiser
    unet_forward = dift_sd.MyUNet2DConditionModel.forward.__get__(unet)  # the reference forward, bound
    pipe = types.SimpleNamespace(vae=bb.vae, scheduler=bb.scheduler, unet=unet_forward, _execution_device="cpu")
    ehs = bb.conditioning(prompts="", batch=ensemble).kwargs["encoder_hidden_states"]
    img = (x01 * 2 - 1).repeat(ensemble, 1, 1, 1)  # SDFeaturizer: (img / 255 - 0.5) * 2, repeated
    torch.manual_seed(seed)
    out = dift_sd.OneStepSDPipeline.__call__(pipe, img_tensor=img, t=t, up_ft_indices=[1], prompt_embeds=ehs)
    return out["up_ft"][1]


def same_noise(bb, ex, x01, t, seed):  # type: ignore[no-untyped-def]
    """The reference's draws (global RNG: posterior sample, then randn_like), fed to difffeat."""
    torch.manual_seed(seed)
    dist = bb.vae.encode(x01 * 2 - 1).latent_dist
    eps = torch.randn(dist.mean.shape)  # DiagonalGaussianDistribution.sample: randn of the mean's shape
    noise = torch.randn(dist.mean.shape)  # randn_like(latents), latents contiguous
    mean, std = bb.encode(x01)
    x0 = mean + std * eps
    x_t = bb.add_noise(x0, noise, torch.tensor([t]))
    cond = bb.conditioning(prompts="", batch=1)
    return ex.run_denoiser(x_t, torch.tensor([t]), cond)["up.1"]


def eval_spair_match(src_ft, trg_ft, size, points):  # type: ignore[no-untyped-def]
    """eval_spair.py L92-119: upsample both maps to the image, cosine argmax per source pixel.
    Returns the predicted (x, y) and each point's cosine map (to judge ties)."""
    src = F.interpolate(src_ft, size=size, mode="bilinear")
    trg = F.interpolate(trg_ft, size=size, mode="bilinear")
    c = trg.shape[1]
    trg_vec = F.normalize(trg.view(c, -1).T)
    out, maps = [], []
    for x, y in points.long().tolist():
        src_vec = F.normalize(src[0, :, y, x].view(1, c)).T
        cos = (trg_vec @ src_vec).view(-1)
        idx = int(cos.argmax())
        out.append((idx % size[1], idx // size[1]))
        maps.append(cos)
    return torch.tensor(out, dtype=torch.float32), torch.stack(maps)


def main() -> None:
    args = parse_args("dift", __doc__)
    import difffeat
    from difffeat.heads.matching import match_points

    dift_sd = load_reference(args.ref)
    bb = tiny_sd()
    x = images(2, 64, args.seed, second=False)
    x2 = images(2, 64, args.seed, second=True)
    t = 261
    ex = difffeat.create(bb.source, backbone=bb, layers=["up.1"], timesteps=[t], ensemble=8, latent="sample", seed=args.seed)
    with torch.no_grad():
        ref1 = reference_features(dift_sd, bb, x[:1], t, 1, args.seed)
        ours1 = same_noise(bb, ex, x[:1], t, args.seed)
        exact = diff(ours1, ref1)
        ref_a = reference_features(dift_sd, bb, x[:1], t, 8, 1).mean(0, keepdim=True)
        ref_b = reference_features(dift_sd, bb, x[:1], t, 8, 2).mean(0, keepdim=True)
        ours = ex(x[:1])["up.1"]
        src_ft, trg_ft = ref_a, reference_features(dift_sd, bb, x2[:1], t, 8, 3).mean(0, keepdim=True)
    grid = torch.stack(torch.meshgrid(torch.arange(2, 64, 6), torch.arange(2, 64, 6), indexing="xy"), -1).reshape(-1, 2).float()
    ref_pts, cos = eval_spair_match(src_ft, trg_ft, (64, 64), grid)
    our_pts = match_points(src_ft[0], trg_ft[0], grid, src_size=(64, 64), tgt_size=(64, 64)).points.round()
    same = (ref_pts == our_pts).all(1)
    ours_idx = (our_pts[:, 1] * 64 + our_pts[:, 0]).long()
    gap = (cos.max(1).values - cos.gather(1, ours_idx[:, None])[:, 0])[~same]  # reference cosine lost
    emit("dift", "Tsingularity/dift src/models/dift_sd.py + eval_spair.py", args.ref,
         max_abs=exact["max_abs"], rel_l2=exact["rel_l2"],
         ensemble_rel_l2=diff(ours, ref_a)["rel_l2"], dift_vs_dift_rel_l2=diff(ref_b, ref_a)["rel_l2"],
         agreement=f"{int(same.sum())}/{len(same)} predicted pixels identical",
         max_cos_gap_of_the_others=float(gap.max()) if len(gap) else 0.0,
         shims="diffusers module path, matplotlib stub")


if __name__ == "__main__":
    main()
