"""Exports: the merged model folder, the recipe, mergekit YAML; run reports live beside them."""

from __future__ import annotations

from pathlib import Path

from ..build import Merged, merger_for
from ..errors import InputError
from ..recipe import Recipe
from ..sources import SourceSet
from ..yamlio import dump_yaml
from .folder import atomic_dir, atomic_write_text, chat_template_of, check_destination, write_model_folder
from .mergekit import converted_on_load, to_mergekit

__all__ = ["export_model", "merge_to_folder", "mergekit_yaml", "atomic_dir", "atomic_write_text",
           "check_destination", "write_model_folder", "to_mergekit"]


def mergekit_yaml(recipe: Recipe, sources: SourceSet) -> str | None:
    """mergekit YAML for the recipe, with local paths resolved; None where not representable (a method
    without a mergekit twin, sources of different vocabularies kept at the base's, which mergekit refuses, a
    union vocabulary that mergekit would order otherwise, or a checkpoint that transformers converts on load,
    which mergekit merges in another layout)."""
    if sources.resized or converted_on_load(sources.anchor.config.get("model_type"), sources.layout.tensors):
        return None
    if recipe.layers:
        from ..stack import to_mergekit as stack_to_mergekit

        paths = {f.spec: str(f.path) for f in sources.models}
        config = stack_to_mergekit(recipe, sources.layout, paths, recipe.dtype)
        return None if config is None else dump_yaml(_with_chat_template(config, recipe))
    if sources.union is not None and not _same_union_in_mergekit(recipe, sources):
        return None
    paths = {spec: str(folder.path) for spec, folder in zip(recipe.sources, sources.sources)}
    if recipe.base is not None and sources.base is not None:
        paths[recipe.base] = str(sources.base.path)
        for spec, folder in zip(recipe.sources, sources.sources):
            if folder.is_adapter:     # mergekit's BASE+ADAPTER: the adapter merged into its base (peft)
                paths[spec] = f"{sources.base.path}+{folder.path}"
    config = to_mergekit(recipe, sources.layout, paths)
    if config is not None and sources.union is not None:
        config["tokenizer_source"] = "union"
    return None if config is None else dump_yaml(_with_chat_template(config, recipe))


def _with_chat_template(config: dict, recipe: Recipe) -> dict:
    """mergekit's chat_template key (which mergekit 0.1.5 writes only where it builds a tokenizer:
    tokenizer_source set)."""
    return config | {"chat_template": recipe.chat_template} if recipe.chat_template is not None else config


def _same_union_in_mergekit(recipe: Recipe, sources: SourceSet) -> bool:
    """Whether mergekit builds the union evomerge built: on the same anchor (the base: without one, mergekit
    picks a model out of a set), with the base among the merged models (it fills rows from it), and with every
    token's id the same in every mergekit run (UnionVocab.same_in_mergekit)."""
    return recipe.spec.needs_base and sources.base is not None and sources.union.same_in_mergekit


def export_model(merger: Merged, recipe: Recipe, out: str | Path, *, force: bool = False,
                 card_extra: str = "") -> Path:
    """Write what `merger` holds (materialized from `recipe`) as a model folder."""
    sources = merger.sources
    tokenizer_from = sources.anchor
    if recipe.tokenizer is not None:
        from ..sources import open_folder

        tokenizer_from = open_folder(recipe.tokenizer, relative_to=recipe.relative_to, field="tokenizer")
    text = mergekit_yaml(recipe, sources)
    lineage = [f.hub_id for f in sources.models if f.hub_id]
    return write_model_folder(Path(out), tensors=merger.weights(recipe), recipe=recipe, config_from=sources.anchor,
                              config=merger.config,
                              tokenizer_from=tokenizer_from, dtype=merger.out_dtype, force=force,
                              card_extra=card_extra, extra_files={"mergekit.yaml": text} if text else None,
                              base_models=list(dict.fromkeys(lineage)),
                              chat_template=chat_template_of(recipe.chat_template, sources.models)
                              if recipe.chat_template is not None else None,
                              tokenizer=sources.union.tokenizer if sources.union is not None else None)


def merge_to_folder(recipe: Recipe | str | Path, out: str | Path, *, device: str | None = "cpu",
                    force: bool = False, progress: bool = False, memory_budget: int | str | None = None,
                    adapter: str | Path | None = None) -> Path:
    """`evomerge merge`: validate, refuse an existing output up front, merge, write atomically; with `adapter`,
    also the merge as one LoRA adapter (a linear merge of adapters only)."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe)
    check_destination(Path(out), force=force)
    if adapter is not None:
        from ..build import open_recipe_sources
        from .adapter import adapter_refusal

        refusal = adapter_refusal(recipe, open_recipe_sources(recipe))     # headers only, before any weight
        if refusal is not None:
            raise InputError(refusal, file=str(recipe.path) if recipe.path else None, field="method",
                             fix="drop --adapter: the merged model is written either way")
        check_destination(Path(adapter), force=force)
    merger = merger_for(recipe, device=device, progress=progress, memory_budget=memory_budget, build_model=False,
                        stream=True)
    with merger:
        path = export_model(merger, recipe, out, force=force)
        if adapter is not None:
            from .adapter import write_adapter

            write_adapter(recipe, merger.sources, adapter, force=force)
        return path
