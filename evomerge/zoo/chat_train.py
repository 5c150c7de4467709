"""Fine-tuning a pretrained chat model on one skill, on CPU, deterministically.

An expert is the base with its upper blocks fully fine-tuned (AdamW on every
weight of blocks `first_block`.., embeddings, lower blocks and head frozen):
the change is dense in every trained tensor, as a real fine-tune's is, while
the backward pass stops at `first_block` and the 49k-row embedding gets no
gradient. The loss is on the answer tokens and the end-of-turn token only.
Training runs in float32 and the expert is saved in bf16, like the base.

Every batch is drawn from a `random.Random` seeded from the zoo's seed; inputs
of the evaluation splits are never drawn. The build trains on one thread
(smol_build.py), so the same seed gives the same bytes whatever the core count.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

import torch

from ..evaluate.codec import Codec
from .chat_skills import SYSTEM_PROMPT, ChatSkill, Key
from .train import schedule

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode_batch(codec: Codec, examples: list[tuple[str, str]],
                 end_of_turn: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and labels (-100 but on the answer and end of turn), right-padded.

    The prompt's tokens are the evaluator's own (`Codec.chat` + `Codec.encode`, lm-eval's rendering of a
    chat-template task with this system prompt), so an expert is trained on exactly what it is scored on.
    """
    tokenizer = codec.tokenizer
    prompts = codec.encode(codec.chat([question for question, _ in examples], system=SYSTEM_PROMPT))
    ids, labels = [], []
    for prompt, (_, answer) in zip(prompts, examples):
        reply = tokenizer(answer + end_of_turn, add_special_tokens=False).input_ids
        ids.append(prompt + reply)
        labels.append([-100] * len(prompt) + reply)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    out_labels = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(zip(ids, labels)):
        out_ids[row, : len(seq)] = torch.tensor(seq)
        out_labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return out_ids, mask, out_labels


def finetune_upper_blocks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, skill: ChatSkill, *,
                          first_block: int, steps: int, batch: int, lr: float, rng: random.Random,
                          held_out: set[Key], end_of_turn: str,
                          on_step: Callable[[int, float], None] | None = None) -> float:
    """Train blocks `first_block`.. of `model` (float32) on `skill`; returns the last step's loss."""
    blocks = _blocks(model)
    for param in model.parameters():
        param.requires_grad_(False)
    trained = [p for block in blocks[first_block:] for p in block.parameters()]
    for param in trained:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    codec = Codec(tokenizer)
    model.train()
    loss = float("nan")
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule(step, steps, warmup=10, floor=0.1)   # cosine to 10 % of the peak
        examples = [skill.example(_draw_outside(skill, rng, held_out)) for _ in range(batch)]
        ids, mask, labels = encode_batch(codec, examples, end_of_turn)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        if on_step is not None:
            on_step(step, loss)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return loss


def _draw_outside(skill: ChatSkill, rng: random.Random, held_out: set[Key]) -> Key:
    while True:
        key = skill.draw(rng)
        if key not in held_out:
            return key


def _blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers to fine-tune")
    return layers
