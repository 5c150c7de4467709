"""Calling the resident model: padded batches, custom masks, kept logits, KV cache.

One place knows how a batch is laid out (left padding, explicit position ids)
and how this transformers version names its arguments (``cache`` in 5.x,
``past_key_values`` before; ``logits_to_keep`` where the model has it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class Batch:
    """Left-padded rows: the tokens each row predicts from sit in its last columns."""

    ids: torch.Tensor  # [B, N]
    mask: torch.Tensor  # [B, N] 1 = token, 0 = padding
    positions: torch.Tensor  # [B, N]
    segments: torch.Tensor | None = None  # [B, N] for prompt-sharing rows: -1 pad, 0 prompt, k >= 1 choice k


def left_pad(rows: Sequence[Sequence[int]], *, pad_id: int, positions: Sequence[Sequence[int]] | None = None,
             segments: Sequence[Sequence[int]] | None = None) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long) if segments is not None else None
    for i, row in enumerate(rows):
        start = width - len(row)
        ids[i, start:] = torch.tensor(row, dtype=torch.long)
        mask[i, start:] = 1
        pos[i, start:] = torch.tensor(positions[i]) if positions is not None else torch.arange(len(row))
        if seg is not None:
            seg[i, start:] = torch.tensor(segments[i], dtype=torch.long)
    return Batch(ids, mask, pos, seg)


def shared_prompt_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive [B, 1, N, N] mask: each choice sees the prompt and itself, never another choice."""
    n = segments.shape[1]
    idx = torch.arange(n, device=segments.device)
    causal = idx[None, :] <= idx[:, None]
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allowed |= torch.eye(n, dtype=torch.bool, device=segments.device)  # padding attends to itself: no NaN rows
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class Runner:
    """Forward passes on one resident model; nothing derived from its weights is kept."""

    def __init__(self, model: Any) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.has_keep = "logits_to_keep" in params
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    def logits(self, batch: Batch, *, keep: int, shared_prompt: bool = False) -> torch.Tensor:
        """Logits of the last `keep` columns, [B, keep, V]."""
        ids = batch.ids.to(self.device)
        if shared_prompt:
            mask = shared_prompt_mask(batch.segments.to(self.device), self.dtype)
        else:
            mask = batch.mask.to(self.device)
        kwargs = {"logits_to_keep": keep} if self.has_keep else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=batch.positions.to(self.device),
                         use_cache=False, **kwargs)
        return out.logits[:, -keep:]

    def start(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        """Prefill for decoding: last-column logits [B, V] and the KV cache."""
        kwargs = {"logits_to_keep": 1} if self.has_keep else {}
        out = self.model(input_ids=batch.ids.to(self.device), attention_mask=batch.mask.to(self.device),
                         position_ids=batch.positions.to(self.device), use_cache=True, **kwargs)
        return out.logits[:, -1], _cache_of(out)

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
             ) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                         use_cache=True, **{self.cache_arg: cache})
        return out.logits[:, -1], _cache_of(out)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
