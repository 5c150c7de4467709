"""`evomerge validate`: check a config, recipe or task file without loading any weights."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .yamlio import load_yaml


def kind_of(data: dict) -> str:
    if "merge_method" in data:
        return "mergekit"
    if "evomerge_recipe" in data or "method" in data:
        return "recipe"
    if isinstance(data.get("tasks"), list):
        return "tasks"
    return "config"


def validate_file(path: Path) -> str:
    """A one-line summary of a valid file; InputError otherwise. Reads headers, never weights."""
    data = load_yaml(path)
    kind = kind_of(data)
    if kind in ("recipe", "mergekit"):
        from .build import open_recipe_sources
        from .recipe import Recipe

        recipe = Recipe.from_yaml(path)
        sources = open_recipe_sources(recipe)
        stack = f", a stack of {len(recipe.layers)} blocks" if recipe.layers else ""
        what = "mergekit config, read as a recipe" if kind == "mergekit" else "recipe"
        return (f"{path}: valid {what} ({recipe.method}, {len(recipe.sources)} sources, "
                f"{recipe.layer_groups} layer groups over {sources.layout.num_layers} layers{stack})")
    if kind == "tasks":
        from .evaluate import load_tasks

        suite = load_tasks(path)
        return f"{path}: valid task file ({', '.join(suite.names)})"
    try:
        from .config import load_config
    except ImportError:  # pragma: no cover - the search config arrives with the search
        raise InputError("not a recipe or task file", file=path) from None
    config = load_config(path)
    return f"{path}: valid search config '{config.name}' ({len(config.sources)} sources)"
