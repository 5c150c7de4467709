"""A corpus of bad and hostile inputs across model folders, recipes, task files and configs.

Each case: exit code 2, exactly one line on stderr naming the file and the problem,
nothing written, and an existing results folder left byte for byte as it was.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest

from evomerge.cli import main
from modelfactory import make_search_fixture

RECIPE = """evomerge_recipe: 1
method: ties
base: base
sources: [s0, s1]
seed: 7
layer_groups: 2
parameters:
  s0: {weight: [0.8, 0.6], density: 0.5}
  s1: {weight: 0.7, density: [0.4, 0.9]}
"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    make_search_fixture(root, n_trials=3)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def _edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])


def _set_nan(path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    name = sorted(tensors)[3]
    tensors[name][0].fill_(float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})


def _replace(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


# (id, mutate(root), args(root, out), expected substring of the one stderr line, file named in it)
CASES = [
    # -- model folders ---------------------------------------------------------------
    ("truncated-safetensors", lambda r: (r / "s0/model.safetensors").write_bytes((r / "s0/model.safetensors").read_bytes()[:4000]),
     "merge", "file truncated or header wrong", "s0/model.safetensors"),
    ("header-lies-about-shape", lambda r: _edit_header(r / "s1/model.safetensors",
                                                       lambda h: h["model.norm.weight"].__setitem__("shape", [64])),
     "merge", "header says shape [64]", "s1/model.safetensors"),
    ("nan-weights", lambda r: _set_nan(r / "s1/model.safetensors"), "merge", "NaN or inf", "s1"),
    ("pickle-only", lambda r: ((r / "s0/model.safetensors").unlink(), (r / "s0/pytorch_model.bin").write_bytes(b"x")),
     "merge", "pickle-only checkpoint", "s0"),
    ("gguf-only", lambda r: ((r / "s0/model.safetensors").unlink(), (r / "s0/model-Q4_1.gguf").write_bytes(b"GGUF")),
     "merge", "GGUF checkpoint (model-Q4_1.gguf); evomerge reads only safetensors (convert it", "s0"),
    ("no-config", lambda r: (r / "s1/config.json").unlink(), "merge", "no config.json", "s1"),
    ("config-not-json", lambda r: (r / "base/config.json").write_text("{nope"), "merge", "not valid JSON", "config.json"),
    ("missing-source", lambda r: shutil.rmtree(r / "s1"), "merge", "source 's1' not found", "recipe.yaml"),
    ("shape-mismatch", lambda r: _edit_header(r / "s0/model.safetensors", _swap_shape), "merge",
     "shape mismatch: tensor 'model.layers.0.self_attn.q_proj.weight'", "recipe.yaml"),
    ("vocab-mismatch", lambda r: _shrink_vocab(r / "s0/model.safetensors"), "merge",
     "vocabulary size differs", "recipe.yaml"),
    ("union-source-without-tokenizer", lambda r: _append(r / "recipe.yaml", "vocab: union\n") or [
        p.unlink() for p in (r / "s1").glob("tokenizer*")], "merge", "'s1' has no tokenizer files", "recipe.yaml"),
    ("index-escapes-folder", lambda r: _sharded_escape(r / "s0"), "merge", "missing", "model.safetensors.index.json"),
    ("no-safetensors-at-all", lambda r: (r / "s0/model.safetensors").unlink(), "merge", "no safetensors weights", "s0"),
    ("missing-tokenizer", lambda r: [p.unlink() for p in (r / "base").glob("tokenizer*")] + [
        p.unlink() for p in (r / "base").glob("special_tokens_map.json")], "search", "no tokenizer files", "search.yaml"),
    # -- recipes ------------------------------------------------------------------------
    ("unknown-method", lambda r: _replace(r / "recipe.yaml", "method: ties", "method: tiez"), "merge",
     "did you mean 'ties'", "recipe.yaml"),
    ("density-out-of-range", lambda r: _replace(r / "recipe.yaml", "density: 0.5", "density: 1.5"), "merge",
     "outside (0, 1]", "recipe.yaml"),
    ("density-zero", lambda r: _replace(r / "recipe.yaml", "density: 0.5", "density: 0"), "merge",
     "outside (0, 1]", "recipe.yaml"),
    ("weights-sum-zero", lambda r: (r / "recipe.yaml").write_text(
        "method: linear\nsources: [s0, s1]\nparameters: {s0: {weight: 1.0}, s1: {weight: -1.0}}\n"),
     "merge", "weights sum to 0", "recipe.yaml"),
    ("slerp-three-models", lambda r: (r / "recipe.yaml").write_text(
        "method: slerp\nbase: base\nsources: [s0, s1]\nt: 0.5\n"), "merge", "slerp merges exactly two models", "recipe.yaml"),
    ("della-epsilon", lambda r: (r / "recipe.yaml").write_text(
        "method: della\nbase: base\nsources: [s0, s1]\nparameters: {s0: {density: 0.9, epsilon: 0.2}}\n"),
     "merge", "epsilon", "recipe.yaml"),
    ("too-many-groups", lambda r: _replace(r / "recipe.yaml", "layer_groups: 2", "layer_groups: 9")
     or _replace(r / "recipe.yaml", "[0.8, 0.6]", "0.8") or _replace(r / "recipe.yaml", "[0.4, 0.9]", "0.4"),
     "merge", "9 groups but the model has 4 layers", "recipe.yaml"),
    ("unknown-vocab-policy", lambda r: _append(r / "recipe.yaml", "vocab: unoin\n"), "merge",
     "unknown vocab policy 'unoin' ('error', 'base' or 'union')", "recipe.yaml"),
    ("union-and-a-tokenizer", lambda r: _append(r / "recipe.yaml", "vocab: union\ntokenizer: s0\n"), "merge",
     "vocab: union ships the union of the models' tokenizers", "recipe.yaml"),
    ("unknown-key", lambda r: _append(r / "recipe.yaml", "densty: 0.3\n"), "merge", "unknown key 'densty'", "recipe.yaml"),
    ("duplicate-key", lambda r: _append(r / "recipe.yaml", "seed: 8\n"), "merge", "duplicate key 'seed'", "recipe.yaml"),
    ("list-length", lambda r: _replace(r / "recipe.yaml", "[0.8, 0.6]", "[0.8, 0.6, 0.1]"), "merge",
     "has 3 values but layer_groups is 2", "recipe.yaml"),
    ("not-yaml", lambda r: (r / "recipe.yaml").write_bytes(b"\xff\xfe\x00binary"), "merge", "UTF-8", "recipe.yaml"),
    ("yaml-code-tag", lambda r: (r / "recipe.yaml").write_text("method: !!python/object/apply:os.system ['true']\n"),
     "merge", "not valid YAML", "recipe.yaml"),
    ("wrong-version", lambda r: _replace(r / "recipe.yaml", "evomerge_recipe: 1", "evomerge_recipe: 7"), "merge",
     "unsupported recipe version", "recipe.yaml"),
    ("param-of-other-method", lambda r: _append(r / "recipe.yaml", "t: 0.5\n"), "merge",
     "'t' is not a parameter of ties", "recipe.yaml"),
    ("base-as-source-spelled-otherwise", lambda r: _replace(r / "recipe.yaml", "sources: [s0, s1]",
                                                           "sources: [s0, s1, ./base]"), "merge",
     "'./base' is the base model", "recipe.yaml"),
    ("source-twice-spelled-otherwise", lambda r: (r / "alias").symlink_to(r / "s1") or _replace(
        r / "recipe.yaml", "sources: [s0, s1]", "sources: [s0, s1, alias]"), "merge",
     "'alias' is the same model folder as 's1'", "recipe.yaml"),
    ("config-base-as-source", lambda r: _replace(r / "search.yaml", "sources: [s0, s1]", "sources: [s0, s1, ./base]"),
     "search", "'./base' is the base model", "search.yaml"),
    # -- task files ----------------------------------------------------------------------
    ("malformed-jsonl", lambda r: _append(r / "data/pick.search.jsonl", "{oops\n"), "search", "not valid JSON",
     "pick.search.jsonl:13"),
    ("answer-out-of-range", lambda r: _append(r / "data/pick.heldout.jsonl",
                                              '{"prompt": "a =", "choices": ["b", "c"], "answer": 5}\n'),
     "search", "answer", "pick.heldout.jsonl:13"),
    ("empty-jsonl", lambda r: (r / "data/ppl.search.jsonl").write_text(""), "search", "no rows", "ppl.search.jsonl"),
    ("missing-split", lambda r: (r / "data/ppl.heldout.jsonl").unlink(), "search", "ppl.heldout.jsonl", "tasks.yaml"),
    ("unknown-task-type", lambda r: _replace(r / "tasks.yaml", "type: choice", "type: choise"), "search",
     "choise", "tasks.yaml"),
    ("task-unknown-key", lambda r: _replace(r / "tasks.yaml", "metric: acc}", "metric: acc, shots: 3}"), "search",
     "shots", "tasks.yaml"),
    # -- search configs ------------------------------------------------------------------------
    ("config-unknown-key", lambda r: _append(r / "search.yaml", "bogus: 1\n"), "search", "unknown key 'bogus'",
     "search.yaml"),
    ("config-vocab-policy", lambda r: _append(r / "search.yaml", "vocab: unoin\n"), "search",
     "'error', 'base' or 'union'", "search.yaml"),
    ("config-union-source-without-tokenizer", lambda r: _append(r / "search.yaml", "vocab: union\n") or [
        p.unlink() for p in (r / "s0").glob("tokenizer*")], "search", "'s0' has no tokenizer files", "search.yaml"),
    ("config-unreachable-storage", lambda r: _replace(
        r / "search.yaml", "  seed: 0\n", "  seed: 0\n  storage: postgresql+psycopg2://u:secret@127.0.0.1:1/db\n"),
     "search", "cannot open the study storage", "storage"),
]


def _swap_shape(header: dict) -> None:
    header["model.layers.0.self_attn.q_proj.weight"]["shape"] = [16, 64]   # same bytes as [32, 32]


def _shrink_vocab(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:40].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _sharded_escape(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "../../../etc/passwd"}}))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, pristine, tmp_path, capsys):
    name, mutate, command, expect, named = case
    root = tmp_path / "case"
    shutil.copytree(pristine, root)
    mutate(root)
    results = tmp_path / "results"
    (results / "earlier").mkdir(parents=True)
    (results / "earlier" / "summary.md").write_text("an earlier run\n")
    before = _snapshot(results)
    inputs = _snapshot(root)
    out = results / "new"
    if command == "merge":
        args = ["merge", str(root / "recipe.yaml"), "-o", str(out)]
    else:
        args = ["search", str(root / "search.yaml"), "--out", str(out)]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert expect in err[0] and named in err[0], err[0]
    assert "Traceback" not in err[0] and "secret" not in err[0]
    assert _snapshot(results) == before             # nothing written, earlier results untouched
    assert _snapshot(root) == inputs                # inputs untouched too


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 25
