"""mergekit 0.1.5's other methods (METHODS.md, last section) against mergekit's own functions on tensors, in
float32 and float64, and a few values worked out by hand. Whole-model parity, through the mergekit.yaml the
export writes, is in test_mergekit_parity.py."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import InputError
from evomerge.methods import REGISTRY, merge_tensors

pytest.importorskip("mergekit")

from mergekit.merge_methods import registry as mk_registry  # noqa: E402
from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup  # noqa: E402
from mergekit.merge_methods.karcher import karcher_merge_tensors  # noqa: E402


def mergekit_merge(method: str, base: torch.Tensor | None, xs: list[torch.Tensor], *, weight=None, **shared):
    """mergekit's own kernel of `method` on one tensor group (base first, as mergekit lists it)."""
    implementation = mk_registry.get(method).implementation
    entries = ([TensorEntry("base", base.clone(), is_base=True)] if base is not None else []) + \
        [TensorEntry(f"m{i}", x.clone()) for i, x in enumerate(xs)]
    if weight is not None:
        shared["weight"] = PerInputValues([(f"m{i}", w) for i, w in enumerate(weight)])
    return implementation(TensorGroup(entries), **shared)


def family(k: int, shape=(24, 40), *, dtype=torch.float32, seed=0, sparse: float = 0.0):
    """A base of magnitudes >= 1 and sources within 0.25 of it, so that x - b and b + (x - b) are exact
    (Sterbenz): merge_tensors, holding task vectors, then sees the very sources mergekit's kernel does."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    base = base.sign() * (1 + base.abs())
    xs = []
    for _ in range(k):
        delta = (0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(-0.25, 0.25)
        if sparse:
            delta *= torch.rand(shape, generator=gen, dtype=torch.float64) > sparse
        xs.append(base + delta)
    return base.to(dtype), [x.to(dtype) for x in xs]


CASES = [  # (method, sources, our parameters, mergekit's per-source weight, mergekit's shared parameters)
    ("nuslerp", 2, {"weight": [0.3, 0.8]}, [0.3, 0.8], {}),
    ("nuslerp", 2, {"weight": [0.3, 0.8], "nuslerp_flatten": False}, [0.3, 0.8], {"nuslerp_flatten": False}),
    ("nuslerp", 2, {"weight": [1.0, -1.0]}, [1.0, -1.0], {}),                # |w0 + w1| < 1e-6: t = 1/2
    ("nuslerp", 2, {"weight": [0.5, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True}, [0.5, 0.5],
     {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", 3, {"weight": [0.5, 0.8, 0.3]}, [0.5, 0.8, 0.3], {}),
    ("multislerp", 3, {"weight": [0.5, 0.8, 0.3], "normalize_weights": False}, [0.5, 0.8, 0.3],
     {"normalize_weights": False}),
    ("sce", 3, {"select_topk": 0.3}, None, {"select_topk": 0.3}),
    ("sce", 3, {}, None, {}),
    ("nearswap", 1, {"t": 0.03}, None, {"t": 0.03}),
    ("arcee_fusion", 1, {}, None, {}),
    ("ram", 3, {"epsilon": 0.01}, None, {"epsilon": 0.01}),
    ("ramplus_tl", 3, {"epsilon": 0.01, "r": 0.5, "alpha": 0.3}, None, {"epsilon": 0.01, "r": 0.5, "alpha": 0.3}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{sorted(c[2])}")
def test_the_same_tensor_as_mergekits_kernel(case, dtype):
    method, k, ours, weight, shared = case
    base, xs = family(k, dtype=dtype, sparse=0.5 if method.startswith("ram") else 0.0)
    got = merge_tensors(method, base, xs, **ours)
    expected = mergekit_merge(method, base, xs, weight=weight, **shared)
    assert got.dtype == dtype
    assert torch.equal(got, expected.to(dtype))
    assert not torch.equal(got, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_karcher_is_mergekits_karcher_mean_of_the_models(dtype):
    _, xs = family(3, dtype=dtype)
    got = merge_tensors("karcher", None, xs, max_iter=25, tol=1e-7)
    expected = karcher_merge_tensors(xs, [1 / 3] * 3, max_iter=25, tol=1e-7)
    assert torch.equal(got, expected)
    # the mean of two opposite-free directions lies between them, with the mean length
    a, b = torch.tensor([3.0, 0.0], dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype)
    mean = merge_tensors("karcher", None, [a, b])
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0], dtype=dtype) / 2 ** 0.5)


def test_nearswap_by_hand():
    """w = clamp(t / |b - x|, 0, 1): a source within t of the base is taken whole, one 4 t away a quarter."""
    base = torch.tensor([0.0, 0.0, 1.0])
    source = torch.tensor([0.05, 0.4, 1.0])
    got = merge_tensors("nearswap", base, [source], t=0.1)
    torch.testing.assert_close(got, torch.tensor([0.05, 0.1, 1.0]))


def test_ram_by_hand():
    """Unique changes kept whole, shared ones averaged, unchanged (|δ| <= epsilon) entries left out."""
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, 2.0, 0.0, 1e-6]), torch.tensor([0.0, 4.0, 3.0, 5.0])]
    torch.testing.assert_close(merge_tensors("ram", base, xs, epsilon=1e-5), torch.tensor([1.0, 3.0, 3.0, 5.0]))
    # ramplus_tl: source 0 changed 3 entries, 1 of them (entry 1) shared: ρ_0 = 1 / 1 (entry 0 alone; entry 3's
    # 1e-6 does not count); source 1: ρ_1 = 1 / 2; λ_i = 1 + r min(ρ_i, alpha)
    got = merge_tensors("ramplus_tl", base, xs, epsilon=1e-5, r=0.5, alpha=0.8)
    torch.testing.assert_close(got, torch.tensor([1.0 * 1.4, 3.0, 3.0 * 1.25, 5.0 * 1.25]))


def test_sce_keeps_the_entries_that_vary_most_and_weights_by_energy():
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, 0.1, -2.0, 0.0]), torch.tensor([-1.0, 0.1, 2.0, 3.0])]
    # variances 1, 0 (excluded from n), 4, 2.25: n = 3, top int(3 * 0.7) = 2 are entries 2 and 3
    got = merge_tensors("sce", base, xs, select_topk=0.7)
    kept = [torch.tensor([0.0, 0.0, -2.0, 0.0]), torch.tensor([0.0, 0.0, 2.0, 3.0])]
    energy = torch.stack([k.square().mean() for k in kept])
    omega = energy / energy.sum()
    # entry 2: sum 0 elects +, only source 1 agrees; entry 3: only source 1 changed it
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 2.0, 3.0]))
    assert float(omega[1]) > float(omega[0])


def test_arcee_fusion_keeps_only_outlying_importance():
    base, (source,) = family(1, shape=(64, 64))
    source[3, 5] += 4.0     # one large change dominates its row's KL and its own size
    got = merge_tensors("arcee_fusion", base, [source])
    changed = got != base
    assert bool(changed[3, 5]) and 0 < int(changed.sum()) < base.numel() // 4
    torch.testing.assert_close(got[changed], source[changed])     # a kept entry takes the source's change whole


def test_arcee_fusion_quantiles_are_exact_above_mergekits_sample_size():
    """Above 10^6 entries mergekit draws a random sample (unseeded); evomerge's quantiles are exact, so the
    merge is the same every time and equals a full sort's threshold."""
    from evomerge.methods.selective import QUANTILE_SAMPLE, fusion_threshold

    values = torch.rand(QUANTILE_SAMPLE + 1001, generator=torch.Generator().manual_seed(0))
    ordered = values.sort().values
    n = values.numel() - 1
    q1, median, q3 = (ordered[int(torch.tensor(q) * n)] for q in (0.25, 0.5, 0.75))
    assert torch.equal(fusion_threshold(values), median + 1.5 * (q3 - q1))


def test_multislerp_of_cancelling_task_vectors_is_a_clear_error():
    base = torch.zeros(3)
    xs = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0])]
    with pytest.raises(InputError, match="weighted mean of the task vectors"):
        merge_tensors("multislerp", base, xs, weight=[1.0, 1.0, 1.0])
    # two sources fall back to the weighted sum, as mergekit's
    two = merge_tensors("multislerp", base, xs[:2], weight=[1.0, 1.0])
    torch.testing.assert_close(two, torch.zeros(3))


def test_declared_parameters_validate_recipes():
    from evomerge.recipe import Recipe

    karcher = REGISTRY.get("karcher")
    assert karcher.param("max_iter").check(12.0) == 12
    with pytest.raises(InputError, match="whole number"):
        Recipe.from_dict({"method": "karcher", "sources": ["a", "b"], "max_iter": 2.5})
    with pytest.raises(InputError, match="nuslerp merges exactly 2 source"):
        Recipe.from_dict({"method": "nuslerp", "base": "b", "sources": ["a", "c", "d"]})
    with pytest.raises(InputError, match="nearswap merges exactly 1 source"):
        Recipe.from_dict({"method": "nearswap", "base": "b", "sources": ["a", "c"]})
    assert REGISTRY.get("sce").whole_tensor and not REGISTRY.get("ram").whole_tensor
