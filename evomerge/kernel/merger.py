"""The resident merger: sources loaded once, every candidate written in place.

`ResidentMerger` holds the sources in a tensor store (stores.py) on one device, with what no
candidate's scalars change precomputed (magnitude threshold tables, random fields, row ranks), and
`materialize(plan)` writes the merged tensors straight into the parameters of one resident
transformers model (or, without one, into tensors of their own that an export writes), or hands them
one at a time to a sink (a one-off merge streams them to safetensors and holds none). `evomerge
merge`, the search and the export all go through `materialize`, so the exported model is the one that
was scored. The kernel reads a MergePlan (plan.py), never a recipe's values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from .. import binding
from ..errors import InputError
from ..methods import REGISTRY, TensorContext, fused, resolve
from ..methods.lowrank import COEFFICIENTS, LowRankContext
from ..plan import MergePlan
from ..sources import SourceSet
from .device import TORCH_DTYPES, chunk_elements, pick_device, scoring_dtype
from .memory import MemoryPlan, keep_chunk_temporaries_on_the_heap, parse_bytes, return_freed_memory
from .stores import TensorStore, progress_bar


@dataclass(frozen=True)
class MergerOptions:
    """How a ResidentMerger holds its sources and what it builds."""

    device: str | torch.device | None = "cpu"
    dtype: str | None = None              # the output's; None: the sources'
    seed: int = 0
    methods: tuple[str, ...] = ()         # what candidates may use: decides what is precomputed and how held
    build_model: bool = True              # a transformers model to score (False: the merged tensors only)
    progress: bool = False
    memory_budget: int | str | None = None
    trust_remote_code: bool = False
    streaming: bool | None = None         # None: decided by the memory budget
    precompute: bool = True               # a search's grid tables; a one-off merge computes its few on demand
    score_dtype: str | None = None        # None: the output's, or float32 on a CPU without fast half matmuls
    as_stored: bool = True                # bf16/fp16 sources resident as stored (False: float32 task vectors)
    low_rank: bool | None = None          # False: dense task vectors even over adapters (a benchmark's reference)
    hold_outputs: bool = True             # False: a one-off merge; each merged tensor goes to a sink, none is held,
                                          # and the sources are read tensor by tensor (streaming; factors stay)


Sink = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class TensorStream:
    """Tensors as a writer takes them: every dtype and shape up front (in checkpoint order, for the headers),
    then `fill(sink)` hands each tensor to `sink` once, in any order."""

    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
    fill: Callable[[Sink], None]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> "TensorStream":
        """Tensors held in memory."""
        def fill(sink: Sink) -> None:
            for name, tensor in tensors.items():
                sink(name, tensor)

        return cls({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, fill)


class NonFiniteMerge(RuntimeError):
    """A candidate produced NaN or inf: it fails its trial, never the study."""


class ResidentMerger:
    """Sources resident on `device`; candidates materialized in place into `self.model`."""

    def __init__(self, sources: SourceSet, options: MergerOptions | None = None, **overrides) -> None:
        options = dataclasses.replace(options or MergerOptions(), **overrides)
        self.options = options = dataclasses.replace(options, methods=tuple(options.methods))
        if not options.hold_outputs and options.build_model:
            raise ValueError("a merger that holds no outputs builds no model: pass build_model=False")
        self.sources = sources
        self.trust_remote_code = options.trust_remote_code
        self.device = pick_device(options.device)
        if self.device.type == "cpu":
            keep_chunk_temporaries_on_the_heap()
        self.out_dtype = TORCH_DTYPES[options.dtype] if options.dtype else sources.layout.float_dtype
        # the resident model's dtype: where it is not the output's, a candidate is merged into tensors of the
        # output dtype and copied (upcast exactly) into the model, so that the scored weights are the exported ones
        self.score_dtype = (TORCH_DTYPES[options.score_dtype] if options.score_dtype
                            else scoring_dtype(self.out_dtype, self.device))
        methods = [REGISTRY.get(m) for m in options.methods]
        self.fused = fused.kernel_for(self.device, sources.layout.numel)   # the same for the search and the export
        self.store = self._store(methods)
        budget = parse_bytes(options.memory_budget, device=self.device)
        self.memory = MemoryPlan.of(self.store, out_dtype=self.out_dtype, score_dtype=self.score_dtype,
                                    budget=budget, holds_outputs=options.hold_outputs)
        streaming = self.memory.streaming if options.streaming is None else options.streaming
        if options.streaming is None:
            self.memory.check()      # before any weights load
        # a one-off merge reads each tensor once either way: reading it when it is merged holds one at a time
        streaming = streaming or not (options.hold_outputs or self.store.low_rank)
        if streaming:
            self.store = self._store(methods, streaming=True)
        self.model = self.load_model(sources.anchor.path) if options.build_model else None
        self.outputs, self.copies = self._output_slots()
        self.store.load(progress=options.progress)
        if options.precompute:
            self.prepare(options.methods, progress=options.progress)

    def _store(self, methods: list, *, streaming: bool = False) -> TensorStore:
        options = self.options
        # every source a LoRA adapter and every method linear in the task vectors: the factors stay resident
        low_rank = (options.low_rank is not False and not options.streaming and bool(methods)
                    and all(f.is_adapter for f in self.sources.sources)
                    and all(m.name in COEFFICIENTS for m in methods))
        # a one-off merge (no per-study tables) of a method that reads the sources themselves holds float32
        # sources as stored too, so that it reads x, not b + (x - b) (mergekit's tensors, entry for entry)
        exact = not options.precompute and bool(methods) and all(m.reads_sources for m in methods)
        return TensorStore(self.sources, device=self.device, seed=options.seed, methods=methods,
                           as_stored=options.as_stored, exact_sources=exact, low_rank=low_rank, streaming=streaming)

    # what benchmarks and the gradient learner read of the store
    @property
    def streaming(self) -> bool:
        return self.store.streaming

    @property
    def low_rank(self) -> bool:
        return self.store.low_rank

    @property
    def contexts(self) -> dict[str, TensorContext | LowRankContext]:
        return self.store.contexts

    @property
    def unmerged(self) -> set[str]:
        return self.store.unmerged

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.store.compute_dtype

    @property
    def config(self) -> None:
        """The merged model's config where it is not the anchor's (a stack's); a merge keeps the anchor's."""
        return None

    def resident_bytes(self) -> int:
        return self.store.resident_bytes()

    def prepare(self, methods, *, progress: bool = False) -> None:
        """Precompute, once, what the given methods need beyond the task vectors."""
        self.store.prepare([REGISTRY.get(m) for m in methods], progress=progress)

    # -- set-up --------------------------------------------------------------------
    def load_model(self, path: Path):
        """A model folder loaded as the scored model is: in the scoring dtype, on the device, the union vocabulary
        resized where there is one."""
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
        if not self.options.hold_outputs:      # merged into a tensor of its own each, handed to a sink
            return slots, copies
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

    # -- the hot loop ------------------------------------------------------------------
    def plan(self, recipe) -> MergePlan:
        """A recipe's plan over the resident sources' layout."""
        return MergePlan.of(recipe, self.sources.layout)

    def materialize(self, candidate: MergePlan, *, check_finite: bool = True, sink: Sink | None = None) -> None:
        """Write the merge a plan (or a recipe, planned here) describes into the resident parameters, or with
        `sink`, into a tensor of its own per tensor, handed to `sink(name, tensor)` and let go (the tensors no
        weights pass through from the anchor first).

        Each tensor runs in one pass of the fused kernel where its method has a plan for
        this candidate; otherwise elementwise methods run over chunks of it, cache-sized on
        the CPU and large on a GPU (their per-tensor statistics come from the whole tensor).
        Both write straight into the parameter; no model-sized temporary is made.
        """
        if sink is None and not self.options.hold_outputs:
            raise ValueError("this merger holds no outputs: materialize into a sink")
        plan = candidate if isinstance(candidate, MergePlan) else self.plan(candidate)
        self._check_compatible(plan)
        spec = plan.spec
        if spec.name not in COEFFICIENTS:
            self.store.densify()
        chunk = chunk_elements(self.device)
        resolved: dict[int, dict] = {}
        sums = []
        finite = True
        with torch.inference_mode():
            for name in (self.unmerged if sink is not None else ()):
                sink(name, self.outputs[name])
            names = self.store.names
            for name in (progress_bar(names, "merging") if sink is not None and self.options.progress else names):
                ctx = self.store.context(name)
                ctx.seed = plan.seed
                index = plan.of_tensor[name]
                if index not in resolved:
                    slot = plan.slots[index]
                    resolved[index] = resolve(spec, slot.shared, slot.values, k=ctx.k, device=self.device,
                                              dtype=self.compute_dtype)
                params = resolved[index]
                out = self.outputs[name] if sink is None else torch.empty(
                    self.sources.layout.tensors[name].shape, dtype=self.out_dtype, device=self.device)
                ok, partial = self._merge_tensor(spec, ctx, params, out, chunk=None if plan.whole(name) else chunk,
                                                 check_finite=check_finite)
                if sink is None:
                    finite = finite and ok
                    sums += partial
                else:    # checked before it is written
                    if check_finite and not (ok and (not partial or bool(torch.isfinite(torch.stack(partial)).all()))):
                        raise NonFiniteMerge(f"{plan.method} produced NaN/inf in tensor '{name}'")
                    sink(name, out)
                    del out
                if self.streaming:     # let this tensor's stack go before the next one is read
                    del ctx
                    if sink is None:   # RSS tracks what a search holds (a one-off merge's next tensor reuses the
                        return_freed_memory()         # heap: trimming it each time costs as much as the merge)
            for copy in self.copies:     # tensors the model keeps as slices of its own parameters
                copy.apply()
            if check_finite and sums:
                finite = finite and bool(torch.isfinite(torch.stack(sums)).all())
            if check_finite and not finite:
                bad = next(n for n, t in self.outputs.items() if not bool(torch.isfinite(t).all()))
                raise NonFiniteMerge(f"{plan.method} produced NaN/inf in tensor '{bad}'")

    def _merge_tensor(self, spec, ctx, params: dict, out: torch.Tensor, *, chunk: int | None,
                      check_finite: bool) -> tuple[bool, list[torch.Tensor]]:
        """One tensor merged into `out`: whether the fused kernel found it finite, and the sums that tell
        (the low-rank write's or the eager chunks')."""
        if isinstance(ctx, LowRankContext):
            total = ctx.write(spec.name, params, out)
            return True, [total] if total is not None else []
        fused_plan = self._fused_plan(spec, ctx, params, out)
        if fused_plan is not None:
            return self.fused.run(fused_plan, ctx, out), []
        return True, _merge_eager(spec, ctx, params, out, chunk=chunk, check_finite=check_finite)

    def weights(self, candidate) -> TensorStream:
        """What an export writes of `candidate` (a plan or a recipe): the outputs held (the candidate last
        materialized, the very tensors that were scored), or, by a merger that holds none, the candidate
        merged tensor by tensor as the writer takes them."""
        if self.options.hold_outputs:
            return TensorStream.of(self.outputs)
        plan = candidate if isinstance(candidate, MergePlan) else self.plan(candidate)
        layout = self.sources.layout
        specs = {n: (self.outputs[n].dtype if n in self.unmerged else self.out_dtype, tuple(info.shape))
                 for n, info in layout.tensors.items()}
        return TensorStream(specs, lambda sink: self.materialize(plan, sink=sink))

    def _fused_plan(self, spec, ctx: TensorContext, params: dict, out: torch.Tensor):
        """The fused kernel's plan for this tensor, or None where the eager steps run: no kernel (not
        on the CPU, not compiled, EVOMERGE_NO_FUSED), no plan for the method or this candidate, or
        arithmetic the kernel does not do (float64)."""
        if self.fused is None or spec.fused is None or not self.fused.accepts(ctx, out):
            return None
        return spec.fused(ctx, params)

    def _check_compatible(self, plan: MergePlan) -> None:
        specs = tuple(s.spec for s in self.sources.sources)
        if plan.sources != specs:
            raise InputError(f"recipe sources {list(plan.sources)} differ from the resident ones {list(specs)}",
                             field="sources")
        base = self.sources.base.spec if self.sources.base is not None else None
        if plan.spec.needs_base and plan.base != base:
            raise InputError(f"recipe base '{plan.base}' differs from the resident base '{base}'", field="base")
        if plan.dtype is not None and TORCH_DTYPES[plan.dtype] != self.out_dtype:
            raise InputError(f"recipe dtype {plan.dtype} differs from the resident model's {self.out_dtype}",
                             field="dtype")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged tensors under the sources' own names, in checkpoint order."""
        return dict(self.outputs)

    def __enter__(self) -> "ResidentMerger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.clear()
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


