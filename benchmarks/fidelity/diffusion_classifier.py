"""Fidelity: difffeat's Diffusion Classifier against the reference ``eval_prob_adaptive``.

Runs the reference's ``eval_prob_adaptive`` (diffusion-classifier/diffusion-classifier,
``eval_prob_adaptive.py``), imported from a checkout the user gives (never fetched, never
committed), beside :class:`difffeat.heads.diffusion_classifier.DiffusionClassifier`, on the
same tiny random-weight SD, the same latent, the same text embeddings and the same noise
(the reference's ``all_noise`` re-indexed from its evaluation order to difffeat's grid
order). Prints one JSON line: the max abs difference of the per-(class, t) errors, whether
the evaluated (class, t) sets are equal, and whether the decisions agree.

    python benchmarks/fidelity/diffusion_classifier.py --reference .refs/diffusion-classifier

Only ``eval_prob_adaptive`` and ``eval_error`` are used. The reference module imports its
dataset code (``diffusion.datasets``: torchvision datasets, ``imagenetv2_pytorch``) and
``pandas`` at the top; those are stubbed here, in this process only, when they are not
installed (the reference files are not touched). :func:`load_reference` is shared with
``benchmarks/classify.py``.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[2]


def stub(name: str) -> types.ModuleType:
    """An empty module with a spec (torch._dynamo looks modules up by spec)."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return mod


def load_reference(path: str | Path) -> Callable[..., tuple[int, dict]]:
    """``eval_prob_adaptive`` from a reference checkout; its unused imports stubbed if missing."""
    ref = Path(path).resolve()
    src = ref / "eval_prob_adaptive.py"
    if not src.is_file():
        raise SystemExit(f"error: {src} not found: give --reference the diffusion-classifier checkout")
    if str(ref) not in sys.path:
        sys.path.insert(0, str(ref))
    try:
        import pandas  # noqa: F401
    except ImportError:
        sys.modules["pandas"] = stub("pandas")
    datasets = stub("diffusion.datasets")  # dataset code: not needed to score one latent
    datasets.get_target_dataset = None  # type: ignore[attr-defined]
    sys.modules["diffusion.datasets"] = datasets
    spec = importlib.util.spec_from_file_location("dc_reference_eval_prob_adaptive", src)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.eval_prob_adaptive


def reference_args(n_samples: Sequence[int], to_keep: Sequence[int], loss: str, batch_size: int, dtype: str,
                   trials: int = 1) -> argparse.Namespace:
    """The argparse namespace ``eval_prob_adaptive`` reads (SD 2.x scheduler config: T = 1000)."""
    return argparse.Namespace(n_samples=list(n_samples), to_keep=list(to_keep), loss=loss, batch_size=batch_size,
                              dtype=dtype, n_trials=trials, version="2-0")


def reference_order(schedule: Any, grid_len: int) -> list[int]:
    """Grid indices in the order the reference evaluates them (its noise index order)."""
    return [i for stage in schedule.new_indices(grid_len) for i in stage]


def noise_in_grid_order(ref_noise: torch.Tensor, schedule: Any, grid_len: int) -> torch.Tensor:
    """Re-index the reference's ``all_noise`` (evaluation order) to difffeat's pairs (grid order)."""
    tr = schedule.trials
    out = torch.empty_like(ref_noise)
    for k, gi in enumerate(reference_order(schedule, grid_len)):
        out[gi * tr:(gi + 1) * tr] = ref_noise[k * tr:(k + 1) * tr]
    return out


def recording(clf: Any) -> Any:
    """Keep the (class, pair) error table of the last image on ``clf.last_table``."""
    inner = clf._prediction

    def keep(table: torch.Tensor, *args: Any) -> Any:
        clf.last_table = table.clone()
        return inner(table, *args)

    clf._prediction = keep
    return clf


def compare(clf: Any, ref_data: dict, ref_pred: int, pred: Any) -> dict[str, Any]:
    """Max abs error difference, evaluated-set equality and decision agreement of one image."""
    tr = clf.schedule.trials
    table = clf.last_table.cpu()
    col = {t: i for i, t in enumerate(clf.grid)}
    worst, same = 0.0, True
    for k in range(len(clf.classes)):
        ref = ref_data.get(k)
        ours = {(int(clf.grid[p // tr]), p % tr): float(table[k, p]) for p in range(table.shape[1])
                if not torch.isnan(table[k, p])}
        if ref is None:
            same &= not ours
            continue
        count: dict[int, int] = {}
        theirs = {}
        for t, e in zip(ref["t"].tolist(), ref["pred_errors"].tolist()):
            j = count.get(int(t), 0)
            count[int(t)] = j + 1
            theirs[(int(t), j)] = float(e)
        same &= set(ours) == set(theirs) and all(t in col for t, _ in theirs)
        worst = max([worst] + [abs(ours[key] - theirs[key]) for key in set(ours) & set(theirs)])
    return {"max_abs_error_diff": worst, "evaluated_sets_equal": bool(same),
            "decision_agrees": clf.classes[ref_pred] == pred.top1}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="diffusion-classifier checkout (git-ignored, e.g. .refs/...)")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--n-samples", default="2,8")
    ap.add_argument("--to-keep", default="2,1")
    ap.add_argument("--loss", default="l2", choices=["l1", "l2", "huber"])
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--images", type=int, default=3)
    args = ap.parse_args(argv)
    eval_prob_adaptive = load_reference(args.reference)
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    import difffeat
    from difffeat.heads.diffusion_classifier import DiffusionClassifier, Schedule

    torch.manual_seed(0)
    bb = difffeat.load_backbone(str(tiny_models.build_tiny_sd(Path(tempfile.mkdtemp()) / "tiny-sd")), dtype="fp32",
                                device="cpu")
    sch = Schedule(tuple(int(v) for v in args.n_samples.split(",")), tuple(int(v) for v in args.to_keep.split(",")),
                   args.loss, args.trials)
    names = [f"class {i}" for i in range(args.classes)]
    clf = recording(DiffusionClassifier(bb, names, template="a photo of a {}.", schedule=sch, max_batch=7))
    embeds = clf.cond.kwargs["encoder_hidden_states"]
    alphas = types.SimpleNamespace(alphas_cumprod=bb.alphas_cumprod.detach().cpu().double().float().clone())
    rows = []
    g = torch.Generator().manual_seed(1)
    for i in range(args.images):
        x0 = bb.encode(torch.rand(1, 3, 64, 64, generator=g))[0]
        ref_noise = torch.randn((len(clf.grid) * sch.trials, *x0.shape[1:]), generator=g)
        ref_pred, ref_data = eval_prob_adaptive(bb.denoiser, x0, embeds, alphas,
                                                reference_args(sch.n_samples, sch.to_keep, sch.loss, 7, "float32",
                                                               sch.trials), x0.shape[-1], ref_noise)
        pred = clf.classify_latent(x0[0], noise=noise_in_grid_order(ref_noise, sch, len(clf.grid)))
        rows.append(compare(clf, ref_data, ref_pred, pred))
    out = {"method": "diffusion_classifier", "reference": "diffusion-classifier/eval_prob_adaptive.py",
           "model": "tiny random SD (tests/tiny_models.build_tiny_sd), fp32 CPU", "images": args.images,
           "classes": args.classes, "schedule": sch.as_dict(),
           "max_abs_error_diff": max(r["max_abs_error_diff"] for r in rows),
           "evaluated_sets_equal": all(r["evaluated_sets_equal"] for r in rows),
           "decision_agreement": sum(r["decision_agrees"] for r in rows) / len(rows)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
