"""The steps merge methods are made of: trims, random fields, sign election.

All functions work on a stack of task vectors ``deltas`` of shape ``(K, *shape)``
and per-source scalars of shape ``(K,)``. Nothing here touches global RNG state:
a random field is a pure function of (seed, source index, tensor name).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def stable_seed(seed: int, index: int, name: str) -> int:
    """A 63-bit seed from (recipe seed, source index, tensor name); stable across runs and machines."""
    digest = hashlib.sha256(f"evomerge\0{seed}\0{index}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def uniform_field(shape: tuple[int, ...], *, seed: int, index: int, name: str,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """U[0, 1) per entry, drawn on the CPU so every device sees the same numbers."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(seed, index, name))
    return torch.rand(shape, generator=gen, dtype=torch.float32).to(device)


def per_source(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, 1, ...) to broadcast against a (K, *shape) stack."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


SMALL_SORT = 1 << 16     # up to this many entries one sort is cheaper than the radix select's fixed cost
RADIX_SLICE = 1 << 22   # elements per pass of the radix select: its temporaries stay small


def kth_largest_many(values: torch.Tensor, ks: Sequence[int], *, absolute: bool = False) -> list[float]:
    """The k-th largest entries (1-based) of a non-negative tensor (of |values| with `absolute`) for several k.

    Exact: a two-level radix select on the float32 bit patterns, which order
    non-negative floats as the floats. A histogram of the high 19 bits finds each
    k's bucket (0.05 % wide); a histogram of the low 12 bits of the entries in the
    chosen buckets finds the value. Counting passes over slices instead of a sort:
    cheap threshold tables, and temporaries of a slice's size, not the tensor's.
    Other dtypes fall back to one sort.
    """
    flat = values.reshape(-1)
    if not ks:
        return []
    if flat.dtype != torch.float32 or flat.numel() <= SMALL_SORT:   # a sort beats the 2^19-bucket histograms
        ordered = torch.sort(flat.abs() if absolute else flat, descending=True).values
        return ordered[torch.tensor([k - 1 for k in ks], device=flat.device)].tolist()
    return _radix_select(flat, ks, absolute=absolute)[0].view(torch.float32).tolist()


def top_cuts(values: torch.Tensor, ks: Sequence[int]) -> list[tuple[float, int]]:
    """The k largest |values| for several k, ties broken by flat position (the earlier first), each as
    (value, cut): the entries with |v| > value, or |v| == value at a position below cut. cut = numel
    where every entry tied with the k-th largest is among the k (always, unless magnitudes tie exactly).

    The radix select's histograms count, for each k, the entries above its value and tied with it; only
    where a tie straddles k are the tied entries' positions read, in one more pass."""
    flat = values.reshape(-1)
    n = flat.numel()
    if not ks:
        return []
    if flat.dtype != torch.float32 or n <= SMALL_SORT:
        ordered, order = torch.sort(flat.abs(), descending=True, stable=True)     # ties: by position
        out = []
        for k in ks:
            value = float(ordered[k - 1])
            out.append((value, int(order[k]) if k < n and float(ordered[k]) == value else n))
        return out
    found, greater, equal = _radix_select(flat, ks, absolute=True)
    need = torch.tensor(list(ks), dtype=torch.int64) - greater.cpu()
    cuts = [n] * len(ks)
    straddled = [j for j in range(len(ks)) if int(need[j]) < int(equal[j])]
    if straddled:
        patterns = torch.unique(found[straddled].to(torch.int32))
        in_bucket = torch.zeros(1 << 19, dtype=torch.bool, device=flat.device)
        in_bucket[patterns >> 12] = True           # the radix buckets (high 19 bits) of the straddled values
        hits, where = [], []
        for start in range(0, n, RADIX_SLICE):      # the positions of the entries tied at a straddled value
            bits = flat[start:start + RADIX_SLICE].abs().view(torch.int32)
            at = torch.nonzero(in_bucket[bits >> 12]).flatten()
            at = at[torch.isin(bits[at], patterns)]
            hits.append(bits[at])
            where.append(at + start)
        hits, order = torch.sort(torch.cat(hits), stable=True)      # by value, each value's positions ascending
        where = torch.cat(where)[order]
        starts = torch.searchsorted(hits, found[straddled].to(torch.int32)).tolist()
        for j, start in zip(straddled, starts):
            cuts[j] = int(where[start + int(need[j])])
    values_out = found.view(torch.float32).tolist()
    return list(zip(values_out, cuts))


def _radix_select(flat: torch.Tensor, ks: Sequence[int], *, absolute: bool) -> tuple[torch.Tensor, ...]:
    """For each k: the k-th largest entry's bit pattern (int32), and how many entries are larger and equal."""
    low_bits, high_size = 12, 1 << 19

    def bit_slices():
        for start in range(0, flat.numel(), RADIX_SLICE):
            piece = flat[start:start + RADIX_SLICE]
            yield (piece.abs() if absolute else piece.contiguous()).view(torch.int32)

    counts = torch.zeros(high_size, dtype=torch.int64, device=flat.device)
    for bits in bit_slices():
        counts += torch.bincount(bits >> low_bits, minlength=high_size)
    above = counts.flip(0).cumsum(0)                                    # above[j]: entries with high >= top-j
    wanted = torch.tensor(list(ks), dtype=above.dtype, device=above.device)
    j = torch.searchsorted(above, wanted)
    buckets = high_size - 1 - j
    higher = torch.where(j > 0, above[(j - 1).clamp(min=0)], torch.zeros_like(j))   # in buckets above
    ranks = wanted - higher
    chosen, slot = torch.unique(buckets, return_inverse=True)
    row_of = torch.full((high_size,), -1, dtype=torch.int32, device=flat.device)
    row_of[chosen] = torch.arange(len(chosen), dtype=torch.int32, device=flat.device)
    low = torch.zeros(len(chosen) << low_bits, dtype=torch.int64, device=flat.device)
    for bits in bit_slices():
        row = row_of[bits >> low_bits]
        keep = row >= 0
        keys = row[keep].long() * (1 << low_bits) + (bits[keep] & ((1 << low_bits) - 1))
        low += torch.bincount(keys, minlength=len(chosen) << low_bits)
    below = low.view(len(chosen), 1 << low_bits).flip(1).cumsum(1)      # per bucket, like `above`
    mine = below[slot]
    j2 = torch.searchsorted(mine, ranks.unsqueeze(1)).squeeze(1)
    found = (buckets << low_bits) | ((1 << low_bits) - 1 - j2)
    at_or_above = mine.gather(1, j2.unsqueeze(1)).squeeze(1)
    strictly = torch.where(j2 > 0, mine.gather(1, (j2 - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                           torch.zeros_like(j2))
    return found.to(torch.int32), higher + strictly, at_or_above - strictly


def kth_largest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |x| (1-based), exactly; a 0-dim tensor."""
    return torch.tensor(kth_largest_many(x, [k], absolute=True)[0], dtype=x.dtype, device=x.device)


def ties_keep_count(density: float, numel: int) -> int:
    """How many entries a TIES trim keeps (mergekit's convention: at least one)."""
    return max(1, int(density * numel))


def breadcrumbs_counts(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """(dropped from the top, kept below them); the drop shrinks when density needs the room."""
    keep = int(density * numel)
    drop = min(int(gamma * numel), numel - keep)
    return drop, keep


# Masks are 0/1 floats: on CPU, comparisons into bool tensors and `where` on them cost several times
# a float elementwise op, and these run on every entry of every candidate. An in-place `ge_` on a float
# temporary writes the float mask in one pass; a mask of a cached tensor (the random fields) comes from
# sign(), which measured faster than `lt` into bool and a conversion.

def lt_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """1.0 where x < threshold, else 0.0 (exact: t - x > 0 iff x < t for finite floats)."""
    return torch.sub(threshold, x).sign_().clamp_(min=0.0)


def sum_sources(stack: torch.Tensor) -> torch.Tensor:
    """sum_i stack[i], added left to right.

    torch's sum over a dimension changes its order of additions with K and with the
    position in the tensor (from K = 5 on), and the sign TIES elects where the sum is
    near 0 follows that order; a fixed order is one the fused kernel repeats bit for bit.
    """
    total = stack[0].clone()
    for row in stack[1:]:
        total.add_(row)
    return total


def elect_and_merge(base: torch.Tensor, weighted: torch.Tensor, weights: torch.Tensor, *,
                    lam: float, normalize: bool) -> torch.Tensor:
    """TIES steps 3-5 on weighted task vectors D_i (K, *shape): elect sign, disjoint merge, add to base.

    `weighted` is a temporary of the caller's: it is overwritten.
    """
    elected = sum_sources(weighted).sign_().add_(0.5).sign_()     # +1 where the sum is >= 0, else -1
    agreeing = weighted.mul_(elected).relu_()           # |D_i| where sign(D_i) = s and D_i != 0, else 0
    merged = sum_sources(agreeing).mul_(elected)        # = sum of the agreeing D_i, bit for bit
    if normalize:
        divisor = sum_sources(agreeing.sign_().mul_(per_source(weights, weighted)))
        divisor.add_(1.0 - divisor.abs().sign_())       # a zero divisor becomes 1
        merged.div_(divisor)
    return merged.mul_(lam).add_(base)


def mix_and_merge(base: torch.Tensor, weighted: torch.Tensor, *, lam: float, divisor: float = 1.0) -> torch.Tensor:
    """mergekit's task arithmetic on weighted task vectors D_i (K, *shape), in its order of operations:
    M = sum_i D_i left to right, M / divisor (with normalize), b + lam M. (Dividing by 1 and multiplying
    by 1 are exact: mergekit skips them.)"""
    return sum_sources(weighted).div_(divisor).mul_(lam).add_(base)


def weight_sum(weights: torch.Tensor) -> float:
    """sum_i w_i in the weights' dtype, left to right (a divisor the fused kernel takes as it is)."""
    return float(sum_sources(weights.reshape(-1, 1)))


def task_divisor(weights: torch.Tensor, normalize: bool) -> float:
    """mergekit's divisor of a task-vector sum: sum_i w_i with normalize (1 where it is below 1e-8 in magnitude),
    else 1."""
    total = weight_sum(weights) if normalize else 1.0
    return 1.0 if abs(total) < 1e-8 else total


def weighted_sum(base: torch.Tensor, deltas: torch.Tensor, scales: torch.Tensor, *,
                 base_scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """base_scale * b + sum_i scale_i delta_i: one fused multiply-add pass per source, left to right (as
    torch.addcmul_, mergekit's linear).

    (`tensordot` measured 3x slower; this order and rounding are the fused kernel's too.)
    """
    start = base if base_scale is None else base * base_scale
    merged = torch.addcmul(start, deltas[0], scales[0])
    for i in range(1, deltas.shape[0]):
        merged.addcmul_(deltas[i], scales[i])
    return merged


def l1_rescale(deltas: torch.Tensor, kept: torch.Tensor, l1_before: torch.Tensor) -> torch.Tensor:
    """mergekit's rescale: ||delta||_1 / ||delta * mask||_1 per source (1 when either is below 1e-7)."""
    after = kept.abs().reshape(kept.shape[0], -1).sum(dim=1)
    ok = (l1_before >= 1e-7) & (after >= 1e-7)
    factor = torch.where(ok, l1_before / torch.where(ok, after, torch.ones_like(after)), torch.ones_like(after))
    return kept * per_source(factor, kept)


def row_ranks(delta: torch.Tensor) -> torch.Tensor:
    """q in [0, 1] per entry: rank of |delta| within its row (largest -> 1); 1-D tensors are one row."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    if n == 1:
        return torch.ones_like(delta)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(rows)
    positions = torch.arange(n, dtype=rows.dtype, device=rows.device).expand_as(rows)
    ranks.scatter_(1, order, positions)
    return (ranks / (n - 1)).reshape(delta.shape)
