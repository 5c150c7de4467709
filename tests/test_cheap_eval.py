"""Cheap evaluation (issue 29): the estimators recomputed by hand, subset scoring equal to full scoring on the
same rows, a study's estimates recomputed from its stored fit, the finalists' re-scoring, full-split exported
scores, and one seed giving one study."""

from __future__ import annotations

import csv
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evomerge.evaluate.estimate import THETA_GRID, TaskEstimator, fit_task, rows_to_score

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the estimators, by hand ---------------------------------------------------------------------------------

def test_rows_to_score_reads_a_fraction_or_a_count():
    assert rows_to_score(0.2, 100) == 20
    assert rows_to_score(0.001, 100) == 1
    assert rows_to_score(30, 100) == 30
    assert rows_to_score(500, 100) == 100
    assert rows_to_score(1.0, 7) == 7


def test_anchors_pick_one_row_per_pattern_and_weigh_it_by_its_share():
    """Three kinds of rows across four models: 5 every model gets right, 3 only the first two, 2 none. With 3
    anchors there is one per kind, weighted 5/10, 3/10, 2/10, and a candidate's estimate is that weighted sum."""
    kinds = [0] * 5 + [1] * 3 + [2] * 2
    random.Random(1).shuffle(kinds)
    pattern = {0: [1, 1, 1, 1], 1: [1, 1, 0, 0], 2: [0, 0, 0, 0]}
    table = np.array([pattern[k] for k in kinds], dtype=float).T        # models × rows
    est = fit_task("anchors", table, 3, seed=0, key="t")
    assert est.kind == "anchors" and len(est.rows) == 3
    assert sorted(kinds[r] for r in est.rows) == [0, 1, 2]
    share = {0: 0.5, 1: 0.3, 2: 0.2}
    assert est.weights == pytest.approx([share[kinds[r]] for r in est.rows])
    candidate = [0.0, 1.0, 1.0]
    assert est.estimate(candidate) == pytest.approx(sum(w * v for w, v in zip(est.weights, candidate)))
    # 6, 3 and 1 rows of each kind, five anchors: shares 3, 1.5 and 0.5 of them, so after one each the two
    # extra ones go to the largest kind, whose weight its three rows then share
    kinds = [0] * 6 + [1] * 3 + [2]
    random.Random(2).shuffle(kinds)
    table = np.array([pattern[k] for k in kinds], dtype=float).T
    five = fit_task("anchors", table, 5, seed=0, key="t")
    per_kind = {k: [w for r, w in zip(five.rows, five.weights) if kinds[r] == k] for k in (0, 1, 2)}
    assert per_kind[0] == pytest.approx([0.6 / 3] * 3)
    assert per_kind[1] == pytest.approx([0.3]) and per_kind[2] == pytest.approx([0.1])
    assert sum(five.weights) == pytest.approx(1.0)


def test_mean_is_a_seeded_random_subset_and_its_plain_mean():
    table = np.random.default_rng(0).integers(0, 2, size=(6, 50)).astype(float)
    est = fit_task("mean", table, 10, seed=3, key="t")
    assert est == fit_task("mean", table, 10, seed=3, key="t") != fit_task("mean", table, 10, seed=4, key="t")
    assert list(est.rows) == sorted(est.rows) and len(set(est.rows)) == 10
    values = [float(v) for v in np.random.default_rng(1).random(10)]
    assert est.estimate(values) == pytest.approx(sum(values) / 10)


def test_irt_estimate_is_the_map_ability_and_the_p_irt_sum():
    """p-IRT recomputed: θ maximizes the log-posterior on the scored rows (brute force over the grid), and the
    estimate is (scored results + the model's probabilities on the other rows) / n."""
    rng = np.random.default_rng(0)
    a_true, b_true = np.exp(rng.normal(0, 0.3, 40)), rng.normal(0, 1, 40)
    theta = rng.normal(0, 1, 12)
    table = (rng.random((12, 40)) < 1 / (1 + np.exp(-(np.outer(theta, a_true) - b_true)))).astype(float)
    est = fit_task("irt", table, 8, seed=0, key="t")
    assert est.kind == "irt" and len(est.a) == len(est.b) == 40
    y = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    a, b = np.array(est.a), np.array(est.b)
    idx = list(est.rows)

    def log_post(t):
        p = 1 / (1 + np.exp(-(a[idx] * t - b[idx])))
        return sum(math.log(pi) if yi else math.log(1 - pi) for pi, yi in zip(p, y)) - t * t / 2

    best = max(THETA_GRID, key=log_post)
    assert est.ability(y) == pytest.approx(best)
    p_all = 1 / (1 + np.exp(-(a * best - b)))
    others = [j for j in range(40) if j not in idx]
    assert est.estimate(y) == pytest.approx((sum(y) + p_all[others].sum()) / 40)
    # a metric outside [0, 1] has no IRT model: its task falls back to anchors
    assert fit_task("irt", table * 3 - 5, 8, seed=0, key="t").kind == "anchors"
    # the stored form round-trips
    assert TaskEstimator.from_json(est.to_json()).estimate(y) == pytest.approx(est.estimate(y), abs=1e-5)


# -- the harness scores a subset exactly as it scores those rows in full ----------------------------------------

def test_a_subset_scores_its_rows_as_the_full_split_does(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import Evaluator, load_tasks

    suite = load_tasks(zoo / "tasks.yaml")
    model = AutoModelForCausalLM.from_pretrained(zoo / "inc")
    evaluator = Evaluator(suite, model, AutoTokenizer.from_pretrained(zoo / "inc"))
    full = evaluator.evaluate("search")
    rng = random.Random(0)
    rows = {t: sorted(rng.sample(range(evaluator.size(t)), 7)) for t in suite.names}
    steps = []
    part = evaluator.evaluate("search", rows=rows, report=lambda s, v: steps.append(v))
    assert len(steps) == evaluator.reported("search", rows=rows) == 7 * len(suite.names)
    for task, indices in rows.items():
        for metric, values in part.examples[task].items():
            assert values == [full.examples[task][metric][i] for i in indices], (task, metric)
            assert part.tasks[task][metric] == pytest.approx(sum(values) / 7)
        assert part.tasks[task]["n"] == 7
    # not vacuous: some metric of some task differs from row to row
    assert any(len(set(values)) > 1 for task in suite.names for values in full.examples[task].values())


# -- a study -----------------------------------------------------------------------------------------------------

def _config(zoo: Path, tmp: Path, *, rows="0.25", estimator="anchors", n_trials=30, seed=0, extra="") -> Path:
    path = tmp / f"cheap-{estimator}-{seed}.yaml"
    path.write_text(
        f"name: cheap\nbase: {zoo}/base\nsources: [{zoo}/inc, {zoo}/rot, {zoo}/mir]\n"
        f"search:\n  methods: [task_arithmetic, ties]\n  layer_groups: 2\n  sampler: tpe\n  n_trials: {n_trials}\n"
        f"  seed: {seed}\n  evaluation: {{rows: {rows}, estimator: {estimator}, finalists: 3}}\n{extra}"
        f"tasks: {zoo}/tasks.yaml\nobjective: {{inc: 1.0, rot: 1.0, mir: 1.0}}\ndevice: cpu\nthreads: 1\n")
    return path


@pytest.fixture(scope="module")
def cheap_run(zoo, tmp_path_factory):
    from evomerge.search import search

    tmp = tmp_path_factory.mktemp("cheap")
    config = _config(zoo, tmp)
    result = search(config, out=tmp / "run", progress=False)
    return config, tmp / "run", result


def _session(config, run_dir):
    from evomerge.config import load_config
    from evomerge.search import SearchSession

    return SearchSession(load_config(config), storage_url=f"sqlite:///{run_dir / 'study.db'}", device="cpu",
                         progress=False)


def test_estimated_trials_score_their_anchor_rows_and_their_value_is_the_fits_estimate(cheap_run):
    """Every trial after the baselines scores 25 % of each task's rows; its value, recomputed from a full
    evaluation of its recipe at the stored fit's rows and weights, is what the study holds."""
    from optuna.trial import TrialState

    from evomerge.cheap import ESTIMATE_KEY, ESTIMATOR_ATTR, ROWS_KEY
    from evomerge.evaluate.result import objective_value

    config, run_dir, _ = cheap_run
    with _session(config, run_dir) as session:
        study = session.study
        fit = study.user_attrs[ESTIMATOR_ATTR]
        first = session.cheap.fit_at()
        trials = study.get_trials(states=(TrialState.COMPLETE,))
        assert fit["trials"] == [t.number for t in trials if t.number < first]
        assert all(ROWS_KEY in t.user_attrs and ESTIMATE_KEY not in t.user_attrs for t in trials if t.number < first)
        estimated = [t for t in trials if t.number >= first]
        assert estimated and all(ESTIMATE_KEY in t.user_attrs for t in estimated)
        sizes = {task: session.evaluator.size(task) for task in session.suite.names}
        assert estimated[0].user_attrs[ESTIMATE_KEY] == {"rows": sum(rows_to_score(0.25, n) for n in sizes.values()),
                                                          "of": sum(sizes.values())}
        fitted = session.cheap.fitted()
        for t in estimated[-3:]:
            session.bench.materialize(session.recipe_of(t))
            full = session.evaluator.evaluate("search")
            guess = {task: fitted[task].estimate([full.examples[task][full.primary_metrics[task]][i]
                                                  for i in fitted[task].rows]) for task in session.suite.names}
            objective = session.config.objectives[0]
            assert t.values[0] == pytest.approx(objective_value(guess, objective, frozenset()), abs=1e-9)


def test_finalists_are_rescored_in_full_and_the_export_is_the_best_full_score(cheap_run):
    from optuna.trial import TrialState

    from evomerge.cheap import ESTIMATE_KEY, FULL_ATTR
    from evomerge.recipe import Recipe

    config, run_dir, result = cheap_run
    with _session(config, run_dir) as session:
        study = session.study
        trials = study.get_trials(states=(TrialState.COMPLETE,))
        estimated = sorted((t for t in trials if ESTIMATE_KEY in t.user_attrs), key=lambda t: (-t.values[0], t.number))
        finalists = estimated[:3]
        for t in finalists:       # each finalist's full score: a recomputation on every search row
            stored = study.user_attrs[f"{FULL_ATTR}{t.number}"]
            session.bench.materialize(session.recipe_of(t))
            full = session.evaluator.evaluate("search")
            assert stored["values"][0] == pytest.approx(full.objective(session.config.objectives[0]))
            assert stored["scores"] == full.tasks
        assert not any(f"{FULL_ATTR}{t.number}" in study.user_attrs for t in estimated[3:])
        known = {t.number: (t.values[0] if ESTIMATE_KEY not in t.user_attrs
                            else study.user_attrs.get(f"{FULL_ATTR}{t.number}", {}).get("values", [None])[0])
                 for t in trials}
        best = max((n for n, v in known.items() if v is not None), key=lambda n: (known[n], -n))
        assert result.best_trial == best
    # the exported recipe's search score is the full one, never an estimate
    recipe = Recipe.from_yaml(run_dir / "recipe.yaml")
    assert recipe.provenance["score"]["search"] == pytest.approx(known[best])
    summary = (run_dir / "summary.md").read_text()
    assert "## Cheap evaluation" in summary and "| finalist trial | estimate | full search score | error |" in summary
    with open(run_dir / "trials.csv") as fh:
        table = {int(r["number"]): r for r in csv.DictReader(fh)}
    assert table[finalists[0].number]["value_full"] != "" and table[finalists[0].number]["rows_scored"] != "all"
    assert table[0]["rows_scored"] == "all"
    assert float(table[0]["value_full"]) == pytest.approx(float(table[0]["value"]))


def test_the_history_plot_marks_estimates_and_the_finalists_full_scores(cheap_run):
    """Estimated trials hollow, fully scored ones filled; each finalist's full score a star; the best so far
    counts a finalist at its full score."""
    import matplotlib
    from optuna.trial import TrialState

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evomerge.cheap import ESTIMATE_KEY, FULL_ATTR
    from evomerge.export.plots import _history

    config, run_dir, _ = cheap_run
    with _session(config, run_dir) as session:
        trials = session.study.get_trials(states=(TrialState.COMPLETE,))
        fig = _history(plt, session, [], None)
        ax = fig.axes[0]
        points = {}
        for c in ax.collections:
            hollow = len(c.get_facecolors()) == 0 or all(f[3] == 0 for f in c.get_facecolors())
            for x, y in c.get_offsets():
                points.setdefault(int(round(x)), []).append((round(float(y), 9), hollow, c.get_label()))
        for t in trials:
            mark = (round(t.values[0], 9), ESTIMATE_KEY in t.user_attrs)
            assert mark in [(y, h) for y, h, _ in points[t.number]], (t.number, points[t.number])
        stars = {x: y for x, marks in points.items() for y, _, label in marks if label == "finalist: full score"}
        full = {t.number: session.study.user_attrs[f"{FULL_ATTR}{t.number}"]["values"][0] for t in trials
                if f"{FULL_ATTR}{t.number}" in session.study.user_attrs}
        assert full and stars == {n: round(v, 9) for n, v in full.items()}
        line = next(line for line in ax.lines if line.get_label() == "best so far")
        known = [full.get(t.number, t.values[0]) for t in sorted(trials, key=lambda t: t.number)]
        assert line.get_ydata()[-1] == pytest.approx(max(known))
        plt.close(fig)


@pytest.mark.slow     # end to end: whole searches
def test_one_seed_gives_one_cheap_study(zoo, tmp_path):
    from evomerge.search import search

    config = _config(zoo, tmp_path, n_trials=16, estimator="irt")
    runs = []
    for name in ("a", "b"):
        search(config, out=tmp_path / name, progress=False)
        with open(tmp_path / name / "trials.csv") as fh:
            runs.append([(r["number"], r["value"], r["rows_scored"], r["value_full"]) for r in csv.DictReader(fh)])
    assert runs[0] == runs[1]
    assert any(r[2] not in ("all", "") for r in runs[0])


@pytest.mark.slow     # end to end: whole searches
def test_pruning_works_on_the_rows_scored(zoo, tmp_path):
    from optuna.trial import TrialState

    from evomerge.search import search

    config = _config(zoo, tmp_path, n_trials=24, extra="  pruner: median\n")
    search(config, out=tmp_path / "run", progress=False)
    with _session(config, tmp_path / "run") as session:
        states = [t.state for t in session.study.get_trials()]
    assert states.count(TrialState.FAIL) == 0 and states.count(TrialState.COMPLETE) >= 8


@pytest.mark.parametrize("rows, estimator, field", [("2.5", "anchors", "search.evaluation.rows"),
                                                    ("0", "anchors", "search.evaluation.rows"),
                                                    ("0.2", "tiny", "search.evaluation.estimator")])
def test_bad_evaluation_options_exit_2_naming_the_field(zoo, tmp_path, rows, estimator, field):
    config = _config(zoo, tmp_path, rows=rows, estimator=estimator)
    run = subprocess.run([sys.executable, "-m", "evomerge", "validate", str(config)], capture_output=True, text=True)
    assert run.returncode == 2, run.stdout + run.stderr
    assert field in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.slow     # end to end: whole searches
def test_resuming_with_other_evaluation_options_is_refused(zoo, tmp_path):
    from evomerge.search import search
    from evomerge.errors import InputError

    search(_config(zoo, tmp_path, n_trials=10), out=tmp_path / "run", progress=False, export=False)
    with pytest.raises(InputError, match="search.evaluation"):
        search(_config(zoo, tmp_path, n_trials=12, rows="0.5"), out=tmp_path / "run", progress=False)


@pytest.mark.slow     # end to end: whole searches
def test_compare_picks_each_tuned_best_by_full_search_score(zoo, tmp_path):
    """`evomerge compare` with cheap evaluation: each study's finalists are re-scored, and its tuned row is the
    trial best on the whole search split, its search value a full score."""
    import optuna

    from evomerge.cheap import ESTIMATE_KEY, FULL_ATTR
    from evomerge.compare import compare

    result = compare(_config(zoo, tmp_path, n_trials=14), seeds=1, out=tmp_path / "cmp", progress=False)
    tuned = [r for r in result.rows if r["kind"] == "tuned"]
    assert len(tuned) == 2
    for row in tuned:
        study = optuna.load_study(study_name=row["study"], storage=f"sqlite:///{tmp_path / 'cmp' / 'compare.db'}")
        done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
        assert any(ESTIMATE_KEY in t.user_attrs for t in done)
        full = {t.number: (study.user_attrs[f"{FULL_ATTR}{t.number}"]["values"][0] if ESTIMATE_KEY in t.user_attrs
                           else t.values[0]) for t in done
                if ESTIMATE_KEY not in t.user_attrs or f"{FULL_ATTR}{t.number}" in study.user_attrs}
        best = max(full, key=lambda n: (full[n], -n))
        assert row["trial"] == best and row["search_value"] == pytest.approx(full[best])
