"""The resident merge kernel: sources loaded once, every candidate written in place.

`ResidentMerger` holds the anchor (base) and the stacked task vectors of every
tensor on one device, precomputes what no candidate's scalars change (magnitude
threshold tables, random fields, row ranks), and `materialize(recipe)` writes the
merged tensors straight into the parameters of one resident transformers model.
`evomerge merge`, the search and the export all go through `materialize`, so the
exported model is the one that was scored.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from . import binding
from .cpu import cpu_flags
from .errors import InputError
from .methods import DENSITY_GRID, GAMMA_GRID, REGISTRY, TensorContext, fused, resolve
from .methods.context import HALF_DTYPES
from .methods.lowrank import COEFFICIENTS, LowRankContext
from .recipe import Recipe, check_for_layout
from .sources import SourceSet, open_sources

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


CHUNK = 1 << 17          # elements per piece of an elementwise merge on the CPU: temporaries stay in cache
DEVICE_CHUNK = 1 << 26   # on a GPU: each torch op is a kernel launch (~10 us from Python), so pieces as large
                         # as memory allows; 64M elements bound a piece's temporaries to a few hundred MB


def chunk_elements(device: torch.device) -> int:
    """Elements per piece of an eager elementwise merge on `device`."""
    return CHUNK if device.type == "cpu" else DEVICE_CHUNK


@functools.cache
def _glibc():
    """The C library's handle where it is glibc (Linux), else None."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@functools.cache
def _keep_chunk_temporaries_on_the_heap() -> None:
    """glibc serves allocations above 128 KiB with a fresh mmap, and every page of it faults on first touch:
    a chunk's temporaries (a few MiB) then cost more than the arithmetic on them (measured: ties 2.7x
    slower). Raise the mmap threshold to 64 MiB so they are reused from the heap; whole tensors above
    it still map and unmap. Elsewhere than glibc nothing changes. Once per process, by the first merger on
    the CPU: importing evomerge changes nothing in the allocator."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 64 << 20)      # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)     # M_TRIM_THRESHOLD: keep up to 128 MiB freed at the heap's top


def _return_freed_memory() -> None:
    """Hand memory freed to the C heap back to the OS, so the process's RSS tracks what it holds."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def in_use_bytes(device: torch.device) -> int:
    """Memory this process holds now: device memory on a GPU, resident set (RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # peak so far: an upper bound


def scoring_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a model is scored in: the stored one, except bf16/fp16 on a CPU without native matmuls for it,
    where it runs in float32 (a bf16 forward of a 135M model was 6.2x float32's on a Zen 1 EPYC; with AMX, bf16
    is 6x faster than float32). The weights are the same values, upcast exactly; storage and export keep the
    stored dtype. A GPU scores in the stored dtype."""
    if device.type == "cpu" and stored in (torch.bfloat16, torch.float16) and stored not in fast_cpu_dtypes():
        return torch.float32
    return stored


def fast_cpu_dtypes(flags: frozenset[str] | None = None) -> frozenset[torch.dtype]:
    """Half-precision dtypes this CPU multiplies natively (its /proc/cpuinfo flags: AVX512-BF16 or AMX-BF16,
    AVX512-FP16 or AMX-FP16; Arm's BF16 and FP16 extensions)."""
    flags = cpu_flags() if flags is None else flags
    fast = set()
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        fast.add(torch.bfloat16)
    if flags & {"avx512_fp16", "amx_fp16", "asimdhp"}:
        fast.add(torch.float16)
    return frozenset(fast)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class MemoryPlan:
    """What a merge needs at its peak, resident and streaming, against a memory budget.

    The budget bounds the whole process (the device's memory on a GPU): what it holds
    already (interpreter, libraries), the merged model, and the merge's own tensors —
    every source's task vectors when resident; when streaming, one tensor's anchor,
    stack and temporaries at a time.
    """

    budget: int | None
    in_use: int
    model: int
    resident_need: int
    streaming_need: int

    @classmethod
    def of(cls, merger: "ResidentMerger", budget: int | None) -> "MemoryPlan":
        layout = merger.sources.layout
        k = len(merger.sources.sources)
        item = torch.empty((), dtype=merger.compute_dtype).element_size()
        out_item = torch.empty((), dtype=merger.out_dtype).element_size()
        score_item = torch.empty((), dtype=merger.score_dtype).element_size()
        largest = max(info.numel for info in layout.tensors.values())
        if budget is not None:
            import transformers  # noqa: F401  (what loading the model imports is part of what is in use)
        in_use = in_use_bytes(merger.device) if budget is not None else 0
        # the scored model, plus the merged tensors in the output dtype where the model scores in another
        model = layout.numel * (score_item + (out_item if merger.score_dtype != merger.out_dtype else 0))
        # One tensor at a time: its anchor, stack, fields and ranks (resident_bytes' copies, for this
        # tensor alone), then as much again for one source's read and the method's temporaries. Measured
        # on 3 sources of 100M parameters (results/bench_streaming.md): 6.4, 10.8 and 15.5 times the largest
        # tensor for ties, dare_ties and della, against 9, 15 and 21 here. The model costs a tenth more
        # than its weights (buffers, loading), the C heap 5 %.
        copies = 1 + k + merger.field_copies()      # as float32 task vectors: a raw tensor forms them to merge
        per_tensor = (2 * copies + 1) * largest * item
        margin = 1.05
        resident = int((in_use + 1.1 * model + merger.resident_bytes() + per_tensor) * margin)
        streaming = int((in_use + 1.1 * model + per_tensor) * margin)
        return cls(budget, in_use, model, resident, streaming)

    @property
    def streaming(self) -> bool:
        return self.budget is not None and self.resident_need > self.budget

    def check(self) -> None:
        if self.streaming and self.streaming_need > self.budget:
            raise InputError(
                f"{_gb(self.budget)} is below the {_gb(self.streaming_need)} this merge needs even "
                f"streaming (this process {_gb(self.in_use)}, the merged model {_gb(self.model)}, the largest "
                f"tensor's work {_gb(self.streaming_need - self.in_use - self.model)})", field="memory_budget",
                fix=f"raise it to at least {math.ceil(self.streaming_need / 1e8) / 10:g}GB")


class NonFiniteMerge(RuntimeError):
    """A candidate produced NaN or inf: it fails its trial, never the study."""


def pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available", field="device",
                         fix="use --device cpu or install a CUDA build of torch")
    return dev


class ResidentMerger:
    """Sources resident on `device`; candidates materialized in place into `self.model`."""

    def __init__(self, sources: SourceSet, *, device: str | torch.device | None = "cpu",
                 dtype: str | None = None, seed: int = 0, methods: Iterable[str] = (),
                 build_model: bool = True, progress: bool = False,
                 memory_budget: int | str | None = None, trust_remote_code: bool = False,
                 streaming: bool | None = None, precompute: bool = True, score_dtype: str | None = None,
                 as_stored: bool = True, low_rank: bool | None = None) -> None:
        self.sources = sources
        self.as_stored = as_stored     # bf16/fp16 sources stay resident as stored (False: as float32 task vectors)
        self.trust_remote_code = trust_remote_code
        self.device = pick_device(device)
        if self.device.type == "cpu":
            _keep_chunk_temporaries_on_the_heap()
        self.seed = seed
        self.compute_dtype = torch.float64 if sources.layout.float_dtype == torch.float64 else torch.float32
        self.out_dtype = TORCH_DTYPES[dtype] if dtype else sources.layout.float_dtype
        # the resident model's dtype: where it is not the output's, a candidate is merged into tensors of the
        # output dtype and copied (upcast exactly) into the model, so that the scored weights are the exported ones
        self.score_dtype = TORCH_DTYPES[score_dtype] if score_dtype else scoring_dtype(self.out_dtype, self.device)
        self.methods = [REGISTRY.get(m) for m in methods]
        # a one-off merge (no per-study tables) of a method that reads the sources themselves holds float32
        # sources as stored too, so that it reads x, not b + (x - b) (mergekit's tensors, entry for entry)
        self.exact_sources = not precompute and bool(self.methods) and all(m.reads_sources for m in self.methods)
        self.fused = fused.kernel_for(self.device, sources.layout.numel)   # the same for the search and the export
        # tensors that are no weights (integer position ids, boolean masks) pass through from the anchor
        self.unmerged = {n for n, info in sources.layout.tensors.items() if not info.dtype.is_floating_point}
        # every source a LoRA adapter and every method linear in the task vectors: the factors stay resident,
        # not dense task vectors (methods/lowrank.py); another method's recipe makes them dense, once
        # (`low_rank` False: dense task vectors even so, as a benchmark's reference)
        self.low_rank = (low_rank is not False and not streaming and bool(self.methods)
                         and all(f.is_adapter for f in sources.sources)
                         and all(m.name in COEFFICIENTS for m in self.methods))
        budget = parse_bytes(memory_budget, device=self.device)
        self.plan = MemoryPlan.of(self, budget)
        self.streaming = self.plan.streaming if streaming is None else streaming
        self.low_rank = self.low_rank and not self.streaming
        if streaming is None:
            self.plan.check()      # before any weights load
        self.model = self._load_model(sources.anchor.path) if build_model else None
        self.contexts: dict[str, TensorContext | LowRankContext] = {}
        self.outputs, self.copies = self._output_slots()
        names = [n for n in sources.layout.tensors if n not in self.unmerged]
        iterator = _progress(names, "loading sources") if progress and not self.streaming else names
        for name in iterator:
            if not self.streaming:
                self.contexts[name] = self._low_rank_context(name) if self.low_rank else self._read_context(name)
        self.prepared: set[str] = set()
        self._slots: dict[int, list[tuple[int | str, str]]] = {}
        if precompute:   # a search's grid tables; a one-off merge computes its few thresholds on demand
            self.prepare([m.name for m in self.methods], progress=progress)

    def resident_bytes(self) -> int:
        """Bytes the resident mode keeps: the anchor and the sources as stored (bf16/fp16) or the anchor and the
        task vectors in the arithmetic's dtype, plus fields and ranks (in that dtype) where needed."""
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
            stack[i] = 0.0 if pair is None else self._finite(sources.sources[i], name, pair[0] @ pair[1])
        return TensorContext(name=name, anchor=base, stack=stack, seed=self.seed, raw=raw)

    def _adapter_factors(self, folder, name: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An adapter's (left, right) of one tensor (δ = left @ right, in the arithmetic's dtype), checked: its
        saved base layer, if any, is the base's, and its factors are finite. None where it does not reach it."""
        folder.check_saved_base(name, base)
        pair = folder.low_rank(name, device=self.device, dtype=self.compute_dtype)
        return None if pair is None else (self._finite(folder, name, pair[0]), self._finite(folder, name, pair[1]))

    @staticmethod
    def _finite(folder, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"the LoRA factors of tensor '{name}' hold NaN or inf values", file=folder.path,
                             fix="this adapter is broken: re-train or re-download it")
        return tensor

    def _low_rank_context(self, name: str) -> LowRankContext:
        """The anchor as stored and each adapter's factors of one tensor (left scaled by s)."""
        anchor = self._checked(self.sources.anchor, name, raw=True)
        factors = [self._adapter_factors(folder, name, anchor) for folder in self.sources.sources]
        return LowRankContext(name=name, anchor=anchor, factors=factors, dtype=self.compute_dtype)

    def _densify(self) -> None:
        """Dense task vectors in place of the factors, once: a method not linear in them needs them."""
        if not self.low_rank:
            return
        for name in list(self.contexts):
            self.contexts[name] = self._read_context(name)
        self.low_rank = False

    def _checked(self, folder, name: str, raw: bool) -> torch.Tensor:
        tensor = self.sources.read(folder, name, device=self.device)
        tensor = tensor if raw else tensor.to(self.compute_dtype)
        # a NaN or inf entry makes the sum NaN or inf (one vectorized pass, 30x a mask's speed); a finite
        # tensor whose sum overflows is checked entry by entry
        if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"tensor '{name}' holds NaN or inf values", file=folder.path,
                             fix="this checkpoint is broken: re-download or re-train it")
        return tensor

    # -- set-up --------------------------------------------------------------------
    def _load_model(self, path: Path):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.score_dtype, use_safetensors=True,
                                                     trust_remote_code=self.trust_remote_code)
        if self.sources.vocab_size is not None:      # a union vocabulary: rows for the tokens the sources added
            model.resize_token_embeddings(self.sources.vocab_size, mean_resizing=False)   # the merge writes the rows
        return model.to(self.device).eval()

    def _output_slots(self) -> tuple[dict[str, torch.Tensor], list[binding.Copy]]:
        """Where each merged tensor is written: the model's own parameter (in place), the block of a
        parameter that transformers made of it on load (stacked experts), or storage of its own; and the
        copies into the model that storage of its own needs after each candidate."""
        shapes = {name: torch.Size(info.shape) for name, info in self.sources.layout.tensors.items()
                  if name not in self.unmerged}
        slots: dict[str, torch.Tensor] = {n: self.sources.read(self.sources.anchor, n, device=self.device)
                                          for n in self.unmerged}
        copies: list[binding.Copy] = []
        if self.model is not None:
            direct = binding.direct_parameters(self.model, list(shapes))
            slots.update({n: t for n, t in direct.items() if t.shape == shapes[n]})
            rest = {n: shape for n, shape in shapes.items() if n not in slots}
            for name, slot in binding.converted_slices(self.model, rest, list(slots.values())).items():
                if isinstance(slot, binding.Copy):
                    copies.append(slot)
                    slot = slot.merged
                slots[name] = slot
        outputs = {}
        for name in self.sources.layout.tensors:    # in checkpoint order
            outputs[name] = slots[name] if name in slots else torch.empty(shapes[name], dtype=self.out_dtype,
                                                                          device=self.device)
        if self.model is None or self.score_dtype == self.out_dtype:
            return outputs, copies
        # the model scores in another dtype: merge into tensors of the output dtype, then copy them in
        into_model = {c.merged.data_ptr(): c for c in copies}
        copies = []
        for name, slot in outputs.items():
            if name in self.unmerged:
                continue
            own = torch.empty(shapes[name], dtype=self.out_dtype, device=self.device)
            earlier = into_model.get(slot.data_ptr())
            copies.append(binding.Copy(own, earlier.target, earlier.positions) if earlier is not None
                          else binding.Copy(own, slot))
            outputs[name] = own
        return outputs, copies

    def prepare(self, methods: Iterable[str], *, progress: bool = False) -> None:
        """Precompute, once, what the given methods need beyond the task vectors."""
        specs = [REGISTRY.get(m) for m in methods if m not in self.prepared]
        if any(s.name not in COEFFICIENTS for s in specs):
            self._densify()
        if not specs or self.streaming:   # streaming computes the same statistics per tensor, per candidate
            self.prepared.update(s.name for s in specs)
            return
        thresholds = any(s.magnitude_ranks for s in specs)
        gammas = GAMMA_GRID if any(s.name.startswith("breadcrumbs") for s in specs) else ()
        stochastic = any(s.stochastic for s in specs)
        ranks = any(s.row_ranks for s in specs)
        items = list(self.contexts.values())
        for ctx in (_progress(items, "precomputing") if progress else items):
            if thresholds:
                ctx.precompute_thresholds(densities=DENSITY_GRID, gammas=gammas)
            if stochastic:
                ctx.uniform()
            if ranks:
                ctx.ranks()
        self.prepared.update(s.name for s in specs)

    # -- the hot loop ------------------------------------------------------------------
    def materialize(self, recipe: Recipe, *, check_finite: bool = True) -> None:
        """Write the merge `recipe` describes into the resident parameters.

        Each tensor runs in one pass of the fused kernel where its method has a plan for
        this candidate; otherwise elementwise methods run over chunks of it, cache-sized on
        the CPU and large on a GPU (their per-tensor statistics come from the whole tensor).
        Both write straight into the parameter; no model-sized temporary is made.
        """
        self._check_compatible(recipe)
        spec = recipe.spec
        if spec.name not in COEFFICIENTS:
            self._densify()
        whole = spec.whole_tensor or recipe.shared_values().get("rescale") == "l1"     # l1: whole-tensor norms
        chunk = None if whole else chunk_elements(self.device)
        layout = self.sources.layout
        slots: dict[tuple, dict] = {}
        sums = []
        finite = True
        with torch.inference_mode():
            for name in layout.tensors:
                if name in self.unmerged:
                    continue
                ctx = self.contexts[name] if not self.streaming else self._read_context(name)
                ctx.seed = recipe.seed
                group, kind = layout.group(name, recipe.layer_groups), layout.tensors[name].kind
                key = recipe.slot(name, group, kind)
                if key not in slots:
                    slots[key] = resolve(spec, recipe.shared_values(group, name), recipe.source_values(group, kind, name),
                                         k=ctx.k, device=self.device, dtype=self.compute_dtype)
                out = self.outputs[name]
                if isinstance(ctx, LowRankContext):
                    total = ctx.write(spec.name, slots[key], out)
                    sums += [total] if total is not None else []
                    continue
                plan = self._fused_plan(spec, ctx, slots[key], out)
                if plan is not None:
                    finite = self.fused.run(plan, ctx, out) and finite
                else:
                    sums += _merge_eager(spec, ctx, slots[key], out, chunk=chunk, check_finite=check_finite)
                if self.streaming:     # let this tensor's stack go before the next one is read
                    del ctx
                    _return_freed_memory()
            for copy in self.copies:     # tensors the model keeps as slices of its own parameters
                copy.apply()
            if check_finite and sums:
                finite = finite and bool(torch.isfinite(torch.stack(sums)).all())
            if check_finite and not finite:
                bad = next(n for n, t in self.outputs.items() if not bool(torch.isfinite(t).all()))
                raise NonFiniteMerge(f"{recipe.method} produced NaN/inf in tensor '{bad}'")

    def _fused_plan(self, spec, ctx: TensorContext, params: dict, out: torch.Tensor):
        """The fused kernel's plan for this tensor, or None where the eager steps run: no kernel (not
        on the CPU, not compiled, EVOMERGE_NO_FUSED), no plan for the method or this candidate, or
        arithmetic the kernel does not do (float64)."""
        if self.fused is None or spec.fused is None or not self.fused.accepts(ctx, out):
            return None
        return spec.fused(ctx, params)

    def _check_compatible(self, recipe: Recipe) -> None:
        specs = tuple(s.spec for s in self.sources.sources)
        if tuple(recipe.sources) != specs:
            raise InputError(f"recipe sources {list(recipe.sources)} differ from the resident ones {list(specs)}",
                             field="sources")
        base = self.sources.base.spec if self.sources.base is not None else None
        if recipe.spec.needs_base and recipe.base != base:
            raise InputError(f"recipe base '{recipe.base}' differs from the resident base '{base}'", field="base")
        if recipe.dtype is not None and TORCH_DTYPES[recipe.dtype] != self.out_dtype:
            raise InputError(f"recipe dtype {recipe.dtype} differs from the resident model's {self.out_dtype}",
                             field="dtype")
        self.sources.layout.check_groups(recipe.layer_groups)
        layout = self.sources.layout
        if recipe.name_filters:       # a slot per tensor name the filters tell apart
            slots: dict[tuple, tuple] = {}
            for name, info in layout.tensors.items():
                group = layout.group(name, recipe.layer_groups)
                slots.setdefault(recipe.slot(name, group, info.kind), (group, info.kind, name))
            check_for_layout(recipe, list(slots.values()))
            return
        if recipe.layer_groups not in self._slots:     # the model's (group, kind) slots: once per grouping
            self._slots[recipe.layer_groups] = [(g, k, None) for g, k in layout.slots(recipe.layer_groups)]
        check_for_layout(recipe, self._slots[recipe.layer_groups])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged tensors under the sources' own names, in checkpoint order."""
        return dict(self.outputs)

    def __enter__(self) -> "ResidentMerger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.contexts.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _merge_eager(spec, ctx: TensorContext, params: dict, out: torch.Tensor, *, chunk: int | None,
                 check_finite: bool) -> list[torch.Tensor]:
    """The method's torch steps, chunk by chunk into `out`; each chunk's sum, for the finiteness check."""
    flat = out.view(-1)
    sums = []
    for piece in ctx.chunks(chunk):
        merged = spec.apply(piece, params)
        target = flat[piece.span[0]:piece.span[1]] if piece.span else out
        torch.add(merged.view(target.shape), 0.0, out=target)     # + 0: a zero is +0.0, as the fused kernel writes it
        if check_finite:
            sums.append(merged.sum())
    return sums


def parse_bytes(value: int | str | None, *, device: torch.device) -> int | None:
    """'2GB', '512MiB', 123 or 'auto' (80 % of the device's free memory) -> bytes; None: no budget."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower().replace(" ", "")
    if text == "auto":
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.8)
        return int(_available_ram() * 0.8)
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise InputError(f"cannot read memory size {value!r}", field="memory_budget",
                         fix="write e.g. 2GB, 512MiB or auto") from None


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _progress(items: list, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, disable=None)   # shown on a terminal, silent in logs


def open_recipe_sources(recipe: Recipe) -> SourceSet:
    """The recipe's models, opened (headers only) and cross-checked, relative to the recipe file."""
    sources = open_sources(recipe.base, recipe.sources, relative_to=recipe.relative_to, vocab=recipe.vocab,
                           file=str(recipe.path) if recipe.path else None, needs_base=recipe.spec.needs_base)
    sources.layout.check_groups(recipe.layer_groups, file=str(recipe.path) if recipe.path else None)
    if recipe.layers:
        from .stack import check_stack

        check_stack(recipe, sources.layout, file=str(recipe.path) if recipe.path else None)
    return sources


def merge(recipe: Recipe | str | Path, *, device: str | torch.device | None = "cpu", progress: bool = False,
          memory_budget: int | str | None = None):
    """Materialize a recipe into an in-memory transformers model."""
    return merger_for(recipe, device=device, progress=progress, memory_budget=memory_budget).model


@dataclass
class Stacked:
    """A recipe with `layers`, materialized: its tensors under the stack's names, its config, and (on demand)
    the transformers model they make. What `merger_for` gives for such a recipe."""

    recipe: Recipe
    sources: SourceSet
    tensors: dict[str, torch.Tensor]
    config: dict
    dtype: torch.dtype
    device: torch.device

    @functools.cached_property
    def model(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**self.config)
        model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        missing, unexpected = model.load_state_dict(self.tensors, strict=False)
        model.tie_weights()
        params = dict(model.named_parameters(remove_duplicate=False))
        loaded = {params[n].data_ptr() for n in self.tensors if n in params}
        untied = [n for n in missing if n in params and params[n].data_ptr() not in loaded]
        if unexpected or untied:     # only a tied head may be absent from a checkpoint
            raise RuntimeError(f"stacked tensors do not fit the model: unexpected {unexpected[:3]}, "
                               f"missing {untied[:3]}")
        return model.to(self.device).eval()

    @property
    def out_dtype(self) -> torch.dtype:
        return self.dtype

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def __enter__(self) -> "Stacked":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def stack_for(recipe: Recipe, *, device: str | torch.device | None = "cpu", progress: bool = False,
              memory_budget: int | str | None = None) -> Stacked:
    """A recipe with `layers`: its parameter-space merge (where it has one) materialized, then its blocks stacked."""
    from .stack import stacked_config, stacked_tensors

    sources = open_recipe_sources(recipe)
    merged = None
    if recipe.merges:
        merger = ResidentMerger(sources, device=device, dtype=recipe.dtype, seed=recipe.seed,
                                methods=[recipe.method], progress=progress, memory_budget=memory_budget,
                                precompute=False, build_model=False)
        merger.materialize(recipe)
        merged = merger.state_dict()
    dtype = TORCH_DTYPES[recipe.dtype] if recipe.dtype else sources.layout.float_dtype
    tensors = stacked_tensors(recipe, sources, merged, dtype)
    return Stacked(recipe, sources, tensors, stacked_config(sources.anchor.config, recipe.layers), dtype, pick_device(device))


def merger_for(recipe: Recipe | str | Path, *, device: str | torch.device | None = "cpu",
               progress: bool = False, memory_budget: int | str | None = None,
               build_model: bool = True) -> ResidentMerger | Stacked:
    """A merger holding `recipe` materialized (for export or evaluation); `build_model` False: its tensors
    only (an export writes them; no transformers model is built)."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    if recipe.layers:
        return stack_for(recipe, device=device, progress=progress, memory_budget=memory_budget)
    sources = open_recipe_sources(recipe)
    merger = ResidentMerger(sources, device=device, dtype=recipe.dtype, seed=recipe.seed, methods=[recipe.method],
                            progress=progress, memory_budget=memory_budget, precompute=False, build_model=build_model)
    merger.materialize(recipe)
    return merger
