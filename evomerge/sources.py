"""Open and validate a base model and its fine-tuned sources.

Everything here reads only headers (config.json, safetensors headers) until a
caller asks for a tensor, so every mismatch is reported before a weight loads.
Tensor names are classified by layer index and module kind for any architecture
that numbers its blocks (``layers.N.``, ``h.N.``, ``blocks.N.``, ``layer.N.``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint import _PICKLE, ModelFolder, header_of, locate
from .errors import InputError
from .paths import resolve_path
from .vocab import UnionVocab, build_union, vocab_size_of

MODULE_KINDS = ("attn", "mlp", "norm", "embed", "head", "other")
IO_GROUP = "io"  # the group of tensors outside the numbered blocks

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_NORM = ("norm", "ln_", "ln1", "ln2", ".ln.", "layernorm")
_ATTN = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv")
_MLP = ("mlp", "ffn", "feed_forward", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "c_fc",
        "intermediate", "dense_h_to_4h", "dense_4h_to_h", "experts", "w1", "w2", "w3",
        "block_sparse_moe", "router")      # a mixture of experts' router (Mixtral's block_sparse_moe.gate) too
_EMBED = ("embed_tokens", "embed", "wte", "wpe", "word_embeddings", "tok_embeddings", "position_embeddings")
_HEAD = ("lm_head", "embed_out", "output.weight", "score.weight")


def classify(name: str) -> tuple[int | None, str]:
    """(layer index or None, module kind) of a tensor name."""
    lower = name.lower()
    match = _BLOCK.search(lower)
    layer = int(match.group(1)) if match else None
    inner = lower[match.end():] if match else lower
    if any(tok in inner for tok in _NORM):
        return layer, "norm"
    if layer is not None:
        if any(tok in inner for tok in _ATTN):
            return layer, "attn"
        if any(tok in inner for tok in _MLP):
            return layer, "mlp"
        return layer, "other"
    if any(tok in lower for tok in _HEAD):
        return None, "head"
    if any(tok in lower for tok in _EMBED):
        return None, "embed"
    return None, "other"


# the residual-branch output projections of a block, by the module names architectures give them
SCALE_RANGE = (0.0, 2.0)        # a stacked block's scale on its residual-branch output projections
_OUTPUTS = {"attn": ("o_proj", "out_proj", "c_proj", "dense", "wo", "o"),
            "mlp": ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo")}


def block_prefix(layout: Layout) -> str:
    """The prefix of the numbered blocks' tensor names ("model.layers." for a Llama)."""
    for name, info in layout.tensors.items():
        if info.layer is not None:
            match = _BLOCK.search(name.lower())
            return name[:match.start(1)]
    raise InputError("the model has no numbered blocks to stack", field="layers")


def block_tensors(layout: Layout, layer: int) -> dict[str, str]:
    """Tensor name inside the block (after "N.") -> full name, for block `layer`."""
    prefix = block_prefix(layout)
    head = f"{prefix}{layer}."
    return {name[len(head):]: name for name in layout.tensors if name.startswith(head)}


def is_output_projection(inner: str, kind: str) -> bool:
    """Whether a block tensor (its name inside the block) belongs to an attention output or MLP down projection."""
    modules = inner.split(".")[:-1]
    return kind in _OUTPUTS and bool(modules) and modules[-1] in _OUTPUTS[kind]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layer: int | None
    kind: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Layout:
    """Tensor names, shapes and their place in the network (from the base's headers)."""

    tensors: dict[str, TensorInfo]
    num_layers: int

    def group(self, name: str, layer_groups: int) -> int | str:
        """Contiguous layer group of a block tensor, or IO_GROUP outside the blocks."""
        layer = self.tensors[name].layer
        if layer is None:
            return IO_GROUP
        return layer * layer_groups // self.num_layers

    def slots(self, layer_groups: int) -> list[tuple[int | str, str]]:
        """The (layer group, module kind) pairs the tensors fall into."""
        return sorted({(self.group(n, layer_groups), t.kind) for n, t in self.tensors.items()}, key=str)

    def check_groups(self, layer_groups: int, *, file: str | None = None, field: str = "layer_groups") -> None:
        if layer_groups < 1:
            raise InputError("must be at least 1", file=file, field=field)
        if layer_groups > max(self.num_layers, 1):
            raise InputError(f"{layer_groups} groups but the model has {self.num_layers} layers",
                             file=file, field=field, fix=f"use at most {self.num_layers}")

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor: what a merge writes unless its recipe says otherwise."""
        return next((t.dtype for t in self.tensors.values() if t.dtype.is_floating_point), torch.float32)


def open_folder(spec: str, *, relative_to: Path | None = None, file: str | None = None,
                field: str | None = None) -> ModelFolder:
    path = locate(spec, relative_to=relative_to, file=file, field=field)
    hub = resolve_path(spec, relative_to=relative_to) is None     # not local: locate fetched it from the hub
    hub_id = spec.partition("@")[0] if hub else None
    from .adapters import is_adapter, open_adapter

    if is_adapter(path):
        return open_adapter(spec, path, hub_id=hub_id, field=field)
    folder = ModelFolder(spec=spec, path=path, hub_id=hub_id)
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError("malformed safetensors index (no weight_map)", file=index) from None
        for name, shard in sorted(weight_map.items()):
            shard_path = (path / shard).resolve()
            if path.resolve() not in shard_path.parents or not shard_path.is_file():
                raise InputError(f"shard '{shard}' for tensor '{name}' is missing", file=index)
            folder.files[name] = shard_path
    elif single.is_file():
        folder.files = {name: single for name in header_of(single)}
    else:
        others = sorted(p.name for p in path.glob("*.safetensors"))
        if others:
            for shard in others:
                for name in header_of(path / shard):
                    folder.files[name] = path / shard
        else:
            pickles = [p for p in _PICKLE if (path / p).exists()] + [p.name for p in path.glob("*.bin")]
            if pickles:
                raise InputError(f"pickle-only checkpoint ({pickles[0]}); evomerge reads only safetensors",
                                 file=path, field=field,
                                 fix="convert it, e.g. load with transformers and save_pretrained(safe_serialization=True)")
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if ggufs:
                raise InputError(f"GGUF checkpoint ({ggufs[0]}); evomerge reads only safetensors", file=path,
                                 field=field, fix=f"convert it: transformers' from_pretrained(folder, gguf_file="
                                                  f"'{ggufs[0]}', quantization_config=GgufConfig(dequantize=True)), "
                                                  "then save_pretrained without its quantization_config")
            raise InputError("no safetensors weights in the model folder", file=path, field=field)
    for name in folder.files:  # parse every header now, so truncation is found before merging
        header_of(folder.files[name])
    folder.config  # noqa: B018 - validates config.json
    return folder


@dataclass
class SourceSet:
    """The base (optional for some methods) and the K sources, checked against each other."""

    base: ModelFolder | None
    sources: list[ModelFolder]
    layout: Layout
    vocab: str = "error"   # how differing vocabularies are resolved: error | base | union
    resized: bool = False  # whether a source's vocabulary differs (and is read at the anchor's size)
    union: UnionVocab | None = None          # vocab: union: the merged tokenizer, each model's rows in its order
    union_tensors: frozenset[str] = frozenset()   # the embedding and head tensors read in the union's order
    _fills: dict[str, torch.Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def anchor(self) -> ModelFolder:
        """The model task vectors are taken against: the base, else the first source."""
        return self.base if self.base is not None else self.sources[0]

    @property
    def models(self) -> list[ModelFolder]:
        """The base (where there is one), then the sources."""
        return ([self.base] if self.base is not None else []) + list(self.sources)

    @property
    def vocab_size(self) -> int | None:
        """The merged model's vocabulary size where it is not the anchor's own (a union vocabulary), else None."""
        if self.union is None:
            return None
        rows = self.anchor.header[min(self.union_tensors)][0][0]
        return self.union.size if self.union.size != rows else None

    def tokenizer(self, *, trust_remote_code: bool = False):
        """The merged model's tokenizer: the union's, else the anchor's own."""
        if self.union is not None:
            return self.union.tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.anchor.path), trust_remote_code=trust_remote_code)

    def read(self, model: ModelFolder, name: str, *, device: str | torch.device = "cpu") -> torch.Tensor:
        tensor = model.read(name, device=device)
        if name in self.union_tensors:
            index = self._index(model)
            if self.union.is_identity(index, tensor.shape[0]):
                return tensor
            return self.union.permute(index, tensor, self._fill_rows(name))
        want = self.layout.tensors[name].shape
        if tuple(tensor.shape) != want:  # only a resolved vocabulary mismatch gets here
            base = self.anchor.read(name, device=device)
            rows = min(tensor.shape[0], want[0])
            base[:rows] = tensor[:rows].to(base.dtype)
            tensor = base
        return tensor

    def _index(self, model: ModelFolder) -> int:
        return next(i for i, m in enumerate(self.models) if m is model)

    def _fill_rows(self, name: str) -> torch.Tensor | None:
        """The rows of the union tokens some model lacks, for one tensor: read once, kept (they are few)."""
        if name not in self._fills:
            wide = torch.float64 if self.layout.float_dtype == torch.float64 else torch.float32
            self._fills[name] = self.union.fill_rows(lambda i: self.models[i].read(name), dtype=wide)
        return self._fills[name]


def open_sources(base: str | None, sources: Iterable[str], *, relative_to: Path | None = None,
                 vocab: str = "error", file: str | None = None, needs_base: bool = False) -> SourceSet:
    """Open and cross-check the models; raise InputError naming tensor, model and shapes on mismatch.

    `needs_base`: the merge takes task vectors from the base, so no source may be the base itself (under
    another spelling of its path: a zero task vector would weigh in)."""
    specs = list(sources)
    if not specs and base is None:
        raise InputError("no sources given", file=file, field="sources")
    base_folder = open_folder(base, relative_to=relative_to, file=file, field="base") if base else None
    folders = [open_folder(s, relative_to=relative_to, file=file, field=f"sources[{i}]")
               for i, s in enumerate(specs)]
    where = {}
    for i, folder in enumerate(folders):
        real = folder.path.resolve()
        if real in where:
            raise InputError(f"'{folder.spec}' is the same model folder as '{folders[where[real]].spec}'", file=file,
                             field=f"sources[{i}]", fix="list each model once")
        where[real] = i
        if needs_base and base_folder is not None and real == base_folder.path.resolve():
            raise InputError(f"'{folder.spec}' is the base model ('{base_folder.spec}')", file=file,
                             field=f"sources[{i}]", fix="list only the fine-tuned models under sources")
    _check_adapters(base_folder, folders, vocab=vocab, file=file)
    shorts = [f.short for f in folders]
    if len(set(shorts)) != len(shorts):
        raise InputError(f"two sources share the name '{_first_dup(shorts)}'", file=file, field="sources",
                         fix="parameters are keyed by folder name: rename one folder")
    anchor = base_folder or folders[0]
    models = ([base_folder] if base_folder else []) + folders
    fields = (["base"] if base_folder else []) + [f"sources[{i}]" for i in range(len(folders))]
    ref = anchor.header
    sizes = [vocab_size_of(m, file=file, field=f) for m, f in zip(models, fields)] if vocab == "union" else []
    vocabulary = _vocabulary_tensors(models, sizes, fields, file=file) if vocab == "union" else set()
    resized = False
    for i, folder in enumerate(folders):
        if folder.is_adapter:      # factors, not tensors of the base's names: bound to the base's shapes
            folder.bind(anchor, {name: shape for name, (shape, _) in ref.items()}, file=file, field=f"sources[{i}]")
            continue
        header = folder.header
        missing = sorted(set(ref) - set(header))
        extra = sorted(set(header) - set(ref))
        if missing or extra:
            which = missing[0] if missing else extra[0]
            side = f"missing from '{folder.spec}'" if missing else f"in '{folder.spec}' but not in '{anchor.spec}'"
            raise InputError(f"tensor '{which}' is {side} ({len(missing)} missing, {len(extra)} extra)",
                             file=file, field="sources", fix="all sources must share the base's architecture")
        for name, (shape, _dtype) in ref.items():
            other = header[name][0]
            if other == shape or name in vocabulary:
                continue
            _, kind = classify(name)
            vocab_like = kind in ("embed", "head") and other[1:] == shape[1:]
            if vocab_like and vocab == "base":
                resized = True
                continue
            if vocab_like:
                raise InputError(f"vocabulary size differs: tensor '{name}' is {list(other)} in '{folder.spec}' "
                                 f"but {list(shape)} in '{anchor.spec}'", file=file, field="sources",
                                 fix="set 'vocab: union' to merge the vocabularies, or 'vocab: base' to keep the "
                                     "base's")
            raise InputError(f"shape mismatch: tensor '{name}' is {list(other)} in '{folder.spec}' "
                             f"but {list(shape)} in '{anchor.spec}'", file=file, field="sources")
    union = None
    if vocab == "union":
        union = build_union(models, sizes, has_base=base_folder is not None, fields=fields, file=file)
    tensors = {}
    for name, (shape, dtype) in ref.items():
        layer, kind = classify(name)
        if name in vocabulary:
            shape = (union.size, *shape[1:])
        tensors[name] = TensorInfo(name, shape, dtype, layer, kind)
    layers = [t.layer for t in tensors.values() if t.layer is not None]
    layout = Layout(tensors=tensors, num_layers=(max(layers) + 1) if layers else 0)
    return SourceSet(base=base_folder, sources=folders, layout=layout, vocab=vocab, resized=resized, union=union,
                     union_tensors=frozenset(vocabulary))


def _check_adapters(base: ModelFolder | None, sources: list[ModelFolder], *, vocab: str, file: str | None) -> None:
    """Adapters are task vectors over a base: the base must be given, be a model, and keep its vocabulary."""
    if base is not None and base.is_adapter:
        raise InputError(f"the base '{base.spec}' is a LoRA adapter", file=file, field="base",
                         fix="give the model the adapters were trained on as base, the adapter under sources")
    adapters = [i for i, folder in enumerate(sources) if folder.is_adapter]
    if not adapters:
        return
    if base is None:
        raise InputError(f"'{sources[adapters[0]].spec}' is a LoRA adapter, and an adapter needs its base model",
                         file=file, field="base", fix="set base: the model the adapters were trained on")
    if vocab == "union":
        raise InputError(f"'{sources[adapters[0]].spec}' is a LoRA adapter: it adds no tokens, and vocab: union "
                         "with adapters is not supported", file=file, field="vocab", fix="use vocab: base")


def _vocabulary_tensors(models: list[ModelFolder], sizes: list[int], fields: list[str], *,
                        file: str | None) -> set[str]:
    """The embedding and head tensors with a row per token (vocab_size rows in the anchor, models[0]): their
    rows may differ between the models, as long as each has a row for every token of its vocabulary."""
    anchor = models[0].header
    names = {n for n, (shape, _) in anchor.items() if classify(n)[1] in ("embed", "head") and len(shape) >= 1
             and shape[0] == sizes[0]}
    if not names:
        raise InputError(f"no embedding in '{models[0].spec}' has its vocab_size ({sizes[0]}) rows", file=file,
                         field=fields[0], fix="use vocab: base")
    for model, field_name, size in zip(models, fields, sizes):
        for name in sorted(names & set(model.header)):     # a missing tensor is named later, with the others
            shape = model.header[name][0]
            if shape[1:] != anchor[name][0][1:] or shape[0] < size:
                raise InputError(f"tensor '{name}' is {list(shape)} in '{model.spec}', which needs {size} rows "
                                 f"(its vocab_size) of {list(anchor[name][0][1:])}", file=file, field=field_name,
                                 fix="the models must share the hidden size; a vocabulary needs a row per token")
    return names


def _first_dup(items: list[str]) -> str:
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return ""
