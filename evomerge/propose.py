"""Proposing trials: ask the study for a trial and sample its candidate, here or one trial ahead.

    main process:   take k ─► merge k ─► score k ─► tell k ─► take k+1 ─► …
    sampler process:      └─ ask k+1 + sample ┘         └─ ask k+2 + sample ┘

A model-based sampler (TPE, GP, CMA-ES) spends about as long choosing a candidate as a
small model takes to be merged and scored. `AheadProposer` samples trial k+1 in a second
process while trial k is merged and scored, so the sampler is off the trial's critical
path; `InlineProposer` samples in the search's own process. Both hand out the same
proposals for one seed: the sampler never sees the trial just before the one it samples
(samplers.LaggedSampler), so it does not matter whether that trial has finished.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from dataclasses import dataclass
from typing import Any

from .storage import Heartbeat, state_counts

DONE_OR_RUNNING = ("COMPLETE", "PRUNED", "RUNNING")


class SamplingError(RuntimeError):
    """The sampler failed on a trial: that trial is failed with the reason, the search goes on."""


@dataclass(frozen=True)
class Proposal:
    """A trial the study handed out, its candidate sampled and stored."""

    trial_id: int
    number: int
    method: str
    params: dict[str, Any]


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
        fixed = refine(study, trial.number) if refine is not None else None
        if fixed is not None and "method" in trial.params:   # a retried trial keeps its own method
            fixed = None
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
    return Proposal(trial._trial_id, trial.number, method, dict(trial.params))


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

    def close(self) -> None:
        pass


class AheadProposer:
    """Samples trial k+1 in a second process while trial k runs here.

    The sampler process holds (heartbeats) each trial it asked until this process takes it
    over. If it dies, the search goes on sampling inline.
    """

    def __init__(self, config, space, storage_url: str, *, fallback: InlineProposer) -> None:
        self.fallback = fallback
        self.heartbeat = fallback.heartbeat
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, config, space, storage_url),
                                        name="evomerge-sampler", daemon=True)
        self._process.start()
        child.close()
        self._asked = False      # a request is out: its answer (a proposal or None) is on its way
        self._broken = False

    def take(self, n_trials: int) -> Proposal | None:
        if self._broken:
            return self.fallback.take(n_trials)
        try:
            if not self._asked:
                self._conn.send(("ask", n_trials, None))
            proposal = self._receive()
            self._asked = False
            if proposal is not None:
                self.heartbeat.hold(proposal.trial_id, beat=False)   # the sampler process beat it when it asked
                self._conn.send(("ask", n_trials, proposal.trial_id))   # sample the next one meanwhile
                self._asked = True
            return proposal
        except (EOFError, OSError) as err:
            warnings.warn(f"the sampler process stopped ({err}); sampling in this process from now on",
                          RuntimeWarning, stacklevel=2)
            self._broken = True
            return self.fallback.take(n_trials)

    def _receive(self) -> Proposal | None:
        kind, payload = self._conn.recv()
        if kind == "error":
            self._asked = False
            raise SamplingError(payload)
        return payload

    def close(self) -> None:
        """Stop the sampler process; a trial it asked ahead and nobody will run is failed, with the reason."""
        if not self._broken and self._process.is_alive():
            try:
                if self._asked:
                    left = self._receive()
                    if left is not None:
                        self._fail_unrun(left)
                self._conn.send(("close", 0, None))
            except (EOFError, OSError, SamplingError):
                pass
        self._conn.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()

    def _fail_unrun(self, proposal: Proposal) -> None:
        from optuna.trial import TrialState

        study = self.fallback.study
        study._storage.set_trial_user_attr(proposal.trial_id, "error", "not run: the search stopped before it")
        study.tell(proposal.number, state=TrialState.FAIL)


def _serve(conn, config, space, storage_url: str) -> None:
    """The sampler process: answer each request with a proposal (or None, or an error)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from .samplers import make_sampler
    from .search import open_study

    heartbeat = None
    try:
        study = open_study(config, storage_url, sampler=make_sampler(config, space), create=False)
        heartbeat = Heartbeat(study._storage)
        while True:
            try:
                kind, n_trials, taken = conn.recv()
            except EOFError:   # the search process is gone
                break
            if taken is not None:
                heartbeat.release(taken)
            if kind == "close":
                break
            try:
                conn.send(("proposal", propose(study, space, n_trials, heartbeat)))
            except SamplingError as err:
                conn.send(("error", str(err)))
    finally:
        if heartbeat is not None:
            heartbeat.close()
        conn.close()
