"""mergekit configs in: a mergekit 0.1.5 YAML read as the evomerge recipe that gives the same tensors.

mergekit looks a tensor's parameter up in the model's own settings, then the slice's, then the config's.
A setting is a value; a gradient, a list interpolated over the layers (block l of L at t = l / (L - 1), a
tensor outside the blocks at t = 0); or a list of {filter, value} entries, of which the first whose filter is
a substring of the tensor's name applies (none: the next scope). The recipe gives every tensor the same
values: one value per block where a gradient varies (layer_groups = L), mergekit's filters as name filters
in an order that agrees with every lookup, and mergekit's defaults where they differ from evomerge's
(density 1, DARE's l1 rescale). Parameters a method does not take are ignored, as mergekit ignores them.
What has no recipe form exits 2 naming its key, before any weights load (headers are read: the layer count
and the tensor names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .errors import InputError, suggest
from .methods import REGISTRY, MethodSpec

KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "tokenizer", "chat_template")
IGNORED = {"int8_mask": (False, True)}           # a memory option: any value gives the same tensors
DEFAULTS = {"density": 1.0}                      # mergekit's, where evomerge's differ
REQUIRED = {"weight": {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                       "breadcrumbs_ties", "della", "della_linear", "nuslerp", "multislerp"},
            "t": {"slerp", "nearswap"}}
DARE_RESCALE = {True: "l1", False: "none"}       # mergekit's rescale: true (its default for DARE and DELLA)


def is_mergekit(data: object) -> bool:
    return isinstance(data, Mapping) and "merge_method" in data


def from_mergekit(data: Mapping[str, Any], *, path: Path) -> dict[str, Any]:
    """The recipe (as Recipe.from_dict reads it) of a mergekit config; its model paths as written, resolved
    from the file's folder."""
    file = str(path)
    for key in data:
        if key not in KEYS:
            hint = "modules (multi-module merges) have no evomerge form" if key == "modules" else None
            raise InputError(f"unknown or unsupported key '{key}'", file=file, field=str(key),
                             fix=hint or suggest(str(key), KEYS) or f"mergekit keys read: {', '.join(KEYS)}")
    method = data["merge_method"]
    recipe: dict[str, Any] = {"evomerge_recipe": 1, "method": method}
    recipe.update(_dtype(data, file) | _tokenizer(data, file) | _chat_template(data.get("chat_template"), file))
    if method == "passthrough":
        recipe.update(_stack(data, file, path))
        return recipe
    spec = REGISTRY.get(str(method), file=file, field="merge_method")
    models, slice_params, base = _inputs(data, file)
    if spec.needs_base:
        if base is None:
            raise InputError(f"{spec.name} needs base_model", file=file, field="base_model")
        sources = [m for m in models if m != base]
    else:
        sources = models + ([base] if base is not None and base not in models else [])
    layout = _layout(base if spec.needs_base else None, sources, path, recipe)
    for i, entry in enumerate(data.get("slices", [{}])[0].get("sources", [])):
        where = f"slices[0].sources[{i}].layer_range"
        if tuple(_layer_range(entry.get("layer_range"), file, where)) != (0, layout.num_layers):
            raise InputError(f"a merge of part of the layers has no recipe form (the models have {layout.num_layers})",
                             file=file, field=where, fix=f"merge every layer: [0, {layout.num_layers}]")
    scopes = [slice_params, data.get("parameters")]
    reader = _Reader(spec, layout, file)
    own = dict(_model_entries(data))
    for model, params in own.items():
        reader.check_scope(params, f"models.{model}.parameters" if "models" in data else "slices[0].sources")
    for where, scope in (("slices[0].parameters", slice_params), ("parameters", data.get("parameters"))):
        reader.check_scope(scope, where, shared_too=True)
    for source in sources:
        for param in spec.source_params:
            reader.add(param.name, [own.get(source), *scopes], source=source)
    for param in spec.shared_params:
        reader.add(param.name, scopes)
    recipe.update({"base": base, "sources": sources} if base is not None else {"sources": sources})
    recipe.update(reader.recipe_fields())
    return recipe


# -- the inputs ----------------------------------------------------------------------------------


def _model_ref(value: object, file: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError("must be a model path or hub id", file=file, field=where)
    if "+" in value:
        raise InputError(f"'{value}' applies a LoRA inside the config, which has no recipe form", file=file,
                         field=where, fix="list the adapter folder as a source of its own (evomerge reads PEFT adapters)")
    return value


def _model_entries(data: Mapping[str, Any]) -> list[tuple[str, Mapping | None]]:
    if "models" in data:
        return [(m["model"], m.get("parameters")) for m in data["models"]]
    return [(s["model"], s.get("parameters")) for s in data["slices"][0]["sources"]]


def _inputs(data: Mapping[str, Any], file: str) -> tuple[list[str], Mapping | None, str | None]:
    """(models in order, the slice's parameters, the base model) of a `models:` config or of one slice that
    takes every layer of every model."""
    base = data.get("base_model")
    if ("models" in data) == ("slices" in data):
        raise InputError("needs exactly one of models and slices", file=file, field="models")
    if "models" in data:
        entries = data["models"]
        if not isinstance(entries, list) or not entries:
            raise InputError("must be a non-empty list of {model, parameters}", file=file, field="models")
        for i, entry in enumerate(entries):
            _entry_keys(entry, {"model", "parameters"}, file, f"models[{i}]")
            _model_ref(entry.get("model"), file, f"models[{i}].model")
        slice_params = None
    else:
        slices = data["slices"]
        if not isinstance(slices, list) or len(slices) != 1:
            raise InputError("a merge over several slices has no recipe form (a passthrough stack does)", file=file,
                             field="slices", fix="merge with one slice over every layer, or with models:")
        _entry_keys(slices[0], {"sources", "base_model", "parameters"}, file, "slices[0]")
        base = slices[0].get("base_model", base)
        entries = slices[0].get("sources") or []
        for i, entry in enumerate(entries):
            _entry_keys(entry, {"model", "layer_range", "parameters"}, file, f"slices[0].sources[{i}]")
            _model_ref(entry.get("model"), file, f"slices[0].sources[{i}].model")
        slice_params = slices[0].get("parameters")
    if base is not None:
        _model_ref(base, file, "base_model")
    models = [str(e["model"]) for e in entries]
    if len(set(models)) != len(models):
        raise InputError("a model is listed twice", file=file, field="models")
    return models, slice_params, base


def _entry_keys(entry: object, allowed: set[str], file: str, where: str) -> None:
    if not isinstance(entry, Mapping):
        raise InputError("must be a mapping", file=file, field=where)
    for key in entry:
        if key not in allowed:
            raise InputError(f"unknown or unsupported key '{key}'", file=file, field=f"{where}.{key}",
                             fix=f"read here: {', '.join(sorted(allowed))}")


def _layout(base: str | None, sources: list[str], path: Path, recipe: Mapping[str, Any]):
    from .sources import open_sources

    opened = open_sources(base, sources, relative_to=path.parent, vocab=recipe.get("vocab", "error"),
                          file=str(path), needs_base=base is not None)
    return opened.layout


def _dtype(data: Mapping[str, Any], file: str) -> dict[str, Any]:
    """The output dtype: out_dtype, else dtype (mergekit's working dtype; evomerge's arithmetic is float32)."""
    out = data.get("out_dtype") or data.get("dtype")
    if out is None:
        return {}
    aliases = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "half": "float16", "float": "float32"}
    out = aliases.get(str(out), str(out))
    if out not in ("float32", "float16", "bfloat16", "float64"):
        raise InputError(f"unknown dtype {out!r}", file=file, field="out_dtype" if data.get("out_dtype") else "dtype",
                         fix="float32, float16, bfloat16 or float64")
    return {"dtype": out}


def _tokenizer(data: Mapping[str, Any], file: str) -> dict[str, Any]:
    source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        _entry_keys(tokenizer, {"source"}, file, "tokenizer")
        source = tokenizer.get("source")
    if source is None:
        return {}
    if source == "union":
        return {"vocab": "union"}
    if source == "base":
        return {"vocab": "base"}
    return {"tokenizer": _model_ref(source, file, "tokenizer_source")}


def _chat_template(value: Any, file: str) -> dict[str, Any]:
    """mergekit's chat_template: "auto", a Jinja template, or the name of a template mergekit ships (chatml,
    llama3, ...), read from the installed mergekit (its text goes into the recipe, which then stands alone).
    mergekit 0.1.5 writes it only where it builds a tokenizer (tokenizer_source set); evomerge always does."""
    if value is None:
        return {}
    if not isinstance(value, str):
        raise InputError("must be a template's name, its Jinja text, or auto", file=file, field="chat_template")
    if value == "auto" or ("{" in value and len(value) >= 20):
        return {"chat_template": value}
    if len(value) < 256 and "\n" not in value and "{" not in value:
        try:
            from importlib.resources import files

            template = files("mergekit._data.chat_templates").joinpath(value + ".jinja")
            if template.is_file():
                return {"chat_template": template.read_text()}
        except ImportError:     # no mergekit here: its named templates are its own files
            raise InputError(f"'{value}' names a template that mergekit ships, and mergekit is not installed",
                             file=file, field="chat_template",
                             fix="paste the template's Jinja text as chat_template, or pip install mergekit") from None
    raise InputError(f"invalid chat template {value!r}", file=file, field="chat_template",
                     fix="a template's name (chatml, llama3, alpaca, mistral, exaone), its Jinja text, or auto")


def _stack(data: Mapping[str, Any], file: str, path: Path) -> dict[str, Any]:
    """A passthrough config as a stack of blocks: each slice one model's layer range, the embeddings from the
    first slice's model and the final norm and head from the last's (one model: evomerge's base)."""
    if data.get("parameters"):
        raise InputError("passthrough parameters (scale) have no recipe form", file=file, field="parameters")
    if "models" in data:
        models = data["models"]
        if not isinstance(models, list) or len(models) != 1:
            raise InputError("a passthrough of models: copies one model", file=file, field="models")
        _entry_keys(models[0], {"model"}, file, "models[0]")
        model = _model_ref(models[0].get("model"), file, "models[0].model")
        blocks = _layout(None, [model], path, {}).num_layers
        return {"base": model, "layers": [{"model": model, "layer": layer} for layer in range(blocks)]}
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise InputError("a passthrough stack lists its slices", file=file, field="slices")
    layers, models = [], []
    for i, piece in enumerate(slices):
        _entry_keys(piece, {"sources"}, file, f"slices[{i}]")
        sources = piece.get("sources") or []
        if len(sources) != 1:
            raise InputError("a passthrough slice takes one model's layers", file=file, field=f"slices[{i}].sources")
        _entry_keys(sources[0], {"model", "layer_range"}, file, f"slices[{i}].sources[0]")
        model = _model_ref(sources[0].get("model"), file, f"slices[{i}].sources[0].model")
        start, stop = _layer_range(sources[0].get("layer_range"), file, f"slices[{i}].sources[0].layer_range")
        layers += [{"model": model, "layer": layer} for layer in range(start, stop)]
        models.append(model)
    if models[0] != models[-1]:
        raise InputError("the first slice's model gives the embeddings and the last's the final norm and head; "
                         "evomerge takes both from one model", file=file, field="slices",
                         fix=f"end with a slice of {models[0]}, or begin with one of {models[-1]}")
    return {"base": models[0], "layers": layers}


def _layer_range(value: object, file: str, where: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in value) or not 0 <= value[0] < value[1]):
        raise InputError("must be [start, stop) with 0 <= start < stop", file=file, field=where)
    return value[0], value[1]


# -- the parameters ------------------------------------------------------------------------------


class _Reader:
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
            for match, value in self._flatten(scope[name], where):
                if match is not None and any(m == match for m, _ in entries):
                    continue          # an earlier entry with this filter wins
                entries.append((match, value))
                if match is None:
                    break
            if entries and entries[-1][0] is None:
                break
        self.chains[(source, name)] = entries

    def _flatten(self, setting: object, where: str) -> list[tuple[str | None, Any]]:
        if isinstance(setting, Mapping):
            setting = [setting]
        if not isinstance(setting, list) or not setting or not isinstance(setting[0], Mapping):
            return [(None, setting)]
        out = []
        for i, entry in enumerate(setting):
            if not isinstance(entry, Mapping) or "value" not in entry:
                raise InputError("a conditional entry needs a value", file=self.file, field=f"{where}[{i}]")
            extra = sorted(set(entry) - {"value", "filter"})
            if extra:
                fix = ("mergekit 0.1.5 ignores 'pattern', so this value would reach every tensor: name the "
                       "substring with filter:") if "pattern" in extra else "an entry has filter and value"
                raise InputError(f"unknown key '{extra[0]}'", file=self.file, field=f"{where}[{i}].{extra[0]}", fix=fix)
            match = entry.get("filter")
            out.append((None if match in (None, "*") else str(match), entry["value"]))
        return out

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


def _interpolate(values: list[float], t: float) -> float:
    """mergekit's gradient: the list spread evenly over [0, 1], linear between neighbours."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return float((1 - frac) * values[i0] + frac * values[i1])
