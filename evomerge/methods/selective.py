"""mergekit 0.1.5's selective merges: sce, nearswap, arcee_fusion, ram, ramplus_tl.

Each decides per entry which task vectors take part (by their variance across sources, by their size, by
an importance score, by how many sources changed it), then adds what it keeps to the base. The arithmetic
is mergekit's, step for step and in its order, in the merge's dtype (float32, or float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import REGISTRY, MethodSpec, ParamSpec
from .context import TensorContext

SELECT_TOPK = ParamSpec("select_topk", "shared", 1.0, low=0.0, high=1.0, search=(0.1, 1.0), step=0.01,
                        help="fraction of the entries kept: those whose task vectors vary most across sources")
NEARSWAP_T = ParamSpec("t", "shared", 0.001, low=0.0, high=10.0, search=(0.0001, 0.01), step=0.0001,
                       help="entries that differ by less than t take the source's value; by d > t, t/d of it")
RAM_EPSILON = ParamSpec("epsilon", "shared", 1e-5, low=0.0, high=1.0,
                        help="a task vector entry counts as changed where its magnitude exceeds this")
RAM_R = ParamSpec("r", "shared", 0.1, low=0.0, high=10.0, search=(0.0, 1.0), step=0.01,
                  help="how much a source's unique entries are amplified by its overlap ratio")
RAM_ALPHA = ParamSpec("alpha", "shared", 0.2, low=0.0, high=10.0, search=(0.0, 1.0), step=0.01,
                      help="cap on the overlap ratio that amplifies unique entries")


def _sce(ctx: TensorContext, p: dict) -> torch.Tensor:
    """sce (select, calculate, erase): with `select_topk` s < 1, keep the int(s · n) entries whose task
    vectors vary most across the sources (population variance; n = the entries of nonzero variance; ties
    broken as torch.topk breaks them, as mergekit's); elect a sign per entry, sgn Σ_i δ_i (+ where 0) and
    erase the disagreeing entries; weight each source by its mean squared kept task vector, ω_i = mean(δ_i²)
    / Σ_j mean(δ_j²) (1/K where that sum is below 1e-6); r = b + Σ_i ω_i a_i δ_i / max(Σ_i ω_i a_i, 1e-6),
    a_i the agreement mask."""
    deltas = ctx.deltas
    density = p["select_topk"]
    if density < 1:
        deltas = deltas * _variance_mask(deltas, density).unsqueeze(0)
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agree = deltas.sign().to(deltas.dtype) == majority
    weights = deltas.square().reshape(ctx.k, -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / ctx.k if abs(total) < 1e-6 else weights / total
    weights = weights.view(-1, *([1] * (deltas.dim() - 1))) * agree
    return ctx.base + (deltas * weights).sum(dim=0) / torch.sum(weights, dim=0).clamp(min=1e-6)


def _variance_mask(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the int(density · n) entries of largest variance across the sources (n: entries of nonzero
    variance), 0 elsewhere."""
    if density <= 0:
        return torch.zeros_like(deltas[0])
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * density)
    mask = torch.zeros_like(variance)
    if k > 0:
        _, indices = torch.topk(variance.abs().view(-1), k=k, largest=True)
        mask.view(-1)[indices] = 1
    return mask


def _nearswap(ctx: TensorContext, p: dict) -> torch.Tensor:
    """nearswap: w = clamp(t / max(|b - x|, 1e-6), 0, 1) per entry; r = w x + (1 - w) b. Entries where the
    source is within t of the base take the source; farther ones move t of the way toward it."""
    base, source = ctx.base, ctx.sources[0]
    weight = (p["t"] / torch.abs(base - source).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * source + (1 - weight) * base


QUANTILES = (0.25, 0.5, 0.75)
QUANTILE_SAMPLE = 1_000_000      # mergekit's: above this many entries it estimates the quantiles from a sample


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1) of `importance`, each quantile the sorted entry at index int(q (n - 1)) (the
    index computed in float32, as mergekit computes it).

    mergekit estimates these from QUANTILE_SAMPLE entries drawn at random (with torch's global generator,
    unseeded) where a tensor has more; evomerge takes them from every entry, so its merge is the same on every run and
    equals mergekit's exactly up to that size. Above it, mergekit's estimate differs from the exact quantile
    by its sampling error: a standard error of √(q(1-q)/10⁶) ≤ 0.05 % in rank."""
    flat = importance.reshape(-1)
    positions = (torch.tensor(QUANTILES) * (flat.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, i + 1).values for i in positions)
    return median + 1.5 * (q3 - q1)


def _arcee_fusion(ctx: TensorContext, p: dict) -> torch.Tensor:
    """arcee_fusion: importance = |x - b| · KL(softmax(x) ‖ softmax(b)) per row (softmax over the last
    dimension, each + 1e-8); keep the source's change where its importance reaches median + 1.5 IQR of the
    tensor's importances (fusion_threshold): r = b + (x - b) · [importance >= threshold]."""
    base, source = ctx.base, ctx.sources[0]
    p_source = F.softmax(source, dim=-1) + 1e-8
    p_base = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p_source * torch.log(p_source / p_base), dim=-1, keepdim=True)
    importance = (source - base).abs() * kl
    mask = (importance >= fusion_threshold(importance)).float()
    return base + (source - base) * mask


def _ram_terms(ctx: TensorContext, epsilon: float) -> tuple[torch.Tensor, ...]:
    """(task vectors (K, n) with the unchanged entries zeroed, changed mask, counts, overlap, unique)."""
    flat = ctx.deltas.reshape(ctx.k, -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return flat * changed, changed, counts, counts > 1, counts == 1


def _ram(ctx: TensorContext, p: dict) -> torch.Tensor:
    """ram: an entry changed (|δ_i| > epsilon) by one source takes that change; one changed by several takes
    their mean: r = b + Σ_i δ_i [changed_i] (unique + overlap / count)."""
    kept, _, counts, overlap, unique = _ram_terms(ctx, p["epsilon"])
    merged = ((kept * unique) + (kept * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return ctx.base + merged.reshape_as(ctx.base)


def _ramplus_tl(ctx: TensorContext, p: dict) -> torch.Tensor:
    """ramplus_tl: as ram, with each source's unique changes amplified by λ_i = 1 + r · clamp(ρ_i, 0, alpha),
    ρ_i = (its changed entries others changed too) / max(its changed entries no other did, epsilon), counted
    over the tensor."""
    epsilon = p["epsilon"]
    kept, changed, counts, overlap, unique = _ram_terms(ctx, epsilon)
    shared = (changed & overlap).sum(dim=1)
    alone = (changed & unique).sum(dim=1)
    amplify = 1 + p["r"] * (shared / alone.clamp(min=epsilon)).clamp(min=0, max=p["alpha"])
    merged = ((kept * unique * amplify.unsqueeze(-1)) + (kept * overlap / counts.clamp(min=1))).sum(dim=0,
                                                                                                   keepdim=True)
    return ctx.base + merged.reshape_as(ctx.base)


for _spec in (
    MethodSpec("sce", (SELECT_TOPK,), _sce, mergekit="sce", whole_tensor=True,
               summary="keep the entries that vary most across sources, elect a sign, weight by energy"),
    MethodSpec("nearswap", (NEARSWAP_T,), _nearswap, max_sources=1, mergekit="nearswap", reads_sources=True,
               summary="take the source's value where it is near the base's, move toward it elsewhere"),
    MethodSpec("arcee_fusion", (), _arcee_fusion, max_sources=1, mergekit="arcee_fusion", whole_tensor=True,
               reads_sources=True,
               summary="keep the source's changes whose importance (size x KL) is an outlier"),
    MethodSpec("ram", (RAM_EPSILON,), _ram, mergekit="ram",
               summary="unique changes kept whole, shared ones averaged"),
    MethodSpec("ramplus_tl", (RAM_EPSILON, RAM_R, RAM_ALPHA), _ramplus_tl, mergekit="ramplus_tl",
               whole_tensor=True, summary="ram with unique changes amplified by each source's overlap ratio"),
):
    REGISTRY.register(_spec)
