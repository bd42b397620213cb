"""Zero-shot Diffusion Classifier (Li, Prabhudesai, Duggal, Brown, Pathak, ICCV 2023).

"Your Diffusion Model is Secretly a Zero-Shot Classifier": for every candidate class
``c`` estimate ``E_{t,ε} loss(target(x0, ε, t), model(x_t, t, c))`` and predict the
argmin. With Stable Diffusion 2.0 at 512² the paper reports zero-shot top-1 of 88.5 %
on CIFAR-10, 87.3 % on Oxford-IIIT Pets, 95.4 % on STL-10 and 61.4 % on ImageNet.

What this module does, following the reference code (``eval_prob_adaptive.py``):

* **Shared (t, ε) pairs.** Every class of an image is scored on the *same* noisy inputs
  ``x_t``: the variance reduction the method depends on. Noise is drawn once per image
  (one ε per grid timestep and trial) from a generator seeded by ``(seed, image key)``.
* **Evenly spaced timesteps.** With ``m = max(n_samples)`` the grid is
  ``range(T//m//2, T, T//m)``; stage ``s`` takes the strided subset
  ``grid[len//n//2 :: len//n][:n]`` and skips timesteps already evaluated, so survivors
  reuse their earlier errors (CIFAR-10's 5,1 / 50,500 schedule costs 10·50 + 5·450 =
  2,750 denoiser evaluations per image; ImageNet's costs 124,500).
* **Adaptive elimination.** After each stage the ``to_keep[s]`` classes with the lowest
  mean error (over *all* their evaluated pairs) survive.
* **Losses** ``l2`` (default), ``l1`` or ``huber`` against the model's own regression
  target (ε, v or flow velocity, through :meth:`DiffusionBackbone.target`), and optional
  per-timestep weights (Jeong et al. 2025, "Diffusion Classifiers Understand
  Compositionality, but Conditions Apply", find that the weighting matters); timesteps
  of weight 0 are never evaluated.

Efficiency: the VAE runs once per image, class embeddings are computed once per
classifier (``bb.conditioning`` caches them), all noisy inputs of a stage are built on
the device up front, and the (pair × class) rows go through ``bb.predict`` in batches
of ``max_batch`` with no host synchronisation inside a stage (one per stage, for the
top-k). ``static_batches`` pads a stage's last batch so a compiled denoiser sees one shape.

Deviations (documented, optional):

* **The sequential schedule** (``delta=``, presets ``<dataset>-fast``; off by default).
  It races the classes inside the paper's stages: a stage's pairs are visited in a
  stratified random order (:func:`stratified_order`), ``check_every`` pairs at a time for
  every alive class, and after each round a class is dropped once a paired bound says it is
  worse than the current leader (the class of lowest estimated full-grid error):
  est(d) > z·se(d) for d = e_class - e_leader per pair. A stage ends once no more than its
  ``to_keep`` classes are alive (its unvisited pairs move to the next stage); the run ends
  when one class is left or the last stage's pairs are spent, so the paper's budget is a
  hard cap (never more evaluations; ``Prediction.unet_evals`` reports those used).
  *The estimate* is the stratified one (:func:`~difffeat.heads.dc_boundary.stratified_mean`:
  the grid cut into ``check_every`` timestep strata, the without-replacement variance of
  Cochran 1977, *Sampling Techniques*, ch. 5), which leaves out the part of d's variance that
  is due to the timestep (on difffeat-tiny about a quarter to a half of it); it is exact
  (se = 0) once every stratum is complete, i.e. at n = N the full-grid comparison.
  *The threshold* z holds over all of an image's looks at once: a union over the K - 1 rivals
  and, over the looks, Hunter's bound on the correlated looks of the without-replacement
  process (:func:`~difffeat.heads.dc_boundary.pocock_constant`; lower than Bonferroni over
  the looks); with a fixed ``early_stop`` z it is the same test at that z. Why not empirical
  Bernstein (Maurer & Pontil 2009; Audibert, Munos & Szepesvári 2009; its racing use: Mnih,
  Szepesvári & Audibert 2008)? It needs a known range R of d, which denoising errors do not
  have (a range read off the data voids its guarantee), and its R/n term makes it far looser
  at the 10-100 pairs that matter here. The price: the bound is asymptotic (normal means with
  a plug-in variance), not a finite-sample guarantee; δ is therefore a nominal rate, and the
  agreement with the paper schedule is measured on held-out scenes
  (tests/test_classify_sequential.py). ``delta=0`` never drops a class: the paper's schedule
  exactly.
* Scores: a softmax over raw mean errors is nearly uniform (the maintainers recommend
  temperature scaling). Scores are a softmax over each class's *paired gap* to the top
  class (its mean error minus the top class's on the same pairs). ``temperature="auto"``
  uses the paired standard error between the two best classes, which makes the score a
  *ranking confidence*, not a calibrated probability; :func:`fit_temperature` fits a real
  temperature on labelled predictions (``difffeat classify --eval`` prints it) to pass back
  as ``temperature=``. Classes scored on fewer pairs (eliminated by a stage or dropped by
  the race) are *kept, not excluded*: their gap is the paired mean over the pairs they were
  scored on, an estimate of their full-grid gap (unbiased under the stratified random
  order), so the fit sees every listed class with a variable number of evaluations.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from difffeat.backbone import DiffusionBackbone, compile_denoiser
from difffeat.errors import BadInputError
from difffeat.io import image_key
from difffeat.noise import key_seed

from .dc_boundary import population_strata, race_looks, racing_threshold, stratified_mean

LOSSES = ("l2", "l1", "huber")


# ---------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """The adaptive schedule: per stage, timesteps per class (``n_samples``) and survivors (``to_keep``).

    ``trials`` noise draws are used per timestep (the reference's ``n_trials``).
    """

    n_samples: tuple[int, ...] = (50, 500)
    to_keep: tuple[int, ...] = (5, 1)
    loss: str = "l2"
    trials: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_samples", tuple(int(n) for n in self.n_samples))
        object.__setattr__(self, "to_keep", tuple(int(k) for k in self.to_keep))
        if not self.n_samples or len(self.n_samples) != len(self.to_keep):
            raise BadInputError(
                f"schedule needs as many n_samples as to_keep values, got {list(self.n_samples)} and {list(self.to_keep)}")
        if min(self.n_samples) < 1 or min(self.to_keep) < 1 or self.trials < 1:
            raise BadInputError("schedule values (n_samples, to_keep, trials) must be >= 1")
        if any(b > a for a, b in zip(self.to_keep, self.to_keep[1:])):
            raise BadInputError(f"to_keep must not increase from stage to stage, got {list(self.to_keep)}")
        if self.loss not in LOSSES:
            raise BadInputError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")

    def grid(self, num_train_timesteps: int) -> list[int]:
        """The evenly spaced timesteps ``range(T//m//2, T, T//m)[:m]``, m = max(n_samples)."""
        m, T = max(self.n_samples), int(num_train_timesteps)
        if m > T:
            raise BadInputError(f"n_samples {m} exceeds the model's {T} timesteps")
        return list(range(T // m // 2, T, T // m))[:m]

    def stage_indices(self, stage: int, grid_len: int) -> list[int]:
        """Grid indices of stage ``stage`` (before removing those evaluated earlier)."""
        n = self.n_samples[stage]
        step = max(1, grid_len // n)
        return list(range(step // 2, grid_len, step))[:n]

    def new_indices(self, grid_len: int) -> list[list[int]]:
        """Per stage, its grid indices that no earlier stage evaluated (survivors reuse those)."""
        seen: set[int] = set()
        out = []
        for s in range(len(self.n_samples)):
            out.append([i for i in self.stage_indices(s, grid_len) if i not in seen])
            seen.update(out[-1])
        return out

    def plan(self, n_classes: int, num_train_timesteps: int = 1000) -> list[dict[str, int]]:
        """Per stage: classes scored, new timesteps, denoiser evaluations (no weights, no early stop)."""
        alive, out = int(n_classes), []
        for new, keep in zip(self.new_indices(len(self.grid(num_train_timesteps))), self.to_keep):
            out.append({"classes": alive, "new_timesteps": len(new), "evals": alive * len(new) * self.trials})
            alive = min(keep, alive)
        return out

    def unet_evals(self, n_classes: int, num_train_timesteps: int = 1000) -> int:
        """Denoiser evaluations per image for ``n_classes`` classes (CIFAR-10: 2,750)."""
        return sum(st["evals"] for st in self.plan(n_classes, num_train_timesteps))

    def as_dict(self) -> dict[str, Any]:
        return {"n_samples": list(self.n_samples), "to_keep": list(self.to_keep), "loss": self.loss, "trials": self.trials}


def timestep_weights(spec: str | Sequence[float] | torch.Tensor | None, num_train_timesteps: int) -> torch.Tensor | None:
    """Per-timestep weights [T] from a spec; None means uniform (the paper).

    ``spec``: None / ``"uniform"``; ``"range:A-B"`` (weight 1 for A <= t < B, else 0: those
    timesteps are skipped); ``"poly:a0,a1,..."`` / ``"exp-poly:a0,a1,..."`` (w = Σ a_i τ^i,
    or its exp, with τ = 2t/(T-1) - 1 in [-1, 1]: the polynomial parametrisation of Jeong,
    Uselis, Oh, Rohrbach 2025, arXiv:2505.17955, fitted by :func:`fit_timestep_weights`); a
    path to a JSON list of T numbers; or a sequence/tensor of T.
    """
    T = int(num_train_timesteps)
    if spec is None or (isinstance(spec, str) and spec in ("", "uniform")):
        return None
    if isinstance(spec, str) and re.fullmatch(r"(exp-)?poly:.*", spec.strip()):
        kind, _, coeffs = spec.strip().partition(":")
        try:
            a = [float(v) for v in coeffs.split(",") if v.strip()]
        except ValueError:
            raise BadInputError(f"timestep weights {spec!r}: poly needs comma-separated numbers") from None
        if not a:
            raise BadInputError(f"timestep weights {spec!r}: poly needs at least one coefficient")
        spec = poly_weights(torch.tensor(a), T, positive=kind == "exp-poly")
    if isinstance(spec, str):
        m = re.fullmatch(r"range:(\d+)-(\d+)", spec.strip())
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if not 0 <= a < b <= T:
                raise BadInputError(f"timestep weight range {a}-{b} must satisfy 0 <= A < B <= {T}")
            w = torch.zeros(T)
            w[a:b] = 1.0
            return w
        path = Path(spec)
        if not path.exists():
            raise BadInputError(f"timestep weights {spec!r}: not 'uniform', 'range:A-B' or an existing JSON file")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BadInputError(f"cannot read timestep weights {path}: {e}") from None
    w = torch.as_tensor(spec, dtype=torch.float32).flatten()
    if w.numel() != T or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise BadInputError(f"timestep weights need {T} finite non-negative values, not all zero (got {w.numel()})")
    return w


def poly_weights(coeffs: torch.Tensor, num_train_timesteps: int, positive: bool = True) -> torch.Tensor:
    """w(t) = Σ a_i τ^i (exp of it if ``positive``), τ = 2t/(T-1) - 1 (arXiv:2505.17955's form)."""
    tau = torch.linspace(-1, 1, int(num_train_timesteps), dtype=coeffs.dtype)
    w = sum(c * tau ** i for i, c in enumerate(coeffs))
    return w.exp() if positive else w  # type: ignore[union-attr]


def fit_timestep_weights(errors: torch.Tensor, labels: torch.Tensor, grid: Sequence[int], num_train_timesteps: int,
                         degree: int | None = None, steps: int = 200, lr: float = 0.01, l1: float = 0.0) -> torch.Tensor:
    """Learn timestep weights on labelled data, as Jeong et al. 2025 (arXiv:2505.17955) do.

    ``errors`` [N images, K classes, G grid timesteps] (every class scored on every grid
    timestep, e.g. a one-stage schedule), ``labels`` [N] the true class index. Minimises the
    cross-entropy of softmax(-mean_g(w_g · error)) over the images, plus ``l1`` · |w|₁, with
    Adam. ``degree=None`` learns one weight per grid timestep (w = exp(θ), so positive);
    an int learns an exp-polynomial of that degree in τ (see :func:`poly_weights`). Returns
    T weights for :func:`timestep_weights` (grid values, linearly interpolated between; the
    classifier evaluates the grid only). Their finding: uniform weighting is near-optimal for
    SD 1.5/2.0, while SD3-m (flow matching) gains markedly from a learned weighting, the more
    so the larger the domain gap to the target images.
    """
    e = errors.double()
    y = torch.as_tensor(labels, dtype=torch.long)
    g = torch.as_tensor(list(grid), dtype=torch.double)
    tau = 2 * g / (num_train_timesteps - 1) - 1
    theta = torch.zeros(e.shape[2] if degree is None else degree + 1, dtype=torch.double)
    theta.requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)

    def weights() -> torch.Tensor:
        return theta.exp() if degree is None else sum(c * tau ** i for i, c in enumerate(theta)).exp()  # type: ignore[union-attr]

    for _ in range(int(steps)):
        opt.zero_grad()
        w = weights()
        loss = F.cross_entropy(-(e * w).mean(2), y) + l1 * w.abs().sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w = weights()
        full = torch.from_numpy(np.interp(np.arange(num_train_timesteps), g.numpy(), w.numpy()))
    return full.float()


def spread_order(n: int) -> list[int]:
    """A permutation of range(n) whose every prefix is spread evenly (bit-reversed order)."""
    bits = max(1, (n - 1).bit_length())
    keys = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]
    return sorted(range(n), key=lambda i: keys[i])


def stratified_order(pairs: Sequence[int], n_strata: int, rng: random.Random) -> list[int]:
    """A stratified random order of ``pairs`` (sorted, they run over [0, T)).

    The pairs are cut into ``n_strata`` contiguous strata and shuffled within each; sweep j
    takes the j-th pair of every stratum, strata visited in :func:`spread_order`. Every run of
    ``n_strata`` consecutive pairs holds one pair per stratum (proportional stratified
    sampling), so each check of the racing bound sees timesteps spread over [0, T).
    """
    ps = sorted(pairs)
    S = max(1, min(int(n_strata), len(ps)))
    strata = [ps[i * len(ps) // S:(i + 1) * len(ps) // S] for i in range(S)]
    for st in strata:
        rng.shuffle(st)
    visit = spread_order(S)
    return [strata[v][j] for j in range(max((len(st) for st in strata), default=0)) for v in visit if j < len(strata[v])]


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss per row (reference: F.mse_loss / l1_loss / huber_loss, reduction over C,H,W)."""
    dims = tuple(range(1, pred.dim()))
    if loss == "l2":
        return (pred - target).square().mean(dims)
    if loss == "l1":
        return (pred - target).abs().mean(dims)
    if loss == "huber":
        return F.huber_loss(pred, target, reduction="none").mean(dims)
    raise BadInputError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")


# ---------------------------------------------------------------- class lists
def check_class_names(names: Sequence[str]) -> list[str]:
    """Strip names; raise one line for an empty list, a duplicate or a single class."""
    out = [str(n).strip() for n in names if str(n).strip()]
    if not out:
        raise BadInputError("empty class list: give --classes 'a,b,...' or --classes-file FILE (one class per line)")
    seen: set[str] = set()
    for n in out:
        if n in seen:
            raise BadInputError(f"duplicated class {n!r} in the class list")
        seen.add(n)
    if len(out) < 2:
        raise BadInputError(f"only one class ({out[0]!r}): classification needs at least two classes")
    return out


def class_labels_for(bb: DiffusionBackbone, names: Sequence[str]) -> list[int]:
    """Class ids of a class-conditional model: integers, or names from the model's ``id2label``."""
    if all(re.fullmatch(r"\d+", n) for n in names):
        return [int(n) for n in names]
    id2label = bb.denoiser.config.get("id2label") or {}
    lookup: dict[str, int] = {}
    for i, label in id2label.items():
        for syn in str(label).split(","):
            lookup.setdefault(syn.strip().lower(), int(i))
    bad = [n for n in names if n.lower() not in lookup]
    if bad:
        raise BadInputError(
            f"{bb.name} is class-conditional: classes must be class ids 0..{int(bb.num_classes or 1) - 1}"
            f"{' or its label names' if lookup else ''}; got {bad[0]!r}")
    return [lookup[n.lower()] for n in names]


# ---------------------------------------------------------------- results
@dataclass
class Prediction:
    """The ranked classes of one image.

    ``classes`` are ranked best first: survivors of later stages before classes eliminated
    earlier, then (racing) classes scored on more pairs first, then by mean error. With
    ``candidates`` (the hierarchy) only the candidates are listed. ``errors[i]`` is the (weighted) mean loss of
    ``classes[i]`` over the ``samples[i]`` (t, ε) pairs it was scored on; ``gaps[i]`` is that
    mean minus the top class's mean over the same pairs (paired, so comparable across
    stages; 0 for the top class). ``scores`` = softmax(-gaps / temperature).
    """

    classes: list[str]
    errors: list[float]
    gaps: list[float]
    samples: list[int]
    scores: list[float]
    temperature: float
    unet_evals: int
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def top1(self) -> str:
        return self.classes[0]

    @property
    def score(self) -> float:
        return self.scores[0]

    def topk(self, k: int) -> list[tuple[str, float, float, float]]:
        """(class, mean error, gap, score) of the ``k`` best classes."""
        return list(zip(self.classes, self.errors, self.gaps, self.scores))[: max(1, k)]


def softmax_scores(errors: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(-errors / temperature) (shifted by the minimum for stability)."""
    return torch.softmax(-(errors - errors.min()) / max(float(temperature), 1e-30), dim=0)


def fit_temperature(errors: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """Temperature scaling (Guo et al. 2017) of softmax(-error/τ): the τ minimising the NLL.

    ``errors[i]`` are the error gaps (or mean errors) of image i's candidate classes (any
    number per image, e.g. its top-k) and ``labels[i]`` the index of the true class among them, or -1
    if it is not among them (those images are skipped).
    """
    rows = [(list(map(float, e)), int(y)) for e, y in zip(errors, labels) if 0 <= int(y) < len(e)]
    if not rows:
        raise BadInputError("cannot fit a temperature: no image has its true class among the scored classes")
    width = max(len(e) for e, _ in rows)
    gap = torch.full((len(rows), width), math.inf, dtype=torch.float64)  # +inf = not scored
    for i, (e, _) in enumerate(rows):
        gap[i, : len(e)] = torch.tensor(e, dtype=torch.float64) - min(e)
    y = torch.tensor([lab for _, lab in rows])
    finite = gap[torch.isfinite(gap) & (gap > 0)]
    scale = float(finite.median()) if finite.numel() else 1.0

    def nll(log_tau: float) -> float:
        return float(-torch.log_softmax(-gap / math.exp(log_tau), 1).gather(1, y[:, None]).mean())

    lo, hi = math.log(scale * 1e-3), math.log(scale * 1e3)
    step = (hi - lo) / 60
    best = min((lo + step * i for i in range(61)), key=nll)
    a, b = best - step, best + step
    for _ in range(40):  # golden-section refinement on log τ
        c, d = b - 0.618 * (b - a), a + 0.618 * (b - a)
        if nll(c) < nll(d):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)


# ---------------------------------------------------------------- the classifier
class DiffusionClassifier:
    """Zero-shot classification of images among ``classes`` with a conditional diffusion model.

    Args:
        backbone: a text-conditioned (SD, SDXL, ...) or class-conditional (pixel UNet with
            ``num_class_embeds``, DiT) :class:`DiffusionBackbone`.
        classes: class names (text models) or class ids / ``id2label`` names (class models).
        template: prompt template for text models, ``"{}"`` filled with the class name.
        prompts: explicit prompts, one per class (overrides ``template``).
        schedule: the adaptive schedule (stages, loss, trials).
        weights: per-timestep weights (see :func:`timestep_weights`).
        max_batch: denoiser rows per call (pairs × classes are flattened into rows).
        seed: noise seed; an image's noise depends on ``(seed, image content)`` only.
        temperature: score temperature (a float) or ``"auto"`` (see the module doc).
        early_stop: a fixed z threshold for racing (see ``delta``); None = off.
        delta: racing at error rate ``delta`` (the sequential schedule, see the module doc): the
            constant z whose crossing probability over the image's looks is at most
            delta / (K - 1) (Hunter's bound, :mod:`difffeat.heads.dc_boundary`). ``delta=0``
            never drops a class early, which is the paper's schedule exactly. Give ``delta`` or
            ``early_stop``.
        check_every: racing rounds: pairs scored by every alive class between two checks
            (also the number of strata of the stratified order and of the estimate).
        min_pairs: racing drops nothing before this many shared pairs (nor before every
            stratum has two).
        static_batches: pad each stage's last batch to ``max_batch`` (one shape for a
            compiled denoiser); padded rows are discarded and not counted.
        image_size: (H, W) of the inputs (SDXL size conditioning only).
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        classes: Sequence[str],
        *,
        template: str = "{}",
        prompts: Sequence[str] | None = None,
        schedule: Schedule | None = None,
        weights: torch.Tensor | None = None,
        max_batch: int = 32,
        seed: int = 0,
        temperature: float | str = "auto",
        early_stop: float | None = None,
        delta: float | None = None,
        check_every: int = 8,
        min_pairs: int = 8,
        static_batches: bool = False,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        bb = backbone
        self.backbone, self.classes = bb, check_class_names(classes)
        self.schedule = schedule or Schedule()
        self.max_batch, self.seed = max(1, int(max_batch)), int(seed)
        self.early_stop, self.delta, self.static_batches = early_stop, delta, bool(static_batches)
        self.check_every, self.min_pairs = max(1, int(check_every)), max(2, int(min_pairs))
        if not (temperature == "auto" or (isinstance(temperature, (int, float)) and temperature > 0)):
            raise BadInputError(f"temperature must be a positive number or 'auto', got {temperature!r}")
        self.temperature = temperature
        K = len(self.classes)
        if bb.text_conditioned:
            if prompts is None:
                if "{}" not in template:
                    raise BadInputError(f"prompt template {template!r} has no '{{}}' for the class name")
                prompts = [template.format(c) for c in self.classes]
            if len(prompts) != K:
                raise BadInputError(f"got {len(prompts)} prompts for {K} classes")
            self.prompts: list[str] | None = list(prompts)
            self.cond = bb.conditioning(prompts=self.prompts, batch=K, image_size=image_size)
        elif bb.num_classes:
            self.prompts = None
            self.cond = bb.conditioning(class_labels=class_labels_for(bb, self.classes), batch=K)
        else:
            raise BadInputError(
                f"{bb.name} is unconditional: zero-shot classification needs a text- or class-conditional model "
                "(train a feature probe instead: difffeat train probe)")
        T = bb.num_train_timesteps
        self.grid = self.schedule.grid(T)
        w = torch.ones(T) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.weights = None if weights is None else w  # per-timestep weights [T] as given
        if w.numel() != T:
            raise BadInputError(f"timestep weights need {T} values, got {w.numel()}")
        trials = self.schedule.trials
        # pair p = grid index * trials + trial
        self.t_of_pair = torch.tensor(self.grid, device=bb.device).repeat_interleave(trials)
        self.w_of_pair = w.to(bb.device)[self.t_of_pair]
        self._w_grid = [float(w[t]) for t in self.grid]
        # per stage, its new grid indices of non-zero weight (zero-weight timesteps are never evaluated)
        self._stage_idx = [[i for i in new if self._w_grid[i] > 0] for new in self.schedule.new_indices(len(self.grid))]
        if not self._stage_idx[0]:
            raise BadInputError("the timestep weights are zero on every timestep of the first stage")
        self._population = sum(trials for v in self._w_grid if v > 0)  # N: pairs of the full grid
        self._weight_total = float(self.w_of_pair.sum())  # W: the full grid's weight (weights are >= 0)
        self._strata = population_strata(len(self.t_of_pair), (self.w_of_pair > 0).cpu(), self.check_every).to(bb.device)
        self._stratum_sizes = torch.bincount(self._strata[self._strata >= 0])
        looks = race_looks([len(idx) * trials for idx in self._stage_idx], self.check_every, self.min_pairs)
        self._z = racing_threshold(delta, early_stop, K, looks, self._population)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def __call__(self, images: torch.Tensor, keys: Sequence[str] | None = None) -> list[Prediction]:
        """Classify images [B,3,H,W] in [0,1] (prepared to the model's size): VAE once, then per image."""
        if images.dim() == 3:
            images = images.unsqueeze(0)
        keys = list(keys) if keys is not None else [image_key(im) for im in images]
        latents, _ = self.backbone.encode(images)  # posterior mean, as the reference
        return [self.classify_latent(latents[i], keys[i]) for i in range(latents.shape[0])]

    @torch.no_grad()
    def classify_latent(self, x0: torch.Tensor, key: str = "-", noise: torch.Tensor | None = None,
                        candidates: Sequence[int] | None = None) -> Prediction:
        """Classify one encoded image ``x0`` [C,h,w]; ``key`` seeds its noise.

        ``noise``: explicit ε per pair [len(grid) * trials, C, h, w] (pair = grid index * trials +
        trial), e.g. to replay another implementation's draws; default: drawn from ``(seed, key)``.
        ``candidates``: indices into ``classes`` to score (default all; the hierarchy uses it).
        """
        bb, sch = self.backbone, self.schedule
        dev = bb.device
        x0 = x0.to(dev).float()
        n_pairs = len(self.grid) * sch.trials
        if noise is None:
            gen = torch.Generator(device=dev).manual_seed(key_seed(self.seed, key))
            noise = torch.randn((n_pairs, *x0.shape), generator=gen, device=dev)
        elif tuple(noise.shape) != (n_pairs, *x0.shape):
            raise BadInputError(f"noise must have shape {(n_pairs, *x0.shape)}, got {tuple(noise.shape)}")
        noise = noise.to(dev, torch.float32)
        rng = random.Random(key_seed(self.seed + 1, key))  # the stratified order (racing only)
        table = torch.full((len(self.classes), n_pairs), float("nan"), device=dev)  # error of (class, pair)
        alive = sorted(set(range(len(self.classes))) if candidates is None else set(int(c) for c in candidates))
        reached = [-1] * len(self.classes)  # last stage each class took part in (-1: not a candidate)
        carry: list[int] = []  # pairs of a stage that racing ended early, scored in the next one
        evals, stages = 0, []
        for s, (idx, keep) in enumerate(zip(self._stage_idx, sch.to_keep)):
            pairs = carry + [i * sch.trials + j for i in idx for j in range(sch.trials)]
            if self._z is not None:
                pairs = stratified_order(pairs, self.check_every, rng)
            keep = min(keep, len(alive))
            for k in alive:
                reached[k] = s
            start = len(alive)
            done, used, alive = self._run_stage(x0, noise, pairs, alive, table, keep)
            carry = pairs[done:]
            evals += used
            stages.append({"classes": start, "pairs": done, "evals": used, "stopped_early": done < len(pairs)})
            if keep < len(alive):
                mean = self._mean(table)
                order = mean[torch.tensor(alive, device=dev)].argsort(stable=True)[:keep].tolist()
                alive = [alive[i] for i in order]
        return self._prediction(table, reached, evals, stages)

    # ------------------------------------------------------------------ internals
    def _mean(self, table: torch.Tensor) -> torch.Tensor:
        valid = ~torch.isnan(table)
        w = self.w_of_pair.unsqueeze(0) * valid
        return (torch.nan_to_num(table) * w).sum(1) / w.sum(1).clamp_min(1e-30)

    def _run_stage(self, x0: torch.Tensor, noise: torch.Tensor, pairs: list[int], alive: list[int],
                   table: torch.Tensor, keep: int) -> tuple[int, int, list[int]]:
        """Score ``alive`` classes on ``pairs``; return (pairs done, evaluations, classes still alive).

        Without racing all pairs are scored at once. With racing they are scored ``check_every``
        at a time and :meth:`_race` drops classes between rounds; the stage ends once no more
        than ``keep`` classes are left (the remaining pairs go to the next stage).
        """
        step = self.check_every if self._z is not None else max(1, len(pairs))
        done = used = 0
        while done < len(pairs) and (self._z is None or len(alive) > keep):
            chunk = pairs[done: done + step]
            self._score(x0, noise, chunk, alive, table)
            done, used = done + len(chunk), used + len(chunk) * len(alive)
            if self._z is not None:
                alive = self._race(table, alive)
        return done, used, alive

    def _score(self, x0: torch.Tensor, noise: torch.Tensor, pairs: list[int], alive: list[int],
               table: torch.Tensor) -> None:
        """Denoising errors of every (pair, alive class) into ``table``, in batches of ``max_batch`` rows."""
        bb, dev = self.backbone, self.backbone.device
        P, Ka = len(pairs), len(alive)
        pair_ids = torch.tensor(pairs, device=dev)
        cls_ids = torch.tensor(alive, device=dev)
        t = self.t_of_pair[pair_ids]
        x0e = x0.unsqueeze(0).expand(P, *x0.shape)
        eps = noise[pair_ids]
        x_t = bb.add_noise(x0e, eps, t).to(bb.dtype)  # every noisy input of the round, built once
        target = bb.target(x0e, eps, t)  # fp32
        cond = self.cond.select(cls_ids)
        # rows pair-major: row r = (pair r // Ka, class r % Ka); classes of a pair share x_t
        row_pair = torch.arange(P, device=dev).repeat_interleave(Ka)
        row_cls = torch.arange(Ka, device=dev).repeat(P)
        R = P * Ka
        # one call per max_batch rows; a compiled denoiser (static_batches) sees max_batch rows always,
        # also in racing rounds smaller than that, so variable round sizes never recompile it
        B = self.max_batch if self.static_batches else min(self.max_batch, R)
        out = torch.empty((R,), device=dev)
        for r0 in range(0, R, B):
            r1 = min(R, r0 + B)
            rp, rc = row_pair[r0:r1], row_cls[r0:r1]
            n = r1 - r0
            if self.static_batches and n < B:
                rp = torch.cat([rp, rp[:1].expand(B - n)])
                rc = torch.cat([rc, rc[:1].expand(B - n)])
            pred = bb.predict(x_t[rp], t[rp], cond.select(rc))
            out[r0:r1] = per_sample_loss(pred[:n].float(), target[rp[:n]], self.schedule.loss)
        table[cls_ids.unsqueeze(1), pair_ids.unsqueeze(0)] = out.view(P, Ka).T

    def _race(self, table: torch.Tensor, alive: list[int]) -> list[int]:
        """Drop every alive class that a paired bound says is worse than the current leader.

        Every alive class was scored on the same n pairs so far. Per pair, v = w · e · N / W (so
        the plain population mean of v is the grid's weighted mean error, N pairs of total weight
        W). The leader l has the lowest stratified estimate (:func:`stratified_mean`, strata =
        :func:`population_strata`) of that mean; class c is dropped when the estimate of
        mean(v_c - v_l) exceeds z · its standard error, the without-replacement stratified one
        (exact, zero, once every stratum is complete: the full-grid comparison). Nothing is
        dropped before ``min_pairs`` pairs, nor while a stratum has fewer than two pairs.
        """
        if len(alive) < 2:
            return alive
        ids = torch.tensor(alive, device=table.device)
        e = table[ids].double()
        valid = ~torch.isnan(e[0])
        if int(valid.sum()) < self.min_pairs:
            return alive
        v = e[:, valid] * self.w_of_pair[valid].double() * (self._population / self._weight_total)
        strata = self._strata[valid]
        est = stratified_mean(v, strata, self._stratum_sizes)
        if est is None:
            return alive
        lead = int(est[0].argmin())
        est = stratified_mean(v - v[lead], strata, self._stratum_sizes)
        assert est is not None
        dbar, var = est
        z = float(self._z)  # type: ignore[arg-type]
        drop = (dbar > z * var.clamp_min(0).sqrt()).tolist() if math.isfinite(z) else [False] * len(alive)
        return [a for i, a in enumerate(alive) if i == lead or not drop[i]]

    def _prediction(self, table: torch.Tensor, reached: list[int], evals: int, stages: list[dict[str, Any]]) -> Prediction:
        mean = self._mean(table).cpu()
        counts = (~torch.isnan(table)).sum(1).cpu()
        cand = [k for k in range(len(self.classes)) if reached[k] >= 0]
        # later stage first, then more pairs (racing drops a class mid-stage), then lower error
        order = sorted(cand, key=lambda k: (-reached[k], -int(counts[k]), float(mean[k])))
        # gap of class k: its mean error minus the top class's over k's own pairs (the top class
        # took part in every round, so it was scored on all of them).
        diff = table - table[order[0]]
        w = self.w_of_pair.unsqueeze(0) * ~torch.isnan(diff)
        gaps = ((torch.nan_to_num(diff) * w).sum(1) / w.sum(1).clamp_min(1e-30)).cpu().double()[order]
        if self.temperature == "auto":
            tau = self._auto_temperature(table, order[0], order[1], float(mean[order[0]])) if len(order) > 1 else 1.0
        else:
            tau = float(self.temperature)
        scores = softmax_scores(gaps, tau)
        return Prediction([self.classes[k] for k in order], mean[order].double().tolist(), gaps.tolist(),
                          counts[order].tolist(), scores.tolist(), tau, evals, stages)

    def _auto_temperature(self, table: torch.Tensor, a: int, b: int, best: float) -> float:
        """Paired standard error of (error_b - error_a) over their shared pairs."""
        valid = ~torch.isnan(table[a]) & ~torch.isnan(table[b])
        w = self.w_of_pair[valid].double()
        if w.numel() < 2:
            return max(abs(best), 1e-12) * 1e-2
        d = (table[b, valid] - table[a, valid]).double()
        dbar = (d * w).sum() / w.sum()
        se = float(((w.square() * (d - dbar).square()).sum()).sqrt() / w.sum())
        return se if se > 0 else max(abs(best), 1e-12) * 1e-6


__all__ = [
    "DiffusionClassifier", "Prediction", "Schedule", "LOSSES", "check_class_names", "class_labels_for",
    "compile_denoiser", "fit_temperature", "fit_timestep_weights", "per_sample_loss", "poly_weights", "racing_threshold", "softmax_scores", "spread_order",
    "stratified_order", "timestep_weights",
]
