"""LoRA adapters as sources (METHODS.md, "Task vectors from LoRA adapters").

References: peft's own merge_and_unload of each adapter, and mergekit 0.1.5 merging the
resulting full models (its BASE+ADAPTER syntax runs that merge itself). The adapters are
made by peft with random factors on a tiny Llama (and a GPT-2, whose Conv1D stores its
weight transposed: fan_in_fan_out), with different ranks, rsLoRA and an embedding target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from modelfactory import make_adapter, make_family, run_mergekit

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTERS = {   # name -> peft LoraConfig arguments
    "a0": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "a1": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj", "o_proj"]),
    "a2": dict(r=3, lora_alpha=5, target_modules=["embed_tokens", "gate_proj"]),
}


def merged_by_peft(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """root/base, root/s0 (a full fine-tune) and the adapters root/a0..a2, all over the base."""
    root = tmp_path_factory.mktemp("adapters")
    make_family(root, arch="llama", k=1, layers=4, vocab=50)
    for i, (name, lora) in enumerate(ADAPTERS.items()):
        make_adapter(root / "base", root / name, seed=i, **lora)
    return root


def write_recipe(root: Path, method: str, sources: list[str], **extra) -> Path:
    values = {"a0": {"weight": [0.8, 0.4]}, "a1": {"weight": 1.1}, "a2": {"weight": [0.6, 0.9]},
              "s0": {"weight": 0.5}}
    parameters = {s: dict(values[s], **({"density": 0.6} if "ties" in method else {})) for s in sources}
    recipe = {"evomerge_recipe": 1, "method": method, "base": "base", "sources": sources, "seed": 3,
              "dtype": "float32", "layer_groups": 2, "parameters": parameters,
              "filters": {"mlp": {sources[0]: {"weight": 0.3}}}, **extra}
    path = root / f"recipe-{method}-{len(sources)}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].to(ours[name].dtype), atol=atol, rtol=0, msg=name)


CASES = {
    "task_arithmetic": ("task_arithmetic", ["a0", "a1", "a2"], {"lambda": 0.9}),
    "linear": ("linear", ["a0", "a1", "a2"], {}),
    "ties": ("ties", ["a0", "a1", "a2"], {"lambda": 1.1}),
    "mixed": ("task_arithmetic", ["a0", "s0", "a2"], {}),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_adapters_merge_like_peft_merged_models_in_mergekit(family, tmp_path, case):
    """evomerge on the adapters = mergekit on the full models that peft's merge_and_unload makes of them
    (the mergekit.yaml evomerge writes names them BASE+ADAPTER, so mergekit runs that step itself)."""
    from evomerge.export import merge_to_folder

    method, sources, extra = CASES[case]
    out = merge_to_folder(write_recipe(family, method, sources, **extra), tmp_path / "ours")
    ours = load_file(str(out / "model.safetensors"))
    config = yaml.safe_load((out / "mergekit.yaml").read_text())
    adapters = [m["model"] for m in config["models"] if "+" in m["model"]]
    assert len(adapters) == sum(s.startswith("a") for s in sources)
    close(ours, run_mergekit(out / "mergekit.yaml", tmp_path / "mergekit"))
    # evomerge reads that mergekit.yaml back (BASE+ADAPTER over its base_model: the adapter as a source): the same
    # tensors, bit for bit
    assert main(["merge", str(out / "mergekit.yaml"), "-o", str(tmp_path / "again")]) == 0
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(again) == set(ours) and all(torch.equal(again[n], ours[n]) for n in ours)
    # the same by hand: peft merges each adapter, mergekit merges the full models
    for model in config["models"]:
        base, _, adapter = model["model"].partition("+")
        if adapter:
            full = tmp_path / ("full-" + Path(adapter).name)
            peft.PeftModel.from_pretrained(
                __import__("transformers").AutoModelForCausalLM.from_pretrained(base), adapter
            ).merge_and_unload().save_pretrained(full)
            model["model"] = str(full)
    (tmp_path / "by-hand.yaml").write_text(yaml.safe_dump(config))
    close(ours, run_mergekit(tmp_path / "by-hand.yaml", tmp_path / "mergekit-by-hand"))
    assert any(not torch.equal(ours[n], t) for n, t in load_file(str(family / "base" / "model.safetensors")).items())


@pytest.mark.slow
def test_a_single_adapter_at_weight_one_is_peft_merge_and_unload(family):
    from evomerge.build import merge

    recipe = yaml.safe_load(write_recipe(family, "task_arithmetic", ["a2"]).read_text())
    recipe.update(parameters={"a2": {"weight": 1.0}}, filters={})
    path = family / "single.yaml"
    path.write_text(yaml.safe_dump(recipe))
    ours = {n: t.detach() for n, t in merge(path).state_dict().items()}
    close(ours, merged_by_peft(family / "base", family / "a2"), atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_the_low_rank_path_equals_the_dense_path(family, method):
    """Factors resident and one GEMM per module, against dense task vectors (the path TIES needs)."""
    from evomerge.build import open_recipe_sources
    from evomerge.kernel import ResidentMerger
    from evomerge.recipe import Recipe

    recipe = Recipe.from_yaml(write_recipe(family, method, ["a0", "a1", "a2"], **(
        {"lambda": 0.9} if method == "task_arithmetic" else {})))
    sources = open_recipe_sources(recipe)
    low = ResidentMerger(sources, methods=[method], seed=3)
    dense = ResidentMerger(sources, methods=[method, "ties"], seed=3)
    assert low.low_rank and not dense.low_rank
    assert low.resident_bytes() < dense.resident_bytes()
    low.materialize(recipe)
    dense.materialize(recipe)
    close(low.state_dict(), dense.state_dict(), atol=2e-6)
    # a method that needs dense task vectors makes them, once, and merges as the dense merger does
    ties = Recipe.from_yaml(write_recipe(family, "ties", ["a0", "a1", "a2"]))
    low.materialize(ties)
    dense.materialize(ties)
    assert not low.low_rank
    close(low.state_dict(), dense.state_dict(), atol=0)


def test_the_merged_adapter_is_the_merged_model(family, tmp_path, capsys):
    """`merge --adapter`: one adapter of concatenated factors (rank 4 + 2 on q_proj, which a0 and a1 both
    reach; zero-padded to it elsewhere) that peft loads; merged into
    the base by peft it is the merged model. A merge no adapter can hold (ties) is refused up front."""
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(family, "task_arithmetic", ["a0", "a1", "a2"], **{"lambda": 0.9})
    assert main(["merge", str(recipe), "-o", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 6 and config["peft_type"] == "LORA"
    ours = {n: t.detach() for n, t in AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict().items()}
    close(ours, merged_by_peft(family / "base", tmp_path / "adapter"), atol=1e-6)

    capsys.readouterr()
    ties = write_recipe(family, "ties", ["a0", "a1"])
    assert main(["merge", str(ties), "-o", str(tmp_path / "m2"), "--adapter", str(tmp_path / "a2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ties is not linear" in err[0], err
    assert not (tmp_path / "m2").exists() and not (tmp_path / "a2").exists()


def test_fan_in_fan_out_on_gpt2_conv1d(tmp_path):
    """GPT-2 keeps its projections as Conv1D (in × out): peft's delta is (B A)ᵀ there."""
    from evomerge.build import merge

    base, _ = make_family(tmp_path, arch="gpt2", k=0, layers=2, vocab=50)
    make_adapter(base, tmp_path / "g0", seed=5, r=4, lora_alpha=4, target_modules=["c_attn", "c_fc", "c_proj"],
                 fan_in_fan_out=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"evomerge_recipe": 1, "method": "task_arithmetic", "base": "base",
                                    "sources": ["g0"], "parameters": {"g0": {"weight": 1.0}}}))
    ours = {n: t.detach() for n, t in merge(path).state_dict().items()}
    theirs = merged_by_peft(base, tmp_path / "g0")
    close(ours, theirs, atol=1e-6)
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.weight"],
                           load_file(str(base / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"])


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _rename_module(tensors: dict) -> None:
    for key in [k for k in tensors if ".layers.0.self_attn.q_proj." in k]:
        tensors[key.replace("q_proj", "qq_proj")] = tensors.pop(key)


def _narrow_a(tensors: dict) -> None:
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()


def _dora(root: Path) -> None:
    shutil.rmtree(root / "a0")
    make_adapter(root / "base", root / "a0", seed=0, r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)


REFUSALS = {   # name -> (change to the copied family, recipe override, text in the error, field in the error)
    "dora": (_dora, {}, "DoRA", "use_dora"),
    "other-kind": (lambda r: _edit_config(r / "a0", peft_type="LOHA"), {}, "LOHA adapter", "peft_type"),
    "bias": (lambda r: _edit_config(r / "a0", bias="all"), {}, "trains biases", "bias"),
    "other-base": (lambda r: _edit_config(r / "a0", base_model_name_or_path="someorg/another-model"), {},
                   "was trained on 'someorg/another-model'", "base_model_name_or_path"),
    "missing-base": (lambda r: None, {"base": None, "method": "linear"}, "needs its base model", "base"),
    "adapter-as-base": (lambda r: None, {"base": "a2"}, "is a LoRA adapter", "base"),
    "unknown-module": (lambda r: _edit_tensors(r / "a0", _rename_module), {}, "targets",
                       "qq_proj"),
    "shape": (lambda r: _edit_tensors(r / "a0", _narrow_a), {}, "do not make the base's", "q_proj"),
    "not-a-factor": (lambda r: _edit_tensors(r / "a0", lambda t: t.update(
        {"base_model.model.lm_head.weight": torch.zeros(50, 32)})), {}, "not a LoRA factor", "lm_head"),
    "union": (lambda r: None, {"vocab": "union"}, "vocab: union with adapters", "vocab"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_adapters_that_are_no_plain_lora_over_this_base_are_refused(family, tmp_path, capsys, case):
    """Exit 2, one line naming the file and the entry, from headers and JSON alone (`validate` loads no
    weights), and `merge` writes nothing."""
    change, override, text, named = REFUSALS[case]
    root = tmp_path / "family"
    shutil.copytree(family, root)
    change(root)
    recipe = yaml.safe_load(write_recipe(root, "task_arithmetic", ["a0", "a1"]).read_text())
    recipe.update(override)
    if recipe["method"] == "linear":
        recipe.pop("lambda", None)
    path = root / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for args in (["validate", str(path)], ["merge", str(path), "-o", str(tmp_path / "out")]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert text in err[0] and named in err[0] and "Traceback" not in err[0], err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow     # a whole search
def test_a_search_over_adapters_learns_on_the_factors_and_exports_an_adapter(tmp_path, capsys):
    """AdaMerging over two adapters: the space has no knob an adapter cannot turn (a weight outside the blocks
    for an adapter of the blocks alone), the merger keeps factors (no dense task vectors), its gradient
    ⟨dL/dW, s·B·A⟩ = tr((s·B)ᵀ · dL/dW · Aᵀ) equals the dense path's (which test_gradient checks against
    autograd), and the export writes `best_adapter/`, which peft merges into the exported model."""
    from transformers import AutoModelForCausalLM

    from evomerge.config import load_config
    from evomerge.gradient import GradientMerge
    from evomerge.search import SearchSession, search
    from modelfactory import make_search_fixture

    path = make_search_fixture(tmp_path / "fam", methods=("task_arithmetic",), sampler="adamerging", n_trials=10)
    root = path.parent
    make_adapter(root / "base", root / "a0", seed=0, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    make_adapter(root / "base", root / "a1", seed=1, r=2, lora_alpha=2, use_rslora=True,
                 target_modules=["v_proj", "up_proj", "embed_tokens"])
    path.write_text(path.read_text().replace("sources: [s0, s1]", "sources: [a0, a1]"))
    config = load_config(path)
    with SearchSession(config, storage_url=f"sqlite:///{tmp_path / 's.db'}", device="cpu", progress=False) as session:
        assert session.merger.low_rank
        names = [d.name for d in session.space.dims["task_arithmetic"]]     # a0 reaches no tensor outside the
        assert "task_arithmetic.a1.weight.io" in names and "task_arithmetic.a0.weight.io" not in names  # blocks
        assert "task_arithmetic.a0.weight.g1" in names
        # with attn and mlp filters, the unfiltered weights scale norms and the like, which no adapter reaches
        from evomerge.space import SearchSpace

        filtered = config.model_copy(update={"search": config.search.model_copy(update={"filters": ["attn", "mlp"]})})
        dims = SearchSpace(filtered, session.sources.sources, session.sources.layout).dims["task_arithmetic"]
        a0 = [(d.kind, d.group) for d in dims if d.source and d.source.endswith("a0")]
        a1 = [(d.kind, d.group) for d in dims if d.source and d.source.endswith("a1")]
        assert sorted(a0, key=str) == [("attn", 0), ("attn", 1), ("mlp", 0), ("mlp", 1)]
        assert (None, "io") in a1 and (None, 0) not in a1      # a1's embedding: an unfiltered weight outside them
        gm = GradientMerge(session.space, session.merger, session.evaluator, config.objectives[0], seed=0, lr=0.05,
                           batch=1000, loss="tokens")
        gm.start([])
        values = torch.linspace(0.2, 1.3, len(gm.dims), dtype=torch.float64)
        low_loss, low = gm.gradient(values)
        session.merger.store.densify()
        dense_loss, dense = gm.gradient(values)
        assert low.abs().max() > 1e-4
        assert low_loss == pytest.approx(dense_loss, rel=1e-5)
        torch.testing.assert_close(low, dense, rtol=1e-3, atol=1e-6)

    run = tmp_path / "run"
    search(str(path), out=str(run), device="cpu")
    assert (run / "best_adapter" / "adapter_config.json").is_file()
    ours = {n: t.detach() for n, t in AutoModelForCausalLM.from_pretrained(run / "best").state_dict().items()}
    close(ours, merged_by_peft(root / "base", run / "best_adapter"), atol=1e-6)

    stack = path.parent / "dfs.yaml"        # a stack of blocks has no adapter's to take
    stack.write_text(path.read_text().replace("sampler: adamerging", "sampler: tpe\n  space: dfs"))
    capsys.readouterr()
    assert main(["search", str(stack), "--out", str(tmp_path / "dfs-run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.space" in err[0] and "is a LoRA adapter" in err[0], err
    assert not (tmp_path / "dfs-run").exists()
