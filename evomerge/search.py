"""The study: storage, sampler, pruner, baselines, and the trial loop.

    config ─► sources ─► space ─► study ─► (trial ─► recipe ─► materialize ─► evaluate ─► tell)* ─► export

Rerunning the same command resumes the study until `n_trials` trials are done
(complete or pruned); several processes on one storage cooperate, and the first
`n_trials` trial numbers that are not failures are the ones that run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import SearchConfig, load_config, tasks_path
from .errors import InputError

DONE = ("COMPLETE", "PRUNED")
FINGERPRINT_ATTR = "sources_fingerprint"
HEARTBEAT_S = 5
GRACE_S = 20


@dataclass
class RunResult:
    run_dir: Path
    study_name: str
    storage: str
    best_trial: int | None = None
    best_recipe: Any = None
    summary: dict[str, Any] = field(default_factory=dict)


class SurplusTrial(RuntimeError):
    """Other workers already hold the whole budget: this trial is not run."""


def open_study(config: SearchConfig, storage_url: str, *, sampler=None, pruner=None, create: bool = True):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = None
    for attempt in range(4):   # workers starting together race to create the tables: the losers retry
        try:
            storage = RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                                 engine_kwargs={"pool_pre_ping": not storage_url.startswith("sqlite")})
            break
        except Exception as err:  # bad URL, unreachable server, missing driver, a creation race
            racing = any(text in str(err).lower() for text in ("unique constraint", "already exists"))
            if racing and attempt < 3:
                time.sleep(0.5 + attempt)
                continue
            from .export.run import safe_url

            message = str(err).splitlines()[0][:200].replace(storage_url, safe_url(storage_url))
            raise InputError(f"cannot open the study storage {safe_url(storage_url)}: {type(err).__name__}: {message}",
                             field="storage", fix="check the URL (sqlite:///path or postgresql://user@host/db)") from None
    if storage_url.startswith("sqlite"):
        _fast_sqlite(storage)
    directions = ["maximize"] * len(config.objectives)
    if create:
        return optuna.create_study(study_name=config.name, storage=storage, sampler=sampler, pruner=pruner,
                                   directions=directions, load_if_exists=True)
    try:
        return optuna.load_study(study_name=config.name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        raise InputError(f"no study named '{config.name}' in the storage", field="storage") from None


def search(config: SearchConfig | str | Path, *, n_trials: int | None = None, storage: str | None = None,
           out: str | Path | None = None, device: str | None = None, export: bool = True,
           progress: bool = True) -> RunResult:
    """Run (or resume) the study named in `config`; export the best recipe at the end."""
    if not isinstance(config, SearchConfig):
        config = load_config(config)
    overrides: dict[str, Any] = {}
    if n_trials is not None:
        overrides["n_trials"] = n_trials
    if overrides:
        config = config.model_copy(update={"search": config.search.model_copy(update=overrides)})
    run_dir = config.run_dir(str(out) if out else None)
    _check_writable(run_dir)
    storage_url = config.storage_url(run_dir, storage)
    if not storage_url.startswith("sqlite"):
        open_study(config, storage_url)       # an unreachable server is bad input: found before anything is written
    bench = Workbench(config, device=device or config.device, progress=progress)   # bad input stops here, unwritten
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        from .export.run import safe_url

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
            from .export.run import export_run

            with _export_lock(run_dir):
                return export_run(session, run_dir, result=result)
    finally:
        bench.close()


class Workbench:
    """What stays resident across studies: the sources on the device, the tokenized tasks."""

    def __init__(self, config: SearchConfig, *, device: str | None, progress: bool = True) -> None:
        from transformers import AutoTokenizer

        from .evaluate import Evaluator, load_tasks
        from .kernel import ResidentMerger
        from .sources import open_sources

        if config.threads is not None:
            import torch

            torch.set_num_threads(config.threads)
        self.sources = open_sources(config.base, config.sources, relative_to=config.relative_to, vocab=config.vocab,
                                    file=str(config.path) if config.path else None)
        self.suite = load_tasks(tasks_path(config), seed=config.search.seed)
        try:
            self.merger = ResidentMerger(self.sources, device=device, dtype=config.dtype, seed=config.search.seed,
                                         methods=config.search.methods, progress=progress,
                                         memory_budget=config.memory_budget,
                                         trust_remote_code=config.trust_remote_code)
        except InputError as err:   # a config value the kernel refuses (memory_budget, device): name the file
            raise err.at(file=err.file or (str(config.path) if config.path else None)) from None
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.sources.anchor.path),
                                                       trust_remote_code=config.trust_remote_code)
        self.evaluator = Evaluator(self.suite, self.merger.model, self.tokenizer, seed=config.search.seed,
                                   limit=config.limit)

    @functools.cached_property
    def fingerprints(self) -> dict[str, str]:
        """A content fingerprint of every model (spec -> hash): once, for every study run on this workbench."""
        folders = ([self.sources.base] if self.sources.base is not None else []) + list(self.sources.sources)
        return {folder.spec: folder.fingerprint() for folder in folders}

    def close(self) -> None:
        self.merger.close()


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
        self._check_same_weights()
        if config.search.baselines:
            self._enqueue_baselines()

    def __enter__(self) -> "SearchSession":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own_bench:
            self.bench.close()

    # -- baselines -----------------------------------------------------------------
    def baselines(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, params): each source alone, then each technique at its defaults."""
        out = []
        for i, folder in enumerate(self.sources.sources):
            params = self.space.source_alone(i)
            if params is not None:
                out.append((f"source:{folder.short}", params))
        for method in self.space.methods:
            out.append((f"default:{method}", self.space.defaults(method)))
        return out

    def _check_same_weights(self) -> None:
        """A study resumes only over the weights it started on: trials scored on other models would mix in."""
        from .export.run import safe_url

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

    def _enqueue_baselines(self) -> None:
        if self.study.user_attrs.get("baselines_enqueued"):
            return
        for label, params in self.baselines():
            self.study.enqueue_trial(params, user_attrs={"baseline": label}, skip_if_exists=True)
        self.study.set_user_attr("baselines_enqueued", True)

    # -- the loop ------------------------------------------------------------------
    def counts(self, *, before: int | None = None) -> dict[str, int]:
        """Trials per state (those numbered below `before`): one COUNT query on an RDB storage."""
        return state_counts(self.study, before=before)

    def run(self, n_trials: int) -> None:
        """Run trials until `n_trials` are done in the whole study (all workers together)."""
        import optuna

        bar = _bar(n_trials, self.progress)
        attempts, shown = 0, 0.0
        try:
            while True:
                optuna.storages.fail_stale_trials(self.study)
                counts = self.counts()
                done = sum(counts.get(s, 0) for s in DONE)
                bar.update(done - bar.n)
                if bar.n and time.monotonic() - shown >= 2.0:     # the best of all workers, read now and then
                    _postfix(bar, self.study.get_trials(deepcopy=False))
                    shown = time.monotonic()
                if done >= n_trials:
                    break
                if done + counts.get("RUNNING", 0) >= n_trials:
                    time.sleep(1.0)   # the rest of the budget is running elsewhere; it may still fail
                    continue
                if attempts >= 3 * n_trials:
                    raise RuntimeError(f"{attempts} trials attempted and only {done} done: see trials.csv for errors")
                attempts += 1
                self.study.optimize(lambda trial: self.objective(trial, n_trials), n_trials=1, catch=(Exception,),
                                    gc_after_trial=False, show_progress_bar=False)
        finally:
            bar.close()

    def objective(self, trial, n_trials: int) -> float | list[float]:
        import optuna

        t0 = time.perf_counter()
        try:
            self._check_budget(trial, n_trials)
            recipe = self.recipe_for_trial(trial)
            t1 = time.perf_counter()
            self.merger.materialize(recipe)
            t2 = time.perf_counter()
            result = self.evaluator.evaluate("search", report=self._reporter(trial),
                                             objective=self.config.objectives[0])
            t3 = time.perf_counter()
            values = [result.objective(o) for o in self.config.objectives]
            self._check_budget(trial, n_trials, finished=True)
            trial.set_user_attr("scores", result.tasks)
            trial.set_user_attr("seconds", {"merge": t2 - t1, "eval": t3 - t2, "total": t3 - t0})
            if any(not math.isfinite(v) for v in values):
                raise FloatingPointError(f"non-finite score {values}")
            return values[0] if len(values) == 1 else values
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", {"total": time.perf_counter() - t0})
            raise
        except Exception as err:
            _free_device_memory(err)
            trial.set_user_attr("error", f"{type(err).__name__}: {str(err)[:500]}")
            raise

    def recipe_for_trial(self, trial):
        from .samplers import TpeThenCmaEs

        fixed = self.sampler.refine_method(self.study, trial.number) if isinstance(self.sampler, TpeThenCmaEs) else None
        if fixed is not None and "method" in trial.params:   # an enqueued trial names its own method
            fixed = None
        method = self.space.suggest(trial, method=fixed)
        recipe = self.space.decode(trial.params, method=method)
        trial.set_user_attr("recipe_sha256", recipe.sha256())
        return recipe

    def _check_budget(self, trial, n_trials: int, *, finished: bool = False) -> None:
        """Admit a trial only while the budget is not held by others: before it runs, by the done, running and
        queued (a dead worker's trial, re-queued for a retry) trials numbered before it; when it finishes, by the
        trials already done (a retried trial can otherwise overshoot)."""
        counts = self.counts() if finished else self.counts(before=trial.number)
        held = sum(counts.get(s, 0) for s in (DONE if finished else (*DONE, "RUNNING", "WAITING")))
        if held >= n_trials:
            raise SurplusTrial(f"budget of {n_trials} trials already held by other trials")

    def _reporter(self, trial) -> Callable[[int, float], None] | None:
        import optuna

        pruner = self.config.search.pruner
        if pruner == "none" or len(self.config.objectives) > 1:
            return None
        state = {"sum": 0.0, "n": 0}

        def report(step: int, value: float) -> None:
            state["sum"] += value
            state["n"] += 1
            trial.report(value if pruner == "wilcoxon" else state["sum"] / state["n"], step)
            if state["n"] % 8 == 0 and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {state['n']} examples")

        return report

    # -- reading the study back ------------------------------------------------------
    def recipe_of(self, frozen) -> Any:
        return self.space.decode(frozen.params, method=self.space.method_of(frozen.params, frozen.user_attrs))

    def best_trial(self):
        from optuna.trial import TrialState

        done = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not done:
            return None
        return max(done, key=lambda t: (t.values[0], -t.number))


def _fast_sqlite(storage) -> None:
    """WAL journal with normal sync: a commit per suggested parameter costs ~0.1 ms instead of ~10 ms.

    A killed process loses nothing it committed; only a power cut can drop the last commits.
    """
    from sqlalchemy import event

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()


@contextlib.contextmanager
def _export_lock(run_dir: Path):
    """One export at a time into a run folder (workers sharing a machine may finish together)."""
    import fcntl

    with open(run_dir / ".export.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_writable(run_dir: Path) -> None:
    import os

    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise InputError("run folder is not writable", file=probe, fix="pass --out to a writable folder")


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


def state_counts(study, *, before: int | None = None) -> dict[str, int]:
    """Trials of `study` per state name, only those numbered below `before` if given.

    On an RDB storage (SQLite, PostgreSQL) one COUNT query; reading the trials instead
    costs several queries and a decode of every unfinished trial, on every call.
    """
    engine = getattr(getattr(study._storage, "_backend", study._storage), "engine", None)
    if engine is not None:
        try:
            from optuna.storages._rdb.models import TrialModel
            from sqlalchemy import func, select

            query = select(TrialModel.state, func.count()).where(TrialModel.study_id == study._study_id)
            if before is not None:
                query = query.where(TrialModel.number < before)
            with engine.connect() as connection:
                return {state.name: n for state, n in connection.execute(query.group_by(TrialModel.state))}
        except Exception:  # an unexpected schema: read the trials
            pass
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if before is None or t.number < before:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _postfix(bar, trials) -> None:
    done = [t for t in trials if t.state.name == "COMPLETE"]
    if not done:
        return
    best = max(t.values[0] for t in done)
    last = done[-1].user_attrs.get("seconds", {}).get("total", float("nan"))
    bar.set_postfix(best=f"{best:.4f}", s_per_trial=f"{last:.2f}")


# -- CLI glue ------------------------------------------------------------------------------------------

def search_command(args) -> int:
    config = load_config(args.config)
    result = search(config, n_trials=args.n_trials, storage=args.storage, out=args.out, device=args.device,
                    export=not args.no_export)
    print(f"run folder: {result.run_dir}")
    return 0


def export_command(args) -> int:
    from .export.run import reexport

    result = reexport(Path(args.run_dir), trial=args.trial, storage=args.storage)
    print(f"exported trial {result.best_trial} to {result.run_dir}")
    return 0


def demo_command(args) -> int:
    from .demo import run_demo

    result = run_demo(out=args.out, n_trials=args.n_trials, config=args.config)
    print(f"demo results in {result.run_dir}")
    return 0
