"""The lookup rule of a tensor's parameter values, table-driven: the first name filter that matches the tensor's
name and sets the parameter, then filters[kind], then filters.io (outside the blocks), then parameters, then the
method's default; a list gives one value per layer group, and its first value outside the blocks."""

from __future__ import annotations

import pytest

from evomerge import plan
from evomerge.errors import InputError
from evomerge.plan import MergePlan
from evomerge.recipe import Recipe

RECIPE = {
    "method": "ties", "base": "b", "sources": ["s0", "s1"], "layer_groups": 2, "lambda": [0.8, 1.2],
    "parameters": {"s0": {"weight": [0.1, 0.2], "density": 0.5}, "s1": {"weight": 0.3}},
    "filters": {"attn": {"s0": {"weight": 0.4}}, "io": {"s1": {"weight": [0.5, 0.6]}}},
    "name_filters": [
        {"match": "q_proj", "lambda": 2.0, "parameters": {"s0": {"density": [0.7, 0.8]}}},
        {"match": "self_attn", "lambda": [3.0, 4.0], "parameters": {"s0": {"weight": 0.9, "density": 0.6}}},
        {"match": "embed", "parameters": {"s1": {"density": 0.25}}},
    ],
}

ROWS = [  # tensor, group, kind -> (s0 weight, s0 density, s1 weight, s1 density, lambda)
    ("model.layers.0.self_attn.q_proj.weight", 0, "attn", (0.9, 0.7, 0.3, 0.5, 2.0)),     # q_proj, then self_attn
    ("model.layers.3.self_attn.q_proj.weight", 1, "attn", (0.9, 0.8, 0.3, 0.5, 2.0)),
    ("model.layers.3.self_attn.k_proj.weight", 1, "attn", (0.9, 0.6, 0.3, 0.5, 4.0)),
    ("model.layers.0.mlp.up_proj.weight", 0, "mlp", (0.1, 0.5, 0.3, 0.5, 0.8)),          # parameters, default
    ("model.layers.2.mlp.up_proj.weight", 1, "mlp", (0.2, 0.5, 0.3, 0.5, 1.2)),
    ("model.layers.2.attn.c_attn.weight", 1, "attn", (0.4, 0.5, 0.3, 0.5, 1.2)),         # filters.attn
    ("model.embed_tokens.weight", "io", "embed", (0.1, 0.5, 0.5, 0.25, 0.8)),            # io: first values
    ("lm_head.weight", "io", "head", (0.1, 0.5, 0.5, 0.5, 0.8)),
]


@pytest.mark.parametrize("tensor, group, kind, expected", ROWS, ids=[r[0] for r in ROWS])
def test_the_lookup_rule(tensor, group, kind, expected):
    recipe = Recipe.from_dict(RECIPE)
    got = tuple(plan.value(recipe, src, name, group, kind, tensor)
                for src in ("s0", "s1") for name in ("weight", "density"))
    got += (plan.shared_values(recipe, group, tensor)["lambda"],)
    assert got == pytest.approx(expected)


def test_tensors_in_one_slot_take_the_same_values():
    recipe = Recipe.from_dict(RECIPE)
    a = plan.slot_key(recipe, "model.layers.0.self_attn.k_proj.weight", 0, "attn")
    assert a == plan.slot_key(recipe, "model.layers.1.self_attn.v_proj.weight", 0, "attn")
    assert a != plan.slot_key(recipe, "model.layers.1.self_attn.q_proj.weight", 0, "attn")


def test_a_plan_holds_the_rules_value_for_every_tensor_of_a_model(tmp_path):
    """MergePlan.of over a real layout: each tensor's slot holds what the rule gives for it, and tensors share a
    slot exactly where their (group, kind, matching name filters) agree."""
    from modelfactory import make_family

    from evomerge.sources import open_sources

    base, sources = make_family(tmp_path / "fam", k=2, layers=4)
    layout = open_sources(str(base), [str(s) for s in sources]).layout
    recipe = Recipe.from_dict(RECIPE | {"base": str(base), "sources": [str(s) for s in sources],
                                        "parameters": {str(sources[0]): {"weight": [0.1, 0.2], "density": 0.5},
                                                       str(sources[1]): {"weight": 0.3}},
                                        "filters": {"attn": {str(sources[0]): {"weight": 0.4}}},
                                        "name_filters": [{"match": "q_proj", "lambda": 2.0}]})
    merge_plan = MergePlan.of(recipe, layout)
    keys = {}
    for tensor, info in layout.tensors.items():
        group = layout.group(tensor, recipe.layer_groups)
        slot = merge_plan.slot(tensor)
        assert (slot.group, slot.kind) == (group, info.kind)
        for i, src in enumerate(recipe.sources):
            for name in ("weight", "density"):
                assert slot.values[name][i] == plan.value(recipe, src, name, group, info.kind, tensor)
                assert merge_plan.value(tensor, src, name) == slot.values[name][i]
        assert slot.shared == plan.shared_values(recipe, group, tensor)
        keys.setdefault(plan.slot_key(recipe, tensor, group, info.kind), set()).add(merge_plan.of_tensor[tensor])
    assert all(len(indices) == 1 for indices in keys.values()) and len(keys) == len(merge_plan.slots)
    assert {s.shared["lambda"] for s in merge_plan.slots} == {0.8, 1.2, 2.0}


def test_name_filters_round_trip_and_change_the_recipes_identity():
    recipe = Recipe.from_dict(RECIPE)
    again = Recipe.from_dict(recipe.to_dict())
    assert again == recipe and again.sha256() == recipe.sha256()
    plain = dict(RECIPE)
    del plain["name_filters"]
    assert Recipe.from_dict(plain).sha256() != recipe.sha256()


@pytest.mark.parametrize("change, field", [
    ({"name_filters": [{"parameters": {"s0": {"weight": 1.0}}}]}, "name_filters[0]"),
    ({"name_filters": [{"match": "mlp", "filter": "x"}]}, "name_filters[0].filter"),
    ({"name_filters": [{"match": "mlp", "t": 0.5}]}, "name_filters[0].t"),          # not a ties parameter
    ({"name_filters": [{"match": "mlp", "parameters": {"s0": {"density": 1.5}}}]}, "name_filters[0].parameters.s0.density"),
    ({"lambda": [1.0, 2.0, 3.0]}, "lambda"),
])
def test_bad_name_filters_name_their_field(change, field):
    with pytest.raises(InputError) as err:
        Recipe.from_dict(RECIPE | change)
    assert field in str(err.value)
