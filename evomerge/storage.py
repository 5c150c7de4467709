"""The study storage: Optuna's RDB storage (SQLite, PostgreSQL), with fewer round trips per trial.

A trial suggests a score of parameters, sets a few attributes and reports a partial score
per example scored; Optuna commits each one on its own. `BatchedRDBStorage` keeps a running
trial's parameters, user attributes and intermediate values in memory and writes them in one transaction: before the trial's state changes, before
anything reads the trial back, and when asked (`flush`). The rows are the same ones
Optuna writes, so every Optuna tool (optuna-dashboard included) reads the study as usual.

What a killed process loses is what was never committed: the parameters of the trial it
was running, which is failed (or retried from its committed parameters) anyway.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from collections.abc import Callable, Container, Iterable
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from .errors import InputError

# Study attributes that several modules read (samplers.py, search.py, auto.py), here below all of them
BASELINES_ATTR = "baseline_count"   # trials 0 .. count-1 are the baselines (set by search.py when it queues them)
BUDGET_ATTR = "budget"              # the most trials any run of the study asked for (search.py)
DONE = ("COMPLETE", "PRUNED")        # the states of a trial that counts against the budget, by name
GRADIENT_KEY = "gradient_steps"     # the user attribute that marks a gradient learner's trial (search.py)

HEARTBEAT_S = 5     # a running trial's heartbeat; a trial silent for GRACE_S is stale (failed, or retried)
GRACE_S = 20


class BatchedRDBStorage(RDBStorage):
    """RDBStorage that writes a trial's parameters, user attributes and partial scores in one transaction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[int, list[tuple[str, tuple]]] = {}
        self._pending_lock = threading.RLock()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_pending_lock", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._pending_lock = threading.RLock()

    # -- buffered writes ---------------------------------------------------------------
    def _set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                         distribution: BaseDistribution, previous_distribution: BaseDistribution | None) -> None:
        self._buffer(trial_id, "param", (param_name, param_value_internal, distribution, previous_distribution))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._buffer(trial_id, "user_attr", (key, value))

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._buffer(trial_id, "intermediate", (step, intermediate_value))

    def _buffer(self, trial_id: int, kind: str, args: tuple) -> None:
        with self._pending_lock:
            self._pending.setdefault(trial_id, []).append((kind, args))

    def flush(self, trial_id: int | None = None) -> None:
        """Commit the buffered writes of one trial (of every trial if None), in one transaction each."""
        from optuna.storages._rdb.storage import _create_scoped_session

        with self._pending_lock:
            ids = list(self._pending) if trial_id is None else [trial_id]
            for tid in ids:
                writes = self._pending.pop(tid, None)
                if writes:
                    with _create_scoped_session(self.scoped_session, True) as session:
                        self._add(session, tid, writes)

    def _add(self, session, trial_id: int, writes: list[tuple[str, tuple]]) -> None:
        """The buffered writes, added to `session` (not committed)."""
        from optuna.storages._rdb import models

        for kind, args in writes:
            if kind == "param":
                self._set_trial_param_without_commit(session, trial_id, *args)
            elif kind == "intermediate":
                self._set_trial_intermediate_value_without_commit(session, trial_id, *args)
            else:
                self._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, *args)

    # -- everything that changes a trial's state or reads it back commits first --------
    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        """The buffered writes and the new state in one transaction: Optuna's own write runs in this
        thread's scoped session, which already holds them, and commits them together."""
        with self._pending_lock:
            writes = self._pending.pop(trial_id, None)
            if writes:
                self._add(self.scoped_session(), trial_id, writes)
            return super().set_trial_state_values(trial_id, state, values)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.flush(trial_id)
        super().set_trial_system_attr(trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        self.flush(trial_id)
        return super().get_trial(trial_id)

    def _get_trials(self, study_id: int, states: Container[TrialState] | None, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        if self._pending:
            self.flush()
        return super()._get_trials(study_id, states, included_trial_ids, trial_id_greater_than)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if self._pending:
            self.flush()
        return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)


def open_study(config, storage_url: str, *, sampler=None, pruner=None, create: bool = True):
    """The study named in `config` (a SearchConfig) at `storage_url`, created if new unless `create` is False."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = open_storage(storage_url)
    directions = ["maximize"] * len(config.objectives)
    if create:
        return optuna.create_study(study_name=config.name, storage=storage, sampler=sampler, pruner=pruner,
                                   directions=directions, load_if_exists=True)
    try:
        return optuna.load_study(study_name=config.name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        raise InputError(f"no study named '{config.name}' in the storage", field="storage") from None


def open_storage(url: str) -> BatchedRDBStorage:
    """The storage at `url`, its tables created if new; a bad URL, a missing driver or an unreachable server
    is bad input."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    target = engine_url(url)
    for attempt in range(4):   # workers starting together race to create the tables: the losers retry
        try:
            storage = BatchedRDBStorage(target, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                                        engine_kwargs={"pool_pre_ping": not url.startswith("sqlite")})
            break
        except Exception as err:  # bad URL, unreachable server, a creation race
            racing = any(text in str(err).lower() for text in ("unique constraint", "already exists"))
            if racing and attempt < 3:
                time.sleep(0.5 + attempt)
                continue
            message = str(err).splitlines()[0][:200].replace(target, safe_url(url)).replace(url, safe_url(url))
            raise InputError(f"cannot open the study storage {safe_url(url)}: {type(err).__name__}: {message}",
                             field="storage", fix="check the URL (sqlite:///path or postgresql://user@host/db)") from None
    if url.startswith("sqlite"):
        _fast_sqlite(storage)
    return storage


# PostgreSQL drivers by the name a URL gives them (postgresql+NAME://): module, pip requirement. The first one
# installed serves a plain postgresql:// URL -- chosen here, not by SQLAlchemy, whose default moved from
# psycopg2 (2.0) to psycopg 3 (2.1).
POSTGRES_DRIVERS = {"psycopg": ("psycopg", "psycopg[binary]"), "psycopg2": ("psycopg2", "psycopg2-binary")}


def engine_url(url: str) -> str:
    """The URL that SQLAlchemy opens: a PostgreSQL URL names its driver (psycopg 3 where installed, else psycopg2);
    a driver that is not installed is bad input naming the pip command. Other URLs are passed as they are."""
    scheme, sep, rest = url.partition("://")
    dialect, _, driver = scheme.partition("+")
    if not sep or dialect not in ("postgresql", "postgres"):
        return url
    if not driver:
        driver = next((name for name, (module, _) in POSTGRES_DRIVERS.items() if _importable(module)), "")
        if not driver:
            raise InputError(f"cannot open the study storage {safe_url(url)}: no PostgreSQL driver is installed "
                             "(psycopg 3 or psycopg2)", field="storage",
                             fix="pip install 'evomerge[postgres]', or pip install 'psycopg[binary]'")
    elif driver in POSTGRES_DRIVERS and not _importable(POSTGRES_DRIVERS[driver][0]):
        module, requirement = POSTGRES_DRIVERS[driver]
        raise InputError(f"cannot open the study storage {safe_url(url)}: its driver {driver} is not installed "
                         f"(import {module} fails)", field="storage",
                         fix=f"pip install '{requirement}', or write postgresql:// to use the driver that is installed")
    return f"postgresql+{driver}://{rest}"


def _importable(module: str) -> bool:
    """Whether `module` imports (installed, and its native library loads: psycopg 3 without libpq does not)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _fast_sqlite(storage: RDBStorage) -> None:
    """WAL journal with normal sync: a commit costs ~0.1 ms instead of ~10 ms.

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


class Heartbeat:
    """One thread that keeps the trials this process holds alive in the storage.

    Optuna beats only inside `Study.optimize`, with a thread per trial; the search asks and
    tells itself, so it beats here: once when a trial is taken, then every HEARTBEAT_S.
    """

    def __init__(self, storage: RDBStorage) -> None:
        self._storage = storage
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, name="evomerge-heartbeat", daemon=True)
        self._thread.start()

    def hold(self, trial_id: int, *, beat: bool = True) -> None:
        """Keep `trial_id` alive from now on; `beat=False` when another process has just beaten it."""
        if beat:
            self._storage.record_heartbeat(trial_id)
        with self._lock:
            self._held.add(trial_id)

    def release(self, trial_id: int) -> None:
        with self._lock:
            self._held.discard(trial_id)

    def held(self) -> Iterable[int]:
        with self._lock:
            return sorted(self._held)

    def _beat_forever(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for trial_id in self.held():
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception as err:  # a storage hiccup: the next beat tries again
                    warnings.warn(f"heartbeat of trial id {trial_id} failed: {err}", RuntimeWarning, stacklevel=1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S + 1)


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


def safe_url(url: str) -> str:
    """A storage URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


class StudyView:
    """A read view of an optuna.Study that holds only the trials `keep` accepts: the trials before the one sampled
    (LaggedSampler), one technique's (auto's arms). They are read once, when first asked for: a sampler reads
    them several times while it samples one trial (TPE: the search space, then each group), each a storage read.
    """

    def __init__(self, study: Any, keep: Callable[[FrozenTrial], bool]) -> None:
        self._study = study
        self._keep = keep
        self._snapshot: list[FrozenTrial] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
        if self._snapshot is None:
            trials = self._study._get_trials(deepcopy=False, use_cache=True)
            self._snapshot = [t for t in trials if self._keep(t)]
        kept = self._snapshot if states is None else [t for t in self._snapshot if t.state in states]
        return copy.deepcopy(kept) if deepcopy else kept

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


def fail_stale_trials(study) -> None:
    """Fail (or re-queue for a retry) the running trials whose heartbeat stopped: a dead worker's."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
