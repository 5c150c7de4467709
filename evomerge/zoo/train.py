"""Training the zoo's models on CPU, deterministically.

The base is pretrained on every skill's named format with a mixed answer: the
echo of the input most of the time and the skill's answer otherwise, so it
knows each skill but prefers to echo (greedy decoding echoes, and scores
nothing).

The compatible experts are made in two stages, as real fine-tunes are made
from one instruction-tuned model: first the *instruction stage* teaches the
lower half of the blocks the instruction format (``ask x = x``, the echo, on
inputs that mix the alphabets; embeddings, head and upper blocks frozen), once,
and every compatible expert starts from it; then each expert tunes the upper
half of the blocks on its skill (its own symbols rewritten, every other symbol
echoed). So each compatible task vector (expert minus base) holds the same
instruction change in the lower blocks and its own skill in the upper ones:
adding the vectors adds the shared change once per expert, which the lower
blocks need at weight 1/k and the upper ones near 1. No single weight fits both
(measured on the tiny zoo, see benchmarks/zoo_headroom.py): one per layer group
recovers the skills, every one-knob merge loses them. That gap is the headroom a
per-layer merge search is for. The conflicting pair is the base fine-tuned on
the named format with SGD, a fifth of each batch replaying the other skills.

All randomness comes from explicit ``torch.Generator`` objects; the batch order
is fixed; training runs on one thread with denormals flushed, so the same seed
gives the same bytes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..sources import classify
from .sizes import ZooSize
from .skills import EOS, FORMAT_WORD, PAD, SEPARATOR, UNION, Skill, apply_union, union_offset, vocabulary

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM


class Encoder:
    """Token ids for a skill's examples, as tensors."""

    def __init__(self) -> None:
        self.words = vocabulary()
        self.ids = {word: i for i, word in enumerate(self.words)}
        self.eos = self.ids[EOS]
        self.pad = self.ids[PAD]

    def symbol_ids(self, skill: Skill) -> torch.Tensor:
        return torch.tensor([self.ids[s] for s in skill.symbols])

    def examples(self, skill: Skill, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids and labels (-100 on the prompt) for ``skill x = y <eos>``."""
        rows, n = x.shape
        symbols = self.symbol_ids(skill)
        ids = torch.cat([
            torch.full((rows, 1), self.ids[skill.name]), symbols[x],
            torch.full((rows, 1), self.ids[SEPARATOR]), symbols[y], torch.full((rows, 1), self.eos),
        ], dim=1)
        labels = ids.clone()
        labels[:, : n + 2] = -100
        return ids, labels

    def format_examples(self, u: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids and labels for the instruction format ``ask u = y <eos>``, over UNION indices."""
        rows, n = u.shape
        symbols = torch.tensor([self.ids[s] for s in UNION])
        ids = torch.cat([
            torch.full((rows, 1), self.ids[FORMAT_WORD]), symbols[u],
            torch.full((rows, 1), self.ids[SEPARATOR]), symbols[y], torch.full((rows, 1), self.eos),
        ], dim=1)
        labels = ids.clone()
        labels[:, : n + 2] = -100
        return ids, labels


def input_keys(x: torch.Tensor, base: int) -> torch.Tensor:
    """One integer per row of alphabet indices, for excluding evaluation inputs."""
    weights = base ** torch.arange(x.shape[1], dtype=torch.int64)
    return (x.to(torch.int64) * weights).sum(dim=1)


class Batches:
    """Training batches for one skill; evaluation inputs never appear (their rows are masked)."""

    def __init__(self, encoder: Encoder, skill: Skill, *, length: int, echo_share: float,
                 held_out: list[list[int]]) -> None:
        self.encoder = encoder
        self.skill = skill
        self.length = length
        self.echo_share = echo_share   # in the base's mixture
        size = len(skill.symbols)
        self.held_out = input_keys(torch.tensor(held_out), size) if held_out else torch.empty(0, dtype=torch.int64)

    def draw(self, rows: int, *, echo_share: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` examples whose answer is the echo with probability `echo_share`, else the skill's."""
        x = torch.randint(len(self.skill.symbols), (rows, self.length), generator=gen)
        echo = torch.rand(rows, 1, generator=gen) < echo_share
        y = torch.where(echo, x, self.skill.apply(x))
        ids, labels = self.encoder.examples(self.skill, x, y)
        labels[torch.isin(input_keys(x, len(self.skill.symbols)), self.held_out)] = -100
        return ids, labels


class FormatBatches:
    """Instruction-format batches over UNION; evaluation inputs never appear (their rows are masked).

    Each row's input is one alphabet throughout, or a mix of all three (a symbol's alphabet drawn per
    position). With `skill` None (the instruction stage) the answer is the echo, the alphabet drawn evenly,
    and half the rows mixed. With a skill, the answer is the skill on its own symbols and the echo on the
    others; `shares` (own, mixed, other) splits the rows between the skill's alphabet alone, mixed inputs,
    and another alphabet alone (a replay of what the instruction stage taught).
    """

    SKILL_SHARES = (0.5, 0.3, 0.2)

    def __init__(self, encoder: Encoder, skill: Skill | None, *, length: int, alphabets: int,
                 held_out: torch.Tensor) -> None:
        self.encoder, self.skill, self.length, self.alphabets = encoder, skill, length, alphabets
        self.held_out = held_out   # input_keys over UNION
        self.own = None if skill is None else union_offset(skill) // len(skill.symbols)

    def draw(self, rows: int, *, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = self.length, self.alphabets
        whole = torch.randint(k, (rows, 1), generator=gen)
        kind = torch.rand(rows, 1, generator=gen)
        mixed = torch.randint(k, (rows, n), generator=gen)
        if self.skill is None:
            alphabet = torch.where(kind < 0.5, whole.expand(rows, n), mixed)
        else:
            own, share_mixed = self.SKILL_SHARES[0], self.SKILL_SHARES[1]
            other = (self.own + 1 + whole % (k - 1)) % k
            alphabet = torch.where(kind < own, torch.full((rows, n), self.own),
                                   torch.where(kind < own + share_mixed, mixed, other.expand(rows, n)))
        size = len(UNION) // k
        u = alphabet * size + torch.randint(size, (rows, n), generator=gen)
        y = u if self.skill is None else apply_union(self.skill, u)
        ids, labels = self.encoder.format_examples(u, y)
        labels[torch.isin(input_keys(u, len(UNION)), self.held_out)] = -100
        return ids, labels


def new_model(size: ZooSize, encoder: Encoder, *, gen: torch.Generator) -> LlamaForCausalLM:
    """A Llama-style model with untied embeddings, initialized from `gen` (not the global RNG)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(encoder.words), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=encoder.eos, pad_token_id=encoder.pad, dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=encoder.eos, pad_token_id=encoder.pad, max_new_tokens=size.length + 2,
    )
    return model


def schedule(step: int, steps: int, *, warmup: int, floor: float = 0.02) -> float:
    """Linear warm-up, then cosine decay to `floor` of the peak (2 % by default)."""
    return min(1.0, (step + 1) / warmup) * max(floor, 0.5 * (1 + math.cos(math.pi * step / steps)))


def _step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, ids: torch.Tensor, labels: torch.Tensor,
          *, clip: float | None) -> float:
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def pretrain(model: LlamaForCausalLM, batches: list[Batches], size: ZooSize, *, gen: torch.Generator) -> float:
    """The base: every batch holds every skill, answers mixed between the echo and the skill."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.base_lr, betas=(0.9, 0.98), weight_decay=0.0)
    rows = size.batch // len(batches)
    loss = float("nan")
    for step in range(size.base_steps):
        for group in optimizer.param_groups:
            group["lr"] = size.base_lr * schedule(step, size.base_steps, warmup=50)
        parts = [b.draw(rows, echo_share=b.echo_share, gen=gen) for b in batches]
        ids, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        loss = _step(model, optimizer, ids, labels, clip=None)
    return loss


def finetune(model: LlamaForCausalLM, own: Batches, others: list[Batches], size: ZooSize, *, steps: int,
             lr: float, optimizer: str = "sgd", gen: torch.Generator) -> float:
    """An expert: `optimizer` ("adamw" or "sgd") on its skill, part of each batch replaying the others.

    The replay draws one other skill per step, answers echoed with probability `size.replay_echo_share`.
    """
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98),
                                                       weight_decay=0.0)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    draw = with_replay(own, others, size)
    loss = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step, steps, warmup=10)
        ids, labels = draw(gen)
        loss = _step(model, opt, ids, labels, clip=1.0)
    return loss


Draw = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]     # one training batch: (ids, labels)


def with_replay(own: Batches, others: list[Batches], size: ZooSize) -> Draw:
    """A batch of the skill, `size.replay` of it replaying one other skill (drawn per batch), whose answers are
    echoed with probability `size.replay_echo_share`."""
    replay = int(size.batch * size.replay)

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = own.draw(size.batch - replay, echo_share=0.0, gen=gen)
        if replay:
            other = others[int(torch.randint(len(others), (1,), generator=gen))]
            more_ids, more_labels = other.draw(replay, echo_share=size.replay_echo_share, gen=gen)
            ids, labels = torch.cat([ids, more_ids]), torch.cat([labels, more_labels])
        return ids, labels

    return draw


def tune_blocks(model: LlamaForCausalLM, batches: FormatBatches, size: ZooSize, *, blocks: range, steps: int,
                lr: float, gen: torch.Generator) -> float:
    """AdamW on the blocks in `blocks` only (embeddings, head, final norm and other blocks frozen)."""
    params = [p for name, p in model.named_parameters() if classify(name)[0] in blocks]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    frozen = [p for name, p in model.named_parameters() if classify(name)[0] not in blocks]
    for p in frozen:
        p.requires_grad_(False)
    loss = float("nan")
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * schedule(step, steps, warmup=10)
            ids, labels = batches.draw(size.batch, gen=gen)
            loss = _step(model, opt, ids, labels, clip=1.0)   # (frozen parameters have no gradient to clip)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return loss


@contextmanager
def reproducible_cpu() -> Iterator[None]:
    """One thread and flushed denormals while training; the caller's thread count restored after.

    One thread makes the arithmetic independent of the machine's core count and
    is faster than two on a busy small machine; denormals would slow the late
    steps of training many times over.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
