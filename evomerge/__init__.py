"""evomerge: find good model merges automatically.

>>> import evomerge
>>> recipe = evomerge.Recipe.from_yaml("recipe.yaml")
>>> model = evomerge.merge(recipe, device="cpu")
>>> scores = evomerge.evaluate(model, tasks="tasks.yaml", split="heldout")
>>> run = evomerge.search("configs/demo.yaml")

Heavy modules (torch, transformers, lm_eval, matplotlib) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Recipe": ("evomerge.recipe", "Recipe"),
    "merge": ("evomerge.build", "merge"),
    "ResidentMerger": ("evomerge.kernel", "ResidentMerger"),
    "merge_to_folder": ("evomerge.export", "merge_to_folder"),
    "open_sources": ("evomerge.sources", "open_sources"),
    "merge_tensors": ("evomerge.methods", "merge_tensors"),
    "evaluate": ("evomerge.evaluate", "evaluate"),
    "load_tasks": ("evomerge.evaluate", "load_tasks"),
    "search": ("evomerge.search", "search"),
    "SearchConfig": ("evomerge.config", "SearchConfig"),
    "build_zoo": ("evomerge.zoo", "build_zoo"),
    "InputError": ("evomerge.errors", "InputError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
