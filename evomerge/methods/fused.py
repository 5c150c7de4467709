"""The fused CPU merge kernel: one pass over each output tensor instead of a dozen.

The eager steps (primitives.py) read and write each chunk once per torch op. A
method's `fused` function instead describes one tensor's merge as a `Plan`: which
entries of each task vector are kept (a magnitude `Band`, a random `Drop`) and how
they combine (a weighted `Sum`, or TIES sign election `Elect`), with the per-tensor
scalars the eager steps compute (thresholds from the tables, scales, rescales) —
and the C++ in fused.cpp runs it in one pass, giving the eager tensor bit for
bit. It is compiled once per machine with torch's JIT extension builder (g++ and
ninja) and cached in torch's extension folder. Without a compiler, with
EVOMERGE_NO_FUSED=1, or off the CPU, `kernel_for` gives None and the eager path runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cpu import cpu_flags

SOURCE = Path(__file__).with_name("fused.cpp")   # package data (pyproject.toml)
CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=256", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp")
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Band:
    """Keep the entries with low_i <= |delta_i| < high_i (the TIES and breadcrumbs trims). With cuts (breadcrumbs,
    where magnitudes tie at a bound): of the entries at |delta_i| == low_i only those at a flat position below
    low_cut_i, and also those at |delta_i| == high_i from position high_cut_i on (context.top_cut)."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    low_cut: tuple[int, ...] = ()
    high_cut: tuple[int, ...] = ()


@dataclass(frozen=True)
class Drop:
    """Keep the entries with u_i < offset_i (+ slope_i * q, q the row ranks, when `by_rank`), rescaled
    by rescale_i (None: by 1 / that keep probability, entry by entry). DARE and DELLA."""

    offset: tuple[float, ...]
    slope: tuple[float, ...] = ()
    rescale: tuple[float, ...] | None = None
    by_rank: bool = False


@dataclass(frozen=True)
class Sum:
    """(base_scale * b + sum_i scale_i kept_i) / divisor, one fused multiply-add per source (as `weighted_sum`), or
    with `madd` false a rounded product and an add (slerp's c0 b + c1 x); with `of_sources`, of the sources x_i
    themselves (every entry kept)."""

    scales: tuple[float, ...]
    base_scale: float = 1.0
    divisor: float = 1.0
    of_sources: bool = False
    madd: bool = True


@dataclass(frozen=True)
class Mix:
    """mergekit's task arithmetic on the kept task vectors (as `mix_and_merge`): b + lam (sum_i w_i kept_i) / divisor."""

    weights: tuple[float, ...]
    lam: float
    divisor: float = 1.0


@dataclass(frozen=True)
class Elect:
    """TIES steps 2-5 on the kept task vectors (as `elect_and_merge`)."""

    weights: tuple[float, ...]
    lam: float
    normalize: bool


@dataclass(frozen=True)
class Plan:
    """One tensor's merge: what each source keeps, then how the kept task vectors combine."""

    combine: Sum | Elect | Mix
    keep: Band | Drop | None = None


def values(t: torch.Tensor) -> tuple[float, ...]:
    """A (K,) tensor's entries as Python floats (exact: float32 values are doubles)."""
    return tuple(t.tolist())


class FusedKernel:
    """The compiled extension, run on a tensor context and its output slot."""

    def __init__(self, module) -> None:
        self.module = module

    def accepts(self, ctx, out: torch.Tensor) -> bool:
        """Float32 arithmetic on float32 task vectors or on bf16/fp16 sources (the C++ forms their task vectors
        block by block), a float output of a kind the C++ writes, everything contiguous, and no more sources
        than the C++ is compiled for."""
        stack = ctx.stack
        held = stack.dtype in (torch.bfloat16, torch.float16) if ctx.raw else stack.dtype == torch.float32
        return (ctx.dtype == torch.float32 and held and stack.device.type == "cpu" and out.dtype in OUTPUT_DTYPES
                and out.is_contiguous() and stack.is_contiguous() and ctx.anchor.is_contiguous()
                and stack.shape[0] <= self.module.MAX_SOURCES)

    def run(self, plan: Plan, ctx, out: torch.Tensor) -> bool:
        """Write the plan's merge of `ctx` into `out`; whether every merged value is finite."""
        keep, combine = plan.keep, plan.combine
        mode, low, high, cuts, rescale, uniform, ranks = 0, (), (), ((), ()), (), None, None
        if isinstance(keep, Band):
            mode, low, high, cuts = 1, keep.low, keep.high, (keep.low_cut, keep.high_cut)
        elif isinstance(keep, Drop):
            mode, low, high, uniform = 2, keep.offset, keep.slope or (0.0,) * ctx.k, ctx.uniform()
            ranks = ctx.ranks() if keep.by_rank else None
            rescale = keep.rescale if keep.rescale is not None else ()
        divisor, normalize, of_sources, madd = 1.0, False, False, True
        if isinstance(combine, Sum):
            kind, coef, scalar, divisor = 0, combine.scales, combine.base_scale, combine.divisor
            of_sources, madd = combine.of_sources, combine.madd
        elif isinstance(combine, Elect):
            kind, coef, scalar, normalize = 1, combine.weights, combine.lam, combine.normalize
        else:
            kind, coef, scalar, divisor = 2, combine.weights, combine.lam, combine.divisor
        with _labelled("evomerge::fused_merge"):
            return self.module.merge(out, ctx.anchor, ctx.stack, ctx.raw, mode, low, high, *cuts, rescale, uniform,
                                     ranks, kind, coef, scalar, divisor, normalize, of_sources, madd)


def _labelled(name: str):
    """A profiler label for the kernel's calls while torch's profiler runs; nothing otherwise (a label
    costs some 20 us per call, a tenth of a small tensor's merge)."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


MIN_ELEMENTS = 16_000_000   # below, a candidate merges in milliseconds eagerly: not worth a first build (~1 min)


def kernel_for(device: torch.device, elements: int | None = None) -> FusedKernel | None:
    """The fused kernel for merges of `elements` parameters on `device`, or None where the eager path runs:
    off the CPU, with EVOMERGE_NO_FUSED=1, or for a model under MIN_ELEMENTS (EVOMERGE_FUSED=1 fuses any size).
    Both paths give the same tensors, bit for bit (tests/test_fused.py)."""
    if device.type != "cpu" or os.environ.get("EVOMERGE_NO_FUSED", "") not in ("", "0"):
        return None
    if elements is not None and elements < MIN_ELEMENTS and os.environ.get("EVOMERGE_FUSED") != "1":
        return None
    return compiled()


@functools.cache
def compiled() -> FusedKernel | None:
    """Build (first time on this machine) and load the extension, once per process; None, with one
    warning, where that fails. The name carries a digest of fused.cpp, the flags and the CPU, so
    a home folder shared by different machines never loads code built for another CPU."""
    try:
        from torch.utils.cpp_extension import load

        name = f"evomerge_fused_{_digest()}"
        if not _built(name):
            print("evomerge: building the fused CPU merge kernel (once on this machine, about a minute)",
                  file=sys.stderr, flush=True)
        module = load(name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"],
                      verbose=False)
    except Exception as err:   # no compiler, no ninja, a failed build: all mean the eager path
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        warnings.warn(f"evomerge: the fused merge kernel is unavailable ({reason}); merging with torch ops",
                      RuntimeWarning, stacklevel=2)
        return None
    return FusedKernel(module)


def _built(name: str) -> bool:
    """Whether torch's extension folder already holds this build."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:  # a torch without that helper: say nothing
        return True


def _digest() -> str:
    flags = " ".join(sorted(cpu_flags())) or platform.processor()
    text = "\0".join([SOURCE.read_text(), *CFLAGS, platform.machine(), flags, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
