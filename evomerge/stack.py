"""Layer stacking (METHODS.md, "Layer stacking"; mergekit's passthrough; the data-flow space of Akiba et al.).

A recipe's `layers` list builds a model of T blocks: block j is block `layer` of `model` (the base, a source,
or `merged`, the recipe's own parameter-space merge), renumbered j, its residual-branch output projections
(attention output, MLP down: found inside the block's attention and MLP tensors) times `scale`. Embeddings
come from the base or the recipe's `embed_from`, final norm and head from the base or its `head_from`
(mergekit's first and last slices' models; `merged` where mergekit merges part of the layers);
`num_hidden_layers` becomes T, per-layer config lists follow the blocks.

Two ways to hold the result:
- `stacked_tensors` writes it as tensors under the new names (export, `evomerge merge`), and `to_mergekit`
  as mergekit passthrough slices that give the same tensors;
- `ResidentStack` makes it out of resident models without copying a weight: the stacked model's block list
  references their blocks, a scale multiplies the projections' outputs, and each block runs with its new
  position as its layer index (its KV-cache slot).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import InputError
from .recipe import MERGED, Recipe, StackEntry
from .sources import (
    Layout,
    SourceSet,
    block_prefix,
    block_tensors,
    is_output_projection,
)


def check_stack(recipe: Recipe, layout: Layout, *, file: str | None = None) -> None:
    """Every entry's block exists (headers only: the models share the base's layout)."""
    for i, entry in enumerate(recipe.layers):
        if entry.layer >= layout.num_layers:
            raise InputError(f"block {entry.layer}, but '{entry.model}' has {layout.num_layers} blocks "
                             f"(0-{layout.num_layers - 1})", file=file, field=f"layers[{i}].layer",
                             fix=f"a block index below {layout.num_layers}")


def stacked_tensors(recipe: Recipe, sources: SourceSet, merged: Mapping[str, torch.Tensor] | None,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stacked model's tensors under their new names, in the base's order (io) and the stack's (blocks)."""
    layout = sources.layout
    prefix = block_prefix(layout)
    folders = {f.spec: f for f in sources.models}
    out: dict[str, torch.Tensor] = {}
    io = [n for n, info in layout.tensors.items() if info.layer is None]
    first_block = min((i for i, n in enumerate(layout.tensors) if layout.tensors[n].layer is not None), default=0)
    names = list(layout.tensors)

    def outside(name: str) -> torch.Tensor:   # embeddings from embed_from, final norm and head from head_from
        model = recipe.embed_from if layout.tensors[name].kind == "embed" else recipe.head_from
        if model == MERGED:
            return _cast(merged[name], dtype)
        return _cast(sources.read(folders[model] if model is not None else sources.anchor, name), dtype)

    for name in io:       # the io tensors before the blocks keep their place before them
        if names.index(name) < first_block:
            out[name] = outside(name)
    for j, entry in enumerate(recipe.layers):
        for inner, name in block_tensors(layout, entry.layer).items():
            tensor = merged[name] if entry.model == MERGED else sources.read(folders[entry.model], name)
            kind = layout.tensors[name].kind
            if entry.scale_for(kind) != 1.0 and is_output_projection(inner, kind):
                tensor = (tensor.to(torch.float32) * entry.scale_for(kind))
            out[f"{prefix}{j}.{inner}"] = _cast(tensor, dtype)
    for name in io:
        if names.index(name) >= first_block:
            out[name] = outside(name)
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def stacked_config(config: Mapping[str, Any], layers: tuple[StackEntry, ...]) -> dict[str, Any]:
    """The base's config with T blocks; per-layer lists (layer_types, ...) follow the blocks."""
    out = dict(config)
    n = int(config.get("num_hidden_layers", 0) or 0)
    for key, value in config.items():
        if isinstance(value, list) and n and len(value) == n and key != "architectures":
            out[key] = [value[e.layer] for e in layers]
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            out[key] = len(layers)
    return out


def to_mergekit(recipe: Recipe, layout: Layout, paths: Mapping[str, str], dtype: str | None) -> dict | None:
    """mergekit 0.1.5 passthrough slices giving the same tensors; None where a block comes from `merged`."""
    if MERGED in [e.model for e in recipe.layers] + [recipe.embed_from, recipe.head_from]:
        return None
    names = {inner.rsplit(".", 1)[0]: layout.tensors[full].kind for inner, full in block_tensors(layout, 0).items()
             if is_output_projection(inner, layout.tensors[full].kind)}     # self_attn.o_proj: attn, ...
    slices = []
    for entry in recipe.layers:
        source: dict[str, Any] = {"model": paths[entry.model], "layer_range": [entry.layer, entry.layer + 1]}
        if entry.scaled:
            source["parameters"] = {"scale": [{"filter": n, "value": entry.scale_for(names[n])} for n in sorted(names)]
                                    + [{"value": 1.0}]}
        slices.append({"sources": [source]})
    # mergekit takes the embeddings from the first slice's model and the final norm and head from the last's;
    # an empty slice at either end makes them the recipe's embed_from and head_from (the base's where unset)
    head, embed = recipe.head_from or recipe.base, recipe.embed_from or recipe.base
    if recipe.layers[0].model != embed:
        slices.insert(0, {"sources": [{"model": paths[embed], "layer_range": [0, 0]}]})
    if recipe.layers[-1].model != head:
        slices.append({"sources": [{"model": paths[head], "layer_range": [0, 0]}]})
    config: dict[str, Any] = {"merge_method": "passthrough", "base_model": paths[recipe.base], "slices": slices}
    if dtype is not None:
        config["dtype"] = dtype
    return config


# -- the resident stack ----------------------------------------------------------------------------------------------

class _Scale:
    """The scales of the block now running (one forward at a time), read by its projections' hooks."""

    entry: StackEntry | None = None


class StackedBlock(torch.nn.Module):
    """Position j of a stack: a resident block (shared with other positions), run as layer j, scaled."""

    def __init__(self, block: torch.nn.Module, position: int, entry: StackEntry, current: _Scale) -> None:
        super().__init__()
        self.block, self.position, self.entry, self.current = block, position, entry, current
        self._indexed = [m for m in block.modules() if hasattr(m, "layer_idx")]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for module in self._indexed:        # the KV cache keys its slots by layer_idx: this position's own
            module.layer_idx = self.position
        self.current.entry = self.entry if self.entry.scaled else None
        try:
            return self.block(*args, **kwargs)
        finally:
            self.current.entry = None


class ResidentStack:
    """Stacks of resident models' blocks, made without copying a weight.

    `models` maps a model's name (as `layers` entries name it) to a loaded transformers model of the base's
    architecture; the first one named `base` is the one whose embeddings, norm and head the stack uses, and
    whose block list `apply` replaces (`restore` puts the original back)."""

    def __init__(self, models: Mapping[str, torch.nn.Module], *, base: str, layout: Layout) -> None:
        self.models, self.base = dict(models), base
        self.model = self.models[base]
        self.path = block_prefix(layout).rstrip(".")
        self.blocks = {name: model.get_submodule(self.path) for name, model in self.models.items()}
        self.original = self.blocks[base]
        self.config_keys = self.model.config.to_dict()
        self._changed: dict[str, Any] = {}     # the config entries `apply` set, to put back
        self.current = _Scale()
        # the output projections' modules inside a block: those of the tensors `stacked_tensors` scales
        outputs = {inner.rsplit(".", 1)[0]: layout.tensors[full].kind
                   for inner, full in block_tensors(layout, 0).items()
                   if is_output_projection(inner, layout.tensors[full].kind)}
        hooked: set[int] = set()
        for blocks in self.blocks.values():
            for block in blocks:
                for path, kind in sorted(outputs.items()):
                    module = block.get_submodule(path)
                    if id(module) not in hooked:
                        hooked.add(id(module))
                        module.register_forward_hook(lambda _m, _args, out, kind=kind: self._scaled(kind, out))

    def _scaled(self, kind: str, out: torch.Tensor) -> torch.Tensor:
        entry = self.current.entry
        scale = 1.0 if entry is None else entry.scale_for(kind)
        return out if scale == 1.0 else out * scale

    def apply(self, layers: tuple[StackEntry, ...]) -> torch.nn.Module:
        """The base model, its blocks now the stack's (no weight copied); returns it."""
        stack = torch.nn.ModuleList(StackedBlock(self.blocks[e.model][e.layer], j, e, self.current)
                                    for j, e in enumerate(layers))
        parent, _, attr = self.path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr, stack)
        self._reset_config()
        for key, value in stacked_config(self.config_keys, layers).items():
            if value != self.config_keys[key]:
                setattr(self.model.config, key, value)
                self._changed[key] = self.config_keys[key]
        return self.model

    def restore(self) -> None:
        parent, _, attr = self.path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr, self.original)
        self._reset_config()
        for i, block in enumerate(self.original):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = i

    def _reset_config(self) -> None:
        """The base's own config entries back where `apply` changed them."""
        for key, value in self._changed.items():
            setattr(self.model.config, key, value)
        self._changed.clear()
