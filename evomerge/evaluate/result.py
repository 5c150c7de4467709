"""The scores of one evaluation: per task, per metric, and per example."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import InputError, suggest

# A metric that scores all or nothing per example, and the metric of the same examples that gives part credit
# (generate: the share of the answer's tokens that greedy decoding, fed the answer, gets right)
PARTIAL_CREDIT = {"exact_match": "token_acc"}


@dataclass(frozen=True)
class EvalResult:
    split: str
    tasks: dict[str, dict[str, float]]  # task -> {metric: value, ..., "n": examples}
    primary_metrics: dict[str, str]
    seconds: float
    examples: dict[str, dict[str, list[float]]] = field(default_factory=dict, repr=False)  # per-example values
    # generate: each continuation; None where the fast path proved a miss without decoding it
    outputs: dict[str, list[str | None]] = field(default_factory=dict, repr=False)
    minimized: frozenset[str] = frozenset()  # tasks whose primary metric is lower-is-better (a perplexity)

    def primary(self, task: str) -> float:
        if task not in self.tasks:
            raise InputError(f"no scores for task '{task}'", field="objective",
                             fix=suggest(task, list(self.tasks)) or f"tasks: {', '.join(self.tasks)}")
        return self.tasks[task][self.primary_metrics[task]]

    def objective(self, weights: Mapping[str, float]) -> float:
        """Weighted mean of the tasks' primary metrics, to maximize: a lower-is-better metric counts negated."""
        return objective_value({t: self.primary(t) for t, w in weights.items() if w}, weights, self.minimized)

    def partial(self, weights: Mapping[str, float]) -> float:
        """The objective with part credit: each task's PARTIAL_CREDIT metric in place of its all-or-nothing
        primary one, where the task reports it (else its primary). Smooth where the objective is flat: a merge
        that gets more of each answer right scores higher before it gets more answers right."""
        def score(task: str) -> float:
            metrics = self.tasks[task] if task in self.tasks else {}
            return metrics.get(PARTIAL_CREDIT.get(self.primary_metrics.get(task, ""), ""), self.primary(task))

        return objective_value({t: score(t) for t, w in weights.items() if w}, weights, self.minimized)

    def stderr(self, task: str, metric: str | None = None) -> float:
        """Standard error of the mean of a per-example metric (NaN for fewer than 2 examples)."""
        values = self.examples.get(task, {}).get(metric or self.primary_metrics[task], [])
        n = len(values)
        if n < 2:
            return math.nan
        mean = sum(values) / n
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "tasks": {t: dict(m) for t, m in self.tasks.items()}}

    def format_table(self) -> str:
        """A plain-text table; the primary metric of each task is marked with '*'."""
        lines = [("task", "metric", "value", "± se", "n")]
        for task, metrics in self.tasks.items():
            first = True
            for metric, value in metrics.items():
                if metric == "n":
                    continue
                mark = "*" if metric == self.primary_metrics.get(task) else ""
                se = self.stderr(task, metric)
                lines.append((task if first else "", metric + mark, f"{value:.4f}", "" if math.isnan(se) else f"{se:.4f}",
                              str(int(metrics["n"])) if first else ""))
                first = False
        widths = [max(len(row[i]) for row in lines) for i in range(5)]
        text = [f"split: {self.split}  ({self.seconds:.1f} s)"]
        for i, row in enumerate(lines):
            text.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                text.append("  ".join("-" * w for w in widths))
        return "\n".join(text)


def objective_value(scores: Mapping[str, float], weights: Mapping[str, float],
                    minimized: frozenset[str] = frozenset()) -> float:
    """The search's objective for these task scores: their weighted mean, a lower-is-better one negated."""
    total = sum(weights.values())
    if not weights or total <= 0:
        raise InputError("objective weights must be non-negative with a positive sum", field="objective")
    return sum(w * scores[t] * (-1.0 if t in minimized else 1.0) for t, w in weights.items() if w) / total
