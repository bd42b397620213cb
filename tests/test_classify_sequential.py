"""The Diffusion Classifier's sequential schedule, hierarchy and schedule details (issue #16, #18).

The agreement test runs the real classifier code (noising, losses, stages, racing, ranking)
on difffeat-tiny's shapes world with 8 classes and the paper's CIFAR-10 schedule itself
((50, 500) / (5, 1): 2,650 evaluations per image for 8 classes), but replays the denoiser:
``tests/fixtures/dc_tiny_errors.safetensors`` holds difffeat-tiny's denoising error for every
(scene, class, grid timestep) of test scenes 0-191 (fp32, the classifier's own noise; built on
one H200 in 4 minutes, where it would take about 9 CPU-hours here). Scenes 0-63 are the tune
split (the -fast presets' delta and check_every were checked there); the test asserts on the
128 held-out scenes 64-191. ``test_fixture_is_the_live_model`` recomputes 16 entries with the
live model on the CPU. Rebuild: ``python tests/test_classify_sequential.py --device cuda --tf32``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import difffeat
from difffeat.errors import BadInputError
from difffeat.heads.dc_hierarchy import HierarchicalClassifier, load_tree, tree_from_dict
from difffeat.heads.diffusion_classifier import (
    DiffusionClassifier, Schedule, fit_temperature, fit_timestep_weights, stratified_order, timestep_weights,
)
from difffeat.registry import TINY_DIR

FIXTURE = Path(__file__).parent / "fixtures" / "dc_tiny_errors.safetensors"
SCHEDULE = Schedule((50, 500), (5, 1))  # the paper's CIFAR-10 schedule
FAST = dict(delta=0.05, check_every=8)  # the -fast presets' settings
HELD_OUT, AGREE_MIN, EVALS_MAX = range(64, 192), 0.98, 1 / 3  # the targets
NAMES = [str(c) for c in range(8)]


class Replay(torch.nn.Module):
    """A denoiser that returns sqrt(stored error) everywhere: with zero noise the target is 0,
    so the classifier's l2 loss of row (class c, timestep t) is the stored error of (c, t)."""

    def __init__(self, errors: torch.Tensor, grid: list[int]) -> None:
        super().__init__()
        self.errors, self.col, self.scene = errors, {t: i for i, t in enumerate(grid)}, 0
        self.calls = 0

    def forward(self, sample, timestep, class_labels=None, return_dict=False):  # type: ignore[no-untyped-def]
        cols = torch.tensor([self.col[int(t)] for t in timestep])
        e = self.errors[self.scene][class_labels, cols]
        assert not torch.isnan(e).any(), "the schedule read an entry that is not in the fixture"
        self.calls += len(timestep)
        return (e.sqrt().view(-1, 1, 1, 1).expand_as(sample).contiguous(),)


@pytest.fixture(scope="module")
def replay():  # type: ignore[no-untyped-def]
    if not (TINY_DIR / "unet").is_dir() or not FIXTURE.is_file():
        pytest.skip("difffeat-tiny or the error fixture is not installed")
    from safetensors.torch import load_file

    data = load_file(str(FIXTURE))
    bb = difffeat.load_backbone("difffeat-tiny", dtype="fp32", device="cpu")
    assert data["grid"].tolist() == SCHEDULE.grid(bb.num_train_timesteps)
    rep = Replay(data["errors"], SCHEDULE.grid(bb.num_train_timesteps))
    bb.denoiser = rep
    return bb, rep, data


def run(bb, rep, clf: DiffusionClassifier, scene: int):  # type: ignore[no-untyped-def]
    rep.scene = scene
    pairs = len(clf.grid) * clf.schedule.trials
    return clf.classify_latent(torch.zeros(3, 4, 4), f"scene{scene}", noise=torch.zeros(pairs, 3, 4, 4))


def test_sequential_agrees_with_the_paper_schedule(replay) -> None:  # type: ignore[no-untyped-def]
    bb, rep, data = replay
    paper = DiffusionClassifier(bb, NAMES, schedule=SCHEDULE, max_batch=64)
    zero = DiffusionClassifier(bb, NAMES, schedule=SCHEDULE, max_batch=64, delta=0.0, check_every=FAST["check_every"])
    fast = DiffusionClassifier(bb, NAMES, schedule=SCHEDULE, max_batch=37, **FAST)
    cap = SCHEDULE.unet_evals(8)
    agree, used, gaps, labels = 0, [], [], []
    for i in HELD_OUT:
        p, z = run(bb, rep, paper, i), run(bb, rep, zero, i)
        assert (z.classes, z.errors, z.samples, z.unet_evals) == (p.classes, p.errors, p.samples, p.unet_evals)
        calls = rep.calls
        f = run(bb, rep, fast, i)
        assert rep.calls - calls == f.unet_evals  # every evaluation reported is a denoiser call
        assert f.unet_evals <= cap and p.unet_evals == cap  # the budget is a hard cap
        agree += f.top1 == p.top1
        used.append(f.unet_evals)
        gaps.append(f.gaps)
        labels.append(f.classes.index(str(int(data["labels"][i]))) if str(int(data["labels"][i])) in f.classes else -1)
    rate, ratio = agree / len(HELD_OUT), sum(used) / (cap * len(HELD_OUT))
    msg = f"agreement {rate:.3f} ({agree}/{len(HELD_OUT)}), evaluations {ratio:.3f} of the paper schedule's {cap}"
    print(msg)
    assert rate >= AGREE_MIN and ratio <= EVALS_MAX, msg
    assert min(used) < cap  # the race does stop early
    tau = fit_temperature(gaps, labels)  # calibration with a variable number of evaluations per class
    assert math.isfinite(tau) and tau > 0


def test_fixture_is_the_live_model() -> None:
    """16 entries of the fixture recomputed with difffeat-tiny and the classifier's own noise."""
    if not (TINY_DIR / "unet").is_dir() or not FIXTURE.is_file():
        pytest.skip("difffeat-tiny or the error fixture is not installed")
    from safetensors.torch import load_file

    from difffeat.data.shapes import render

    data = load_file(str(FIXTURE))
    bb = difffeat.load_backbone("difffeat-tiny", dtype="fp32", device="cpu")
    grid = SCHEDULE.grid(bb.num_train_timesteps)
    cols = SCHEDULE.stage_indices(0, len(grid))[:2]
    w = torch.zeros(bb.num_train_timesteps)
    w[[grid[c] for c in cols]] = 1.0  # only these two timesteps are evaluated
    clf = DiffusionClassifier(bb, NAMES, schedule=Schedule((50, 500), (8, 8)), weights=w, max_batch=16)
    tables = []
    clf._prediction = lambda table, *a: tables.append(table.clone())  # type: ignore[method-assign]
    clf(render(1, split="test").images01())
    live = tables[0][:, cols]
    assert int(data["scene"][0]) == 0
    stored = data["errors"][0][:, cols]
    print("max relative difference", float(((live - stored) / stored).abs().max()))
    assert torch.allclose(live, stored, rtol=1e-3)  # the fixture: TF32 on the GPU; here fp32 on the CPU
    # the signal is the class differences (~1e-3 of the error): they must match too
    assert torch.allclose(live - live.mean(0), stored - stored.mean(0), atol=2e-2 * float((stored - stored.mean(0)).abs().max()))


def test_trials_map_each_pair_to_its_own_timestep(tiny_pixel_cls_dir: Path) -> None:
    """With trials > 1, pair p = grid index * trials + trial: every call at timestep t must
    use the noise of a pair of t (a scrambled pair -> timestep map fails here)."""
    bb = difffeat.load_backbone(str(tiny_pixel_cls_dir), dtype="fp32", device="cpu")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Spy(torch.nn.Module):
        def forward(self, sample, timestep, class_labels=None, return_dict=False):  # type: ignore[no-untyped-def]
            seen.append((sample.clone(), timestep.clone()))
            return (torch.zeros_like(sample),)

    bb.denoiser = Spy()
    sch = Schedule((2, 4), (2, 1), trials=3)
    clf = DiffusionClassifier(bb, ["0", "1", "2"], schedule=sch, max_batch=5)
    x0 = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(len(clf.grid) * 3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    clf.classify_latent(x0, noise=noise)
    for x_t, t in seen:
        for row in range(len(t)):
            ti = int(t[row])
            pairs = [clf.grid.index(ti) * 3 + j for j in range(3)]
            cand = bb.add_noise(x0.expand(3, *x0.shape), noise[pairs], torch.full((3,), ti))
            assert min(float((cand[j] - x_t[row]).abs().max()) for j in range(3)) < 1e-5
    ts = torch.cat([t for _, t in seen])
    assert sorted(set(ts.tolist())) == clf.grid and all(int((ts == g).sum()) % 3 == 0 for g in clf.grid)


def test_stratified_order_is_a_spread_permutation() -> None:
    import random

    order = stratified_order(list(range(40)), 8, random.Random(0))
    assert sorted(order) == list(range(40))
    for k in range(5):  # every sweep of 8 takes one pair from each stratum of 5
        assert sorted(p // 5 for p in order[8 * k: 8 * k + 8]) == list(range(8))


def test_race_boundary_holds_for_every_look_and_beats_bonferroni() -> None:
    """The race's constant keeps the chance that a zero-mean difference ever crosses it at or
    below alpha over all its looks (Gaussian population, sampled without replacement), and is
    lower than Bonferroni's over the same looks."""
    from statistics import NormalDist

    from difffeat.heads.dc_boundary import pocock_constant, race_looks

    N, alpha = 500, 0.05
    looks = [n for n in race_looks([50, 450], 8, 8) if n < N]
    c = pocock_constant(alpha, tuple(looks), N)
    assert c < NormalDist().inv_cdf(1 - alpha / len(looks))
    x = torch.randn(8000, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x -= x.mean(1, keepdim=True)  # the null: the full-grid mean is exactly 0
    n = torch.tensor(looks, dtype=torch.float64)
    z = (x.cumsum(1)[:, n.long() - 1] / n) / ((N - n) / (n * (N - 1))).sqrt()
    rate = float((z > c).any(1).double().mean())
    assert 0.02 < rate <= alpha + 0.005, rate  # valid, and not vacuous


def test_stratified_mean_is_exact_when_complete_and_unbiased() -> None:
    from difffeat.heads.dc_boundary import stratified_mean

    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([10, 20, 30])  # unequal strata: a swapped or unweighted stratum mean is biased
    pop = torch.cat([torch.randn(int(N), generator=g, dtype=torch.float64) + m for N, m in zip(sizes, (0.0, 5.0, -3.0))])
    strata = torch.repeat_interleave(torch.arange(3), sizes)
    starts = [0, 10, 30]
    mean, var = stratified_mean(pop[None], strata, sizes)  # type: ignore[misc]
    assert float(mean) == pytest.approx(float(pop.mean())) and float(var) == 0.0
    assert stratified_mean(pop[None, :11], strata[:11], sizes) is None  # stratum 2 unobserved
    est, vs = [], []
    for _ in range(2000):  # 3, 4 and 6 pairs of the strata, without replacement
        pick = torch.cat([st + torch.randperm(int(N), generator=g)[:k] for st, N, k in zip(starts, sizes, (3, 4, 6))])
        m, v = stratified_mean(pop[None, pick], strata[pick], sizes)  # type: ignore[misc]
        est.append(float(m))
        vs.append(float(v))
    est_t = torch.tensor(est)
    assert float(est_t.mean()) == pytest.approx(float(pop.mean()), abs=0.02)
    assert float(torch.tensor(vs).mean()) == pytest.approx(float(est_t.var()), rel=0.15)
    assert float(est_t.var()) < 0.1 * float(pop.var() / 12)  # far below simple random sampling's


# ---------------------------------------------------------------- hierarchy (HDC)
class Offsets(torch.nn.Module):
    """For x0 = 0: the exact ε plus a fixed offset per class label (l1 error = the offset);
    records the labels of every call."""

    def __init__(self, alphas: torch.Tensor, offsets: dict[int, float]) -> None:
        super().__init__()
        self.alphas, self.offsets, self.labels = alphas, offsets, []

    def forward(self, sample, timestep, class_labels=None, return_dict=False):  # type: ignore[no-untyped-def]
        self.labels += class_labels.tolist()
        eps = sample / (1 - self.alphas[timestep]).sqrt().view(-1, 1, 1, 1)
        off = torch.tensor([self.offsets[int(c)] for c in class_labels]).view(-1, 1, 1, 1)
        return (eps + off,)


TREE = {"name": "root", "children": [{"name": "3", "children": [{"name": "0"}, {"name": "1"}]},
                                     {"name": "4", "children": [{"name": "2"}]}]}


@pytest.mark.parametrize("keep, scored, winner", [(1, {3, 4, 0, 1}, "1"), (2, {0, 1, 2}, "2")])
def test_hierarchy_prunes_as_specified(tiny_pixel_cls_dir: Path, tmp_path: Path, keep: int, scored: set,
                                       winner: str) -> None:
    bb = difffeat.load_backbone(str(tiny_pixel_cls_dir), dtype="fp32", device="cpu")
    bb.denoiser = Offsets(bb.alphas_cumprod, {3: 0.0, 4: 0.1, 0: 0.05, 1: 0.02, 2: 0.0})  # leaf 2 is best, but under node 4
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(TREE))
    hdc = HierarchicalClassifier(bb, load_tree(path), keep=keep, level_schedule=Schedule((2,), (1,), "l1"),
                                 leaf_schedule=Schedule((2, 4), (2, 1), "l1"), max_batch=8)
    pred = hdc.classify_latent(torch.zeros(3, 16, 16))
    assert set(bb.denoiser.labels) == scored and pred.top1 == winner
    assert pred.unet_evals == len(bb.denoiser.labels)
    assert set(pred.classes) == {n for n in ("0", "1", "2") if int(n) in scored}  # pruned leaves are not listed


def test_cli_hierarchy(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """``difffeat classify --hierarchy``: the leaves are the classes, pruned leaves cost nothing."""
    from test_classify import labelled, run_cli

    root = labelled(tmp_path / "imgs", ["cat", "dog"], 1)
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps({"name": "r", "children": [
        {"name": "pet", "children": [{"name": "cat"}, {"name": "dog"}]}, {"name": "bird"}]}))
    out = tmp_path / "p.csv"
    r = run_cli("classify", str(root), "-m", str(tiny_sd_dir), "--hierarchy", str(tree), "--hierarchy-keep", "1",
                "--n-samples", "1,2", "--to-keep", "1,1", "--resolution", "64", "--device", "cpu", "-o", str(out))
    assert r.exit_code == 0, r.output
    import csv

    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and all(row["top1"] in ("cat", "dog", "bird") for row in rows)
    # level 1: pet vs bird on 1 timestep (2 evals); then bird alone (2 more) or cat and dog (3 more)
    import re

    m = re.search(r"denoiser evaluations per image: mean (\d+), max (\d+) \(the paper schedule: 4\)", r.output)
    assert m and 4 <= int(m.group(1)) <= int(m.group(2)) <= 5, r.output


def test_shipped_imagenet_wordnet_tree() -> None:
    import difffeat.configs

    tree = load_tree(Path(difffeat.configs.__file__).parent / "classify" / "imagenet_wordnet_tree.json")
    leaves = [n.name for n in tree.leaves()]
    assert len(leaves) == len(set(leaves)) == 1000 and {"tench", "goldfish", "missile (744)"} <= set(leaves)
    assert all(len(n.children) >= 2 for n in tree.walk() if not n.leaf)  # no single-child chains to score


def test_hierarchy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="appears twice"):
        from difffeat.heads.dc_hierarchy import check_tree

        check_tree(tree_from_dict({"name": "r", "children": [{"name": "a"}, {"name": "a"}]}))
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="cannot read hierarchy"):
        load_tree(bad)


# ---------------------------------------------------------------- timestep weights (arXiv:2505.17955)
def test_poly_and_learned_timestep_weights() -> None:
    w = timestep_weights("exp-poly:0,1", 1000)
    assert w is not None and w[0] == pytest.approx(math.exp(-1)) and w[-1] == pytest.approx(math.e)
    with pytest.raises(BadInputError, match="non-negative"):
        timestep_weights("poly:0,1", 1000)  # negative below t = 500
    # synthetic errors: only the first 10 of 40 grid timesteps tell the classes apart, the rest is noise
    g = torch.Generator().manual_seed(0)
    N, K, G = 200, 4, 40
    y = torch.randint(0, K, (N,), generator=g)
    e = torch.rand(N, K, G, generator=g)
    e[torch.arange(N), y, :10] -= 0.15
    grid = list(range(12, 1000, 25))[:G]
    w = fit_timestep_weights(e[:100], y[:100], grid, 1000, steps=300, lr=0.05)
    wg = w[grid]
    assert wg[:10].mean() > 2 * wg[10:].mean()

    def acc(weights: torch.Tensor) -> float:
        return float(((e[100:] * weights).mean(2).argmin(1) == y[100:]).float().mean())

    assert acc(wg) > acc(torch.ones(G)) + 0.05


def build_fixture(n_scenes: int, device: str = "cpu", out: Path = FIXTURE, grid_size: int = 500,
                  tf32: bool = False) -> None:
    """Recompute the error fixture: every class on every grid timestep of test scenes 0..n-1.

    fp32 with TF32 off, so that a GPU build matches the CPU (``test_fixture_is_the_live_model``);
    the noise is drawn on the CPU from the classifier's own ``(seed, image key)`` generator and
    passed in, so it is the noise a CPU run of the classifier draws. About 3,000 CPU-seconds
    per scene; a minute for 256 scenes on one H200: ``python tests/test_classify_sequential.py
    --scenes 256 --device cuda``.
    """
    import subprocess

    from safetensors.torch import save_file

    from difffeat.data.shapes import render
    from difffeat.io import image_key
    from difffeat.noise import key_seed

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    bb = difffeat.load_backbone("difffeat-tiny", dtype="fp32", device=device)
    full = Schedule((grid_size,), (8,))  # one stage, all classes: the whole table
    clf = DiffusionClassifier(bb, NAMES, schedule=full, max_batch=1000)
    tables: list[torch.Tensor] = []
    clf._prediction = lambda table, *a: tables.append(table.float().cpu())  # type: ignore[method-assign]
    b = render(n_scenes, split="test")
    x = b.images01()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": f"python tests/test_classify_sequential.py --scenes {n_scenes} --device {device}"
                       + (" --tf32" if tf32 else ""),
            "commit": commit, "table": f"all 8 classes x {len(clf.grid)} grid timesteps, loss l2",
            "model": f"difffeat-tiny fp32 (TF32 {'on' if tf32 else 'off'}) on {device}",
            "noise": "CPU generator, (seed 0, image key)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(n_scenes):
        key = image_key(x[i])
        gen = torch.Generator().manual_seed(key_seed(clf.seed, key))
        noise = torch.randn((len(clf.grid), 3, 64, 64), generator=gen)
        latent, _ = bb.encode(x[i: i + 1])
        clf.classify_latent(latent[0], key, noise=noise)
        if (i + 1) % 16 == 0 or i + 1 == n_scenes:  # saved as it goes: a cut-off build keeps its scenes
            done = len(tables)
            save_file({"errors": torch.stack(tables), "labels": b.label[:done].long(), "scene": torch.arange(done),
                       "grid": torch.tensor(clf.grid)}, str(out) + ".part", metadata=meta)
            Path(str(out) + ".part").replace(out)
            print(f"{done} scenes", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=build_fixture.__doc__)
    ap.add_argument("--scenes", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grid", type=int, default=500)
    ap.add_argument("--out", type=Path, default=FIXTURE)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 (CUDA; several times faster)")
    a = ap.parse_args()
    build_fixture(a.scenes, a.device, a.out, a.grid, a.tf32)
