"""Log-likelihood scoring: `choice` (acc, acc_norm) and `perplexity` (neg_log_ppl).

A choice task's rows are laid out once, at construction, as padded tensors plus
gather indices; scoring a candidate is one forward pass per batch and a few
vectorised ops. Where the model honours a custom 4-D mask, each example is one
row -- the prompt once, then every choice, each choice attending to the prompt
and to itself (positions restart after the prompt) -- so the shared prompt is
computed once. Otherwise each (prompt, choice) pair is its own row, as lm-eval does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .forward import Batch, Runner, left_pad


@dataclass
class ChoiceExample:
    context: list[int]
    continuations: list[list[int]]
    answer: int
    lengths: list[int]  # characters of each choice, for acc_norm
    # one context per choice, where prompt + choice is longer than the model's context (left-truncated as
    # lm-eval does); such an example is laid out one row per choice, never shared
    contexts: list[list[int]] | None = None


@dataclass
class ChoiceBatch:
    batch: Batch
    shared_prompt: bool
    read: torch.Tensor  # [B, N] bool: the positions whose predictions are scored (each computed once) ...
    picks: torch.Tensor  # ... flat entry -> its position among them (a prompt's last one serves every choice)
    targets: torch.Tensor  # ... and the token each entry should predict
    choice_of: torch.Tensor  # flat entry -> choice slot (example * max_choices + k)
    n_examples: int
    max_choices: int
    answers: torch.Tensor  # [n_examples]
    inv_lengths: torch.Tensor  # [n_examples, max_choices]; 0 for absent choices
    present: torch.Tensor  # [n_examples, max_choices] bool


def build_choice_batch(examples: Sequence[ChoiceExample], *, pad_id: int, shared_prompt: bool,
                       device: torch.device) -> ChoiceBatch:
    max_choices = max(len(e.continuations) for e in examples)
    rows, positions, segments = [], [], []
    entries: list[tuple[int, int, int, int]] = []  # (row, column counted from the row's end, target, slot)
    for i, ex in enumerate(examples):
        p = len(ex.context)
        if shared_prompt and ex.contexts is None:  # one row: the prompt, then each choice, positions restarting after it
            tokens, pos, seg, found = list(ex.context), list(range(p)), [0] * p, []
            for k, cont in enumerate(ex.continuations):
                start = len(tokens)
                found += [(p - 1 if j == 0 else start + j - 1, tok, i * max_choices + k) for j, tok in enumerate(cont)]
                tokens += cont
                pos += range(p, p + len(cont))
                seg += [k + 1] * len(cont)
            entries += [(len(rows), col - len(tokens), tok, slot) for col, tok, slot in found]
            rows.append(tokens)
            positions.append(pos)
            segments.append(seg)
        else:  # one row per (prompt, choice), as lm-eval lays them out
            for k, cont in enumerate(ex.continuations):
                context = ex.contexts[k] if ex.contexts is not None else ex.context
                p = len(context)
                # a truncated pair is limit + 1 tokens, of which the model reads all but the last (as lm-eval)
                tokens = context + (cont[:-1] if ex.contexts is not None else cont)
                entries += [(len(rows), p - 1 + j - len(tokens), tok, i * max_choices + k) for j, tok in enumerate(cont)]
                rows.append(tokens)
                positions.append(list(range(len(tokens))))
                segments.append([0] * p + [1] * (len(tokens) - p))
    batch = left_pad(rows, pad_id=pad_id, positions=positions, segments=segments)
    batch = Batch(*(t.to(device) if t is not None else None for t in (batch.ids, batch.mask, batch.positions,
                                                                        batch.segments)))
    r, c, t, s = (torch.tensor(col, dtype=torch.long) for col in zip(*entries))
    width = batch.ids.shape[1]
    read = torch.zeros((len(rows), width), dtype=torch.bool)
    read[r, width + c] = True
    rank = read.flatten().cumsum(0) - 1  # row-major, the order the read positions' logits come back in
    picks = rank[r * width + width + c]
    inv = torch.zeros((len(examples), max_choices), dtype=torch.float64)
    present = torch.zeros((len(examples), max_choices), dtype=torch.bool)
    for i, ex in enumerate(examples):
        inv[i, : len(ex.lengths)] = 1.0 / torch.tensor(ex.lengths, dtype=torch.float64)
        present[i, : len(ex.lengths)] = True
    answers = torch.tensor([e.answer for e in examples], dtype=torch.long)
    return ChoiceBatch(batch, shared_prompt, read.to(device), picks.to(device), t.to(device), s.to(device),
                       len(examples), max_choices, answers, inv, present)


def choice_loglikelihoods(runner: Runner, cb: ChoiceBatch) -> torch.Tensor:
    """Summed log-likelihood of every choice, [n_examples, max_choices] float64 on the CPU (-inf where absent)."""
    logits = runner.logits_at(cb.batch, cb.read, shared_prompt=cb.shared_prompt).float()
    logprobs = logits[cb.picks, cb.targets] - torch.logsumexp(logits, dim=-1)[cb.picks]
    sums = torch.zeros(cb.n_examples * cb.max_choices, dtype=torch.float64, device=logprobs.device)
    sums.index_add_(0, cb.choice_of, logprobs.double())
    sums = sums.view(cb.n_examples, cb.max_choices).cpu()
    return sums.masked_fill(~cb.present, float("-inf"))


def choice_metrics(cb: ChoiceBatch, loglik: torch.Tensor) -> dict[str, list[float]]:
    """acc and acc_norm per example (argmax takes the first of equal scores, as numpy does in lm-eval)."""
    acc = (loglik.argmax(dim=1) == cb.answers).double()
    normed = torch.where(cb.present, loglik * cb.inv_lengths, torch.tensor(float("-inf"), dtype=torch.float64))
    acc_norm = (normed.argmax(dim=1) == cb.answers).double()
    return {"acc": acc.tolist(), "acc_norm": acc_norm.tolist()}


@dataclass
class TextBatch:
    ids: torch.Tensor  # [B, N] right-padded windows
    targets: torch.Tensor  # [B, N] next token, -100 where nothing is scored
    owner: torch.Tensor  # [B] example index within the batch
    n_examples: int


def text_windows(tokens: list[int], width: int) -> list[tuple[list[int], list[int]]]:
    """(input, scored tokens) windows of at most `width` tokens, as lm-eval's rolling log-likelihood: disjoint
    runs of scored tokens, each seen from the token before it -- the last, shorter run from a whole window
    of the tokens before it. The scored tokens are the predictions of the input's last positions."""
    out = []
    for start in range(1, len(tokens), width):
        end = min(start + width, len(tokens))
        out.append((tokens[max(0, end - 1 - width):end - 1], tokens[start:end]))
    return out


def build_text_batch(examples: Sequence[list[tuple[list[int], list[int]]]], *, pad_id: int,
                     device: torch.device) -> TextBatch:
    windows = [(w, i) for i, ex in enumerate(examples) for w in ex]
    width = max(len(inp) for (inp, _), _ in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(windows), width), -100, dtype=torch.long)
    for row, ((inp, tgt), _) in enumerate(windows):
        ids[row, : len(inp)] = torch.tensor(inp)
        targets[row, len(inp) - len(tgt): len(inp)] = torch.tensor(tgt)
    owner = torch.tensor([i for _, i in windows], dtype=torch.long)
    return TextBatch(ids.to(device), targets.to(device), owner.to(device), len(examples))


def text_nll(runner: Runner, tb: TextBatch) -> tuple[list[float], list[int]]:
    """Summed negative log-likelihood and scored-token count per example (right padding: no mask needed)."""
    logits = runner.model(input_ids=tb.ids, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tb.targets, reduction="none", ignore_index=-100)
    per_window = nll.double().sum(dim=1)
    sums = torch.zeros(tb.n_examples, dtype=torch.float64, device=nll.device).index_add_(0, tb.owner, per_window)
    counts = torch.zeros(tb.n_examples, dtype=torch.long, device=nll.device).index_add_(
        0, tb.owner, (tb.targets != -100).sum(dim=1))
    return sums.cpu().tolist(), counts.cpu().tolist()
