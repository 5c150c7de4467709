"""Samplers and pruners, all seeded from the config seed.

`tpe+cmaes` picks the technique with TPE for the first part of the budget, then
refines the best technique's parameters with CMA-ES, started at the best TPE trial
of that technique. `auto` (auto.py) is the default; results/bench_search.md compares them.

Warm starts: a study that begins with baselines (search.py) goes on from the best of
them. CMA-ES starts its mean there (unless it is a source alone, see CmaEsFromAnchor);
TPE and GP sample their first few trials after the baselines around it (`WarmStart`),
so that their model holds good points early.
The anchor is chosen once and stored on the study (`ANCHOR_ATTR`), from the trials
the first trial after the baselines sees (see LaggedSampler), so every worker, a
resumed study and a study sampled ahead all start from the same one.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from .config import SearchConfig
from .space import WARM_SPREAD, SearchSpace
from .storage import BASELINES_ATTR, StudyView

REFINE_ATTR = "refine_method"
ANCHOR_ATTR = "warm_start_trial"    # the number of the baseline the warm start is centred on
LAG = 1     # a trial is sampled from the trials numbered at least LAG + 1 before it (see LaggedSampler)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_sampler(config: SearchConfig, space: SearchSpace) -> BaseSampler:
    """The config's sampler, seeded, warm-started where it models the trials, behind a LaggedSampler."""
    sampler = _sampler(config, space)
    if resolved(config) in ("tpe", "gp", "tpe+cmaes") and len(config.objectives) == 1:
        sampler = WarmStart(sampler, space, seed=config.search.seed, trials=warm_trials(config.search.n_trials))
    return LaggedSampler(sampler, lag=LAG)


def warm_trials(n_trials: int) -> int:
    """How many trials after the baselines TPE and GP sample around the best baseline: 5 of 100, 10 of 200."""
    return max(3, min(10, n_trials // 20))


def resolved(config: SearchConfig) -> str:
    """The sampler a search runs: the config's, except that `auto` with several objectives is TPE (its arms
    rank techniques by one score)."""
    sampler = config.search.sampler
    return "tpe" if sampler == "auto" and len(config.objectives) > 1 else sampler


def _sampler(config: SearchConfig, space: SearchSpace) -> BaseSampler:
    name = resolved(config)
    if name in ("tpe", "tpe+cmaes", "auto"):
        use_vectorized_truncnorm()
    return FACTORIES[name](config, space, config.search.seed, max(5, min(20, config.search.n_trials // 10)))


def _auto(config: SearchConfig, space: SearchSpace, seed: int, startup: int) -> BaseSampler:
    from .auto import AutoSampler

    return AutoSampler(space, seed=seed, n_trials=config.search.n_trials)


# name -> factory(config, space, seed, random startup trials); the names config.SAMPLERS accepts
FACTORIES: dict[str, Callable[[SearchConfig, SearchSpace, int, int], BaseSampler]] = {
    "auto": _auto,
    "tpe": lambda config, space, seed, startup: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, n_startup_trials=startup, constant_liar=True),
    "cmaes": lambda config, space, seed, startup: CmaEsFromAnchor(seed=seed, warm=len(config.objectives) == 1),
    "gp": lambda config, space, seed, startup: optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=startup, warn_independent_sampling=False),
    "random": lambda config, space, seed, startup: optuna.samplers.RandomSampler(seed=seed),
    # adamerging: its trials come queued (gradient.py, search.py); any other is at random
    "adamerging": lambda config, space, seed, startup: optuna.samplers.RandomSampler(seed=seed),
    "qmc": lambda config, space, seed, startup: optuna.samplers.QMCSampler(seed=seed, scramble=True),
    "nsga2": lambda config, space, seed, startup: optuna.samplers.NSGAIISampler(seed=seed),
    "tpe+cmaes": lambda config, space, seed, startup: TpeThenCmaEs(
        space, seed=seed, switch_after=max(startup + 1, int(config.search.n_trials * config.search.refine_after))),
}


def use_vectorized_truncnorm() -> None:
    """TPE's truncated-normal masses through scipy's vectorized `log_ndtr`/`ndtr`.

    Optuna evaluates them one Python call per element (np.frompyfunc); at a few hundred
    trials of a 20-parameter space that was half of TPE's time. Same functions, to the
    last few bits (tests/test_samplers.py compares them).
    """
    import numpy as np
    import scipy.special
    from optuna.samplers._tpe import _truncnorm

    if getattr(_truncnorm, "_evomerge_vectorized", False):
        return
    _truncnorm._log_ndtr = lambda a: scipy.special.log_ndtr(np.asarray(a, dtype=float))
    _truncnorm._ndtr = lambda a: scipy.special.ndtr(np.asarray(a, dtype=float))
    _truncnorm._evomerge_vectorized = True


class Delegating(BaseSampler):
    """A sampler that hands each call on: `route` gives the sampler that samples a trial and the study it sees;
    `own` gives the parameters the wrapper sets itself for a trial (None: it sets none). The wrappers below
    (a lagged view, a warm start, CMA-ES from an anchor) differ only in those two."""

    def route(self, study: optuna.Study, trial: FrozenTrial) -> tuple[BaseSampler, optuna.Study]:
        raise NotImplementedError

    def own(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any] | None:
        return None

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self.own(study, trial) is not None:
            return {}
        inner, view = self.route(study, trial)
        return inner.infer_relative_search_space(view, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if self.own(study, trial) is not None:
            return {}
        inner, view = self.route(study, trial)
        return inner.sample_relative(view, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        point = self.own(study, trial)
        if point is not None and param_name in point:
            return point[param_name]
        inner, view = self.route(study, trial)
        return inner.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        inner, view = self.route(study, trial)
        inner.before_trial(view, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values) -> None:
        inner, view = self.route(study, trial)
        inner.after_trial(view, trial, state, values)


class LaggedSampler(Delegating):
    """A sampler that sees only the trials numbered more than `lag` before the one it samples.

    The search samples trial n+1 while trial n is still merged and scored (in a second
    process, see evomerge/propose.py). Whether trial n has finished by then depends on
    timing; hiding it always makes the study the same for one seed, sampled ahead or not.
    """

    def __init__(self, inner: BaseSampler, *, lag: int) -> None:
        self.inner = inner
        self.lag = lag
        self._last_view: tuple[int, int, StudyView] | None = None

    def route(self, study: optuna.Study, trial: FrozenTrial) -> tuple[BaseSampler, optuna.Study]:
        """The study as the trial's sampling sees it: one snapshot for all of that trial's calls."""
        if self._last_view is None or self._last_view[:2] != (study._study_id, trial.number):
            self._last_view = (study._study_id, trial.number, before(study, trial.number - self.lag))
        return self.inner, self._last_view[2]

    def refine_method(self, study: optuna.Study, trial_number: int) -> str | None:
        """tpe+cmaes, auto: the technique that samples the trial (their refine_method), from the same view."""
        refine = getattr(self.inner, "refine_method", None)
        return refine(before(study, trial_number - self.lag), trial_number) if refine else None

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def before(study: optuna.Study, limit: int) -> StudyView:
    """The study as the trials numbered below `limit` make it."""
    return StudyView(study, lambda t: t.number < limit)


def cma_es(seed: int, *, x0: dict[str, Any] | None, independent: BaseSampler,
           startup: int) -> optuna.samplers.CmaEsSampler:
    """Optuna's CMA-ES with margin (for the parameters on a grid), its mean at `x0` (None: the ranges' centres)."""
    with warnings.catch_warnings():   # x0: deprecated in Optuna 4.9, there until 6 (pyproject pins < 6)
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.samplers.CmaEsSampler(seed=seed, with_margin=True, x0=x0, n_startup_trials=startup,
                                            warn_independent_sampling=False, independent_sampler=independent)


def anchor(study: optuna.Study, trial_number: int) -> FrozenTrial | None:
    """The baseline a warm start centres on, for the trial numbered `trial_number`; None where there is none:
    a study without baselines (or from before warm starts), a trial that is a baseline, no baseline complete.

    Chosen once, by the first trial after the baselines, as the best complete baseline it sees (ties: the
    earliest), and stored on the study: every later trial, worker and resumed run reads the same one.
    """
    count = study.user_attrs.get(BASELINES_ATTR)
    if count is None or trial_number < count:
        return None
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    chosen = study.user_attrs.get(ANCHOR_ATTR)
    if chosen is None:
        baselines = [t for t in done if t.number < count]
        if not baselines:
            return None
        best = max(baselines, key=lambda t: (t.values[0], -t.number))
        study.set_user_attr(ANCHOR_ATTR, best.number)
        return best
    return next((t for t in done if t.number == chosen), None)


class WarmStart(Delegating):
    """The first `trials` trials after the baselines sampled around the best baseline; all others by `inner`.

    Each parameter is the anchor's value plus a normal step of WARM_SPREAD of its range (clipped, on its grid),
    in the anchor's technique. The inner sampler models these trials like any others: it starts from a cluster
    of points near the best known merge rather than from the baselines' spread alone.
    """

    def __init__(self, inner: BaseSampler, space: SearchSpace, *, seed: int, trials: int) -> None:
        self.inner = inner
        self.space = space
        self.seed = seed
        self.trials = trials
        self._point: tuple[int, dict[str, Any] | None] | None = None   # (trial number, its warm parameters)

    def own(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any] | None:
        """The trial's parameters if it is a warm trial, else None; worked out once per trial."""
        if self._point is not None and self._point[0] == trial.number:
            return self._point[1]
        point = None
        count = study.user_attrs.get(BASELINES_ATTR)
        if count is not None and 0 <= trial.number - count < self.trials:
            best = anchor(study, trial.number)
            if best is not None:
                point = self.space.around(best.params, best.user_attrs, spread=WARM_SPREAD,
                                          rng=np.random.default_rng([self.seed, trial.number]))
        self._point = (trial.number, point)
        return point

    def route(self, study: optuna.Study, trial: FrozenTrial) -> tuple[BaseSampler, optuna.Study]:
        return self.inner, study

    def refine_method(self, study: optuna.Study, trial_number: int) -> str | None:
        refine = getattr(self.inner, "refine_method", None)
        return refine(study, trial_number) if refine else None

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


class CmaEsFromAnchor(Delegating):
    """CMA-ES over one technique; in a study with baselines its mean starts at the best of them, unless that
    is a source alone.

    The baselines' own parameters are fixed (queued), so no CMA-ES runs before them: its first generation is
    the first trial after them, around the anchor, with CMA-ES's own step size. A source alone is a corner of
    the space (one weight 1, the others 0), where half of each step falls outside the ranges, and it says
    nothing about where merges are good: there, and without baselines, CMA-ES starts at the ranges' centres
    (which did better, measured where the best baseline was a source alone).
    """

    def __init__(self, *, seed: int, warm: bool = True) -> None:
        self.seed = seed
        self.warm = warm
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._plain = self._cma(None)
        self._from_anchor: optuna.samplers.CmaEsSampler | None = None

    def _cma(self, x0: dict[str, Any] | None) -> optuna.samplers.CmaEsSampler:
        return cma_es(self.seed, x0=x0, independent=self._random, startup=1 if x0 is None else 0)

    def route(self, study: optuna.Study, trial: FrozenTrial) -> tuple[BaseSampler, optuna.Study]:
        if self._from_anchor is not None:
            return self._from_anchor, study
        count = study.user_attrs.get(BASELINES_ATTR) if self.warm else None
        if count is None:
            return self._plain, study
        if trial.number < count:
            return self._random, study   # a baseline: its parameters are fixed, no CMA-ES state is stored with it
        best = anchor(study, trial.number)
        if best is None or str(best.user_attrs.get("baseline", "")).startswith("source:"):
            self.warm = False
            return self._plain, study
        self._from_anchor = self._cma(dict(best.params))
        return self._from_anchor, study

    def reseed_rng(self) -> None:
        self._random.reseed_rng()


def make_pruner(config: SearchConfig) -> optuna.pruners.BasePruner:
    name = config.search.pruner
    if name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=16)
    if name == "median":
        return PartialMeanMedianPruner(n_startup_trials=5, n_warmup_steps=8)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


class PartialMeanMedianPruner(optuna.pruners.BasePruner):
    """Prune a trial whose mean score over the examples scored so far is below the median of the
    finished trials' means over the same examples.

    Optuna's MedianPruner compares the best intermediate value a trial has reported, which suits
    training curves; a running mean over examples is not a curve that improves, and its best is
    often its first few examples, so that pruner never fired here.
    """

    def __init__(self, *, n_startup_trials: int, n_warmup_steps: int) -> None:
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return False
        done = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if step in t.intermediate_values]
        if len(done) < self.n_startup_trials:
            return False
        median = float(np.median(done))
        value = trial.intermediate_values[step]
        return value > median if study.direction == optuna.study.StudyDirection.MINIMIZE else value < median


class TpeThenCmaEs(BaseSampler):
    """TPE over the whole conditional space, then CMA-ES inside the best technique.

    The technique for the refine phase is fixed at the switch (stored on the study)
    so that every worker of a distributed study refines the same one.
    """

    def __init__(self, space: SearchSpace, *, seed: int, switch_after: int) -> None:
        self.space = space
        self.seed = seed
        self.switch_after = switch_after
        self.tpe = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                              n_startup_trials=max(5, min(20, switch_after // 3)))
        self._cma: optuna.samplers.CmaEsSampler | None = None
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._refined: str | None = None                    # the technique, once the switch is made
        self._decided: tuple[int, str | None] | None = None  # (trial number, decision) for the trial sampled now

    def refine_method(self, study: optuna.Study, trial_number: int | None = None) -> str | None:
        """The technique being refined, or None while TPE still explores.

        Decided once per trial (the sampler asks many times while it samples one) and
        for good once the switch is made: each decision reads the storage.
        """
        if self._refined is not None:
            return self._refined
        if trial_number is not None and self._decided is not None and self._decided[0] == trial_number:
            return self._decided[1]
        method = study.user_attrs.get(REFINE_ATTR)
        if method is None:
            done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
            if len(done) >= self.switch_after:
                best = max(done, key=lambda t: (t.value, -t.number))
                method = self.space.method_of(best.params, best.user_attrs)
                study.set_user_attr(REFINE_ATTR, method)
        self._refined = method
        if trial_number is not None:
            self._decided = (trial_number, method)
        return method

    def _cma_for(self, study: optuna.Study, method: str) -> optuna.samplers.CmaEsSampler:
        if self._cma is None:
            names = set(self.space.distributions(method))
            tried = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if self.space.method_of(t.params, t.user_attrs) == method and names <= set(t.params)]
            # started at the technique's best trial, with CMA-ES's own step size (measured better than a warm
            # start fitted to the top tenth of the trials)
            best = max(tried, key=lambda t: (t.value, -t.number)) if tried else None
            self._cma = cma_es(self.seed, x0={k: best.params[k] for k in names} if best else None,
                               independent=self._random, startup=0)
        return self._cma

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        method = self.refine_method(study, trial.number)
        if method is None:
            return self.tpe.infer_relative_search_space(study, trial)
        return self.space.distributions(method)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        method = self.refine_method(study, trial.number)
        if method is None:
            return self.tpe.sample_relative(study, trial, search_space)
        return self._cma_for(study, method).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if self.refine_method(study, trial.number) is None:
            return self.tpe.sample_independent(study, trial, param_name, param_distribution)
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.tpe.before_trial(study, trial)
        self.refine_method(study, trial.number)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values) -> None:
        self.tpe.after_trial(study, trial, state, values)
