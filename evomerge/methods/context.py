"""Per-tensor state a merge method reads: the base, the task vectors, and caches.

What does not depend on a candidate's scalars is computed once and kept here:
magnitude thresholds on a density grid, uniform random fields, per-row ranks,
norms. The kernel fills these once per study; a one-off merge fills them lazily.
Both paths give the same tensor: a table holds exact order statistics, and a
position missing from it is computed exactly on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from .primitives import (breadcrumbs_counts, kth_largest_abs, kth_largest_many, row_ranks, ties_keep_count,
                         top_cuts, uniform_field)

DENSITY_GRID = tuple(round(0.01 * i, 2) for i in range(1, 101))
GAMMA_GRID = tuple(round(0.001 * i, 3) for i in range(0, 101))


HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class TensorContext:
    """One tensor of the merge: anchor `base` (shape S) and task vectors `deltas` (K, *S), in the arithmetic's
    dtype (float32, or float64).

    Held in one of two ways. `stack` holds the task vectors themselves, `anchor` the base (both in the
    arithmetic's dtype); or, for a checkpoint stored in bf16/fp16 (`raw`), `stack` holds the sources as stored
    and `anchor` the stored base: half the bytes of float32 task vectors. Then `base` and `deltas` are formed
    on access, float32(x_i) - float32(b), the very values float32 task vectors hold; a piece (`chunks`) forms
    them once, the whole tensor every time it is asked (statistics, once per study).
    """

    name: str
    anchor: torch.Tensor
    stack: torch.Tensor
    seed: int = 0
    raw: bool = False
    _thresholds: list[dict[int, float]] = field(default_factory=list)
    _cuts: list[dict[int, int]] = field(default_factory=list)
    _uniform: tuple[int, torch.Tensor] | None = None
    _ranks: torch.Tensor | None = None
    _l1: torch.Tensor | None = None
    _stats: dict[str, object] = field(default_factory=dict)
    parent: "TensorContext | None" = None       # set on a chunk: statistics come from the whole tensor
    span: tuple[int, int] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The arithmetic's dtype."""
        return torch.float32 if self.raw else self.stack.dtype

    @property
    def base(self) -> torch.Tensor:
        return self._form()[0] if self.raw else self.anchor

    @property
    def deltas(self) -> torch.Tensor:
        return self._form()[1] if self.raw else self.stack

    @property
    def sources(self) -> torch.Tensor:
        """The sources x_i (K, *S) in the arithmetic's dtype: as stored, upcast exactly (raw), else b + delta_i
        (to float32 rounding of the sources the task vectors were taken from)."""
        if not self.raw:
            return self._keep("sources", lambda: self.anchor + self.stack)
        return self._keep("sources", lambda: self.stack.to(torch.float32))

    def _keep(self, key: str, form: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`form()`, kept by a piece (short-lived); for the whole tensor formed anew each time, so that it keeps
        only what is stored."""
        if self.parent is None:
            return form()
        if key not in self._stats:
            self._stats[key] = form()
        return self._stats[key]

    def delta(self, index: int) -> torch.Tensor:
        """Task vector `index` alone (for a raw tensor, without forming the others)."""
        if not self.raw:
            return self.stack[index]
        return self.stack[index].to(torch.float32) - self.anchor.to(torch.float32)

    def inner(self, index: int, grad: torch.Tensor) -> float:
        """⟨grad, δ_index⟩ in float32 (grad: a tensor of this one's shape, in any dtype)."""
        flat = grad.reshape(-1).to(torch.float32)
        return float(torch.dot(flat, self.delta(index).reshape(-1).to(device=flat.device, dtype=torch.float32)))

    def _form(self) -> tuple[torch.Tensor, torch.Tensor]:
        def form():
            base = self.anchor.to(torch.float32)
            return base, self.stack.to(torch.float32) - base
        return self._keep("formed", form)

    @property
    def k(self) -> int:
        return self.stack.shape[0]

    @property
    def numel(self) -> int:
        return self.parent.numel if self.parent is not None else self.anchor.numel()

    def chunks(self, size: int | None) -> Iterator["TensorContext"]:
        """Contiguous pieces of the flattened tensor that share this tensor's statistics (None: one piece).

        Elementwise methods run piece by piece so their temporaries stay in cache. A tensor that fits one
        piece keeps its shape (whole-tensor methods: size None): held as task vectors, it is its own piece.
        """
        n = self.anchor.numel()
        size = n if size is None else size
        if n <= size:      # one piece, in the tensor's own shape (a row-wise method sees rows)
            yield self if not self.raw else TensorContext(name=self.name, anchor=self.anchor, stack=self.stack,
                                                          seed=self.seed, raw=True, parent=self, span=(0, n))
            return
        base = self.anchor.reshape(-1)
        stack = self.stack.reshape(self.k, -1)
        for start in range(0, n, size):
            stop = min(start + size, n)
            yield TensorContext(name=self.name, anchor=base[start:stop], stack=stack[:, start:stop], seed=self.seed,
                                raw=self.raw, parent=self, span=(start, stop))

    def _piece(self, full: torch.Tensor) -> torch.Tensor:
        start, stop = self.span
        if (start, stop) == (0, self.numel):
            return full
        return full.reshape(full.shape[0], -1)[:, start:stop]

    # -- magnitude order statistics ------------------------------------------------
    def kth_largest(self, index: int, k: int) -> float:
        """The k-th largest |delta_index| (1-based), from the table or computed exactly."""
        if self.parent is not None:
            return self.parent.kth_largest(index, k)
        if not self._thresholds:
            self._thresholds = [{} for _ in range(self.k)]
        table = self._thresholds[index]
        if k not in table:
            table[k] = float(kth_largest_abs(self.delta(index), k))
        return table[k]

    def top_cut(self, index: int, k: int) -> tuple[float, int]:
        """The k largest |delta_index| entries, ties broken by position (the earlier first), as (value, cut):
        those with |delta| > value, or |delta| == value at a flat position < cut. cut = numel where every
        entry tied with the k-th largest is among them (always, unless values tie exactly)."""
        if self.parent is not None:
            return self.parent.top_cut(index, k)
        self._cuts = self._cuts or [{} for _ in range(self.k)]
        self._thresholds = self._thresholds or [{} for _ in range(self.k)]
        if k not in self._cuts[index]:      # one radix select gives the value and the cut
            value, self._cuts[index][k] = top_cuts(self.delta(index), [k])[0]
            self._thresholds[index].setdefault(k, value)
        return self._thresholds[index][k], self._cuts[index][k]

    def precompute_thresholds(self, *, densities: Iterable[float] = DENSITY_GRID,
                              gammas: Iterable[float] = (), ) -> None:
        """Fill the threshold table for every keep count the grids can ask for: one radix select per source
        (breadcrumbs' bounds with their cuts: the radix select's counts, and a pass where ties straddle)."""
        n = self.numel
        densities = tuple(densities)
        cut_at = set()     # breadcrumbs' bounds, the top drop and the top drop + keep: kept by exact count
        for g in gammas:
            for d in densities:
                drop, keep = breadcrumbs_counts(d, g, n)
                cut_at.update(p for p in (drop, drop + keep) if 1 <= p <= n)
        plain = sorted(p for p in {ties_keep_count(d, n) for d in densities} - cut_at if 1 <= p <= n)
        if not plain and not cut_at:
            return
        self._thresholds = self._thresholds or [{} for _ in range(self.k)]
        self._cuts = self._cuts or [{} for _ in range(self.k)]
        for i in range(self.k):
            delta = self.delta(i)
            self._thresholds[i].update(zip(plain, kth_largest_many(delta, plain, absolute=True)))
            ks = sorted(cut_at)
            for k, (value, cut) in zip(ks, top_cuts(delta, ks)):
                self._thresholds[i][k] = value
                self._cuts[i][k] = cut

    # -- random fields -------------------------------------------------------------
    def uniform(self) -> torch.Tensor:
        """U[0,1) fields (K, *S) for this recipe seed; drawn once, reused for every density."""
        if self.parent is not None:
            self.parent.seed = self.seed
            return self._piece(self.parent.uniform())
        if self._uniform is None or self._uniform[0] != self.seed:
            fields = torch.stack([uniform_field(tuple(self.anchor.shape), seed=self.seed, index=i, name=self.name,
                                                device=self.stack.device) for i in range(self.k)])
            self._uniform = (self.seed, fields.to(self.dtype))
        return self._uniform[1]

    def ranks(self) -> torch.Tensor:
        """Per-row magnitude ranks q in [0, 1], (K, *S)."""
        if self.parent is not None:
            return self._piece(self.parent.ranks())
        if self._ranks is None:
            self._ranks = torch.stack([row_ranks(self.delta(i)) for i in range(self.k)])
        return self._ranks

    def l1(self) -> torch.Tensor:
        """||delta_i||_1 per source, (K,), over the whole tensor."""
        if self.parent is not None:
            return self.parent.l1()
        if self._l1 is None:
            self._l1 = self.deltas.abs().reshape(self.k, -1).sum(dim=1)
        return self._l1

    def stat(self, key: str, compute: Callable[["TensorContext"], object]) -> object:
        """A cached statistic of the whole fixed tensor (slerp angle, model_stock ratio): compute(ctx)."""
        if self.parent is not None:
            return self.parent.stat(key, compute)
        if key not in self._stats:
            self._stats[key] = compute(self)
        return self._stats[key]

    @classmethod
    def one_off(cls, base: torch.Tensor, sources: list[torch.Tensor] | torch.Tensor, *, name: str = "tensor",
                seed: int = 0) -> "TensorContext":
        """A context for a single merge of plain tensors (float32, or float64 if any input is)."""
        stack = sources if isinstance(sources, torch.Tensor) else torch.stack(list(sources))
        dtype = torch.float64 if torch.float64 in (base.dtype, stack.dtype) else torch.float32
        base32 = base.to(dtype)
        return cls(name=name, anchor=base32, stack=stack.to(dtype) - base32, seed=seed)
