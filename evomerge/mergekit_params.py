"""mergekit's parameter settings, read as a recipe's fields (from_mergekit.py reads the rest of a config).

mergekit looks a tensor's parameter up in the model's own settings, then the slice's, then the config's. A
setting is a value; a gradient, a list interpolated over the layers (block l of L at t = l / (L - 1), a tensor
outside the blocks at t = 0); or a list of {filter, value} entries, of which the first whose filter is a
substring of the tensor's name applies (none: the next scope).
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import InputError
from .methods import MethodSpec

IGNORED = {"int8_mask": (False, True)}           # a memory option: any value gives the same tensors
DEFAULTS = {"density": 1.0}                      # mergekit's, where evomerge's differ
REQUIRED = {"weight": {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                       "breadcrumbs_ties", "della", "della_linear", "nuslerp", "multislerp"},
            "t": {"slerp", "nearswap"}}
DARE_RESCALE = {True: "l1", False: "none"}       # mergekit's rescale: true (its default for DARE and DELLA)


class Reader:
    """Each (source, parameter)'s lookup chain over mergekit's scopes, flattened to (filter, value) entries
    (filter None: every tensor), and the recipe fields that give the same value to every tensor."""

    def __init__(self, spec: MethodSpec, layout, file: str) -> None:
        self.spec, self.layout, self.file = spec, layout, file
        self.chains: dict[tuple[str | None, str], list[tuple[str | None, Any]]] = {}
        self.names = list(layout.tensors)
        self.blocks = layout.num_layers

    def check_scope(self, scope: object, where: str, *, shared_too: bool = False) -> None:
        if scope is None:
            return
        if not isinstance(scope, Mapping):
            raise InputError("must be a mapping of parameter to setting", file=self.file, field=where)
        names = {p.name: p for p in self.spec.params}
        for name, value in scope.items():
            if name in IGNORED:
                continue
            if name == "filter_wise" and value:
                raise InputError("model_stock's filter_wise has no recipe form", file=self.file,
                                 field=f"{where}.{name}", fix="remove it (the default, false)")
            if name == "rescale" and value and "rescale" not in names:
                raise InputError(f"{self.spec.name} with rescale: true (an l1 rescale of its trim) has no recipe form",
                                 file=self.file, field=f"{where}.{name}", fix="remove it, or set it false")
            if name in names and names[name].scope == "shared" and not shared_too:
                raise InputError(f"'{name}' is one value for all models: mergekit ignores it here", file=self.file,
                                 field=f"{where}.{name}", fix="set it under the top-level parameters")

    def add(self, name: str, scopes: list[Mapping | None], *, source: str | None = None) -> None:
        entries: list[tuple[str | None, Any]] = []
        where = f"parameters.{name}" if source is None else f"{source}: {name}"
        for scope in scopes:
            if scope is None or name not in scope:
                continue
            for match, value in flatten(scope[name], file=self.file, where=where):
                if match is not None and any(m == match for m, _ in entries):
                    continue          # an earlier entry with this filter wins
                entries.append((match, value))
                if match is None:
                    break
            if entries and entries[-1][0] is None:
                break
        self.chains[(source, name)] = entries

    # -- the recipe ----------------------------------------------------------------------------
    def recipe_fields(self) -> dict[str, Any]:
        gradients = any(isinstance(v, list) for chain in self.chains.values() for _, v in chain)
        order = self._filter_order()
        fields: dict[str, Any] = {"layer_groups": self.blocks if gradients else 1}
        parameters: dict[str, dict[str, Any]] = {}
        filters: dict[str, dict[str, Any]] = {match: {"match": match} for match in order}
        for (source, name), chain in self.chains.items():
            param = self.spec.param(name)
            if not param.numeric:
                fields.update(self._choice(name, chain))
                continue
            for match, value in chain:
                value = self._values(value, name, source)
                if match is not None:
                    entry = filters[match]
                    if source is None:
                        entry[name] = value
                    else:
                        entry.setdefault("parameters", {}).setdefault(source, {})[name] = value
                elif source is None:
                    fields[name] = value
                else:
                    parameters.setdefault(source, {})[name] = value
            if not chain or chain[-1][0] is not None:       # tensors no filter reaches take the default
                self._check_covered(name, source, [m for m, _ in chain])
                if name in DEFAULTS:
                    (fields if source is None else parameters.setdefault(source, {}))[name] = DEFAULTS[name]
        fields["parameters"] = parameters
        named = [f for f in filters.values() if len(f) > 1]
        if named:
            fields["name_filters"] = named
        return fields

    def _choice(self, name: str, chain: list[tuple[str | None, Any]]) -> dict[str, Any]:
        """A choice (normalize, rescale, ...): one value for every tensor."""
        if any(match is not None or isinstance(value, list) for match, value in chain):
            raise InputError(f"'{name}' varies over the tensors, which a recipe cannot say", file=self.file,
                             field=f"parameters.{name}", fix="give it one value")
        if name == "rescale":
            value = chain[0][1] if chain else True
            return {"rescale": DARE_RESCALE[bool(value)]}
        return {name: chain[0][1]} if chain else {}

    def _values(self, value: Any, name: str, source: str | None) -> Any:
        """A scalar, or one value per block: the gradient at t = l / (L - 1), as mergekit computes it."""
        if not isinstance(value, list):
            return value
        if not value or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise InputError("a gradient is a non-empty list of numbers", file=self.file,
                             field=f"parameters.{name}" if source is None else f"{source}.parameters.{name}")
        if self.blocks == 1:
            raise InputError("a gradient over a one-block model has no recipe form", file=self.file,
                             field=f"parameters.{name}", fix="give a single value")
        return [_interpolate(value, block / (self.blocks - 1)) for block in range(self.blocks)]

    def _filter_order(self) -> list[str]:
        """The filters in an order every chain agrees with, where two filters can match the same tensor."""
        before: dict[str, set[str]] = {}
        seen: list[str] = []
        for (source, name), chain in self.chains.items():
            matches = [m for m, _ in chain if m is not None]
            for i, a in enumerate(matches):
                if a not in seen:
                    seen.append(a)
                for b in matches[i + 1:]:
                    if any(a in t and b in t for t in self.names):
                        before.setdefault(a, set()).add(b)
        order: list[str] = []
        placing: set[str] = set()

        def place(match: str, via: str) -> None:
            if match in order:
                return
            if match in placing:
                raise InputError(f"the filters '{match}' and '{via}' come in opposite orders for tensors both "
                                 "match", file=self.file, field="parameters",
                                 fix="list shared filters in one order everywhere")
            placing.add(match)
            for earlier in [a for a in seen if match in before.get(a, set())]:
                place(earlier, match)
            placing.discard(match)
            order.append(match)

        for match in seen:
            place(match, match)
        return order

    def _check_covered(self, name: str, source: str | None, matches: list[str | None]) -> None:
        """mergekit requires weight (and slerp's t) for every tensor: a tensor no filter reaches is an error there."""
        if self.spec.name not in REQUIRED.get(name, ()):
            return
        missing = next((t for t in self.names if not any(m is not None and m in t for m in matches)), None)
        if missing is not None:
            raise InputError(f"no {name} for tensor '{missing}'" + (f" of {source}" if source else ""),
                             file=self.file, field=f"parameters.{name}",
                             fix=f"give {name} a value without a filter (mergekit requires one)")


def flatten(setting: object, *, file: str, where: str) -> list[tuple[str | None, Any]]:
    """A mergekit setting as (filter, value) entries in order: a list of {filter, value} entries (filter None or
    "*": every tensor), or one entry for a value or a gradient."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list) or not setting or not isinstance(setting[0], Mapping):
        return [(None, setting)]
    out = []
    for i, entry in enumerate(setting):
        if not isinstance(entry, Mapping) or "value" not in entry:
            raise InputError("a conditional entry needs a value", file=file, field=f"{where}[{i}]")
        extra = sorted(set(entry) - {"value", "filter"})
        if extra:
            fix = ("mergekit 0.1.5 ignores 'pattern', so this value would reach every tensor: name the "
                   "substring with filter:") if "pattern" in extra else "an entry has filter and value"
            raise InputError(f"unknown key '{extra[0]}'", file=file, field=f"{where}[{i}].{extra[0]}", fix=fix)
        match = entry.get("filter")
        out.append((None if match in (None, "*") else str(match), entry["value"]))
    return out


def _interpolate(values: list[float], t: float) -> float:
    """mergekit's gradient: the list spread evenly over [0, 1], linear between neighbours."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * values[i0] + frac * values[i1])
