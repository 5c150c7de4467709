"""mergekit 0.1.5's spherical merges: nuslerp, multislerp, karcher.

Each interpolates on a hypersphere over the whole tensor (its norms span every entry), so each runs on the
whole tensor, never in chunks. The arithmetic is mergekit's, step for step and in its order, in the merge's
dtype (float32, or float64): the same operations on the same values give the same tensor.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .base import REGISTRY, WEIGHT, MethodSpec, ParamSpec
from .context import TensorContext

ROW_WISE = ParamSpec("nuslerp_row_wise", "shared", False, choices=(True, False),
                     help="interpolate the columns (dimension 0) as separate vectors instead of the rows")
FLATTEN = ParamSpec("nuslerp_flatten", "shared", True, choices=(True, False),
                    help="interpolate the whole tensor as one vector (else each row, or column, on its own)")
NORMALIZE_WEIGHTS = ParamSpec("normalize_weights", "shared", True, choices=(True, False),
                              help="divide the weights by their sum")
SPHERE_EPS = ParamSpec("eps", "shared", 1e-8, low=0.0, high=1e-2, help="floor of the norms divided by")
MAX_ITER = ParamSpec("max_iter", "shared", 10, low=1, high=1000, integer=True,
                     help="most steps of the Karcher mean's fixed-point iteration")
TOL = ParamSpec("tol", "shared", 1e-5, low=0.0, high=1.0, low_open=True,
                help="the iteration stops once its step is shorter; a smaller norm counts as zero")


def spherical_interpolation(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, flatten: bool = False,
                            eps: float = 1e-8) -> torch.Tensor:
    """slerp of each vector along `dim` (of the whole tensor with `flatten`) from v0 (t = 0) to v1 (t = 1):
    u = v / max(‖v‖, 1e-7); cos θ = clamp(u0·u1, -1, 1); r = (sin((1-t)θ) v0 + sin(tθ) v1) / sin θ, or
    (1-t) v0 + t v1 where 1 - cos²θ <= eps² (parallel or opposite vectors). On the original vectors: their
    lengths interpolate too."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    unit0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    unit1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(unit0 * unit1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def _nuslerp(ctx: TensorContext, p: dict) -> torch.Tensor:
    """nuslerp: the two task vectors interpolated on the sphere at t = w_1 / (w_0 + w_1) (t = 1/2 where
    |w_0 + w_1| < 1e-6), added to the base: r = b + slerp(t, δ_0, δ_1). `nuslerp_flatten` (default) takes
    the whole tensor as one vector; otherwise each row, or with `nuslerp_row_wise` each column."""
    w0, w1 = p["exact"]["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    deltas = ctx.deltas
    return ctx.base + spherical_interpolation(t, deltas[0], deltas[1], dim=0 if p["nuslerp_row_wise"] else -1,
                                              flatten=p["nuslerp_flatten"])


def _multislerp(ctx: TensorContext, p: dict) -> torch.Tensor:
    """multislerp: a weighted mean of the task vectors on the unit sphere, scaled to their mean length.

    With w normalized to sum 1 (`normalize_weights`), u_i = δ_i / (‖δ_i‖ + eps) and the direction
    m = Σ w_i u_i / ‖Σ w_i u_i‖: each u_i goes to the tangent plane at m, g_i = u_i - (u_i·m) m; the
    weighted tangent g = Σ w_i g_i returns to the sphere by the exponential map,
    s = m cos ‖g‖' + g sin ‖g‖' / ‖g‖' with ‖g‖' = ‖g‖ + eps; r = b + (Σ w_i ‖δ_i‖) s. Where
    ‖Σ w_i u_i‖ < eps, two sources fall back to b + w_0 δ_0 + w_1 δ_1 and more are an error. One source
    is that source."""
    if ctx.k == 1:
        return ctx.sources[0]
    deltas = ctx.deltas
    flat = deltas.reshape(ctx.k, -1)
    eps = p["eps"]
    weights = p["weight"].to(flat.dtype)
    if p["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if ctx.k == 2:
            return (deltas[0] * weights[0] + deltas[1] * weights[1]).view(ctx.base.shape) + ctx.base
        raise InputError(f"multislerp: the weighted mean of the task vectors of '{ctx.name}' is zero",
                         field="parameters.weight", fix="weights that do not cancel opposite task vectors")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * weights).sum()
    return result.view(ctx.base.shape) + ctx.base


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], *, max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher (Fréchet) mean of the directions of `tensors`, scaled by Σ α_i ‖x_i‖.

    Directions u_i = x_i / ‖x_i‖ of the tensors longer than `tol`, their weights renormalized to sum 1
    (a: those α_i / Σ α_i); start from m = Σ a_i u_i / ‖·‖ (u_0 if that is shorter than tol); then up to
    `max_iter` times: θ_i = acos(clamp(m·u_i, -1, 1)), the tangent g = Σ_{θ_i >= tol} a_i θ_i / sin θ_i
    (u_i - (m·u_i) m); stop once ‖g‖ < tol, else m = m cos ‖g‖ + g sin ‖g‖ / ‖g‖, renormalized. Zero where
    every tensor is shorter than tol."""
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor)
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else tensor / norm)
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for weight, unit in zip(weights, valid_units):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = valid_units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def _karcher(ctx: TensorContext, p: dict) -> torch.Tensor:
    """karcher: the Karcher mean of the models themselves (not task vectors), equal weights 1/K; list the base
    among the sources to include it, as mergekit does when its config names a base_model."""
    sources = ctx.sources
    return karcher_mean([sources[i] for i in range(ctx.k)], [1.0 / ctx.k] * ctx.k, max_iter=int(p["max_iter"]),
                        tol=p["tol"])


_NUSLERP_WEIGHT = (("weight", (0.0, 1.0)),)     # only the ratio w_1 / (w_0 + w_1) matters

for _spec in (
    MethodSpec("nuslerp", (WEIGHT, ROW_WISE, FLATTEN), _nuslerp, min_sources=2, max_sources=2, mergekit="nuslerp",
               whole_tensor=True, search_ranges=_NUSLERP_WEIGHT,
               summary="spherical interpolation of two task vectors, weighted"),
    MethodSpec("multislerp", (WEIGHT, NORMALIZE_WEIGHTS, SPHERE_EPS), _multislerp, mergekit="multislerp",
               whole_tensor=True, reads_sources=True,
               summary="weighted mean of the task vectors on the sphere (any number)"),
    MethodSpec("karcher", (MAX_ITER, TOL), _karcher, needs_base=False, min_sources=2, mergekit="karcher",
               whole_tensor=True, reads_sources=True,
               summary="Karcher mean of the models on the sphere (no weights)"),
):
    REGISTRY.register(_spec)
