"""A recipe's parameter values as written: per source, shared, and under name filters, validated against the
method's declared specs (methods/base.py). recipe.py builds the Recipe from them and looks values up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError
from .methods import MethodSpec, ParamSpec

MERGED = "merged"          # a `layers` entry's model: the recipe's own parameter-space merge (PS + DFS)
Value = float | tuple[float, ...]                  # one value, or one per layer group
SourceParams = Mapping[str, Mapping[str, Value]]   # source spec -> param -> value


@dataclass(frozen=True)
class NameFilter:
    """mergekit's `filter:`: values for the tensors whose name contains `match`. Of a recipe's name filters the
    first that matches a tensor and sets a parameter gives it, before the module-kind filters."""

    match: str
    shared: Mapping[str, Value] = field(default_factory=dict)       # shared parameters (t, lambda, ...)
    parameters: SourceParams = field(default_factory=dict)          # per source

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match, **self.shared}
        if self.parameters:
            out["parameters"] = {src: dict(params) for src, params in self.parameters.items()}
        return out


def check_value(param: ParamSpec, value: Any, groups: int, *, file: str | None, where: str) -> Any:
    """A scalar, or (numeric parameters) one value per layer group."""
    if isinstance(value, list) and param.numeric:
        if len(value) != groups:
            raise InputError(f"has {len(value)} values but layer_groups is {groups}", file=file, field=where,
                             fix="give one value per layer group, or a scalar")
        return tuple(param.check(v, file=file, where=f"{where}[{i}]") for i, v in enumerate(value))
    return param.check(value, file=file, where=where)


def parse_shared(data: Mapping[str, Any], spec: MethodSpec, names: tuple[str, ...], groups: int, *,
                 file: str | None, where: str = "") -> dict[str, Any]:
    """The shared parameters among `data`'s keys `names`."""
    shared = {}
    for name in names:
        if name not in data:
            continue
        path = f"{where}{name}"
        try:
            param = spec.param(name)
        except KeyError:
            raise InputError(f"'{name}' is not a parameter of {spec.name}", file=file, field=path,
                             fix=f"{spec.name} takes: {', '.join(p.name for p in spec.params) or 'nothing'}") from None
        if param.scope != "shared":
            raise InputError(f"'{name}' is per source", file=file, field=path, fix="set it under parameters")
        shared[name] = check_value(param, data[name], groups, file=file, where=path)
    return shared


def parse_source_params(block: Any, spec: MethodSpec, sources: list[str], groups: int, *, file: str | None,
                        where: str) -> dict[str, dict[str, Value]]:
    if not isinstance(block, Mapping):
        raise InputError("must be a mapping of source to parameters", file=file, field=where)
    shorts = {Path(s.split("@")[0].rstrip("/")).name: s for s in sources}
    out: dict[str, dict[str, Value]] = {}
    for key, params in block.items():
        source = key if key in sources else shorts.get(str(key))
        if source is None:
            raise InputError(f"'{key}' is not one of the sources", file=file, field=f"{where}.{key}",
                             fix=f"sources: {', '.join(sources)}")
        if not isinstance(params, Mapping):
            raise InputError("must be a mapping of parameter to value", file=file, field=f"{where}.{key}")
        entry: dict[str, Value] = {}
        for name, value in params.items():
            field_path = f"{where}.{key}.{name}"
            try:
                param = spec.param(str(name))
            except KeyError:
                names = ", ".join(p.name for p in spec.source_params) or "none"
                raise InputError(f"'{name}' is not a per-source parameter of {spec.name}", file=file,
                                 field=field_path, fix=f"per-source parameters: {names}") from None
            if param.scope != "source":
                raise InputError(f"'{name}' is shared by all sources", file=file, field=field_path,
                                 fix="set it at the top level of the recipe")
            entry[name] = check_value(param, value, groups, file=file, where=field_path)
        out[source] = entry
    return out


def parse_name_filters(raw: Any, spec: MethodSpec, sources: list[str], groups: int, *,
                       file: str | None) -> tuple[NameFilter, ...]:
    """`name_filters`: a list of {match: SUBSTRING, <shared parameter>: value, parameters: {source: {...}}}."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InputError("must be a list of {match, parameters, <shared parameters>}", file=file,
                         field="name_filters", fix="e.g. [{match: self_attn, parameters: {s0: {weight: 0.3}}}]")
    shared_names = tuple(p.name for p in spec.shared_params if p.numeric)
    out = []
    for i, entry in enumerate(raw):
        where = f"name_filters[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("match"), str) or not entry["match"]:
            raise InputError("needs match: a non-empty substring of tensor names", file=file, field=where)
        unknown = sorted(set(entry) - {"match", "parameters", *shared_names})
        if unknown:
            raise InputError(f"unknown key '{unknown[0]}'", file=file, field=f"{where}.{unknown[0]}",
                             fix=f"match, parameters{', ' if shared_names else ''}{', '.join(shared_names)}")
        out.append(NameFilter(entry["match"], parse_shared(entry, spec, shared_names, groups, file=file,
                                                           where=f"{where}."),
                              parse_source_params(entry.get("parameters") or {}, spec, sources, groups,
                                                  file=file, where=f"{where}.parameters")))
    return tuple(out)
