"""mergekit configs in: `evomerge merge` of a mergekit YAML gives mergekit-yaml's tensors on the same file;
`evomerge convert` writes a recipe that gives them too; what a recipe cannot say exits 2 naming the key.

The configs are mergekit's own examples (examples/linear.yml, ties with gradients and filters, gradient-slerp,
bio-merge, a passthrough stack) and the configurations of its tests/test_basic_merges.py, rewritten over local
models. float32 configs (mergekit merges in the config's dtype; evomerge in float32).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from modelfactory import make_family, run_mergekit  # noqa: E402

from evomerge import plan  # noqa: E402

pytest.importorskip("mergekit")


def configs(b: str, s0: str, s1: str, s2: str) -> dict[str, dict]:
    return {
        "linear": {"models": [{"model": s0, "parameters": {"weight": 1.0}}, {"model": s1, "parameters": {"weight": 0.3}},
                              {"model": s2, "parameters": {"weight": 0.5}}], "merge_method": "linear"},
        "ties-gradients-filters": {
            "models": [{"model": s0, "parameters": {"density": [0.8, 0.3, 0.1], "weight": [
                           {"filter": "self_attn", "value": [1.0, 0.8, 0.5]}, {"filter": "mlp", "value": 0.7},
                           {"value": 0.9}]}},
                       {"model": s1, "parameters": {"density": [0.1, 0.4, 0.1], "weight": [0.2, 0.8, 0.1]}},
                       {"model": s2, "parameters": {"density": 0.6, "weight": [{"filter": "mlp", "value": [0.5, 1.0]},
                                                                                {"value": 0.4}]}}],
            "merge_method": "ties", "base_model": b,
            "parameters": {"normalize": True, "int8_mask": True,
                           "lambda": [{"filter": "self_attn", "value": 1.2}, {"value": 0.9}]}},
        "gradient-slerp": {
            "slices": [{"sources": [{"model": b, "layer_range": [0, 4]}, {"model": s0, "layer_range": [0, 4]}]}],
            "merge_method": "slerp", "base_model": b,
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "bio-merge": {"models": [{"model": s0, "parameters": {"density": 0.5, "weight": 0.5}},
                                 {"model": s1, "parameters": {"density": 0.5, "weight": 0.5}}],
                      "merge_method": "ties", "base_model": b, "parameters": {"normalize": False, "int8_mask": True}},
        "passthrough-stack": {"slices": [{"sources": [{"model": s0, "layer_range": [0, 3]}]},
                                         {"sources": [{"model": s1, "layer_range": [1, 4]}]},
                                         {"sources": [{"model": s0, "layer_range": [3, 4]}]}],
                              "merge_method": "passthrough"},
        # a frankenmerge: the head from the last slice's model, a repeated slice's output projections scaled
        "passthrough-scaled": {"slices": [{"sources": [{"model": s0, "layer_range": [0, 3]}]},
                                          {"sources": [{"model": s1, "layer_range": [1, 4], "parameters": {"scale": [
                                              {"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5},
                                              {"value": 1.0}]}}]}],
                               "merge_method": "passthrough"},
        # a scale that is a gradient over its slice's blocks, and a stack's last slice of one block (t = 1)
        "passthrough-gradient-scale": {"merge_method": "passthrough", "parameters": {"scale": [
            {"filter": "o_proj", "value": [0.4, 1.2]}, {"filter": "down_proj", "value": 0.8}, {"value": 1.0}]},
            "slices": [{"sources": [{"model": s0, "layer_range": [0, 3]}]},
                       {"sources": [{"model": s1, "layer_range": [2, 3]}]}]},
        "passthrough-bookends": {"slices": [{"sources": [{"model": b, "layer_range": [0, 0]}]},
                                            {"sources": [{"model": s2, "layer_range": [0, 4]}]},
                                            {"sources": [{"model": s1, "layer_range": [0, 0]}]}],
                                 "merge_method": "passthrough"},
        # tests/test_basic_merges.py: two models at weights 0.6 / 0.4, a third as the base
        "basic-task_arithmetic": two(s0, s1, "task_arithmetic", s2),
        "basic-breadcrumbs": two(s0, s1, "breadcrumbs", s2),
        "basic-ties": two(s0, s1, "ties", s2, {"density": 0.3}),
        "basic-model_stock": two(s1, s2, "model_stock", s0),
        "basic-model_stock_filterwise": two(s1, s2, "model_stock", s0, {"filter_wise": True}),
        "basic-slerp": two(s0, s1, "slerp", s0, {"t": 0.35}),
        "basic-linear": two(s0, s1, "linear"),
        "basic-copy": {"merge_method": "passthrough", "models": [{"model": s1}]},
        "basic-passthrough_scale": {"merge_method": "passthrough", "models": [
            {"model": s0, "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
        "basic-stack": {"merge_method": "passthrough", "slices": [{"sources": [{"model": s2, "layer_range": [0, 4]}]}] * 2},
        # mergekit's other methods, with a gradient and a base in karcher's group
        "nuslerp-gradient": {"merge_method": "nuslerp", "base_model": b,
                             "models": [{"model": s0, "parameters": {"weight": [0.2, 0.9]}},
                                        {"model": s1, "parameters": {"weight": 0.5}}]},
        "karcher-with-base": {"merge_method": "karcher", "base_model": b, "models": [{"model": s0}, {"model": s1}]},
        # slices over the layers, each with settings of its own: a gradient runs over its slice's blocks (t = 1 in
        # a one-block slice), the embeddings take the first slice's values, final norm and head the last's
        "slices-slerp": {"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.5}, "slices": [
            {"sources": [{"model": b, "layer_range": [0, 2]}, {"model": s0, "layer_range": [0, 2]}],
             "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.4]}, {"value": 0.2}]}},
            {"sources": [{"model": b, "layer_range": [2, 4]}, {"model": s0, "layer_range": [2, 4]}],
             "parameters": {"t": [{"filter": "mlp", "value": [0.9, 0.6]}]}}]},
        "slices-ties": {"merge_method": "ties", "base_model": b,
                        "parameters": {"lambda": [{"filter": "mlp", "value": 1.1}, {"value": 1.0}], "density": 0.7},
                        "slices": [
            {"sources": [{"model": b, "layer_range": [0, 1]},
                         {"model": s0, "layer_range": [0, 1], "parameters": {"weight": [0.3, 0.9]}},
                         {"model": s1, "layer_range": [0, 1], "parameters": {"weight": 0.4}}]},
            {"sources": [{"model": b, "layer_range": [1, 3]},
                         {"model": s0, "layer_range": [1, 3], "parameters": {"weight": [0.5, 0.1], "density": 0.4}},
                         {"model": s1, "layer_range": [1, 3], "parameters": {"weight": [
                             {"filter": "self_attn", "value": [1.0, 0.2]}, {"value": 0.6}]}}],
             "parameters": {"lambda": 0.8}},
            {"sources": [{"model": b, "layer_range": [3, 4]},
                         {"model": s0, "layer_range": [3, 4], "parameters": {"weight": 0.7}},
                         {"model": s1, "layer_range": [3, 4], "parameters": {"weight": [0.2, 0.5], "density": 0.3}}],
             "parameters": {"normalize": True}}]},
        # part of the layers, and layers in another order: the merged blocks stacked, the embeddings, final norm
        # and head merged as mergekit merges them (the first slice's settings, the last's)
        "slices-partial": {"merge_method": "ties", "base_model": b, "parameters": {"density": 0.6}, "slices": [
            {"sources": [{"model": b, "layer_range": [1, 3]},
                         {"model": s0, "layer_range": [1, 3], "parameters": {"weight": [0.2, 0.9]}},
                         {"model": s1, "layer_range": [1, 3], "parameters": {"weight": 0.5}}]}]},
        "slices-reordered": {"merge_method": "slerp", "base_model": b, "slices": [
            {"sources": [{"model": b, "layer_range": [2, 4]}, {"model": s0, "layer_range": [2, 4]}],
             "parameters": {"t": [0.1, 0.7]}},
            {"sources": [{"model": b, "layer_range": [0, 1]}, {"model": s0, "layer_range": [0, 1]}],
             "parameters": {"t": 0.4}}]},
        # a text model's one module, named: its parameters after a slice's, before the config's
        "modules-ties": {"merge_method": "ties", "base_model": b, "parameters": {"density": 0.9, "weight": 0.2},
                         "modules": {"default": {"parameters": {"density": [0.3, 0.8]}, "models": [
                             {"model": s0, "parameters": {"weight": 0.7}}, {"model": s1}]}}},
        "modules-slices": {"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.1}, "modules": {"default": {
            "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.7]}]},
            "slices": [{"sources": [{"model": b, "layer_range": [0, 3]}, {"model": s0, "layer_range": [0, 3]}]},
                       {"sources": [{"model": b, "layer_range": [3, 4]}, {"model": s0, "layer_range": [3, 4]}],
                        "parameters": {"t": 0.9}}]}}},
    }


def two(a: str, b: str, method: str, base: str | None = None, params: dict | None = None) -> dict:
    config = {"merge_method": method, "models": [{"model": a, "parameters": {"weight": 0.6}},
                                                 {"model": b, "parameters": {"weight": 0.4}}]}
    if base is not None:
        config["base_model"] = base
    if params:
        config["parameters"] = params
    return config


CASES = list(configs("b", "s0", "s1", "s2"))
STACKED_MERGES = ("slices-partial", "slices-reordered")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk-in")
    base, sources = make_family(root / "fam", arch="llama", k=3, layers=4, vocab=50)
    return root, configs(str(base), *(str(s) for s in sources))


def merged(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("case", CASES)
def test_evomerge_merges_a_mergekit_config_to_mergekits_tensors(family, tmp_path, case):
    from evomerge.cli import main

    root, all_configs = family
    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump(all_configs[case] | {"dtype": "float32"}, sort_keys=False))
    assert main(["merge", str(config), "-o", str(tmp_path / "ours")]) == 0
    ours, theirs = merged(tmp_path / "ours"), run_mergekit(config, tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours), [n for n in ours if not torch.equal(ours[n], theirs[n])]
    # the mergekit.yaml evomerge writes beside the merge gives them too (none for a stack of merged blocks: a
    # recipe's merge is of every layer, and its mergekit form has no slices)
    if case in STACKED_MERGES:
        assert not (tmp_path / "ours" / "mergekit.yaml").exists()
    else:
        again = run_mergekit(tmp_path / "ours" / "mergekit.yaml", tmp_path / "mergekit-again")
        assert set(again) == set(ours) and all(torch.equal(again[n], ours[n]) for n in ours)
    # and `evomerge convert` writes a recipe elsewhere that gives the same tensors
    recipe = tmp_path / "elsewhere" / "recipe.yaml"
    recipe.parent.mkdir()
    assert main(["convert", str(config), "-o", str(recipe)]) == 0
    assert "merge_method" not in yaml.safe_load(recipe.read_text())
    assert main(["merge", str(recipe), "-o", str(tmp_path / "converted")]) == 0
    converted = merged(tmp_path / "converted")
    assert all(torch.equal(converted[n], ours[n]) for n in ours)


def test_the_recipe_keeps_the_configs_structure(family, tmp_path):
    """Gradients become one value per block (mergekit's interpolation), filters name filters in their order,
    mergekit's defaults where evomerge's differ (density 1)."""
    from evomerge.recipe import Recipe

    _, all_configs = family
    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump(all_configs["ties-gradients-filters"]))
    recipe = Recipe.from_yaml(config)
    s0, s1, s2 = recipe.sources
    assert recipe.layer_groups == 4
    assert [f.match for f in recipe.name_filters] == ["self_attn", "mlp"]
    attn, mlp = recipe.name_filters
    assert attn.parameters[s0]["weight"] == pytest.approx((1.0, 1 / 3 + 0.8 * 2 / 3, 0.8 * 2 / 3 + 0.5 / 3, 0.5))  # t = l / 3
    assert attn.shared["lambda"] == 1.2 and recipe.shared["lambda"] == 0.9
    assert mlp.parameters[s2]["weight"] == pytest.approx((0.5, 2 / 3, 5 / 6, 1.0))
    assert recipe.parameters[s0]["weight"] == 0.9 and recipe.parameters[s2]["weight"] == 0.4
    assert recipe.parameters[s2]["density"] == 0.6
    assert plan.value(recipe, s0, "weight", 1, "attn", "model.layers.1.self_attn.q_proj.weight") == pytest.approx(
        0.8 + 0.2 / 3)
    assert plan.value(recipe, s0, "weight", 1, "mlp", "model.layers.1.mlp.up_proj.weight") == 0.7
    assert plan.value(recipe, s0, "weight", "io", "embed", "model.embed_tokens.weight") == 0.9
    basic = tmp_path / "basic.yml"
    basic.write_text(yaml.safe_dump(all_configs["basic-task_arithmetic"] | {"merge_method": "dare_ties"}))
    dare = Recipe.from_yaml(basic)
    assert dare.parameters[dare.sources[0]]["density"] == 1.0 and dare.shared["rescale"] == "l1"


def test_slices_become_one_value_per_block(family, tmp_path):
    """Each slice's settings on its own blocks, a gradient spread over the slice (t = 1 in a one-block slice);
    the embeddings at the first slice's t = 0, the final norm and head at the last's, named exactly where their
    filter's first value is not theirs."""
    from evomerge.recipe import Recipe

    _, all_configs = family
    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump(all_configs["slices-ties"]))
    recipe = Recipe.from_yaml(config)
    s0, s1 = recipe.sources
    assert recipe.layer_groups == 4
    assert recipe.parameters[s0]["weight"] == pytest.approx((0.9, 0.5, 0.1, 0.7))
    assert recipe.parameters[s1]["density"] == pytest.approx((0.7, 0.7, 0.7, 0.3))
    assert recipe.shared["lambda"] == pytest.approx((1.0, 0.8, 0.8, 1.0))
    assert plan.value(recipe, s0, "weight", "io", "embed", "model.embed_tokens.weight") == 0.3
    assert plan.value(recipe, s1, "weight", "io", "head", "lm_head.weight") == 0.2
    assert plan.value(recipe, s1, "density", "io", "norm", "model.norm.weight") == 0.3
    assert plan.value(recipe, s1, "weight", 2, "attn", "model.layers.2.self_attn.q_proj.weight") == 0.2
    assert plan.value(recipe, s1, "weight", 2, "mlp", "model.layers.2.mlp.up_proj.weight") == 0.6
    assert recipe.name_filters[0].match in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight")


def _passthrough(config: dict, parameters: dict) -> dict:
    """A passthrough of the config's base model, every block, with these slice parameters."""
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": config["base_model"], "layer_range": [0, 4], "parameters": parameters}]}]}


@pytest.mark.parametrize("change, field, words", [
    (lambda c: c | {"parameters": {"t": [{"pattern": "self_attn", "value": 0.3}, {"value": 0.5}]}},
     "parameters.t[0].pattern", "mergekit 0.1.5 ignores 'pattern'"),
    (lambda c: c | {"modules": {}}, "modules", "no evomerge form"),
    (lambda c: c | {"merge_method": "ranked_ties"}, "merge_method", "unknown merge method"),
    (lambda c: c | {"chat_template": "no-such-template"}, "chat_template", "invalid chat template"),
    (lambda c: _passthrough(c, {"scale": 0.5}), "slices[0].sources[0].parameters.scale", "output projections"),
    (lambda c: _passthrough(c, {"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 3}]}),
     "slices[0].sources[0].parameters.scale", "one number in [0, 2] on the mlp output projection"),
    (lambda c: _passthrough(c, {"scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5},
                                          {"filter": "embed", "value": 0.5}]}),
     "slices[0].sources[0].parameters.scale", "reaches 'model.embed_tokens.weight'"),
    (lambda c: c | {"slices": c["slices"] * 2}, "slices[1].sources[0].layer_range", "in an earlier slice too"),
    (lambda c: c | {"slices": [{"sources": [dict(s, layer_range=[0, 2]) for s in c["slices"][0]["sources"]]},
                               {"sources": c["slices"][0]["sources"][:1]}]}, "slices[1].sources", "other models"),
    (lambda c: c | {"slices": [{"sources": [dict(c["slices"][0]["sources"][0], layer_range=[0, 2]),
                                            dict(c["slices"][0]["sources"][1], layer_range=[2, 4])]}]},
     "slices[0].sources", "different layers"),
    (lambda c: c | {"slices": [{"sources": [dict(s, layer_range=[2, 6]) for s in c["slices"][0]["sources"]]}]},
     "slices[0].sources[0].layer_range", "past the models' 4"),
    (lambda c: c | {"base_model": c["base_model"] + "+some/lora"}, "base_model", "LoRA"),
    (lambda c: c | {"slices": [{"sources": [dict(s, model=s["model"] + "+some/lora") if i else s
                                            for i, s in enumerate(c["slices"][0]["sources"])]}]},
     "slices[0].sources[1].model", "applies a LoRA to another model than base_model"),
    (lambda c: c | {"parameters": {}}, "parameters.t", "no t for tensor"),
])
def test_what_a_recipe_cannot_say_exits_2_naming_the_key(family, tmp_path, capsys, change, field, words):
    from evomerge.cli import main

    _, all_configs = family
    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump(change(dict(all_configs["gradient-slerp"]))))
    assert main(["merge", str(config), "-o", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and str(config) in line and field in line and words in line, line
    assert not (tmp_path / "out").exists()


CHAT_A = "{% for m in messages %}A:{{ m['content'] }}{% endfor %}"
CHAT_B = "{% for m in messages %}B:{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def chat_family(tmp_path_factory):
    """A base with chat template A and two fine-tunes with B, each with a tokenizer."""
    from modelfactory import save_tokenizer

    base, sources = make_family(tmp_path_factory.mktemp("mk-chat") / "fam", k=2, layers=2, vocab=40)
    save_tokenizer([base, *sources])
    for folder, template in ((base, CHAT_A), (sources[0], CHAT_B), (sources[1], CHAT_B)):
        (folder / "chat_template.jinja").write_text(template)
    return base, sources


@pytest.mark.slow
@pytest.mark.parametrize("template", ["chatml", "auto", CHAT_A + " "])
def test_a_chat_template_reaches_the_tokenizer_as_mergekit_writes_it(chat_family, tmp_path, template):
    """chat_template by name (mergekit's own chatml), auto (the most common of the models: B) or as text: the
    merged tokenizer's template is mergekit-yaml's, and the tensors too; `evomerge convert` keeps it."""
    from importlib.resources import files

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    from evomerge.cli import main

    base, sources = chat_family
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": "base",
              "models": [{"model": str(s), "parameters": {"weight": 0.5}} for s in sources],
              "chat_template": template, "dtype": "float32"}
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), "-o", str(tmp_path / "ours")]) == 0
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "theirs"),
              options=MergeOptions(write_model_card=False, quiet=True, device="cpu"))
    ours = AutoTokenizer.from_pretrained(tmp_path / "ours").chat_template
    assert ours == AutoTokenizer.from_pretrained(tmp_path / "theirs").chat_template
    chatml = files("mergekit._data.chat_templates").joinpath("chatml.jinja").read_text()
    assert ours == {"chatml": chatml, "auto": CHAT_B}.get(template, template)
    theirs = merged(tmp_path / "theirs")
    assert all(torch.equal(t, theirs[n]) for n, t in merged(tmp_path / "ours").items())
    assert main(["convert", str(path), "-o", str(tmp_path / "recipe.yaml")]) == 0
    assert main(["merge", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "converted")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "converted").chat_template == ours


def test_a_recipes_chat_template_replaces_the_one_its_tokenizer_came_with(chat_family, tmp_path, capsys):
    """An evomerge recipe's chat_template: its text, or auto (here B, two models of three), written where
    transformers reads it first; a template of no Jinja at all exits 2 naming the field."""
    from evomerge.checkpoint import chat_template_in
    from evomerge.cli import main

    base, sources = chat_family
    recipe = {"method": "task_arithmetic", "base": str(base), "sources": [str(s) for s in sources]}
    for template, expected in ((CHAT_A.replace("A:", "C:"), CHAT_A.replace("A:", "C:")), ("auto", CHAT_B)):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe | {"chat_template": template}))
        out = tmp_path / f"out-{len(template)}"
        assert main(["merge", str(path), "-o", str(out)]) == 0
        assert chat_template_in(out) == expected
        assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    path.write_text(yaml.safe_dump(recipe | {"chat_template": "chatml"}))
    assert main(["merge", str(path), "-o", str(tmp_path / "bad")]) == 2
    assert "chat_template" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_passthrough_scale_of_one_is_no_scale(family, tmp_path):
    """An integer 1 on o_proj and nothing on down_proj: both unscaled, so the recipe's stack has no scale."""
    from evomerge.recipe import Recipe

    _, all_configs = family
    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump(_passthrough(all_configs["gradient-slerp"],
                                                  {"scale": [{"filter": "o_proj", "value": 1}]})))
    recipe = Recipe.from_yaml(config)
    assert len(recipe.layers) == 4 and all(entry.scale == 1.0 for entry in recipe.layers)


def test_filters_in_opposite_orders_exit_2(family, tmp_path, capsys):
    from evomerge.cli import main

    _, all_configs = family
    config = dict(all_configs["bio-merge"])
    a, b = [dict(m) for m in config["models"]]
    a["parameters"] = a["parameters"] | {"weight": [{"filter": "self_attn", "value": 0.2}, {"filter": "q_proj", "value": 0.3},
                                                    {"value": 0.5}]}
    b["parameters"] = b["parameters"] | {"weight": [{"filter": "q_proj", "value": 0.2}, {"filter": "self_attn", "value": 0.3},
                                                    {"value": 0.5}]}
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(config | {"models": [a, b]}))
    assert main(["validate", str(path)]) == 2
    assert "opposite orders" in capsys.readouterr().err


def test_validate_reads_a_mergekit_config(family, tmp_path, capsys):
    from evomerge.cli import main

    _, all_configs = family
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(all_configs["gradient-slerp"]))
    assert main(["validate", str(path)]) == 0
    assert "valid mergekit config, read as a recipe (slerp, 1 sources, 4 layer groups" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk-in-bf16")
    base, sources = make_family(root / "fam", arch="llama", k=3, layers=4, vocab=50, dtype=torch.bfloat16)
    return configs(str(base), *(str(s) for s in sources))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["linear", "gradient-slerp", "basic-model_stock", "basic-model_stock_filterwise",
                                  "basic-slerp", "nuslerp-gradient",
                                  "karcher-with-base", "ties-gradients-filters", "bio-merge", "slices-slerp"])
def test_bf16_checkpoints_merge_to_mergekits_bf16_tensors(bf16_family, tmp_path, case):
    """float32 arithmetic, a bfloat16 output: every entry mergekit's, but where bfloat16 task vectors tie with
    the TIES threshold (METHODS.md: evomerge keeps every tied entry, mergekit exactly k)."""
    from evomerge.cli import main

    config = tmp_path / "mergekit.yml"
    config.write_text(yaml.safe_dump(bf16_family[case] | {"dtype": "float32", "out_dtype": "bfloat16"}))
    assert main(["merge", str(config), "-o", str(tmp_path / "ours")]) == 0
    ours, theirs = merged(tmp_path / "ours"), run_mergekit(config, tmp_path / "mergekit")
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    differing = sum(int((ours[n] != theirs[n]).sum()) for n in ours)
    total = sum(t.numel() for t in ours.values())
    assert differing == 0 if "ties" not in case and case != "bio-merge" else differing <= 0.01 * total, differing
