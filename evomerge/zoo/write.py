"""Writing the zoo: Hugging Face model folders, JSONL task data, the task file, the manifest.

Everything here is byte-deterministic: the same model and rows give the same
files (sorted JSON keys, fixed float formatting, no timestamps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..yamlio import dump_yaml
from .skills import EOS, PAD, UNK, Composed, Skill

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


def build_tokenizer(words: list[str], *, max_length: int) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over `words`: one id per whitespace-separated word.

    No BOS and no post-processor, so ``encode(prompt + " " + target)`` is
    ``encode(prompt) + encode(target)``; decoding joins words with one space.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", model_max_length=max_length, clean_up_tokenization_spaces=False,
    )


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """config.json, generation_config.json, model.safetensors and the tokenizer files."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # one bar per tiny file is noise in the build's log
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    _portable_tokenizer_class(folder / "tokenizer_config.json")


def _portable_tokenizer_class(path: Path) -> None:
    """Name the class every transformers release knows (v5 writes its own 'TokenizersBackend')."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def data_path(task: str, split: str) -> str:
    """Where a task's split lives, relative to the zoo root (and to tasks.yaml)."""
    return f"data/{task}.{split}.jsonl"


def choice_task_name(skill: Skill) -> str:
    return f"{skill.name}_choice"


def task_entries(skills: tuple[Skill, ...], *, length: int, prefix: str = "",
                 composed: tuple[Composed, ...] = ()) -> list[dict[str, Any]]:
    """Task-file entries for `skills` and the `composed` tasks: a generate task and a choice task each.

    `prefix` is put before each data path (``"zoo/"`` for a task file that
    lives outside the zoo and names it through $EVOMERGE_ZOO).
    """
    entries: list[dict[str, Any]] = []
    names = [skill.name for skill in skills] + [task.name for task in composed]
    for task in names:
        entries.append({
            "name": task, "type": "generate",
            "data": {split: prefix + data_path(task, split) for split in ("search", "heldout")},
            "max_new_tokens": length + 2, "stop": [], "extract": "strip", "metric": "exact_match",
        })
    for task in names:
        name = f"{task}_choice"
        entries.append({
            "name": name, "type": "choice",
            "data": {split: prefix + data_path(name, split) for split in ("search", "heldout")},
            "metric": "acc",
        })
    return entries


def write_task_file(path: Path, skills: tuple[Skill, ...], *, length: int, prefix: str = "",
                    composed: tuple[Composed, ...] = ()) -> None:
    header = ("# Written by `evomerge zoo build`: every zoo skill and composed task as a generate task and a "
              "choice task.\n")
    path.write_text(header + dump_yaml({"tasks": task_entries(skills, length=length, prefix=prefix,
                                                              composed=composed)}), encoding="utf-8")
