"""Proposing trials: ask the study for a trial and sample its candidate, here or one trial ahead.

    main process:   take k ─► merge k ─► score k ─► take k+1 ─► merge k+1 …
    sampler process:      └─ ask k+1 + sample ┘  └─ write k, ask k+2 + sample ┘

A model-based sampler (TPE, GP, CMA-ES) spends about as long choosing a candidate as a
small model takes to be merged and scored. `AheadProposer` samples trial k+1 in a second
process while trial k is merged and scored, and writes trial k's result when it is handed
over, so the sampler and the storage's writes are off the trial's critical path; `InlineProposer` samples in the search's own process. Both hand out the same
proposals for one seed: the sampler never sees the trial just before the one it samples
(samplers.LaggedSampler), so it does not matter whether that trial has finished.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from .storage import Heartbeat, state_counts

DONE_OR_RUNNING = ("COMPLETE", "PRUNED", "RUNNING")
QUEUED_KEYS = {"fixed_params", "failed_trial"}   # system attributes of a trial that came from the queue


def samples_ahead(config) -> bool:
    """Whether a search of `config` samples ahead by default: a sampler that models the trials, a second core."""
    if os.environ.get("EVOMERGE_SAMPLE_INLINE") == "1":
        return False
    return config.search.sampler not in ("random", "qmc", "adamerging") and (os.cpu_count() or 1) >= 2


@contextlib.contextmanager
def _main_script_hidden():
    """Start a spawned process without the user's script: it needs nothing of it, and spawn would run the
    script's top-level code again in it, so a script that calls evomerge.search without an
    `if __name__ == "__main__":` guard would search twice and fail to start a process of its own."""
    main = sys.modules.get("__main__")
    names = ("__spec__", "__file__")
    saved = {k: main.__dict__[k] for k in names if main is not None and k in main.__dict__}
    try:
        for k in saved:
            if k == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[k]
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


class SamplingError(RuntimeError):
    """The sampler failed on a trial: that trial is failed with the reason, the search goes on."""


@dataclass(frozen=True)
class Proposal:
    """A trial the study handed out, its candidate sampled and stored."""

    trial_id: int
    number: int
    method: str
    params: dict[str, Any]
    baseline: str | None = None      # a queued baseline's label ("start:..." merges the user's own recipe)


def propose(study, space, n_trials: int, heartbeat: Heartbeat | None) -> Proposal | None:
    """Ask `study` for a trial and sample its candidate; None while `n_trials` are done or running."""
    counts = state_counts(study)
    if sum(counts.get(s, 0) for s in DONE_OR_RUNNING) >= n_trials:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage")   # the search beats itself
        trial = study.ask()
    if heartbeat is not None:
        heartbeat.hold(trial._trial_id)
    try:
        refine = getattr(study.sampler, "refine_method", None)
        own = {**trial._fixed_params, **trial.params}   # a queued trial's (a baseline, a gradient step, a retry)
        if own:                                          # keeps its own technique
            fixed = None if "method" in own else trial.user_attrs.get("method")
        else:
            fixed = refine(study, trial.number) if refine is not None else None
        method = space.suggest(trial, method=fixed)
        _flush(study, trial._trial_id)
    except Exception as err:
        from optuna.trial import TrialState

        reason = f"{type(err).__name__}: {str(err)[:500]}"
        study._storage.set_trial_user_attr(trial._trial_id, "error", f"sampling failed: {reason}")
        study.tell(trial, state=TrialState.FAIL)
        if heartbeat is not None:
            heartbeat.release(trial._trial_id)
        raise SamplingError(f"trial {trial.number}: {reason}") from err
    return Proposal(trial._trial_id, trial.number, method, dict(trial.params), trial.user_attrs.get("baseline"))


def complete(study, trial_id: int, values: list[float], attrs: dict[str, Any]) -> None:
    """Write a trial's user attributes and its values, COMPLETE, in one transaction (storage.BatchedRDBStorage).

    Study.tell would read the trial back twice, for checks the search has made, and for the sampler's
    after_trial hook, which none of evomerge's samplers uses (they have no constraints).
    """
    from optuna.trial import TrialState

    for key, value in attrs.items():
        study._storage.set_trial_user_attr(trial_id, key, value)
    study._storage.set_trial_state_values(trial_id, TrialState.COMPLETE, values)


def _flush(study, trial_id: int) -> None:
    """Commit the trial's buffered parameters (storage.BatchedRDBStorage) so other processes read them."""
    backend = getattr(study._storage, "_backend", study._storage)
    flush = getattr(backend, "flush", None)
    if flush is not None:
        flush(trial_id)


class InlineProposer:
    """Samples each trial in the search's own process, when it is taken."""

    def __init__(self, study, space, heartbeat: Heartbeat) -> None:
        self.study, self.space, self.heartbeat = study, space, heartbeat

    def take(self, n_trials: int) -> Proposal | None:
        return propose(self.study, self.space, n_trials, self.heartbeat)

    def complete(self, proposal: Proposal, values: list[float], attrs: dict[str, Any]) -> None:
        complete(self.study, proposal.trial_id, values, attrs)

    def close(self) -> None:
        pass


class SamplerProcess:
    """The second process that samples ahead: started once, it serves every study of a workbench.

    It follows the process that started it: when that one dies, its pipe closes and it exits.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), name="evomerge-sampler", daemon=True)
        with _main_script_hidden():
            self._process.start()
        child.close()
        self._keys = 0
        self._ready = False

    def new_key(self) -> int:
        self._keys += 1
        return self._keys

    def send(self, message: tuple) -> None:
        self._conn.send(message)

    def wait_ready(self) -> None:
        """Block until the process has started (its imports take a few seconds, once)."""
        if not self._ready:
            self._conn.recv()     # ("ready", None)
            self._ready = True

    def receive(self) -> tuple[str, Any]:
        self.wait_ready()
        return self._conn.recv()

    def close(self, *, wait: bool = True) -> None:
        """Stop the process: let it finish its last writes (`wait`), or kill it (nothing of its is pending)."""
        try:
            self._conn.send(("close",))
        except (OSError, EOFError):
            pass
        self._conn.close()
        if wait:
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)


class AheadProposer:
    """Samples trial k+1 in the sampler process while trial k runs here.

    The sampler process holds (heartbeats) each trial it asked until this process takes it
    over. If that process fails, the search goes on sampling inline.
    """

    def __init__(self, process: SamplerProcess, config, space, storage_url: str, *,
                 fallback: InlineProposer) -> None:
        self.process = process
        self.fallback = fallback
        self.heartbeat = fallback.heartbeat
        self.key = process.new_key()
        self._asked = False      # a request is out: its answer (a proposal, None or an error) is on its way
        self._broken = False
        self._send(("open", self.key, config, space, storage_url))

    def take(self, n_trials: int) -> Proposal | None:
        if not self._asked:
            self._send(("ask", self.key, n_trials, None))
        proposal = self._receive() if not self._broken else None
        if self._broken:
            return self.fallback.take(n_trials)
        if proposal is not None:
            self.heartbeat.hold(proposal.trial_id, beat=False)        # the sampler process beat it when it asked
            self._send(("ask", self.key, n_trials, proposal.trial_id))   # sample the next one meanwhile
        return proposal

    def complete(self, proposal: Proposal, values: list[float], attrs: dict[str, Any]) -> None:
        """Hand a complete trial to the sampler process, which writes it before it samples again. The partial
        scores a pruner reads, buffered here, are committed first: after the state they could not be."""
        _flush(self.fallback.study, proposal.trial_id)
        self._send(("complete", self.key, proposal.trial_id, values, attrs))
        if self._broken:
            self.fallback.complete(proposal, values, attrs)

    def _send(self, message: tuple) -> None:
        if self._broken:
            return
        try:
            self.process.send(message)
        except (OSError, EOFError) as err:
            self._break(f"the sampler process stopped ({err})")
            return
        self._asked = self._asked or message[0] == "ask"

    def _receive(self) -> Proposal | None:
        try:
            kind, payload = self.process.receive()
        except (OSError, EOFError) as err:
            self._break(f"the sampler process stopped ({err})")
            return None
        self._asked = False
        if kind == "error":
            raise SamplingError(payload)
        if kind == "broken":
            self._break(payload)
            return None
        return payload

    def _break(self, why: str) -> None:
        warnings.warn(f"{why}; sampling in this process from now on", RuntimeWarning, stacklevel=3)
        self._broken, self._asked = True, False

    def close(self) -> None:
        """Let the sampler process forget this study; a trial it asked ahead, that will not run, is failed."""
        if self._broken:
            return
        try:
            left = self._receive() if self._asked else None
        except SamplingError:
            left = None
        if left is not None:
            self._fail_unrun(left)
        if not self._broken:
            self._send(("forget", self.key))

    def _fail_unrun(self, proposal: Proposal) -> None:
        not_run(self.fallback.study, proposal, "the search stopped before it")
        self.heartbeat.release(proposal.trial_id)


def not_run(study, proposal: Proposal, why: str) -> str:
    """A trial taken that will not run: back in the queue if it came from there (a dead worker's trial
    re-queued for a retry, a baseline), so that no worker loses it; else failed, with `why`. The new state."""
    from optuna.trial import TrialState

    storage = study._storage
    if QUEUED_KEYS & storage.get_trial_system_attrs(proposal.trial_id).keys():
        storage.set_trial_state_values(proposal.trial_id, TrialState.WAITING)
        return "WAITING"
    storage.set_trial_user_attr(proposal.trial_id, "error", f"not run: {why}")
    study.tell(proposal.number, state=TrialState.FAIL)
    return "FAIL"


def _serve(conn) -> None:
    """The sampler process: open studies, answer each request with a proposal (or None, or an error).

    It stops quietly when the search process closes the pipe or goes away (a refused config closes it
    while this process is still starting); Ctrl-C is the search process's to handle.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from .samplers import make_sampler
    from .storage import open_study

    studies: dict[int, tuple[Any, Any, Heartbeat]] = {}
    broken: dict[int, str] = {}
    try:
        conn.send(("ready", None))
        _answer(conn, studies, broken, make_sampler, open_study)
    except (EOFError, OSError):   # the search process is gone
        pass
    finally:
        for _, _, heartbeat in studies.values():
            heartbeat.close()
        conn.close()


def _answer(conn, studies: dict, broken: dict, make_sampler, open_study) -> None:
    """The sampler process's loop, until "close"."""
    while True:
        message = conn.recv()
        kind, key = message[0], message[1] if len(message) > 1 else None
        if kind == "close":
            break
        if kind == "open":
            config, space, storage_url = message[2:]
            try:
                study = open_study(config, storage_url, sampler=make_sampler(config, space), create=False)
                studies[key] = (study, space, Heartbeat(study._storage))
            except Exception as err:
                broken[key] = f"the sampler process cannot open the study: {type(err).__name__}: {err}"
        elif kind == "complete":   # off the search's critical path; written before the next request is read
            trial_id, values, attrs = message[2:]
            try:
                complete(studies[key][0], trial_id, values, attrs)
            except Exception as err:   # e.g. failed meanwhile as stale: nothing to write
                print(f"evomerge: trial id {trial_id} not written: {type(err).__name__}: {err}",
                      file=sys.stderr, flush=True)
        elif kind == "forget":
            if key in studies:
                studies.pop(key)[2].close()
        elif kind == "ask":
            n_trials, taken = message[2:]
            if key in broken:
                conn.send(("broken", broken[key]))
                continue
            study, space, heartbeat = studies[key]
            if taken is not None:
                heartbeat.release(taken)
            try:
                conn.send(("proposal", propose(study, space, n_trials, heartbeat)))
            except SamplingError as err:
                conn.send(("error", str(err)))
