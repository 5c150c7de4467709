"""A linear-in-δ merge of LoRA adapters, written as one PEFT adapter that peft loads over the base.

W0 + Σ_i c_i · L_i · R_i (methods/lowrank.py) is itself a low-rank update: per module, the concatenated
factors [c_1 L_1 … c_K L_K] and [R_1; …; R_K], of rank Σ r_i. Written as B and A with lora_alpha = r
(scaling 1), zero-padded to one rank for every module, it is exact: no SVD, no truncation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapters import CONFIG, PREFIX, WEIGHTS
from ..errors import InputError
from ..methods import resolve
from ..methods.lowrank import COEFFICIENTS, concatenated
from ..plan import MergePlan
from ..recipe import Recipe
from ..sources import SourceSet
from .folder import atomic_dir, check_destination


def adapter_refusal(recipe: Recipe, sources: SourceSet) -> str | None:
    """Why the merge cannot be one adapter, or None where it can."""
    if recipe.layers:
        return "a stack of blocks is no single adapter"
    if not sources.sources or not all(f.is_adapter for f in sources.sources):
        return "a merged adapter needs every source to be a LoRA adapter"
    if recipe.method not in COEFFICIENTS:
        return f"{recipe.method} is not linear in the task vectors ({', '.join(COEFFICIENTS)} are)"
    if len({bool(f.config.get("fan_in_fan_out")) for f in sources.sources}) > 1:
        return "the adapters disagree on fan_in_fan_out"
    return None


def merged_factors(recipe: Recipe, sources: SourceSet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base tensor name -> (L, R) with the merge's task vector = L @ R, float32, rank Σ r_i of what reaches it."""
    plan = MergePlan.of(recipe, sources.layout)
    k = len(sources.sources)
    out = {}
    for name in sources.layout.tensors:
        pairs = [folder.low_rank(name) for folder in sources.sources]
        if all(pair is None for pair in pairs):
            continue
        slot = plan.slot(name)
        p = resolve(plan.spec, slot.shared, slot.values, k=k, device="cpu", dtype=torch.float32)
        base_scale, coefficients = COEFFICIENTS[plan.method](p)
        if base_scale != 1.0:
            raise InputError(f"the merge scales the base by {base_scale:g} in '{name}', which no adapter can",
                             file=str(recipe.path) if recipe.path else None, field="parameters",
                             fix="use task_arithmetic, or linear with normalize: true")
        out[name] = concatenated(coefficients.tolist(), pairs)
    return out


def write_adapter(recipe: Recipe, sources: SourceSet, out: str | Path, *, force: bool = False) -> Path:
    """Write the merge `recipe` describes as one PEFT LoRA adapter folder (atomically)."""
    from safetensors.torch import save_file

    refusal = adapter_refusal(recipe, sources)
    if refusal is not None:
        raise InputError(refusal, file=str(recipe.path) if recipe.path else None, field="method",
                         fix="export the merged model instead")
    out = Path(out)
    check_destination(out, force=force)
    factors = merged_factors(recipe, sources)
    rank = max(left.shape[1] for left, _ in factors.values())
    transposed = {name: any(f.factors[name].transpose for f in sources.sources if name in f.factors)
                  for name in factors}
    tensors, modules = {}, []
    for name, (left, right) in factors.items():
        pad = rank - left.shape[1]
        left = torch.nn.functional.pad(left, (0, pad))            # zero columns: they add nothing
        right = torch.nn.functional.pad(right, (0, 0, 0, pad))    # zero rows
        module = name.removesuffix(".weight")
        modules.append(module)
        if transposed[name] and sources.layout.tensors[name].kind == "embed":
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = left.T.contiguous()
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = right.T.contiguous()
        elif transposed[name]:       # fan_in_fan_out: δ = (B A)ᵀ
            tensors[f"{PREFIX}{module}.lora_A.weight"] = left.T.contiguous()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = right.T.contiguous()
        else:
            tensors[f"{PREFIX}{module}.lora_B.weight"] = left.contiguous()
            tensors[f"{PREFIX}{module}.lora_A.weight"] = right.contiguous()
    first = sources.sources[0].config
    config = {
        "peft_type": "LORA", "task_type": first.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": sources.base.hub_id or recipe.base,
        "r": rank, "lora_alpha": rank, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": bool(first.get("fan_in_fan_out")), "target_modules": sorted(modules),
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "revision": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "evomerge_recipe_sha256": recipe.sha256()})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
