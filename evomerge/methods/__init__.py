"""Merge techniques: pure tensor functions with declared parameter specs, in one registry.

>>> from evomerge.methods import merge_tensors
>>> merged = merge_tensors("ties", base, [x1, x2], weight=[1.0, 0.5], density=0.3)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from . import library, selective, spherical  # noqa: F401 - register the methods
from .base import REGISTRY, MethodSpec, ParamSpec
from .context import DENSITY_GRID, GAMMA_GRID, TensorContext

__all__ = ["REGISTRY", "MethodSpec", "ParamSpec", "TensorContext", "merge_tensors", "resolve", "get_method",
           "DENSITY_GRID", "GAMMA_GRID"]


def get_method(name: str) -> MethodSpec:
    return REGISTRY.get(name)


def resolve(spec: MethodSpec, shared: Mapping[str, object], per_source: Mapping[str, Sequence[float]], *, k: int,
            device: torch.device | str, dtype: torch.dtype) -> dict[str, object]:
    """The `p` dict a method's apply() reads: defaults filled, per-source values as (K,) tensors
    and, under "exact", as Python floats (keep counts int(d N) must not see float32 rounding)."""
    out: dict[str, object] = {}
    for param in spec.shared_params:
        out[param.name] = shared.get(param.name, param.default)
    exact: dict[str, tuple[float, ...]] = {}
    for param in spec.source_params:
        exact[param.name] = tuple(float(v) for v in per_source.get(param.name, [param.default] * k))
        out[param.name] = torch.tensor(exact[param.name], dtype=dtype, device=device)
    out["exact"] = exact
    return out


def merge_tensors(method: str, base: torch.Tensor | None, sources: Sequence[torch.Tensor], *, seed: int = 0,
                  name: str = "tensor", **params: object) -> torch.Tensor:
    """Merge one tensor. Per-source parameters take a scalar or one value per source.

    Validation is the recipe's job; this is the bare function, in float32 (float64 for
    float64 inputs), returned in the base's dtype (the first source's without a base).
    """
    spec = REGISTRY.get(method)
    sources = list(sources)
    anchor = base if base is not None else sources[0]
    ctx = TensorContext.one_off(anchor, sources, name=name, seed=seed)
    shared = {p.name: params[p.name] for p in spec.shared_params if p.name in params}
    per_source = {}
    for p in spec.source_params:
        if p.name in params:
            value = params[p.name]
            per_source[p.name] = list(value) if isinstance(value, (list, tuple)) else [value] * len(sources)
    unknown = set(params) - {p.name for p in spec.params}
    if unknown:
        raise TypeError(f"{method} has no parameter(s) {sorted(unknown)}")
    p = resolve(spec, shared, per_source, k=len(sources), device=anchor.device, dtype=ctx.base.dtype)
    return spec.apply(ctx, p).to(anchor.dtype)
