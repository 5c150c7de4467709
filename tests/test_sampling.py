"""The trial loop's plumbing: batched storage writes, sampling ahead, TPE's vectorized masses."""

from __future__ import annotations

import math
import os
import sqlite3

import numpy as np
import pytest

from modelfactory import make_search_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def test_vectorized_truncnorm_equals_optunas_own():
    """The scipy functions that replace Optuna's per-element ones give the same numbers."""
    from optuna.samplers._tpe import _truncnorm
    from optuna.samplers._tpe._erf import erf

    from evomerge.samplers import use_vectorized_truncnorm

    a = np.concatenate([np.linspace(-60, 12, 7201), [-1e3, -38.5, -20.0, -19.99, 0.0, 5.99, 6.0, 6.01]])
    optuna_log_ndtr = np.frompyfunc(_truncnorm._log_ndtr_single, 1, 1)(a).astype(float)
    optuna_ndtr = 0.5 + 0.5 * erf(a / 2**0.5)
    use_vectorized_truncnorm()
    # equal to 1e-9 relative, or to 1e-15 where Optuna's log(1 - tail) loses digits (a near 6)
    np.testing.assert_allclose(_truncnorm._log_ndtr(a), optuna_log_ndtr, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(_truncnorm._ndtr(a), optuna_ndtr, rtol=1e-9, atol=1e-15)
    # and the masses TPE builds from them
    lo, hi = np.array([-3.0, -40.0, 0.5, -0.1]), np.array([-1.0, -39.0, 2.0, 0.2])
    log_mass = _truncnorm._log_gauss_mass(lo, hi)
    mass = np.exp(log_mass)
    phi = [0.5 * math.erfc(-x / 2**0.5) for x in np.concatenate([lo, hi])]
    expect = np.array(phi[4:]) - np.array(phi[:4])
    np.testing.assert_allclose(mass[[0, 2, 3]], expect[[0, 2, 3]], rtol=1e-9)
    # a far tail, where the mass underflows but its log does not: log Φ(-39) by the tail series
    assert log_mass[1] == pytest.approx(-0.5 * 39**2 - math.log(39) - 0.5 * math.log(2 * math.pi), abs=1e-3)


def test_batched_storage_writes_a_trial_in_one_transaction(tmp_path):
    """Parameters and user attributes of a running trial reach the database in one commit, before its state."""
    import optuna
    from sqlalchemy import event

    from evomerge.storage import open_storage

    db = tmp_path / "s.db"
    storage = open_storage(f"sqlite:///{db}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    commits, writes = [], []
    event.listen(storage.engine, "commit", lambda conn: commits.append(1))
    event.listen(storage.engine, "before_cursor_execute",
                 lambda conn, cursor, sql, *rest: writes.append(sql) if sql.lstrip().upper().startswith(
                     ("INSERT", "UPDATE")) else None)
    trial = study.ask()
    writes.clear()
    values = {f"x{i}": trial.suggest_float(f"x{i}", 0, 1, step=0.01) for i in range(12)}
    trial.set_user_attr("note", {"a": 1})
    trial.set_user_attr("note", {"a": 2})                  # the last write wins, as unbatched
    assert writes == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from trial_params").fetchone()[0] == 0
    commits.clear()
    storage.flush(trial._trial_id)
    assert len(commits) == 1 and len(writes) >= 13
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from trial_params").fetchone()[0] == 12
    trial.set_user_attr("late", 3)
    commits.clear()
    storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE, [0.5])
    assert len(commits) == 1                                # the last attribute and the state together
    fresh = optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials[0]
    assert fresh.params == values
    assert fresh.user_attrs == {"note": {"a": 2}, "late": 3}
    assert fresh.state.name == "COMPLETE" and fresh.value == 0.5


@pytest.mark.parametrize("sampler", ["tpe", "tpe+cmaes"])
@pytest.mark.slow
def test_sampling_ahead_runs_the_same_study_as_sampling_inline(tmp_path, sampler):
    """A second process samples trial n+1 while trial n runs: for one seed, the same trials and scores."""
    from evomerge.config import load_config
    from evomerge.search import SearchSession

    n_trials = 16
    config = load_config(make_search_fixture(tmp_path / "fam", n_trials=n_trials, sampler=sampler))
    runs = {}
    for ahead in (True, False):
        storage = f"sqlite:///{tmp_path / f'ahead-{ahead}.db'}"
        with SearchSession(config, storage_url=storage, device="cpu", progress=False) as session:
            session.run(n_trials, ahead=ahead)
            runs[ahead] = [(t.number, t.state.name, t.params, t.values) for t in session.study.get_trials()]
    assert len(runs[True]) == n_trials
    assert {state for _, state, _, _ in runs[True]} == {"COMPLETE"}
    assert runs[True] == runs[False]
    assert len({str(params) for _, _, params, _ in runs[True]}) == n_trials   # and not one candidate repeated


def test_a_dead_sampler_process_leaves_the_search_sampling_inline(tmp_path):
    """The search outlives its sampler process: it warns and samples in its own process."""
    from evomerge.config import load_config
    from evomerge.search import SearchSession

    config = load_config(make_search_fixture(tmp_path / "fam", n_trials=6))
    with SearchSession(config, storage_url=f"sqlite:///{tmp_path / 's.db'}", device="cpu", progress=False) as session:
        process = session.bench.sampler_process()
        process._process.kill()
        process._process.join()
        with pytest.warns(RuntimeWarning, match="sampling in this process from now on"):
            session.run(6, ahead=True)
        states = [t.state.name for t in session.study.get_trials()]
    assert states == ["COMPLETE"] * 6


@pytest.mark.parametrize("sampler", ["random", "tpe"])
@pytest.mark.slow
def test_median_pruning_stops_trials_below_the_median_on_partial_scores(tmp_path, sampler):
    """Scores are reported as examples are scored; a trial below the median of the trials before it is pruned.
    tpe samples ahead, in a second process, which writes the complete trials: their partial scores too.
    Baselines are scored in full."""
    from evomerge.config import load_config
    from evomerge.search import SearchSession

    config = load_config(make_search_fixture(tmp_path / "fam", n_trials=14, sampler=sampler))
    config = config.model_copy(update={"search": config.search.model_copy(update={"pruner": "median"})})
    with SearchSession(config, storage_url=f"sqlite:///{tmp_path / 's.db'}", device="cpu", progress=False) as session:
        session.run(14, ahead=sampler != "random")
        trials = session.study.get_trials()
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned and sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 14
    baselines = [t for t in trials if "baseline" in t.user_attrs]
    assert baselines and all(t.state.name == "COMPLETE" for t in baselines)
    for t in trials:
        assert t.intermediate_values                        # every trial reported partial scores
        steps = sorted(t.intermediate_values)
        if t.state.name == "PRUNED":
            assert t.value == t.intermediate_values[steps[-1]]
            assert len(steps) < max(len(c.intermediate_values) for c in trials if c.state.name == "COMPLETE")
            # recomputed: below the median of the trials finished before it, at the step it stopped
            earlier = [c for c in trials if c.number < t.number and c.state.name == "COMPLETE"
                       and steps[-1] in c.intermediate_values]
            assert len(earlier) >= 5 and steps[-1] >= 8
            median = float(np.median([c.intermediate_values[steps[-1]] for c in earlier]))
            assert t.intermediate_values[steps[-1]] < median


@pytest.mark.slow     # a whole search
def test_a_queued_trial_that_a_stopped_search_leaves_unrun_stays_queued(tmp_path):
    """Ctrl-C while the sampler process holds the next trial: a baseline (or a dead worker's retry) it took
    from the queue goes back there, number and label kept, and a resumed search runs it; nothing is lost."""
    from evomerge.config import load_config
    from evomerge.search import SearchSession

    config = load_config(make_search_fixture(tmp_path / "fam", n_trials=8))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with SearchSession(config, storage_url=storage, device="cpu", progress=False) as session:
        evaluate, calls = session.evaluator.evaluate, []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return evaluate(*args, **kwargs)

        session.evaluator.evaluate = interrupted
        with pytest.raises(KeyboardInterrupt):
            session.run(8, ahead=True)
        before = {t.number: t for t in session.study.get_trials()}
        session.evaluator.evaluate = evaluate
        assert [before[n].state.name for n in (0, 1, 2)] == ["COMPLETE", "FAIL", "WAITING"]
        assert "baseline" in before[2].user_attrs and "fixed_params" in before[2].system_attrs
        assert "KeyboardInterrupt" in before[1].user_attrs["error"]
        session.run(8, ahead=True)
        after = {t.number: t for t in session.study.get_trials()}
    assert after[2].state.name == "COMPLETE" and after[2].user_attrs["baseline"] == before[2].user_attrs["baseline"]
    assert after[2].params.items() >= before[2].system_attrs["fixed_params"].items()
    assert [n for n, t in after.items() if t.state.name == "FAIL"] == [1]
    assert sum(t.state.name == "COMPLETE" for t in after.values()) == 8


@pytest.mark.parametrize("sampler", ["tpe", "tpe+cmaes", "gp"])
@pytest.mark.slow
def test_the_first_trials_after_the_baselines_are_sampled_around_the_best_of_them(tmp_path, sampler):
    """A warm start: each of the first trials after the baselines is the best baseline moved by a seeded normal
    step (recomputed here); the anchor is the best baseline the first of them saw (all but the last, LAG 1)."""
    from evomerge.config import load_config
    from evomerge.samplers import ANCHOR_ATTR, BASELINES_ATTR, LAG, WARM_SPREAD, warm_trials
    from evomerge.search import SearchSession

    n_trials = 16
    config = load_config(make_search_fixture(tmp_path / "fam", n_trials=n_trials, sampler=sampler))
    with SearchSession(config, storage_url=f"sqlite:///{tmp_path / 's.db'}", device="cpu", progress=False) as session:
        session.run(n_trials)
        study, space = session.study, session.space
        trials = study.get_trials()
        count = study.user_attrs[BASELINES_ATTR]
        assert [t.number for t in trials if "baseline" in t.user_attrs] == list(range(count))
        seen = [t for t in trials[:count - LAG] if t.state.name == "COMPLETE"]
        best = max(seen, key=lambda t: (t.values[0], -t.number))
        assert study.user_attrs[ANCHOR_ATTR] == best.number
        warm = trials[count:count + warm_trials(n_trials)]
        assert len(warm) == warm_trials(n_trials) == 3
        for t in warm:
            expected = space.around(best.params, best.user_attrs, spread=WARM_SPREAD,
                                    rng=np.random.default_rng([config.search.seed, t.number]))
            assert space.method_of(t.params, t.user_attrs) == expected.pop("method")
            assert {k: v for k, v in t.params.items() if k != "method"} == pytest.approx(expected)
        after = trials[count + len(warm)]      # and then the sampler's own model
        assert after.params != space.around(best.params, best.user_attrs, spread=WARM_SPREAD,
                                            rng=np.random.default_rng([config.search.seed, after.number]))


@pytest.mark.parametrize("anchor", ["a merge", "a source alone"])
@pytest.mark.slow
def test_cmaes_starts_its_mean_at_the_best_baseline_unless_that_is_a_source_alone(tmp_path, anchor):
    """The first CMA-ES generations after the baselines lie around the best baseline (CMA-ES's step is a sixth of
    each range) where that is a merge; around the ranges' centres where it is a source alone (a corner)."""
    from evomerge.config import load_config
    from evomerge.samplers import ANCHOR_ATTR, BASELINES_ATTR
    from evomerge.search import SearchSession

    n_trials = 14
    config = load_config(make_search_fixture(tmp_path / "fam", n_trials=n_trials, sampler="cmaes", methods=("ties",)))
    with SearchSession(config, storage_url=f"sqlite:///{tmp_path / 's.db'}", device="cpu", progress=False) as session:
        study, space = session.study, session.space
        dims = space.dims["ties"]
        count = study.user_attrs[BASELINES_ATTR]
        # one more baseline, a merge far from the ranges' centres (the shipped ones are near them)
        study.enqueue_trial({d.name: d.snap(d.low + 0.85 * (d.high - d.low)) for d in dims},
                            user_attrs={"baseline": "sweep:far"})
        study.enqueue_trial(session.space.defaults("ties"), user_attrs={"baseline": "default:again"})
        study.set_user_attr(BASELINES_ATTR, count + 2)   # (the last baseline is hidden from the next trial: LAG)
        session.run(count + 2)                   # the baselines alone
        source = next(t.number for t in study.trials if t.user_attrs["baseline"].startswith("source:"))
        chosen = count if anchor == "a merge" else source
        study.set_user_attr(ANCHOR_ATTR, chosen)      # as if that baseline were the best of them
        session.run(n_trials)
        best = study.trials[chosen]
        count += 2
        after = [t for t in study.trials if t.number >= count]
        step = [abs(t.params[d.name] - best.params[d.name]) / (d.high - d.low) for t in after for d in dims]
        middle = [abs(t.params[d.name] - (d.low + d.high) / 2) / (d.high - d.low) for t in after for d in dims]
        near, centred = sum(step) / len(step), sum(middle) / len(middle)
        if anchor == "a merge":
            assert near < 0.2 and near < 0.6 * centred, (near, centred)
        else:
            assert centred < 0.2 and centred < 0.6 * near, (near, centred)


def test_every_sampler_the_config_accepts_has_a_factory_that_builds_it(tmp_path):
    """The registry and config.SAMPLERS name the same samplers, and each name builds a seeded sampler of its own
    kind behind the lag (auto, tpe+cmaes, cmaes: evomerge's; the others: Optuna's)."""
    import optuna

    from evomerge.auto import AutoSampler
    from evomerge.config import SAMPLERS, load_config
    from evomerge.samplers import FACTORIES, CmaEsFromAnchor, LaggedSampler, TpeThenCmaEs, WarmStart, make_sampler
    from evomerge.sources import open_sources
    from evomerge.space import SearchSpace

    assert set(FACTORIES) == set(SAMPLERS)
    kinds = {"auto": AutoSampler, "tpe": optuna.samplers.TPESampler, "cmaes": CmaEsFromAnchor,
             "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler,
             "adamerging": optuna.samplers.RandomSampler, "qmc": optuna.samplers.QMCSampler,
             "nsga2": optuna.samplers.NSGAIISampler, "tpe+cmaes": TpeThenCmaEs}
    config = load_config(make_search_fixture(tmp_path / "fam"))
    sources = open_sources(config.base, config.sources, relative_to=config.relative_to)
    for name in SAMPLERS:
        methods = ["task_arithmetic"] if name in ("cmaes", "adamerging") else config.search.methods
        one = config.model_copy(update={"search": config.search.model_copy(update={"sampler": name,
                                                                                   "methods": methods})})
        sampler = make_sampler(one, SearchSpace(one, sources.sources, sources.layout))
        assert isinstance(sampler, LaggedSampler)
        inner = sampler.inner.inner if isinstance(sampler.inner, WarmStart) else sampler.inner
        assert type(inner) is kinds[name], name
