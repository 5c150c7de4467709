"""The search end to end on tiny real models: space, loop, resume, export, bad configs."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from modelfactory import make_search_fixture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def fixture_config(tmp_path_factory) -> Path:
    return make_search_fixture(tmp_path_factory.mktemp("family"), n_trials=7)


@pytest.fixture(scope="module")
def finished_run(fixture_config, tmp_path_factory):
    from evomerge.search import search

    out = tmp_path_factory.mktemp("run") / "run"
    result = search(fixture_config, out=out, progress=False)
    return result


def test_space_names_are_readable_and_decode_to_valid_recipes(fixture_config):
    import optuna

    from evomerge.config import load_config
    from evomerge.plan import MergePlan
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources
    from evomerge.space import SearchSpace

    config = load_config(fixture_config)
    sources = open_sources(config.base, config.sources, relative_to=config.relative_to)
    space = SearchSpace(config, sources.sources, sources.layout)
    names = {d.name for d in space.dims["ties"]}
    assert {"ties.lambda", "ties.s0.weight.g0", "ties.s0.weight.g1", "ties.s0.weight.io",
            "ties.s1.density.g1"} <= names
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):
        trial = study.ask()
        method = space.suggest(trial)
        recipe = space.decode(trial.params)
        assert recipe.method == method
        again = Recipe.from_dict(recipe.to_dict())          # every decoded recipe passes validation
        assert again.sha256() == recipe.sha256()
        for src, params in recipe.parameters.items():
            for value in (params.get("density") or ()):
                assert round(value, 2) == value                 # on the threshold table's grid
        study.tell(trial, 0.0)
    # the baselines really are the sources and the defaults
    alone = MergePlan.of(space.decode(space.source_alone(1)), space.layout)
    block = next(n for n, info in space.layout.tensors.items() if info.kind == "mlp")
    embed = next(n for n, info in space.layout.tensors.items() if info.kind == "embed")
    assert alone.slot(block).values["weight"] == (0.0, 1.0)
    assert alone.slot(embed).values["weight"] == (0.0, 1.0)


def test_search_exports_the_model_it_scored(finished_run, fixture_config, tmp_path):
    """merge(recipe.yaml) is byte-identical to best/, and re-scoring best/ gives the recorded held-out score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import evomerge
    from evomerge.recipe import Recipe

    run = finished_run.run_dir
    for name in ("summary.md", "trials.csv", "recipe.yaml", "study.db", "history.png", "profile.png",
                 "comparison.png", "best/config.json", "best/README.md", "best/tokenizer.json"):
        assert (run / name).is_file(), name
    result = run_cli("merge", str(run / "recipe.yaml"), "-o", str(tmp_path / "again"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (run / "best" / "model.safetensors").read_bytes()

    recipe = Recipe.from_yaml(run / "recipe.yaml")
    recorded = recipe.provenance["score"]["heldout"]
    model = AutoModelForCausalLM.from_pretrained(run / "best")
    tokenizer = AutoTokenizer.from_pretrained(run / "best")
    tasks = fixture_config.parent / "tasks.yaml"
    scores = evomerge.evaluate(model, tasks=tasks, tokenizer=tokenizer, split="heldout")
    assert scores.objective({"ppl": 1.0, "pick": 1.0}) == pytest.approx(recorded, abs=1e-6)


def test_trials_csv_and_summary_match_the_storage(finished_run):
    import optuna

    run = finished_run.run_dir
    study = optuna.load_study(study_name="fixture", storage=f"sqlite:///{run / 'study.db'}")
    trials = study.get_trials()
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    for row, trial in zip(rows, trials):
        assert row["state"] == trial.state.name
        if trial.state.name == "COMPLETE":
            assert float(row["value"]) == pytest.approx(trial.value)
        assert row["method"] == trial.params.get("method", trial.user_attrs.get("method"))
        assert all(float(row[name]) == pytest.approx(value) for name, value in trial.params.items() if name != "method")
    assert list(next(csv.reader((run / "trials.csv").open()))).count("method") == 1   # one column per name
    assert sum(t.state.name == "COMPLETE" for t in trials) == 7
    labels = {t.user_attrs.get("baseline") for t in trials}
    assert {"source:s0", "source:s1", "default:task_arithmetic", "default:ties"} <= labels
    summary = (run / "summary.md").read_text()
    for label in ("source:s0", "source:s1", "default:ties", "best (trial"):
        assert label in summary
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: (t.value, -t.number))
    assert f"Best: trial {best.number}" in summary


def test_summary_gives_each_tasks_share_of_its_best_source(finished_run):
    """The skills kept, recomputed from the held-out scores on the study: per task, the exported trial's score
    over the best source's; a task no source scores above 0 on (ppl's negative log-perplexity) is left out."""
    import optuna

    run = finished_run.run_dir
    study = optuna.load_study(study_name="fixture", storage=f"sqlite:///{run / 'study.db'}")
    heldout = {t.number: study.user_attrs[f"heldout:{t.number}"] for t in study.get_trials()
               if f"heldout:{t.number}" in study.user_attrs}
    sources = [t.number for t in study.get_trials() if t.user_attrs.get("baseline", "").startswith("source:")]
    best_source = max(heldout[n]["pick"]["acc"] for n in sources)
    assert best_source > 0 and max(heldout[n]["ppl"]["neg_log_ppl"] for n in sources) < 0
    share = heldout[finished_run.best_trial]["pick"]["acc"] / best_source
    line = next(x for x in (run / "summary.md").read_text().splitlines() if x.startswith("- Each task's best source"))
    assert line.endswith(f"on the tasks a source scores on): pick {share:.2f}; mean **{share:.3f}**.")
    assert finished_run.summary["kept"] == pytest.approx({"pick": share})       # what benchmarks read


@pytest.mark.slow
def test_rerun_resumes_and_reexport_is_stable(finished_run, fixture_config):
    from evomerge.search import search

    run = finished_run.run_dir
    before = (run / "best" / "model.safetensors").read_bytes()
    again = search(fixture_config, out=run, progress=False)       # nothing left to do: export again
    assert again.best_trial == finished_run.best_trial
    assert (run / "best" / "model.safetensors").read_bytes() == before
    more = search(fixture_config, out=run, n_trials=9, progress=False)   # a larger budget resumes
    import optuna

    study = optuna.load_study(study_name="fixture", storage=f"sqlite:///{run / 'study.db'}")
    assert sum(t.state.name == "COMPLETE" for t in study.get_trials()) == 9
    assert more.best_trial is not None


@pytest.mark.slow
def test_export_a_given_trial(finished_run, tmp_path):
    result = run_cli("export", str(finished_run.run_dir), "--trial", "0")
    assert result.returncode == 0, result.stderr
    from evomerge.recipe import Recipe

    recipe = Recipe.from_yaml(finished_run.run_dir / "recipe.yaml")
    assert recipe.provenance["trial"] == 0
    assert run_cli("export", str(finished_run.run_dir), "--trial", "999").returncode == 2


@pytest.mark.slow
def test_a_reexport_leaves_no_mergekit_yaml_of_another_recipe(tmp_path):
    """mergekit.yaml is written for a recipe mergekit merges the same way, and removed where the exported trial
    has none (dare_ties: mergekit draws other masks): it never describes a trial other than the one exported."""
    import optuna

    config = make_search_fixture(tmp_path / "fam", n_trials=6, methods=("task_arithmetic", "dare_ties"))
    out = tmp_path / "run"
    assert run_cli("search", str(config), "--out", str(out)).returncode == 0
    trials = optuna.load_study(study_name="fixture", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    by_label = {t.user_attrs.get("baseline"): t.number for t in trials}
    for label, written in (("default:task_arithmetic", True), ("default:dare_ties", False),
                           ("default:task_arithmetic", True)):
        assert run_cli("export", str(out), "--trial", str(by_label[label])).returncode == 0
        assert yaml.safe_load((out / "recipe.yaml").read_text())["provenance"]["trial"] == by_label[label]
        assert (out / "mergekit.yaml").exists() == written, label
        if written:
            assert yaml.safe_load((out / "mergekit.yaml").read_text())["merge_method"] == "task_arithmetic"


def test_a_failing_candidate_fails_its_trial_not_the_study(tmp_path, monkeypatch):
    from evomerge.kernel import ResidentMerger
    from evomerge.search import search

    config = make_search_fixture(tmp_path / "fam", n_trials=5)
    real = ResidentMerger.materialize
    calls = {"n": 0}

    def flaky(self, recipe, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, recipe, **kw)

    monkeypatch.setattr(ResidentMerger, "materialize", flaky)
    result = search(config, out=tmp_path / "run", progress=False)
    rows = list(csv.DictReader((result.run_dir / "trials.csv").open()))
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert len(failed) == 1 and "out of memory" in failed[0]["error"]
    assert sum(r["state"] == "COMPLETE" for r in rows) == 5


def _complete(db: Path) -> list[tuple[int, float]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("select t.number, v.value from trials t join trial_values v using (trial_id) "
                                "where t.state = 'COMPLETE' order by t.number").fetchall()
    except sqlite3.Error:
        return []


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_killed_search_resumes_without_losing_trials(tmp_path):
    budget = 40     # trials take ~0.05 s here: a budget the search cannot finish between two looks at it
    config = make_search_fixture(tmp_path / "fam", n_trials=budget)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(config), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_complete(out / "study.db")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    children = _children(proc.pid)           # the sampler process (propose.AheadProposer)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.2)
    assert children and not any(_alive(pid) for pid in children)   # it follows its search, not orphaned
    before = _complete(out / "study.db")
    assert 3 <= len(before) < budget
    result = run_cli("search", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    after = _complete(out / "study.db")
    assert len(after) == budget
    assert set(before) <= set(after)                   # every completed trial kept, with its value
    assert (out / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("patch, expect", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"search": {"methods": ["tiez"]}}, "did you mean 'ties'"),
    ({"search": {"sampler": "tpx"}}, "unknown sampler"),
    ({"search": {"sampler": "cmaes", "methods": ["ties", "task_arithmetic"]}}, "cmaes searches one method only"),
    ({"search": {"layer_groups": 9}}, "9 groups but the model has 4 layers"),
    ({"objective": {}}, "objective"),
    ({"objective": {"nope": 1.0}}, "unknown task 'nope'"),
    ({"search": {"methods": ["slerp"]}}, "slerp"),
    ({"search": {"n_trials": 0}}, "n_trials"),
    ({"tasks": "missing.yaml"}, "missing.yaml"),
    ({"memory_budget": "1MB"}, "memory_budget: 0.00 GB is below the"),
    ({"device": "cudaa"}, "device: unknown device 'cudaa'"),
    ({"objective": {"ppl": 0.0, "pick": 0.0}}, "objective: weights must be >= 0"),
    ({"objective": {"ppl": -1.0, "pick": 1.0}}, "objective: weights must be >= 0"),
    ({"search": {"ranges": {"densty": [0.1, 0.9]}}}, "did you mean 'density'"),
    ({"search": {"ranges": {"density": [0.5, 2.0]}}}, "search.ranges.density"),
    ({"search": {"pruner": "medain"}}, "did you mean 'median'"),
    ({"search": {"storage": "sqlite:////nonexistent/dir/x.db"}}, "search.storage: cannot open the study storage"),
])
@pytest.mark.slow
def test_bad_configs_exit_2_with_one_line_and_write_nothing(tmp_path, patch, expect):
    import yaml

    config = make_search_fixture(tmp_path / "fam")
    data = yaml.safe_load(config.read_text())
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict) and value:
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    result = run_cli("search", str(config), "--out", str(out))
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert str(config) in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_killed_during_export_leaves_no_half_written_export(tmp_path):
    config = make_search_fixture(tmp_path / "fam", n_trials=4)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(config), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith(".best.partial") for p in out.glob(".best.partial*")) or (out / "history.png").exists():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    best = out / "best"
    if best.exists():                                  # whatever is there is whole
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(best)
    assert len(_complete(out / "study.db")) == 4
    result = run_cli("search", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert len(_complete(out / "study.db")) == 4       # nothing lost, nothing rerun
    again = run_cli("merge", str(out / "recipe.yaml"), "-o", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (best / "model.safetensors").read_bytes()
    assert not list(out.glob(".*partial*"))


@pytest.mark.slow
def test_every_file_in_configs_is_valid(zoo, request):
    """configs/ holds search configs and task files; each validates against the test zoo (headers only), the
    smol ones against the smol zoo's pipeline at its test size."""
    from evomerge.validate import validate_file

    files = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        if "smol" in path.name:
            request.getfixturevalue("smol_zoo")
        assert "valid" in validate_file(path), path


@pytest.mark.slow
def test_search_arguments_that_are_bad_input_exit_2_and_write_nothing(tmp_path):
    config = make_search_fixture(tmp_path / "fam", n_trials=3)
    out = tmp_path / "run"
    for args, expect in [(["--n-trials", "0"], "--n-trials: must be at least 1"),
                         (["--storage", "sqlite:////nonexistent/dir/x.db"], "--storage: cannot open")]:
        result = run_cli("search", str(config), "--out", str(out), *args)
        assert result.returncode == 2, result.stderr
        err = result.stderr.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
        assert not out.exists()


@pytest.mark.parametrize("url, driver, fix", [
    ("postgresql://user:pw@dbhost/evomerge", "no PostgreSQL driver is installed", "pip install 'evomerge[postgres]'"),
    ("postgresql+psycopg2://user:pw@dbhost/evomerge", "its driver psycopg2 is not installed", "pip install 'psycopg2-binary'"),
])
@pytest.mark.slow
def test_a_postgresql_url_without_its_driver_exits_2_naming_the_pip_command(tmp_path, url, driver, fix):
    """A fresh install without the driver (here: its import made to fail) gets one line, before anything is written."""
    config = make_search_fixture(tmp_path / "fam", n_trials=3)
    out = tmp_path / "run"
    code = ("import sys; sys.modules['psycopg'] = sys.modules['psycopg2'] = None; "   # as if not installed
            "from evomerge.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "search", str(config), "--out", str(out), "--storage", url],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "--storage: cannot open the study storage postgresql" in err[0], err
    assert driver in err[0] and fix in err[0] and ":pw@" not in err[0], err
    assert not out.exists()


@pytest.mark.slow
def test_resuming_over_another_search_space_is_refused(tmp_path):
    """The samplers cannot resume over changed parameter choices or ranges: every trial would fail."""
    config = make_search_fixture(tmp_path / "fam", n_trials=3)
    out = tmp_path / "run"
    assert run_cli("search", str(config), "--out", str(out), "--no-export").returncode == 0
    before = _complete(out / "study.db")
    config.write_text(config.read_text().replace("methods: [task_arithmetic, ties]", "methods: [ties, dare_ties]"))
    result = run_cli("search", str(config), "--out", str(out), "--n-trials", "5")
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "started over another search space" in err[0] and str(config) in err[0], err
    assert _complete(out / "study.db") == before


@pytest.mark.slow
def test_several_objectives_export_the_balanced_pareto_trial_and_list_the_front(tmp_path):
    import optuna

    config = make_search_fixture(tmp_path / "fam", n_trials=8, sampler="nsga2")
    config.write_text(config.read_text().replace("objective: {ppl: 1.0, pick: 1.0}",
                                                 "objective: [{ppl: 1.0}, {pick: 1.0}]"))
    out = tmp_path / "run"
    result = run_cli("search", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="fixture", storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    front = [t for t in done if not any(all(a >= b for a, b in zip(o.values, t.values)) and o.values != t.values
                                        for o in done)]                 # recomputed: no trial dominates these
    balanced = max(front, key=lambda t: (sum(t.values) / 2, -t.number))
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["provenance"]["trial"] == balanced.number
    summary = (out / "summary.md").read_text()
    assert f"Best: trial {balanced.number}," in summary and "Pareto front" in summary
    for t in front:
        assert f"| {t.number}" in summary
    assert "ppl (held-out)" in summary and "pick (held-out)" in summary
    other = next((t for t in front if t.number != balanced.number), balanced)
    assert run_cli("export", str(out), "--trial", str(other.number)).returncode == 0
    summary = (out / "summary.md").read_text()
    assert f"Exported: trial {other.number}," in summary and f"the best is trial {balanced.number}" in summary
    assert yaml.safe_load((out / "recipe.yaml").read_text())["provenance"]["trial"] == other.number


@pytest.mark.slow
def test_the_python_api_runs_in_a_script_without_a_main_guard(tmp_path):
    """The sampler process is spawned without the user's script: its top-level search does not run twice."""
    config = make_search_fixture(tmp_path / "fam", n_trials=3)
    script = tmp_path / "api.py"
    script.write_text(f"import evomerge\nrun = evomerge.search({str(config)!r}, out={str(tmp_path / 'run')!r}, "
                      f"progress=False)\nprint('best trial', run.best_trial)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "EVOMERGE_SAMPLE_INLINE": "0"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "sampler process stopped" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.count("best trial") == 1


@pytest.mark.slow
def test_resuming_over_other_weights_is_refused(tmp_path):
    """Trials scored on one set of models never mix with another's: a rerun over changed weights exits 2."""
    from safetensors.torch import load_file, save_file

    config = make_search_fixture(tmp_path / "fam", n_trials=3)
    out = tmp_path / "run"
    assert run_cli("search", str(config), "--out", str(out), "--no-export").returncode == 0
    before = _complete(out / "study.db")
    weights = tmp_path / "fam" / "s1" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    result = run_cli("search", str(config), "--out", str(out), "--n-trials", "5")
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "was run on other weights" in err[0] and "s1" in err[0], err
    assert _complete(out / "study.db") == before


@pytest.mark.slow
def test_the_summary_budget_is_the_studys_not_the_last_invocations(tmp_path):
    """A resume asking for fewer trials runs none and leaves the study's budget in the summary."""
    config = make_search_fixture(tmp_path / "fam", n_trials=4)
    out = tmp_path / "run"
    assert run_cli("search", str(config), "--out", str(out)).returncode == 0
    result = run_cli("search", str(config), "--out", str(out), "--n-trials", "2")
    assert result.returncode == 0, result.stderr
    assert len(_complete(out / "study.db")) == 4
    assert "4 complete, 0 pruned, 0 failed (budget 4)" in (out / "summary.md").read_text()


@pytest.mark.parametrize("baselines", [True, False])
@pytest.mark.slow
def test_a_parameter_free_search_runs_its_one_candidate_once(tmp_path, baselines):
    """model_stock has no parameter to search: its one candidate is scored once, whatever n_trials asks."""
    config = make_search_fixture(tmp_path / "fam", n_trials=5, methods=("model_stock",),
                                 )
    config.write_text(config.read_text().replace("  seed: 0\n", f"  seed: 0\n  baselines: {str(baselines).lower()}\n"))
    out = tmp_path / "run"
    result = run_cli("search", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    import optuna

    trials = optuna.load_study(study_name="fixture", storage=f"sqlite:///{out / 'study.db'}").trials
    assert [(t.state.name, t.user_attrs["baseline"]) for t in trials] == [("COMPLETE", "default:model_stock")]
    assert "1 complete, 0 pruned, 0 failed (budget 1)" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_a_one_knob_sweep_is_a_baseline_and_the_summary_states_the_margin_over_it(tmp_path):
    """About a tenth of the budget goes to what a user would tune by hand: a global scale (one weight for every
    source and group; lambda where weights are normalized) and a density, for a sparsifying method, at the
    method's defaults; the summary reports the sweep
    point chosen on the search split, held-out, and the search's margin over it."""
    import optuna

    config = make_search_fixture(tmp_path / "fam", n_trials=40)   # 2 methods: 2 sweep points each
    out = tmp_path / "run"
    result = run_cli("search", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="fixture", storage=f"sqlite:///{out / 'study.db'}")
    sweeps = {t.user_attrs["baseline"]: t for t in study.trials if t.user_attrs.get("baseline", "").startswith("sweep:")}
    assert sorted(sweeps) == ["sweep:task_arithmetic weight=0.38", "sweep:task_arithmetic weight=1.12",
                              "sweep:ties density=0.55"]       # ties normalizes its weights: its scale is lambda,
    #                                                           # whose one point (1.0) is its default
    ta = sweeps["sweep:task_arithmetic weight=0.38"].params
    assert {v for k, v in ta.items() if ".weight" in k} == {0.38} and ta["task_arithmetic.lambda"] == 1.0
    ties = sweeps["sweep:ties density=0.55"].params
    assert {v for k, v in ties.items() if ".density" in k} == {0.55} and {v for k, v in ties.items() if ".weight" in k} == {1.0}

    def heldout(t):
        scores = study.user_attrs[f"heldout:{t.number}"]
        return (scores["ppl"]["neg_log_ppl"] + scores["pick"]["acc"]) / 2

    chosen = max(sweeps.values(), key=lambda t: (t.value, -t.number))
    best = yaml.safe_load((out / "recipe.yaml").read_text())["provenance"]
    summary = (out / "summary.md").read_text()
    line = next(x for x in summary.splitlines() if x.startswith("- Best one-knob sweep"))
    assert chosen.user_attrs["baseline"] in line and f"at {heldout(chosen):.4f}" in line
    assert f"**{best['score']['heldout'] - heldout(chosen):+.4f}**" in line


def test_evomerge_search_stays_callable_once_its_module_is_imported(tmp_path):
    """`evomerge.search(config)`, the README's Python API, after anything imported the module evomerge.search
    (which binds the module to that name on the package): it still runs the search function."""
    import evomerge
    import evomerge.search
    from evomerge.errors import InputError

    with pytest.raises(InputError, match="not found|No such file|missing"):
        evomerge.search(tmp_path / "no-such-config.yaml")
