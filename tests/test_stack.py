"""Layer stacking (METHODS.md, "Layer stacking"): passthrough recipes against mergekit 0.1.5's passthrough, PS + DFS
(`merged` blocks), the resident stack (no weight copied) against the exported folder, token for token, and the
refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from modelfactory import make_family, run_mergekit
from safetensors.torch import load_file

from evomerge.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = [{"model": "base", "layer": 0}, {"model": "s0", "layer": 0}, {"model": "s1", "layer": 1, "scale": 0.5},
          {"model": "base", "layer": 1}, {"model": "s0", "layer": 3, "scale": 1.5}, {"model": "s0", "layer": 0},
          {"model": "s1", "layer": 2, "scale": {"attn": 0.0, "mlp": 1.25}}]


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_stack_is_mergekits_passthrough(tmp_path, arch):
    """Blocks repeated, reordered and scaled, from three models: the tensors mergekit's passthrough makes of the
    mergekit.yaml beside the merge, exactly; num_hidden_layers (n_layer) is the stack's length."""
    from evomerge.export import merge_to_folder

    make_family(tmp_path, arch=arch, k=2, layers=4, vocab=50)
    recipe = write(tmp_path / "stack.yaml", {"evomerge_recipe": 1, "method": "passthrough", "base": "base",
                                             "dtype": "float32", "layers": LAYERS})
    out = merge_to_folder(recipe, tmp_path / "ours")
    ours = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == len(LAYERS)
    theirs = run_mergekit(out / "mergekit.yaml", tmp_path / "mergekit")
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # and against the files: block 2 is s1's block 1, its output projections halved
    source = load_file(str(tmp_path / "s1" / "model.safetensors"))
    inner = {"llama": ("model.layers.", "self_attn.o_proj.weight", "self_attn.q_proj.weight", "mlp.down_proj.weight"),
             "gpt2": ("transformer.h.", "attn.c_proj.weight", "attn.c_attn.weight", "mlp.c_proj.weight")}[arch]
    prefix, scaled, kept, down = inner
    assert torch.equal(ours[f"{prefix}2.{scaled}"], source[f"{prefix}1.{scaled}"] * 0.5)
    assert torch.equal(ours[f"{prefix}2.{kept}"], source[f"{prefix}1.{kept}"])
    # block 6 is s1's block 2, its attention output zeroed and its MLP output times 1.25 (a scale per kind)
    assert torch.equal(ours[f"{prefix}6.{scaled}"], torch.zeros_like(source[f"{prefix}2.{scaled}"]))
    assert torch.equal(ours[f"{prefix}6.{down}"], source[f"{prefix}2.{down}"] * 1.25)


def test_ps_plus_dfs_stacks_the_merged_blocks(tmp_path):
    """A `merged` entry is a block of the recipe's own parameter-space merge."""
    from evomerge.build import merger_for

    make_family(tmp_path, arch="llama", k=2, layers=4, vocab=50)
    ps = {"evomerge_recipe": 1, "method": "task_arithmetic", "base": "base", "sources": ["s0", "s1"],
          "dtype": "float32", "layer_groups": 2, "parameters": {"s0": {"weight": [0.3, 0.9]}, "s1": {"weight": 0.6}}}
    merged = merger_for(write(tmp_path / "ps.yaml", ps)).state_dict()
    layers = [{"model": "merged", "layer": 3}, {"model": "s1", "layer": 0}, {"model": "merged", "layer": 0, "scale": 0.25}]
    stack = merger_for(write(tmp_path / "both.yaml", ps | {"layers": layers})).state_dict()
    s1 = load_file(str(tmp_path / "s1" / "model.safetensors"))
    assert torch.equal(stack["model.layers.0.mlp.up_proj.weight"], merged["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(stack["model.layers.1.mlp.up_proj.weight"], s1["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(stack["model.layers.2.mlp.down_proj.weight"], merged["model.layers.0.mlp.down_proj.weight"] * 0.25)
    assert "model.layers.3.mlp.up_proj.weight" not in stack


def test_the_resident_stack_generates_as_the_exported_folder(zoo: Path, tmp_path):
    """The stack made of resident blocks (shared between positions, scaled by hooks, no weight copied) decodes
    greedily with a KV cache to the same tokens as its exported folder, and scores the same on the zoo's
    generate tasks through the evaluator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.build import open_recipe_sources
    from evomerge.evaluate import evaluate, load_tasks
    from evomerge.export import merge_to_folder
    from evomerge.recipe import Recipe
    from evomerge.stack import ResidentStack

    layers = [{"model": "zoo/base", "layer": 0}, {"model": "zoo/inc", "layer": 1}, {"model": "zoo/inc", "layer": 2},
              {"model": "zoo/rot", "layer": 2, "scale": 0.7}, {"model": "zoo/inc", "layer": 3},
              {"model": "zoo/inc", "layer": 3, "scale": 0.3}, {"model": "zoo/rot", "layer": 1, "scale": {"attn": 0.6,
                                                                                           "mlp": 1.3}}]
    path = write(tmp_path / "stack.yaml", {"evomerge_recipe": 1, "method": "passthrough", "base": "zoo/base",
                                           "layers": layers})
    exported = merge_to_folder(path, tmp_path / "out")
    recipe = Recipe.from_yaml(path)
    models = {m: AutoModelForCausalLM.from_pretrained(zoo / m.split("/")[1]).eval() for m in ("zoo/base", "zoo/inc",
                                                                                               "zoo/rot")}
    pointers = {p.data_ptr() for m in models.values() for p in m.parameters()}
    stack = ResidentStack(models, base="zoo/base", layout=open_recipe_sources(recipe).layout)
    resident = stack.apply(recipe.layers)
    assert {p.data_ptr() for p in resident.parameters()} <= pointers          # no weight copied
    assert resident.config.num_hidden_layers == len(layers)
    folder = AutoModelForCausalLM.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    rows = [json.loads(line) for line in (zoo / "data" / "inc.heldout.jsonl").read_text().splitlines()[:25]]
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
        ours = resident.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        theirs = folder.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(ours, theirs), row
    suite = load_tasks(zoo / "tasks.yaml")
    a = evaluate(resident, suite, tokenizer=tokenizer, split="heldout")
    b = evaluate(folder, suite, tokenizer=tokenizer, split="heldout")
    assert a.outputs == b.outputs                  # every decoded answer the same
    for task, metrics in a.tasks.items():          # scores the same; log-probabilities to float32 rounding (a
        for metric, value in metrics.items():      # scaled output is not bit for bit a scaled weight's)
            assert value == (pytest.approx(b.tasks[task][metric], rel=1e-5) if "logprob" in metric
                             else b.tasks[task][metric]), (task, metric)
    assert any(v.get("exact_match", 0) > 0 for v in a.tasks.values())       # a stack that does something
    stack.restore()
    assert len(models["zoo/base"].model.layers) == 4 and models["zoo/base"].config.num_hidden_layers == 4


BAD = {   # name -> (change to the recipe, field named, text)
    "layer-out-of-range": ({"layers": [{"model": "base", "layer": 0}, {"model": "s0", "layer": 4}]},
                           "layers[1].layer", "has 4 blocks"),
    "unknown-model": ({"layers": [{"model": "s9", "layer": 0}], "sources": ["s0"]}, "layers[0].model",
                      "not among the models"),
    "empty-stack": ({"layers": []}, "layers", "lists none"),
    "scale-range": ({"layers": [{"model": "s0", "layer": 0, "scale": 3.5}]}, "layers[0].scale", "outside [0, 2]"),
    "merged-without-a-merge": ({"layers": [{"model": "merged", "layer": 0}], "sources": ["s0"]}, "layers[0].model",
                               "not among the models"),
    "unknown-key": ({"layers": [{"model": "s0", "layer": 0, "repeat": 2}]}, "layers[0].repeat", "unknown key"),
    "embed-from-merged-without-a-merge": ({"embed_from": "merged"}, "embed_from", "not among the models"),
    "scale-kind": ({"layers": [{"model": "s0", "layer": 0, "scale": {"attn": 0.5, "norm": 2}}]},
                   "layers[0].scale.norm", "unknown key"),
}


def test_embeddings_and_head_from_other_models_are_mergekits_first_and_last_slices(tmp_path):
    """embed_from and head_from: the embeddings of one source, the final norm and head of another; the
    mergekit.yaml beside the merge (empty slices of those models at either end) gives the same tensors."""
    from evomerge.export import merge_to_folder

    make_family(tmp_path, arch="llama", k=2, layers=4, vocab=50)
    recipe = write(tmp_path / "stack.yaml", {"evomerge_recipe": 1, "method": "passthrough", "base": "base",
                                             "dtype": "float32", "layers": LAYERS[:3], "embed_from": "s1",
                                             "head_from": "s0"})
    out = merge_to_folder(recipe, tmp_path / "ours")
    ours = load_file(str(out / "model.safetensors"))
    base, s0, s1 = (load_file(str(tmp_path / s / "model.safetensors")) for s in ("base", "s0", "s1"))
    assert torch.equal(ours["model.embed_tokens.weight"], s1["model.embed_tokens.weight"])
    assert torch.equal(ours["model.norm.weight"], s0["model.norm.weight"])
    assert not torch.equal(base["model.embed_tokens.weight"], s1["model.embed_tokens.weight"])
    assert not torch.equal(base["model.norm.weight"], s0["model.norm.weight"])
    theirs = run_mergekit(out / "mergekit.yaml", tmp_path / "mergekit")
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)


@pytest.mark.parametrize("case", BAD)
def test_bad_stacks_exit_2_naming_the_entry(tmp_path, capsys, case):
    change, named, text = BAD[case]
    make_family(tmp_path, arch="llama", k=1, layers=4, vocab=50)
    recipe = {"evomerge_recipe": 1, "method": "passthrough", "base": "base", "layers": LAYERS[:2]} | change
    path = write(tmp_path / "bad.yaml", recipe)
    for args in (["validate", str(path)], ["merge", str(path), "-o", str(tmp_path / "out")]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0] and text in err[0], err
    assert not (tmp_path / "out").exists()


def _search_config(tmp_path: Path, space: str, *, sampler: str = "tpe", n_trials: int = 8, dfs: dict | None = None,
                   methods: tuple[str, ...] = ("task_arithmetic",)) -> Path:
    path = tmp_path / f"{space.replace('+', '-')}.yaml"
    return write(path, {"name": f"stack-{space.replace('+', '-')}", "base": "zoo/base",
                        "sources": ["zoo/inc", "zoo/rot", "zoo/mir"],
                        "search": {"methods": list(methods), "layer_groups": 2, "space": space, "sampler": sampler,
                                   "n_trials": n_trials, "seed": 0, "dfs": dfs or {"repeats": 2, "max_layers": 5}},
                        "tasks": "zoo/tasks.yaml", "objective": {"inc": 1.0, "rot": 1.0}, "device": "cpu",
                        "threads": 1})


def test_the_dfs_space_decodes_its_slots_in_order(zoo: Path, tmp_path):
    """r passes over every model's blocks in order; a block is in where its include is >= 0.5, with its scale;
    at most max_layers; a source alone is its blocks in order; no block is an EmptyStack. With ps+dfs the
    defaults are the merge alone."""
    from evomerge.config import load_config
    from evomerge.recipe import StackEntry
    from evomerge.sources import open_sources
    from evomerge.space import EmptyStack, SearchSpace

    config = load_config(_search_config(tmp_path, "dfs"))
    sources = open_sources(config.base, config.sources, relative_to=config.relative_to)
    space = SearchSpace(config, sources.sources, sources.layout)
    assert space.slots[:5] == [("zoo/inc", 0, 0), ("zoo/inc", 1, 0), ("zoo/inc", 2, 0), ("zoo/inc", 3, 0),
                               ("zoo/rot", 0, 0)] and len(space.slots) == 2 * 3 * 4
    params = {d.name: 0.0 if d.param.name == "include" else 1.0 for d in space.dims["passthrough"]}
    params |= {"dfs.r1.rot.b2": 0.5, "dfs.r1.rot.b2.scale": 0.7, "dfs.r0.mir.b3": 0.93, "dfs.r0.inc.b0": 0.51,
               "dfs.r0.inc.b1": 0.49}
    recipe = space.decode(params)
    assert recipe.method == "passthrough" and not recipe.merges
    assert recipe.layers == (StackEntry("zoo/inc", 0), StackEntry("zoo/mir", 3), StackEntry("zoo/rot", 2, 0.7))
    many = params | {f"dfs.r1.mir.b{b}": 1.0 for b in range(4)}
    assert len(space.decode(many).layers) == 5                       # max_layers
    assert space.decode(space.source_alone(1)).layers == tuple(StackEntry("zoo/rot", b) for b in range(4))
    with pytest.raises(EmptyStack):
        space.decode({name: 0.0 for name in params})

    both = load_config(_search_config(tmp_path, "ps+dfs"))
    space = SearchSpace(both, sources.sources, sources.layout)
    assert len(space.slots) == 2 * 4 * 4 and space.slots[0] == ("merged", 0, 0)
    default = space.decode(space.defaults("task_arithmetic"))
    assert default.method == "task_arithmetic" and default.layers == tuple(StackEntry("merged", b) for b in range(4))


@pytest.mark.parametrize("space,sampler", [("dfs", "cmaes"), ("ps+dfs", "tpe")])
@pytest.mark.slow
def test_a_stack_search_exports_the_model_it_scored(zoo: Path, tmp_path, space, sampler):
    """The search scores resident stacks; its best/ is the model `evomerge merge recipe.yaml` rebuilds byte for
    byte, whose search-split score is the best trial's. A candidate with no block fails its trial, not the study."""
    from transformers import AutoModelForCausalLM

    from evomerge.config import load_config
    from evomerge.evaluate import evaluate, load_tasks
    from evomerge.export import merge_to_folder
    from evomerge.search import SearchSession, search

    path = _search_config(tmp_path, space, sampler=sampler)
    run = search(str(path), out=str(tmp_path / "run"), progress=False)
    again = merge_to_folder(run.run_dir / "recipe.yaml", tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (run.run_dir / "best" / "model.safetensors").read_bytes()
    best = next(r for r in run.summary["rows"] if r["kind"] == "best" or "= best" in r["label"])
    model = AutoModelForCausalLM.from_pretrained(run.run_dir / "best").eval()
    from transformers import AutoTokenizer

    scores = evaluate(model, load_tasks(zoo / "tasks.yaml"), tokenizer=AutoTokenizer.from_pretrained(again),
                      split="search")
    assert (scores.primary("inc") + scores.primary("rot")) / 2 == pytest.approx(best["search_mean"])

    config = load_config(path)
    with SearchSession(config, storage_url=f"sqlite:///{tmp_path / 'empty.db'}", device="cpu",
                       progress=False) as session:
        empty = {d.name: 0.0 for d in session.space.dims[session.space.methods[0]] if d.slot is not None}
        session.study.enqueue_trial(empty, skip_if_exists=False)
        session.run(len(session.study.get_trials()) + 1)
        states = [t.state.name for t in session.study.get_trials()]
        assert "FAIL" in states and "COMPLETE" in states
