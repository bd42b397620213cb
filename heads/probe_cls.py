"""Image-level probes on pooled diffusion features: a linear probe and a cosine k-NN.

The protocol of "Diffusion Models Beat GANs on Image Classification" (Mukhopadhyay et al.
2023) and DDAE (Xiang et al., ICCV 2023): features of a chosen layer and timestep are
average-pooled to ``s × s`` and flattened, then a light classifier is fitted on frozen features
(Mukhopadhyay et al. find that block, timestep and pool size each change ImageNet top-1
by many points, hence ``difffeat sweep probe``). The k-NN follows the DINO evaluation (Caron et al. 2021):
cosine similarity, k = 20 neighbours, votes weighted by ``exp(sim / 0.07)``.

* :class:`LinearProbe` — standardisation + one linear layer. It minimises the L2-regularised
  multinomial logistic loss ``C·Σ CE + ½‖W‖²`` with scikit-learn's lbfgs on small sets and
  with full-batch L-BFGS in torch (on the GPU if there is one) on large ones: both solve the
  same objective, so the choice is only about speed.
* :class:`KNNProbe` — a faiss inner-product index on L2-normalised features (a GPU index
  when faiss has GPU support and sees a GPU).
* :class:`ProbeClassifier` — both probes plus the class names and the feature settings;
  saved as ``probe.safetensors`` + ``probe.json`` (no pickle). Loading it for other
  features raises :class:`~difffeat.errors.CheckpointMismatchError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difffeat.errors import BadInputError, CheckpointMismatchError

from .checkpoint import check_backbone, read_checkpoint, read_tensors, write_checkpoint

FORMAT, VERSION = "difffeat.probe-cls", 1
STEM = "probe"  # probe.safetensors + probe.json
WEIGHTS, CONFIG = f"{STEM}.safetensors", f"{STEM}.json"
SKLEARN_MAX_ELEMENTS = 20_000_000  # N·D up to which "auto" uses scikit-learn


def pool_features(feats: Mapping[str, torch.Tensor], size: int = 1, keys: Sequence[str] | None = None) -> torch.Tensor:
    """Adaptive-average-pool each map [B,C,h,w] to ``size × size``, flatten, concatenate -> [B, D] (fp32)."""
    if size < 1:
        raise BadInputError(f"pool size must be >= 1, got {size}")
    keys = list(keys) if keys is not None else list(feats)
    parts = [F.adaptive_avg_pool2d(feats[k].float(), size).flatten(1) for k in keys]
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------- linear probe
class LinearProbe(nn.Module):
    """``logits = W · (x - mean) / std + b`` for pooled features ``x`` [N, D]."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x.float().to(self.mean.device) - self.mean) / self.std)

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float = 1.0, backend: str = "auto",
            device: str | torch.device | None = None, max_iter: int = 1000) -> "LinearProbe":
        """Fit on features ``x`` [N, D] and labels ``y`` [N] in [0, n_classes).

        ``backend``: ``sklearn``, ``torch`` or ``auto`` (scikit-learn up to
        ``SKLEARN_MAX_ELEMENTS`` feature values, torch beyond).
        """
        x, y = x.float().cpu(), y.long().cpu()
        n, dim = x.shape
        if n != y.numel():
            raise BadInputError(f"got {n} feature rows but {y.numel()} labels")
        if len(torch.unique(y)) < 2:
            raise BadInputError("a probe needs training images of at least two classes")
        if backend == "auto":
            backend = "sklearn" if n * dim <= SKLEARN_MAX_ELEMENTS else "torch"
        if backend not in ("sklearn", "torch"):
            raise BadInputError(f"unknown probe backend {backend!r}; valid: auto, sklearn, torch")
        probe = cls(dim, n_classes)
        probe.mean.copy_(x.mean(0))
        probe.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))
        z = (x - probe.mean) / probe.std
        if backend == "sklearn":
            w, b = _fit_sklearn(z, y, n_classes, C, max_iter)
        else:
            w, b = _fit_torch(z, y, n_classes, C, max_iter, device)
        with torch.no_grad():
            probe.linear.weight.copy_(w)
            probe.linear.bias.copy_(b)
        return probe.eval()


def _fit_sklearn(z: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(C=C, max_iter=max_iter).fit(z.numpy(), y.numpy())
    coef, icpt = torch.from_numpy(lr.coef_).float(), torch.from_numpy(lr.intercept_).float()
    if coef.shape[0] == 1:  # binary: sigmoid(w·x+b) == softmax([-(w·x+b)/2, (w·x+b)/2])
        coef, icpt = torch.cat([-coef / 2, coef / 2]), torch.cat([-icpt / 2, icpt / 2])
    w = torch.zeros(n_classes, z.shape[1])
    b = torch.full((n_classes,), -1e4)  # classes absent from training are never predicted
    w[torch.from_numpy(present)] = coef
    b[torch.from_numpy(present)] = icpt
    return w, b


def _fit_torch(z: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, max_iter: int,
               device: str | torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    from difffeat.distributed import resolve_device

    dev = resolve_device(device)
    z, y = z.to(dev), y.to(dev)
    n = z.shape[0]
    w = torch.zeros(n_classes, z.shape[1], device=dev, requires_grad=True)
    b = torch.zeros(n_classes, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")
    reg = 1.0 / (2.0 * C * n)  # C·ΣCE + ½‖W‖², divided by C·N

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + reg * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().cpu(), b.detach().cpu()


# ---------------------------------------------------------------- k-NN
class KNNProbe:
    """Cosine k-NN with similarity-weighted votes (DINO: k = 20, exp(sim / 0.07))."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, n_classes: int, k: int = 20,
                 temperature: float = 0.07) -> None:
        if features.shape[0] != labels.numel():
            raise BadInputError(f"got {features.shape[0]} feature rows but {labels.numel()} labels")
        if k < 1:
            raise BadInputError(f"k must be >= 1, got {k}")
        self.features = F.normalize(features.float().cpu(), dim=1).contiguous()
        self.labels = labels.long().cpu()
        self.n_classes, self.k, self.temperature = int(n_classes), int(k), float(temperature)
        self._index: Any = None

    def index(self) -> Any:
        """The faiss inner-product index (GPU when available), built on first use."""
        if self._index is None:
            import faiss

            idx = faiss.IndexFlatIP(self.features.shape[1])
            if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                self._gpu_res = faiss.StandardGpuResources()
                idx = faiss.index_cpu_to_gpu(self._gpu_res, 0, idx)
            idx.add(self.features.numpy())
            self._index = idx
        return self._index

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Vote distributions [M, n_classes]."""
        q = F.normalize(x.float().cpu(), dim=1).contiguous().numpy()
        k = min(self.k, self.features.shape[0])
        sims, nn_idx = self.index().search(q, k)
        sims_t = torch.from_numpy(sims).float()
        votes = torch.exp((sims_t - sims_t.max(1, keepdim=True).values) / self.temperature)
        out = torch.zeros(q.shape[0], self.n_classes)
        out.scatter_add_(1, self.labels[torch.from_numpy(nn_idx).long()], votes)
        return out / out.sum(1, keepdim=True)


# ---------------------------------------------------------------- container + checkpoint
@dataclass
class ProbeClassifier:
    """Class names, the feature settings, and the fitted probes.

    ``backbone`` names the features: ``preset`` (model name), ``layers``, ``timesteps``
    and any other extractor settings (``ensemble``, ``resolution``, ``pool``, ...).
    """

    classes: list[str]
    backbone: dict[str, Any]
    linear: LinearProbe | None = None
    knn: KNNProbe | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def pool(self) -> int:
        return int(self.backbone.get("pool", 1))

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], backbone: Mapping[str, Any],
            C: float = 1.0, k: int = 20, backend: str = "auto", device: str | None = None) -> "ProbeClassifier":
        """Fit both probes on pooled features ``x`` [N, D] with labels ``y`` [N]."""
        n = len(classes)
        linear = LinearProbe.fit(x, y, n, C=C, backend=backend, device=device)
        return cls(list(classes), dict(backbone), linear, KNNProbe(x, y, n, k=k))

    def predict_proba(self, x: torch.Tensor, kind: str = "linear") -> torch.Tensor:
        """Class probabilities [N, n_classes] from the ``linear`` probe or the ``knn``."""
        if kind == "linear" and self.linear is not None:
            with torch.no_grad():
                return torch.softmax(self.linear(x), dim=1).cpu()
        if kind == "knn" and self.knn is not None:
            return self.knn.predict_proba(x)
        raise BadInputError(f"this probe checkpoint has no {kind!r} probe")

    def save(self, path: str | Path) -> Path:
        """Write ``probe.safetensors`` + ``probe.json`` into the folder ``path`` (the one checkpoint format)."""
        tensors: dict[str, torch.Tensor] = {}
        if self.linear is not None:
            tensors.update({f"linear.{k}": v.detach().float().cpu().contiguous() for k, v in self.linear.state_dict().items()})
        if self.knn is not None:
            tensors["knn.features"] = self.knn.features.half().contiguous()
            tensors["knn.labels"] = self.knn.labels.contiguous()
        config = {
            "kind": "probe", "classes": self.classes, "backbone": self.backbone, "feature_dim": self._dim(),
            "linear": None if self.linear is None else {"classes": len(self.classes)},
            "knn": None if self.knn is None else {"k": self.knn.k, "temperature": self.knn.temperature},
            "metrics": self.metrics,
        }
        return write_checkpoint(path, STEM, FORMAT, VERSION, config, tensors)

    def _dim(self) -> int:
        if self.linear is not None:
            return int(self.linear.linear.in_features)
        return int(self.knn.features.shape[1]) if self.knn is not None else 0

    @classmethod
    def load(cls, path: str | Path, expect_backbone: Mapping[str, Any] | None = None) -> "ProbeClassifier":
        """Read a probe folder; ``expect_backbone`` (preset/layers/timesteps) must match or
        :class:`CheckpointMismatchError` is raised."""
        from difffeat.validate import PROBE_SCHEMA

        config = read_checkpoint(path, STEM, FORMAT, "probe", schema=PROBE_SCHEMA)
        if expect_backbone is not None:
            check_backbone(config, expect_backbone, where=str(path))
        t = read_tensors(path, STEM, "probe")
        classes, dim = list(config["classes"]), int(config["feature_dim"])
        linear = None
        if config.get("linear") is not None:
            linear = LinearProbe(dim, len(classes))
            linear.load_state_dict({k[len("linear."):]: v for k, v in t.items() if k.startswith("linear.")})
            linear.eval()
        knn = None
        if config.get("knn") is not None:
            knn = KNNProbe(t["knn.features"].float(), t["knn.labels"], len(classes), **config["knn"])
        return cls(classes, dict(config["backbone"]), linear, knn, dict(config.get("metrics") or {}))

    def check_features(self, x: torch.Tensor) -> None:
        """Raise :class:`CheckpointMismatchError` if pooled features have the wrong width."""
        if x.shape[1] != self._dim():
            raise CheckpointMismatchError(
                f"probe was trained on {self._dim()}-d features but got {x.shape[1]}-d; "
                "use the checkpoint's model, layers, timesteps and pool size")


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of probabilities [N, K] against labels [N]."""
    return float((probs.argmax(1) == y.cpu()).float().mean()) if y.numel() else float("nan")


__all__ = ["KNNProbe", "LinearProbe", "ProbeClassifier", "accuracy", "pool_features"]
