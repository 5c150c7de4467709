"""Cheap evaluation's estimators: a task's search-split score from a few of its rows.

A study scores its baselines on every search row. Their per-row results, a table of models × rows, say which
rows to score for the next candidates and how to weigh them (`fit`). For one task of n rows, k of them scored:

- `mean`: k rows drawn at random with the seed; the estimate is their plain mean.
- `anchors`: the rows are clustered by their results across the scored models (k-means over the columns of the
  table; the row nearest each centroid is scored, as in tinyBenchmarks and Anchor Points), and any anchors left
  over go to the largest clusters, drawn at random inside them. A scored row stands for its share of its
  cluster: estimate = Σ_c (n_c / n) · mean(y over the r_c rows scored in cluster c).
- `irt`: the same rows, and a two-parameter logistic model fitted on the table:
  P(row j right | ability θ) = σ(a_j θ − b_j), priors θ ~ N(0, 1), log a_j ~ N(0, 1), b_j ~ N(0, 3²).
  A candidate's θ is its maximum a posteriori value on its scored rows. The estimate is the scored rows'
  results plus the model's prediction for every other row, over n: tinyBenchmarks' p-IRT. A metric outside
  [0, 1] (a perplexity) has no IRT model: its task uses `anchors`.

Every metric of a task is estimated with the anchor weights; `irt` replaces only the primary metric's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

ESTIMATORS = ("mean", "anchors", "irt")
THETA_GRID = np.linspace(-8.0, 8.0, 1601)      # a candidate's ability is searched on this grid


def rows_to_score(rows: float, n: int) -> int:
    """How many of a task's n search rows a candidate is scored on: `rows` is a fraction (<= 1) or a count."""
    k = round(rows * n) if rows <= 1 else int(rows)
    return max(1, min(n, k))


@dataclass(frozen=True)
class TaskEstimator:
    """Which of a task's n rows to score (`rows`, sorted) and how their results make the whole split's score."""

    kind: str                        # mean | anchors | irt
    n: int
    rows: tuple[int, ...]
    weights: tuple[float, ...]       # per scored row; they sum to 1
    a: tuple[float, ...] = ()        # irt: every row's discrimination and difficulty
    b: tuple[float, ...] = ()

    @property
    def whole(self) -> bool:
        return len(self.rows) == self.n

    def estimate(self, values: Sequence[float], *, primary: bool = True) -> float:
        """The whole split's mean of a metric from its values on `rows` (in that order)."""
        if len(values) != len(self.rows):
            raise ValueError(f"{len(values)} values for {len(self.rows)} scored rows")
        if self.kind == "irt" and primary and not self.whole:
            return self._irt(np.asarray(values, dtype=np.float64))
        return float(np.dot(self.weights, np.asarray(values, dtype=np.float64)))

    def ability(self, values: Sequence[float]) -> float:
        """irt: the candidate's θ, the MAP on its scored rows."""
        y = np.asarray(values, dtype=np.float64)
        idx = np.asarray(self.rows)
        a, b = np.asarray(self.a)[idx], np.asarray(self.b)[idx]
        logits = np.outer(THETA_GRID, a) - b                                  # grid × scored rows
        loglik = (y * _log_sigmoid(logits) + (1 - y) * _log_sigmoid(-logits)).sum(axis=1) - THETA_GRID ** 2 / 2
        return float(THETA_GRID[int(np.argmax(loglik))])

    def _irt(self, y: np.ndarray) -> float:
        theta = self.ability(y)
        predicted = 1.0 / (1.0 + np.exp(-(np.asarray(self.a) * theta - np.asarray(self.b))))
        scored = np.zeros(self.n, dtype=bool)
        scored[list(self.rows)] = True
        return float((y.sum() + predicted[~scored].sum()) / self.n)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "n": self.n, "rows": list(self.rows),
                               "weights": list(self.weights)}
        if self.kind == "irt":
            out |= {"a": [round(v, 6) for v in self.a], "b": [round(v, 6) for v in self.b]}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TaskEstimator":
        return cls(data["kind"], data["n"], tuple(data["rows"]), tuple(data["weights"]), tuple(data.get("a", ())),
                   tuple(data.get("b", ())))


def fit_task(kind: str, table: Sequence[Sequence[float]], count: int, *, seed: int, key: str) -> TaskEstimator:
    """The estimator of one task from its table (one list of per-row results per scored model), scoring `count`
    rows. Seeded by `seed` and the task's `key`: the same table gives the same rows and weights."""
    if kind not in ESTIMATORS:
        raise ValueError(f"unknown estimator '{kind}'")
    y = np.asarray(table, dtype=np.float64)
    if y.ndim != 2 or not y.shape[0] or not y.shape[1]:
        raise ValueError("the table needs at least one model and one row")
    n = y.shape[1]
    count = max(1, min(n, count))
    rng = random.Random(f"evomerge/estimate/{seed}/{key}")
    if count == n:
        return TaskEstimator("mean", n, tuple(range(n)), (1.0 / n,) * n)
    if kind == "mean":
        rows = tuple(sorted(rng.sample(range(n), count)))
        return TaskEstimator("mean", n, rows, (1.0 / count,) * count)
    rows, weights = anchor_rows(y, count, rng)
    if kind == "irt" and np.all((y >= 0) & (y <= 1)):
        a, b = fit_irt(y)
        return TaskEstimator("irt", n, rows, weights, tuple(a.tolist()), tuple(b.tolist()))
    return TaskEstimator("anchors", n, rows, weights)


def anchor_rows(y: np.ndarray, count: int, rng: random.Random) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """`count` rows of the models × rows table `y` and their weights: k-means over the rows' result vectors,
    one representative row per cluster, the anchors left over spread over the clusters by size (drawn inside
    them)."""
    n = y.shape[1]
    points = y.T                                   # one point per row: its results across the models
    patterns, inverse = np.unique(points, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    members = [np.flatnonzero(inverse == p) for p in range(len(patterns))]
    sizes = np.array([len(m) for m in members], dtype=np.float64)
    picked, labels = _kmeans(patterns, sizes, min(count, len(patterns)), rng)
    clusters = [np.concatenate([members[p] for p in np.flatnonzero(labels == c)]) for c in range(len(picked))]
    # each cluster's first anchor is a row of its representative pattern; the rest by largest remainder on size
    taken = [[int(rng.choice(members[p].tolist()))] for p in picked]
    left = count - len(picked)
    while left > 0:
        share = [len(c) / n * count - len(t) if len(t) < len(c) else -math.inf for c, t in zip(clusters, taken)]
        c = int(np.argmax(share))
        rest = sorted(set(clusters[c].tolist()) - set(taken[c]))
        taken[c].append(rng.choice(rest))
        left -= 1
    weight = {row: len(cluster) / n / len(chosen) for cluster, chosen in zip(clusters, taken) for row in chosen}
    rows = tuple(sorted(weight))
    return rows, tuple(weight[r] for r in rows)


def _kmeans(points: np.ndarray, sizes: np.ndarray, k: int, rng: random.Random,
            iterations: int = 50) -> tuple[list[int], np.ndarray]:
    """Weighted k-means (each point counts `sizes` times) with k-means++ seeding; each cluster is represented by
    its member nearest the centroid, as tinyBenchmarks picks its anchors. Returns those members (point indices)
    and each point's cluster."""
    u = len(points)
    if k >= u:
        return list(range(u)), np.arange(u)
    chosen = [max(range(u), key=lambda i: (sizes[i], -i))]       # the most common pattern first
    near = _sq_dist(points, points[chosen]).min(axis=1)
    while len(chosen) < k:
        weight = near * sizes
        total = float(weight.sum())
        if total <= 0:
            break
        pick = int(np.searchsorted(np.cumsum(weight), rng.random() * total, side="right"))
        pick = min(pick, u - 1)
        while weight[pick] <= 0:     # (rounding at the edge of the cumulative sum)
            pick -= 1
        chosen.append(pick)
        near = np.minimum(near, _sq_dist(points, points[[pick]])[:, 0])
    centers = points[chosen].astype(np.float64)
    labels = np.argmin(_sq_dist(points, centers), axis=1)
    for _ in range(iterations):
        for c in range(len(centers)):
            inside = labels == c
            if inside.any():
                centers[c] = np.average(points[inside], axis=0, weights=sizes[inside])
        new = np.argmin(_sq_dist(points, centers), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
    used = [c for c in range(len(centers)) if (labels == c).any()]
    remap = np.full(len(centers), -1)
    remap[used] = np.arange(len(used))
    labels = remap[labels]
    members = []
    for c, old in enumerate(used):
        inside = np.flatnonzero(labels == c)
        members.append(int(inside[int(np.argmin(_sq_dist(points[inside], centers[[old]])[:, 0]))]))
    return members, labels


def _sq_dist(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, points × centers, without a points × centers × dims array."""
    d = (x ** 2).sum(1)[:, None] + (centers ** 2).sum(1)[None, :] - 2.0 * x @ centers.T
    return np.maximum(d, 0.0)


def fit_irt(y: np.ndarray, *, steps: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A 2PL model's (a, b) per row from a models × rows table of results in [0, 1] (soft labels allowed):
    maximum a posteriori by L-BFGS in float64, from a fixed start (deterministic)."""
    import torch

    with torch.enable_grad():
        target = torch.as_tensor(y, dtype=torch.float64)
        m, n = target.shape
        model_mean = target.mean(1)
        row_mean = target.mean(0).clamp(0.02, 0.98)
        theta = ((model_mean - model_mean.mean()) / (model_mean.std(unbiased=False) + 1e-6)).clone().requires_grad_()
        log_a = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        b = (-torch.log(row_mean / (1 - row_mean))).clone().requires_grad_()
        optimizer = torch.optim.LBFGS([theta, log_a, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logits = torch.exp(log_a)[None, :] * theta[:, None] - b[None, :]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
            loss = loss + 0.5 * (theta ** 2).sum() + 0.5 * (log_a ** 2).sum() + 0.5 * ((b / 3) ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return torch.exp(log_a).detach().numpy(), b.detach().numpy()


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)
