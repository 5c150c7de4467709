"""The gradient learner inside a study: adamerging's trials, and auto's gradient arm (auto.py).

Its trials are queued, not sampled: the coefficients after the next gradient steps (gradient.py), taken
by whichever worker asks next. Whether auto's arm runs at all, and when it stops for good, is stored on
the study (auto.GRADIENT_ATTR), so that every worker and a resumed run see the same verdict.
"""

from __future__ import annotations

import math
import time

from .errors import InputError
from .storage import BASELINES_ATTR, DONE, GRADIENT_KEY, state_counts


class GradientArm:
    """adamerging's learner, or auto's gradient arm, over one session's study."""

    def __init__(self, session) -> None:
        """`session`: the search.SearchSession whose study, space, merger and evaluator it uses."""
        self.session = session
        self.study = session.study
        self.config = session.config
        self._gradient = None     # the optimizer (gradient.py), made when its first trial is queued
        self._start: int | str | None = None   # the trial it started from ("start": gradient.START)
        self.enabled = self._enabled()          # auto: whether its gradient arm may run here

    def _enabled(self) -> bool:
        """auto: whether its gradient arm can run on this search (auto.py): task_arithmetic searched, one
        objective of tasks with rows to learn from, the parameter space, resident sources."""
        from .auto import GRADIENT_ATTR
        from .samplers import resolved

        session = self.session
        why = None
        if resolved(self.config) != "auto" or "task_arithmetic" not in session.space.methods:
            return False
        if self.config.search.space != "ps":
            why = f"search.space {self.config.search.space} stacks blocks, which it cannot learn"
        elif not session.bench.gradient_rows:
            why = "the objective weights an lm_eval task, whose rows it cannot read"
        elif session.merger.streaming:
            why = "the sources are streamed (memory_budget)"
        if why is not None and self.study.user_attrs.get(GRADIENT_ATTR) is None:
            self.study.set_user_attr(GRADIENT_ATTR, {"state": "off", "why": why})
        return why is None

    def turn(self, n_trials: int) -> str:
        """auto's gradient arm, before a trial is taken: "queue" its next trial, "wait" (the baselines, or a trial
        of its elsewhere, are not done), or "done" for good. It stops at auto.gradient_verdict, decided once and
        stored on the study."""
        from optuna.trial import TrialState

        from .auto import GRADIENT_ATTR, _best, gradient_budget, gradient_verdict, is_gradient_trial

        if not self.enabled:
            return "done"
        record = self.study.user_attrs.get(GRADIENT_ATTR) or {}
        if record.get("state") in ("stopped", "off"):
            self.enabled = False
            return "done"
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials
               if is_gradient_trial(t) or "baseline" in t.user_attrs):
            return "wait"
        if sum(t.state.name in DONE for t in trials) >= n_trials:
            return "wait"
        baselines = self.study.user_attrs.get(BASELINES_ATTR, 0)
        space = self.session.space
        ta = _best([t for t in trials if "baseline" in t.user_attrs
                    and space.method_of(t.params, t.user_attrs) == "task_arithmetic"])
        floor = ta.values[0] if ta is not None else -math.inf
        why = gradient_verdict(trials, budget_left=gradient_budget(self.session.study_budget, baselines),
                               floor=floor)
        if why is not None:
            mine = [t for t in trials if is_gradient_trial(t) and t.state == TrialState.COMPLETE]
            self.study.set_user_attr(GRADIENT_ATTR, {"state": "stopped", "why": why, "trials": len(mine),
                                                     "best": max((t.values[0] for t in mine), default=None)})
            self.enabled = False
            return "done"
        if record.get("state") != "running":
            self.study.set_user_attr(GRADIENT_ATTR, {"state": "running"})
        return "queue"

    def queue(self, n_trials: int) -> None:
        """Once the queue (the baselines) is empty, the coefficients after the next gradient steps, queued as
        the next trial. The optimizer starts, at its first use in this process, from the study's
        task-arithmetic trial of lowest loss (or the paper's start): a resumed study goes on from there, with
        Adam's moments anew."""
        from optuna.trial import TrialState

        from .gradient import GradientMerge

        session = self.session
        counts = state_counts(self.study)
        if counts.get("WAITING", 0) or sum(counts.get(s, 0) for s in (*DONE, "RUNNING")) >= n_trials:
            return
        started = time.perf_counter()     # its first trial's seconds include the learner's setup and start
        if self._gradient is None:
            options = self.config.search.gradient
            try:
                self._gradient = GradientMerge(session.space, session.merger, session.evaluator,
                                               self.config.objectives[0], seed=self.config.search.seed,
                                               lr=options.lr, batch=options.batch, loss=options.loss,
                                               file=str(self.config.path) if self.config.path else None)
            except InputError as err:
                if self.config.search.sampler == "adamerging":
                    raise
                from .auto import GRADIENT_ATTR  # auto: its other arms search on without it

                self.study.set_user_attr(GRADIENT_ATTR, {"state": "off", "why": err.problem})
                self.enabled = False
                return
            chosen = self._gradient.start([t for t in self.study.get_trials(deepcopy=False,
                                                                            states=(TrialState.COMPLETE,))
                                           if session.space.method_of(t.params, t.user_attrs) == "task_arithmetic"])
            self._start = chosen.number if chosen is not None else "start"
        loss = self._gradient.advance(self.config.search.gradient.steps_per_trial)
        self.study.enqueue_trial(self._gradient.params(),
                                 user_attrs={GRADIENT_KEY: self._gradient.steps, "gradient_loss": loss,
                                             "gradient_seconds": time.perf_counter() - started,
                                             "gradient_start": self._start})
