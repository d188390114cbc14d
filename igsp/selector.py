"""Task-agnostic deployment: pick, per test sample, the task whose image prototypes it resembles most.

Per task: `num_prototypes` spherical k-means centroids (seeded k-means++ init, Lloyd iterations on the unit
sphere) of the L2-normalised frozen-CLIP image features of its training set. At test time a sample goes to
the task with the highest cosine similarity to any of its prototypes; if that similarity is below the task's
calibrated threshold the sample falls back to -1 (plain zero-shot CLIP, which protects Transfer on datasets
the model never trained on).

Threshold of a task = the `quantile` of its own training features' best-prototype similarity, minus `margin`.
With quantile 0.05 about 5% of a task's own *training* samples would fall back; test samples sit a little
further from prototypes fitted on the training set, so expect a slightly higher in-domain fallback rate
(a `margin` > 0 trades that against accepting out-of-domain samples). Why spherical k-means: for unit
vectors ||x - c||^2 = 2 - 2 cos(x, c), so Euclidean k-means with normalised centroids assigns by cosine,
the similarity used at selection.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["TaskSelector", "spherical_kmeans"]

logger = logging.getLogger(__name__)


def _check_features(features: object, name: str = "features", dim: int | None = None) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise TypeError(f"{name} must be a float tensor (N, D), got "
                        f"{features.dtype if isinstance(features, torch.Tensor) else type(features).__name__} "
                        f"{tuple(features.shape) if isinstance(features, torch.Tensor) else ''}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{name} must have D = {dim} (the prototypes' dimension), got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} must be finite (got NaN or inf)")
    return features


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """k unit-norm centroids (k, D) of the unit rows of x (N, D), fp32; k-means++ init from `seed`.

    Deterministic for a given (x, k, seed). An empty cluster is re-seeded with the point worst served by the
    current centroids. Stops early when assignments no longer change.
    """
    x = F.normalize(x.float(), dim=1)
    N = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, {N}] (N = number of features), got {k!r}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    # k-means++: each next seed drawn with probability proportional to its squared distance to the chosen ones.
    first = int(torch.randint(N, (1,), generator=g))
    centroids = [x[first]]
    d2 = (2 - 2 * (x @ x[first])).clamp(min=0)
    for _ in range(1, k):
        w = d2.cpu().double()
        idx = int(torch.multinomial(w / w.sum(), 1, generator=g)) if float(w.sum()) > 0 else \
            int(torch.randint(N, (1,), generator=g))
        centroids.append(x[idx])
        d2 = torch.minimum(d2, (2 - 2 * (x @ x[idx])).clamp(min=0))
    C = torch.stack(centroids)
    assign = None
    for _ in range(iters):
        sim = x @ C.T  # (N, k)
        new_assign = sim.argmax(dim=1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(C).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            worst = int(sim.max(dim=1).values.argmin())
            sums[j] = x[worst]
            assign[worst] = j
        C = F.normalize(sums, dim=1)
    return C


class TaskSelector:
    """Per-sample task selection by nearest prototypes, with a calibrated zero-shot fallback (-1).

    Args:
        num_prototypes: k-means centroids per task (fewer when the task has fewer samples), >= 1.
        quantile: the task's own training features' best-prototype similarity quantile used as threshold, in [0, 1].
        seed: k-means seed (with the task id added, so tasks do not share random draws).
        margin: subtracted from every threshold (>= 0 accepts more samples).
        iters: Lloyd iterations at most.
    """

    def __init__(self, num_prototypes: int = 5, quantile: float = 0.05, seed: int = 0, *, margin: float = 0.0,
                 iters: int = 50) -> None:
        if isinstance(num_prototypes, bool) or not isinstance(num_prototypes, int) or num_prototypes < 1:
            raise ValueError(f"num_prototypes must be an int >= 1, got {num_prototypes!r}")
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be a float in [0, 1], got {quantile!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"margin must be a float, got {margin!r}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be an int >= 1, got {iters!r}")
        self.num_prototypes = num_prototypes
        self.quantile = float(quantile)
        self.seed = int(seed)
        self.margin = float(margin)
        self.iters = iters
        self.tasks: list[int] = []
        self.prototypes: list[torch.Tensor] = []  # per task (k_t, D) fp32 unit rows, CPU
        self.thresholds: list[float] = []

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def dim(self) -> int | None:
        return self.prototypes[0].shape[1] if self.prototypes else None

    @torch.no_grad()
    def add_task(self, task: int, features: torch.Tensor) -> float:
        """Fit task `task`'s prototypes on its training features (N, D) and calibrate its threshold.

        `task` is the index the returned selections use (the router index for set_sample_tasks). Returns the
        threshold.
        """
        if isinstance(task, bool) or not isinstance(task, int) or task < 0:
            raise ValueError(f"task must be an int >= 0, got {task!r}")
        if task in self.tasks:
            raise ValueError(f"task {task} already has prototypes (tasks {self.tasks})")
        features = _check_features(features, dim=self.dim)
        if features.shape[0] < 1:
            raise ValueError("features must hold at least one sample, got 0 rows")
        x = F.normalize(features.detach().float().cpu(), dim=1)
        k = min(self.num_prototypes, x.shape[0])
        P = spherical_kmeans(x, k, iters=self.iters, seed=self.seed + task)
        best = (x @ P.T).max(dim=1).values
        threshold = float(torch.quantile(best.double(), self.quantile)) - self.margin
        self.tasks.append(task)
        self.prototypes.append(P)
        self.thresholds.append(threshold)
        logger.info("selector: task %d, %d samples, %d prototypes, threshold %.4f", task, x.shape[0], k, threshold)
        return threshold

    @torch.no_grad()
    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T) best cosine similarity of each sample to each task's prototypes (tasks in `self.tasks` order)."""
        if not self.tasks:
            raise ValueError("the selector has no tasks yet; call add_task first")
        features = _check_features(features, dim=self.dim)
        x = F.normalize(features.float(), dim=1)
        return torch.stack([(x @ P.to(x.device).T).max(dim=1).values for P in self.prototypes], dim=1)

    @torch.no_grad()
    def select(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) long: the chosen task per sample, or -1 (zero-shot) below that task's threshold or with no tasks."""
        if not self.tasks:
            features = _check_features(features)
            return torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
        sims = self.similarities(features)
        best, which = sims.max(dim=1)
        thr = torch.tensor(self.thresholds, dtype=best.dtype, device=best.device)[which]
        ids = torch.tensor(self.tasks, dtype=torch.long, device=best.device)[which]
        return torch.where(best >= thr, ids, torch.full_like(ids, -1))

    def num_parameters(self) -> int:
        """Stored numbers: prototypes (sum_t k_t * D) plus one threshold per task."""
        return sum(P.numel() for P in self.prototypes) + len(self.thresholds)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain scalars only (torch.load(weights_only=True) reads it)."""
        counts = [P.shape[0] for P in self.prototypes]
        D = self.dim or 0
        return {
            "num_prototypes": self.num_prototypes, "quantile": self.quantile, "seed": self.seed,
            "margin": self.margin, "iters": self.iters,
            "tasks": torch.tensor(self.tasks, dtype=torch.long),
            "counts": torch.tensor(counts, dtype=torch.long),
            "prototypes": torch.cat(self.prototypes) if self.prototypes else torch.zeros(0, D),
            "thresholds": torch.tensor(self.thresholds, dtype=torch.float64),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        missing = {"tasks", "counts", "prototypes", "thresholds"} - set(sd)
        if missing:
            raise KeyError(f"selector state_dict lacks {sorted(missing)}")
        counts = [int(c) for c in sd["counts"]]
        protos = sd["prototypes"].float().cpu()
        if sum(counts) != protos.shape[0] or len(counts) != len(sd["tasks"]) or len(counts) != len(sd["thresholds"]):
            raise ValueError(f"inconsistent selector state: counts {counts}, prototypes {tuple(protos.shape)}, "
                             f"tasks {len(sd['tasks'])}, thresholds {len(sd['thresholds'])}")
        for key in ("num_prototypes", "quantile", "seed", "margin", "iters"):
            if key in sd:
                setattr(self, key, type(getattr(self, key))(sd[key]))
        self.tasks = [int(t) for t in sd["tasks"]]
        self.prototypes = list(torch.split(protos, counts)) if counts else []
        self.prototypes = [P.clone() for P in self.prototypes]
        self.thresholds = [float(t) for t in sd["thresholds"]]
