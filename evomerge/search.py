"""The study: storage, sampler, pruner, baselines, and the trial loop.

    config ─► sources ─► space ─► study ─► (trial ─► recipe ─► materialize ─► evaluate ─► tell)* ─► export

Rerunning the same command resumes the study until `n_trials` trials are done
(complete or pruned); several processes on one storage cooperate, and the first
`n_trials` trial numbers that are not failures are the ones that run.
"""

from __future__ import annotations

import json
import math
import sys
import time
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import SearchConfig, load_config
from .errors import InputError
from .gradient_arm import GradientArm
from .start import load_starts
from .storage import (
    BASELINES_ATTR,
    BUDGET_ATTR,
    DONE,
    HEARTBEAT_S,
    fail_stale_trials,
    open_study,
    safe_url,
    state_counts,
)
from .workbench import Workbench

if TYPE_CHECKING:
    from .export.run import RunResult

FINGERPRINT_ATTR = "sources_fingerprint"
SPACE_ATTR = "space_fingerprint"
SWEEP_SHARE = 0.1     # of the budget, for the one-knob sweeps among the baselines


class SurplusTrial(RuntimeError):
    """Other workers already hold the whole budget: this trial is not run."""


def search(config: SearchConfig | str | Path, *, n_trials: int | None = None, storage: str | None = None,
           out: str | Path | None = None, device: str | None = None, export: bool = True,
           progress: bool = True) -> RunResult:
    """Run (or resume) the study named in `config`; export the best recipe at the end."""
    if not isinstance(config, SearchConfig):
        config = load_config(config)
    if n_trials is not None:
        if n_trials < 1:
            raise InputError(f"must be at least 1, got {n_trials}", field="--n-trials")
        config = config.model_copy(update={"search": config.search.model_copy(update={"n_trials": n_trials})})
    from .export.folder import check_writable
    from .export.run import RunResult, export_lock, export_run

    run_dir = config.run_dir(str(out) if out else None)
    check_writable(run_dir, what="run folder", fix="pass --out to a writable folder")
    storage_url = config.storage_url(run_dir, storage)
    if storage or config.search.storage:     # a bad URL or an unreachable server: found before anything is written
        try:
            open_study(config, storage_url)
        except InputError as err:
            raise InputError(err.problem, file=None if storage else config.path,
                             field="--storage" if storage else "search.storage", fix=err.fix) from None
    bench = Workbench(config, device=device or config.device, progress=progress)   # bad input stops here, unwritten
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps({"config": str(config.path.resolve()) if config.path else None,
                                                      "storage": safe_url(storage_url), "study": config.name,
                                                      "device": device or config.device}, indent=2) + "\n")
        with SearchSession(config, storage_url=storage_url, device=None, progress=progress, bench=bench) as session:
            session.run(config.search.n_trials)
            result = RunResult(run_dir=run_dir, study_name=config.name, storage=storage_url)
            if not export:
                return result
            if session.counts().get("RUNNING", 0):
                print("other workers are still running trials: the last one to finish exports", flush=True)
                return result
            with export_lock(run_dir):
                return export_run(session, run_dir, result=result)
    finally:
        bench.close()


class SearchSession:
    """One study over a workbench: the space, the sampler, the storage, the loop."""

    def __init__(self, config: SearchConfig, *, storage_url: str, device: str | None, progress: bool = True,
                 bench: Workbench | None = None) -> None:
        from .samplers import make_pruner, make_sampler
        from .space import SearchSpace

        self.config = config
        self.progress = progress
        self._own_bench = bench is None
        self.bench = bench or Workbench(config, device=device, progress=progress)
        self.sources, self.suite = self.bench.sources, self.bench.suite
        self.merger, self.evaluator, self.tokenizer = self.bench.merger, self.bench.evaluator, self.bench.tokenizer
        self.space = SearchSpace(config, self.sources.sources, self.sources.layout)
        self.sampler = make_sampler(config, self.space)
        self.study = open_study(config, storage_url, sampler=self.sampler, pruner=make_pruner(config))
        self.storage_url = storage_url
        self.started = time.time()
        self.gradient = GradientArm(self)     # adamerging's learner, or auto's gradient arm (gradient_arm.py)
        self._check_same_weights()
        self._check_same_space()
        self.cheap = self._cheap()
        self.starts = {s.label: s.recipe for s in load_starts(config)}     # the user's own recipes (start.py)
        queue = [(label, self.space.encode(recipe)) for label, recipe in self.starts.items()]
        if config.search.baselines or self.space.candidates is not None:   # a finite space: its candidates first
            queue += self.baselines()
        if queue:
            self.enqueue_baselines(queue)

    def __enter__(self) -> "SearchSession":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own_bench:
            self.bench.close()

    def _cheap(self):
        """Cheap evaluation (cheap.py), where the config asks for it or the study was started with it."""
        from .cheap import OPTIONS_ATTR, CheapEvaluation

        if self.config.search.evaluation.cheap or OPTIONS_ATTR in self.study.user_attrs:
            return CheapEvaluation(self.config, self.study, self.evaluator)
        return None

    # -- baselines -----------------------------------------------------------------
    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, params): each source alone, each technique at its defaults, then each technique's one-knob
        sweep (a global scale, a density, slerp's t), within about a tenth of the budget: what a user would
        try by hand, which the search has to beat."""
        out = []
        for i, folder in enumerate(self.sources.sources):
            params = self.space.source_alone(i)
            if params is not None:
                out.append((f"source:{folder.short}", params))
        for method in self.space.methods:
            out.append((f"default:{method}", self.space.defaults(method)))
        if self.space.candidates is None:
            points = round(SWEEP_SHARE * self.config.search.n_trials / len(self.space.methods))
            for method in self.space.methods:
                out += self.space.sweep(method, points)
        return out

    def _check_same_weights(self) -> None:
        """A study resumes only over the weights it started on: trials scored on other models would mix in."""
        now = self.bench.fingerprints
        before = self.study.user_attrs.get(FINGERPRINT_ATTR)
        if before is None:
            self.study.set_user_attr(FINGERPRINT_ATTR, now)
            return
        changed = [spec for spec in now if before.get(spec) != now[spec]] + [s for s in before if s not in now]
        if changed:
            raise InputError(f"study '{self.study.study_name}' in {safe_url(self.storage_url)} was run on other "
                             f"weights: {', '.join(changed)} changed since", field="storage",
                             fix="search into a new --out folder (or storage), or delete the old study")

    def _check_same_space(self) -> None:
        """A study resumes only over the search space it started on (methods, groups, filters, ranges): the
        samplers cannot take a parameter whose choices or range changed, and every trial would fail."""
        now = self.space.fingerprint()
        before = self.study.user_attrs.get(SPACE_ATTR)
        if before is None:
            self.study.set_user_attr(SPACE_ATTR, now)
        elif before != now:
            raise InputError(f"study '{self.study.study_name}' was started over another search space (search.methods, "
                             "layer_groups, filters or ranges changed since)", file=self.config.path, field="search",
                             fix="search into a new --out folder (or storage) or under a new name, or undo the change")

    def enqueue_baselines(self, baselines: list[tuple[str, dict[str, Any]]]) -> None:
        """Queue (label, params) baselines first, once per study; the samplers' warm start follows them."""
        if self.study.user_attrs.get("baselines_enqueued"):
            return
        for label, params in baselines:
            self.study.enqueue_trial(params, user_attrs={"baseline": label}, skip_if_exists=True)
        queued = [t.number for t in self.study.get_trials(deepcopy=False) if "baseline" in t.user_attrs]
        if queued:   # the samplers' warm start (samplers.anchor) begins after the last of them
            self.study.set_user_attr(BASELINES_ATTR, max(queued) + 1)
        self.study.set_user_attr("baselines_enqueued", True)

    # -- the loop ------------------------------------------------------------------
    def counts(self, *, before: int | None = None) -> dict[str, int]:
        """Trials per state (those numbered below `before`): one COUNT query on an RDB storage."""
        return state_counts(self.study, before=before)

    def run(self, n_trials: int, *, ahead: bool | None = None) -> None:
        """Run trials until `n_trials` are done in the whole study (all workers together).

        `ahead`: sample each trial in a second process while the one before runs (propose.py);
        by default when the sampler models the trials and there is a second core for it.
        """
        from .propose import AheadProposer, InlineProposer, SamplingError, samples_ahead
        from .storage import Heartbeat

        n_trials = self.budget(n_trials)
        bar = _bar(n_trials, self.progress)
        heartbeat = Heartbeat(self.study._storage)
        proposer = inline = InlineProposer(self.study, self.space, heartbeat)
        ahead = samples_ahead(self.config) if ahead is None else ahead
        attempts, shown, swept, ran = 0, 0.0, 0.0, False
        try:
            while True:
                if time.monotonic() - swept >= HEARTBEAT_S:    # a dead worker's trial: failed, or retried
                    fail_stale_trials(self.study)
                    swept = time.monotonic()
                if attempts >= 3 * n_trials and self._done() < n_trials:
                    raise RuntimeError(f"{attempts} trials attempted and not {n_trials} done: see trials.csv for errors")
                turn = self.gradient.turn(n_trials)
                if self.config.search.sampler == "adamerging" or turn == "queue":
                    self.gradient.queue(n_trials)    # (queued here, so sampled inline: nothing ahead)
                elif turn == "done" and ahead and proposer is inline:
                    proposer = AheadProposer(self.bench.sampler_process(), self.config, self.space, self.storage_url,
                                             fallback=inline)
                try:
                    proposal = proposer.take(n_trials)
                except SamplingError as err:   # that trial is failed, with the reason
                    warnings.warn(str(err), RuntimeWarning, stacklevel=1)
                    attempts += 1
                    continue
                if proposal is None:   # the budget is done, or held by trials running elsewhere (they may fail)
                    done = self._done()
                    bar.update(done - bar.n)
                    if done >= n_trials:
                        break
                    if not ran:        # (after a trial of ours, ask again at once: the answer may predate its tell)
                        time.sleep(1.0)
                    ran = False
                    continue
                attempts += 1
                try:
                    ran = self.run_trial(proposal, n_trials, proposer)
                finally:
                    heartbeat.release(proposal.trial_id)
                if not ran:            # others hold the budget: wait for them (a queued trial is asked again)
                    time.sleep(1.0)
                bar.update(self._done() - bar.n)
                if time.monotonic() - shown >= 2.0:     # the best of all workers, read now and then
                    _postfix(bar, self.study.get_trials(deepcopy=False))
                    shown = time.monotonic()
        finally:
            proposer.close()
            heartbeat.close()
            bar.close()

    def budget(self, n_trials: int) -> int:
        """The trials to run for an asked `n_trials`: no more than the space's distinct candidates (a parameter-free
        method has one); recorded as the study's budget, the largest any run of it asked for."""
        n_trials = min(n_trials, self.space.candidates or n_trials)
        if n_trials > self.study.user_attrs.get(BUDGET_ATTR, 0):
            self.study.set_user_attr(BUDGET_ATTR, n_trials)
        return n_trials

    @property
    def study_budget(self) -> int:
        """The study's budget: the most trials any run of it asked for (its config's, before any run)."""
        return self.study.user_attrs.get(BUDGET_ATTR, self.config.search.n_trials)

    def _done(self) -> int:
        counts = self.counts()
        return sum(counts.get(s, 0) for s in DONE)

    def run_trial(self, proposal, n_trials: int, proposer) -> bool:
        """Merge, score and tell one proposed trial; what goes wrong fails this trial only. A complete
        trial is written by the proposer (by the sampler process, when sampling ahead). False when the
        budget is held by other trials: this one is failed, or back in the queue if it came from there."""
        import optuna
        from optuna.trial import TrialState

        from .propose import not_run

        storage, trial_id = self.study._storage, proposal.trial_id
        attrs: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            self._check_budget(proposal.number, n_trials)
            recipe = self.recipe_for(proposal.params, proposal.method, proposal.baseline)
            attrs["recipe_sha256"] = recipe.sha256()
            rows = None                # every row; with cheap evaluation, maybe a few (cheap.py)
            if self.cheap is not None:
                rows = self.cheap.rows_for(proposal.number, proposal.baseline)
            t1 = time.perf_counter()
            self.bench.materialize(recipe)
            t2 = time.perf_counter()
            result = self.evaluator.evaluate("search", report=self._reporter(trial_id, rows),
                                             objective=self.config.objectives[0], rows=rows)
            t3 = time.perf_counter()
            if self.cheap is not None:    # an estimate from the rows scored, or the per-row results to learn from
                result, cheap_attrs = self.cheap.scores(result, rows)
                attrs.update(cheap_attrs)
            values = [result.objective(o) for o in self.config.objectives]
            self._check_budget(proposal.number, n_trials, finished=True)
            attrs["scores"] = result.tasks
            attrs["partial"] = result.partial(self.config.objectives[0])   # what auto's arms model (auto.py)
            attrs["seconds"] = {"merge": t2 - t1, "eval": t3 - t2, "total": t3 - t0}
            if any(not math.isfinite(v) for v in values):
                raise FloatingPointError(f"non-finite score {values}")
        except SurplusTrial as err:
            not_run(self.study, proposal, str(err))
            return False
        except optuna.TrialPruned:
            for key, value in {**attrs, "seconds": {"total": time.perf_counter() - t0}}.items():
                storage.set_trial_user_attr(trial_id, key, value)
            self.study.tell(proposal.number, state=TrialState.PRUNED)
            return True
        except BaseException as err:   # Ctrl-C too: the trial is failed, then the search stops
            _free_device_memory(err)
            storage.set_trial_user_attr(trial_id, "error", f"{type(err).__name__}: {str(err)[:500]}")
            self.study.tell(proposal.number, state=TrialState.FAIL)
            if not isinstance(err, Exception):
                raise
            return True
        proposer.complete(proposal, values, attrs)
        return True

    def _check_budget(self, number: int, n_trials: int, *, finished: bool = False) -> None:
        """Admit a trial only while the budget is not held by others: before it runs, by the done, running and
        queued (a dead worker's trial, re-queued for a retry) trials numbered before it; when it finishes, by the
        trials already done (a retried trial can otherwise overshoot)."""
        counts = self.counts() if finished else self.counts(before=number)
        held = sum(counts.get(s, 0) for s in (DONE if finished else (*DONE, "RUNNING", "WAITING")))
        if held >= n_trials:
            raise SurplusTrial(f"budget of {n_trials} trials already held by other trials")

    def _reporter(self, trial_id: int, rows=None) -> Callable[[int, float], None] | None:
        import optuna

        pruner = self.config.search.pruner
        if pruner == "none" or len(self.config.objectives) > 1:
            return None
        storage, study = self.study._storage, self.study
        last = self.evaluator.reported("search", self.config.objectives[0], rows)   # one scored whole: not pruned
        state = {"sum": 0.0, "n": 0}

        def report(step: int, value: float) -> None:   # Trial.report and Trial.should_prune, by trial id
            state["sum"] += value
            state["n"] += 1
            storage.set_trial_intermediate_value(trial_id, step,
                                                 value if pruner == "wilcoxon" else state["sum"] / state["n"])
            if state["n"] % 8 == 0 and state["n"] < last:
                frozen = storage.get_trial(trial_id)
                if "baseline" not in frozen.user_attrs and study.pruner.prune(study, frozen):  # baselines: scored whole
                    raise optuna.TrialPruned(f"pruned after {state['n']} examples")

        return report

    # -- reading the study back ------------------------------------------------------
    def recipe_of(self, frozen) -> Any:
        """The recipe a finished trial merged."""
        return self.recipe_for(frozen.params, self.space.method_of(frozen.params, frozen.user_attrs),
                               frozen.user_attrs.get("baseline"))

    def recipe_for(self, params: dict[str, Any], method: str, baseline: str | None) -> Any:
        """A trial's recipe: the user's own for a start (its exact values), else its parameters decoded."""
        if baseline in self.starts:
            return self.starts[baseline]
        return self.space.decode(params, method=method)

    def rescore_finalists(self) -> None:
        """Cheap evaluation: the best estimates scored on every search row, before a best trial is picked."""
        if self.cheap is not None:
            self.cheap.rescore_finalists(lambda t: self.bench.materialize(self.recipe_of(t)), progress=self.progress)

    def search_values(self, frozen) -> list[float]:
        """A complete trial's objective values on the whole search split (an estimate only where none is known)."""
        known = self.cheap.full_values(frozen) if self.cheap is not None else None
        return list(frozen.values) if known is None else known

    def best_trial(self):
        from optuna.trial import TrialState

        done = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not done:
            return None
        if self.cheap is not None:      # by full search score: the baselines, the finalists, the trials before the fit
            best = self.cheap.best()
            if best is not None:
                return best
        if len(self.config.objectives) == 1:
            return max(done, key=lambda t: (t.values[0], -t.number))
        # several objectives: of the Pareto front, the trial with the best mean of them (a balanced pick)
        return max(self.pareto_front(), key=lambda t: (sum(t.values) / len(t.values), -t.number))

    def pareto_front(self) -> list:
        """The complete trials no other complete trial beats on every objective, by number."""
        return sorted(self.study.best_trials, key=lambda t: t.number)


def _free_device_memory(err: BaseException) -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="trials", unit="trial", disable=not enabled, dynamic_ncols=True)


def _postfix(bar, trials) -> None:
    done = [t for t in trials if t.state.name == "COMPLETE"]
    if not done:
        return
    best = max(t.values[0] for t in done)
    last = done[-1].user_attrs.get("seconds", {}).get("total", float("nan"))
    bar.set_postfix(best=f"{best:.4f}", s_per_trial=f"{last:.2f}")


def reexport(run_dir: Path, *, trial: int | None = None, storage: str | None = None) -> RunResult:
    """`evomerge export RUN_DIR [--trial N]` from the run's own record."""
    from .export.run import RunResult, export_lock, export_run

    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise InputError("not a run folder (no run.json)", file=run_dir, fix="give the folder a search wrote")
    record = json.loads(record_path.read_text())
    config = load_config(record["config"])
    url = storage or record["storage"]
    if ":***@" in url:
        raise InputError("the run's storage URL has a password, which evomerge never writes down", file=record_path,
                         fix="pass --storage with the full URL")
    with SearchSession(config, storage_url=url, device=record.get("device"), progress=False) as session, \
            export_lock(run_dir):       # not at once with a search's own export into the folder
        return export_run(session, run_dir, result=RunResult(run_dir=run_dir, study_name=config.name, storage=url),
                          trial=trial)


class _CallableModule(types.ModuleType):
    """`evomerge.search(config)` keeps working once this module is imported: importing ``evomerge.search``
    binds the module, not the function, to that name on ``evomerge``; calling the module calls the function
    (as evomerge/evaluate/__init__.py does for `evomerge.evaluate`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
