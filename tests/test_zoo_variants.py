"""Variants of the zoo: a structure per k, a valid search config, and headroom the saved models reproduce."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.errors import InputError
from evomerge.yamlio import load_yaml
from evomerge.zoo import variants
from evomerge.zoo.variants import TUNED_MODES, build_variant, suite_problem, variant_spec

pytestmark = pytest.mark.usefixtures("one_thread")

TUNED = range(1, 9)
BUILT = 1   # the quickest tuned variant to build, with the widest margin over the target (0.5 against 0.05)


def _structure(k: int) -> tuple:
    spec = variant_spec(k)
    return spec.experts, spec.layers, spec.hidden, spec.tuned, spec.blocks, spec.instruct_blocks, spec.pace


def test_variant_spec_is_a_function_of_k() -> None:
    assert [variant_spec(k) for k in TUNED] == [variant_spec(k) for k in TUNED]
    assert len({_structure(k) for k in TUNED}) == len(TUNED)


def test_tuned_variants_cover_the_structures() -> None:
    specs = [variant_spec(k) for k in TUNED]
    assert {len(s.experts) for s in specs} == {2, 3, 4, 5}
    assert {s.layers for s in specs} == {2, 3, 4, 5, 6}
    assert min(s.hidden for s in specs) == 32 and max(s.hidden for s in specs) == 96
    assert {s.tuned for s in specs} == set(TUNED_MODES)
    assert {s.instruct for s in specs} == {True, False}
    assert {s.pace for s in specs} == {"fast", "normal", "slow"}
    assert any({"rev", "sort"} <= set(s.experts) and len(s.experts) > 2 for s in specs)
    first = variant_spec(1)   # a 3-block base and two full fine-tunes, on digits and on letters
    assert (first.layers, first.experts, first.tuned, first.instruct) == (3, ("inc", "rot"), "full", False)


@pytest.mark.parametrize("k", [*TUNED, 9, 17, 40])
def test_every_structure_is_buildable(k: int) -> None:
    spec = variant_spec(k)
    assert 2 <= len(spec.experts) <= 5 and set(spec.experts) - {"rev", "sort"}
    assert 2 <= spec.layers <= 6 and 32 <= spec.hidden <= 96
    assert 1 <= spec.layer_groups <= spec.layers
    assert all(b and set(b) <= set(range(spec.layers)) for b in spec.blocks)
    assert set(spec.instruct_blocks) <= set(range(spec.layers))


@pytest.mark.parametrize("k", [0, -1, True, 1.5, "2"])
def test_bad_variant_is_refused(k: object) -> None:
    with pytest.raises(InputError, match="variant"):
        variant_spec(k)   # type: ignore[arg-type]


def test_cli_refuses_a_negative_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v"
    assert main(["zoo", "build", str(out), "--variant", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evomerge: error: ") and "variant" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_variant_conflicts_with_a_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "build", str(tmp_path / "v"), "--variant", "1", "--size", "test"]) == 2
    assert "--size" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_variant(tmp_path_factory.mktemp("variant") / f"v{BUILT}", variant=BUILT, progress=False)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "zoo.json").read_text())


@pytest.mark.slow
def test_layout_and_manifest(variant: Path) -> None:
    manifest = _manifest(variant)
    spec = variant_spec(BUILT)
    assert (manifest["variant"], manifest["seed"]) == (BUILT, 0)
    assert manifest["structure"] == json.loads(json.dumps(spec.describe()))
    for folder in ["base", *spec.experts]:
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (variant / folder).iterdir()}
        assert json.loads((variant / folder / "config.json").read_text())["num_hidden_layers"] == spec.layers
    headroom = manifest["headroom"]
    assert headroom["passed"] and headroom["headroom"] >= variants.HEADROOM_TARGET
    assert headroom["attempts"][-1] == {"attempt": len(headroom["attempts"]) - 1, "passed": True,
                                        "train_seed": variants.train_seed(0, BUILT, len(headroom["attempts"]) - 1),
                                        "headroom": headroom["headroom"]}
    assert not [p for p in variant.parent.iterdir() if p.name.startswith(".")]   # no staging folder left


@pytest.mark.slow
def test_problem_validates(variant: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evomerge.config import load_config

    monkeypatch.chdir(tmp_path)   # paths resolve relative to problem.yaml, wherever the search runs
    raw = load_yaml(variant / "problem.yaml")
    assert "sampler" not in raw["search"]
    config = load_config(variant / "problem.yaml")
    spec = variant_spec(BUILT)
    assert config.sources == list(spec.experts) and config.base == "base"
    assert config.objective == {name: 1.0 for name in spec.experts}
    assert config.search.methods == ["task_arithmetic", "ties", "dare_ties"]
    assert (config.search.layer_groups, config.search.n_trials, config.threads, config.device) == \
        (spec.layer_groups, 100, 1, "cpu")


@pytest.mark.slow
def test_headroom_is_recomputed_from_the_models(variant: Path) -> None:
    """The best source alone and the best grid point, scored again from the saved folders: zoo.json's numbers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import Evaluator, evaluate
    from evomerge.kernel import ResidentMerger
    from evomerge.sources import open_sources
    from evomerge.zoo.variant_headroom import grid_recipe, objective_suite

    headroom = _manifest(variant)["headroom"]
    objective = headroom["objective"]
    suite = objective_suite(variant, objective)
    tokenizer = AutoTokenizer.from_pretrained(variant / "base")
    best = headroom["best_source"]
    model = AutoModelForCausalLM.from_pretrained(variant / best).eval()
    alone = evaluate(model, suite, tokenizer=tokenizer, split="heldout").objective(objective)
    assert alone == headroom["sources_alone"][best]["heldout"]
    assert alone == max(s["heldout"] for s in headroom["sources_alone"].values())

    sources = list(objective)
    point = headroom["grid"]["best"]
    assert all(len(w) == headroom["grid"]["layer_groups"] for w in point["weights"].values())
    with ResidentMerger(open_sources("base", sources, relative_to=variant), device="cpu",
                        methods=["task_arithmetic"]) as merger, \
            Evaluator(suite, merger.model, tokenizer) as evaluator:
        merger.materialize(grid_recipe(sources, point["weights"]))
        search = evaluator.evaluate("search").objective(objective)
        heldout = evaluator.evaluate("heldout").objective(objective)
    assert (search, heldout) == (point["search"], point["heldout"])
    assert headroom["headroom"] == heldout - alone


@pytest.mark.slow
def test_suite_problem_reuses_the_cache(variant: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(variant, tmp_path / f"v{BUILT}")

    def no_build(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a current cached variant was rebuilt")

    monkeypatch.setattr(variants, "build_variant", no_build)
    monkeypatch.setenv("EVOMERGE_SUITE", str(tmp_path))
    assert suite_problem(BUILT) == tmp_path / f"v{BUILT}"
    assert suite_problem(BUILT, cache=tmp_path) == tmp_path / f"v{BUILT}"
    with pytest.raises(AssertionError, match="rebuilt"):
        suite_problem(BUILT, cache=tmp_path / "elsewhere")
