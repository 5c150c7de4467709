"""Cheap evaluation (`search.evaluation`): a candidate is scored on a few rows of each task's search split, and
its score estimated from them (evaluate/estimate.py). Before export the finalists are re-scored on every row.

Which trials are scored on every row:
- the baselines and the user's own recipes (`search.start`), whose per-row results the estimator learns from;
- every trial numbered below `fit_at`: the baselines, and at least the first `MIN_FIT` trials. The estimator is
  fitted on them once they are all finished; a trial's scoring depends on its number only, never on timing;
- the finalists, after the search: the `finalists` best trials by estimate. A trial's value stays its
  estimate, and its full score is stored beside it on the study (`FULL_ATTR` + its number).

The fit is stored on the study (`ESTIMATOR_ATTR`, with the trials it learned from), so every worker and a
resumed run score the same rows with the same weights. The exported trial is the best by full search score
among the trials that have one: its search and held-out scores are never estimates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

from .errors import InputError
from .storage import BASELINES_ATTR

ESTIMATOR_ATTR = "cheap_estimator"
OPTIONS_ATTR = "cheap_options"
FULL_ATTR = "full:"          # + a trial number: its full search-split scores (a finalist's)
MIN_FIT = 8                  # trials scored in full, at least, before the estimator is fitted
ROWS_KEY = "rows"            # trial user attr: a fully scored trial's per-row primary results, per task
ESTIMATE_KEY = "estimate"    # trial user attr: an estimated trial's rows scored, of how many


class CheapEvaluation:
    """One study's cheap evaluation: which rows a trial scores, its estimate, and the finalists."""

    def __init__(self, config, study, evaluator) -> None:
        self.options = config.search.evaluation
        self.objectives = config.objectives
        self.seed = config.search.seed
        self.study, self.evaluator = study, evaluator
        self.file = str(config.path) if config.path else None
        self._fitted: dict[str, Any] | None = None
        self._check_same_options()

    def _check_same_options(self) -> None:
        """A study resumes only with the estimator it started with: its trials' values are its estimates."""
        now = {"rows": self.options.rows, "estimator": self.options.estimator}
        before = self.study.user_attrs.get(OPTIONS_ATTR)
        if before is None:
            self.study.set_user_attr(OPTIONS_ATTR, now)
        elif before != now:
            raise InputError(f"study '{self.study.study_name}' was started with search.evaluation rows "
                             f"{before['rows']}, estimator {before['estimator']}", file=self.file,
                             field="search.evaluation", fix="search into a new --out folder, or undo the change")

    # -- during the search ---------------------------------------------------------
    def fit_at(self) -> int:
        """The first trial number that is estimated: after the baselines, and after MIN_FIT trials at least."""
        return max(self.study.user_attrs.get(BASELINES_ATTR, 0), MIN_FIT)

    def rows_for(self, number: int, baseline: str | None) -> dict[str, list[int]] | None:
        """The rows trial `number` is scored on (task -> indices), or None for every row. A function of the
        trial's number, so that a seed's study is the same however its trials interleave."""
        if baseline is not None or number < self.fit_at():
            return None
        fitted = self.fitted()
        if not fitted:
            return None
        return {task: list(e.rows) for task, e in fitted.items()}

    def fitted(self, *, wait_s: float = 600.0) -> dict[str, Any] | None:
        """The study's estimator (task -> TaskEstimator): read from the study, or fitted on the trials before
        `fit_at` once they are all finished (waited for up to `wait_s`; None after that: score in full)."""
        from .evaluate.estimate import TaskEstimator

        if self._fitted is None:
            stored = self.study.user_attrs.get(ESTIMATOR_ATTR)
            deadline = time.monotonic() + wait_s
            while stored is None:
                stored = self._fit()
                if stored is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if stored is not None:
                self._fitted = {t: TaskEstimator.from_json(e) for t, e in stored["tasks"].items()}
        return self._fitted

    def _fit(self) -> dict[str, Any] | None:
        """Fit the estimator, once the trials numbered below `fit_at` are finished; None before."""
        from optuna.trial import TrialState

        from .evaluate.estimate import fit_task, rows_to_score

        first = self.fit_at()
        before = [t for t in self.study.get_trials(deepcopy=False) if t.number < first]
        if len(before) < first or any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in before):
            return None
        full = [t for t in before if t.state == TrialState.COMPLETE and ROWS_KEY in t.user_attrs]
        if not full:
            return {"trials": [], "tasks": {}}      # nothing to learn from: every trial is scored in full
        tasks = {}
        for task in self.evaluator.suite.names:
            table = [t.user_attrs[ROWS_KEY][task] for t in full]
            tasks[task] = fit_task(self.options.estimator, table, rows_to_score(self.options.rows, len(table[0])),
                                   seed=self.seed, key=task).to_json()
        self.study.set_user_attr(ESTIMATOR_ATTR, {"trials": [t.number for t in full], "tasks": tasks})
        return self.study.user_attrs[ESTIMATOR_ATTR]

    def scores(self, result, rows: Mapping[str, list[int]] | None) -> tuple[Any, dict[str, Any]]:
        """The result a trial is told (its estimate where it scored a subset) and the attrs it keeps."""
        if rows is None:
            return result, {ROWS_KEY: per_row(result)}
        fitted = self.fitted()
        tasks = {}
        for task, values in result.examples.items():
            estimator = fitted[task]
            primary = result.primary_metrics[task]
            tasks[task] = {m: estimator.estimate(v, primary=m == primary) for m, v in values.items()}
            tasks[task]["n"] = len(estimator.rows)
        scored = sum(len(r) for r in rows.values())
        total = sum(e.n for e in fitted.values())
        return dataclasses.replace(result, tasks=tasks), {ESTIMATE_KEY: {"rows": scored, "of": total}}

    # -- after the search ----------------------------------------------------------
    def full_values(self, frozen) -> list[float] | None:
        """A complete trial's objective values on every search row: its own where it was scored in full, a
        finalist's re-scoring, or None (an estimate only)."""
        if ESTIMATE_KEY not in frozen.user_attrs:
            return list(frozen.values)
        stored = self.study.user_attrs.get(f"{FULL_ATTR}{frozen.number}")
        return None if stored is None else stored["values"]

    def full_scores(self, frozen) -> dict[str, dict[str, float]]:
        """A trial's search-split task scores, never an estimate where a full score exists."""
        stored = self.study.user_attrs.get(f"{FULL_ATTR}{frozen.number}")
        return stored["scores"] if stored is not None else frozen.user_attrs.get("scores", {})

    def finalists(self) -> list:
        """The `finalists` best estimated trials (by the mean of their objectives; the earlier on a tie)."""
        from optuna.trial import TrialState

        estimated = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if ESTIMATE_KEY in t.user_attrs]
        estimated.sort(key=lambda t: (-sum(t.values) / len(t.values), t.number))
        return estimated[:self.options.finalists]

    def rescore_finalists(self, materialize, *, progress: bool = False) -> None:
        """Score each finalist without a full score on every search row, and keep that on the study."""
        from .evaluate.result import objective_value

        todo = [t for t in self.finalists() if f"{FULL_ATTR}{t.number}" not in self.study.user_attrs]
        for t in todo:
            started = time.perf_counter()
            materialize(t)
            result = self.evaluator.evaluate("search")
            minimized = self.evaluator.lower_is_better()
            values = [objective_value({k: result.primary(k) for k in o}, o, minimized) for o in self.objectives]
            self.study.set_user_attr(f"{FULL_ATTR}{t.number}", {"scores": result.tasks, "values": values,
                                                                ROWS_KEY: per_row(result),
                                                                "seconds": time.perf_counter() - started})
            if progress:
                print(f"finalist trial {t.number}: estimate {_mean(t.values):.4f}, full {_mean(values):.4f}",
                      flush=True)

    def best(self):
        """The complete trial best by full search score (the mean of its objectives), or None."""
        from optuna.trial import TrialState

        scored = [(t, self.full_values(t)) for t in self.study.get_trials(deepcopy=False,
                                                                          states=(TrialState.COMPLETE,))]
        scored = [(t, v) for t, v in scored if v is not None]
        if not scored:
            return None
        return max(scored, key=lambda tv: (_mean(tv[1]), -tv[0].number))[0]

    def report(self) -> list[str]:
        """summary.md's lines: rows per trial, each finalist's estimate beside its full score, the error."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        estimated = [t.user_attrs[ESTIMATE_KEY] for t in trials if ESTIMATE_KEY in t.user_attrs]
        stored = self.study.user_attrs.get(ESTIMATOR_ATTR)
        lines = ["## Cheap evaluation", ""]
        if not estimated or stored is None:
            return lines + [f"Every trial was scored on every search row (the estimator learns from {MIN_FIT} "
                            "trials scored in full, the baselines first).", ""]
        scored, total = estimated[0]["rows"], estimated[0]["of"]
        lines += [f"- {len(estimated)} complete trials scored on {scored} of {total} search rows "
                  f"({scored / total:.0%}), "
                  f"their score estimated by `{self.options.estimator}`, fitted on the {len(stored['trials'])} "
                  f"trials scored in full before them (trials {_numbers(stored['trials'])}); "
                  f"{len(trials) - len(estimated)} trials scored on every row.", ""]
        rows = []
        for t in self.finalists():
            full = self.full_values(t)
            if full is not None:
                rows.append((t.number, _mean(t.values), _mean(full)))
        if rows:
            errors = [abs(e - f) for _, e, f in rows]
            lines += ["| finalist trial | estimate | full search score | error |", "|---|---|---|---|"]
            lines += [f"| {n} | {e:.4f} | {f:.4f} | {e - f:+.4f} |" for n, e, f in rows]
            lines += ["", f"- the estimator's measured error on the finalists: mean |estimate − full| "
                          f"{sum(errors) / len(errors):.4f}, at most {max(errors):.4f} (the best estimates are "
                          "the most likely to be too high: the finalists are re-scored for that reason)", ""]
        return lines


def per_row(result) -> dict[str, list[float]]:
    """Each task's per-row primary results (what the estimator learns from), rounded for the storage."""
    return {task: [round(float(v), 6) for v in result.examples[task][result.primary_metrics[task]]]
            for task in result.tasks}


def _mean(values) -> float:
    return sum(values) / len(values)


def _numbers(numbers: list[int]) -> str:
    """'0-14, 17': consecutive runs of trial numbers."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)
