"""The low-rank fast path: linear-in-δ merges of LoRA adapters without dense task vectors.

Where every source is an adapter, a tensor's task vectors are δ_i = L_i · R_i (L_i = s_i·B_i, or the
transpose's factors: evomerge.adapters). A method that is linear in the δ_i writes

    out = c_0 · W0 + Σ_i c_i · L_i · R_i  =  c_0 · W0 + [c_1 L_1 … c_K L_K] · [R_1; …; R_K]

as one GEMM over the concatenated factors (METHODS.md), so what stays resident is the base and the
factors, r·(m+n) numbers per adapter and module instead of m·n. `COEFFICIENTS` holds, per method, its
(c_0, c_i) in mergekit's formulas; any other method needs the dense task vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .primitives import task_divisor, weight_sum

Pair = tuple[torch.Tensor, torch.Tensor]     # (left, right): δ = left @ right, in the arithmetic's dtype


def _task_arithmetic(p: dict) -> tuple[float, torch.Tensor]:
    """b + λ Σ w_i δ_i / divisor."""
    return 1.0, p["weight"] * (p["lambda"] / task_divisor(p["weight"], p["normalize"]))


def _linear(p: dict) -> tuple[float, torch.Tensor]:
    """Σ w_i x_i / Σ w_i (normalize) = b Σ w_i / Σ w_i + Σ w_i δ_i / Σ w_i."""
    w = p["weight"]
    divisor = weight_sum(w) if p["normalize"] else 1.0
    return weight_sum(w) / divisor, w / divisor


COEFFICIENTS: dict[str, Callable[[dict], tuple[float, torch.Tensor]]] = {
    "task_arithmetic": _task_arithmetic,
    "linear": _linear,
}


def concatenated(coefficients: list[float], factors: list[Pair | None]) -> Pair | None:
    """Σ_i c_i · L_i · R_i as one pair: ([c_1 L_1 … c_K L_K], [R_1; …; R_K]) over the factors that are there;
    None where there are none."""
    reached = [(c, pair) for c, pair in zip(coefficients, factors) if pair is not None]
    if not reached:
        return None
    return torch.cat([pair[0] * c for c, pair in reached], dim=1), torch.cat([pair[1] for _, pair in reached], dim=0)


@dataclass
class LowRankContext:
    """One tensor of a merge over adapters: the anchor as stored and each source's factors (None: δ_i = 0)."""

    name: str
    anchor: torch.Tensor
    factors: list[Pair | None]
    dtype: torch.dtype = torch.float32        # the arithmetic's

    @property
    def k(self) -> int:
        return len(self.factors)

    @property
    def numel(self) -> int:
        return self.anchor.numel()

    def delta(self, index: int) -> torch.Tensor:
        """Task vector `index`, dense (formed on each call)."""
        pair = self.factors[index]
        if pair is None:
            return torch.zeros(self.anchor.shape, dtype=self.dtype, device=self.anchor.device)
        return pair[0] @ pair[1]

    def inner(self, index: int, grad: torch.Tensor) -> float:
        """⟨grad, δ_index⟩ = tr(Lᵀ · grad · Rᵀ), without forming δ."""
        pair = self.factors[index]
        if pair is None:
            return 0.0
        left, right = pair
        return float(((grad.view(self.anchor.shape).to(self.dtype) @ right.T) * left).sum())

    def write(self, method: str, p: dict, out: torch.Tensor) -> torch.Tensor | None:
        """The merge into `out`; returns a sum of what was written for the finiteness check (None: `out` is
        the anchor, unchanged, checked finite when it was read)."""
        base_scale, coefficients = COEFFICIENTS[method](p)
        product = concatenated(coefficients.tolist(), self.factors)
        if product is None:
            if base_scale == 1.0:
                out.copy_(self.anchor)
                return None
            merged = self.anchor.to(self.dtype) * base_scale
        else:
            left, right = product
            if self.anchor.dtype == self.dtype and out.dtype == self.dtype:
                return torch.addmm(self.anchor, left, right, beta=base_scale, out=out).sum()
            # the anchor upcast, then the GEMM accumulating into it: 3x faster than adding a bf16 anchor to the
            # product (a mixed-dtype add is not vectorized)
            merged = self.anchor.to(self.dtype, copy=True).addmm_(left, right, beta=base_scale)
        out.copy_(merged)
        # bf16 has float32's range: a finite float32 sum stays finite; fp16 may overflow in the copy
        return (out if out.dtype == torch.float16 else merged).sum()
