"""search.start: the user's own recipes, scored first among the baselines.

Each file is read and checked against the config before any weights load: a method the search has, the
config's models in the config's order, its dtype and vocabulary. Its trial merges the file's recipe itself
(its own seed, values off the search grid, options the search does not tune), so that its scores are
`evomerge eval FILE`'s; the samplers see the nearest point of the search space (SearchSpace.encode).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .paths import resolve_path
from .recipe import Recipe

LABEL = "start:"     # a start's baseline label: "start:" and its file name


@dataclass(frozen=True)
class Start:
    label: str
    recipe: Recipe      # the file's merge, its models named as the config names them


def load_starts(config: Any) -> list[Start]:
    """The search.start files of `config` (a config.SearchConfig, which imports this module) as recipes over
    the config's models; InputError naming the field."""
    file = str(config.path) if config.path else None
    starts: list[Start] = []
    for i, text in enumerate(config.search.start):
        field = f"search.start[{i}]"
        path = resolve_path(text, relative_to=config.relative_to)
        if path is None or not path.is_file():
            raise InputError(f"'{text}' not found", file=file, field=field,
                             fix="check the path (relative to the config file)")
        recipe = Recipe.from_yaml(path)
        label = LABEL + path.name
        if any(s.label == label for s in starts):
            label = f"{LABEL}{path.parent.name}/{path.name}"
        starts.append(Start(label, _onto_config(recipe, config, file=file, field=field)))
    return starts


def _onto_config(recipe: Recipe, config: Any, *, file: str | None, field: str) -> Recipe:
    where = f"{field} ({recipe.path})"
    if config.search.space != "ps":
        raise InputError("a start recipe needs the parameter space", file=file, field=field,
                         fix="use search.space: ps, or drop search.start")
    if recipe.layers:
        raise InputError("a layer stack cannot start a parameter-space search", file=file, field=where,
                         fix="start from a recipe without `layers`")
    if recipe.method not in config.search.methods:
        raise InputError(f"its method {recipe.method} is not among search.methods", file=file, field=where,
                         fix=f"add {recipe.method} to search.methods")
    mine = [_where(s, config.relative_to) for s in config.sources]
    theirs = [_where(s, recipe.relative_to) for s in recipe.sources]
    if theirs != mine:
        raise InputError(f"its sources {list(recipe.sources)} are not the config's {list(config.sources)}",
                         file=file, field=where, fix="list the config's sources, in the config's order")
    if recipe.spec.needs_base and _where(recipe.base, recipe.relative_to) != _where(config.base, config.relative_to):
        raise InputError(f"its base {recipe.base} is not the config's {config.base}", file=file, field=where,
                         fix="merge over the config's base")
    if recipe.dtype not in (None, config.dtype):
        raise InputError(f"its dtype {recipe.dtype} is not the config's {config.dtype}", file=file, field=where,
                         fix="set the same dtype in both, or none")
    if recipe.vocab != config.vocab:
        raise InputError(f"its vocab: {recipe.vocab} is not the config's {config.vocab}", file=file, field=where,
                         fix="set the same vocab policy in both")
    return recipe.renamed(dict(zip(recipe.sources, config.sources)), base=config.base, tokenizer=None,
                          path=config.path)


def _where(spec: str | None, relative_to: Path | None) -> str | None:
    """A model's identity: its resolved folder, or the name as written (a hub id)."""
    if spec is None:
        return None
    found = resolve_path(spec, relative_to=relative_to)
    return str(found.resolve()) if found is not None else spec
