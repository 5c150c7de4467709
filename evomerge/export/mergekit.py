"""Express a deterministic recipe as mergekit YAML that gives the same tensors.

mergekit reads a list as a gradient over the layers (t = layer / (L - 1)) and a
tensor outside the layers at t = 0; conditional entries match a substring of the
tensor name. So each per-source parameter becomes a per-layer list (one value per
layer, from its group), with exact-name filters for the tensors outside the
blocks and suffix filters for module kinds whose values differ.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..plan import MergePlan
from ..recipe import Recipe
from ..sources import _BLOCK, Layout

# mergekit's generalized task arithmetic: it rescales kept entries unless told not to
_TASK_ARITHMETIC_FAMILY = frozenset({"task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"})


def to_mergekit(recipe: Recipe, layout: Layout, paths: Mapping[str, str]) -> dict[str, Any] | None:
    """The mergekit config, or None when the method has no identical mergekit counterpart."""
    spec = recipe.spec
    if spec.mergekit is None:
        return None
    plan = MergePlan.of(recipe, layout)
    models = []
    if spec.name == "slerp":
        models.append({"model": paths[recipe.base]})
    for i, src in enumerate(recipe.sources):
        params = {p.name: _setting(layout, {t: plan.slot(t).values[p.name][i] for t in layout.tensors})
                  for p in spec.source_params}
        models.append({"model": paths[src], "parameters": params} if params else {"model": paths[src]})
    config: dict[str, Any] = {"merge_method": spec.mergekit}
    if spec.needs_base and recipe.base is not None:
        config["base_model"] = paths[recipe.base]
    config["models"] = models
    per_tensor = {t: plan.slot(t).shared for t in layout.tensors}
    shared = {}
    for param in spec.shared_params:      # numeric ones may differ per layer group and by name filter
        values = {t: v[param.name] for t, v in per_tensor.items()}
        shared[param.name] = _setting(layout, values) if param.numeric else next(iter(values.values()))
    if spec.name in _TASK_ARITHMETIC_FAMILY:
        shared["rescale"] = False
    if shared:
        config["parameters"] = shared
    # as the kernel: float32 arithmetic (float64 for float64 sources), the output in the recipe's dtype or
    # else the sources' (mergekit would write its working dtype: a bfloat16 model came out float32)
    out_dtype = recipe.dtype or str(layout.float_dtype).removeprefix("torch.")
    config["dtype"] = "float64" if layout.float_dtype == torch.float64 else "float32"
    config["out_dtype"] = out_dtype
    return config


def converted_on_load(model_type: str | None, names: Iterable[str]) -> list[str]:
    """Checkpoint tensors that transformers renames or fuses as it loads them (per-expert MoE tensors stacked
    into one per layer, Mixtral's block_sparse_moe renamed mlp). mergekit 0.1.5 merges in that loaded layout,
    so its whole-tensor statistics (TIES thresholds, the slerp angle, model_stock's cosine) span all experts
    where evomerge's span one, and filters miss the new names: no mergekit YAML gives evomerge's tensors."""
    if not model_type or not _may_convert(model_type):
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter, apply_converters, apply_renamings
    except ImportError:          # a transformers that loads checkpoints as they are
        return []
    mapping = get_checkpoint_conversion_mapping(model_type) if model_type else None
    if not mapping:
        return []
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    return [n for n in names if apply_converters(n, converters)[1] is not None or apply_renamings(n, renamings) != n]


def _may_convert(model_type: str) -> bool:
    """Whether transformers' conversion mapping names `model_type` at all, read from its source text: importing
    it costs seconds of a one-off merge (half of one on SmolLM2), and most model types have no mapping. A
    transformers without the file has none; one whose source cannot be read is asked (True)."""
    import importlib.util

    package = importlib.util.find_spec("transformers")      # (a submodule's spec would import the package)
    if package is None or package.origin is None:
        return True
    source = Path(package.origin).parent / "conversion_mapping.py"
    if not source.is_file():
        return False
    try:
        text = source.read_text()
    except OSError:
        return True
    return f'"{model_type}"' in text or f"'{model_type}'" in text


def _setting(layout: Layout, values: Mapping[str, Any]) -> Any:
    """A parameter's value per tensor as one mergekit setting: a scalar where all agree, else per-layer lists
    (gradients through every layer's value) by module suffix, and exact-name filters outside the blocks."""
    distinct = set(values.values())
    if len(distinct) == 1:
        return distinct.pop()
    entries: list[dict[str, Any]] = []
    per_suffix: dict[str, list[float]] = {}
    for tname, info in layout.tensors.items():
        if info.layer is None:
            entries.append({"filter": tname, "value": values[tname]})
            continue
        match = _BLOCK.search(tname)
        suffix = tname[match.end() - 1:]          # ".self_attn.q_proj.weight"
        per_suffix.setdefault(suffix, [0.0] * layout.num_layers)[info.layer] = values[tname]
    if per_suffix:
        common = Counter(tuple(v) for v in per_suffix.values()).most_common(1)[0][0]
        for suffix, layer_values in per_suffix.items():
            if tuple(layer_values) != common:
                entries.append({"filter": suffix, "value": _collapse(layer_values)})
        entries.append({"value": _collapse(list(common))})
    return entries


def _collapse(values: list[float]) -> float | list[float]:
    return values[0] if len(set(values)) == 1 else values
