"""Building the zoo into a folder: data first, then the base, the instruction stage, each expert, then the LoRA
adapters over the base."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch

from .lora import LORA_FOLDER, write_adapters
from .lora import manifest_entry as lora_manifest
from .sizes import ZooSize
from .skills import (COMPATIBLE, COMPATIBLE_SKILLS, COMPOSED, CONFLICTING, SKILLS, UNION, Composed, Skill,
                     choice_rows, composed_choice_rows, composed_generate_rows, generate_rows, prompt_text,
                     sample_composed, sample_inputs, to_union)
from .train import (Batches, Encoder, FormatBatches, finetune, input_keys, new_model, pretrain, reproducible_cpu,
                    tune_blocks)
from .version import MANIFEST, TASK_FILE, ZOO_VERSION, derive_seed
from .write import (build_tokenizer, choice_task_name, data_path, save_model_folder, write_json, write_jsonl,
                    write_task_file)

SPLITS = ("search", "heldout")


def build_into(folder: Path, size: ZooSize, *, seed: int, size_name: str, log: Callable[[str], None]) -> None:
    """Write the whole zoo into the (empty) `folder`."""
    with reproducible_cpu():
        encoder = Encoder()
        tokenizer = build_tokenizer(encoder.words, max_length=4 * size.length + 8)
        held_out = {skill.name: _write_data(folder, skill, size, seed=seed) for skill in SKILLS}
        composed = {task.name: _write_composed(folder, task, size, seed=seed) for task in COMPOSED}
        batches = {s.name: Batches(encoder, s, length=size.length, echo_share=_echo_share(s, size),
                                   held_out=held_out[s.name]) for s in SKILLS}

        base = new_model(size, encoder, gen=torch.Generator().manual_seed(derive_seed(seed, "init")))
        loss = pretrain(base, list(batches.values()), size, gen=torch.Generator().manual_seed(derive_seed(seed, "base")))
        save_model_folder(base, tokenizer, folder / "base")
        log(f"base: {size.base_steps} steps, final loss {loss:.3f}")

        # The instruction stage (lower blocks), shared by every compatible expert; not written out.
        held = _union_held_out(held_out, composed)
        lower, upper = range(0, size.layers // 2), range(size.layers // 2, size.layers)
        alphabets = len(COMPATIBLE_SKILLS)
        instruct = copy.deepcopy(base)
        echo = FormatBatches(encoder, None, length=size.length, alphabets=alphabets, held_out=held)
        loss = tune_blocks(instruct, echo, size, blocks=lower, steps=size.instruct_steps, lr=size.instruct_lr,
                           gen=torch.Generator().manual_seed(derive_seed(seed, "instruct")))
        log(f"instruction stage: {size.instruct_steps} steps on blocks {lower.start}-{lower.stop - 1}, "
            f"final loss {loss:.3f}")

        for skill in SKILLS:
            gen = torch.Generator().manual_seed(derive_seed(seed, "expert", skill.name))
            if skill.group == COMPATIBLE:
                expert = copy.deepcopy(instruct)
                steps = size.expert_steps
                own = FormatBatches(encoder, skill, length=size.length, alphabets=alphabets, held_out=held)
                loss = tune_blocks(expert, own, size, blocks=upper, steps=steps, lr=size.expert_lr, gen=gen)
            else:
                expert = copy.deepcopy(base)
                steps = size.conflicting_steps
                others = [batches[s.name] for s in SKILLS if s is not skill]
                loss = finetune(expert, batches[skill.name], others, size, steps=steps, lr=size.conflicting_lr,
                                optimizer="sgd", gen=gen)
            save_model_folder(expert, tokenizer, folder / skill.name)
            log(f"{skill.name}: {steps} steps, final loss {loss:.3f}")

        # The LoRA library over the base (lora.py): own seeds, so everything above keeps its bytes.
        write_adapters(folder / LORA_FOLDER, base, encoder, batches, size, held=held, alphabets=alphabets,
                       seed=seed, log=log)

    write_task_file(folder / TASK_FILE, SKILLS, length=size.length, composed=COMPOSED)
    write_json(folder / MANIFEST, manifest(size, seed=seed, size_name=size_name))


def _echo_share(skill: Skill, size: ZooSize) -> float:
    return size.echo_share if skill.group == COMPATIBLE else size.conflicting_echo_share


def _write_data(folder: Path, skill: Skill, size: ZooSize, *, seed: int) -> list[list[int]]:
    """Both splits of the skill's generate and choice tasks; returns every input used."""
    return _write_splits(folder, skill.name, size, seed=seed,
                         sample=lambda count, gen, taken: sample_inputs(skill, count, length=size.length, gen=gen,
                                                                        exclude=taken),
                         generate=lambda inputs: generate_rows(skill, inputs),
                         choice=lambda inputs, gen: choice_rows(skill, inputs, gen=gen))


def _write_composed(folder: Path, task: Composed, size: ZooSize, *, seed: int) -> list[list[int]]:
    """Both splits of a composed task's generate and choice tasks; returns every (UNION) input used."""
    return _write_splits(folder, task.name, size, seed=seed,
                         sample=lambda count, gen, taken: sample_composed(task, count, length=size.length, gen=gen,
                                                                          exclude=taken),
                         generate=lambda inputs: composed_generate_rows(task, inputs),
                         choice=lambda inputs, gen: composed_choice_rows(task, inputs, gen=gen))


def _write_splits(folder: Path, name: str, size: ZooSize, *, seed: int, sample: Callable, generate: Callable,
                  choice: Callable) -> list[list[int]]:
    """Task `name`'s search and held-out rows, generate and choice, from inputs `sample` draws (no input in
    both splits), one generator seeded by the name; returns every input used."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "data", name))
    taken: set[tuple[int, ...]] = set()
    used: list[list[int]] = []
    for split in SPLITS:
        inputs = sample(size.search_rows if split == "search" else size.heldout_rows, gen, taken)
        write_jsonl(folder / data_path(name, split), generate(inputs))
        write_jsonl(folder / data_path(f"{name}_choice", split), choice(inputs, gen))
        used.extend(inputs)
    return used


def _union_held_out(held_out: dict[str, list[list[int]]], composed: dict[str, list[list[int]]]) -> torch.Tensor:
    """Keys (over UNION) of every instruction-format evaluation input: the compatible tasks' and the composed ones'."""
    rows = [to_union(skill, torch.tensor(held_out[skill.name])) for skill in COMPATIBLE_SKILLS]
    rows += [torch.tensor(inputs) for inputs in composed.values()]
    return input_keys(torch.cat(rows), len(UNION))


def manifest(size: ZooSize, *, seed: int, size_name: str) -> dict[str, Any]:
    """What zoo.json says: enough to use the zoo without reading this code."""
    example = SKILLS[0]
    x = [(3 + 4 * i) % len(example.symbols) for i in range(size.length)]
    return {
        "evomerge_zoo": ZOO_VERSION,
        "seed": seed,
        "size": size_name,
        "base": "base",
        "task_file": TASK_FILE,
        "skills": [skill.name for skill in SKILLS],
        "compatible": [skill.name for skill in SKILLS if skill.group == COMPATIBLE],
        "conflicting": [skill.name for skill in SKILLS if skill.group == CONFLICTING],
        "composed_tasks": {task.name: {"rule": task.rule, "needs": list(task.needs),
                                       "choice_task": f"{task.name}_choice"} for task in COMPOSED},
        "experts": {
            skill.name: {
                "folder": skill.name,
                "task": skill.name,
                "choice_task": choice_task_name(skill),
                "group": skill.group,
                "alphabet": skill.alphabet,
                "rule": skill.rule,
                "prompt_word": skill.prompt_word,
            }
            for skill in SKILLS
        },
        "format": {
            "length": size.length,
            "example": {"prompt": prompt_text(example, x), "target": generate_rows(example, [x])[0]["target"]},
            "ends_with": "<eos>",
        },
        "lora": lora_manifest(size),
        "training": size.describe(),
    }
