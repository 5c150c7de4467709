"""search.start: the user's own recipes are the search's first trials, scored as `evomerge eval` scores them,
labelled with their file names, and the summary states the search's margin over them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from modelfactory import make_search_fixture

# off the search grid (0.803, 0.777), another layer grouping (3 blocks of 4 against the search's 2 groups),
# an option the search does not tune (normalize) and a seed of its own: only the file's recipe gives its scores
MINE = {"evomerge_recipe": 1, "method": "ties", "base": "base", "sources": ["s0", "s1"], "seed": 77,
        "normalize": False, "layer_groups": 3,
        "parameters": {"s0": {"weight": [0.95, 0.803, 0.5], "density": 0.777},
                       "s1": {"weight": 0.9, "density": [0.6, 0.5, 0.4]}}}
MERGEKIT = {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": False},
            "models": [{"model": "s0", "parameters": {"weight": [0.2, 1.1], "density": 0.6}},
                       {"model": "s1", "parameters": {"weight": [{"filter": "mlp", "value": 0.4}, {"value": 0.9}],
                                                      "density": 0.7}}]}
THEIRS = {"evomerge_recipe": 1, "method": "task_arithmetic", "base": "base", "sources": ["s0", "s1"],
          "lambda": 0.7, "parameters": {"s0": {"weight": 0.6}, "s1": {"weight": 1.3}}}


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    from evomerge.search import search

    root = tmp_path_factory.mktemp("start")
    config = make_search_fixture(root / "fam", n_trials=8, layer_groups=2)
    (root / "fam" / "mine.yaml").write_text(yaml.safe_dump(MINE))
    (root / "fam" / "recipes").mkdir()
    (root / "fam" / "recipes" / "theirs.yaml").write_text(yaml.safe_dump(THEIRS | {
        "base": "../base", "sources": ["../s0", "../s1"]}))         # relative to its own folder
    (root / "fam" / "mergekit.yml").write_text(yaml.safe_dump(MERGEKIT))      # a mergekit config starts too
    config.write_text(config.read_text().replace(
        "  seed: 0\n", "  seed: 0\n  start: [mine.yaml, recipes/theirs.yaml, mergekit.yml]\n"))
    return config, search(config, out=root / "run", progress=False)


def evomerge_eval(recipe: Path, tasks: Path, tmp_path: Path) -> dict:
    from evomerge.cli import main

    out = tmp_path / f"{recipe.stem}.json"
    assert main(["eval", str(recipe), "--tasks", str(tasks), "--split", "search", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_first_trials_are_the_users_recipes_scored_as_evomerge_eval_scores_them(started, tmp_path):
    import optuna

    config, result = started
    study = optuna.load_study(study_name="fixture", storage=f"sqlite:///{result.run_dir / 'study.db'}")
    first, second, third = study.trials[:3]
    assert [t.user_attrs["baseline"] for t in (first, second, third)] == ["start:mine.yaml", "start:theirs.yaml",
                                                                        "start:mergekit.yml"]
    for trial, name in ((first, "mine.yaml"), (second, "recipes/theirs.yaml"), (third, "mergekit.yml")):
        evaluated = evomerge_eval(config.parent / name, config.parent / "tasks.yaml", tmp_path)
        tasks = evaluated.get("tasks", evaluated)
        assert trial.user_attrs["scores"]["pick"]["acc"] == tasks["pick"]["acc"]
        assert trial.user_attrs["scores"]["ppl"]["neg_log_ppl"] == tasks["ppl"]["neg_log_ppl"]
    # the samplers see the nearest point of the space: the per-group values at each search group's first block
    # (blocks 0 and 2 of 4 are in the recipe's groups 0 and 1), snapped to the grid
    assert first.params["method"] == "ties"
    assert first.params["ties.s0.weight.g0"] == 0.95 and first.params["ties.s0.weight.g1"] == 0.8
    assert first.params["ties.s0.density.g1"] == 0.78 and first.params["ties.s1.density.g1"] == 0.5


def test_the_summary_labels_them_and_states_the_margin(started):
    _, result = started
    summary = (result.run_dir / "summary.md").read_text()
    best = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())["provenance"]["score"]["heldout"]
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| start:")}
    assert set(rows) == {"start:mine.yaml", "start:theirs.yaml", "start:mergekit.yml"}
    for name in ("mine.yaml", "theirs.yaml", "mergekit.yml"):
        table = float(rows[f"start:{name}"].split("|")[-2].strip().strip("*"))      # 3 decimals
        line = next(x for x in summary.splitlines() if x.startswith(f"- Your recipe {name}:"))
        heldout = float(line.split("held-out ")[1].split()[0])
        assert abs(heldout - table) <= 6e-4 and f"**{best - heldout:+.4f}**" in line


@pytest.mark.parametrize("change, field, message", [
    (lambda r: r | {"sources": ["s1", "s0"]}, "search.start[0]", "are not the config's"),
    (lambda r: r | {"method": "della"}, "search.start[0]", "not among search.methods"),
    (lambda r: r | {"base": "s1"}, "search.start[0]", "the base is also listed as a source"),
    (lambda r: r | {"dtype": "bfloat16"}, "search.start[0]", "dtype bfloat16 is not the config's"),
    (None, "search.start[0]", "not found"),
])
def test_a_bad_start_is_one_clear_line_before_weights_load(tmp_path, change, field, message):
    from evomerge.config import load_config
    from evomerge.errors import InputError

    config = make_search_fixture(tmp_path / "fam", n_trials=4)
    if change is not None:
        (tmp_path / "fam" / "mine.yaml").write_text(yaml.safe_dump(change(dict(MINE))))
    config.write_text(config.read_text().replace("  seed: 0\n", "  seed: 0\n  start: mine.yaml\n"))
    with pytest.raises(InputError, match=message) as err:
        load_config(config)
    assert field in str(err.value) or "mine.yaml" in str(err.value)
