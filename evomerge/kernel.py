"""The resident merge kernel: sources loaded once, every candidate written in place.

`ResidentMerger` holds the anchor (base) and the stacked task vectors of every
tensor on one device, precomputes what no candidate's scalars change (magnitude
threshold tables, random fields, row ranks), and `materialize(recipe)` writes the
merged tensors straight into the parameters of one resident transformers model.
`evomerge merge`, the search and the export all go through `materialize`, so the
exported model is the one that was scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .errors import InputError
from .methods import DENSITY_GRID, GAMMA_GRID, REGISTRY, TensorContext, resolve
from .recipe import Recipe
from .sources import SourceSet, open_sources

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


class NonFiniteMerge(RuntimeError):
    """A candidate produced NaN or inf: it fails its trial, never the study."""


def pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available", field="device",
                         fix="use --device cpu or install a CUDA build of torch")
    return dev


class ResidentMerger:
    """Sources resident on `device`; candidates materialized in place into `self.model`."""

    def __init__(self, sources: SourceSet, *, device: str | torch.device | None = "cpu",
                 dtype: str | None = None, seed: int = 0, methods: Iterable[str] = (),
                 build_model: bool = True, progress: bool = False) -> None:
        self.sources = sources
        self.device = pick_device(device)
        self.seed = seed
        anchor = sources.anchor
        first = next(iter(sources.layout.tensors.values()))
        self.compute_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.out_dtype = TORCH_DTYPES[dtype] if dtype else _float_dtype_of(sources)
        self.model = self._load_model(anchor.path) if build_model else None
        targets = dict(self.model.state_dict(keep_vars=True)) if self.model is not None else {}
        self.contexts: dict[str, TensorContext] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        names = list(sources.layout.tensors)
        iterator = _progress(names, "loading sources") if progress else names
        for name in iterator:
            base = sources.read(anchor, name, device=self.device).to(self.compute_dtype)
            deltas = torch.stack([sources.read(s, name, device=self.device).to(self.compute_dtype)
                                  for s in sources.sources])
            deltas -= base
            self.contexts[name] = TensorContext(name=name, base=base, deltas=deltas, seed=seed)
            self.outputs[name] = self._output_slot(name, targets, base.shape)
        self.prepared: set[str] = set()
        self.prepare(methods, progress=progress)

    # -- set-up --------------------------------------------------------------------
    def _load_model(self, path: Path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.out_dtype, trust_remote_code=False)
        return model.to(self.device).eval()

    def _output_slot(self, name: str, targets: dict, shape: torch.Size) -> torch.Tensor:
        """The model's own parameter for `name` (written in place), or standalone storage."""
        param = targets.get(name)
        if param is None and self.model is not None:
            prefix = getattr(self.model, "base_model_prefix", "")
            for alias in (f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
                if param is None:
                    param = targets.get(alias)
        if param is not None and tuple(param.shape) == tuple(shape):
            return param.data
        return torch.empty(shape, dtype=self.out_dtype, device=self.device)

    def prepare(self, methods: Iterable[str], *, progress: bool = False) -> None:
        """Precompute, once, what the given methods need beyond the task vectors."""
        specs = [REGISTRY.get(m) for m in methods if m not in self.prepared]
        if not specs:
            return
        thresholds = any(s.magnitude_ranks for s in specs)
        gammas = GAMMA_GRID if any(s.name.startswith("breadcrumbs") for s in specs) else ()
        stochastic = any(s.stochastic for s in specs)
        ranks = any(s.row_ranks for s in specs)
        items = list(self.contexts.values())
        for ctx in (_progress(items, "precomputing") if progress else items):
            if thresholds:
                ctx.precompute_thresholds(densities=DENSITY_GRID, gammas=gammas)
            if stochastic:
                ctx.uniform()
            if ranks:
                ctx.ranks()
        self.prepared.update(s.name for s in specs)

    # -- the hot loop ------------------------------------------------------------------
    def materialize(self, recipe: Recipe, *, check_finite: bool = True) -> None:
        """Write the merge `recipe` describes into the resident parameters."""
        self._check_compatible(recipe)
        spec = recipe.spec
        shared = recipe.shared_values()
        layout = self.sources.layout
        slots: dict[tuple, dict] = {}
        with torch.inference_mode():
            for name, ctx in self.contexts.items():
                ctx.seed = recipe.seed
                info = layout.tensors[name]
                key = (layout.group(name, recipe.layer_groups), info.kind)
                if key not in slots:
                    slots[key] = resolve(spec, shared, recipe.source_values(*key), k=ctx.k, device=self.device,
                                         dtype=self.compute_dtype)
                merged = spec.apply(ctx, slots[key])
                if check_finite and not bool(torch.isfinite(merged).all()):
                    raise NonFiniteMerge(f"{recipe.method} produced NaN/inf in tensor '{name}'")
                self.outputs[name].copy_(merged)

    def _check_compatible(self, recipe: Recipe) -> None:
        specs = tuple(s.spec for s in self.sources.sources)
        if tuple(recipe.sources) != specs:
            raise InputError(f"recipe sources {list(recipe.sources)} differ from the resident ones {list(specs)}",
                             field="sources")
        base = self.sources.base.spec if self.sources.base is not None else None
        if recipe.spec.needs_base and recipe.base != base:
            raise InputError(f"recipe base '{recipe.base}' differs from the resident base '{base}'", field="base")
        if recipe.dtype is not None and TORCH_DTYPES[recipe.dtype] != self.out_dtype:
            raise InputError(f"recipe dtype {recipe.dtype} differs from the resident model's {self.out_dtype}",
                             field="dtype")
        self.sources.layout.check_groups(recipe.layer_groups)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged tensors under the sources' own names, in checkpoint order."""
        return dict(self.outputs)

    def __enter__(self) -> "ResidentMerger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.contexts.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _float_dtype_of(sources: SourceSet) -> torch.dtype:
    for info in sources.layout.tensors.values():
        if info.dtype.is_floating_point:
            return info.dtype
    return torch.float32


def _progress(items: list, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def open_recipe_sources(recipe: Recipe) -> SourceSet:
    """The recipe's models, opened (headers only) and cross-checked, relative to the recipe file."""
    sources = open_sources(recipe.base, recipe.sources, relative_to=recipe.relative_to, vocab=recipe.vocab,
                           file=str(recipe.path) if recipe.path else None)
    sources.layout.check_groups(recipe.layer_groups, file=str(recipe.path) if recipe.path else None)
    return sources


def merge(recipe: Recipe | str | Path, *, device: str | torch.device | None = "cpu", progress: bool = False):
    """Materialize a recipe into an in-memory transformers model."""
    return merger_for(recipe, device=device, progress=progress).model


def merger_for(recipe: Recipe | str | Path, *, device: str | torch.device | None = "cpu",
               progress: bool = False) -> ResidentMerger:
    """A resident merger holding `recipe` materialized (for export or evaluation)."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    sources = open_recipe_sources(recipe)
    merger = ResidentMerger(sources, device=device, dtype=recipe.dtype, seed=recipe.seed, methods=[recipe.method],
                            progress=progress)
    merger.materialize(recipe)
    return merger
