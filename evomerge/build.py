"""From a recipe to merged tensors: its sources opened, planned, materialized (kernel/), or its blocks stacked.

What an export needs of the result is one protocol, `Merged`: a ResidentMerger (a parameter-space merge)
and a `Stacked` (a recipe with `layers`) both meet it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .kernel import TORCH_DTYPES, ResidentMerger, TensorStream, pick_device
from .recipe import Recipe
from .sources import SourceSet, open_sources


class Merged(Protocol):
    """What an export reads of a materialized recipe."""

    sources: SourceSet

    @property
    def out_dtype(self) -> torch.dtype: ...

    @property
    def config(self) -> dict | None:
        """The model's config where it is not the anchor's (a stack's); None: the anchor's."""

    @property
    def model(self): ...

    def weights(self, candidate) -> TensorStream:
        """The tensors of `candidate` (the recipe it holds materialized) as a writer takes them."""

    def __enter__(self) -> "Merged": ...

    def __exit__(self, *exc: object) -> None: ...


def open_recipe_sources(recipe: Recipe) -> SourceSet:
    """The recipe's models, opened (headers only) and cross-checked, relative to the recipe file."""
    sources = open_sources(recipe.base, recipe.sources, relative_to=recipe.relative_to, vocab=recipe.vocab,
                           file=str(recipe.path) if recipe.path else None, needs_base=recipe.spec.needs_base)
    sources.layout.check_groups(recipe.layer_groups, file=str(recipe.path) if recipe.path else None)
    if recipe.layers:
        from .stack import check_stack

        check_stack(recipe, sources.layout, file=str(recipe.path) if recipe.path else None)
    return sources


def merge(recipe: Recipe | str | Path, *, device: str | torch.device | None = "cpu", progress: bool = False,
          memory_budget: int | str | None = None):
    """Materialize a recipe into an in-memory transformers model."""
    return merger_for(recipe, device=device, progress=progress, memory_budget=memory_budget).model


@dataclass
class Stacked:
    """A recipe with `layers`, materialized: its tensors under the stack's names, its config, and (on demand)
    the transformers model they make. What `merger_for` gives for such a recipe."""

    recipe: Recipe
    sources: SourceSet
    tensors: dict[str, torch.Tensor]
    config: dict
    dtype: torch.dtype
    device: torch.device

    @functools.cached_property
    def model(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**self.config)
        model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        missing, unexpected = model.load_state_dict(self.tensors, strict=False)
        model.tie_weights()
        params = dict(model.named_parameters(remove_duplicate=False))
        loaded = {params[n].data_ptr() for n in self.tensors if n in params}
        untied = [n for n in missing if n in params and params[n].data_ptr() not in loaded]
        if unexpected or untied:     # only a tied head may be absent from a checkpoint
            raise RuntimeError(f"stacked tensors do not fit the model: unexpected {unexpected[:3]}, "
                               f"missing {untied[:3]}")
        return model.to(self.device).eval()

    @property
    def out_dtype(self) -> torch.dtype:
        return self.dtype

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def weights(self, candidate: Recipe) -> TensorStream:
        return TensorStream.of(self.tensors)

    def __enter__(self) -> "Stacked":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def stack_for(recipe: Recipe, *, device: str | torch.device | None = "cpu", progress: bool = False,
              memory_budget: int | str | None = None) -> Stacked:
    """A recipe with `layers`: its parameter-space merge (where it has one) materialized, then its blocks stacked."""
    from .stack import stacked_config, stacked_tensors

    sources = open_recipe_sources(recipe)
    merged = None
    if recipe.merges:
        merger = ResidentMerger(sources, device=device, dtype=recipe.dtype, seed=recipe.seed,
                                methods=[recipe.method], progress=progress, memory_budget=memory_budget,
                                precompute=False, build_model=False)
        merger.materialize(recipe)
        merged = merger.state_dict()
    dtype = TORCH_DTYPES[recipe.dtype] if recipe.dtype else sources.layout.float_dtype
    tensors = stacked_tensors(recipe, sources, merged, dtype)
    config = stacked_config(sources.anchor.config, recipe.layers)
    return Stacked(recipe, sources, tensors, config, dtype, pick_device(device))


def merger_for(recipe: Recipe | str | Path, *, device: str | torch.device | None = "cpu",
               progress: bool = False, memory_budget: int | str | None = None,
               build_model: bool = True, stream: bool = False) -> ResidentMerger | Stacked:
    """A merger holding `recipe` materialized (for export or evaluation); `build_model` False: its tensors
    only (an export writes them; no transformers model is built); `stream`: none of them, a one-off merge whose
    `weights(recipe)` merges tensor by tensor as the writer takes them (a recipe with `layers` is held)."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    if recipe.layers:
        return stack_for(recipe, device=device, progress=progress, memory_budget=memory_budget)
    sources = open_recipe_sources(recipe)
    merger = ResidentMerger(sources, device=device, dtype=recipe.dtype, seed=recipe.seed, methods=[recipe.method],
                            progress=progress, memory_budget=memory_budget, precompute=False,
                            build_model=build_model and not stream, hold_outputs=not stream)
    if not stream:
        merger.materialize(recipe)
    return merger
