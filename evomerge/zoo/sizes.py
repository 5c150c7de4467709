"""The zoo's sizes: model shape, training budget and data sizes, by name.

Kept free of heavy imports so that the CLI can list the sizes cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ZooSize:
    """Everything that differs between zoo sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    length: int              # symbols per example
    batch: int               # rows per training step
    base_steps: int
    base_lr: float           # AdamW
    instruct_steps: int      # the instruction stage (AdamW, lower half of the blocks), shared by the compatible experts
    instruct_lr: float       # its peak learning rate
    expert_steps: int        # fine-tuning steps for each compatible expert (AdamW, upper half of the blocks)
    conflicting_steps: int   # SGD steps for each expert of the conflicting pair
    expert_lr: float         # peak learning rate, compatible experts
    conflicting_lr: float    # SGD peak learning rate, the conflicting pair
    echo_share: float        # share of the base's answers that echo the input, compatible skills
    conflicting_echo_share: float  # and the conflicting pair
    replay: float            # share of each conflicting expert's batch replaying the other skills
    replay_echo_share: float  # share of echo answers in the replay
    search_rows: int         # per task
    heldout_rows: int        # per task
    lora_rank: int           # the LoRA adapters over the base (lora.py): rank r of every factor pair
    lora_alpha: int          # their scaling is lora_alpha / lora_rank
    lora_steps: int          # AdamW steps per compatible skill's adapter
    lora_conflicting_steps: int  # and per adapter of the conflicting pair
    lora_lr: float           # AdamW peak learning rate, every adapter

    def describe(self) -> dict[str, Any]:
        return asdict(self)


ZOO_SIZES: dict[str, ZooSize] = {
    # The demo's zoo: about a minute on one CPU core.
    "tiny": ZooSize(hidden=64, intermediate=192, layers=4, heads=4, length=3, batch=60,
                    base_steps=800, base_lr=6e-3, instruct_steps=300, instruct_lr=3e-3, expert_steps=200,
                    conflicting_steps=400,
                    expert_lr=1e-3, conflicting_lr=0.15, echo_share=0.95, conflicting_echo_share=0.85,
                    replay=0.2, replay_echo_share=0.95, search_rows=100, heldout_rows=200,
                    lora_rank=16, lora_alpha=32, lora_steps=100, lora_conflicting_steps=120, lora_lr=5e-3),
    # The test suite's zoo: the same skills, smaller and quicker.
    "test": ZooSize(hidden=48, intermediate=128, layers=4, heads=4, length=3, batch=60,
                    base_steps=500, base_lr=6e-3, instruct_steps=150, instruct_lr=3e-3, expert_steps=100,
                    conflicting_steps=200,
                    expert_lr=1e-3, conflicting_lr=0.15, echo_share=0.95, conflicting_echo_share=0.85,
                    replay=0.2, replay_echo_share=0.95, search_rows=40, heldout_rows=100,
                    lora_rank=8, lora_alpha=16, lora_steps=60, lora_conflicting_steps=60, lora_lr=5e-3),
    # Wider and longer-trained, for a machine with time (or a GPU).
    "small": ZooSize(hidden=128, intermediate=384, layers=4, heads=4, length=4, batch=60,
                     base_steps=3000, base_lr=3e-3, instruct_steps=600, instruct_lr=2e-3, expert_steps=300,
                     conflicting_steps=600,
                     expert_lr=1e-3, conflicting_lr=0.15, echo_share=0.95, conflicting_echo_share=0.85,
                     replay=0.2, replay_echo_share=0.95, search_rows=200, heldout_rows=500,
                     lora_rank=16, lora_alpha=32, lora_steps=200, lora_conflicting_steps=250, lora_lr=3e-3),
}


@dataclass(frozen=True)
class SmolSize:
    """The smol zoo: experts fine-tuned from SmolLM2-135M-Instruct (see chat_train.py)."""

    first_block: int         # blocks first_block.. are trained (SmolLM2 has 30)
    steps: int               # AdamW steps per expert
    batch: int               # examples per step
    lr: float                # peak learning rate
    search_rows: int         # per task
    heldout_rows: int        # per task

    def describe(self) -> dict[str, Any]:
        return asdict(self)


SMOL_SIZES: dict[str, SmolSize] = {
    # About 25 minutes on a 2-core CPU, on one thread (results/zoo-smol.md says how the recipe was chosen).
    "smol": SmolSize(first_block=10, steps=150, batch=16, lr=1e-4, search_rows=200, heldout_rows=100),
    # The same pipeline in seconds, for the determinism test: two steps on the top two blocks, at a
    # learning rate high enough that the first steps survive bf16 rounding.
    "smol-test": SmolSize(first_block=28, steps=2, batch=2, lr=1e-2, search_rows=4, heldout_rows=4),
}
