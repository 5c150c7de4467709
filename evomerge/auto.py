"""`search.sampler: auto`, the default: a portfolio of optimizers, robust across merge problems.

No one optimizer wins everywhere (results/bench_search.md): the gradient learner (AdaMerging) finds the demo
zoo's per-group optimum that no sampler finds, and stalls on other zoos; a TPE over the technique as a
categorical splits its budget and, warm-started at the single best baseline, samples around a technique that
is not the best one once tuned. `auto` therefore runs, after the baselines:

1. **the gradient arm** (where it can run: task_arithmetic searched, one objective of choice / generate /
   perplexity tasks, the parameter space, resident sources): AdaMerging's trials, queued by the search
   (search.py) while they improve. It stops when `PATIENCE` of its trials in a row neither beat its best
   score nor lowered its best loss by `LOSS_GAIN`, when its first `PATIENCE` + 1 trials all stay below the
   best task_arithmetic baseline, or at `GRADIENT_SHARE` of the budget; the summary says which, and how many
   trials it kept.
2. **one arm per technique**, each a TPE of its own over that technique's parameters alone, its first
   `WARM` trials sampled around the technique's own best trial (its baselines, and for task_arithmetic the
   gradient arm's), so that a technique is judged at its best, not at its defaults. The TPE models that
   technique's trials but not the gradient arm's (a tight cluster that would be all of TPE's good points, so
   that it samples only there), each valued with part credit: its objective plus `SHAPE` times the same
   objective scored with part credit (evaluate/result.py, `partial`). An exact-match objective is flat over
   wide regions (every merge that keeps one skill whole and loses the others scores the same); part credit
   ranks those by how near they are to the next skill, which is where TPE should look. A small `SHAPE` makes
   it a tie-break: at half the objective's weight it pulled TPE away from the objective's own optimum on
   other problems (results/bench_search.md, `auto before`);
3. **successive halving** moves the budget between them: the trials left after the baselines and the
   gradient arm are cut into rounds of equal size; each round shares its trials equally among the arms still
   in, and the better half (by each technique's best search score) goes on to the next, until one arm takes
   the last round. There (and from the start, with one technique searched) every `LOCAL_EVERY`-th of its
   trials is a step around the technique's best trial (`LOCAL_SPREAD` of each range), the others its TPE's:
   on the problems where auto fell short, the last round's TPE found its best trials in the last 20 of 100,
   10-40 trials apart, in 13-21 dimensions, where a step from the best improves more often. The rounds
   before it stay TPE's alone, so the choice of technique is what it was (a step from a technique's best on
   an exact-match plateau moves nothing, and lost the LoRA adapters' task_arithmetic in its second round).

Reproducible, resumable, shared: which arm samples trial n is a function of the trials numbered before
n - LAG (samplers.LaggedSampler) and of the round decisions, which are stored on the study once made
(`ROUNDS_ATTR`), so every worker and a resumed run follow the same ones; each arm's TPE is reseeded from
(seed, n) before it samples trial n, so a trial's candidate does not depend on what this process sampled
before it (a resumed study samples the trials an uninterrupted one would).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.trial import FrozenTrial, TrialState

from .space import WARM_SPREAD, SearchSpace
from .storage import BASELINES_ATTR, BUDGET_ATTR, GRADIENT_KEY, StudyView

WARM = 3                 # an arm's first trials, around the technique's best trial
STARTUP = 3              # an arm's TPE samples at random until its technique has this many finished trials
MIN_PER_ROUND = 4        # trials per arm and round, at least
ROUNDS_ATTR = "auto_rounds"             # [[technique, ...] per round]: the arms in each round, once decided
GRADIENT_ATTR = "auto_gradient"         # the gradient arm: {"state": "running" | "stopped", "why": ..., ...}
PATIENCE = 4             # gradient trials in a row without progress before the arm stops
LOSS_GAIN = 0.02         # progress: the loss below its best so far by this share
GRADIENT_SHARE = 0.5     # of the budget after the baselines, at most, for the gradient arm
SHAPE = 0.1              # a trial's value to an arm's TPE: objective + SHAPE * its part-credit objective
LOCAL_EVERY = 2          # alone in the last round, every LOCAL_EVERY-th trial of the arm is a step around its best
LOCAL_SPREAD = 0.05      # that step's standard deviation, as a share of each parameter's range
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def is_gradient_trial(trial: FrozenTrial) -> bool:
    return GRADIENT_KEY in trial.user_attrs


class AutoSampler(BaseSampler):
    """The technique arms (module docstring): which technique samples each trial, and a TPE per technique."""

    def __init__(self, space: SearchSpace, *, seed: int, n_trials: int) -> None:
        self.space = space
        self.seed = seed
        self.n_trials = n_trials
        self.tpe = {m: optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                                  n_startup_trials=STARTUP) for m in space.methods}
        self._decided: tuple[int, str | None, dict[str, Any] | None] | None = None   # (trial, arm, warm params)
        self._seeded: int | None = None      # the trial the arms' generators were last seeded for

    # -- which arm ------------------------------------------------------------------
    def refine_method(self, study: optuna.Study, trial_number: int) -> str | None:
        """The technique that samples trial `trial_number` (None: a baseline, queued with its own)."""
        return self._decide(study, trial_number)[1]

    def _decide(self, study: optuna.Study, number: int) -> tuple[int, str | None, dict[str, Any] | None]:
        if self._decided is not None and self._decided[0] == number:
            return self._decided
        count = study.user_attrs.get(BASELINES_ATTR, 0)
        if number < count:
            self._decided = (number, None, None)
            return self._decided
        trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
        active, spent = self.current_round(study, trials, baselines=count)
        arm = self._fewest(active, spent)
        best = _best([t for t in trials if self.space.method_of(t.params, t.user_attrs) == arm])
        spread = WARM_SPREAD if spent[arm] < WARM else \
            LOCAL_SPREAD if len(active) == 1 and spent[arm] % LOCAL_EVERY == 0 else None
        warm = None
        if spread is not None and best is not None:
            warm = self.space.around(best.params, best.user_attrs, spread=spread,
                                     rng=np.random.default_rng([self.seed, number]))
            warm.pop("method", None)
        self._decided = (number, arm, warm)
        return self._decided

    def arm(self, study: optuna.Study, trials: list[FrozenTrial], *, baselines: int) -> str:
        """The technique that samples next: of the arms in the current round, the one with the fewest trials
        (ties: the config's order)."""
        return self._fewest(*self.current_round(study, trials, baselines=baselines))

    def _fewest(self, active: list[str], spent: dict[str, int]) -> str:
        return min(active, key=lambda m: (spent[m], self.space.methods.index(m)))

    def current_round(self, study: optuna.Study, trials: list[FrozenTrial], *,
                      baselines: int) -> tuple[list[str], dict[str, int]]:
        """Successive halving over the techniques: the arms in the round the trials so far are in, and each
        technique's trials after the baselines (the gradient arm's not counted)."""
        methods = self.space.methods
        after = [t for t in trials if t.number >= baselines]
        spent = {m: 0 for m in methods}
        for t in after:
            if not is_gradient_trial(t):
                spent[self.space.method_of(t.params, t.user_attrs)] += 1
        if len(methods) == 1:
            return list(methods), spent
        budget = study.user_attrs.get(BUDGET_ATTR, self.n_trials)
        left = max(0, budget - baselines - sum(1 for t in after if is_gradient_trial(t)))
        rounds = list(study.user_attrs.get(ROUNDS_ATTR, [list(methods)]))
        per_round = left / (math.ceil(math.log2(len(methods))) + 1)
        target = 0
        for r, active in enumerate(rounds):
            target += max(MIN_PER_ROUND, math.ceil(per_round / len(active)))
            if len(active) == 1 or any(spent[m] < target for m in active):
                return active, spent
            if r == len(rounds) - 1:        # every arm of the last round has had its trials: halve them
                rounds.append(self._halve(active, trials))
                study.set_user_attr(ROUNDS_ATTR, rounds)
        raise AssertionError("unreachable: the last round has one arm")

    def _halve(self, active: list[str], trials: list[FrozenTrial]) -> list[str]:
        """The better half of `active` by each technique's best finished trial (baselines and gradient arm's
        included), in the config's order."""
        def best(method: str) -> float:
            found = _best([t for t in trials if self.space.method_of(t.params, t.user_attrs) == method])
            return found.values[0] if found is not None else -math.inf

        kept = sorted(active, key=lambda m: (-best(m), self.space.methods.index(m)))[:math.ceil(len(active) / 2)]
        return [m for m in self.space.methods if m in kept]

    # -- sampling, by the arm's own TPE over its technique's trials -----------------------
    def _tpe(self, study: optuna.Study, trial: FrozenTrial) -> tuple[BaseSampler, optuna.Study] | None:
        _, arm, warm = self._decide(study, trial.number)
        if arm is None or warm is not None:
            return None
        tpe = self.tpe[arm]
        if self._seeded != trial.number:     # once per trial: its parameters draw one stream each after that
            state = np.random.SeedSequence([self.seed, trial.number]).generate_state(2)
            tpe._rng = LazyRandomState(int(state[0]))                   # (optuna 5: the TPE's and its random
            tpe._random_sampler._rng = LazyRandomState(int(state[1]))   #  sampler's generators)
            self._seeded = trial.number
        return tpe, _Modelled(study, lambda t: self.space.method_of(t.params, t.user_attrs) == arm
                              and not is_gradient_trial(t))

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if "fixed_params" in trial.system_attrs:   # a queued trial (a baseline, the gradient arm's): no sampling
            return {}
        _, arm, warm = self._decide(study, trial.number)
        return {} if arm is None or warm is not None else self.space.distributions(arm)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        picked = self._tpe(study, trial)
        if picked is None or not search_space:
            return {}
        tpe, view = picked
        return tpe.sample_relative(view, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        _, arm, warm = self._decide(study, trial.number)
        if warm is not None and param_name in warm:
            return warm[param_name]
        picked = self._tpe(study, trial)
        if picked is None:   # a baseline's parameter it does not fix (none do): at random, seeded by the trial
            rng = np.random.default_rng([self.seed, trial.number])
            return optuna.samplers.RandomSampler(seed=int(rng.integers(2**31))).sample_independent(
                study, trial, param_name, param_distribution)
        tpe, view = picked
        return tpe.sample_independent(view, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        pass     # every trial is sampled from generators seeded by (seed, trial number)


class _Modelled(StudyView):
    """An arm's view: its technique's trials, each complete one valued with part credit (module docstring)."""

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
        if self._snapshot is None:
            self._snapshot = [_with_part_credit(t) for t in super()._get_trials(deepcopy=False)]
        return super()._get_trials(deepcopy=deepcopy, states=states)


def _with_part_credit(trial: FrozenTrial) -> FrozenTrial:
    partial = trial.user_attrs.get("partial")
    if trial.state != TrialState.COMPLETE or partial is None or not math.isfinite(partial):
        return trial
    valued = copy.copy(trial)
    valued.values = [trial.values[0] + SHAPE * partial]
    return valued


def _best(trials: list[FrozenTrial]) -> FrozenTrial | None:
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return max(done, key=lambda t: (t.values[0], -t.number)) if done else None


# -- the gradient arm -----------------------------------------------------------------
def gradient_verdict(trials: list[FrozenTrial], *, budget_left: int, floor: float = -math.inf) -> str | None:
    """Why the gradient arm stops now, or None while it goes on: from its finished trials, in order. `floor`: the
    best task_arithmetic baseline's search score; an arm whose first PATIENCE + 1 trials all stay below it has
    found nothing the technique arms do not start from, and stops (on the smol zoo it never reached it)."""
    mine = sorted((t for t in trials if is_gradient_trial(t) and t.state in DONE), key=lambda t: t.number)
    if len(mine) >= budget_left:
        return f"its share of the budget ({budget_left} trials) is spent"
    if len(mine) <= PATIENCE:
        return None
    best = max((t.values[0] for t in mine if t.state == TrialState.COMPLETE), default=-math.inf)
    if best < floor:
        return (f"its first {len(mine)} trials stayed below the best task_arithmetic baseline "
                f"({best:.4f} < {floor:.4f})")
    best_value, best_loss, since = -math.inf, math.inf, 0
    for t in mine:
        value = t.values[0] if t.state == TrialState.COMPLETE else -math.inf
        loss = float(t.user_attrs.get("gradient_loss", math.inf))
        if value > best_value or loss < best_loss * (1 - LOSS_GAIN):
            since = 0
        else:
            since += 1
        best_value, best_loss = max(best_value, value), min(best_loss, loss)
    if since >= PATIENCE:
        return (f"{PATIENCE} trials in a row neither beat its best score ({best_value:.4f}) nor lowered its loss "
                f"({best_loss:.4f}) by {LOSS_GAIN:.0%}")
    return None


def gradient_budget(budget: int, baselines: int) -> int:
    """The gradient arm's trials, at most: a share of the budget after the baselines."""
    return max(PATIENCE + 1, int(GRADIENT_SHARE * max(0, budget - baselines)))
