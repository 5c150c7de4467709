"""mergekit configs in: a mergekit 0.1.5 YAML read as the evomerge recipe that gives the same tensors.

Its models, slices, one module, dtypes, tokenizer and chat template are read here, its parameter settings
by mergekit_params.py (mergekit's lookup: the model's own settings, the slice's, the module's, the config's;
gradients over a slice's layers; filters by substring of the tensor's name). Slices merge the same models,
each a layer range with settings of its own; where they skip or reorder layers, the recipe stacks the merged
model's blocks (`layers` of `merged`, its embeddings and head too). The recipe gives every tensor the same
values: one value per block where any differ (layer_groups = L), mergekit's filters as name filters in an
order that agrees with every lookup, and mergekit's defaults where they differ from evomerge's (density 1,
DARE's l1 rescale). Parameters a method does not take are ignored, as mergekit ignores them.
What has no recipe form exits 2 naming its key, before any weights load (headers are read: the layer count
and the tensor names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError, suggest
from .mergekit_params import Reader, flatten, interpolate
from .methods import REGISTRY
from .recipe_values import MERGED

KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
        "tokenizer_source", "tokenizer", "chat_template")
def is_mergekit(data: object) -> bool:
    return isinstance(data, Mapping) and "merge_method" in data


def from_mergekit(data: Mapping[str, Any], *, path: Path) -> dict[str, Any]:
    """The recipe (as Recipe.from_dict reads it) of a mergekit config; its model paths as written, resolved
    from the file's folder."""
    file = str(path)
    for key in data:
        if key not in KEYS:
            raise InputError(f"unknown or unsupported key '{key}'", file=file, field=str(key),
                             fix=suggest(str(key), KEYS) or f"mergekit keys read: {', '.join(KEYS)}")
    data, module = _one_module(data, file)
    method = data["merge_method"]
    recipe: dict[str, Any] = {"evomerge_recipe": 1, "method": method}
    recipe.update(_dtype(data, file) | _tokenizer(data, file) | _chat_template(data.get("chat_template"), file))
    if method == "passthrough":
        recipe.update(_stack(data, module, file, path))
        return recipe
    spec = REGISTRY.get(str(method), file=file, field="merge_method")
    models, pieces, base, anchor = _inputs(data, file)
    if spec.needs_base:
        if base is None:
            raise InputError(f"{spec.name} needs base_model", file=file, field="base_model")
        sources = [m for m in models if m != base]
    else:
        sources = models + ([base] if base is not None and base not in models else [])
    layout = _layout(base if spec.needs_base else anchor, sources, path, recipe)
    blocks, every = _blocks(pieces, layout.num_layers, file)
    reader = Reader(spec, layout, file, blocks)
    for piece in pieces:
        for model, (params, where) in piece.own.items():
            reader.check_scope(params, where)
        reader.check_scope(piece.params, f"{piece.where}.parameters", shared_too=True)
    reader.check_scope(module, "modules.default.parameters", shared_too=True)
    reader.check_scope(data.get("parameters"), "parameters", shared_too=True)
    for k, piece in enumerate(pieces):
        scopes = [piece.params, module, data.get("parameters")]
        for source in sources:
            for param in spec.source_params:
                reader.add(param.name, [piece.own.get(source, (None,))[0], *scopes], source=source, piece=k)
        for param in spec.shared_params:
            reader.add(param.name, scopes, piece=k)
    recipe.update({"base": base or anchor, "sources": sources} if (base or anchor) else {"sources": sources})
    recipe.update(reader.recipe_fields())
    if not every:       # the merged model's blocks of the slices, in their order; its embeddings, norm and head
        recipe.update({"layers": [{"model": MERGED, "layer": b} for taken in blocks for b in taken],
                       "embed_from": MERGED, "head_from": MERGED})
    return recipe


# -- the inputs ----------------------------------------------------------------------------------


def _one_module(data: Mapping[str, Any], file: str) -> tuple[Mapping[str, Any], Mapping | None]:
    """A `modules:` config of one module, `default` (the name mergekit gives the one module of a text model),
    as the same config without it, and the module's parameters (looked up after a slice's, before the
    config's). Several modules (a vision tower beside the language model) have no recipe form."""
    if "modules" not in data:
        return data, None
    modules = data["modules"]
    if not isinstance(modules, Mapping) or list(modules) != ["default"]:
        raise InputError("modules other than one named default (a model of several modules: a vision tower, ...) "
                         "have no evomerge form", file=file, field="modules",
                         fix="merge a text model's one module: modules: {default: {slices or models}}")
    if "models" in data or "slices" in data:
        raise InputError("needs exactly one of models, slices and modules", file=file, field="modules")
    _entry_keys(modules["default"], {"models", "slices", "parameters"}, file, "modules.default")
    inner = dict(modules["default"])
    module = inner.pop("parameters", None)
    return {k: v for k, v in data.items() if k != "modules"} | inner, module


def _model_ref(value: object, file: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError("must be a model path or hub id", file=file, field=where)
    if "+" in value:
        raise InputError(f"'{value}' applies a LoRA to another model than base_model, which has no recipe form",
                         file=file, field=where,
                         fix="merge the adapter into that model first, or apply it to the config's base_model")
    return value


def _source_ref(value: object, base: object, file: str, where: str, anchors: set[str]) -> str:
    """A merged model: a model, or mergekit's BASE+ADAPTER over the config's base model (without one: over the
    model all such references share, added to `anchors`), read as the adapter folder: a source over that
    base, its task vector s B A, as peft's merge_and_unload makes the full model."""
    if isinstance(value, str) and value.count("+") == 1 and (base is None or isinstance(base, str)):
        model, _, adapter = value.partition("+")
        folder = Path(file).parent
        if adapter and model and (base is None or model == base
                                  or (folder / model).resolve() == (folder / base).resolve()):
            anchors.add(base or model)
            return adapter
    return _model_ref(value, file, where)


@dataclass(frozen=True)
class _Piece:
    """One slice of a merge (a `models:` config: one over every layer): its models' own parameters (with where
    they are written), its parameters, its layer range (None: every layer)."""

    where: str
    own: dict[str, tuple[Mapping | None, str]]
    params: Mapping | None
    layers: tuple[int, int] | None


def _inputs(data: Mapping[str, Any], file: str) -> tuple[list[str], list[_Piece], str | None, str | None]:
    """(models in order, the pieces, the base model, the model LoRA adapters apply to) of a `models:` config
    or of slices that merge the same models in the same order, each slice the same layers of every model."""
    base = data.get("base_model")
    anchors: set[str] = set()
    if ("models" in data) == ("slices" in data):
        raise InputError("needs exactly one of models and slices", file=file, field="models")
    if "models" in data:
        entries = data["models"]
        if not isinstance(entries, list) or not entries:
            raise InputError("must be a non-empty list of {model, parameters}", file=file, field="models")
        for i, entry in enumerate(entries):
            _entry_keys(entry, {"model", "parameters"}, file, f"models[{i}]")
        models = [_source_ref(e.get("model"), base, file, f"models[{i}].model", anchors)
                  for i, e in enumerate(entries)]
        pieces = [_Piece("models", {m: (e.get("parameters"), f"models.{e['model']}.parameters")
                                    for m, e in zip(models, entries)}, None, None)]
    else:
        slices = data["slices"]
        if not isinstance(slices, list) or not slices:
            raise InputError("must be a non-empty list of {sources, parameters}", file=file, field="slices")
        pieces, models, bases = [], None, []
        for k, piece in enumerate(slices):
            where = f"slices[{k}]"
            _entry_keys(piece, {"sources", "base_model", "parameters"}, file, where)
            bases.append(piece.get("base_model", base))
            entries = piece.get("sources")
            if not isinstance(entries, list) or not entries:
                raise InputError("must be a non-empty list of {model, layer_range, parameters}", file=file,
                                 field=f"{where}.sources")
            ranges, named = set(), []
            for i, entry in enumerate(entries):
                _entry_keys(entry, {"model", "layer_range", "parameters"}, file, f"{where}.sources[{i}]")
                named.append(_source_ref(entry.get("model"), bases[-1], file, f"{where}.sources[{i}].model",
                                         anchors))
                ranges.add(_layer_range(entry.get("layer_range"), file, f"{where}.sources[{i}].layer_range"))
            if len(ranges) > 1:
                raise InputError("the models of a slice take different layers, which has no recipe form", file=file,
                                 field=f"{where}.sources", fix="give every model of a slice the same layer_range")
            if models is not None and named != models:
                raise InputError("a slice merges other models than the first slice, which has no recipe form",
                                 file=file, field=f"{where}.sources",
                                 fix=f"list the same models in the same order in every slice: {models}")
            models = named
            pieces.append(_Piece(where, {m: (e.get("parameters"), f"{where}.sources[{i}].parameters")
                                         for i, (m, e) in enumerate(zip(named, entries))}, piece.get("parameters"),
                                 ranges.pop()))
        if len(set(bases)) > 1:
            other = next(k for k, b in enumerate(bases) if b != bases[0])
            raise InputError("slices with different base models have no recipe form", file=file,
                             field=f"slices[{other}].base_model", fix="one base_model for every slice")
        base = bases[0]
    if base is not None:
        _model_ref(base, file, "base_model")
    if len(set(models)) != len(models):
        raise InputError("a model is listed twice", file=file, field="models")
    if len(anchors) > 1:
        raise InputError(f"LoRA adapters applied to different models ({', '.join(sorted(anchors))}), which has no "
                         "recipe form", file=file, field="models", fix="apply every adapter to one model")
    return models, pieces, base, next(iter(anchors), None)


def _blocks(pieces: list[_Piece], num_layers: int, file: str) -> tuple[list[range], bool]:
    """The pieces' blocks, and whether they are every layer once, in order (else the recipe stacks the merged
    blocks, mergekit's merge of part of the layers or of layers in another order: no layer in two slices)."""
    blocks = [range(*(piece.layers or (0, num_layers))) for piece in pieces]
    seen: set[int] = set()
    for piece, taken in zip(pieces, blocks):
        if taken.stop > num_layers or seen & set(taken):
            raise InputError(f"layers {taken.start}-{taken.stop - 1} are past the models' {num_layers} or in an "
                             "earlier slice too, which has no recipe form", file=file,
                             field=f"{piece.where}.sources[0].layer_range",
                             fix="merge each layer in one slice (passthrough repeats layers)")
        seen |= set(taken)
    return blocks, [b for taken in blocks for b in taken] == list(range(num_layers))


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


def _stack(data: Mapping[str, Any], module: Mapping | None, file: str, path: Path) -> dict[str, Any]:
    """A passthrough config as a stack of blocks: each slice one model's layer range (an empty one adds no block),
    the embeddings from the first slice's model (evomerge's base), the final norm and head from the last's
    (`head_from`), a slice's `scale` on its blocks' residual-branch output projections (o_proj, down_proj: the
    stack's own scale, one per module kind, which scales nothing else). `models:` of one model: its blocks."""
    if "models" in data:
        models = data["models"]
        if not isinstance(models, list) or len(models) != 1:
            raise InputError("a passthrough of models: copies one model", file=file, field="models")
        _entry_keys(models[0], {"model", "parameters"}, file, "models[0]")
        model = _model_ref(models[0].get("model"), file, "models[0].model")
        layout = _layout(None, [model], path, {})
        blocks = range(layout.num_layers)
        scopes = [models[0].get("parameters"), module, data.get("parameters")]
        scales = _stack_scales(scopes, layout, blocks, file, "models[0]",
                               outside=[n for n, info in layout.tensors.items() if info.layer is None])
        return {"base": model, "layers": [{"model": model, "layer": layer} | _scale_entry(scale)
                                          for layer, scale in zip(blocks, scales)]}
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise InputError("a passthrough stack lists its slices", file=file, field="slices")
    layers, models, layouts = [], [], {}
    for i, piece in enumerate(slices):
        _entry_keys(piece, {"sources", "parameters"}, file, f"slices[{i}]")
        sources = piece.get("sources") or []
        if len(sources) != 1:
            raise InputError("a passthrough slice takes one model's layers", file=file, field=f"slices[{i}].sources")
        where = f"slices[{i}].sources[0]"
        _entry_keys(sources[0], {"model", "layer_range", "parameters"}, file, where)
        model = _model_ref(sources[0].get("model"), file, f"{where}.model")
        start, stop = _layer_range(sources[0].get("layer_range"), file, f"{where}.layer_range", empty=True)
        if model not in layouts:       # a frankenmerge names one model in many slices: its headers once
            layouts[model] = _layout(None, [model], path, {})
        layout = layouts[model]
        outside = [n for n, info in layout.tensors.items() if info.layer is None
                   and ((i == 0 and info.kind == "embed") or (i == len(slices) - 1 and info.kind != "embed"))]
        scopes = [sources[0].get("parameters"), piece.get("parameters"), module, data.get("parameters")]
        scales = _stack_scales(scopes, layout, range(start, stop), file, where, outside=outside)
        layers += [{"model": model, "layer": layer} | _scale_entry(scale)
                   for layer, scale in zip(range(start, stop), scales)]
        models.append(model)
    recipe: dict[str, Any] = {"base": models[0], "layers": layers,
                              "sources": [m for m in dict.fromkeys(models) if m != models[0]]}
    if models[-1] != models[0]:
        recipe["head_from"] = models[-1]
    return recipe


def _scale_entry(scale: dict[str, float]) -> dict[str, Any]:
    """A `layers` entry's scale: one number, or one per output projection's module kind where they differ."""
    if len(set(scale.values())) > 1:
        return {"scale": dict(sorted(scale.items()))}
    value = next(iter(scale.values()), 1.0)
    return {"scale": value} if value != 1.0 else {}


def _stack_scales(scopes: list[Any], layout, blocks: range, file: str, where: str, *,
                  outside: list[str]) -> list[dict[str, float]]:
    """A slice's scale on each of its blocks' output projections, by module kind (attn, mlp), where the recipe
    can say it: one value per projection (a gradient: block i of n at t = i / (n - 1), t = 1 in a one-block
    slice), on none of the blocks' other tensors, and on none of the tensors `outside` the blocks that take
    this slice's settings (at t = 0). mergekit looks `scale` up in the model's, the slice's, the module's and
    the config's parameters (first match of a list of {filter, value}); a tensor nothing matches is not
    scaled."""
    from .sources import SCALE_RANGE, block_tensors, is_output_projection

    chain: list[tuple[str | None, Any]] = []
    for scope in scopes:
        if scope is None:
            continue
        if not isinstance(scope, Mapping) or set(scope) - {"scale"}:
            extra = sorted(set(scope) - {"scale"}) if isinstance(scope, Mapping) else ["parameters"]
            raise InputError(f"passthrough takes only scale, not '{extra[0]}'", file=file, field=f"{where}.parameters",
                             fix="remove it")
        if "scale" in scope:
            chain += flatten(scope["scale"], file=file, where=f"{where}.parameters.scale")
    field = f"{where}.parameters.scale"

    def scale_of(name: str, t: float) -> Any:
        value = next((v for m, v in chain if m is None or m in name), None)
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in value):
            return interpolate(value, t)
        return value

    def refuse(value: Any, name: str) -> InputError:
        return InputError(f"scale {value!r} reaches '{name}', and a stack scales only the residual-branch output "
                          "projections", file=file, field=field, fix="filter it to o_proj and down_proj")

    scales = []
    for i, layer in enumerate(blocks):
        t = i / (len(blocks) - 1) if len(blocks) > 1 else 1.0
        found: dict[str, set[Any]] = {}
        for inner, name in block_tensors(layout, layer).items():
            value, kind = scale_of(name, t), layout.tensors[name].kind
            if is_output_projection(inner, kind):
                found.setdefault(kind, set()).add(1.0 if value is None else value)
            elif value not in (None, 1, 1.0):
                raise refuse(value, name)
        for kind, values in found.items():
            value = next(iter(values))
            if (len(values) > 1 or isinstance(value, bool) or not isinstance(value, (int, float))
                    or not SCALE_RANGE[0] <= value <= SCALE_RANGE[1]):
                raise InputError(f"scale must be one number in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] on the "
                                 f"{kind} output projection of block {layer}, got {sorted(map(str, values))}",
                                 file=file, field=field, fix="one value for each of o_proj and down_proj")
        scales.append({kind: float(next(iter(values))) for kind, values in found.items()})
    for name in outside:
        value = scale_of(name, 0.0)
        if value not in (None, 1, 1.0):
            raise refuse(value, name)
    return scales


def _layer_range(value: object, file: str, where: str, *, empty: bool = False) -> tuple[int, int]:
    """[start, stop); `empty`: start == stop too (a passthrough slice that adds no block)."""
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in value)
            or not 0 <= value[0] <= value[1] or (value[0] == value[1] and not empty)):
        raise InputError("must be [start, stop) with 0 <= start < stop", file=file, field=where)
    return value[0], value[1]
