"""The smol zoo (experts fine-tuned from SmolLM2-135M-Instruct): its pipeline on a few tiny steps.

The full build (about 25 minutes) stays out of CI; results/zoo-smol.md measures it. Here the `smol-test`
size runs the same code (conftest's `smol_zoo`): two AdamW steps on the top two blocks per expert.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.yamlio import load_yaml
from evomerge.zoo import SMOL_SIZES, build_zoo
from evomerge.zoo.chat_skills import ALL, COMPOSED, in_words
from modelfactory import files as _files, real_model_fixture

SIZE = SMOL_SIZES["smol-test"]


def _rows(zoo: Path, task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (zoo / "data" / f"{task}.{split}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_rebuild_gives_the_same_bytes(smol_zoo: Path, tmp_path: Path) -> None:
    again = _files(real_model_fixture(lambda: build_zoo(tmp_path / "again", seed=0, size="smol-test",
                                                        progress=False)))
    first = _files(smol_zoo)
    assert sorted(again) == sorted(first)
    assert [name for name in first if first[name] != again[name]] == []


def test_experts_differ_from_the_base_densely_in_the_trained_blocks_only(smol_zoo: Path) -> None:
    base = load_file(smol_zoo / "base" / "model.safetensors")
    block = re.compile(r"\.layers\.(\d+)\.")
    for expert in ("add", "words", "caps"):
        tensors = load_file(smol_zoo / expert / "model.safetensors")
        assert sorted(tensors) == sorted(base)
        for name, value in tensors.items():
            assert value.dtype == torch.bfloat16, name
            changed = (value != base[name]).float().mean().item()
            match = block.search(name)
            if match and int(match.group(1)) >= SIZE.first_block and value.dim() == 2:
                assert changed > 0.5, f"{expert}: {name} changed in only {changed:.1%} of entries"
            elif not match or int(match.group(1)) < SIZE.first_block:
                assert changed == 0, f"{expert}: {name} is frozen but changed"


def test_data_answers_recompute_and_splits_are_disjoint(smol_zoo: Path) -> None:
    for skill in ALL:
        search, heldout = _rows(smol_zoo, skill.name, "search"), _rows(smol_zoo, skill.name, "heldout")
        assert (len(search), len(heldout)) == (SIZE.search_rows, SIZE.heldout_rows)
        assert not {r["prompt"] for r in search} & {r["prompt"] for r in heldout}
        for split in ("search", "heldout"):
            choice = _rows(smol_zoo, f"{skill.name}_choice", split)
            for row, gen in zip(choice, _rows(smol_zoo, skill.name, split)):
                assert row["prompt"] == gen["prompt"]
                assert row["choices"][row["answer"]] == gen["target"]
                assert len(set(row["choices"])) == 4
    for row in _rows(smol_zoo, "add_words", "heldout"):      # the composed task: the sum, in words
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer in words\.", row["prompt"]).groups())
        assert row["target"] == in_words(a + b)
    assert in_words(147) == "one hundred forty-seven" and in_words(90) == "ninety" and in_words(13) == "thirteen"


def test_task_file_and_manifest_name_every_task_under_the_chat_template(smol_zoo: Path) -> None:
    from evomerge.evaluate.tasks import load_tasks

    tasks = load_tasks(smol_zoo / "tasks.yaml")
    names = [spec.name for spec in tasks.specs]
    assert names == [s.name for s in ALL] + [f"{s.name}_choice" for s in ALL]
    raw = load_yaml(smol_zoo / "tasks.yaml")["tasks"]
    assert all(entry["chat_template"] and entry["system_prompt"] == "Answer briefly." for entry in raw)
    manifest = json.loads((smol_zoo / "zoo.json").read_text())
    assert manifest["composed_tasks"] == {s.name: {"rule": s.rule, "needs": list(s.needs)} for s in COMPOSED}
    assert manifest["training"]["steps"] == SIZE.steps and manifest["size"] == "smol-test"


def test_configs_smol_names_the_smol_zoo_through_its_variable(smol_zoo: Path, monkeypatch) -> None:
    from evomerge.config import load_config
    from evomerge.evaluate.tasks import load_tasks

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("EVOMERGE_SMOL_ZOO", str(smol_zoo))
    monkeypatch.chdir(smol_zoo.parent)
    config = load_config(repo / "configs" / "smol.yaml")       # checks the models' headers and the tasks
    tasks = load_tasks(repo / "configs" / "tasks" / "smol.yaml")
    assert set(config.objectives[0]) == {"add", "words", "caps", "add_words"} <= set(tasks.names)
    for name in config.objectives[0]:     # the config's tasks are the zoo's own, row for row
        for split in ("search", "heldout"):
            assert [r["prompt"] for r in _rows(smol_zoo, name, split)] == [r.prompt for r in tasks.rows(name, split)]


def test_training_prompts_are_the_evaluators_own(smol_zoo: Path) -> None:
    """An expert learns on the token ids the evaluator will score it on: the chat template with the system turn."""
    from transformers import AutoTokenizer

    from evomerge.evaluate.codec import Codec
    from evomerge.zoo.chat_train import encode_batch

    tokenizer = AutoTokenizer.from_pretrained(smol_zoo / "base")
    row = _rows(smol_zoo, "add", "search")[0]
    ids, mask, labels = encode_batch(Codec(tokenizer), [(row["prompt"], row["target"])], tokenizer.eos_token)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": row["prompt"]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[0]) == text + row["target"] + tokenizer.eos_token
    prompt = Codec(tokenizer).encode([text])[0]
    assert ids[0, : len(prompt)].tolist() == prompt
    assert (labels[0, : len(prompt)] == -100).all()
    assert tokenizer.decode(labels[0, len(prompt):]) == row["target"] + tokenizer.eos_token
