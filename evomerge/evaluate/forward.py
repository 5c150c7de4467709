"""Calling the resident model: padded batches, custom masks, kept logits, KV cache.

One place knows how a batch is laid out (left padding, explicit position ids)
and how this transformers version names its arguments (``cache`` in 5.x,
``past_key_values`` before; ``logits_to_keep`` where the model has it).

The LM head (hidden size x vocabulary) is computed only where a task reads a
prediction: the last column while decoding, and for teacher-forced rows the
positions a [B, N] boolean `read` mask marks -- passed as ``logits_to_keep``
where this transformers version takes a mask (5.x), else the last columns that
hold every marked position, sliced after the head.

Rows that start with the same tokens (a chat template's system turn, a shared
instruction) have that prefix computed once per call: one row's pass fills a KV
cache, repeated for every row, and the batch runs on from there without it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

# A common prefix is computed apart when it spares at least this many token-passes ((rows - 1) x its length):
# below that, the extra call costs more than it saves
SHARED_PREFIX_MIN_TOKENS = 128


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


def shared_prefix(batch: Batch, read: torch.Tensor) -> int:
    """How many first tokens every row has in common, up to each row's first read position; 0 when
    computing them apart saves too little (`SHARED_PREFIX_MIN_TOKENS`)."""
    rows, width = batch.ids.shape
    if rows < 2:
        return 0
    mask, read = batch.mask.cpu(), read.cpu()
    starts = width - mask.sum(dim=1)
    cols = torch.arange(width)
    limit = int(torch.where(read, cols, width).min(dim=1).values.sub(starts).min())  # the row's first read
    if (rows - 1) * limit < SHARED_PREFIX_MIN_TOKENS:
        return 0
    aligned = batch.ids.cpu().gather(1, (starts[:, None] + torch.arange(limit)).clamp_max(width - 1))
    same = (aligned == aligned[:1]).all(dim=0)
    shared = int(same.long().cumprod(0).sum())
    return shared if (rows - 1) * shared >= SHARED_PREFIX_MIN_TOKENS else 0


class Runner:
    """Forward passes on one resident model; nothing derived from its weights is kept."""

    def __init__(self, model: Any) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.has_keep = "logits_to_keep" in params
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.masked_keep: bool | None = None if self.has_keep else False  # takes a [B, N] bool logits_to_keep
        self.prefix_cache: bool | None = None  # can run a batch on from a repeated prefix's KV cache

    def logits_at(self, batch: Batch, read: torch.Tensor, *, shared_prompt: bool = False) -> torch.Tensor:
        """Logits where `read` [B, N] is True, [n_read, V] in row-major order; the head is computed there only.

        Whether the model takes the mask is found on the first call: a model that rejects it, or returns
        another shape, is called with the last columns that hold every read position from then on.
        """
        as_mask = {"logits_to_keep": read.to(self.device)}
        if self.masked_keep:
            return self._call(batch, shared_prompt, as_mask, read=read)[0].logits
        if self.masked_keep is None:
            try:
                logits = self._call(batch, shared_prompt, as_mask, read=read)[0].logits
            except (IndexError, RuntimeError, TypeError, ValueError):  # a transformers that slices columns only
                logits = None
            if logits is not None and logits.shape[:-1] == (int(read.sum()),):
                self.masked_keep = True
                return logits
            kept = self._last_columns(batch, read, shared_prompt)  # raises if the call fails for another reason
            self.masked_keep = False
            return kept
        return self._last_columns(batch, read, shared_prompt)

    def _last_columns(self, batch: Batch, read: torch.Tensor, shared_prompt: bool) -> torch.Tensor:
        first = int(read.any(dim=0).nonzero()[0])
        keep = read.shape[1] - first
        kwargs = {"logits_to_keep": keep} if self.has_keep else {}
        logits = self._call(batch, shared_prompt, kwargs, read=read)[0].logits
        return logits[:, -keep:][read[:, first:].to(logits.device)]

    def _call(self, batch: Batch, shared_prompt: bool, kwargs: dict[str, Any], *, read: torch.Tensor,
              use_cache: bool = False) -> tuple[Any, torch.Tensor]:
        """The model on a batch, and the attention mask it ran with (a KV cache's columns, with `use_cache`).
        A prefix common to every row that ends before each row's first `read` position is computed once."""
        shared = shared_prefix(batch, read) if self.prefix_cache is not False else 0
        if shared:
            try:
                found = self._after_prefix(batch, shared, shared_prompt, kwargs)
                self.prefix_cache = True
                return found
            except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
                if self.prefix_cache:  # it worked before: this failure is not about the prefix
                    raise
                self.prefix_cache = False
        if shared_prompt:
            mask = shared_prompt_mask(batch.segments.to(self.device), self.dtype)
        else:
            mask = batch.mask.to(self.device)
        return self.model(input_ids=batch.ids.to(self.device), attention_mask=mask,
                          position_ids=batch.positions.to(self.device), use_cache=use_cache, **kwargs), mask

    def _after_prefix(self, batch: Batch, shared: int, shared_prompt: bool, kwargs: dict[str, Any]
                      ) -> tuple[Any, torch.Tensor]:
        """Each row's first `shared` tokens (the same in every row) once, then every row on from their KV cache.

        The batch keeps its columns after the first `shared`: row i's real tokens there are its own after the
        prefix, preceded by padding and by the prefix's copy, which no token attends to.
        """
        ids, mask, positions = (t.to(self.device) for t in (batch.ids, batch.mask, batch.positions))
        rows, width = ids.shape
        starts = width - mask.sum(dim=1)
        first = int(starts[0])
        head = self.model(input_ids=ids[:1, first:first + shared], position_ids=positions[:1, first:first + shared],
                          attention_mask=torch.ones_like(mask[:1, :shared]), use_cache=True,
                          **({"logits_to_keep": 1} if self.has_keep else {}))
        cache = _cache_of(head)
        cache.batch_repeat_interleave(rows)
        if shared_prompt:
            cols = torch.arange(width, device=self.device)
            copy = (cols >= starts[:, None]) & (cols < starts[:, None] + shared)
            attend = shared_prompt_mask(batch.segments.to(self.device).masked_fill(copy, -1), self.dtype)
            attend = attend[:, :, shared:].clone()
            attend[..., :shared] = 0  # keys 0..shared-1 are now the cached prefix, seen by every token
        else:  # a key column c >= shared is real iff c - shared >= the row's start
            attend = torch.cat([torch.ones_like(mask[:, :shared]), mask[:, :width - shared]], dim=1)
        kwargs = {k: v[:, shared:] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return self.model(input_ids=ids[:, shared:], attention_mask=attend, position_ids=positions[:, shared:],
                          use_cache=True, **{self.cache_arg: cache}, **kwargs), attend

    def start(self, batch: Batch) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Prefill for decoding: last-column logits [B, V], the KV cache, and the attention mask of its columns."""
        last = torch.zeros(batch.mask.shape, dtype=torch.bool)
        last[:, -1] = True
        out, mask = self._call(batch, False, {"logits_to_keep": 1} if self.has_keep else {}, read=last, use_cache=True)
        return out.logits[:, -1], _cache_of(out), mask

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
             ) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                         use_cache=True, **{self.cache_arg: cache})
        return out.logits[:, -1], _cache_of(out)


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
