"""mergekit's parameter settings, read as a recipe's fields (from_mergekit.py reads the rest of a config).

mergekit looks a tensor's parameter up in the model's own settings, then the slice's, the module's, the
config's. A setting is a value; a gradient, a list interpolated over a slice's layers (block i of a slice of n
at t = i / (n - 1), t = 1 where n = 1; the embeddings at the first slice's t = 0, the final norm and head at
the last slice's); or a list of {filter, value} entries, of which the first whose filter is a substring of
the tensor's name applies (none: the next scope).
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
    """Each (slice, source, parameter)'s lookup chain over mergekit's scopes, flattened to (filter, value)
    entries (filter None: every tensor), and the recipe fields that give every tensor mergekit's value.

    `pieces` are the slices' blocks, in order, each block in one at most (one piece: a `models:` config).
    mergekit gives a block of a piece of n blocks its gradient value at t = i / (n - 1) (t = 1 where n = 1),
    the tensors before the blocks (embeddings) the first piece's at t = 0, and those after them (final norm,
    head) the last piece's at t = 0. The recipe says the same with one value per block where any differ,
    name filters in an order every chain agrees with, and an exact-name filter for a tensor outside the
    blocks whose value is not its filter's first one."""

    def __init__(self, spec: MethodSpec, layout, file: str, pieces: list[range] | None = None) -> None:
        self.spec, self.layout, self.file = spec, layout, file
        self.pieces = pieces or [range(layout.num_layers)]
        self.chains: dict[tuple[int, str | None, str], list[tuple[str | None, Any]]] = {}
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
            if name == "rescale" and value and "rescale" not in names:
                raise InputError(f"{self.spec.name} with rescale: true (an l1 rescale of its trim) has no recipe form",
                                 file=self.file, field=f"{where}.{name}", fix="remove it, or set it false")
            if name in names and names[name].scope == "shared" and not shared_too:
                raise InputError(f"'{name}' is one value for all models: mergekit ignores it here", file=self.file,
                                 field=f"{where}.{name}", fix="set it under the top-level parameters")

    def add(self, name: str, scopes: list[Mapping | None], *, source: str | None = None, piece: int = 0) -> None:
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
        self.chains[(piece, source, name)] = entries

    # -- mergekit's value of one tensor --------------------------------------------------------
    def _position(self, tensor: str) -> tuple[int, float] | None:
        """The piece whose settings a tensor takes, and its t (None: a block no slice takes)."""
        info = self.layout.tensors[tensor]
        if info.layer is None:
            return (0 if info.kind == "embed" else len(self.pieces) - 1), 0.0
        piece = next((k for k, blocks in enumerate(self.pieces) if info.layer in blocks), None)
        if piece is None:
            return None
        n = len(self.pieces[piece])
        return piece, (info.layer - self.pieces[piece].start) / (n - 1) if n > 1 else 1.0

    def value(self, source: str | None, name: str, tensor: str) -> Any:
        """mergekit's value of a parameter for a tensor: its piece's chain, the first entry whose filter is in
        the name, a gradient at the tensor's t; None where nothing sets it (the method's default)."""
        piece, t = self._position(tensor) or (None, 0.0)
        for match, value in self.chains.get((piece, source, name), []):
            if match is None or match in tensor:
                return self._at(value, t, name, source)
        if name in DEFAULTS:
            return DEFAULTS[name]
        if self.spec.name in REQUIRED.get(name, ()):
            raise InputError(f"no {name} for tensor '{tensor}'" + (f" of {source}" if source else ""),
                             file=self.file, field=f"parameters.{name}",
                             fix=f"give {name} a value without a filter (mergekit requires one)")
        return None

    def _at(self, value: Any, t: float, name: str, source: str | None) -> Any:
        if not isinstance(value, list):
            return value
        if not value or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise InputError("a gradient is a non-empty list of numbers", file=self.file,
                             field=f"parameters.{name}" if source is None else f"{source}.parameters.{name}")
        return interpolate(value, t)

    # -- the recipe ----------------------------------------------------------------------------
    def recipe_fields(self) -> dict[str, Any]:
        order = self._filter_order()
        fields: dict[str, Any] = {}
        parameters: dict[str, dict[str, Any]] = {}
        filters: dict[str, dict[str, Any]] = {match: {"match": match} for match in order}
        exact: dict[str, dict[str, Any]] = {}
        keys = dict.fromkeys((source, name) for _, source, name in self.chains)
        for source, name in keys:
            param = self.spec.param(name)
            if not param.numeric:
                fields.update(self._choice(name))
                continue
            setters = [m for m in order if any(m == match for (_, s, n), chain in self.chains.items()
                                               if (s, n) == (source, name) for match, _ in chain)]
            for match, value, outside in self._groups(source, name, setters):
                if isinstance(value, list):
                    value = [param.default if v is None else v for v in value]
                if match is None:       # nothing set: the method's default (mergekit's, where DEFAULTS agree)
                    if value is not None:
                        (fields if source is None else parameters.setdefault(source, {}))[name] = value
                else:
                    _put(filters[match], source, name, param.default if value is None else value)
                for tensor, wanted in outside.items():
                    _put(exact.setdefault(tensor, {"match": tensor}), source, name,
                         param.default if wanted is None else wanted)
        lists = any(isinstance(v, list) for v in _leaves([fields, parameters, filters]))
        fields["layer_groups"] = self.blocks if lists else 1
        fields["parameters"] = parameters
        for tensor in exact:
            if any(tensor in other for other in self.names if other != tensor):
                raise InputError(f"'{tensor}' takes a value of its own that a name filter cannot single out",
                                 file=self.file, field="parameters")
        named = list(exact.values()) + [f for f in filters.values() if len(f) > 1]
        if named:
            fields["name_filters"] = named
        return fields

    def _groups(self, source: str | None, name: str, setters: list[str]):
        """(filter or None, value: a scalar or one per block, {tensor outside the blocks: its own value}) for
        each group of tensors that the recipe's lookup sends to the same entry."""
        inside: dict[str | None, list[Any]] = {m: [_UNSET] * self.blocks for m in [*setters, None]}
        outside: dict[str | None, dict[str, Any]] = {m: {} for m in inside}
        for tensor in self.names:
            if self._position(tensor) is None:      # in no slice: its value is never used
                continue
            match = next((m for m in setters if m in tensor), None)
            value = self.value(source, name, tensor)
            layer = self.layout.tensors[tensor].layer
            if layer is None:
                outside[match][tensor] = value
            elif inside[match][layer] is _UNSET:
                inside[match][layer] = value
            elif inside[match][layer] != value:
                raise InputError(f"'{name}' differs between tensors of block {layer} that the recipe cannot tell "
                                 f"apart ('{tensor}')", file=self.file, field=f"parameters.{name}",
                                 fix="give the tensors of a block that one filter matches one value")
        for match, values in inside.items():
            known = [v for v in values if v is not _UNSET]
            if not known and not outside[match]:
                continue
            if not known:               # only tensors outside the blocks: the first one's value
                known = [next(iter(outside[match].values()))]
            filled = _fill(values, known[0])
            first = filled[0]
            own = {t: v for t, v in outside[match].items() if v != first}
            yield match, filled if len(set(filled)) > 1 else first, own

    def _choice(self, name: str) -> dict[str, Any]:
        """A choice (normalize, rescale, ...): one value for every tensor."""
        chains = [chain for (_, _, n), chain in self.chains.items() if n == name]
        if any(match is not None or isinstance(value, list) for chain in chains for match, value in chain):
            raise InputError(f"'{name}' varies over the tensors, which a recipe cannot say", file=self.file,
                             field=f"parameters.{name}", fix="give it one value")
        default = True if name == "rescale" else self.spec.param(name).default     # mergekit's rescale: true
        values = {bool(v) if name == "rescale" else v for v in (chain[0][1] if chain else default for chain in chains)}
        if len(values) > 1:
            raise InputError(f"'{name}' differs between slices, which a recipe cannot say", file=self.file,
                             field=f"parameters.{name}", fix="give it one value")
        value = values.pop()
        if name == "rescale":               # evomerge's default differs: always written
            return {"rescale": DARE_RESCALE[value]}
        return {name: value} if any(chains) else {}

    def _filter_order(self) -> list[str]:
        """The filters in an order every chain agrees with, where two filters can match the same tensor."""
        before: dict[str, set[str]] = {}
        seen: list[str] = []
        for chain in self.chains.values():
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


_UNSET = object()


def _put(entry: dict[str, Any], source: str | None, name: str, value: Any) -> None:
    """A value into a name filter's entry: shared at its top, a source's under its parameters."""
    if source is None:
        entry[name] = value
    else:
        entry.setdefault("parameters", {}).setdefault(source, {})[name] = value


def _fill(values: list[Any], default: Any) -> list[Any]:
    """A block no tensor of the group falls into takes its predecessor's value (the first one's: `default`)."""
    out, last = [], default
    for value in values:
        last = last if value is _UNSET else value
        out.append(last)
    return out


def _leaves(tree: Any):
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, list) and tree and isinstance(tree[0], Mapping):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


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


def interpolate(values: list[float], t: float) -> float:
    """mergekit's gradient: the list spread evenly over [0, 1], linear between neighbours."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * values[i0] + frac * values[i1])
