"""`evomerge compare` on a tiny budget: every technique and seed, numbers read back from the storage."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelfactory import make_search_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

METHODS = ("task_arithmetic", "ties")
SEEDS, BUDGET = 2, 3


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, Path]:   # `evomerge compare` in a subprocess: its users are slow
    config = make_search_fixture(tmp_path_factory.mktemp("family"), methods=METHODS)
    out = tmp_path_factory.mktemp("compare") / "cmp"
    done = subprocess.run([sys.executable, "-m", "evomerge", "compare", str(config), "--seeds", str(SEEDS),
                           "--budget", str(BUDGET), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return config, out


def _rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "compare.csv").open()))


@pytest.mark.slow
def test_every_technique_seed_and_kind_is_reported(compared):
    _, out = compared
    rows = _rows(out)
    assert sorted((r["technique"], int(r["seed"]), r["kind"]) for r in rows) == sorted(
        (m, s, k) for m in METHODS for s in range(SEEDS) for k in ("default", "tuned"))
    report = (out / "report.md").read_text()
    for method in METHODS:
        for kind in ("default", "tuned"):
            assert f"| {method} | {kind} | {SEEDS} |" in report
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_numbers_equal_the_trials_in_the_storage(compared):
    """Each row's trial, search value and held-out scores are the storage's; tuned is the study's best."""
    import optuna

    from evomerge.export.run import HELDOUT_ATTR

    _, out = compared
    storage = f"sqlite:///{out / 'compare.db'}"
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {f"fixture.{m}.seed{s}.budget{BUDGET}" for m in METHODS for s in range(SEEDS)}
    for row in _rows(out):
        study = optuna.load_study(study_name=row["study"], storage=storage)
        complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
        assert len(complete) == int(row["n_complete"]) == BUDGET
        assert {t.params.get("method", row["technique"]) for t in complete} == {row["technique"]}
        trial = next(t for t in complete if t.number == int(row["trial"]))
        assert float(row["search_value"]) == trial.value
        if row["kind"] == "default":
            assert trial.user_attrs["baseline"] == f"default:{row['technique']}"
        else:
            assert trial.value == max(t.value for t in complete)
        heldout = study.user_attrs[f"{HELDOUT_ATTR}{trial.number}"]
        assert float(row["heldout:ppl"]) == pytest.approx(heldout["ppl"]["neg_log_ppl"], rel=1e-12)
        assert float(row["heldout:pick"]) == pytest.approx(heldout["pick"]["acc"], rel=1e-12)
        assert float(row["heldout_mean"]) == pytest.approx((heldout["ppl"]["neg_log_ppl"] + heldout["pick"]["acc"]) / 2)


@pytest.mark.slow
def test_a_held_out_number_recomputes_from_the_trial_recipe(compared):
    """Merging a tuned trial's recipe again and scoring it gives the reported held-out number."""
    from evomerge.compare import _restricted
    from evomerge.config import load_config
    from evomerge.search import SearchSession

    config, out = compared
    row = next(r for r in _rows(out) if r["kind"] == "tuned" and r["technique"] == "ties")
    sub = _restricted(load_config(config), method="ties", seed=int(row["seed"]), budget=BUDGET)
    with SearchSession(sub, storage_url=f"sqlite:///{out / 'compare.db'}", device="cpu", progress=False) as session:
        trial = session.study.trials[int(row["trial"])]
        session.merger.materialize(session.recipe_of(trial))
        scores = session.evaluator.evaluate("heldout").tasks
    assert scores["ppl"]["neg_log_ppl"] == pytest.approx(float(row["heldout:ppl"]), rel=1e-9)
    assert scores["pick"]["acc"] == float(row["heldout:pick"])


@pytest.mark.slow
def test_a_rerun_with_a_smaller_budget_compares_at_that_budget(compared, tmp_path):
    """Studies of another budget in the same compare.db are not reused: each row's trials are the budget's."""
    import shutil

    config, out = compared
    again = tmp_path / "again"
    shutil.copytree(out, again)
    done = subprocess.run([sys.executable, "-m", "evomerge", "compare", str(config), "--seeds", "1",
                           "--budget", "2", "--out", str(again)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(again)
    assert rows and all(int(r["n_complete"]) == 2 and r["study"].endswith(".budget2") for r in rows)
    assert "same budget of 2 trials" in (again / "report.md").read_text()


@pytest.mark.parametrize("flag, value", [("--seeds", "0"), ("--budget", "-1")])
@pytest.mark.slow
def test_a_bad_seed_count_or_budget_exits_2_and_writes_nothing(compared, tmp_path, flag, value):
    config, _ = compared
    out = tmp_path / "cmp"
    done = subprocess.run([sys.executable, "-m", "evomerge", "compare", str(config), flag, value, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and f"{flag}: must be at least 1" in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_several_objectives_rank_by_the_pareto_pick_and_report_the_mean_of_the_objectives(tmp_path):
    """The tuned row is the trial a search would export (the Pareto-front trial with the best mean of the
    objectives), and its held-out mean is the mean of the objectives, not the first objective's."""
    import optuna

    from evomerge.export.run import HELDOUT_ATTR

    config = make_search_fixture(tmp_path / "fam", methods=("task_arithmetic",), sampler="nsga2")
    config.write_text(config.read_text().replace("objective: {ppl: 1.0, pick: 1.0}",
                                                 "objective: [{ppl: 1.0}, {pick: 1.0}]"))
    out = tmp_path / "cmp"
    done = subprocess.run([sys.executable, "-m", "evomerge", "compare", str(config), "--seeds", "1", "--budget", "8",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(r for r in _rows(out) if r["kind"] == "tuned")
    study = optuna.load_study(study_name=row["study"], storage=f"sqlite:///{out / 'compare.db'}")
    done_trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    front = [t for t in done_trials if not any(all(a >= b for a, b in zip(o.values, t.values)) and o.values != t.values
                                               for o in done_trials)]
    balanced = max(front, key=lambda t: (sum(t.values) / 2, -t.number))
    assert int(row["trial"]) == balanced.number
    assert float(row["search_value"]) == pytest.approx(sum(balanced.values) / 2, rel=1e-12)
    heldout = study.user_attrs[f"{HELDOUT_ATTR}{balanced.number}"]
    assert float(row["heldout_mean"]) == pytest.approx((heldout["ppl"]["neg_log_ppl"] + heldout["pick"]["acc"]) / 2)
    report = (out / "report.md").read_text()
    assert "ppl (held-out)" in report and "pick (held-out)" in report and "Pareto-front trial" in report


@pytest.mark.slow
def test_each_technique_is_reported_beside_its_one_knob_sweep(tmp_path):
    """A tenth of each study's budget sweeps one knob first; the `sweep` row is the point a user would keep (the
    best on the search split), scored held-out, beside the default and the tuned best."""
    import optuna

    from evomerge.export.run import HELDOUT_ATTR

    config = make_search_fixture(tmp_path / "fam", methods=("task_arithmetic",))
    out = tmp_path / "cmp"
    done = subprocess.run([sys.executable, "-m", "evomerge", "compare", str(config), "--seeds", "1", "--budget", "20",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["kind"]: r for r in _rows(out)}
    assert set(rows) == {"default", "sweep", "tuned"}
    study = optuna.load_study(study_name=rows["sweep"]["study"], storage=f"sqlite:///{out / 'compare.db'}")
    sweeps = [t for t in study.trials if t.user_attrs.get("baseline", "").startswith("sweep:")]
    assert sorted(t.user_attrs["baseline"] for t in sweeps) == ["sweep:task_arithmetic weight=0.38",
                                                                 "sweep:task_arithmetic weight=1.12"]
    kept = max(sweeps, key=lambda t: (t.value, -t.number))
    assert int(rows["sweep"]["trial"]) == kept.number and float(rows["sweep"]["search_value"]) == kept.value
    heldout = study.user_attrs[f"{HELDOUT_ATTR}{kept.number}"]
    assert float(rows["sweep"]["heldout_mean"]) == pytest.approx((heldout["ppl"]["neg_log_ppl"] + heldout["pick"]["acc"]) / 2)
    assert float(rows["tuned"]["search_value"]) >= kept.value
    assert "| task_arithmetic | sweep | 1 |" in (out / "report.md").read_text()
