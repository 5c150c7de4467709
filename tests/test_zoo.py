"""The local model zoo: reproducible bytes, real HF folders, experts that know their skill, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from evomerge.errors import InputError
from evomerge.paths import resolve_path
from evomerge.yamlio import load_yaml
from evomerge.zoo import ZOO_SIZES, build_zoo
from modelfactory import files as _files

EXPERT_FLOOR = 0.95   # each expert on its own held-out split
BASE_CEILING = 0.25   # the base on every skill: clearly below


def _manifest(zoo: Path) -> dict:
    return json.loads((zoo / "zoo.json").read_text())


def _rows(zoo: Path, task: str, split: str = "heldout") -> list[dict]:
    return [json.loads(line) for line in (zoo / "data" / f"{task}.{split}.jsonl").read_text().splitlines()]


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def _exact_match(model, tokenizer, rows: list[dict]) -> float:
    """Greedy `generate`, decode, strip, compare: what a `generate` task with `extract: strip` does."""
    batch = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    out = model.generate(**batch, do_sample=False, max_new_tokens=8)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(text.strip() == r["target"] for text, r in zip(texts, rows)) / len(rows)


@torch.no_grad()
def _choice_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Summed log-likelihood of each choice after the prompt, as a `choice` task scores it."""
    right = 0
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        scores = []
        for choice in row["choices"]:
            ids = tokenizer(row["prompt"] + choice)["input_ids"]
            logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(prompt), len(ids))))
        right += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    return right / len(rows)


def test_layout_and_manifest(zoo: Path) -> None:
    manifest = _manifest(zoo)
    assert manifest["seed"] == 0 and manifest["size"] == "test"
    assert len(manifest["compatible"]) >= 2 and len(manifest["conflicting"]) == 2
    assert len(manifest["experts"]) >= 4
    for folder in ["base", *manifest["skills"]]:
        names = {p.name for p in (zoo / folder).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    tasks = load_yaml(zoo / "tasks.yaml")["tasks"]
    assert {t["type"] for t in tasks} == {"generate", "choice"}
    for task in tasks:
        for split in ("search", "heldout"):
            assert resolve_path(task["data"][split], relative_to=zoo) == (zoo / task["data"][split]).resolve()


def test_splits_are_disjoint_and_well_formed(zoo: Path) -> None:
    for skill, info in _manifest(zoo)["experts"].items():
        search, heldout = _rows(zoo, skill, "search"), _rows(zoo, skill, "heldout")
        assert not {r["prompt"] for r in search} & {r["prompt"] for r in heldout}
        word = "ask" if info["group"] == "compatible" else skill    # the instruction format, or the named one
        assert info["prompt_word"] == word
        assert all(r["prompt"].startswith(word + " ") and r["prompt"].endswith(" = ") for r in heldout)
        assert all(r["target"] == r["target"].strip() for r in heldout)
        for row in _rows(zoo, info["choice_task"]):
            assert len(set(row["choices"])) == len(row["choices"]) >= 2
            assert 0 <= row["answer"] < len(row["choices"])


def test_the_composed_task_needs_two_skills_in_one_input(zoo: Path) -> None:
    manifest = _manifest(zoo)
    assert manifest["composed_tasks"]["inc_rot"]["needs"] == ["inc", "rot"]
    tasks = {t["name"] for t in load_yaml(zoo / "tasks.yaml")["tasks"]}
    assert {"inc_rot", "inc_rot_choice"} <= tasks
    search, heldout = _rows(zoo, "inc_rot", "search"), _rows(zoo, "inc_rot")
    assert not {r["prompt"] for r in search} & {r["prompt"] for r in heldout}
    digits, letters = set("0123456789"), set("abcdefghij")
    for row in heldout:
        words = row["prompt"].split()
        assert words[0] == "ask" and words[-1] == "="
        symbols = words[1:-1]
        assert set(symbols) & digits and set(symbols) & letters and set(symbols) <= digits | letters
        want = [str((int(w) + 1) % 10) if w in digits else "abcdefghij"[("abcdefghij".index(w) + 1) % 10]
                for w in symbols]
        assert row["target"] == " ".join(want)


def test_zoo_paths_resolve_inside_the_session_zoo(zoo: Path) -> None:
    assert resolve_path("zoo/base") == (zoo / "base").resolve()
    assert resolve_path("zoo/data/inc.heldout.jsonl") == (zoo / "data" / "inc.heldout.jsonl").resolve()


def test_tokenizer_is_word_level_and_exact(zoo: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    assert tokenizer.eos_token and tokenizer.pad_token and tokenizer.pad_token_id != tokenizer.eos_token_id
    for row in _rows(zoo, "rev")[:20] + _rows(zoo, "mir")[:20]:
        prompt, target = tokenizer(row["prompt"])["input_ids"], tokenizer(row["target"])["input_ids"]
        for joined in (row["prompt"] + row["target"], row["prompt"] + " " + row["target"]):
            assert tokenizer(joined)["input_ids"] == prompt + target  # evomerge's and lm-eval's conventions
        assert tokenizer.unk_token_id not in prompt + target
        assert tokenizer.decode(target + [tokenizer.eos_token_id], skip_special_tokens=True) == row["target"]


def test_experts_know_their_skill_and_the_base_does_not(zoo: Path) -> None:
    manifest = _manifest(zoo)
    base, tokenizer = _load(zoo / "base")
    for skill, info in manifest["experts"].items():
        rows = _rows(zoo, info["task"])
        expert, _ = _load(zoo / info["folder"])
        own = _exact_match(expert, tokenizer, rows)
        assert own >= EXPERT_FLOOR, f"{skill} expert: {own:.3f} on its own held-out split"
        before = _exact_match(base, tokenizer, rows)
        assert before <= BASE_CEILING, f"base on {skill}: {before:.3f}"


@pytest.mark.slow
def test_choice_tasks_separate_experts_from_the_base(zoo: Path) -> None:
    base, tokenizer = _load(zoo / "base")
    for skill in ("inc", "sort"):
        rows = _rows(zoo, f"{skill}_choice")[:40]
        expert, _ = _load(zoo / skill)
        assert _choice_accuracy(expert, tokenizer, rows) >= 0.9
        assert _choice_accuracy(base, tokenizer, rows) <= 0.5


@pytest.mark.slow
def test_same_seed_same_bytes_and_force_replaces(zoo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    again.mkdir()
    (again / "stale.txt").write_text("from an earlier build")
    build_zoo(again, seed=0, size="test", force=True, progress=False)
    first, second = _files(zoo), _files(again)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
    assert not list(tmp_path.glob(".again.*"))  # no staging folder left beside OUT


def _one_line(err: pytest.ExceptionInfo[InputError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_refuses_a_non_empty_folder_without_force(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError) as err:
        build_zoo(out, size="test", progress=False)
    assert "--force" in _one_line(err) and str(out) in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]


def test_unknown_size_suggests_a_known_one(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        build_zoo(tmp_path / "zoo", size="tinny", progress=False)
    assert "tinny" in _one_line(err) and "'tiny'" in str(err.value)
    assert set(ZOO_SIZES) >= {"tiny", "test"}
    assert not list(tmp_path.iterdir())


def test_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError) as err:
        build_zoo(blocker / "zoo", size="test", progress=False)
    assert "a-file" in _one_line(err)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(InputError) as err:
            build_zoo(locked / "zoo", size="test", progress=False)
        assert "write" in _one_line(err)
    finally:
        locked.chmod(0o700)


def test_the_harness_scores_every_choice_task_as_the_expert_knows_it(zoo: Path) -> None:
    """evomerge's own evaluator on the zoo's task file: each expert wins its choice task, the base does not."""
    import dataclasses

    from evomerge.evaluate import Evaluator, load_tasks

    suite = load_tasks(zoo / "tasks.yaml")
    base, tokenizer = _load(zoo / "base")
    for skill, info in _manifest(zoo)["experts"].items():
        one = dataclasses.replace(suite, specs=tuple(s for s in suite.specs if s.name == info["choice_task"]))
        expert, _ = _load(zoo / info["folder"])
        own = Evaluator(one, expert, tokenizer).evaluate("heldout").tasks[info["choice_task"]]["acc"]
        before = Evaluator(one, base, tokenizer).evaluate("heldout").tasks[info["choice_task"]]["acc"]
        assert own >= 0.9 and before <= 0.5, f"{skill}: expert {own:.3f}, base {before:.3f} on its choice task"


def test_a_zoo_from_another_version_is_not_current(zoo: Path, tmp_path: Path) -> None:
    """The demo rebuilds a cached zoo that an older evomerge built (`ensure_zoo` asks `is_current`)."""
    import shutil

    from evomerge.zoo import ZOO_VERSION, is_current, read_manifest

    assert _manifest(zoo)["evomerge_zoo"] == ZOO_VERSION
    current = read_manifest(zoo)
    assert is_current(current, size="test") and not is_current(current, size="tiny")
    assert read_manifest(tmp_path) is None and not is_current(read_manifest(tmp_path))
    old = tmp_path / "old"
    shutil.copytree(zoo, old)
    manifest = _manifest(old)
    manifest["evomerge_zoo"] = ZOO_VERSION - 1
    (old / "zoo.json").write_text(json.dumps(manifest))
    assert not is_current(read_manifest(old), size="test")


def test_the_demo_rebuilds_an_outdated_zoo_and_leaves_other_sizes_alone(zoo: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import evomerge.zoo
    from evomerge.demo import ensure_zoo

    built: list[tuple[Path, str]] = []
    monkeypatch.setattr(evomerge.zoo, "build_zoo", lambda root, *, size, force, progress: built.append((root, size)))
    monkeypatch.setenv("EVOMERGE_ZOO", str(zoo))
    assert ensure_zoo(size="test") == (zoo, False) and not built           # current: reused as it is
    with pytest.raises(InputError, match="holds a 'test' zoo; the demo needs the 'tiny' one"):
        ensure_zoo(size="tiny")                                              # somebody's own zoo: never replaced
    assert not built
    old = tmp_path / "old"
    shutil.copytree(zoo, old)
    manifest = _manifest(old)
    manifest["evomerge_zoo"] -= 1
    (old / "zoo.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("EVOMERGE_ZOO", str(old))
    assert ensure_zoo(size="test") == (old, True) and built == [(old, "test")]   # an older version: rebuilt
