"""Every merge technique of METHODS.md, as `apply(ctx, p) -> Tensor` plus its declared parameters.

`p` holds resolved values for one tensor: shared parameters as Python scalars,
per-source parameters as (K,) tensors on the tensor's device. Shared steps are
composed, not copied: `dare_ties` is the DARE mask followed by the TIES steps.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import (DENSITY, EPSILON, GAMMA, LAMBDA, REGISTRY, RESCALE, SLERP_T, WEIGHT, MethodSpec,
                   normalize)
from .context import TensorContext
from .primitives import (breadcrumbs_counts, elect_and_merge, l1_rescale, lt_mask, per_source,
                         ties_keep_count, weighted_sum)

# ---------------------------------------------------------------------------------------------
# Sparsifications: (K, *S) task vectors -> (K, *S) kept (and rescaled) task vectors


def magnitude_trim(ctx: TensorContext, density: Sequence[float]) -> torch.Tensor:
    """TIES trim: keep |delta_i| >= the k_i-th largest, k_i = max(1, int(d_i N)); d_i >= 1 keeps all."""
    taus = [0.0 if d >= 1 else ctx.kth_largest(i, ties_keep_count(d, ctx.numel))
            for i, d in enumerate(density)]
    tau = per_source(torch.tensor(taus, dtype=ctx.deltas.dtype, device=ctx.deltas.device), ctx.deltas)
    return ctx.deltas.abs().ge_(tau).mul_(ctx.deltas)      # ge_ on floats writes the 0/1 mask in place


def outlier_trim(ctx: TensorContext, density: Sequence[float], gamma: Sequence[float]) -> torch.Tensor:
    """Breadcrumbs: drop the top int(g N) magnitudes, keep the int(d N) just below them."""
    lows, highs = [], []
    for i, (d, g) in enumerate(zip(density, gamma)):
        if d >= 1:
            lows.append(0.0)
            highs.append(math.inf)
            continue
        drop, keep = breadcrumbs_counts(d, g, ctx.numel)
        lows.append(ctx.kth_largest(i, drop + keep) if keep > 0 else math.inf)
        highs.append(ctx.kth_largest(i, drop) if drop > 0 else math.inf)
    like = ctx.deltas
    low = per_source(torch.tensor(lows, dtype=like.dtype, device=like.device), like)
    high = per_source(torch.tensor(highs, dtype=like.dtype, device=like.device), like)
    mag = like.abs()
    keep = lt_mask(mag, high)
    return mag.ge_(low).mul_(keep).mul_(like)


def _rescaled(ctx: TensorContext, keep: torch.Tensor, inverse: torch.Tensor, rescale: str) -> torch.Tensor:
    """`keep` is a 0/1 float mask."""
    kept = keep.mul_(ctx.deltas)
    if rescale == "inverse":
        return kept.mul_(inverse)
    if rescale == "l1":
        return l1_rescale(ctx.deltas, kept, ctx.l1())
    return kept


def dare_drop(ctx: TensorContext, density: torch.Tensor, rescale: str) -> torch.Tensor:
    """DARE: keep each entry with probability d_i (u < d_i on the seeded field); rescale."""
    d = per_source(density, ctx.deltas)
    if bool((density >= 1).all()):
        return ctx.deltas
    keep = lt_mask(ctx.uniform(), d)              # u in [0, 1): a density >= 1 keeps every entry
    return _rescaled(ctx, keep, 1.0 / torch.clamp(d, max=1.0), rescale)


def della_drop(ctx: TensorContext, density: torch.Tensor, epsilon: torch.Tensor, rescale: str) -> torch.Tensor:
    """DELLA: keep with probability p = d - eps + 2 eps q, q the per-row magnitude rank; rescale by 1/p."""
    d = per_source(density, ctx.deltas)
    e = per_source(epsilon, ctx.deltas)
    p = d - e + 2.0 * e * ctx.ranks()
    keep = lt_mask(ctx.uniform(), p)
    return _rescaled(ctx, keep, 1.0 / p, rescale)


# ---------------------------------------------------------------------------------------------
# Methods


def _linear(ctx: TensorContext, p: dict) -> torch.Tensor:
    w = p["weight"]
    merged = torch.tensordot(w, ctx.deltas, dims=([0], [0]))
    if p["normalize"]:
        return ctx.base + merged / w.sum()
    return w.sum() * ctx.base + merged


def _task_arithmetic(ctx: TensorContext, p: dict) -> torch.Tensor:
    return weighted_sum(ctx.base, ctx.deltas, p["weight"], lam=p["lambda"], normalize=p["normalize"])


def _slerp_coefficients(ctx: TensorContext) -> tuple[float, float]:
    """(norm-free cosine, angle) between base and source, on the whole flattened tensors."""
    v0 = ctx.base.reshape(-1)
    v1 = (ctx.base + ctx.deltas[0]).reshape(-1)
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    u0 = v0 / n0 if n0 > 1e-8 else v0
    u1 = v1 / n1 if n1 > 1e-8 else v1
    dot = float(torch.clamp(torch.dot(u0, u1), -1.0, 1.0))
    return dot, math.acos(dot)


def _slerp(ctx: TensorContext, p: dict) -> torch.Tensor:
    t = p["t"]
    dot, theta = ctx.stat("slerp", _slerp_coefficients)
    if abs(dot) > 0.9995:
        c0, c1 = 1.0 - t, t
    else:
        c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (c0 + c1) * ctx.base + c1 * ctx.deltas[0]


def _ties(ctx: TensorContext, p: dict) -> torch.Tensor:
    trimmed = magnitude_trim(ctx, p["exact"]["density"])
    return elect_and_merge(ctx.base, trimmed.mul_(per_source(p["weight"], trimmed)), p["weight"],
                           lam=p["lambda"], normalize=p["normalize"])


def _breadcrumbs(ctx: TensorContext, p: dict) -> torch.Tensor:
    trimmed = outlier_trim(ctx, p["exact"]["density"], p["exact"]["gamma"])
    return weighted_sum(ctx.base, trimmed, p["weight"], lam=p["lambda"], normalize=p["normalize"])


def _breadcrumbs_ties(ctx: TensorContext, p: dict) -> torch.Tensor:
    trimmed = outlier_trim(ctx, p["exact"]["density"], p["exact"]["gamma"])
    return elect_and_merge(ctx.base, trimmed * per_source(p["weight"], trimmed), p["weight"],
                           lam=p["lambda"], normalize=p["normalize"])


def _dare_linear(ctx: TensorContext, p: dict) -> torch.Tensor:
    kept = dare_drop(ctx, p["density"], p["rescale"])
    return weighted_sum(ctx.base, kept, p["weight"], lam=p["lambda"], normalize=p["normalize"])


def _dare_ties(ctx: TensorContext, p: dict) -> torch.Tensor:
    kept = dare_drop(ctx, p["density"], p["rescale"])
    return elect_and_merge(ctx.base, kept * per_source(p["weight"], kept), p["weight"],
                           lam=p["lambda"], normalize=p["normalize"])


def _della(ctx: TensorContext, p: dict) -> torch.Tensor:
    kept = della_drop(ctx, p["density"], p["epsilon"], p["rescale"])
    return elect_and_merge(ctx.base, kept * per_source(p["weight"], kept), p["weight"],
                           lam=p["lambda"], normalize=p["normalize"])


def _della_linear(ctx: TensorContext, p: dict) -> torch.Tensor:
    kept = della_drop(ctx, p["density"], p["epsilon"], p["rescale"])
    return weighted_sum(ctx.base, kept, p["weight"], lam=p["lambda"], normalize=p["normalize"])


def _model_stock_ratio(ctx: TensorContext) -> float:
    flat = ctx.deltas.reshape(ctx.k, -1)
    norms = torch.linalg.vector_norm(flat, dim=1)
    cosines = []
    for i in range(ctx.k):
        for j in range(i + 1, ctx.k):
            denom = torch.clamp(norms[i] * norms[j], min=1e-6)
            cosines.append(torch.clamp(torch.dot(flat[i], flat[j]) / denom, -1.0, 1.0))
    cos = float(torch.stack(cosines).mean())
    denominator = 1 + (ctx.k - 1) * cos
    return 0.0 if abs(denominator) < 1e-6 else ctx.k * cos / denominator


def _model_stock(ctx: TensorContext, p: dict) -> torch.Tensor:
    t = ctx.stat("model_stock", _model_stock_ratio)
    return ctx.base + t * ctx.deltas.mean(dim=0)


_TIES_PARAMS = (WEIGHT, DENSITY, LAMBDA)
# Sampled independently, any density and epsilon in these ranges keep 0 < d - eps and d + eps <= 1.
_DELLA_RANGES = (("density", (0.2, 0.85)), ("epsilon", (0.01, 0.15)))

for _spec in (
    MethodSpec("linear", (WEIGHT, normalize(True)), _linear, needs_base=False, mergekit="linear",
               summary="weighted average of the models (model soup)"),
    MethodSpec("task_arithmetic", (WEIGHT, LAMBDA, normalize(False)), _task_arithmetic, mergekit="task_arithmetic",
               summary="base + lambda * sum of weighted task vectors"),
    MethodSpec("slerp", (SLERP_T,), _slerp, min_sources=1, max_sources=1, mergekit="slerp",
               summary="spherical interpolation between the base and one source"),
    MethodSpec("ties", _TIES_PARAMS + (normalize(True),), _ties, magnitude_ranks=True, mergekit="ties",
               summary="trim small entries, elect a sign, average the agreeing entries"),
    MethodSpec("breadcrumbs", _TIES_PARAMS + (GAMMA, normalize(False)), _breadcrumbs, magnitude_ranks=True,
               mergekit="breadcrumbs", summary="drop outliers and small entries, then task arithmetic"),
    MethodSpec("breadcrumbs_ties", _TIES_PARAMS + (GAMMA, normalize(False)), _breadcrumbs_ties,
               magnitude_ranks=True, mergekit="breadcrumbs_ties",
               summary="breadcrumbs trim, then TIES sign election"),
    MethodSpec("dare_linear", _TIES_PARAMS + (RESCALE, normalize(False)), _dare_linear, stochastic=True,
               summary="random drop with rescale, then task arithmetic"),
    MethodSpec("dare_ties", _TIES_PARAMS + (RESCALE, normalize(False)), _dare_ties, stochastic=True,
               summary="random drop with rescale, then TIES sign election"),
    MethodSpec("della", _TIES_PARAMS + (EPSILON, RESCALE, normalize(True)), _della, stochastic=True,
               row_ranks=True, search_ranges=_DELLA_RANGES, summary="magnitude-ranked random drop, then TIES sign election"),
    MethodSpec("della_linear", _TIES_PARAMS + (EPSILON, RESCALE, normalize(False)), _della_linear,
               stochastic=True, row_ranks=True, search_ranges=_DELLA_RANGES, summary="magnitude-ranked random drop, then task arithmetic"),
    MethodSpec("model_stock", (), _model_stock, min_sources=2, mergekit="model_stock",
               summary="interpolate base and source mean by the task vectors' angle (no parameters)"),
):
    REGISTRY.register(_spec)
