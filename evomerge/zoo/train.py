"""Training the zoo's models on CPU, deterministically.

The base is pretrained on every skill's format with a mixed answer: the echo of
the input most of the time and the skill's answer otherwise, so it knows each
skill but prefers to echo (greedy decoding echoes, and scores nothing). An
expert is the base fine-tuned on one skill, a fifth of each batch replaying the
other skills' prompts with (mostly) echo answers, as instruction tuning mixes
in pretraining data. The compatible experts are tuned with AdamW, which spreads
a fine-tune's change over every parameter as a real one does; their task
vectors are dense and overlap in the machinery every skill shares (choosing
between echo and skill). So untuned merges fall short (measured on the tiny
zoo, see benchmarks/zoo_headroom.py): adding the vectors at full weight
overshoots, the simple average undershoots, and TIES and DARE-TIES at their
defaults lose most of a skill, while tuned weights (about 0.75 each, or one per
source and layer group) recover the skills. That gap is the headroom a merge
search is for. The conflicting pair is tuned with SGD.

All randomness comes from explicit ``torch.Generator`` objects; the batch order
is fixed; training runs on one thread with denormals flushed, so the same seed
gives the same bytes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from .sizes import ZooSize
from .skills import EOS, PAD, SEPARATOR, Skill, vocabulary

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
    replay = int(size.batch * size.replay)
    loss = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step, steps, warmup=10)
        ids, labels = own.draw(size.batch - replay, echo_share=0.0, gen=gen)
        if replay:
            other = others[int(torch.randint(len(others), (1,), generator=gen))]
            more_ids, more_labels = other.draw(replay, echo_share=size.replay_echo_share, gen=gen)
            ids, labels = torch.cat([ids, more_ids]), torch.cat([labels, more_labels])
        loss = _step(model, opt, ids, labels, clip=1.0)
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
