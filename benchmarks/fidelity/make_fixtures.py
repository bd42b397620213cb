"""Write the golden fixtures of tests/test_fidelity_golden.py from the reference code (run once).

    python benchmarks/fidelity/make_fixtures.py [--sd-dino PATH] [--geoaware PATH] [--diffseg PATH]

Inputs are synthetic, model-free maps (seeded; SD-like layer pyramid 4/8/16 and a 16 x 16
DINO grid; sharp per-module self-attention maps for DiffSeg), so the fixtures do not depend on
any model's random initialisation. Outputs come from the reference functions (SD-DINO's
``co_pca`` + ``pairwise_sim`` path, GeoAware-SC's ``calculate_keypoint_transformation``, and the
re-implementation of google/diffseg in diffseg.py). Each file's metadata records the reference
commit and this command.
"""
from __future__ import annotations

import argparse
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import diffseg as DS
import geoaware as GA
import sd_dino as SDD
from common import ROOT, correspondence_utils, keypoints, ref_commit

OUT = ROOT / "tests" / "fixtures" / "fidelity"
COMMAND = "python benchmarks/fidelity/make_fixtures.py"


def low_rank_maps(g: torch.Generator, c: int, side: int, rank: int = 8) -> torch.Tensor:
    """A pair's [2, c, side, side] maps: ``rank`` directions with variances 100 .. 30, noise 0.01."""
    basis = torch.linalg.qr(torch.randn(c, c, generator=g))[0][:, :rank]
    scale = torch.linspace(10.0, 5.5, rank)
    coef = torch.randn(2, side * side, rank, generator=g) * scale
    x = coef @ basis.T + 0.01 * torch.randn(2, side * side, c, generator=g) + torch.randn(c, generator=g)
    return x.permute(0, 2, 1).reshape(2, c, side, side).contiguous()


def correspondence_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"s5": low_rank_maps(g, 32, 4), "s4": low_rank_maps(g, 32, 8), "s3": low_rank_maps(g, 16, 16),
            "dino": torch.randn(2, 16, 16, 16, generator=g), "kps": keypoints(40, 224, seed)}


def sd_dino_fixture(path: Path, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    utils = correspondence_utils(path)
    sd = [x["s5"], x["s4"], x["s3"]]
    desc = SDD.reference_descriptors(utils, sd, x["dino"])
    pts = SDD.reference_match(utils, desc, x["kps"], 224, 16)
    return {**x, "ref_descriptors": desc.contiguous(), "ref_points": pts.float().contiguous()}


def geoaware_fixture(path: Path, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    utils = correspondence_utils(path)
    utils.get_flow.__defaults__ = (0, 16)
    desc = GA.reference_descriptors([x["s5"], x["s4"], x["s3"]], x["dino"])
    opts = types.SimpleNamespace(ANNO_SIZE=224, SOFT_EVAL=True, SOFT_EVAL_WINDOW=5)
    idx = torch.as_tensor(utils.kpts_to_patch_idx(opts, x["kps"], 16)).long()
    pts = utils.calculate_keypoint_transformation(opts, desc[:1], desc[1:], idx, 16)
    return {**x, "ref_similarity_rows": (desc[0][idx] @ desc[1].T).contiguous(), "ref_points": pts.float().contiguous()}


def diffseg_fixture(seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-module maps of an 8 x 8 'image' with 3-4 regions, sharp enough that many fp16 KLs are NaN."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    counts = {8: 5, 4: 5, 2: 1}  # like SD: 2 down + 3 up per level, the coarsest (mid) module alone
    for r, n in counts.items():
        yy, xx = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
        region = ((xx >= r // 2).long() + 2 * (yy >= (3 * r) // 4).long()).flatten()
        same = (region[:, None] == region[None, :]).float()
        for m in range(n):
            sharp = torch.where(region == 2, 40.0, 9.0)[:, None]  # region 2's rows underflow in fp16
            logits = sharp * same + 1.5 * torch.randn(r * r, r * r, generator=g)
            out[f"attn.r{r}.m{m}"] = torch.softmax(logits, -1)[None].contiguous()
    maps = {k: v for k, v in out.items()}
    agg = DS.aggregate_weights(DS.module_average(maps))
    G = 8
    for tau in (1.1, 0.9):
        props = DS.merge(agg, [tau] * 3, 4)
        out[f"ref_seg_tau{tau}"] = torch.from_numpy(DS.first_appearance(DS.nms(props, 32)).astype(np.int64))
    out["ref_aggregate"] = torch.from_numpy(agg.reshape(G * G, G * G)).float().contiguous()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="write tests/fixtures/fidelity/*.safetensors from the references")
    ap.add_argument("--sd-dino", type=Path, default=ROOT / ".refs" / "sd-dino")
    ap.add_argument("--geoaware", type=Path, default=ROOT / ".refs" / "GeoAware-SC")
    ap.add_argument("--diffseg", type=Path, default=ROOT / ".refs" / "diffseg")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    x = correspondence_inputs()
    jobs = (("sd_dino", "Junyi42/sd-dino", args.sd_dino, lambda: sd_dino_fixture(args.sd_dino, x)),
            ("geoaware", "Junyi42/GeoAware-SC", args.geoaware, lambda: geoaware_fixture(args.geoaware, x)),
            ("diffseg", "google/diffseg (re-implemented in benchmarks/fidelity/diffseg.py)", args.diffseg, diffseg_fixture))
    for name, repo, path, make in jobs:
        tensors = make()
        meta = {"reference": repo, "commit": ref_commit(path), "command": COMMAND}
        save_file(tensors, str(OUT / f"{name}.safetensors"), metadata=meta)
        print(name, meta, sum(t.numel() for t in tensors.values()), "values")


if __name__ == "__main__":
    main()
