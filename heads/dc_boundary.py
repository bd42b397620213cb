"""The stopping boundary of the Diffusion Classifier's sequential schedule.

The race (:class:`difffeat.heads.diffusion_classifier.DiffusionClassifier` with ``delta``)
looks at a paired statistic after every round of pairs and drops a class once it crosses a
boundary. Looking many times inflates the error rate, so the boundary must hold for all looks
at once. Two facts make that cheap to get right:

* **Sampling without replacement.** The n pairs seen so far are a random subset of the grid's
  N pairs, so the finite-population-corrected statistic
  ``Z_n = mean(d) / (sd(d) / sqrt(n) * sqrt((N - n) / (N - 1)))`` is, under the null of a zero
  full-grid mean and asymptotically, a standardised Brownian *bridge*; by the time change
  s = n / (N - n) it is a standardised Brownian motion at "information" s
  (:func:`information`). So successive looks are strongly correlated: corr(Z_i, Z_j) =
  sqrt(s_i / s_j) for i < j.
* **Hunter's bound.** For events A_j = {Z_j > c}, P(∪ A_j) <= Σ P(A_j) - Σ P(A_j ∩ A_{j+1})
  (Hunter 1976, "An upper bound for the probability of a union", J. Appl. Prob. 13; Worsley
  1982, Biometrika 69: the chain of consecutive looks as the spanning tree). Each
  intersection is a bivariate normal orthant, a one-dimensional integral. It is an *upper*
  bound on the crossing probability, so a constant c solving it at level alpha keeps the
  error rate at or below alpha (a Pocock-type constant boundary, Pocock 1977, Biometrika 64),
  and unlike Bonferroni over the looks it does not grow with the number of looks once they
  are dense (it tends to the up-crossing rate of the process).

The guarantee is asymptotic (Gaussian means and a plug-in sd: the CLT on 8+ pairs), which is
why the agreement with the paper schedule is also measured (tests/test_classify_sequential.py).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch

from difffeat.errors import BadInputError


def information(looks: Sequence[int], population: int) -> torch.Tensor:
    """s = n / (N - n) of each look n < N: the time at which the standardised bridge is a Brownian motion."""
    n = torch.tensor([float(v) for v in looks], dtype=torch.float64)
    return n / (float(population) - n)


def crossing_bound(c: float, info: torch.Tensor) -> float:
    """Hunter's upper bound on P(Z_j > c for some look j) of a standardised Brownian motion seen at ``info``."""
    tail = float(torch.special.ndtr(torch.tensor(-c, dtype=torch.float64)))
    if info.numel() < 2:
        return tail * info.numel()
    rho = (info[:-1] / info[1:]).sqrt()  # corr of consecutive looks
    sig = (1 - rho.square()).clamp_min(1e-300).sqrt()
    x = c + torch.linspace(0, 12, 481, dtype=torch.float64)  # P(Z1 > c, Z2 > c) = ∫_c φ(x) Φ̄((c - ρx)/σ) dx
    phi = torch.exp(-x.square() / 2) / math.sqrt(2 * math.pi)
    inner = torch.special.ndtr(-(c - rho[:, None] * x[None, :]) / sig[:, None])
    both = torch.trapezoid(phi * inner, x, dim=1)
    return float(tail * info.numel() - both.sum())


@lru_cache(maxsize=256)
def pocock_constant(alpha: float, looks: tuple[int, ...], population: int) -> float:
    """The constant c with Hunter's bound on the crossing probability equal to ``alpha`` (bisection)."""
    looks = tuple(n for n in looks if 0 < n < population)
    if not looks:
        return 0.0
    info = information(looks, population)
    lo, hi = 0.0, 40.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if crossing_bound(mid, info) > alpha else (lo, mid)
    return hi


def race_looks(stage_sizes: Sequence[int], check_every: int, min_pairs: int) -> tuple[int, ...]:
    """Pair counts at which the race may look: every ``check_every`` pairs and at each stage's end, from ``min_pairs`` on."""
    ends, total = set(), 0
    for size in stage_sizes:
        total += int(size)
        ends.add(total)
    looks = set(range(check_every, total + 1, check_every)) | ends
    return tuple(sorted(n for n in looks if n >= min_pairs))


def racing_threshold(delta: float | None, z: float | None, n_classes: int, looks: Sequence[int],
                     population: int) -> float | None:
    """The z of the race: given (``early_stop``), or from the error rate ``delta`` (None = no race).

    With ``delta``: the Pocock-type constant at level delta / (K - 1) (a union over the rivals
    that could eliminate the paper's winner) for the given looks; ``delta = 0`` is +inf (never
    drop: the paper schedule exactly).
    """
    if delta is not None and z is not None:
        raise BadInputError("give either a racing error rate (delta) or a z threshold (early_stop), not both")
    if z is not None:
        if not z >= 0:
            raise BadInputError(f"early-stop z must be >= 0, got {z}")
        return float(z)
    if delta is None:
        return None
    if not 0 <= delta < 1:
        raise BadInputError(f"racing error rate delta must be in [0, 1), got {delta}")
    if delta == 0:
        return math.inf
    return pocock_constant(float(delta) / max(1, n_classes - 1), tuple(int(n) for n in looks), int(population))


def population_strata(n_pairs: int, included: torch.Tensor, n_strata: int) -> torch.Tensor:
    """Stratum of each pair: the ``included`` pairs (in timestep order) cut into ``n_strata`` contiguous blocks; -1 elsewhere."""
    idx = torch.nonzero(included).flatten()
    H = max(1, min(int(n_strata), idx.numel()))
    out = torch.full((int(n_pairs),), -1, dtype=torch.long)
    out[idx] = torch.arange(idx.numel()) * H // max(1, idx.numel())
    return out


def stratified_mean(v: torch.Tensor, strata: torch.Tensor, sizes: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stratified estimate of each row's population mean and its variance.

    ``v`` [R, n]: R rows of values of the same n sampled pairs; ``strata`` [n] their strata;
    ``sizes`` [H] the population size N_h of each stratum. Estimate Σ_h W_h · mean_h with
    W_h = N_h / N; variance Σ_h W_h² s_h² / n_h · (1 - n_h / N_h), the without-replacement
    variance of a stratified sample (Cochran 1977, Sampling Techniques, eqs. 5.1-5.7), which
    drops the between-strata part that simple-random-sampling variance would count. A complete
    stratum is exact (no variance).
    None when some stratum is unobserved, or incomplete with fewer than two pairs seen.
    """
    H = sizes.numel()
    n_h = torch.bincount(strata, minlength=H).to(v.dtype)
    N_h = sizes.to(v.dtype)
    if bool(((n_h == 0) | ((n_h < 2) & (n_h < N_h))).any()):
        return None
    onehot = torch.nn.functional.one_hot(strata, H).to(v.dtype)  # [n, H]
    mean_h = v @ onehot / n_h  # [R, H]
    dev = v - mean_h[:, strata]
    s2_h = (dev.square() @ onehot) / (n_h - 1).clamp_min(1)
    W_h = N_h / N_h.sum()
    a_h = W_h.square() / n_h * (1 - n_h / N_h)
    return (mean_h * W_h).sum(1), (s2_h * a_h).sum(1)


__all__ = ["crossing_bound", "population_strata", "stratified_mean", "information", "pocock_constant", "race_looks", "racing_threshold"]
