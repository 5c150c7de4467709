"""A recipe resolved against a model, once: every tensor's slot and every slot's method parameters.

The lookup rule lives here and nowhere else. For a tensor named n, of layer group g and module kind k,
a per-source parameter's value is, most specific first: the first name filter whose `match` is in n
and sets it, ``filters[k]``, ``filters.io`` (outside the blocks), ``parameters``, the method's default;
a shared one's: the first matching name filter's, the recipe's own, the default. A list gives one value
per layer group, and its first value for a tensor outside the blocks (IO_GROUP: mergekit's convention
for tensors outside the layer range).

Tensors that the rule cannot tell apart share a slot. `MergePlan.of(recipe, layout)` validates each slot
once (the constraints across parameters) and maps every tensor to its slot; the kernel, the mergekit and
adapter exports, the gradient learner and the plots read the plan, never the recipe's values. `check`
runs the same constraints at parse time, on every slot a model could have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import InputError
from .methods import MethodSpec
from .sources import IO_GROUP, MODULE_KINDS, Layout

_SUM_NORMALIZED = {"linear", "task_arithmetic", "breadcrumbs", "dare_linear", "della_linear"}


@dataclass(frozen=True)
class Slot:
    """The values of the tensors of one layer group and module kind that the same name filters match."""

    group: int | str
    kind: str
    shared: Mapping[str, Any]                     # shared parameter -> value
    values: Mapping[str, tuple[float, ...]]      # per-source parameter -> one value per source, in source order
    example: str | None = None                    # a tensor that falls into it (None: any, before a model is known)


@dataclass(frozen=True)
class MergePlan:
    """What the kernel and the exports need of a recipe, for one model: the tensor -> slot map and the slots."""

    spec: MethodSpec
    sources: tuple[str, ...]
    base: str | None
    dtype: str | None
    seed: int
    layer_groups: int
    slots: tuple[Slot, ...]
    of_tensor: Mapping[str, int]                  # tensor name -> index into `slots`

    @classmethod
    def of(cls, recipe, layout: Layout) -> "MergePlan":
        """The plan of `recipe` (a recipe.Recipe) over `layout`, each slot validated."""
        file = str(recipe.path) if recipe.path else None
        layout.check_groups(recipe.layer_groups, file=file)
        keys: dict[tuple, int] = {}
        slots: list[Slot] = []
        of_tensor: dict[str, int] = {}
        for name, info in layout.tensors.items():
            group = layout.group(name, recipe.layer_groups)
            key = slot_key(recipe, name, group, info.kind)
            if key not in keys:
                keys[key] = len(slots)
                slots.append(_slot(recipe, group, info.kind, name))
            of_tensor[name] = keys[key]
        for slot in sorted(slots, key=lambda s: str((s.group, s.kind))):
            _check_slot(recipe, slot, file=file)
        return cls(spec=recipe.spec, sources=tuple(recipe.sources), base=recipe.base, dtype=recipe.dtype,
                   seed=recipe.seed, layer_groups=recipe.layer_groups, slots=tuple(slots), of_tensor=of_tensor)

    @property
    def method(self) -> str:
        return self.spec.name

    def slot(self, tensor: str) -> Slot:
        return self.slots[self.of_tensor[tensor]]

    def value(self, tensor: str, source: str, name: str) -> float:
        """One source's value of a per-source parameter for one tensor."""
        return self.slot(tensor).values[name][self.sources.index(source)]

    def whole(self, tensor: str) -> bool:
        """Whether the tensor merges whole (per-tensor statistics, or l1 rescaling's norms), not chunk by chunk."""
        return self.spec.whole_tensor or self.slot(tensor).shared.get("rescale") == "l1"


# -- the lookup rule ------------------------------------------------------------------
def _pick(value: Any, group: int | str) -> float:
    if isinstance(value, tuple):
        return float(value[0 if group == IO_GROUP else group])
    return float(value)


def _matching(recipe, tensor: str | None) -> list:
    return [f for f in recipe.name_filters if tensor is not None and f.match in tensor]


def shared_values(recipe, group: int | str = 0, tensor: str | None = None) -> dict[str, Any]:
    """The shared parameters for a tensor of layer group `group` named `tensor`."""
    out = {}
    for param in recipe.spec.shared_params:
        value = next((f.shared[param.name] for f in _matching(recipe, tensor) if param.name in f.shared),
                     recipe.shared.get(param.name, param.default))
        out[param.name] = _pick(value, group) if isinstance(value, tuple) else value
    return out


def value(recipe, source: str, name: str, group: int | str, kind: str, tensor: str | None = None) -> float:
    """One source's value of per-source parameter `name` for a tensor of (group, kind) named `tensor`."""
    scopes = [f.parameters for f in _matching(recipe, tensor)]
    scopes += [recipe.filters.get(kind, {}), recipe.filters.get(IO_GROUP, {}) if group == IO_GROUP else {},
               recipe.parameters]
    for scope in scopes:
        entry = scope.get(source, {})
        if name in entry:
            return _pick(entry[name], group)
    return float(recipe.spec.param(name).default)


def slot_key(recipe, tensor: str, group: int | str, kind: str) -> tuple:
    """What a tensor's values depend on: tensors with the same key take the same values."""
    return group, kind, tuple(i for i, f in enumerate(recipe.name_filters) if f.match in tensor)


def _slot(recipe, group: int | str, kind: str, tensor: str | None) -> Slot:
    values = {p.name: tuple(value(recipe, src, p.name, group, kind, tensor) for src in recipe.sources)
              for p in recipe.spec.source_params}
    return Slot(group, kind, shared_values(recipe, group, tensor), values, tensor)


# -- constraints across parameters ----------------------------------------------------------
def check(recipe, *, file: str | None) -> None:
    """The constraints on every slot a tensor of any model could fall into: every kind outside the blocks,
    every kind but embeddings and heads inside them, each name filter's match standing for a tensor name."""
    blocks = [(g, k) for g in range(recipe.layer_groups) for k in MODULE_KINDS if k not in ("embed", "head")]
    outside = [(IO_GROUP, k) for k in sorted(MODULE_KINDS, key=lambda k: k not in ("embed", "head"))]
    names = [None] + [f.match for f in recipe.name_filters]
    for group, kind in blocks + outside:
        for name in names:
            _check_slot(recipe, _slot(recipe, group, kind, name), file=file)


def _check_slot(recipe, slot: Slot, *, file: str | None) -> None:
    values, shared = slot.values, slot.shared
    where = f"group {slot.group}, {slot.kind} tensors" + (f" named like '{slot.example}'" if slot.example else "")
    filtered = slot.kind in recipe.filters or (slot.group == IO_GROUP and IO_GROUP in recipe.filters)
    field = "name_filters" if _matching(recipe, slot.example) else "filters" if filtered else "parameters"
    if shared.get("normalize") and "weight" in values and recipe.spec.name in _SUM_NORMALIZED:
        if abs(sum(values["weight"])) < 1e-8:
            raise InputError(f"weights sum to 0 with normalize on ({where})", file=file, field=field,
                             fix="change a weight or set normalize: false")
    if "epsilon" in values and "density" in values:     # della's keep probabilities
        for src, d, e in zip(recipe.sources, values["density"], values["epsilon"]):
            if not (d - e > 0 and d + e <= 1):
                raise InputError(f"density {d:g} ± epsilon {e:g} leaves (0, 1] for '{src}' ({where})",
                                 file=file, field=field, fix="need 0 < density - epsilon and density + epsilon <= 1")
