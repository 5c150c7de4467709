"""`evomerge merge` and `evomerge validate`: reproducible bytes, a loadable folder equal to the kernel's
tensors, provenance in the metadata, in-place candidates without residue, and bad input refused with
exit code 2, one line on stderr and nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evomerge
from evomerge.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from modelfactory import CONVERTED_ARCHS, make_family  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("models"), arch="llama", k=3, layers=4)


def write_recipe(folder: Path, family, **changes) -> Path:
    base, sources = family
    recipe = {
        "evomerge_recipe": 1, "method": "ties", "base": str(base), "sources": [str(s) for s in sources],
        "seed": 1234, "layer_groups": 2, "lambda": 1.0,
        "parameters": {"s0": {"weight": [0.8, 0.6], "density": [0.5, 0.7]},
                       "s1": {"weight": 0.7, "density": 0.5},
                       "s2": {"weight": [0.3, 1.1], "density": 0.3}},
        "filters": {"attn": {"s1": {"density": [0.2, 0.4]}}},
    }
    for key, value in changes.items():
        if value is None:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------------------
# Reproducible, loadable, traceable output


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.slow
def test_merge_twice_gives_identical_bytes(family, tmp_path, method):
    recipe = write_recipe(tmp_path, family, method=method)
    assert main(["merge", str(recipe), "-o", str(tmp_path / "a")]) == 0
    if method == "dare_ties":   # the second run in another process: the random masks reproduce there too
        done = cli("merge", str(recipe), "-o", str(tmp_path / "b"), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    else:
        assert main(["merge", str(recipe), "-o", str(tmp_path / "b")]) == 0
    first = sorted((tmp_path / "a").glob("*.safetensors"))
    assert [p.name for p in first] == ["model.safetensors"]
    for file in first:
        one, two = file.read_bytes(), (tmp_path / "b" / file.name).read_bytes()
        head_one, head_two = 8 + int.from_bytes(one[:8], "little"), 8 + int.from_bytes(two[:8], "little")
        assert one[head_one:] == two[head_two:], "tensor data differ"
        assert one[:head_one] == two[:head_two], f"headers differ: {one[8:head_one]!r} != {two[8:head_two]!r}"
    for name in ("config.json", "recipe.yaml", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_folder_loads_and_equals_the_kernel(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.build import merger_for
    from evomerge.recipe import Recipe

    path = write_recipe(tmp_path, family, method="della", parameters={
        "s0": {"weight": 0.9, "density": 0.5, "epsilon": 0.1},
        "s1": {"weight": [0.4, 0.8], "density": 0.6},
        "s2": {"weight": 0.5, "density": [0.4, 0.3], "epsilon": [0.1, 0.2]}})
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    state = model.state_dict()
    recipe = Recipe.from_yaml(path)
    with merger_for(recipe) as merger:
        expected = merger.state_dict()
        assert set(expected) <= set(state)
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), name
            assert not torch.equal(tensor, merger.sources.base.read(name)) or "norm" in name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("arch", CONVERTED_ARCHS)
def test_the_scored_model_holds_every_merged_tensor_when_transformers_converts_the_checkpoint(tmp_path, arch,
                                                                                             streaming):
    """transformers 5 stacks a Mixtral's per-expert tensors into one parameter, renames its router and
    GPT-NeoX's head as it loads them: the resident model that the search scores still holds every merged
    tensor, in place, and equals the exported folder as transformers loads it, parameter for parameter."""
    from transformers import AutoModelForCausalLM

    from evomerge.kernel import ResidentMerger
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources

    base, sources = make_family(tmp_path / arch, arch=arch, k=2, layers=2)
    path = write_recipe(tmp_path, (base, sources), method="dare_ties", filters=None, parameters={
        "s0": {"weight": 0.9, "density": 0.5}, "s1": {"weight": [0.4, 0.8], "density": 0.6}})
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    unmerged = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    recipe = Recipe.from_yaml(path)
    opened = open_sources(recipe.base, recipe.sources)
    assert not set(opened.layout.tensors) <= set(unmerged)        # some checkpoint names are no parameters
    merger = ResidentMerger(opened, seed=recipe.seed, methods=[recipe.method], streaming=streaming)
    params = dict(merger.model.named_parameters())
    pointers = {n: p.data_ptr() for n, p in params.items()}
    merger.materialize(recipe)
    resident = merger.model.state_dict()
    assert set(resident) == set(exported)
    for name, tensor in resident.items():
        assert torch.equal(tensor, exported[name]), name
        assert not torch.equal(tensor, unmerged[name]), f"{name} still holds the base's values"
    assert all(p.data_ptr() == pointers[n] for n, p in params.items())


@pytest.mark.parametrize("arch, extra", [("gpt2", "transformer.h.{i}.attn.bias"),
                                         ("llama", "model.layers.{i}.self_attn.rotary_emb.inv_freq")])
def test_checkpoint_tensors_the_model_does_not_load_are_merged_and_left_out_of_it(tmp_path, arch, extra):
    """Old checkpoints carry buffers the model ignores on load (the hub's gpt2 its attention masks, older
    Llamas their rotary frequencies): they merge and export as before, and the model scores as exported."""
    from transformers import AutoModelForCausalLM

    from evomerge.build import merger_for

    base, sources = make_family(tmp_path / arch, arch=arch, k=2, layers=2)
    for folder in (base, *sources):
        state = load_file(folder / "model.safetensors")
        for i in range(2):
            state[extra.format(i=i)] = torch.tril(torch.ones(8, 8)) if arch == "gpt2" else torch.rand(4)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    path = write_recipe(tmp_path, (base, sources), method="task_arithmetic", filters=None,
                        parameters={"s0": {"weight": 0.7}, "s1": {"weight": [0.4, 0.8]}})
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 0
    assert extra.format(i=1) in load_file(tmp_path / "out" / "model.safetensors")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    with merger_for(path) as merger:
        resident = merger.model.state_dict()
    assert set(resident) == set(exported) and all(torch.equal(t, exported[n]) for n, t in resident.items())


def test_tensors_that_are_no_weights_pass_through_from_the_base(tmp_path):
    """Integer and boolean checkpoint tensors (position ids, masks) are not merged as floats: the export
    holds the base's, in their dtype, exactly (2**24 + 1 does not survive a float32)."""
    base, sources = make_family(tmp_path / "fam", k=2, layers=2)
    ids = torch.tensor([[2**24 + 1, 2**31 - 1]], dtype=torch.int64)
    for i, folder in enumerate((base, *sources)):
        state = load_file(folder / "model.safetensors")
        state["model.position_ids"] = ids + i            # the sources' differ: the base's is kept
        state["model.mask"] = torch.tensor([True, False, i == 0])
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    for method in ("task_arithmetic", "dare_ties"):
        density = {"density": 0.5} if method == "dare_ties" else {}
        path = write_recipe(tmp_path / method, (base, sources), method=method, filters=None,
                            parameters={"s0": {"weight": 0.7, **density}, "s1": {"weight": 0.4, **density}})
        assert main(["merge", str(path), "-o", str(tmp_path / method / "out")]) == 0
        merged = load_file(tmp_path / method / "out" / "model.safetensors")
        assert merged["model.position_ids"].dtype == torch.int64 and torch.equal(merged["model.position_ids"], ids)
        assert torch.equal(merged["model.mask"], torch.tensor([True, False, True]))
        assert merged["model.norm.weight"].dtype == torch.float32


def test_a_converted_tensor_lands_where_its_positions_say():
    """A checkpoint tensor at given positions of a parameter: a contiguous block is written in place,
    a transposed block through its strided view, a permutation through its positions."""
    from evomerge.binding import Copy, _slice

    param = torch.zeros(4, 6)
    flat_positions = torch.arange(24).reshape(4, 6)
    block = _slice(param, flat_positions[1:3])                       # rows 1-2: in place
    assert not isinstance(block, Copy) and block.data_ptr() == param[1].data_ptr()
    transposed = _slice(param, flat_positions[:, 2:4].T.contiguous())  # (2, 4): a strided view
    permuted = _slice(param, torch.randperm(24, generator=torch.Generator().manual_seed(0))[:6].reshape(2, 3))
    assert isinstance(transposed, Copy) and transposed.positions is None
    assert isinstance(permuted, Copy) and permuted.positions is not None
    for slot, value in ((block, 1.0), (transposed, 2.0), (permuted, 3.0)):
        merged = slot.merged if isinstance(slot, Copy) else slot
        merged.copy_(torch.arange(merged.numel(), dtype=torch.float32).reshape(merged.shape) + 10 * value)
        if isinstance(slot, Copy):
            slot.apply()
    expected = torch.zeros(4, 6)
    expected[1:3] = torch.arange(12, dtype=torch.float32).reshape(2, 6) + 10
    expected[:, 2:4] = (torch.arange(8, dtype=torch.float32).reshape(2, 4) + 20).T
    positions = permuted.positions
    expected.view(-1)[positions] = torch.arange(6, dtype=torch.float32) + 30
    assert torch.equal(param, expected)


def test_metadata_holds_recipe_hash_and_version(family, tmp_path):
    from evomerge.recipe import Recipe

    path = write_recipe(tmp_path, family)
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as fh:
        metadata = fh.metadata()
    recipe = Recipe.from_yaml(path)
    assert metadata["evomerge_recipe_sha256"] == recipe.sha256()
    assert len(recipe.sha256()) == 64
    assert metadata["evomerge_version"] == evomerge.__version__
    written = Recipe.from_yaml(tmp_path / "out" / "recipe.yaml")      # the folder's recipe rebuilds the model
    assert written.sha256() == recipe.sha256()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ties" in card and "evomerge merge" in card


def test_resident_kernel_leaves_no_residue(family):
    """materialize(A), then B, then A again: the parameters equal a fresh merge of A, in the same storage."""
    from evomerge.build import merger_for
    from evomerge.kernel import ResidentMerger
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources

    base, sources = family
    common = {"base": str(base), "sources": [str(s) for s in sources], "layer_groups": 2}
    a = Recipe.from_dict({**common, "method": "ties", "seed": 1,
                          "parameters": {"s0": {"weight": [0.8, 0.6], "density": [0.5, 0.7]},
                                         "s2": {"density": 0.123}}})
    b = Recipe.from_dict({**common, "method": "dare_ties", "seed": 2, "lambda": 1.4,
                          "parameters": {"s1": {"weight": -0.5, "density": 0.3}}})
    c = Recipe.from_dict({**common, "method": "task_arithmetic", "parameters": {"s0": {"weight": 3.0}}})
    merger = ResidentMerger(open_sources(a.base, a.sources), seed=a.seed, methods=["ties", "dare_ties"])
    params = dict(merger.model.named_parameters())
    pointers = {n: p.data_ptr() for n, p in params.items()}
    merger.materialize(a)
    first = {n: p.detach().clone() for n, p in params.items()}
    for recipe in (b, c, a):
        merger.materialize(recipe)
        if recipe is not a:
            assert any(not torch.equal(p, first[n]) for n, p in params.items())
    fresh = merger_for(a).model.state_dict()
    for name, param in params.items():
        assert param.data_ptr() == pointers[name], f"{name} was reallocated, not written in place"
        assert torch.equal(param, first[name]), name
        assert torch.equal(param, fresh[name]), name


def test_validate_reads_no_weights(family, tmp_path, monkeypatch, capsys):
    import safetensors
    import safetensors.torch

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    path = write_recipe(tmp_path, family)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid recipe" in out and "4 layers" in out
    assert listing(tmp_path) == {"recipe.yaml"}


# ------------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line on stderr, nothing written


def assert_refused(rc: int, stderr: str, *needles: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("evomerge: error:") and "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def refused_in_process(capsys, recipe: Path, *needles: str, command: str = "merge") -> str:
    folder = recipe.parent
    before = listing(folder)
    args = ["merge", str(recipe), "-o", str(folder / "out")] if command == "merge" else ["validate", str(recipe)]
    rc = main(args)
    captured = capsys.readouterr()
    line = assert_refused(rc, captured.err, *needles)
    assert listing(folder) == before, "something was written"
    return line


def _pickled_copy(folder: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    shutil.copy(folder / "config.json", target / "config.json")
    torch.save(load_file(str(folder / "model.safetensors")), target / "pytorch_model.bin")
    return target


def _edited_copy(folder: Path, target: Path, edit) -> Path:
    shutil.copytree(folder, target)
    tensors = load_file(str(target / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.slow
def test_missing_source_subprocess(family, tmp_path):
    base, sources = family
    recipe = write_recipe(tmp_path / "r", family, sources=[str(sources[0]), str(tmp_path / "no_such_model")],
                          parameters={"s0": {"weight": 1.0}}, filters=None)
    before = listing(tmp_path)
    done = cli("merge", str(recipe), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_refused(done.returncode, done.stderr, "no_such_model", "sources[1]")
    assert listing(tmp_path) == before


@pytest.mark.slow
def test_unknown_method_subprocess_suggests(family, tmp_path):
    recipe = write_recipe(tmp_path / "r", family, method="tie")
    done = cli("merge", str(recipe), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert_refused(done.returncode, done.stderr, "unknown merge method 'tie'", "did you mean 'ties'", "recipe.yaml")
    assert not (tmp_path / "out").exists()
    done = cli("validate", str(recipe), cwd=tmp_path)
    assert_refused(done.returncode, done.stderr, "did you mean 'ties'")


@pytest.mark.slow
def test_output_exists_subprocess_then_force(family, tmp_path):
    recipe = write_recipe(tmp_path / "r", family)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    done = cli("merge", str(recipe), "-o", str(out), cwd=tmp_path)
    assert_refused(done.returncode, done.stderr, "already exists", "--force")
    assert listing(out) == {"old.txt"}
    assert main(["merge", str(recipe), "-o", str(out), "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no partial or old folders left


def test_shape_mismatch_names_the_tensor(family, tmp_path, capsys):
    base, sources = family
    name = "model.layers.1.self_attn.k_proj.weight"
    odd = _edited_copy(sources[2], tmp_path / "models" / "s2", lambda t: t.__setitem__(name, torch.zeros(8, 32)))
    recipe = write_recipe(tmp_path / "r", family, sources=[str(sources[0]), str(sources[1]), str(odd)])
    refused_in_process(capsys, recipe, name, "shape mismatch", "[8, 32]", "[16, 32]")


def test_vocabulary_mismatch(family, tmp_path, capsys):
    base, sources = family

    def grow(tensors):
        for n in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[n] = torch.cat([tensors[n], torch.zeros(2, 32)])

    odd = _edited_copy(sources[1], tmp_path / "models" / "s1", grow)
    specs = [str(sources[0]), str(odd), str(sources[2])]
    recipe = write_recipe(tmp_path / "r", family, sources=specs)
    refused_in_process(capsys, recipe, "vocabulary", "vocab: base")
    # and with the policy stated, the merge goes through with the base's vocabulary
    recipe = write_recipe(tmp_path / "ok", family, sources=specs, vocab="base")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "ok" / "out")]) == 0
    merged = load_file(str(tmp_path / "ok" / "out" / "model.safetensors"))
    assert merged["model.embed_tokens.weight"].shape == (48, 32)


def test_pickle_only_checkpoint(family, tmp_path, capsys):
    base, sources = family
    pickled = _pickled_copy(sources[0], tmp_path / "models" / "s0")
    recipe = write_recipe(tmp_path / "r", family, sources=[str(pickled), str(sources[1]), str(sources[2])])
    refused_in_process(capsys, recipe, "pickle-only", "safetensors")
    refused_in_process(capsys, recipe, "pickle-only", command="validate")


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_density_outside_zero_one(family, tmp_path, capsys, density):
    recipe = write_recipe(tmp_path / "r", family, parameters={"s0": {"density": density}})
    refused_in_process(capsys, recipe, "parameters.s0.density", "(0, 1]")


def test_density_in_a_group_list_outside_zero_one(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r", family, parameters={"s1": {"density": [0.5, 1.01]}})
    refused_in_process(capsys, recipe, "parameters.s1.density[1]")


def test_weights_summing_to_zero_under_normalize(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r", family, method="linear", base=None, filters=None, **{"lambda": None},
                          parameters={"s0": {"weight": 1.0}, "s1": {"weight": -0.5}, "s2": {"weight": -0.5}})
    refused_in_process(capsys, recipe, "sum to 0", "normalize")
    # normalize off: a legal (if odd) recipe
    recipe = write_recipe(tmp_path / "ok", family, method="linear", base=None, filters=None, normalize=False,
                          **{"lambda": None}, parameters={"s0": {"weight": 1.0}, "s1": {"weight": -0.5}, "s2": {"weight": -0.5}})
    assert main(["validate", str(recipe)]) == 0


def test_weights_summing_to_zero_in_one_filter_slot(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r", family, method="linear", base=None, **{"lambda": None},
                          parameters={"s0": {"weight": 1.0}, "s1": {"weight": 1.0}, "s2": {"weight": 1.0}},
                          filters={"io": {"s0": {"weight": -2.0}}})
    refused_in_process(capsys, recipe, "sum to 0", "io")


@pytest.mark.parametrize("count", [2, 3])
def test_slerp_needs_exactly_two_models(family, tmp_path, capsys, count):
    base, sources = family
    recipe = write_recipe(tmp_path / "r", family, method="slerp", parameters=None, filters=None,
                          **{"lambda": None, "t": 0.5}, sources=[str(s) for s in sources[:count]])
    refused_in_process(capsys, recipe, "slerp", "two models")


@pytest.mark.parametrize("density, epsilon", [(0.9, 0.15), (0.1, 0.1), (0.05, 0.2)])
def test_della_density_plus_minus_epsilon(family, tmp_path, capsys, density, epsilon):
    recipe = write_recipe(tmp_path / "r", family, method="della",
                          parameters={"s0": {"density": density, "epsilon": epsilon}})
    refused_in_process(capsys, recipe, "epsilon", "(0, 1]")


def test_della_values_only_a_slot_no_tensor_has_would_read_are_not_refused(family, tmp_path, capsys):
    """A head tensor (outside the blocks) reads a list's first value: the second, invalid with epsilon, is
    never used. An io filter that is invalid is refused, named under filters."""
    ok = write_recipe(tmp_path / "ok", family, method="della_linear", parameters={"s0": {"epsilon": 0.1}},
                      filters={"head": {"s0": {"density": [0.5, 0.05]}}})
    assert main(["validate", str(ok)]) == 0
    assert main(["merge", str(ok), "-o", str(tmp_path / "out")]) == 0
    bad = write_recipe(tmp_path / "bad", family, method="della_linear", parameters={"s0": {"epsilon": 0.1}},
                       filters={"io": {"s0": {"density": 0.05}}})
    refused_in_process(capsys, bad, "filters:", "epsilon", "group io, embed tensors")


def test_more_layer_groups_than_layers(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r", family, layer_groups=5, parameters={"s0": {"weight": [1, 1, 1, 1, 1]}},
                          filters=None)
    refused_in_process(capsys, recipe, "layer_groups", "5 groups", "4 layers")


def test_unknown_recipe_key(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r", family, lamda=0.5)
    refused_in_process(capsys, recipe, "unknown key 'lamda'", "did you mean 'lambda'")
    recipe = write_recipe(tmp_path / "p", family, parameters={"s0": {"weight": 1.0, "densty": 0.5}})
    refused_in_process(capsys, recipe, "parameters.s0.densty")


def test_duplicate_yaml_key(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r", family)
    recipe.write_text(recipe.read_text() + "method: linear\n")
    refused_in_process(capsys, recipe, "duplicate key 'method'")


def test_missing_recipe_file(tmp_path, capsys):
    rc = main(["merge", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "out")])
    assert_refused(rc, capsys.readouterr().err, "nope.yaml")
    assert listing(tmp_path) == set()


@pytest.mark.slow     # a subprocess
def test_memory_budget_below_what_streaming_needs_is_refused(family, tmp_path):
    """A budget the merge cannot keep, even streaming tensor by tensor: exit 2 naming the minimum, nothing written."""
    recipe = write_recipe(tmp_path, family)
    done = cli("merge", str(recipe), "-o", str(tmp_path / "out"), "--memory-budget", "1MB", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "memory_budget" in lines[0] and "at least" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_memory_plan_streams_between_its_two_needs(family):
    """Resident when everything fits; streaming when only one tensor at a time does; refused below that."""
    from evomerge.kernel import MemoryPlan, ResidentMerger
    from evomerge.sources import open_sources

    base, sources = family
    opened = open_sources(str(base), [str(s) for s in sources])
    merger = ResidentMerger(opened, methods=["dare_ties"], build_model=False, streaming=True)
    plan = MemoryPlan.of(merger.store, out_dtype=merger.out_dtype, score_dtype=merger.score_dtype, budget=10**12)
    layout, k = opened.layout, len(sources)
    largest = max(info.numel for info in layout.tensors.values())
    assert plan.model == layout.numel * 4
    # resident keeps the anchor, the task vectors and the random fields of every tensor; streaming does not
    assert plan.resident_need - plan.streaming_need == pytest.approx(1.05 * (1 + 2 * k) * layout.numel * 4, abs=2)
    assert plan.streaming_need - plan.in_use - plan.model >= (1 + k) * largest * 4
    for budget, streams, refused in ((plan.resident_need, False, False),
                                     ((plan.resident_need + plan.streaming_need) // 2, True, False),
                                     (plan.streaming_need - 1, True, True)):
        decided = MemoryPlan(budget, plan.in_use, plan.model, plan.resident_need, plan.streaming_need)
        assert decided.streaming == streams
        if refused:
            with pytest.raises(evomerge.errors.InputError, match="memory_budget"):
                decided.check()
        else:
            decided.check()


@pytest.mark.slow
def test_sources_from_the_hub_cache_are_the_cards_lineage(family, tmp_path):
    """Hub ids resolve offline from the hub's own cache layout; the model card lists them as the hub's merge
    metadata (base_model + base_model_relation: merge), a local folder not."""
    base, sources = family
    cache = tmp_path / "hub"
    revision = "0" * 40
    for name, folder in (("base", base), ("s0", sources[0])):
        repo = cache / f"models--evotest--{name}"
        shutil.copytree(folder, repo / "snapshots" / revision)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"evomerge_recipe: 1\nmethod: task_arithmetic\nbase: evotest/base\n"
                      f"sources: [evotest/s0, {sources[1]}]\nparameters: {{evotest/s0: {{weight: 0.5}}}}\n")
    done = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == ["evotest/base", "evotest/s0"] and meta["base_model_relation"] == "merge"
    assert meta["tags"] == ["merge", "evomerge"] and meta["library_name"] == "transformers"
    assert "method: task_arithmetic" in card                              # and the recipe that rebuilds it


def test_half_precision_is_scored_in_float32_only_on_a_cpu_without_native_matmuls_for_it():
    from evomerge.kernel import fast_cpu_dtypes, scoring_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fast_cpu_dtypes(frozenset({"avx2", "fma"})) == frozenset()                     # a Zen 1 EPYC
    assert fast_cpu_dtypes(frozenset({"avx512f", "avx512_bf16", "amx_bf16"})) == {torch.bfloat16}
    assert fast_cpu_dtypes(frozenset({"fp", "asimd", "asimdhp", "bf16"})) == {torch.bfloat16, torch.float16}
    for stored in (torch.bfloat16, torch.float16):
        assert scoring_dtype(stored, cuda) == stored
        assert scoring_dtype(stored, cpu) == (stored if stored in fast_cpu_dtypes() else torch.float32)
    assert scoring_dtype(torch.float32, cpu) == scoring_dtype(torch.float32, cuda) == torch.float32


def test_bf16_sources_scored_in_float32_hold_the_exported_weights(tmp_path):
    """A bf16 model scored in float32 (a CPU without bf16 matmuls): the resident model holds the merged bf16
    values upcast exactly; the merged tensors (and so the export) are the bytes of a merge scored in bf16."""
    from evomerge.kernel import ResidentMerger
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources

    base, sources = make_family(tmp_path / "fam", arch="qwen2", k=2, layers=4, dtype=torch.bfloat16)
    recipe = Recipe.from_dict({"method": "ties", "base": str(base), "sources": [str(s) for s in sources],
                               "layer_groups": 2, "parameters": {str(sources[0]): {"weight": 0.7, "density": 0.5},
                                                                 str(sources[1]): {"weight": [0.4, 0.9]}}})
    opened = open_sources(recipe.base, recipe.sources)
    scored, native = (ResidentMerger(opened, methods=["ties"], score_dtype=d) for d in ("float32", "bfloat16"))
    assert scored.score_dtype == torch.float32 and native.score_dtype == torch.bfloat16
    for merger in (scored, native):
        merger.materialize(recipe)
    ours, theirs = scored.state_dict(), native.state_dict()
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert all(torch.equal(ours[n].view(torch.int16), theirs[n].view(torch.int16)) for n in ours)   # same bytes
    params = dict(scored.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    for name, tensor in ours.items():
        assert torch.equal(params[name], tensor.float()), name          # the scored weights are the exported ones
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.inference_mode():
        assert torch.allclose(scored.model(ids).logits, native.model(ids).logits.float(), atol=5e-2)


# ------------------------------------------------------------------------------------------------
# A one-off merge streams: each tensor merged, written at its place, let go


def test_weights_written_in_any_order_are_the_bytes_written_in_order(tmp_path):
    """The writer's files read back as the tensors, shard by shard in the given order, the same bytes however
    the tensors come (a merge hands them over in its own order); anything not as announced is refused."""
    import json
    import random

    from evomerge.export.folder import WeightsWriter, write_weights
    from evomerge.kernel import TensorStream

    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.w": torch.randn(7, 5 + i, generator=gen).to(dtype)
               for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32] * 2)}
    tensors["position_ids"] = torch.arange(11)
    tensors["empty"] = torch.empty(0, 3)
    metadata = {"format": "pt", "z": "last", "a": "first"}
    names = list(tensors)
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    for folder, order in (("in-order", names), ("shuffled", shuffled)):
        (tmp_path / folder).mkdir()
        stream = TensorStream(specs, lambda sink, order=order: [sink(n, tensors[n]) for n in order])
        files = write_weights(tmp_path / folder, stream, metadata=metadata, shard_bytes=200)
    assert len(files) > 2
    for file in files + ["model.safetensors.index.json"]:
        assert (tmp_path / "in-order" / file).read_bytes() == (tmp_path / "shuffled" / file).read_bytes(), file
    index = json.loads((tmp_path / "shuffled" / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == names
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    seen = []
    for file in files:
        with safe_open(str(tmp_path / "shuffled" / file), framework="pt") as fh:
            assert fh.metadata() == metadata
            for name in fh.keys():
                assert index["weight_map"][name] == file
                assert fh.get_tensor(name).dtype == tensors[name].dtype
                assert torch.equal(fh.get_tensor(name), tensors[name]), name
                seen.append(name)
    shards = [[n for n in names if index["weight_map"][n] == file] for file in files]
    assert sum(shards, []) == names                            # shards in the given order
    assert seen == sum((sorted(shard) for shard in shards), [])   # each file's tensors sorted
    (tmp_path / "refused").mkdir()
    writer = WeightsWriter(tmp_path / "refused", specs, metadata=metadata)
    with pytest.raises(RuntimeError, match="not as announced"):
        writer.write("layer.0.w", tensors["layer.0.w"].double())
    writer.write("layer.0.w", tensors["layer.0.w"])
    with pytest.raises(RuntimeError, match="written twice"):
        writer.write("layer.0.w", tensors["layer.0.w"])
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    assert writer.fds == []        # closed all the same


def test_a_one_off_merge_holds_one_merged_tensor_at_a_time(family, tmp_path):
    """`evomerge merge` reads each source tensor when it merges it and lets the merged tensor go once it is
    written: no merged tensor outlives the next one's merge, and they are the tensors a merger holding
    every output makes."""
    import weakref

    from evomerge.build import merger_for
    from evomerge.recipe import Recipe

    recipe = Recipe.from_yaml(write_recipe(tmp_path, family, method="dare_ties"))
    with merger_for(recipe) as held:
        expected = {n: t.clone() for n, t in held.state_dict().items()}
    streamed = merger_for(recipe, build_model=False, stream=True)
    assert streamed.streaming and streamed.store.contexts == {}
    assert set(streamed.outputs) == streamed.unmerged       # nothing merged is held
    weights = streamed.weights(recipe)
    assert list(weights.specs) == list(expected)
    alive: list[weakref.ref] = []
    got = {}

    def sink(name, tensor):     # a tensor no one holds is freed at once (reference counting)
        assert all(ref() is None for ref in alive), "an earlier merged tensor is still held"
        if name not in streamed.unmerged:
            alive.append(weakref.ref(tensor))
        assert (tensor.dtype, tuple(tensor.shape)) == weights.specs[name]
        got[name] = tensor.clone()

    weights.fill(sink)
    assert len(alive) == len(expected) and set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_a_merge_that_overflows_fails_naming_the_tensor_and_writes_nothing(family, tmp_path):
    """A candidate whose merge is not finite raises NonFiniteMerge naming its first such tensor, streaming or
    held, and the output folder is never made."""
    from evomerge.build import merger_for
    from evomerge.export import merge_to_folder
    from evomerge.kernel import NonFiniteMerge
    from evomerge.recipe import Recipe

    base, sources = family
    huge = _edited_copy(sources[1], tmp_path / "s1", lambda tensors: next(
        t for n, t in tensors.items() if "mlp" in n).fill_(3e38))        # finite, but ten of it is not
    path = write_recipe(tmp_path, (base, [sources[0], huge, sources[2]]), method="task_arithmetic",
                        layer_groups=None, filters=None, parameters={"s1": {"weight": 10}})
    with pytest.raises(NonFiniteMerge, match="NaN/inf in tensor"):
        merge_to_folder(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(NonFiniteMerge, match="NaN/inf in tensor"):
        merger_for(Recipe.from_yaml(path), build_model=False)
