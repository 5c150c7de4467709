"""Many workers on one PostgreSQL study (issue 7): exact budget, unique trials, a dead worker's trial retried.

Needs the private server that .ci/run starts (EVOMERGE_TEST_POSTGRES); in CI a missing
server fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from modelfactory import make_search_fixture

URL = os.environ.get("EVOMERGE_TEST_POSTGRES")

if not URL:
    if os.environ.get("CI"):
        pytest.fail("CI must start PostgreSQL (.ci/postgres.sh) for the distributed tests", pytrace=False)
    pytest.skip("no EVOMERGE_TEST_POSTGRES: run under .ci/run or source .ci/postgres.sh",
                allow_module_level=True)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]   # several worker processes


def _worker(config, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(config), "--storage", URL,
                             "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _study(name):
    import optuna

    return optuna.load_study(study_name=name, storage=URL)


def _config(tmp_path, n_trials, *, sampler="tpe"):
    name = f"dist-{uuid.uuid4().hex[:8]}"
    config = make_search_fixture(tmp_path / "fam", n_trials=n_trials, sampler=sampler)
    config.write_text(config.read_text().replace("name: fixture", f"name: {name}"))
    return config, name


def test_three_workers_share_one_budget(tmp_path):
    config, name = _config(tmp_path, n_trials=12)
    workers = [_worker(config, tmp_path / f"run{i}") for i in range(3)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = _study(name).get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 12
    assert "RUNNING" not in states and "WAITING" not in states
    assert len({t.number for t in trials}) == len(trials)
    exported = [i for i in range(3) if (tmp_path / f"run{i}" / "best" / "model.safetensors").is_file()]
    assert exported, "the last worker to finish exports"


def test_three_auto_workers_share_one_budget_and_one_schedule(tmp_path):
    """`auto` with three workers: the budget exactly, the gradient arm recorded on the study, and every trial
    sampled after it in a technique arm."""
    from evomerge.auto import GRADIENT_ATTR, is_gradient_trial

    config, name = _config(tmp_path, n_trials=24, sampler="auto")
    workers = [_worker(config, tmp_path / f"run{i}") for i in range(3)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    study = _study(name)
    trials = study.get_trials()
    assert sum(t.state.name == "COMPLETE" for t in trials) == 24
    assert {t.state.name for t in trials} <= {"COMPLETE", "FAIL", "WAITING"}
    # a gradient step one worker queued while another's trial filled the budget stays queued, for a resumed
    # search (as a dead worker's retry does); nothing else is left over
    assert all(is_gradient_trial(t) for t in trials if t.state.name == "WAITING")
    # (workers that start together may each queue the baselines: a race of enqueue_baselines, older than auto)
    assert study.user_attrs[GRADIENT_ATTR]["state"] in ("running", "stopped")
    assert any(is_gradient_trial(t) and t.state.name == "COMPLETE" for t in trials)
    sampled = [t for t in trials if "baseline" not in t.user_attrs and not is_gradient_trial(t)]
    assert sampled and {t.user_attrs["method"] for t in sampled} <= {"task_arithmetic", "ties"}


def test_three_workers_share_one_cheap_evaluation(tmp_path):
    """Cheap evaluation with three workers: the budget exactly, one fit on the study, every trial after it
    scored on that fit's rows, and the exporting worker's finalists re-scored in full."""
    from evomerge.cheap import ESTIMATE_KEY, ESTIMATOR_ATTR, FULL_ATTR, ROWS_KEY

    config, name = _config(tmp_path, n_trials=20)
    config.write_text(config.read_text().replace("  seed: 0\n", "  seed: 0\n  evaluation: {rows: 0.5, finalists: 2}\n"))
    workers = [_worker(config, tmp_path / f"run{i}") for i in range(3)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    study = _study(name)
    trials = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(trials) == 20
    fit = study.user_attrs[ESTIMATOR_ATTR]
    first = max(fit["trials"]) + 1
    assert all(ROWS_KEY in t.user_attrs for t in trials if t.number in fit["trials"])
    estimated = [t for t in trials if ESTIMATE_KEY in t.user_attrs]
    assert estimated and all(t.number >= first for t in estimated)
    assert len({t.user_attrs[ESTIMATE_KEY]["rows"] for t in estimated}) == 1
    assert sum(k.startswith(FULL_ATTR) for k in study.user_attrs) == min(2, len(estimated))
    exported = [i for i in range(3) if (tmp_path / f"run{i}" / "summary.md").is_file()]
    assert exported and "## Cheap evaluation" in (tmp_path / f"run{exported[0]}" / "summary.md").read_text()


def test_a_killed_workers_trial_is_retried(tmp_path):
    config, name = _config(tmp_path, n_trials=10)
    killed = []
    for attempt in range(3):   # a trial takes ~0.1 s: the one seen running may end before the signal lands
        first = _worker(config, tmp_path / "run0")
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            try:
                trials = _study(name).get_trials()
            except KeyError:
                trials = []
            if sum(t.state.name == "COMPLETE" for t in trials) >= 2 and any(t.state.name == "RUNNING" for t in trials):
                break
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)       # the only worker, so it dies mid-trial
        first.wait()
        killed = [t.number for t in _study(name).get_trials() if t.state.name == "RUNNING"]
        if killed:
            break
    assert killed
    others = [_worker(config, tmp_path / f"run{i}") for i in (1, 2)]
    outputs = [w.communicate(timeout=600)[0] for w in others]
    assert all(w.returncode == 0 for w in others), outputs
    trials = _study(name).get_trials()
    by_number = {t.number: t for t in trials}
    assert sum(t.state.name == "COMPLETE" for t in trials) == 10, \
        [(t.number, t.state.name, t.user_attrs.get("error"), t.system_attrs, str(t.datetime_complete)) for t in trials]
    assert all(by_number[n].state.name == "FAIL" for n in killed)
    retried = [t for t in trials if t.system_attrs.get("failed_trial") in killed]
    # a retry runs, unless the budget was reached first: then it was asked ahead and never run, or refused,
    # and it is back in the queue for a resumed search -- never lost
    unrun = [t for t in retried if t.state.name != "COMPLETE"]
    assert retried and len(unrun) < len(retried) and all(t.state.name == "WAITING" for t in unrun), \
        [(t.number, t.state.name, t.user_attrs.get("error"), t.system_attrs) for t in trials]
    # the retry keeps every parameter the dead trial had drawn (all of them, unless it died while sampling)
    assert all(by_number[killed[0]].params.items() <= t.params.items()
               for t in retried if t.system_attrs["failed_trial"] == killed[0])


def test_every_postgresql_url_form_opens_the_same_study():
    """postgresql:// (the README's form), postgres://, and each driver named outright: one server, one study."""
    import optuna

    from evomerge.storage import engine_url, open_storage

    scheme, rest = URL.split("://", 1)
    assert scheme == "postgresql", "the tests use the README's URL form"
    assert engine_url(URL) == f"postgresql+psycopg://{rest}"       # psycopg 3, chosen on purpose
    name = f"forms-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=open_storage(URL))
    study.enqueue_trial({"x": 0.25})
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    for form in ("postgresql+psycopg", "postgresql+psycopg2", "postgres"):
        storage = open_storage(f"{form}://{rest}")
        loaded = optuna.load_study(study_name=name, storage=storage)
        assert [t.params for t in loaded.trials] == [{"x": 0.25}], form
        assert storage.engine.url.drivername == ("postgresql+psycopg2" if form.endswith("2") else "postgresql+psycopg")
