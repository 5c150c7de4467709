"""Training one variant of the zoo (variants.py says what a variant is) with the zoo's own pieces.

The steps are the zoo's (build.py): the task data, a base pretrained on every skill's named format, an
optional instruction stage, then one expert per skill. What a variant changes is the shape, which blocks the
instruction stage and each expert tune, and the experts' pace. Every expert is tuned with AdamW
(`tune_blocks`) on its own blocks only: a compatible expert on the instruction format from the instruction
stage, an expert of the conflicting pair on its named format from the base, a fifth of each batch replaying
the other skills.

Where the instruction format is learned is what the instruction stage changes. With the stage, the base
knows the named formats only and the stage teaches the instruction format (the echo): a change every
compatible task vector holds, in the stage's blocks. Without it, the base is pretrained on the instruction
format's echo too (one more part in each batch), and the compatible experts start from the base. (Experts
that each had to learn the format themselves as well as their skill, from a base that never saw it, were
tried: their task vectors repeat the format change in the same blocks as the skill, and for variants 3 and 6
no grid merge beat the best expert alone by the target.)
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from .build import _echo_share, _write_data
from .sizes import ZOO_SIZES, ZooSize
from .skills import COMPATIBLE, COMPATIBLE_SKILLS, SKILLS, SKILLS_BY_NAME, UNION, Skill, to_union
from .train import (Batches, Draw, Encoder, FormatBatches, input_keys, new_model, pretrain, reproducible_cpu,
                    tune_blocks, with_replay)
from .version import TASK_FILE, derive_seed
from .write import build_tokenizer, save_model_folder, write_task_file

VariantSpec = Any   # a variants.VariantSpec (not imported: variants.py imports this module)

BASE_STEPS = 500
INSTRUCT_STEPS = 150
ROWS = {"search_rows": 40, "heldout_rows": 100}


def variant_size(spec: VariantSpec) -> ZooSize:
    """The test zoo's size with the variant's shape and pace (four heads; MLP three times as wide)."""
    return dataclasses.replace(
        ZOO_SIZES["test"], hidden=spec.hidden, intermediate=3 * spec.hidden, layers=spec.layers, heads=4,
        base_steps=BASE_STEPS, instruct_steps=INSTRUCT_STEPS if spec.instruct else 0,
        expert_steps=spec.expert_steps, expert_lr=spec.expert_lr,
        conflicting_steps=spec.expert_steps, conflicting_lr=spec.expert_lr, **ROWS)


def training_record(size: ZooSize) -> dict[str, Any]:
    """The budget that was used, for zoo.json: the zoo's fields less the LoRA library's (no adapters here)."""
    record = {k: v for k, v in size.describe().items() if not k.startswith("lora_")}
    record["expert_optimizer"] = "adamw"
    return record


def build_variant_into(folder: Path, spec: VariantSpec, *, data_seed: int, train_seed: int,
                       log: Callable[[str], None]) -> dict[str, Any]:
    """Write the variant's data, base, experts and task file into `folder`; return the training record."""
    size = variant_size(spec)
    skills = tuple(SKILLS_BY_NAME[name] for name in spec.experts)
    with reproducible_cpu():
        encoder = Encoder()
        tokenizer = build_tokenizer(encoder.words, max_length=4 * size.length + 8)
        held_out = {skill.name: _write_data(folder, skill, size, seed=data_seed) for skill in skills}
        batches = {s.name: Batches(encoder, s, length=size.length, echo_share=_echo_share(s, size),
                                   held_out=held_out.get(s.name, [])) for s in SKILLS}

        def gen(*names: str) -> torch.Generator:
            return torch.Generator().manual_seed(derive_seed(train_seed, *names))

        held = _format_held_out(held_out)
        mixture: list[Any] = list(batches.values())
        if not spec.instruct:
            mixture.append(FormatEcho(FormatBatches(encoder, None, length=size.length,
                                                    alphabets=len(COMPATIBLE_SKILLS), held_out=held)))
        base = new_model(size, encoder, gen=gen("init"))
        loss = pretrain(base, mixture, size, gen=gen("base"))
        save_model_folder(base, tokenizer, folder / "base")
        log(f"base: {size.layers} blocks of width {size.hidden}, {size.base_steps} steps"
            f"{'' if spec.instruct else ' (with the instruction format)'}, final loss {loss:.3f}")

        instruct = base
        if spec.instruct:
            instruct = copy.deepcopy(base)
            echo = FormatBatches(encoder, None, length=size.length, alphabets=len(COMPATIBLE_SKILLS), held_out=held)
            loss = tune_blocks(instruct, echo, size, blocks=_blocks(spec.instruct_blocks), steps=size.instruct_steps,
                               lr=size.instruct_lr, gen=gen("instruct"))
            log(f"instruction stage: {size.instruct_steps} steps on blocks {list(spec.instruct_blocks)}, "
                f"final loss {loss:.3f}")

        for skill, blocks in zip(skills, spec.blocks):
            tuned = _blocks(blocks, io=spec.tuned == "full")
            if skill.group == COMPATIBLE:
                expert = copy.deepcopy(instruct)
                draws: Any = FormatBatches(encoder, skill, length=size.length, alphabets=len(COMPATIBLE_SKILLS),
                                           held_out=held)
            else:
                expert = copy.deepcopy(base)
                others = [batches[s.name] for s in SKILLS if s is not skill]
                draws = ReplayBatches(with_replay(batches[skill.name], others, size))
            loss = tune_blocks(expert, draws, size, blocks=tuned, steps=spec.expert_steps, lr=spec.expert_lr,
                               gen=gen("expert", skill.name))
            save_model_folder(expert, tokenizer, folder / skill.name)
            log(f"{skill.name}: {spec.expert_steps} steps on blocks {list(blocks)}"
                f"{' and embeddings, head' if spec.tuned == 'full' else ''}, final loss {loss:.3f}")

    write_task_file(folder / TASK_FILE, skills, length=size.length)
    return training_record(size)


class FormatEcho:
    """The instruction format's echo as one more part of the base's pretraining batches (`pretrain` draws
    from each part with its `echo_share`; this part's answers are always the echo)."""

    echo_share = 1.0

    def __init__(self, batches: FormatBatches) -> None:
        self._batches = batches

    def draw(self, rows: int, *, echo_share: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batches.draw(rows, gen=gen)


class ReplayBatches:
    """A conflicting expert's batches (`with_replay`) in the shape `tune_blocks` draws from."""

    def __init__(self, draw: Draw) -> None:
        self._draw = draw

    def draw(self, rows: int, *, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of the size's rows (`rows` is that same number: tune_blocks passes size.batch)."""
        return self._draw(gen)


def _blocks(blocks: tuple[int, ...], *, io: bool = False) -> frozenset[int | None]:
    """What `tune_blocks` trains: the block indices, and with `io` the tensors outside the blocks (layer None:
    embeddings, final norm, head), so that a full fine-tune trains every parameter (`tune_blocks` only asks
    whether a tensor's layer is in it)."""
    return frozenset(blocks) | (frozenset({None}) if io else frozenset())


def _format_held_out(held_out: dict[str, list[list[int]]]) -> torch.Tensor:
    """Keys (over UNION) of the variant's instruction-format evaluation inputs, kept out of every batch."""
    rows = [to_union(skill, torch.tensor(held_out[skill.name])) for skill in _compatible(held_out)]
    if not rows:
        return torch.empty(0, dtype=torch.int64)
    return input_keys(torch.cat(rows), len(UNION))


def _compatible(held_out: dict[str, list[list[int]]]) -> list[Skill]:
    return [skill for skill in COMPATIBLE_SKILLS if skill.name in held_out]
