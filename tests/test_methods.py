"""Merge methods: a conformance suite over the registry, golden numbers from METHODS.md, and the
statistics and reproducibility of the stochastic methods.

The references below are written straight from METHODS.md with Python floats, loops and sorting;
they share no code with evomerge.methods.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from evomerge.methods import REGISTRY, merge_tensors
from evomerge.methods.primitives import kth_largest_many

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

METHODS = REGISTRY.names()
# the methods of METHODS.md, whose conformance properties (one-hot weights, equal weights give the mean,
# task vectors scale) these tests check; mergekit's other methods: tests/test_methods_mergekit.py
METHODS_MD = ["linear", "task_arithmetic", "slerp", "ties", "dare_linear", "dare_ties", "breadcrumbs",
              "breadcrumbs_ties", "della", "della_linear", "model_stock"]
MERGEKIT_ONLY = ["nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]
STOCHASTIC = [m.name for m in REGISTRY if m.stochastic]
DETERMINISTIC = [m.name for m in REGISTRY if not m.stochastic]
WEIGHTED = [m.name for m in REGISTRY if "weight" in {p.name for p in m.params}]
DENSITY_METHODS = [m.name for m in REGISTRY if "density" in {p.name for p in m.params}]
TIES_LIKE = {"ties", "dare_ties", "breadcrumbs_ties", "della"}

# Z bound for the statistical checks: the seeds are fixed, so each check is deterministic, but the bound
# is chosen so that an honest implementation fails it with probability < 1e-3 even after a Bonferroni
# correction over all entries tested (P(|Z| > 5) = 5.7e-7 per comparison).
Z = 5.0


# ------------------------------------------------------------------------------------------------
# Inputs and parameters


def family(k: int = 3, shape: tuple[int, ...] = (8, 12), *, dtype: torch.dtype = torch.float32, seed: int = 0,
           scale: float = 0.1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    sources = [base + scale * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(k)]
    return base.to(dtype), [s.to(dtype) for s in sources]


def valid_params(method: str, k: int, **overrides: object) -> dict[str, object]:
    """Parameters every method accepts for k sources (values inside every constraint)."""
    spec = REGISTRY.get(method)
    names = {p.name for p in spec.params}
    params: dict[str, object] = {}
    if "weight" in names:
        params["weight"] = [0.6 + 0.2 * i for i in range(k)]
    if "density" in names:
        params["density"] = 0.5
    if "t" in names:
        params["t"] = 0.3
    params.update(overrides)
    return params


def sources_for(method: str) -> int:
    """3 sources, or as many as the method takes."""
    spec = REGISTRY.get(method)
    return min(max(3, spec.min_sources), spec.max_sources or 3)


def flat(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().reshape(-1).tolist()]


def close(actual: torch.Tensor, expected: list[float] | torch.Tensor, *, tol: float = 1e-12) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64).reshape(actual.shape)
    torch.testing.assert_close(actual.double(), expected_t, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# References, straight from METHODS.md (Python floats, float64)


def ref_linear(xs: list[list[float]], w: list[float], normalize: bool = True) -> list[float]:
    out = [sum(wi * x[j] for wi, x in zip(w, xs)) for j in range(len(xs[0]))]
    return [v / sum(w) for v in out] if normalize else out


def ref_task_arithmetic(b: list[float], deltas: list[list[float]], w: list[float], lam: float = 1.0,
                        normalize: bool = False) -> list[float]:
    out = []
    for j in range(len(b)):
        total = sum(wi * d[j] for wi, d in zip(w, deltas))
        if normalize:
            total /= sum(w)
        out.append(b[j] + lam * total)
    return out


def ref_slerp(v0: list[float], v1: list[float], t: float) -> list[float]:
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v] if norm > 1e-8 else list(v)

    dot = max(-1.0, min(1.0, sum(a * b for a, b in zip(unit(v0), unit(v1)))))
    if abs(dot) > 0.9995:
        return [(1 - t) * a + t * b for a, b in zip(v0, v1)]
    theta = math.acos(dot)
    c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return [c0 * a + c1 * b for a, b in zip(v0, v1)]


def ref_ties_trim(delta: list[float], d: float) -> list[float]:
    if d >= 1:
        return list(delta)
    k = max(1, int(d * len(delta)))
    tau = sorted((abs(v) for v in delta), reverse=True)[k - 1]
    return [v if abs(v) >= tau else 0.0 for v in delta]


def ref_breadcrumbs_trim(delta: list[float], d: float, gamma: float) -> list[float]:
    n = len(delta)
    keep = int(d * n)
    drop = min(int(gamma * n), n - keep)      # mergekit: the outlier drop shrinks when density needs the room
    descending = sorted(range(n), key=lambda j: abs(delta[j]), reverse=True)
    kept = set(descending[drop:drop + keep])
    return [v if j in kept else 0.0 for j, v in enumerate(delta)]


def ref_ties_merge(b: list[float], trimmed: list[list[float]], w: list[float], lam: float = 1.0,
                   normalize: bool = True) -> list[float]:
    """TIES steps 2-5 on trimmed task vectors."""
    out = []
    for j in range(len(b)):
        weighted = [wi * t[j] for wi, t in zip(w, trimmed)]
        sign = 1.0 if sum(weighted) >= 0 else -1.0
        agree = [x != 0 and math.copysign(1.0, x) == sign for x in weighted]
        merged = sum(x for x, a in zip(weighted, agree) if a)
        if normalize:
            divisor = sum(wi for wi, a in zip(w, agree) if a)
            merged /= divisor if divisor != 0 else 1.0
        out.append(b[j] + lam * merged)
    return out


def ref_model_stock(b: list[float], xs: list[list[float]]) -> tuple[float, list[float]]:
    deltas = [[x[j] - b[j] for j in range(len(b))] for x in xs]
    k = len(deltas)
    norms = [math.sqrt(sum(v * v for v in d)) for d in deltas]
    cosines = [sum(p * q for p, q in zip(deltas[i], deltas[j])) / max(norms[i] * norms[j], 1e-6)
               for i in range(k) for j in range(i + 1, k)]
    cos = max(-1.0, min(1.0, sum(cosines) / len(cosines)))
    denominator = 1 + (k - 1) * cos
    t = 0.0 if abs(denominator) < 1e-6 else k * cos / denominator
    mean = [sum(x[j] for x in xs) / k for j in range(len(b))]
    return t, [t * m + (1 - t) * bj for m, bj in zip(mean, b)]


def ref_della_p(delta: torch.Tensor, d: float, eps: float) -> list[float]:
    """Keep probability per entry: rows of a 2-D tensor (a 1-D tensor is one row), q = rank / (n - 1)."""
    rows = [flat(delta)] if delta.dim() == 1 else [flat(r) for r in delta]
    p = []
    for row in rows:
        n = len(row)
        ascending = sorted(range(n), key=lambda j: abs(row[j]))
        q = [0.0] * n
        for rank, j in enumerate(ascending):
            q[j] = rank / (n - 1)
        p.extend(d - eps + 2 * eps * qj for qj in q)
    return p


def distinct_magnitudes(n: int, *, seed: int = 0, step: float = 1 / 16) -> torch.Tensor:
    """n entries with magnitudes step*1..step*n in random order and random signs (no ties, exact in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    mags = (torch.randperm(n, generator=gen) + 1).double() * step
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    return mags * signs


# ------------------------------------------------------------------------------------------------
# Conformance, over the registry


def test_registry_holds_every_method_of_methods_md():
    assert sorted(METHODS) == sorted(METHODS_MD + MERGEKIT_ONLY)


@pytest.mark.parametrize("method", METHODS_MD)
def test_one_hot_returns_that_source(method):
    base, xs = family(sources_for(method))
    if method == "slerp":
        torch.testing.assert_close(merge_tensors(method, base, xs, t=1.0), xs[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merge_tensors(method, base, xs, t=0.0), base, rtol=1e-6, atol=1e-6)
        return
    if method == "model_stock":  # no weights: identical sources are each 'the' source (cos = 1, t = 1)
        torch.testing.assert_close(merge_tensors(method, base, [xs[1]] * 3), xs[1], rtol=1e-6, atol=1e-6)
        return
    params = valid_params(method, 3, weight=[0.0, 1.0, 0.0])
    if method.startswith("della"):
        # density 1 is outside della's range: one-hot gives source 1's pruned task vector, whatever the others hold
        got = merge_tensors(method, base, xs, seed=5, **params)
        others = [base + 3.0 * (xs[0] - base), xs[1], base - (xs[2] - base)]
        assert torch.equal(got, merge_tensors(method, base, others, seed=5, **params))
        kept = got != base
        assert 0 < int(kept.sum()) < base.numel()
        ratio = (got - base)[kept] / (xs[1] - base)[kept]
        assert bool((ratio >= 1 - 1e-5).all())    # kept entries are rescaled by 1/p >= 1
        return
    if method in DENSITY_METHODS:
        params["density"] = 1.0
    torch.testing.assert_close(merge_tensors(method, base, xs, **params), xs[1], rtol=1e-6, atol=1e-6)


DENSE_EQUIVALENT = {"dare_linear": "task_arithmetic", "breadcrumbs": "task_arithmetic",
                    "dare_ties": "ties", "breadcrumbs_ties": "ties"}


@pytest.mark.parametrize("method", [m for m in DENSITY_METHODS])
@pytest.mark.parametrize("normalize", [True, False])
def test_density_one_is_the_dense_method(method, normalize):
    if method.startswith("della"):
        pytest.skip("della requires density + epsilon <= 1 with epsilon > 0: density 1 is not a della recipe")
    base, xs = family(3)
    w = [0.9, -0.4, 1.3]
    got = merge_tensors(method, base, xs, weight=w, density=1.0, normalize=normalize, **{"lambda": 0.8})
    if method == "ties":  # TIES with nothing trimmed: the reference's steps 2-5 on the whole task vectors
        b = flat(base)
        expected = ref_ties_merge(b, [[v - bj for v, bj in zip(flat(x), b)] for x in xs], w, 0.8, normalize)
        close(got, expected, tol=1e-5)
        return
    dense = merge_tensors(DENSE_EQUIVALENT[method], base, xs, weight=w, normalize=normalize,
                          **({"density": 1.0} if DENSE_EQUIVALENT[method] == "ties" else {}), **{"lambda": 0.8})
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS_MD)
def test_equal_weights_give_the_mean(method):
    if method.startswith("della"):
        pytest.skip("della drops entries at every valid density; its mean holds in expectation "
                    "(test_della_expectation_and_keep_probability)")
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=gen)
    if method == "slerp":  # a parallel pair takes the linear fallback: t = 1/2 is the mean
        source = 1.5 * base
        torch.testing.assert_close(merge_tensors(method, base, [source], t=0.5), (base + source) / 2)
        return
    # task vectors that agree in sign everywhere, so sign election keeps every entry
    direction = torch.rand(6, 5, generator=gen) + 0.1
    xs = [base + c * direction * (1 + 0.3 * torch.rand(6, 5, generator=gen)) for c in (0.5, 1.0, 2.0)]
    mean = torch.stack(xs).mean(0)
    if method == "model_stock":  # parallel task vectors: cos = 1, t = 1, r = mean of the sources
        xs = [base + c * direction for c in (0.5, 1.0, 2.0)]
        torch.testing.assert_close(merge_tensors(method, base, xs), torch.stack(xs).mean(0))
        return
    params = {"weight": 0.7}
    if method in DENSITY_METHODS:
        params["density"] = 1.0
    if "normalize" in {p.name for p in REGISTRY.get(method).params}:
        params["normalize"] = True
    torch.testing.assert_close(merge_tensors(method, base, xs, **params), mean, rtol=1e-6, atol=1e-6)
    if method == "task_arithmetic":  # weights 1/K without normalize
        torch.testing.assert_close(merge_tensors(method, base, xs, weight=1 / 3), mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_is_kept_and_arithmetic_is_float32(method, dtype):
    base, xs = family(sources_for(method), dtype=dtype)
    params = valid_params(method, len(xs))
    got = merge_tensors(method, base, xs, seed=3, name="w", **params)
    assert got.dtype == dtype and got.shape == base.shape
    if dtype in (torch.float16, torch.bfloat16):  # computed in float32 from the upcast inputs, cast at the end
        wide = merge_tensors(method, base.float(), [x.float() for x in xs], seed=3, name="w", **params)
        assert torch.equal(got, wide.to(dtype))


@pytest.mark.parametrize("method", [m for m in METHODS_MD if m not in ("slerp", "model_stock")])
def test_float64_inputs_are_computed_in_float64(method):
    """Task vectors of 1e-9 on a base of 1 vanish in float32; in float64 the merge is the scaled merge.

    These methods are b + f(delta) with f positively homogeneous, so merging 1 + 1e-9 * delta against a
    base of ones gives 1 + 1e-9 * (merge of delta against zeros). (slerp is not homogeneous and
    model_stock's 1e-6 norm floor is not either: their float64 path is checked against the float64
    references to 1e-13 below.)
    """
    zeros, xs = family(sources_for(method), dtype=torch.float64, seed=4)
    zeros = torch.zeros_like(zeros)
    deltas = [x - x.mean() for x in xs]
    ones = torch.ones_like(zeros)
    params = valid_params(method, len(xs))
    reference = merge_tensors(method, zeros, [zeros + d for d in deltas], seed=2, name="w", **params)
    tiny = merge_tensors(method, ones, [ones + 1e-9 * d for d in deltas], seed=2, name="w", **params)
    assert tiny.dtype == torch.float64
    torch.testing.assert_close((tiny - 1) / 1e-9, reference, rtol=1e-5, atol=1e-5)
    as32 = merge_tensors(method, ones.float(), [(ones + 1e-9 * d).float() for d in deltas], seed=2, name="w", **params)
    assert torch.equal(as32, torch.ones_like(as32))   # the float32 path cannot see these task vectors


def test_float64_slerp_and_model_stock_match_the_float64_references():
    gen = torch.Generator().manual_seed(0)
    v0 = torch.randn(40, generator=gen, dtype=torch.float64)
    v1 = v0 + 0.2 * torch.randn(40, generator=gen, dtype=torch.float64)
    close(merge_tensors("slerp", v0, [v1], t=0.3), ref_slerp(flat(v0), flat(v1), 0.3), tol=1e-13)
    as32 = merge_tensors("slerp", v0.float(), [v1.float()], t=0.3).double()
    assert float((as32 - torch.tensor(ref_slerp(flat(v0), flat(v1), 0.3), dtype=torch.float64)).abs().max()) > 1e-12
    xs = [v1, v0 + 0.3 * (v1 - v0) + 0.1 * torch.randn(40, generator=gen, dtype=torch.float64)]
    close(merge_tensors("model_stock", v0, xs), ref_model_stock(flat(v0), [flat(x) for x in xs])[1], tol=1e-13)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_tensor(method):
    base, xs = family(sources_for(method))
    params = valid_params(method, len(xs))
    first = merge_tensors(method, base, xs, seed=11, name="layers.0.w", **params)
    torch.manual_seed(12345)            # global RNG state must not matter
    torch.rand(100)
    second = merge_tensors(method, base, xs, seed=11, name="layers.0.w", **params)
    assert torch.equal(first, second)


@pytest.mark.parametrize("method", METHODS)
def test_different_seed_changes_masks_only_for_stochastic_methods(method):
    base, xs = family(sources_for(method), shape=(16, 16))
    params = valid_params(method, len(xs), **({"weight": [0.0, 1.0, 0.0][:len(xs)]} if method in WEIGHTED else {}))
    a = merge_tensors(method, base, xs, seed=1, name="w", **params)
    b = merge_tensors(method, base, xs, seed=2, name="w", **params)
    if method in STOCHASTIC:
        assert not torch.equal(a != base, b != base)
        # and the tensor name is part of the seed too
        c = merge_tensors(method, base, xs, seed=1, name="v", **params)
        assert not torch.equal(a != base, c != base)
    else:
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Golden numbers, hand-checked


def test_linear_golden():
    x1, x2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    close(merge_tensors("linear", None, [x1, x2], weight=[1.0, 3.0]), [2.5, 5.0])
    close(merge_tensors("linear", None, [x1, x2], weight=[1.0, 3.0], normalize=False), [10.0, 20.0])
    # the base does not take part unless listed
    close(merge_tensors("linear", torch.tensor([100.0, 100.0]), [x1, x2], weight=[1.0, 3.0]), [2.5, 5.0])
    base, xs = family(3, dtype=torch.float64)
    w = [0.2, -0.5, 1.1]
    for normalize in (True, False):
        close(merge_tensors("linear", base, xs, weight=w, normalize=normalize),
              ref_linear([flat(x) for x in xs], w, normalize))


def test_task_arithmetic_golden_with_forgetting():
    b = torch.tensor([1.0, 1.0, 1.0])
    x1, x2 = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 3.0, -1.0])
    # b + lam * (w1 d1 + w2 d2) = 1 + 0.5 * (1 * [1, -1, 0] - 1 * [0, 2, -2])
    close(merge_tensors("task_arithmetic", b, [x1, x2], weight=[1.0, -1.0], **{"lambda": 0.5}), [1.5, -0.5, 2.0])
    close(merge_tensors("task_arithmetic", b, [x1, x2], weight=[1.0, 3.0], normalize=True), [1.25, 2.25, -0.5])
    base, xs = family(3, dtype=torch.float64)
    w = [0.5, -0.25, 1.5]
    deltas = [[v - bj for v, bj in zip(flat(x), flat(base))] for x in xs]
    close(merge_tensors("task_arithmetic", base, xs, weight=w, **{"lambda": 1.3}),
          ref_task_arithmetic(flat(base), deltas, w, 1.3))


def test_slerp_golden():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    s = math.sin(math.pi / 4)                   # theta = pi/2: sin(theta/2) / sin(theta)
    close(merge_tensors("slerp", v0, [v1], t=0.5), [s, s], tol=1e-7)
    # unnormalized tensors: the angle comes from the unit vectors, the mix uses the originals
    close(merge_tensors("slerp", 2 * v0, [3 * v1], t=0.5), [2 * s, 3 * s], tol=1e-6)
    # t = 0 is the base, t = 1 the source
    close(merge_tensors("slerp", v0, [v1], t=0.0), [1.0, 0.0], tol=1e-7)
    close(merge_tensors("slerp", v0, [v1], t=1.0), [0.0, 1.0], tol=1e-7)


def test_slerp_linear_fallback_when_nearly_parallel():
    v0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # parallel: plain linear interpolation, not a 0/0
    close(merge_tensors("slerp", v0, [3 * v0], t=0.25), [1.5, 0.0])
    # |dot| = cos(0.03) = 0.99955 > 0.9995: linear
    near = torch.tensor([math.cos(0.03), math.sin(0.03)], dtype=torch.float64)
    close(merge_tensors("slerp", v0, [near], t=0.5), [(1 + near[0].item()) / 2, near[1].item() / 2])
    # cos(0.04) = 0.9992 < 0.9995: spherical; the midpoint of two unit vectors stays on the circle
    far = torch.tensor([math.cos(0.04), math.sin(0.04)], dtype=torch.float64)
    close(merge_tensors("slerp", v0, [far], t=0.5), [math.cos(0.02), math.sin(0.02)])
    # antiparallel: |dot| = 1 also takes the linear path
    close(merge_tensors("slerp", v0, [-v0], t=0.25), [0.5, 0.0])
    # a zero tensor is used unnormalized (dot 0, theta = pi/2)
    zero = torch.zeros(2, dtype=torch.float64)
    close(merge_tensors("slerp", zero, [v0], t=0.5), [math.sin(math.pi / 4), 0.0])
    for t in (0.1, 0.5, 0.9):
        gen = torch.Generator().manual_seed(int(10 * t))
        a, c = torch.randn(30, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen, dtype=torch.float64)
        close(merge_tensors("slerp", a, [c], t=t), ref_slerp(flat(a), flat(c), t))


def test_ties_golden_by_hand():
    b = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    d1 = torch.tensor([2.0, -2.0, 2.0, 1.0, 1.0])
    d2 = torch.tensor([-1.0, -3.0, 0.5, 4.0, -2.0])
    # trim, density 0.4 of 5: k = 2
    #   d1: |d1| sorted 2, 2, 2, 1, 1 -> tau 2; the three entries tied at 2 are all kept -> [2, -2, 2, 0, 0]
    #   d2: 4, 3, 2, 1, .5 -> tau 3 -> [0, -3, 0, 4, 0], weight 0.5 -> D2 = [0, -1.5, 0, 2, 0]
    # sum [2, -3.5, 2, 2, 0] -> sign [+, -, +, +, + (0 -> +)]
    # agreeing: D1 on entries 0, 1, 2; D2 on 1, 3; entry 4 has no nonzero entry
    # normalize: divisors [1, 1.5, 1, 0.5, 1 (0 -> 1)]
    got = merge_tensors("ties", b, [b + d1, b + d2], weight=[1.0, 0.5], density=0.4)
    close(got, [3.0, 1 - 3.5 / 1.5, 3.0, 1 + 2 / 0.5, 1.0], tol=1e-6)
    got = merge_tensors("ties", b, [b + d1, b + d2], weight=[1.0, 0.5], density=0.4, normalize=False,
                        **{"lambda": 2.0})
    close(got, [5.0, -6.0, 5.0, 5.0, 1.0], tol=1e-6)


def test_ties_zero_sum_elects_plus():
    b = torch.zeros(2)
    got = merge_tensors("ties", b, [torch.tensor([1.0, -2.0]), torch.tensor([-1.0, 2.0])], weight=1.0, density=1.0)
    close(got, [1.0, 2.0])  # both sums are 0: sign +1 keeps the positive entries only


def test_ties_keep_count_is_int_of_density_times_n():
    """k = max(1, int(d N)), with d the recipe's number (0.7 * 10 = 7, even though float32(0.7) * 10 < 7)."""
    b = torch.zeros(10)
    x = torch.arange(1.0, 11.0)
    for d, kept in ((0.7, 7), (0.3, 3), (0.05, 1), (0.01, 1), (0.99, 9), (1.0, 10)):
        got = merge_tensors("ties", b, [x], weight=1.0, density=d)
        assert int((got != 0).sum()) == kept, d
        assert torch.equal(got[got != 0], x[10 - kept:])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gaussian", "integers", "zeros", "subnormal", "inf", "float64"])
@pytest.mark.parametrize("n", [1, 2, 7, 4099, 300_001])
def test_threshold_table_radix_select_equals_a_sort(n, kind, device, monkeypatch):
    """The study's threshold tables (a radix select on float bits) hold exactly the sorted order statistics."""
    import evomerge.methods.primitives

    monkeypatch.setattr(evomerge.methods.primitives, "RADIX_SLICE", 1 << 16)     # several slices
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    x = {"integers": torch.randint(0, 5, (n,), generator=gen).float(), "zeros": torch.zeros(n),
         "subnormal": x * 1e-40, "float64": x.double()}.get(kind, x)
    if kind == "inf":
        x[n // 2] = float("inf")
    magnitudes = x.abs().to(device)
    ks = sorted({max(1, int(d / 100 * n)) for d in range(1, 101)} | {1, n})
    expected = torch.sort(magnitudes.cpu(), descending=True).values[torch.tensor(ks) - 1].tolist()
    assert kth_largest_many(magnitudes, ks) == expected
    assert kth_largest_many(x.to(device), ks, absolute=True) == expected


@pytest.mark.parametrize("kind", ["gaussian", "bf16", "integers", "zeros", "float64"])
@pytest.mark.parametrize("n", [7, 4099, 300_001])
def test_top_cuts_select_the_k_largest_ties_by_position(n, kind, monkeypatch):
    """(value, cut) describes exactly the first k of a stable descending sort: by the sort (small tensors) and
    by the radix select's counts (large ones, several slices)."""
    import evomerge.methods.primitives
    from evomerge.methods.primitives import top_cuts

    monkeypatch.setattr(evomerge.methods.primitives, "RADIX_SLICE", 1 << 16)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen)
    x = {"bf16": x.bfloat16().float(), "integers": torch.randint(-4, 5, (n,), generator=gen).float(),
         "zeros": torch.zeros(n), "float64": x.double()}.get(kind, x)
    order = torch.sort(x.abs(), descending=True, stable=True).indices
    ks = sorted({max(1, int(d / 100 * n)) for d in range(1, 101, 7)} | {1, n})
    position = torch.arange(n)
    for k, (value, cut) in zip(ks, top_cuts(x, ks)):
        top = (x.abs() > value) | ((x.abs() == value) & (position < cut))
        assert torch.equal(top.nonzero().flatten(), order[:k].sort().values), (k, value, cut)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(dtype, normalize):
    b = distinct_magnitudes(60, seed=1) * 0 + 0.25
    deltas = [distinct_magnitudes(60, seed=s) for s in (2, 3, 4)]
    w, d = [1.0, -0.6, 0.8], [0.3, 0.55, 0.123]      # 0.123 is off the 0.01 grid: exact on-demand threshold
    got = merge_tensors("ties", b.to(dtype), [(b + x).to(dtype) for x in deltas], weight=w, density=d,
                        normalize=normalize, **{"lambda": 1.2})
    expected = ref_ties_merge(flat(b), [ref_ties_trim(flat(x), di) for x, di in zip(deltas, d)], w, 1.2, normalize)
    close(got, expected, tol=1e-12 if dtype == torch.float64 else 1e-5)


def test_breadcrumbs_drop_and_keep_counts():
    n = 100
    delta = distinct_magnitudes(n, seed=7)       # magnitudes 1..100 (/16)
    b = torch.zeros(n)
    mags = (delta.abs() * 16).round()

    def kept_magnitudes(d, gamma):
        got = merge_tensors("breadcrumbs", b, [delta.float()], weight=1.0, density=d, gamma=gamma)
        return sorted(int(m) for m in mags[got != 0].tolist())

    assert kept_magnitudes(0.3, 0.05) == list(range(66, 96))   # drop top 5 (96..100), keep the 30 below
    assert kept_magnitudes(0.3, 0.0) == list(range(71, 101))   # no outliers: the top 30
    assert kept_magnitudes(0.9, 0.2) == list(range(1, 91))     # 20 + 90 > 100: the drop shrinks to 10
    assert kept_magnitudes(1.0, 0.2) == list(range(1, 101))    # density 1 keeps everything
    assert kept_magnitudes(0.7, 0.1) == list(range(21, 91))    # int(0.7*100) = 70, int(0.1*100) = 10
    assert kept_magnitudes(0.005, 0.01) == []                  # int(0.5) = 0 entries kept
    for d, gamma in ((0.3, 0.05), (0.7, 0.1), (0.9, 0.2), (0.005, 0.01)):
        got = merge_tensors("breadcrumbs", b, [delta.float()], weight=1.0, density=d, gamma=gamma)
        close(got, ref_breadcrumbs_trim(flat(delta), d, gamma), tol=0)


def test_breadcrumbs_keeps_exact_counts_when_magnitudes_tie():
    """bf16-like task vectors tie exactly: the band still keeps int(d N) entries below the top int(g N),
    ties broken by position (the earlier first) - from the table, on demand, and chunk by chunk."""
    from evomerge.methods.context import DENSITY_GRID, GAMMA_GRID, TensorContext
    from evomerge.methods.library import outlier_trim

    gen = torch.Generator().manual_seed(3)
    n = 1000
    deltas = [(torch.randint(-6, 7, (n,), generator=gen) / 8.0) for _ in range(2)]   # 13 values: many ties
    b = torch.zeros(n)
    cases = [(0.3, 0.05), (0.37, 0.012), (0.9, 0.2), (0.5, 0.0), (1.0, 0.1)]
    for d, gamma in cases:
        got = merge_tensors("breadcrumbs", b, [deltas[0]], weight=1.0, density=d, gamma=gamma)
        expected = ref_breadcrumbs_trim(flat(deltas[0]), d, gamma)
        close(got, expected, tol=0)             # the reference keeps exactly int(d n), ties by position
    density, gamma = [0.37, 0.3], [0.012, 0.05]
    on_demand = TensorContext.one_off(b, [b + x for x in deltas], name="t")
    tabled = TensorContext.one_off(b, [b + x for x in deltas], name="t")
    tabled.precompute_thresholds(densities=DENSITY_GRID, gammas=GAMMA_GRID[:20])
    whole = outlier_trim(on_demand, density, gamma)
    assert torch.equal(outlier_trim(tabled, density, gamma), whole)
    assert torch.equal(torch.cat([outlier_trim(c, density, gamma) for c in tabled.chunks(97)], dim=1), whole)
    for i in range(2):
        assert torch.equal(whole[i], torch.tensor(ref_breadcrumbs_trim(flat(deltas[i]), density[i], gamma[i]),
                                                  dtype=whole.dtype))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [True, False])
def test_breadcrumbs_matches_reference(method, normalize):
    b = torch.full((80,), -0.5, dtype=torch.float64)
    deltas = [distinct_magnitudes(80, seed=s) for s in (10, 11, 12)]
    w, d, g = [0.9, 0.4, -0.3], [0.4, 0.25, 0.6], [0.05, 0.0, 0.1]
    got = merge_tensors(method, b, [b + x for x in deltas], weight=w, density=d, gamma=g, normalize=normalize,
                        **{"lambda": 0.7})
    trimmed = [ref_breadcrumbs_trim(flat(x), di, gi) for x, di, gi in zip(deltas, d, g)]
    if method == "breadcrumbs":
        expected = ref_task_arithmetic(flat(b), trimmed, w, 0.7, normalize)
    else:
        expected = ref_ties_merge(flat(b), trimmed, w, 0.7, normalize)
    close(got, expected)


def test_breadcrumbs_ties_default_is_not_normalized():
    b = torch.zeros(4, dtype=torch.float64)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    got = merge_tensors("breadcrumbs_ties", b, [x, x], weight=[2.0, 1.0], density=1.0)
    close(got, (3 * x).tolist())


def test_model_stock_golden():
    b = torch.zeros(2, dtype=torch.float64)
    x1, x2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)                                    # K cos / (1 + (K - 1) cos), K = 2
    assert t == pytest.approx(0.8284271247461901)
    close(merge_tensors("model_stock", b, [x1, x2]), [t * 1.0, t * 0.5])
    # orthogonal task vectors: t = 0, the base
    close(merge_tensors("model_stock", b + 1, [b + 1 + x1, b + 1 + torch.tensor([0.0, 1.0])]), [1.0, 1.0])
    # opposite task vectors: the denominator 1 + (K - 1) cos = 0, t = 0 (not inf)
    close(merge_tensors("model_stock", b, [x1, -x1]), [0.0, 0.0])
    base, xs = family(3, dtype=torch.float64, seed=9)
    xs = [x + 0.3 * (xs[0] - base) for x in xs]          # correlated task vectors: 0 < t < 1
    t3, expected = ref_model_stock(flat(base), [flat(x) for x in xs])
    assert 0.2 < t3 < 1
    close(merge_tensors("model_stock", base, xs), expected)


# ------------------------------------------------------------------------------------------------
# Stochastic methods: exact structure given the mask, then statistics of the mask


def test_dare_rescales_inverse_l1_none():
    b = torch.full((400,), 0.5, dtype=torch.float64)
    delta = distinct_magnitudes(400, seed=3)
    x = b + delta
    runs = {r: merge_tensors("dare_linear", b, [x], weight=1.0, density=0.3, rescale=r, seed=4, name="t")
            for r in ("none", "inverse", "l1")}
    mask = runs["none"] != b
    assert 0 < int(mask.sum()) < 400
    for r, got in runs.items():
        assert torch.equal(got != b, mask), r    # the mask does not depend on the rescale
    kept = flat(torch.where(mask, delta, 0.0))
    close(runs["none"], [bj + v for bj, v in zip(flat(b), kept)])
    close(runs["inverse"], [bj + v / 0.3 for bj, v in zip(flat(b), kept)])
    rho = sum(abs(v) for v in flat(delta)) / sum(abs(v) for v in kept)
    close(runs["l1"], [bj + v * rho for bj, v in zip(flat(b), kept)])
    # l1 with norms below 1e-7: rho = 1
    zero = torch.zeros_like(b)
    tiny = merge_tensors("dare_linear", zero, [1e-12 * delta], weight=1.0, density=0.3, rescale="l1", seed=4, name="t")
    close(tiny, [1e-12 * v for v in kept], tol=1e-24)


def test_dare_masks_are_nested_over_densities():
    """One uniform field per (seed, source, tensor), masks by comparison: a higher density keeps a superset."""
    b = torch.zeros(500)
    x = distinct_magnitudes(500, seed=1).float()
    previous = torch.zeros(500, dtype=torch.bool)
    for d in (0.1, 0.2, 0.35, 0.5, 0.8, 0.99):
        mask = merge_tensors("dare_linear", b, [x], weight=1.0, density=d, rescale="none", seed=9, name="w") != 0
        assert not bool((previous & ~mask).any()), d
        previous = mask


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_then_the_combination_step(method):
    b = torch.full((200,), 0.1, dtype=torch.float64)
    deltas = [distinct_magnitudes(200, seed=s) for s in (20, 21)]
    w, d = [1.0, 0.7], [0.4, 0.6]
    got = merge_tensors(method, b, [b + x for x in deltas], weight=w, density=d, seed=6, name="m", **{"lambda": 1.1})
    # each source's mask, read from a one-hot merge with rescale none (same seed, index and name)
    pruned = []
    for i, x in enumerate(deltas):
        one_hot = [1.0 if j == i else 0.0 for j in range(2)]
        alone = merge_tensors("dare_linear", b, [b + y for y in deltas], weight=one_hot, density=d, rescale="none",
                              seed=6, name="m")
        pruned.append([v / d[i] if keep else 0.0 for v, keep in zip(flat(x), flat(alone != b))])
    if method == "dare_linear":
        expected = ref_task_arithmetic(flat(b), pruned, w, 1.1)
    else:
        expected = ref_ties_merge(flat(b), pruned, w, 1.1, normalize=False)
    close(got, expected)


def test_della_keep_probabilities_by_rescale():
    """Kept entries are rescaled by exactly 1/p, p = d - eps + 2 eps q, q the per-row magnitude rank."""
    delta2d = distinct_magnitudes(6 * 9, seed=5).reshape(6, 9)
    delta1d = distinct_magnitudes(25, seed=6)
    for delta in (delta2d, delta1d):
        b = torch.zeros_like(delta)
        got = merge_tensors("della_linear", b, [delta], weight=1.0, density=0.4, epsilon=0.2, seed=1, name="x")
        p = ref_della_p(delta, 0.4, 0.2)
        expected = [v / pj if k else 0.0 for v, pj, k in zip(flat(delta), p, flat(got != 0))]
        assert 0 < int((got != 0).sum()) < delta.numel()
        close(got, expected)
        none = merge_tensors("della_linear", b, [delta], weight=1.0, density=0.4, epsilon=0.2, seed=1, name="x",
                             rescale="none")
        assert torch.equal(none != 0, got != 0)
        close(none, [v if k else 0.0 for v, k in zip(flat(delta), flat(got != 0))])
        l1 = merge_tensors("della_linear", b, [delta], weight=1.0, density=0.4, epsilon=0.2, seed=1, name="x",
                           rescale="l1")
        kept = flat(none)
        rho = sum(abs(v) for v in flat(delta)) / sum(abs(v) for v in kept)   # whole tensor, as DARE's
        close(l1, [v * rho for v in kept])


def test_della_uses_the_same_field_as_dare():
    """keep iff u < p: with u read from DARE masks on a fine density grid, della's mask is determined
    wherever p is not within the grid step of u."""
    delta = distinct_magnitudes(8 * 25, seed=8).reshape(8, 25)
    b = torch.zeros_like(delta)
    grid = [i / 200 for i in range(1, 200)]
    upper = torch.ones(delta.numel(), dtype=torch.float64)      # u < upper
    lower = torch.zeros(delta.numel(), dtype=torch.float64)     # u >= lower
    for d in grid:
        kept = (merge_tensors("dare_linear", b, [delta], weight=1.0, density=d, rescale="none", seed=3,
                              name="f") != 0).reshape(-1)
        upper = torch.where(kept & (upper > d), torch.tensor(d, dtype=torch.float64), upper)
        lower = torch.where(~kept & (lower < d), torch.tensor(d, dtype=torch.float64), lower)
    p = torch.tensor(ref_della_p(delta, 0.5, 0.15), dtype=torch.float64)
    kept = (merge_tensors("della_linear", b, [delta], weight=1.0, density=0.5, epsilon=0.15, seed=3,
                          name="f") != 0).reshape(-1)
    sure_keep = p >= upper
    sure_drop = p <= lower
    assert int((sure_keep | sure_drop).sum()) >= 0.9 * delta.numel()
    assert bool(kept[sure_keep].all()) and not bool(kept[sure_drop].any())


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_then_the_combination_step(method):
    b = torch.full((5, 12), 0.2, dtype=torch.float64)
    deltas = [distinct_magnitudes(60, seed=s).reshape(5, 12) for s in (30, 31, 32)]
    w, d, e = [1.0, 0.5, -0.8], [0.5, 0.4, 0.6], [0.1, 0.2, 0.15]
    got = merge_tensors(method, b, [b + x for x in deltas], weight=w, density=d, epsilon=e, seed=8, name="z")
    pruned = []
    for i, x in enumerate(deltas):
        one_hot = [1.0 if j == i else 0.0 for j in range(3)]
        alone = merge_tensors("della_linear", b, [b + y for y in deltas], weight=one_hot, density=d, epsilon=e,
                              seed=8, name="z")
        p = ref_della_p(x, d[i], e[i])
        pruned.append([v / pj if keep else 0.0 for v, pj, keep in zip(flat(x), p, flat(alone != b))])
    if method == "della":   # normalize default true
        expected = ref_ties_merge(flat(b), pruned, w, 1.0, normalize=True)
    else:
        expected = ref_task_arithmetic(flat(b), pruned, w, 1.0)
    close(got, expected)


@pytest.mark.parametrize("d", [0.1, 0.5, 0.9])
def test_dare_kept_fraction(d):
    n = 200 * 500
    b = torch.zeros(200, 500)
    x = torch.randn(200, 500, generator=torch.Generator().manual_seed(0))
    kept = (merge_tensors("dare_linear", b, [x], weight=1.0, density=d, seed=17, name="big") != 0).double().mean()
    sigma = math.sqrt(d * (1 - d) / n)
    assert abs(float(kept) - d) <= Z * sigma


@pytest.mark.parametrize("d", [0.5, 0.4])
def test_della_kept_fraction(d):
    eps = 0.1
    b = torch.zeros(100, 1000)
    x = torch.randn(100, 1000, generator=torch.Generator().manual_seed(1))
    got = merge_tensors("della_linear", b, [x], weight=1.0, density=d, epsilon=eps, seed=5, name="big")
    p = torch.tensor(ref_della_p(x[:1], d, eps) * 100, dtype=torch.float64)  # every row holds the same set of q
    expected = float(p.mean())                               # mean q = 1/2: expected fraction = d
    assert expected == pytest.approx(d)
    sigma = math.sqrt(float((p * (1 - p)).sum())) / p.numel()
    assert abs(float((got != 0).double().mean()) - expected) <= Z * sigma


def _over_seeds(method: str, delta: torch.Tensor, seeds: int, **params) -> torch.Tensor:
    b = torch.zeros_like(delta)
    return torch.stack([merge_tensors(method, b, [delta], weight=1.0, seed=s, name="e", **params).double()
                        for s in range(seeds)])


def test_dare_expectation_is_the_task_vector():
    """E[delta'] = delta for rescale inverse: per entry, the mean of delta'/delta over S seeds is 1 +- Z sigma,
    sigma = sqrt((1 - d) / (d S)) (Bernoulli(d) / d); Z = 5 with a Bonferroni margin over the 96 entries."""
    d, seeds = 0.3, 300
    delta = distinct_magnitudes(96, seed=2).float()
    ratio = _over_seeds("dare_linear", delta, seeds, density=d) / delta.double()
    sigma = math.sqrt((1 - d) / (d * seeds))
    assert float((ratio.mean(0) - 1).abs().max()) <= Z * sigma
    # and over all entries together the bound is sqrt(96) times tighter
    assert abs(float(ratio.mean()) - 1) <= Z * sigma / math.sqrt(96)


def test_della_expectation_and_keep_probability():
    """Per entry: keep frequency over S seeds = p +- Z sqrt(p(1-p)/S); E[delta'/delta] = 1 +- Z sqrt((1-p)/(p S))."""
    d, eps, seeds = 0.5, 0.2, 300
    delta = distinct_magnitudes(4 * 16, seed=4).reshape(4, 16).float()
    runs = _over_seeds("della_linear", delta, seeds, density=d, epsilon=eps)
    p = torch.tensor(ref_della_p(delta, d, eps), dtype=torch.float64).reshape(4, 16)
    frequency = (runs != 0).double().mean(0)
    assert bool(((frequency - p).abs() <= Z * torch.sqrt(p * (1 - p) / seeds)).all())
    ratio = (runs / delta.double()).mean(0)
    assert bool(((ratio - 1).abs() <= Z * torch.sqrt((1 - p) / (p * seeds))).all())
    # the magnitude ranks matter: the largest entries of each row are kept more often than the smallest
    order = delta.abs().argsort(dim=1)
    assert float(frequency.gather(1, order[:, -4:]).mean()) > float(frequency.gather(1, order[:, :4]).mean()) + 0.2


# ------------------------------------------------------------------------------------------------
# Reproducibility of the random masks


_SUBPROCESS = textwrap.dedent("""
    import hashlib, torch
    from evomerge.methods import merge_tensors
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 24, generator=gen)
    xs = [base + 0.1 * torch.randn(16, 24, generator=gen) for _ in range(3)]
    digest = hashlib.sha256()
    for method in {methods!r}:
        extra = {{"epsilon": 0.1}} if method.startswith("della") else {{}}
        out = merge_tensors(method, base, xs, seed=77, name="model.layers.3.mlp.up_proj.weight",
                            weight=[0.5, 1.0, 0.8], density=[0.3, 0.5, 0.7], **extra)
        digest.update(out.numpy().tobytes())
    print(digest.hexdigest())
""")


@pytest.mark.slow     # a subprocess
def test_same_seed_identical_across_processes():
    script = _SUBPROCESS.format(methods=STOCHASTIC)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert other.returncode == 0, other.stderr
    namespace: dict = {}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(script, namespace)
    assert other.stdout.strip() == buffer.getvalue().strip()


def test_mask_is_pinned_across_versions():
    """A recipe exported today must rebuild the same model later: this mask is part of that contract
    (a change of the seed derivation or of the generator shows up here, not in users' models)."""
    b, x = torch.zeros(4, 16), torch.ones(4, 16)
    got = merge_tensors("dare_linear", b, [x], weight=1.0, density=0.5, seed=1234,
                        name="model.layers.0.mlp.up_proj.weight")
    rows = ["".join("1" if v else "0" for v in row) for row in (got != 0).tolist()]
    assert rows == ["1000001110101011", "1111111011011101", "1011011001101111", "1101100100001001"]


def test_masks_do_not_depend_on_other_sources_or_merge_order():
    base, xs = family(3, shape=(10, 10), seed=3)
    alone = merge_tensors("dare_linear", base, xs, weight=[0.0, 1.0, 0.0], density=0.5, seed=4, name="w")
    # other sources' values, their number after this one, and earlier merges do not change source 1's mask
    changed = [base - 5 * (xs[0] - base), xs[1], base + 2 * (xs[2] - base)]
    assert torch.equal(alone, merge_tensors("dare_linear", base, changed, weight=[0.0, 1.0, 0.0], density=0.5,
                                            seed=4, name="w"))
    assert torch.equal(alone, merge_tensors("dare_linear", base, xs[:2], weight=[0.0, 1.0], density=0.5,
                                            seed=4, name="w"))
    names = [f"layers.{i}.w" for i in range(4)]
    forward = {n: merge_tensors("della", base, xs, density=0.5, seed=4, name=n) for n in names}
    backward = {n: merge_tensors("della", base, xs, density=0.5, seed=4, name=n) for n in reversed(names)}
    assert all(torch.equal(forward[n], backward[n]) for n in names)
    # the per-source density does not move another source's mask
    a = merge_tensors("dare_ties", base, xs, weight=[0.0, 1.0, 0.0], density=[0.2, 0.5, 0.9], seed=4, name="w")
    b = merge_tensors("dare_ties", base, xs, weight=[0.0, 1.0, 0.0], density=[0.8, 0.5, 0.1], seed=4, name="w")
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_same_tensor_on_cuda_and_cpu(method):
    base, xs = family(sources_for(method), shape=(64, 48))
    params = valid_params(method, len(xs))
    cpu = merge_tensors(method, base, xs, seed=5, name="w", **params)
    cuda = merge_tensors(method, base.cuda(), [x.cuda() for x in xs], seed=5, name="w", **params)
    assert torch.equal(cuda != base.cuda(), cpu.cuda() != base.cuda())     # identical masks
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The resident kernel gives the one-off function's tensors


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from modelfactory import make_family

    return make_family(tmp_path_factory.mktemp("family"), arch="llama", k=3, layers=4)


def _kernel_recipe(method: str, base, sources):
    from evomerge.recipe import Recipe

    spec = REGISTRY.get(method)
    names = {p.name for p in spec.source_params}
    paths = [str(p) for p in sources[:sources_for(method)]]
    shorts = [p.name for p in sources]
    per_source = {shorts[0]: {"weight": [0.8, 0.6], "density": [0.5, 0.7], "epsilon": 0.1, "gamma": 0.02},
                  shorts[1]: {"weight": 0.7, "density": 0.123, "epsilon": [0.1, 0.05]},     # 0.123: off the grid
                  shorts[2]: {"weight": [0.3, 1.1], "density": 0.3, "gamma": [0.0, 0.05]}}
    filters = {"io": {shorts[0]: {"weight": 0.2}}, "attn": {shorts[1]: {"density": [0.2, 0.3]}}}

    def keep(block):
        out = {}
        for src, params in block.items():
            params = {k: v for k, v in params.items() if k in names}
            if params and any(p.endswith(src) for p in paths):
                out[src] = params
        return out

    data = {"method": method, "sources": paths, "seed": 4321, "layer_groups": 2,
            "parameters": keep(per_source), "filters": {k: keep(v) for k, v in filters.items() if keep(v)}}
    if spec.needs_base:
        data["base"] = str(base)
    if method == "slerp":
        data["t"] = 0.3
    if method in ("dare_linear", "della_linear"):   # the l1 rescale needs whole-tensor norms: no chunks
        data["rescale"] = "l1" if method == "dare_linear" else "none"
    if method == "linear":
        data["base"] = str(base)   # only the anchor of the task vectors; it is not a source
    return Recipe.from_dict(data)


@pytest.mark.parametrize("mode", ["resident", "chunked", "streaming"])
@pytest.mark.parametrize("method", METHODS)
def test_resident_kernel_equals_one_off_merge(tiny_family, method, mode, monkeypatch):
    """materialize() writes, tensor by tensor, exactly what merge_tensors gives for the recipe's values:
    also when elementwise methods run over small chunks, and when tensors stream from disk."""
    import evomerge.kernel.device
    from evomerge.kernel import ResidentMerger
    from evomerge.plan import MergePlan
    from evomerge.sources import open_sources

    if mode == "chunked":
        monkeypatch.setattr(evomerge.kernel.device, "CHUNK", 97)
    base, sources = tiny_family
    recipe = _kernel_recipe(method, base, sources)
    opened = open_sources(recipe.base, recipe.sources)
    merger = ResidentMerger(opened, seed=recipe.seed, methods=[method], build_model=mode == "streaming",
                            streaming=mode == "streaming")
    assert merger.streaming == (mode == "streaming")
    merger.materialize(recipe)
    layout = opened.layout
    anchor = opened.anchor
    plan = MergePlan.of(recipe, layout)
    for name, out in merger.state_dict().items():
        slot = plan.slot(name)
        one_off = merge_tensors(method, anchor.read(name), [s.read(name) for s in opened.sources],
                                seed=recipe.seed, name=name, **slot.shared, **slot.values)
        assert torch.equal(out, one_off), name


@pytest.mark.parametrize("mode", ["resident", "chunked"])
def test_model_stock_filter_wise_takes_one_t_per_row(tiny_family, mode, monkeypatch):
    """mergekit's filter_wise: cos and t per row (a vector along the last dimension), recomputed here from the
    formula; the same over small chunks of the flattened tensor as whole."""
    import evomerge.kernel.device
    from evomerge.kernel import ResidentMerger
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources

    if mode == "chunked":
        monkeypatch.setattr(evomerge.kernel.device, "CHUNK", 97)
    base, sources = tiny_family
    recipe = Recipe.from_dict({"method": "model_stock", "base": str(base), "sources": [str(s) for s in sources],
                               "filter_wise": True})
    opened = open_sources(recipe.base, recipe.sources)
    merger = ResidentMerger(opened, seed=0, methods=["model_stock"])
    merger.materialize(recipe)
    varied = 0
    for name, out in merger.state_dict().items():
        b = opened.anchor.read(name).float()
        xs = [s.read(name).float() for s in opened.sources]
        rows = b.reshape(-1, b.shape[-1])
        deltas = [x.reshape(rows.shape) - rows for x in xs]
        cosines = [((a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
                   for i, a in enumerate(deltas) for c in deltas[i + 1:]]
        cos = torch.stack(cosines).mean(0)
        k = len(xs)
        den = 1 + (k - 1) * cos
        t = torch.where(den.abs() < 1e-6, torch.zeros_like(cos), k * cos / den)[:, None]
        mean = sum(x.reshape(rows.shape) for x in xs) / k
        torch.testing.assert_close(out.float(), (t * mean + (1 - t) * rows).reshape(b.shape), rtol=1e-6, atol=1e-6)
        varied += int(t.unique().numel() > 1)
    assert varied > 0          # rows of one tensor took different t: not one t per tensor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_resident_kernel_on_cuda_equals_cpu(tiny_family, method):
    """The search's code path on a GPU: same masks as on the CPU, values within float32 rounding."""
    from evomerge.kernel import ResidentMerger
    from evomerge.sources import open_sources

    base, sources = tiny_family
    recipe = _kernel_recipe(method, base, sources)
    merged = {}
    for device in ("cpu", "cuda"):
        merger = ResidentMerger(open_sources(recipe.base, recipe.sources), device=device, seed=recipe.seed,
                                methods=[method])
        merger.materialize(recipe)
        merged[device] = {name: t.detach().cpu().clone() for name, t in merger.state_dict().items()}
    anchor = open_sources(recipe.base, recipe.sources).anchor
    for name, cpu in merged["cpu"].items():
        cuda, b = merged["cuda"][name], anchor.read(name)
        assert torch.equal(cuda != b, cpu != b), name
        torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-6)
