"""Every merge technique of METHODS.md, as `apply(ctx, p) -> Tensor` plus its declared parameters,
and (`fused`) the same merge as a plan for the one-pass kernel of fused.py.

`p` holds resolved values for one tensor: shared parameters as Python scalars,
per-source parameters as (K,) tensors on the tensor's device. Shared steps are
composed, not copied: `dare_ties` is the DARE mask followed by the TIES steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import torch

from .base import (DENSITY, EPSILON, GAMMA, LAMBDA, REGISTRY, RESCALE, SLERP_T, WEIGHT, MethodSpec, ParamSpec,
                   normalize)
from .context import TensorContext
from .fused import Band, Drop, Elect, Mix, Plan, Sum, values
from .primitives import (breadcrumbs_counts, elect_and_merge, l1_rescale, lt_mask, mix_and_merge, per_source,
                         sum_sources, task_divisor, ties_keep_count, weight_sum, weighted_sum)

# ---------------------------------------------------------------------------------------------
# Sparsifications: (K, *S) task vectors -> (K, *S) kept (and rescaled) task vectors


def trim_thresholds(ctx: TensorContext, density: Sequence[float]) -> list[float]:
    """TIES: tau_i = the k_i-th largest |delta_i|, k_i = max(1, int(d_i N)); 0 (keep all) for d_i >= 1."""
    return [0.0 if d >= 1 else ctx.kth_largest(i, ties_keep_count(d, ctx.numel)) for i, d in enumerate(density)]


def magnitude_trim(ctx: TensorContext, density: Sequence[float]) -> torch.Tensor:
    """TIES trim: keep |delta_i| >= tau_i."""
    tau = per_source(torch.tensor(trim_thresholds(ctx, density), dtype=ctx.deltas.dtype, device=ctx.deltas.device),
                     ctx.deltas)
    return ctx.deltas.abs().ge_(tau).mul_(ctx.deltas)      # ge_ on floats writes the 0/1 mask in place


Cut = tuple[float, int]      # (value, position): ctx.top_cut's description of the k largest magnitudes


def outlier_bounds(ctx: TensorContext, density: Sequence[float],
                   gamma: Sequence[float]) -> tuple[list[Cut], list[Cut]]:
    """Breadcrumbs: per source, the top drop+keep and the top drop magnitudes (ties broken by position), whose
    difference is kept: below the top int(g N), the int(d N) largest ones; everything for d >= 1."""
    n = ctx.numel
    lows, highs = [], []
    for i, (d, g) in enumerate(zip(density, gamma)):
        if d >= 1:
            lows.append((0.0, n))
            highs.append((math.inf, n))
            continue
        drop, keep = breadcrumbs_counts(d, g, n)
        lows.append(ctx.top_cut(i, drop + keep) if keep > 0 else (math.inf, n))
        highs.append(ctx.top_cut(i, drop) if drop > 0 else (math.inf, n))
    return lows, highs


def outlier_trim(ctx: TensorContext, density: Sequence[float], gamma: Sequence[float]) -> torch.Tensor:
    """Breadcrumbs trim: keep the top drop+keep magnitudes less the top drop: low_i <= |delta_i| < high_i,
    and where a tie straddles a bound, its entries by position."""
    like = ctx.deltas
    lows, highs = outlier_bounds(ctx, density, gamma)
    low = per_source(torch.tensor([v for v, _ in lows], dtype=like.dtype, device=like.device), like)
    high = per_source(torch.tensor([v for v, _ in highs], dtype=like.dtype, device=like.device), like)
    mag = like.abs()
    keep = lt_mask(mag, high)
    kept = mag.ge_(low).mul_(keep)
    n = ctx.numel
    straddled = [i for i, (lo, hi) in enumerate(zip(lows, highs)) if lo[1] != n or hi[1] != n]
    if straddled:
        start, stop = ctx.span or (0, n)
        position = torch.arange(start, stop, device=like.device).view(like.shape[1:])
        for i in straddled:
            m = like[i].abs()
            top = lambda cut: (m > cut[0]) | ((m == cut[0]) & (position < cut[1]))   # noqa: E731
            kept[i] = (top(lows[i]) & ~top(highs[i])).to(kept.dtype)
    return kept.mul_(like)


def _rescaled(ctx: TensorContext, keep: torch.Tensor, inverse: torch.Tensor, rescale: str) -> torch.Tensor:
    """`keep` is a 0/1 float mask."""
    kept = keep.mul_(ctx.deltas)
    if rescale == "inverse":
        return kept.mul_(inverse)
    if rescale == "l1":
        return l1_rescale(ctx.deltas, kept, ctx.l1())
    return kept


def dare_inverse(density: torch.Tensor) -> torch.Tensor:
    """DARE's inverse rescale 1 / d_i; 1 for a density >= 1, which keeps every entry."""
    return 1.0 / torch.clamp(density, max=1.0)


def dare_drop(ctx: TensorContext, density: torch.Tensor, rescale: str) -> torch.Tensor:
    """DARE: keep each entry with probability d_i (u < d_i on the seeded field); rescale."""
    d = per_source(density, ctx.deltas)
    if bool((density >= 1).all()):
        return ctx.deltas
    keep = lt_mask(ctx.uniform(), d)              # u in [0, 1): a density >= 1 keeps every entry
    return _rescaled(ctx, keep, per_source(dare_inverse(density), ctx.deltas), rescale)


def della_terms(density: torch.Tensor, epsilon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DELLA's keep probability p = d - eps + 2 eps q as (d - eps, 2 eps): p = first + second * q."""
    return density - epsilon, 2.0 * epsilon


def della_drop(ctx: TensorContext, density: torch.Tensor, epsilon: torch.Tensor, rescale: str) -> torch.Tensor:
    """DELLA: keep with probability p = d - eps + 2 eps q, q the per-row magnitude rank; rescale by 1/p."""
    offset, slope = della_terms(density, epsilon)
    p = per_source(offset, ctx.deltas) + per_source(slope, ctx.deltas) * ctx.ranks()
    keep = lt_mask(ctx.uniform(), p)
    return _rescaled(ctx, keep, 1.0 / p, rescale)


# ---------------------------------------------------------------------------------------------
# Methods


def _task_sum(ctx: TensorContext, kept: torch.Tensor, p: dict) -> torch.Tensor:
    """Task arithmetic on kept task vectors (a temporary of the caller's, overwritten, or the task vectors
    themselves, left intact), in mergekit's order of operations."""
    w = per_source(p["weight"], kept)
    weighted = kept * w if kept is ctx.deltas else kept.mul_(w)
    return mix_and_merge(ctx.base, weighted, lam=p["lambda"], divisor=task_divisor(p["weight"], p["normalize"]))


def _ties_step(ctx: TensorContext, kept: torch.Tensor, p: dict) -> torch.Tensor:
    """TIES steps 2-5 on kept task vectors (a temporary of the caller's, overwritten)."""
    return elect_and_merge(ctx.base, kept.mul_(per_source(p["weight"], kept)), p["weight"], lam=p["lambda"],
                           normalize=p["normalize"])


def _linear(ctx: TensorContext, p: dict) -> torch.Tensor:
    """sum_i w_i x_i, a multiply-add per source from 0, then / sum_i w_i with normalize (mergekit's order)."""
    w = p["weight"]
    merged = weighted_sum(ctx.base, ctx.sources, w, base_scale=0.0)
    return merged.div_(weight_sum(w)) if p["normalize"] else merged


def _task_arithmetic(ctx: TensorContext, p: dict) -> torch.Tensor:
    return _task_sum(ctx, ctx.deltas, p)


SLERP_CHUNK = 1 << 20    # mergekit's slerp sums its norms and its dot product over pieces of this many entries


def _slerp_angle(ctx: TensorContext) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(collinear, theta, sin theta) of base and source on the whole flattened tensors, as mergekit computes them
    (in the arithmetic's dtype): norms and the dot product of the normalized tensors summed piece by piece."""
    a, b = ctx.base.reshape(1, -1), ctx.sources[0].reshape(1, -1)
    spans = range(0, a.shape[1], SLERP_CHUNK)
    norm = lambda v: torch.linalg.vector_norm(torch.stack(  # noqa: E731
        [torch.linalg.vector_norm(v[:, i:i + SLERP_CHUNK], dim=1, keepdim=True) for i in spans]), dim=0)
    norm_a, norm_b = norm(a), norm(b)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dot = torch.stack([(a[:, i:i + SLERP_CHUNK] / norm_a * (b[:, i:i + SLERP_CHUNK] / norm_b)).sum(dim=1, keepdim=True)
                       for i in spans]).sum(dim=0).clamp(-1, 1)
    collinear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(collinear, 0, dot))
    return bool(collinear), theta, torch.sin(theta)


def _slerp_mix(ctx: TensorContext, t: float) -> tuple[float, float]:
    """(c0, c1) of r = c0 v0 + c1 v1, computed as mergekit computes them (in float32; float64 for float64)."""
    collinear, theta, sin_theta = ctx.stat("slerp", _slerp_angle)
    t = torch.tensor(t, dtype=ctx.dtype)
    if collinear:
        return float(1 - t), float(t)
    return float(torch.sin((1 - t) * theta) / sin_theta), float(torch.sin(t * theta) / sin_theta)


def _slerp(ctx: TensorContext, p: dict) -> torch.Tensor:
    c0, c1 = _slerp_mix(ctx, p["t"])
    return torch.mul(ctx.base, c0).add_(torch.mul(ctx.sources[0], c1))


def _ties(ctx: TensorContext, p: dict) -> torch.Tensor:
    return _ties_step(ctx, magnitude_trim(ctx, p["exact"]["density"]), p)


def _breadcrumbs(ctx: TensorContext, p: dict) -> torch.Tensor:
    return _task_sum(ctx, outlier_trim(ctx, p["exact"]["density"], p["exact"]["gamma"]), p)


def _breadcrumbs_ties(ctx: TensorContext, p: dict) -> torch.Tensor:
    return _ties_step(ctx, outlier_trim(ctx, p["exact"]["density"], p["exact"]["gamma"]), p)


def _dare_linear(ctx: TensorContext, p: dict) -> torch.Tensor:
    return _task_sum(ctx, dare_drop(ctx, p["density"], p["rescale"]), p)


def _dare_ties(ctx: TensorContext, p: dict) -> torch.Tensor:
    kept = dare_drop(ctx, p["density"], p["rescale"])
    return _ties_step(ctx, kept.clone() if kept is ctx.deltas else kept, p)     # the task vectors stay intact


def _della(ctx: TensorContext, p: dict) -> torch.Tensor:
    return _ties_step(ctx, della_drop(ctx, p["density"], p["epsilon"], p["rescale"]), p)


def _della_linear(ctx: TensorContext, p: dict) -> torch.Tensor:
    return _task_sum(ctx, della_drop(ctx, p["density"], p["epsilon"], p["rescale"]), p)


FILTER_WISE = ParamSpec("filter_wise", "shared", False, choices=(True, False),
                        help="model_stock: one interpolation t per row (mergekit's filter_wise) instead of per tensor")


def _model_stock_ratio(ctx: TensorContext, *, filter_wise: bool = False) -> float | torch.Tensor:
    """t = K cos / (1 + (K - 1) cos), as mergekit computes it (0 where the denominator vanishes): one t for the
    tensor, or with `filter_wise` one per row (per vector along the last dimension; a vector is one row)."""
    shape = (-1, ctx.anchor.shape[-1]) if filter_wise and ctx.anchor.dim() > 0 else (-1,)
    offsets = [ctx.delta(i).reshape(shape) for i in range(ctx.k)]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (ctx.k - 1) * cos
    if filter_wise:
        singular = denominator.abs() < 1e-6
        safe = torch.where(singular, torch.ones_like(denominator), denominator)
        return torch.where(singular, torch.zeros_like(cos), (ctx.k * cos) / safe)
    return 0.0 if bool(denominator.abs() < 1e-6) else float((ctx.k * cos) / denominator)


def _model_stock(ctx: TensorContext, p: dict) -> torch.Tensor:
    """t mean_i(x_i) + (1 - t) b: the sources summed left to right, then divided by K (mergekit's order); t per
    row with filter_wise, read for the entries of this piece of the tensor."""
    if p["filter_wise"]:
        rows = ctx.stat("model_stock_rows", functools.partial(_model_stock_ratio, filter_wise=True))
        whole = ctx.parent or ctx
        start, stop = ctx.span or (0, ctx.numel)
        width = whole.anchor.shape[-1] if whole.anchor.dim() > 0 else 1
        t = rows[torch.arange(start, stop, device=rows.device) // width].to(ctx.dtype).reshape(ctx.base.shape)
    else:
        t = torch.tensor(ctx.stat("model_stock", _model_stock_ratio), dtype=ctx.dtype)
    average = sum_sources(ctx.sources).div_(ctx.k)
    return average.mul_(t).add_(torch.mul(ctx.base, 1 - t))


# ---------------------------------------------------------------------------------------------
# The same merges as fused-kernel plans (fused.py): the scalars above, the arithmetic in one pass.


def _task_plan(p: dict, keep: Band | Drop | None = None) -> Plan:
    return Plan(Mix(values(p["weight"]), p["lambda"], task_divisor(p["weight"], p["normalize"])), keep)


def _ties_plan(p: dict, keep: Band | Drop | None) -> Plan:
    return Plan(Elect(values(p["weight"]), p["lambda"], p["normalize"]), keep)


def _outlier_band(ctx: TensorContext, p: dict) -> Band | None:
    """The band; with the cuts where a tie straddles a bound (its entries kept by position). None (the eager
    steps) for cuts in a tensor of 2^31 entries or more, past the kernel's int32 positions."""
    lows, highs = outlier_bounds(ctx, p["exact"]["density"], p["exact"]["gamma"])
    band = Band(tuple(v for v, _ in lows), tuple(v for v, _ in highs))
    if all(cut == ctx.numel for _, cut in lows + highs):
        return band
    if ctx.numel >= 2**31:
        return None
    return dataclasses.replace(band, low_cut=tuple(c for _, c in lows), high_cut=tuple(c for _, c in highs))


def _dare_keep(p: dict) -> Drop | None:
    """DARE's drop; None where every density keeps every entry (dare_drop then returns the task vectors)."""
    if bool((p["density"] >= 1).all()):
        return None
    inverse = dare_inverse(p["density"]) if p["rescale"] == "inverse" else torch.ones_like(p["density"])
    return Drop(values(p["density"]), rescale=values(inverse))


def _della_keep(p: dict) -> Drop:
    offset, slope = della_terms(p["density"], p["epsilon"])
    rescale = None if p["rescale"] == "inverse" else (1.0,) * len(offset)     # None: by 1 / p
    return Drop(values(offset), values(slope), rescale=rescale, by_rank=True)


def _without_l1(plan: Callable[[TensorContext, dict], Plan]) -> Callable[[TensorContext, dict], Plan | None]:
    """The plan, except under the l1 rescale, whose norms of the kept entries span the whole tensor (eager)."""
    def fused(ctx: TensorContext, p: dict) -> Plan | None:
        return None if p["rescale"] == "l1" else plan(ctx, p)
    return fused


def _fused_linear(ctx: TensorContext, p: dict) -> Plan:
    w = p["weight"]
    return Plan(Sum(values(w), base_scale=0.0, divisor=weight_sum(w) if p["normalize"] else 1.0, of_sources=True))


def _fused_slerp(ctx: TensorContext, p: dict) -> Plan:
    c0, c1 = _slerp_mix(ctx, p["t"])
    return Plan(Sum((c1,), base_scale=c0, of_sources=True, madd=False))


def _fused_ties(ctx: TensorContext, p: dict) -> Plan:
    taus = trim_thresholds(ctx, p["exact"]["density"])
    return _ties_plan(p, Band(tuple(taus), (math.inf,) * len(taus)))


def _fused_task_arithmetic(ctx: TensorContext, p: dict) -> Plan:
    return _task_plan(p)


def _fused_breadcrumbs(ctx: TensorContext, p: dict) -> Plan | None:
    band = _outlier_band(ctx, p)
    return _task_plan(p, band) if band is not None else None


def _fused_breadcrumbs_ties(ctx: TensorContext, p: dict) -> Plan | None:
    band = _outlier_band(ctx, p)
    return _ties_plan(p, band) if band is not None else None


@_without_l1
def _fused_dare_linear(ctx: TensorContext, p: dict) -> Plan:
    return _task_plan(p, _dare_keep(p))


@_without_l1
def _fused_dare_ties(ctx: TensorContext, p: dict) -> Plan:
    return _ties_plan(p, _dare_keep(p))


@_without_l1
def _fused_della(ctx: TensorContext, p: dict) -> Plan:
    return _ties_plan(p, _della_keep(p))


@_without_l1
def _fused_della_linear(ctx: TensorContext, p: dict) -> Plan:
    return _task_plan(p, _della_keep(p))


_TIES_PARAMS = (WEIGHT, DENSITY, LAMBDA)
# Sampled independently, any density and epsilon in these ranges keep 0 < d - eps and d + eps <= 1.
_DELLA_RANGES = (("density", (0.2, 0.85)), ("epsilon", (0.01, 0.15)))

for _spec in (
    MethodSpec("linear", (WEIGHT, normalize(True)), _linear, needs_base=False, mergekit="linear", reads_sources=True,
               fused=_fused_linear, summary="weighted average of the models (model soup)"),
    MethodSpec("task_arithmetic", (WEIGHT, LAMBDA, normalize(False)), _task_arithmetic, mergekit="task_arithmetic",
               fused=_fused_task_arithmetic, summary="base + lambda * sum of weighted task vectors"),
    MethodSpec("slerp", (SLERP_T,), _slerp, min_sources=1, max_sources=1, mergekit="slerp", fused=_fused_slerp,
               reads_sources=True,
               summary="spherical interpolation between the base and one source"),
    MethodSpec("ties", _TIES_PARAMS + (normalize(True),), _ties, magnitude_ranks=True, mergekit="ties",
               fused=_fused_ties, summary="trim small entries, elect a sign, average the agreeing entries"),
    MethodSpec("breadcrumbs", _TIES_PARAMS + (GAMMA, normalize(False)), _breadcrumbs, magnitude_ranks=True,
               mergekit="breadcrumbs", fused=_fused_breadcrumbs,
               summary="drop outliers and small entries, then task arithmetic"),
    MethodSpec("breadcrumbs_ties", _TIES_PARAMS + (GAMMA, normalize(False)), _breadcrumbs_ties,
               magnitude_ranks=True, mergekit="breadcrumbs_ties", fused=_fused_breadcrumbs_ties,
               summary="breadcrumbs trim, then TIES sign election"),
    MethodSpec("dare_linear", _TIES_PARAMS + (RESCALE, normalize(False)), _dare_linear, stochastic=True,
               fused=_fused_dare_linear, summary="random drop with rescale, then task arithmetic"),
    MethodSpec("dare_ties", _TIES_PARAMS + (RESCALE, normalize(False)), _dare_ties, stochastic=True,
               fused=_fused_dare_ties, summary="random drop with rescale, then TIES sign election"),
    MethodSpec("della", _TIES_PARAMS + (EPSILON, RESCALE, normalize(True)), _della, stochastic=True,
               row_ranks=True, search_ranges=_DELLA_RANGES, fused=_fused_della,
               summary="magnitude-ranked random drop, then TIES sign election"),
    MethodSpec("della_linear", _TIES_PARAMS + (EPSILON, RESCALE, normalize(False)), _della_linear,
               stochastic=True, row_ranks=True, search_ranges=_DELLA_RANGES, fused=_fused_della_linear,
               summary="magnitude-ranked random drop, then task arithmetic"),
    MethodSpec("model_stock", (FILTER_WISE,), _model_stock, min_sources=2, mergekit="model_stock", reads_sources=True,
               summary="interpolate base and source mean by the task vectors' angle (per tensor, or per row)"),
):
    REGISTRY.register(_spec)
