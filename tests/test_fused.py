"""The fused merge kernel writes the eager path's tensors, and steps aside where it cannot run.

Every method with a fused plan materializes random recipes (per-source weights and
densities per layer group, off-grid densities, shared scalars, a seed) both ways:
through the kernel, and with EVOMERGE_NO_FUSED=1 through the torch steps.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import warnings

import pytest
import torch

from evomerge.methods import REGISTRY, TensorContext, fused

FUSED = [m.name for m in REGISTRY if m.fused is not None]


@pytest.fixture(scope="module")
def kernel() -> fused.FusedKernel:
    built = fused.compiled()
    if built is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler: the fused kernel cannot be built here")
        pytest.fail("a C++ compiler is present, yet the fused kernel did not build (see the warning)")
    return built


def _family(tmp_path_factory, k: int, arch: str = "llama"):
    sys.path.insert(0, os.path.dirname(__file__))
    from modelfactory import make_family

    return make_family(tmp_path_factory.mktemp(f"fused-{arch}-{k}"), arch=arch, k=k, layers=4)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _family(tmp_path_factory, 3)


@pytest.fixture(scope="module")
def signed_zeros(tmp_path_factory):
    """A base with entries of -0.0 where every source is a little below it: wherever all of them are
    dropped or trimmed, the merge adds zeros of either sign to -0.0."""
    from safetensors.torch import load_file, save_file

    base, sources = _family(tmp_path_factory, 3)
    for i, folder in enumerate([base, *sources]):
        path = folder / "model.safetensors"
        tensors = load_file(path)
        for t in tensors.values():
            if t.is_floating_point():
                t.view(-1)[::3] = -0.0 if i == 0 else -1e-7 * i
        save_file(tensors, path, metadata={"format": "pt"})
    return base, sources


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """Task vectors on a coarse grid (as bf16 fine-tunes have): magnitudes tie exactly at the trims' bounds."""
    from safetensors.torch import load_file, save_file

    base, sources = _family(tmp_path_factory, 3)
    anchor = load_file(base / "model.safetensors")
    for folder in sources:
        path = folder / "model.safetensors"
        tensors = load_file(path)
        for name, t in tensors.items():
            if t.is_floating_point():
                t.copy_(anchor[name] + ((t - anchor[name]) * 128).round() / 128)
        save_file(tensors, path, metadata={"format": "pt"})
    return base, sources


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "ties"])
@pytest.mark.parametrize("trial", range(2))
def test_fused_equals_eager_when_magnitudes_tie(kernel, tied, method, trial, monkeypatch):
    base, sources = tied
    recipe = random_recipe(method, base, sources, random.Random(f"tied-{method}-{trial}"))
    bands = []
    run = fused.FusedKernel.run
    monkeypatch.setattr(fused.FusedKernel, "run", lambda self, plan, ctx, out: bands.append(plan.keep)
                        or run(self, plan, ctx, out))
    fast, written, eager = both_ways(recipe, kernel, monkeypatch)
    assert written == len(fast)
    assert_same(fast, eager)
    if method != "ties":       # ties at a bound were split by position (TIES keeps every tied entry)
        assert any(band.low_cut for band in bands)


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """More sources than torch's own sum over a dimension adds left to right (K >= 5), GPT-2 naming."""
    return _family(tmp_path_factory, 6, arch="gpt2")


def random_recipe(method: str, base, sources, rng: random.Random, *, rescale: str | None = None,
                  sparse: bool = False):
    """A recipe with per-group values of every per-source parameter, off the 0.01 grid at times;
    `sparse`: densities of at most 0.35."""
    from evomerge.recipe import Recipe

    spec = REGISTRY.get(method)
    names = {p.name for p in spec.params}
    per_source = {p.name for p in spec.source_params}
    sources = sources[:spec.max_sources or len(sources)]
    groups = rng.choice([1, 2, 4])

    def per_group(low: float, high: float):
        digits = rng.choice([2, 3])
        values = [round(rng.uniform(low, high), digits) for _ in range(groups)]
        return values if groups > 1 and rng.random() < 0.7 else values[0]

    parameters = {}
    for source in sources:
        entry = {}
        if "weight" in per_source:
            entry["weight"] = per_group(0.1, 1.5) if method == "linear" else per_group(-0.5, 1.5)
        if "density" in per_source:
            low = 0.2 if "epsilon" in per_source else 0.05
            entry["density"] = per_group(low, 0.35 if sparse else 0.8 if "epsilon" in per_source else 1.0)
        if "gamma" in per_source:
            entry["gamma"] = per_group(0.0, 0.1)
        if "epsilon" in per_source:
            entry["epsilon"] = per_group(0.01, 0.15)
        if entry:
            parameters[source.name] = entry
    data = {"method": method, "sources": [str(s) for s in sources], "seed": rng.randrange(1 << 30),
            "layer_groups": groups, "parameters": parameters}
    if spec.needs_base or method == "linear":
        data["base"] = str(base)
    if "lambda" in names:
        data["lambda"] = round(rng.uniform(0.5, 1.5), 2)
    if "normalize" in names:
        data["normalize"] = rng.random() < 0.5
    if "rescale" in names:
        data["rescale"] = rescale or rng.choice(["inverse", "none"])
    if "t" in names:
        data["t"] = round(rng.uniform(0.0, 1.0), 2)
    return Recipe.from_dict(data)


def open_merger(recipe, *, dtype: str | None = None, streaming: bool = False, as_stored: bool = True):
    """A merger with nothing precomputed: thresholds come exactly, on demand (the tables hold the same)."""
    from evomerge.kernel import ResidentMerger
    from evomerge.sources import open_sources

    return ResidentMerger(open_sources(recipe.base, recipe.sources), seed=recipe.seed, build_model=False,
                          dtype=dtype, streaming=streaming, as_stored=as_stored)


def materialize(merger, recipe, kernel: fused.FusedKernel | None, monkeypatch) -> tuple[dict, int]:
    """The merged tensors with `kernel` (None: the eager steps), and how many of them it wrote."""
    calls = []
    run = fused.FusedKernel.run

    def counted(self, plan, ctx, out):
        calls.append(ctx.name)
        return run(self, plan, ctx, out)

    with monkeypatch.context() as patch:
        patch.setattr(fused.FusedKernel, "run", counted)
        patch.setattr(merger, "fused", kernel)
        merger.materialize(recipe)
    return {name: t.clone() for name, t in merger.state_dict().items()}, len(calls)


def both_ways(recipe, kernel, monkeypatch, **options) -> tuple[dict, int, dict]:
    merger = open_merger(recipe, **options)
    fast, written = materialize(merger, recipe, kernel, monkeypatch)
    eager, none = materialize(merger, recipe, None, monkeypatch)
    assert none == 0
    return fast, written, eager


def assert_same(fast: dict[str, torch.Tensor], eager: dict[str, torch.Tensor]) -> None:
    """Bit for bit: the same bytes, so a zero's sign too (torch.equal takes -0.0 for +0.0)."""
    assert fast.keys() == eager.keys()
    for name, expected in eager.items():
        got = fast[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
        differ = got.view(bits) != expected.view(bits)
        diff = float((got.double() - expected.double()).abs().max())
        assert not differ.any(), f"{name}: {int(differ.sum())} entries differ in their bits, max |fused - eager| = {diff:g}"


@pytest.mark.parametrize("method", FUSED)
@pytest.mark.parametrize("trial", range(2))
def test_fused_equals_eager_on_random_recipes(kernel, three, method, trial, monkeypatch):
    base, sources = three
    recipe = random_recipe(method, base, sources, random.Random(f"{method}-{trial}"))
    fast, written, eager = both_ways(recipe, kernel, monkeypatch)
    assert written == len(fast)       # every tensor through the kernel
    assert_same(fast, eager)


@pytest.mark.parametrize("method", FUSED)
def test_fused_and_eager_write_the_same_zeros(kernel, signed_zeros, method, monkeypatch):
    base, sources = signed_zeros
    recipe = random_recipe(method, base, sources, random.Random(f"zeros-{method}"), sparse=True)
    fast, written, eager = both_ways(recipe, kernel, monkeypatch)
    assert written == len(fast)
    if any(p.name == "density" for p in REGISTRY.get(method).params):      # it drops entries: zeros are written
        assert sum(int((t == 0).sum()) for t in eager.values()) > 0
    assert not any(torch.signbit(t[t == 0]).any() for t in fast.values())
    assert_same(fast, eager)


@pytest.mark.parametrize("method", [m for m in FUSED if REGISTRY.get(m).max_sources is None and m != "breadcrumbs"])
def test_fused_equals_eager_with_six_sources(kernel, six, method, monkeypatch):
    base, sources = six
    recipe = random_recipe(method, base, sources, random.Random(f"six-{method}"))
    fast, written, eager = both_ways(recipe, kernel, monkeypatch)
    assert written == len(fast)
    assert_same(fast, eager)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della_linear"])
def test_fused_casts_to_the_output_dtype_as_torch_does(kernel, three, method, dtype, monkeypatch):
    base, sources = three
    recipe = random_recipe(method, base, sources, random.Random(f"{method}-{dtype}"))
    fast, written, eager = both_ways(recipe, kernel, monkeypatch, dtype=dtype)
    assert written == len(fast)
    assert_same(fast, eager)


@pytest.mark.parametrize("method", ["ties", "della"])
def test_fused_equals_eager_when_streaming(kernel, three, method, monkeypatch):
    base, sources = three
    recipe = random_recipe(method, base, sources, random.Random(f"stream-{method}"))
    fast, written, eager = both_ways(recipe, kernel, monkeypatch, streaming=True)
    assert written == len(fast)
    assert_same(fast, eager)


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_the_l1_rescale_runs_the_eager_steps(kernel, three, method, monkeypatch):
    """Its norms of the kept entries span the whole tensor: no single pass computes them."""
    base, sources = three
    recipe = random_recipe(method, base, sources, random.Random(method), rescale="l1")
    fast, written, eager = both_ways(recipe, kernel, monkeypatch)
    assert written == 0
    assert_same(fast, eager)


def test_more_sources_than_compiled_for_run_the_eager_steps(kernel):
    many = 1 + kernel.module.MAX_SOURCES
    context = lambda k, dtype=torch.float32: TensorContext.one_off(torch.zeros(4, dtype=dtype),  # noqa: E731
                                                                   [torch.ones(4, dtype=dtype)] * k)
    assert not kernel.accepts(context(many), torch.zeros(4))
    assert kernel.accepts(context(many - 1), torch.zeros(4))
    assert not kernel.accepts(context(2, torch.float64), torch.zeros(4))


def test_the_kernel_reports_non_finite_values(kernel):
    huge = TensorContext.one_off(torch.zeros(300), [torch.full((300,), 3e38)] * 2)
    out = torch.empty(300)
    assert not kernel.run(fused.Plan(fused.Sum((1.0, 1.0))), huge, out)
    assert torch.isinf(out).all()
    assert not kernel.run(fused.Plan(fused.Elect((1.0, 1.0), 1.0, False)), huge, out)
    small = TensorContext.one_off(torch.zeros(300), [torch.full((300,), 1.0)] * 2)
    assert kernel.run(fused.Plan(fused.Sum((1.0, 1.0))), small, out)


def test_no_fused_env_and_other_devices_take_the_eager_path(kernel, three, monkeypatch):
    base, sources = three
    recipe = random_recipe("ties", base, sources, random.Random("env"))
    monkeypatch.setenv("EVOMERGE_NO_FUSED", "1")
    assert fused.kernel_for(torch.device("cpu")) is None
    assert open_merger(recipe).fused is None
    monkeypatch.setenv("EVOMERGE_NO_FUSED", "0")
    assert open_merger(recipe).fused is kernel
    assert fused.kernel_for(torch.device("meta")) is None


def test_a_failed_build_warns_once_and_merges_eagerly(kernel, three, monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'evomerge_fused'\ng++: command not found")

    base, sources = three
    recipe = random_recipe("ties", base, sources, random.Random("no compiler"))
    monkeypatch.delenv("EVOMERGE_NO_FUSED", raising=False)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    fused.compiled.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merger = open_merger(recipe)
            assert merger.fused is None
            assert fused.kernel_for(torch.device("cpu")) is None      # tried once per process
            eager, written = materialize(merger, recipe, merger.fused, monkeypatch)
        assert written == 0
        assert [str(w.message) for w in caught] == [
            "evomerge: the fused merge kernel is unavailable (g++: command not found); merging with torch ops"]
    finally:
        fused.compiled.cache_clear()      # later tests load the built extension again
    monkeypatch.undo()
    assert_same(materialize(open_merger(recipe), recipe, kernel, monkeypatch)[0], eager)


def test_the_build_is_named_by_a_digest_of_the_cpp_file(tmp_path, monkeypatch):
    """fused.cpp ships with the package, and its text is in the build's name: an edit to it is a new build, never
    a stale one loaded from torch's extension folder."""
    assert fused.SOURCE.is_file() and "PYBIND11_MODULE(TORCH_EXTENSION_NAME" in fused.SOURCE.read_text()
    name = fused._digest()
    assert name == fused._digest()
    edited = tmp_path / "fused.cpp"
    edited.write_text(fused.SOURCE.read_text() + "\n// an edit\n")
    monkeypatch.setattr(fused, "SOURCE", edited)
    assert fused._digest() != name


def test_small_models_merge_eagerly_unless_asked(kernel, monkeypatch):
    """Below MIN_ELEMENTS a first build (about a minute) would cost more than it saves; EVOMERGE_FUSED=1 fuses."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("EVOMERGE_NO_FUSED", raising=False)
    monkeypatch.delenv("EVOMERGE_FUSED", raising=False)
    assert fused.kernel_for(cpu, fused.MIN_ELEMENTS - 1) is None
    assert isinstance(fused.kernel_for(cpu, fused.MIN_ELEMENTS), fused.FusedKernel)   # (rebuilt objects after
    monkeypatch.setenv("EVOMERGE_FUSED", "1")                                          # a cache_clear elsewhere)
    assert isinstance(fused.kernel_for(cpu, 1000), fused.FusedKernel)


# -- bf16/fp16 sources resident as stored ---------------------------------------------------------------


@pytest.fixture(scope="module")
def half_families(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from modelfactory import make_family

    return {dtype: make_family(tmp_path_factory.mktemp(f"stored-{dtype}"), k=3, layers=4,
                               dtype=getattr(torch, dtype)) for dtype in ("bfloat16", "float16")}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", [m.name for m in REGISTRY])
def test_sources_held_as_stored_merge_as_float32_task_vectors_do(kernel, half_families, method, dtype, monkeypatch):
    """The same bytes for every method, by the fused kernel and by the eager steps, from half the memory."""
    base, sources = half_families[dtype]
    recipe = random_recipe(method, base, sources, random.Random(f"stored-{method}-{dtype}"))
    stored, vectors = open_merger(recipe), open_merger(recipe, as_stored=False)
    assert all(ctx.raw and ctx.stack.dtype == getattr(torch, dtype) for ctx in stored.contexts.values())
    assert not any(ctx.raw for ctx in vectors.contexts.values())
    held = lambda m: sum(c.anchor.nbytes + c.stack.nbytes for c in m.contexts.values())  # noqa: E731
    assert held(stored) * 2 == held(vectors)
    assert stored.resident_bytes() == held(stored) and vectors.resident_bytes() == held(vectors)
    expected, _ = materialize(vectors, recipe, None, monkeypatch)
    for way in (kernel, None):
        got, written = materialize(stored, recipe, way, monkeypatch)
        assert written == (len(got) if way is not None and REGISTRY.get(method).fused is not None
                           and recipe.shared.get("rescale") != "l1" else 0)
        assert_same(got, expected)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_sources_held_as_stored_merge_the_same_when_streaming(kernel, half_families, method, monkeypatch):
    base, sources = half_families["bfloat16"]
    recipe = random_recipe(method, base, sources, random.Random(f"stored-stream-{method}"))
    expected, _ = materialize(open_merger(recipe, as_stored=False), recipe, kernel, monkeypatch)
    got, written = materialize(open_merger(recipe, streaming=True), recipe, kernel, monkeypatch)
    assert written == len(got)
    assert_same(got, expected)
