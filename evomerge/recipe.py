"""The Recipe: a YAML file that fully determines a merged model.

A per-source parameter takes a scalar (every tensor) or a list with one value
per layer group, under ``parameters``, ``filters[<module kind>]``,
``filters["io"]`` (tensors outside the numbered blocks) or a name filter. Which
value a tensor takes is plan.py's lookup rule: a recipe is data, and
``MergePlan.of(recipe, layout)`` resolves it for one model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError
from .methods import REGISTRY, MethodSpec
from .plan import check
from .recipe_values import MERGED, NameFilter, SourceParams, parse_name_filters, parse_shared, parse_source_params
from .sources import IO_GROUP, MODULE_KINDS, SCALE_RANGE
from .yamlio import dump_yaml, load_yaml

FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "float64")
VOCAB_POLICIES = ("error", "base", "union")   # differing vocabularies: refused | the base's | merged (vocab.py)
FILTER_KINDS = tuple(k for k in MODULE_KINDS if k != "other") + (IO_GROUP,)
_TOP_KEYS = ("evomerge_recipe", "method", "base", "sources", "seed", "dtype", "layer_groups", "parameters",
             "filters", "name_filters", "layers", "head_from", "embed_from", "vocab", "tokenizer", "chat_template",
             "provenance")
PASSTHROUGH = "passthrough"     # a stack of blocks (`layers`) and nothing merged in parameter space
SHARED_NAMES = tuple(sorted({p.name for m in REGISTRY for p in m.shared_params}))


@dataclass(frozen=True)
class StackEntry:
    """Block `layer` of `model` (the base, a source, or MERGED), its residual-branch outputs times `scale` (the
    MLP's times `mlp_scale` where that is set: mergekit's scale filtered to one projection)."""

    model: str
    layer: int
    scale: float = 1.0
    mlp_scale: float | None = None

    def scale_for(self, kind: str) -> float:
        """The scale of the block's output projection of this module kind (attn, mlp)."""
        return self.mlp_scale if kind == "mlp" and self.mlp_scale is not None else self.scale

    @property
    def scaled(self) -> bool:
        return self.scale != 1.0 or self.scale_for("mlp") != 1.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "layer": self.layer}
        if self.mlp_scale is not None and self.mlp_scale != self.scale:
            out["scale"] = {"attn": self.scale, "mlp": self.mlp_scale}
        elif self.scale != 1.0:
            out["scale"] = self.scale
        return out


def _passthrough() -> MethodSpec:
    """Stacking merges nothing: its method has no parameters (not in the registry, so no search samples it)."""
    return MethodSpec(PASSTHROUGH, (), lambda ctx, p: ctx.base.clone(), min_sources=0,
                      summary="blocks stacked as `layers` lists them (mergekit's passthrough)")


PASSTHROUGH_SPEC = _passthrough()


@dataclass(frozen=True)
class Recipe:
    method: str
    sources: tuple[str, ...]
    base: str | None = None
    seed: int = 0
    dtype: str | None = None          # None: the base's dtype
    layer_groups: int = 1
    shared: Mapping[str, Any] = field(default_factory=dict)         # lambda, t, normalize, rescale
    parameters: SourceParams = field(default_factory=dict)
    filters: Mapping[str, SourceParams] = field(default_factory=dict)
    name_filters: tuple[NameFilter, ...] = ()    # by tensor name, first match first (mergekit's `filter:`)
    layers: tuple[StackEntry, ...] = ()   # a stack of blocks (METHODS.md, "Layer stacking"); () = no stacking
    head_from: str | None = None       # a stack's final norm and head: this model's (None: the base's)
    embed_from: str | None = None      # a stack's embeddings: this model's (None: the base's)
    vocab: str = "error"               # one of VOCAB_POLICIES
    tokenizer: str | None = None      # where the tokenizer comes from; default: the base (else first source)
    chat_template: str | None = None  # the merged tokenizer's: a Jinja template, or "auto" (the models' most common)
    provenance: Mapping[str, Any] | None = None
    path: Path | None = field(default=None, compare=False)   # the file it was read from

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        """An evomerge recipe, or a mergekit config (its `merge_method` key): from_mergekit.py."""
        path = Path(path)
        data = load_yaml(path)
        if "merge_method" in data:
            from .from_mergekit import from_mergekit

            data = from_mergekit(data, path=path)
        return cls.from_dict(data, file=str(path), path=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, file: str | None = None, path: Path | None = None) -> "Recipe":
        """Validate everything that can be checked without reading a model."""
        return _parse(dict(data), file=file, path=path)

    def to_dict(self, *, provenance: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"evomerge_recipe": FORMAT_VERSION, "method": self.method}
        if self.base is not None:
            out["base"] = self.base
        out["sources"] = list(self.sources)
        out["seed"] = self.seed
        if self.dtype is not None:
            out["dtype"] = self.dtype
        for name, value in self.shared.items():
            out[name] = _plain(value)
        out["layer_groups"] = self.layer_groups
        out["parameters"] = _plain(self.parameters)
        if self.filters:
            out["filters"] = _plain(self.filters)
        if self.name_filters:
            out["name_filters"] = _plain([f.to_dict() for f in self.name_filters])
        if self.layers:
            out["layers"] = [entry.to_dict() for entry in self.layers]
        if self.head_from is not None:
            out["head_from"] = self.head_from
        if self.embed_from is not None:
            out["embed_from"] = self.embed_from
        if self.vocab != "error":
            out["vocab"] = self.vocab
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if provenance and self.provenance:
            out["provenance"] = _plain(self.provenance)
        return out

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def sha256(self) -> str:
        """Identity of the merge: everything but provenance, canonically serialized."""
        canonical = json.dumps(self.to_dict(provenance=False), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def relocated(self, folder: Path) -> "Recipe":
        """The same recipe, to be stored in `folder`: relative model paths rewritten to resolve from there."""
        import os

        from .paths import ROOTS, resolve_path

        def move(spec: str | None) -> str | None:
            if spec is None or spec.startswith(tuple(ROOTS)) or Path(spec).is_absolute():
                return spec
            found = resolve_path(spec, relative_to=self.relative_to)
            if found is None:      # a hub id, or nothing local: leave it as written
                return spec
            return os.path.relpath(found, Path(folder).resolve())

        mapping = {s: move(s) for s in self.sources}
        if all(k == v for k, v in mapping.items()) and move(self.base) == self.base \
                and move(self.tokenizer) == self.tokenizer:
            return replace(self, path=Path(folder) / "recipe.yaml")
        return self.renamed(mapping, base=move(self.base), tokenizer=move(self.tokenizer),
                            path=Path(folder) / "recipe.yaml")

    def renamed(self, mapping: Mapping[str, str], *, base: str | None, tokenizer: str | None,
                path: Path | None) -> "Recipe":
        """The same merge with its models named anew (`mapping`: each source's old name -> new), read from
        `path`'s folder."""
        def rekey(block: SourceParams) -> dict[str, Any]:
            return {mapping[src]: params for src, params in block.items()}

        models = dict(mapping) | {self.base: base, MERGED: MERGED}
        return replace(self, sources=tuple(mapping[s] for s in self.sources), base=base, tokenizer=tokenizer,
                       parameters=rekey(self.parameters),
                       name_filters=tuple(replace(f, parameters=rekey(f.parameters)) for f in self.name_filters),
                       layers=tuple(replace(e, model=models[e.model]) for e in self.layers),
                       head_from=models[self.head_from] if self.head_from is not None else None,
                       embed_from=models[self.embed_from] if self.embed_from is not None else None,
                       filters={kind: rekey(block) for kind, block in self.filters.items()}, path=path)

    def with_provenance(self, **fields: Any) -> "Recipe":
        merged = dict(self.provenance or {})
        merged.update(fields)
        return replace(self, provenance=merged)

    # -- reading -----------------------------------------------------------------
    @property
    def spec(self) -> MethodSpec:
        return PASSTHROUGH_SPEC if self.method == PASSTHROUGH else REGISTRY.get(self.method)

    @property
    def merges(self) -> bool:
        """Whether the recipe merges in parameter space (every method but passthrough)."""
        return self.method != PASSTHROUGH

    @property
    def relative_to(self) -> Path | None:
        return self.path.parent if self.path is not None else None


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
    return obj


# -- validation ------------------------------------------------------------------------------------

def _parse(data: dict[str, Any], *, file: str | None, path: Path | None) -> Recipe:
    known = set(_TOP_KEYS) | set(SHARED_NAMES)
    for key in data:
        if key not in known:
            from .errors import suggest

            raise InputError(f"unknown key '{key}'", file=file, field=str(key),
                             fix=suggest(str(key), known) or f"known keys: {', '.join(sorted(known))}")
    version = data.get("evomerge_recipe", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise InputError(f"unsupported recipe version {version!r}", file=file, field="evomerge_recipe",
                         fix=f"this evomerge reads version {FORMAT_VERSION}")
    if "method" not in data:
        raise InputError("missing", file=file, field="method", fix=f"one of {', '.join(REGISTRY.names())}")
    stacking = data["method"] == PASSTHROUGH
    spec = PASSTHROUGH_SPEC if stacking else REGISTRY.get(str(data["method"]), file=file, field="method")
    if stacking and not data.get("layers"):
        raise InputError("passthrough stacks blocks, and the recipe lists none", file=file, field="layers",
                         fix="list the blocks: layers: [{model: ..., layer: 0}, ...]")
    if stacking and "sources" not in data:       # the models the stack names, but the base
        named = [e.get("model") for e in data["layers"] if isinstance(e, Mapping)] + [data.get("head_from")]
        data["sources"] = list(dict.fromkeys(m for m in named if m not in (data.get("base"), None)))
    sources = data.get("sources")
    if not isinstance(sources, list) or not (sources or stacking) or not all(isinstance(s, str) and s for s in sources):
        raise InputError("must be a non-empty list of model names or paths", file=file, field="sources")
    if len(set(sources)) != len(sources):
        raise InputError("a source is listed twice", file=file, field="sources")
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise InputError("must be a model name or path", file=file, field="base")
    if spec.needs_base and base is None:
        raise InputError(f"{spec.name} needs a base model", file=file, field="base")
    if base is not None and base in sources and spec.needs_base:
        raise InputError("the base is also listed as a source", file=file, field="sources",
                         fix="list only the fine-tuned models under sources")
    if spec.name == "slerp" and len(sources) != 1:
        raise InputError(f"slerp merges exactly two models (the base and one source), got base + {len(sources)}",
                         file=file, field="sources", fix="list one source, or use another method")
    takes = spec.takes(len(sources))
    if takes is not None:
        raise InputError(f"{spec.name} merges {takes} source(s), got {len(sources)}",
                         file=file, field="sources")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"must be a non-negative integer, got {seed!r}", file=file, field="seed")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", file=file, field="dtype", fix=f"one of {', '.join(DTYPES)}")
    groups = data.get("layer_groups", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise InputError(f"must be a positive integer, got {groups!r}", file=file, field="layer_groups")
    shared = parse_shared(data, spec, SHARED_NAMES, groups, file=file)
    vocab = data.get("vocab", "error")
    if vocab not in VOCAB_POLICIES:
        raise InputError(f"unknown vocab policy {vocab!r}", file=file, field="vocab",
                         fix="'error', 'base' or 'union'")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise InputError("must be a model name or path", file=file, field="tokenizer")
    if tokenizer is not None and vocab == "union":
        raise InputError("vocab: union ships the union of the models' tokenizers", file=file, field="tokenizer",
                         fix="remove 'tokenizer', or use vocab: base")
    chat_template = data.get("chat_template")
    if chat_template is not None and (not isinstance(chat_template, str)
                                      or (chat_template != "auto" and "{" not in chat_template)):
        raise InputError(f"{chat_template!r} is no chat template", file=file, field="chat_template",
                         fix="a Jinja template (its text), or auto: the template most of the models have")
    parameters = parse_source_params(data.get("parameters") or {}, spec, sources, groups, file=file,
                                     where="parameters")
    filters_raw = data.get("filters") or {}
    if not isinstance(filters_raw, Mapping):
        raise InputError("must be a mapping of module kind to per-source parameters", file=file, field="filters")
    filters = {}
    for kind, block in filters_raw.items():
        if kind not in FILTER_KINDS:
            raise InputError(f"unknown module kind '{kind}'", file=file, field=f"filters.{kind}",
                             fix=f"one of {', '.join(FILTER_KINDS)}")
        filters[kind] = parse_source_params(block or {}, spec, sources, groups, file=file, where=f"filters.{kind}")
    name_filters = parse_name_filters(data.get("name_filters"), spec, sources, groups, file=file)
    layers = _parse_layers(data.get("layers"), base, sources, stacking=stacking, file=file)
    head_from, embed_from = (_parse_from(data.get(key), key, layers, base, sources, merges=not stacking, file=file)
                             for key in ("head_from", "embed_from"))
    provenance = data.get("provenance")
    if provenance is not None and not isinstance(provenance, Mapping):
        raise InputError("must be a mapping", file=file, field="provenance")
    recipe = Recipe(method=spec.name, sources=tuple(sources), base=base, seed=seed, dtype=dtype,
                    layer_groups=groups, shared=shared, parameters=parameters, filters=filters,
                    name_filters=name_filters, layers=layers, head_from=head_from, embed_from=embed_from,
                    vocab=vocab,
                    tokenizer=tokenizer, chat_template=chat_template, provenance=provenance, path=path)
    check(recipe, file=file)
    return recipe


def _parse_from(raw: Any, key: str, layers: tuple[StackEntry, ...], base: str | None, sources: list[str], *,
                merges: bool, file: str | None) -> str | None:
    """A stack's model for the tensors after its blocks (`head_from`: final norm, head; mergekit's last slice's
    model) or before them (`embed_from`: the embeddings): the base, a source, or `merged` where the recipe
    merges (mergekit's merge of part of the layers); None or the base: the base's."""
    if raw is None or raw == base:
        return None
    if not layers:
        raise InputError(f"only a stack of blocks takes {key.split('_')[0]} tensors from another model", file=file,
                         field=key, fix="remove it, or list the stack's layers")
    shorts = {Path(s.split("@")[0].rstrip("/")).name: s for s in sources}
    model = raw if raw in sources or (merges and raw == MERGED) else shorts.get(str(raw))
    if model is None:
        hint = f", or {MERGED}" if merges else ""
        raise InputError(f"'{raw}' is not among the models", file=file, field=key,
                         fix=f"name the base or a source ({', '.join([str(base), *sources])}){hint}")
    return model


def _parse_layers(raw: Any, base: str | None, sources: list[str], *, stacking: bool,
                  file: str | None) -> tuple[StackEntry, ...]:
    """The `layers` list: each entry a known model (the base, a source, or `merged` where the recipe merges), a
    block index >= 0 (checked against the model when it is opened), a scale in SCALE_RANGE."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise InputError("must be a non-empty list of {model, layer, scale} entries", file=file, field="layers",
                         fix="list the blocks in order, e.g. [{model: zoo/base, layer: 0}]")
    if base is None:
        raise InputError("a stack takes its embeddings, final norm and head from the base", file=file, field="base",
                         fix="set base")
    shorts = {Path(s.split("@")[0].rstrip("/")).name: s for s in sources}
    known = [base, *sources] + ([] if stacking else [MERGED])
    out = []
    for i, entry in enumerate(raw):
        where = f"layers[{i}]"
        if not isinstance(entry, Mapping):
            raise InputError("must be a mapping {model, layer, scale}", file=file, field=where)
        unknown = sorted(set(entry) - {"model", "layer", "scale"})
        if unknown:
            raise InputError(f"unknown key '{unknown[0]}'", file=file, field=f"{where}.{unknown[0]}",
                             fix="an entry has model, layer and (optionally) scale")
        model = entry.get("model")
        model = shorts.get(str(model), model) if model not in known else model
        if model not in known:
            hint = "" if stacking else f", or {MERGED}"
            raise InputError(f"'{entry.get('model')}' is not among the models", file=file, field=f"{where}.model",
                             fix=f"name the base or a source ({', '.join(known[:2 + len(sources)])}){hint}")
        layer = entry.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise InputError(f"must be a block index >= 0, got {layer!r}", file=file, field=f"{where}.layer")
        scale = entry.get("scale", 1.0)
        if isinstance(scale, Mapping):      # {attn: a, mlp: m}: each output projection its own
            unknown = sorted(set(scale) - {"attn", "mlp"})
            if unknown:
                raise InputError(f"unknown key '{unknown[0]}'", file=file, field=f"{where}.scale.{unknown[0]}",
                                 fix="a scale per module kind has attn and mlp")
            attn = _scale(scale.get("attn", 1.0), file=file, where=f"{where}.scale.attn")
            mlp = _scale(scale.get("mlp", 1.0), file=file, where=f"{where}.scale.mlp")
            out.append(StackEntry(model=model, layer=layer, scale=attn, mlp_scale=None if mlp == attn else mlp))
        else:
            out.append(StackEntry(model=model, layer=layer, scale=_scale(scale, file=file, where=f"{where}.scale")))
    return tuple(out)


def _scale(value: Any, *, file: str | None, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not SCALE_RANGE[0] <= float(value) <= SCALE_RANGE[1]:
        raise InputError(f"scale {value!r} is outside [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]", file=file,
                         field=where, fix=f"a number in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]")
    return float(value)
