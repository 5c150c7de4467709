"""Greedy generation, with an exact teacher-forced fast path.

Greedy decoding emits the target iff every target token, and then the stop
token, is the argmax given the prefix before it. So one forward pass over
``prompt + target + EOS`` decides most examples of a well-trained candidate:
this is speculative decoding with the target as the draft. A drafted token is
accepted only when its logit beats the runner-up by more than the numerical
noise between a teacher-forced pass and a cached decode (`MARGIN`); the first
token that is provably not the draft's is greedy's next token as well. An
example the drafts do not settle -- a near tie, a wrong turn that does not end
the output -- continues in an ordinary KV-cache decode from the tokens proven
so far, so the result is always what decoding gives; the draft only saves work.

`settle` is the one stopping rule, shared by the drafts and the decode loop:
an end-of-sequence token stops (and is not part of the output), a stop string
stops (the text is cut at its first occurrence), and so does `max_new_tokens`.

`hopeless` ends an example early when its exact match is provably 0: with the
`strip` rule, a tokenizer whose decoding is prefix-stable (codec.py), and proven
first tokens whose text can no longer lead to the target, whatever follows.
Its continuation is then not known (None), only that it misses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import extract as extract_rules
from .codec import Codec
from .forward import Batch, Runner, left_pad

# Margin a drafted argmax needs over the runner-up, relative to max(1, |logit|): well above the difference
# between a full forward pass and a KV-cache step in that dtype, far below a confident model's margins.
MARGIN = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@dataclass
class GenExample:
    prompt: str
    target: str
    context: list[int]
    draft: list[int]  # the target's tokens after the prompt, then EOS
    # filled in by a run; reset each call
    known: list[int] = field(default_factory=list)  # greedy's first tokens, proven
    output: list[int] | None = None  # greedy's whole output once settled
    hopeless: bool = False  # proven not to match, output left unknown
    token_acc: float = 0.0
    target_logprob: float = 0.0


@dataclass(frozen=True)
class Stopping:
    stop_ids: frozenset[int]
    stops: tuple[str, ...]
    max_new_tokens: int
    decode: Callable[[Sequence[int]], str]
    early_exit: bool = False  # `strip` extraction and a prefix-stable tokenizer

    def hopeless(self, tokens: Sequence[int], target: str) -> bool:
        """True when no continuation of `tokens` can make exact_match 1 (only claimed when `early_exit`)."""
        if not self.early_exit:
            return False
        text = self.decode(tokens).rstrip("\ufffd")  # an unfinished character may still change
        if self.stops:  # a stop string that starts in the last characters could still cut there
            text = text[: max(0, len(text) - max(len(s) for s in self.stops) + 1)]
        head, want = text.lstrip(), target.strip()
        return not (want.startswith(head) or (head.startswith(want) and not head[len(want):].strip()))

    def settle(self, tokens: Sequence[int], start: int = 0) -> list[int] | None:
        """Greedy's whole output if `tokens` are its first tokens and they end it; None if it goes on."""
        for i in range(start, len(tokens)):
            if tokens[i] in self.stop_ids:
                return list(tokens[:i])
            if i + 1 >= self.max_new_tokens or (self.stops and self.cut(self.decode(tokens[: i + 1])) is not None):
                return list(tokens[: i + 1])
        return None

    def cut(self, text: str) -> str | None:
        """`text` up to its first stop string, or None when it has none."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(hits)] if hits else None

    def text(self, output: Sequence[int]) -> str:
        text = self.decode(output)
        cut = self.cut(text) if self.stops else None
        return text if cut is None else cut


@dataclass
class DraftBatch:
    """Contexts + drafts, left-padded: the last `keep` columns predict each draft token and the one after."""

    batch: Batch
    keep: int
    grid: torch.Tensor  # [B, keep]: draft token j of row i at column keep-1-len(draft_i)+j, else -1
    read: torch.Tensor  # [B, N] bool: row i's last len(draft_i) + 1 columns, the positions whose logits count
    drafts: list[list[int]]


def draft_batch(contexts: Sequence[list[int]], drafts: Sequence[list[int]], *, pad_id: int,
                device: torch.device) -> DraftBatch:
    batch = left_pad([c + d for c, d in zip(contexts, drafts)], pad_id=pad_id)
    keep = max(len(d) for d in drafts) + 1
    grid = torch.full((len(drafts), keep), -1, dtype=torch.long)
    read = torch.zeros(batch.ids.shape, dtype=torch.bool)
    for i, d in enumerate(drafts):
        grid[i, keep - 1 - len(d): keep - 1] = torch.tensor(d, dtype=torch.long)
        read[i, read.shape[1] - 1 - len(d):] = True
    return DraftBatch(Batch(batch.ids.to(device), batch.mask.to(device), batch.positions.to(device)), keep,
                      grid.to(device), read.to(device), [list(d) for d in drafts])


def verify(runner: Runner, db: DraftBatch, smooth: Sequence[GenExample] | None = None) -> list[list[int]]:
    """One teacher-forced pass over each context + draft; the tokens it proves greedy emits first.

    With `smooth` (the first round, whose drafts are target + EOS) the pass also gives those examples'
    token_acc (argmax hits) and target_logprob (mean log-probability) over the draft.
    """
    logits = runner.logits_at(db.batch, db.read).float()  # [read positions, V], laid out on the grid below
    window = db.read[:, -db.keep:]
    top = logits.topk(2, dim=-1)
    margin = top.values[:, 0] - top.values[:, 1]
    best = torch.full(window.shape, -1, dtype=torch.long, device=logits.device)
    best[window] = top.indices[:, 0]
    sure = torch.zeros_like(window)
    sure[window] = margin > MARGIN.get(runner.dtype, 3e-2) * top.values[:, 0].abs().clamp_min(1.0)
    if smooth is not None:
        scored = db.grid >= 0
        logp = torch.zeros(window.shape, dtype=logits.dtype, device=logits.device)
        logp[window] = logits.gather(1, db.grid[window].clamp_min(0)[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        counts = scored.sum(dim=1).clamp_min(1).double()
        token_acc = (((best == db.grid) & scored).sum(dim=1).double() / counts).tolist()
        target_logprob = (torch.where(scored, logp, 0.0).double().sum(dim=1) / counts).tolist()
        for ex, acc, lp in zip(smooth, token_acc, target_logprob):
            ex.token_acc, ex.target_logprob = acc, lp
    best, sure = best.tolist(), sure.tolist()
    proven = []
    for i, d in enumerate(db.drafts):
        offset, known = db.keep - 1 - len(d), []
        for j in range(len(d) + 1):
            if not sure[i][offset + j]:
                break
            known.append(best[i][offset + j])
            if j == len(d) or best[i][offset + j] != d[j]:
                break
        proven.append(known)
    return proven


def decode(runner: Runner, examples: Sequence[GenExample], stopping: Stopping, *, pad_id: int) -> None:
    """Plain greedy decoding with a KV cache from each example's proven tokens until `stopping` settles it."""
    batch = left_pad([ex.context + ex.known for ex in examples], pad_id=pad_id)
    positions = batch.positions[:, -1].to(runner.device)
    logits, cache, mask = runner.start(batch)
    tokens = [list(ex.known) for ex in examples]
    open_ = list(range(len(examples)))
    while True:
        chosen = logits.argmax(dim=-1)
        picks = chosen.tolist()
        still = []
        for i in open_:
            tokens[i].append(picks[i])
            output = stopping.settle(tokens[i], start=len(tokens[i]) - 1)
            if output is not None:
                examples[i].output = output
            elif stopping.hopeless(tokens[i], examples[i].target):
                examples[i].hopeless = True
            else:
                still.append(i)
        open_ = still
        if not open_:
            return
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        logits, cache = runner.step(chosen, mask, positions, cache)


def redraft(ex: GenExample, text_so_far: str) -> tuple[str, str] | None:
    """What to draft next from the proven tokens: (text written so far, rest of the target), when what is
    proven still leads to the target; else None.

    Catches a model that writes the target with other whitespace or another tokenization; any draft is safe.
    """
    want, head = ex.target.strip(), text_so_far.lstrip()
    if want.startswith(head):
        return ex.prompt + text_so_far, want[len(head):]
    if head.startswith(want) and not head[len(want):].strip():  # the target and some whitespace: draft the end
        return ex.prompt + text_so_far, ""
    return None


def generate(runner: Runner, codec: Codec, spec: Any, examples: list[GenExample], first: DraftBatch, *,
             batch_size: int, stats: Counter[str]) -> tuple[dict[str, list[float]], list[str | None]]:
    """Greedy generation for one batch of a task's examples: metrics per example and each continuation.

    Round 1 verifies the target drafts (`first`, prebuilt) and gives the smooth metrics; round 2 re-drafts
    from what round 1 proved; plain decoding finishes the rest. With `fast_path` off only decoding decides.
    """
    stopping = Stopping(codec.stop_ids, tuple(spec.stop), spec.max_new_tokens, codec.decode,
                        early_exit=spec.fast_path and spec.extract == "strip" and codec.prefix_stable)
    for ex in examples:
        ex.known, ex.output, ex.hopeless = [], None, False
    proven = verify(runner, first, smooth=examples)
    if spec.fast_path:
        _settle(examples, proven, stopping, stats, "target")
        eos = [codec.eos_id] if codec.eos_id is not None else []
        plans = [(ex, p) for ex in _open(examples) if (p := redraft(ex, codec.decode(ex.known))) is not None]
        tails = codec.tails([p[0] for _, p in plans], [p[1] for _, p in plans])
        drafts = [(ex, (ex.known + tail + eos)[:codec.max_length - len(ex.context)])  # within the model's context
                  for (ex, _), tail in zip(plans, tails) if tail + eos]
        todo = [(ex, d) for ex, d in drafts if d != ex.draft]  # round 1's own draft again proves nothing new
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            second = draft_batch([ex.context for ex, _ in part], [d for _, d in part], pad_id=codec.pad_id,
                                 device=runner.device)
            _settle([ex for ex, _ in part], verify(runner, second), stopping, stats, "redraft")
    rest = sorted(_open(examples), key=lambda e: -len(e.context) - len(e.known))
    for start in range(0, len(rest), batch_size):
        decode(runner, rest[start:start + batch_size], stopping, pad_id=codec.pad_id)
    stats["decoded"] += len(rest)
    extract = extract_rules.extractor(spec.extract if isinstance(spec.extract, str) else spec.extract.model_dump())
    texts = [None if ex.hopeless else stopping.text(ex.output) for ex in examples]
    hits = [0.0 if text is None else extract_rules.exact_match(extract, text, ex.target)
            for text, ex in zip(texts, examples)]
    return {
        "exact_match": hits,
        # a hit got every answer token right, though the target as written may be tokenized or ended otherwise
        # than greedy wrote it (no leading space, a stop string instead of EOS): its draft's hits undercount it
        "token_acc": [max(ex.token_acc, hit) for ex, hit in zip(examples, hits)],
        "target_logprob": [ex.target_logprob for ex in examples],
    }, texts


def _open(examples: list[GenExample]) -> list[GenExample]:
    return [ex for ex in examples if ex.output is None and not ex.hopeless]


def _settle(examples: list[GenExample], proven: list[list[int]], stopping: Stopping, stats: Counter[str],
            how: str) -> None:
    for ex, known in zip(examples, proven):
        if len(known) > len(ex.known) and known[:len(ex.known)] == ex.known:
            ex.known = known
        ex.output = stopping.settle(ex.known)
        if ex.output is not None:
            stats[how] += 1
        elif stopping.hopeless(ex.known, ex.target):
            ex.hopeless = True
            stats["ruled out"] += 1
