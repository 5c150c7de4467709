"""Tensor stores: the sources' tensors on the merge's device, one context per tensor, as the kernel reads them.

A tensor is held in one of three forms, each read and checked here (NaN/inf refused with the file's name):
- dense: the anchor and the task vectors in the arithmetic's dtype (float32, float64 for float64 sources);
- as stored: bf16/fp16 sources (every model alike) stay as they are stored, half the bytes, their task
  vectors formed in float32 piece by piece (methods/context.py), the very values dense ones hold;
- low rank: every source a LoRA adapter and every method linear in the task vectors: the anchor and each
  adapter's factors (methods/lowrank.py); a method that is not linear densifies the store once.
A resident store reads every tensor once; a streaming one reads each tensor when the kernel asks for it and
lets it go after (its statistics computed per tensor, per candidate).
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import InputError
from ..methods import DENSITY_GRID, GAMMA_GRID, MethodSpec, TensorContext
from ..methods.context import HALF_DTYPES
from ..methods.lowrank import COEFFICIENTS, LowRankContext
from ..sources import SourceSet


class TensorStore:
    """The anchor and the sources of every merged tensor; `load` reads them (a resident store)."""

    def __init__(self, sources: SourceSet, *, device: torch.device, seed: int, methods: list[MethodSpec],
                 as_stored: bool, exact_sources: bool, low_rank: bool, streaming: bool) -> None:
        self.sources = sources
        self.device = device
        self.seed = seed
        self.methods = methods
        self.as_stored = as_stored           # bf16/fp16 sources held as stored (False: float32 task vectors)
        self.exact_sources = exact_sources   # float32 sources held as stored too: a method reads x, not b + (x - b)
        self.low_rank = low_rank and not streaming
        self.streaming = streaming
        self.compute_dtype = torch.float64 if sources.layout.float_dtype == torch.float64 else torch.float32
        # tensors that are no weights (integer position ids, boolean masks) pass through from the anchor
        self.unmerged = {n for n, info in sources.layout.tensors.items() if not info.dtype.is_floating_point}
        self.contexts: dict[str, TensorContext | LowRankContext] = {}
        self.prepared: set[str] = set()

    @property
    def names(self) -> list[str]:
        """The merged tensors, in checkpoint order."""
        return [n for n in self.sources.layout.tensors if n not in self.unmerged]

    def load(self, *, progress: bool = False) -> None:
        """Read every tensor (a resident store; a streaming one reads on demand)."""
        if self.streaming:
            return
        names = self.names
        for name in (progress_bar(names, "loading sources") if progress else names):
            self.contexts[name] = self._low_rank_context(name) if self.low_rank else self._read_context(name)

    def context(self, name: str) -> TensorContext | LowRankContext:
        return self._read_context(name) if self.streaming else self.contexts[name]

    def resident_bytes(self) -> int:
        """Bytes held resident: the anchor and the sources as stored (bf16/fp16) or the anchor and the task
        vectors in the arithmetic's dtype, plus fields and ranks (in that dtype) where needed."""
        k = len(self.sources.sources)
        itemsize = torch.empty((), dtype=self.compute_dtype).element_size()
        if self.low_rank:       # the anchor as stored and the adapters' factors
            return (sum(info.numel * info.dtype.itemsize for info in self.sources.layout.tensors.values())
                    + sum(folder.factor_bytes(self.compute_dtype) for folder in self.sources.sources))
        held = sum((1 + k) * info.numel * (info.dtype.itemsize if self._holds_sources(name) else itemsize)
                   for name, info in self.sources.layout.tensors.items() if name not in self.unmerged)
        return held + self.field_copies() * self.sources.layout.numel * itemsize

    def field_copies(self) -> int:
        """Per-source fields kept beside the sources, each the model's size in the arithmetic's dtype: random
        fields (DARE, DELLA) and row ranks (DELLA)."""
        k = len(self.sources.sources)
        return (k if any(m.stochastic for m in self.methods) else 0) + (k if any(m.row_ranks for m in self.methods)
                                                                        else 0)

    def prepare(self, specs: Iterable[MethodSpec], *, progress: bool = False) -> None:
        """Precompute, once, what the given methods need beyond the task vectors."""
        specs = [s for s in specs if s.name not in self.prepared]
        if any(s.name not in COEFFICIENTS for s in specs):
            self.densify()
        if not specs or self.streaming:   # streaming computes the same statistics per tensor, per candidate
            self.prepared.update(s.name for s in specs)
            return
        thresholds = any(s.magnitude_ranks for s in specs)
        gammas = GAMMA_GRID if any(s.name.startswith("breadcrumbs") for s in specs) else ()
        stochastic = any(s.stochastic for s in specs)
        ranks = any(s.row_ranks for s in specs)
        items = list(self.contexts.values())
        for ctx in (progress_bar(items, "precomputing") if progress else items):
            if thresholds:
                ctx.precompute_thresholds(densities=DENSITY_GRID, gammas=gammas)
            if stochastic:
                ctx.uniform()
            if ranks:
                ctx.ranks()
        self.prepared.update(s.name for s in specs)

    def densify(self) -> None:
        """Dense task vectors in place of the factors, once: a method not linear in them needs them."""
        if not self.low_rank:
            return
        for name in list(self.contexts):
            self.contexts[name] = self._read_context(name)
        self.low_rank = False

    def clear(self) -> None:
        self.contexts.clear()

    # -- reading -------------------------------------------------------------------
    def _holds_sources(self, name: str) -> bool:
        """Whether a tensor stays resident as its sources are stored (bf16/fp16, every model alike), its task
        vectors formed in float32 piece by piece; else it is held as task vectors in the arithmetic's dtype."""
        dtype = self.sources.layout.tensors[name].dtype
        stored = dtype in HALF_DTYPES or (dtype == torch.float32 and self.exact_sources)
        return (self.as_stored and stored and self.compute_dtype == torch.float32
                and all(not folder.is_adapter and folder.header[name][1] == dtype for folder in self.sources.sources))

    def _read_context(self, name: str) -> TensorContext:
        """Anchor and task vectors (or sources: `_holds_sources`) of one tensor, read (memory-mapped) from the
        safetensors files.

        One source at a time into the (K, *shape) stack: a tensor costs its stack, the
        anchor and one source's read, no more.
        """
        sources = self.sources
        raw = self._holds_sources(name)
        base = self._checked(sources.anchor, name, raw)
        stack = torch.zeros((len(sources.sources), *base.shape), dtype=base.dtype, device=self.device)
        adapters = []
        for i, folder in enumerate(sources.sources):
            if folder.is_adapter:     # its task vector is set below, exactly (not as (b + δ) - b)
                adapters.append(i)
                continue
            tensor = self._checked(folder, name, raw)
            if tensor.dtype != stack.dtype:    # a union vocabulary's mean rows are float32: held as task vectors
                base, stack = base.to(self.compute_dtype), stack.to(self.compute_dtype)
            stack[i].copy_(tensor)
        raw = raw and (base.dtype in HALF_DTYPES or (base.dtype == torch.float32 and self.exact_sources))
        if not raw:
            base, stack = base.to(self.compute_dtype), stack.to(self.compute_dtype)
            stack -= base
        for i in adapters:
            pair = self._adapter_factors(sources.sources[i], name, base)
            stack[i] = 0.0 if pair is None else _finite(sources.sources[i], name, pair[0] @ pair[1])
        return TensorContext(name=name, anchor=base, stack=stack, seed=self.seed, raw=raw)

    def _adapter_factors(self, folder, name: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An adapter's (left, right) of one tensor (δ = left @ right, in the arithmetic's dtype), checked: its
        saved base layer, if any, is the base's, and its factors are finite. None where it does not reach it."""
        folder.check_saved_base(name, base)
        pair = folder.low_rank(name, device=self.device, dtype=self.compute_dtype)
        return None if pair is None else (_finite(folder, name, pair[0]), _finite(folder, name, pair[1]))

    def _low_rank_context(self, name: str) -> LowRankContext:
        """The anchor as stored and each adapter's factors of one tensor (left scaled by s)."""
        anchor = self._checked(self.sources.anchor, name, raw=True)
        factors = [self._adapter_factors(folder, name, anchor) for folder in self.sources.sources]
        return LowRankContext(name=name, anchor=anchor, factors=factors, dtype=self.compute_dtype)

    def _checked(self, folder, name: str, raw: bool) -> torch.Tensor:
        tensor = self.sources.read(folder, name, device=self.device)
        tensor = tensor if raw else tensor.to(self.compute_dtype)
        # a NaN or inf entry makes the sum NaN or inf (one vectorized pass, 30x a mask's speed); a finite
        # tensor whose sum overflows is checked entry by entry
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"tensor '{name}' holds NaN or inf values", file=folder.path,
                             fix="this checkpoint is broken: re-download or re-train it")
        return tensor


def _finite(folder, name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"the LoRA factors of tensor '{name}' hold NaN or inf values", file=folder.path,
                         fix="this adapter is broken: re-train or re-download it")
    return tensor


def progress_bar(items: list, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, disable=None)   # shown on a terminal, silent in logs
