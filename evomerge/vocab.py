"""The union vocabulary (`vocab: union`): mergekit 0.1.5's `tokenizer_source: union`, rebuilt here.

The merged tokenizer is the anchor's (the base, else the first source), its tokens at or beyond its
`vocab_size` stripped, with the tokens of the other models that it lacks added: first their ordinary
tokens, then their added tokens (chat and tool tokens) with the settings of the first model that has
them. Every token keeps the anchor's id where the anchor has it; the rest follow in model order (the
anchor, then the sources), and within one model in id order.

Each model's embedding and head are then laid out in union order (mergekit's PermutedVocabulary): a
token the model has keeps its own row; a token it lacks takes one row shared by every model that lacks
it -- the row of the only model that has the token, else the base's row where the base has it, else
the mean of the rows of the sources that have it (in float32, in source order), else zeros. The merge
method then runs on those rows as on any others, so a token only one model has keeps that model's row
under the task-vector methods (every task vector is zero there).

mergekit orders the models of a union through a Python set and a model's ordinary tokens through a
hash map, so where two sources bring tokens of their own, or one source several ordinary tokens, its
own runs differ in the ids of the new tokens; evomerge's order is one of them, always the same.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import InputError


@dataclass(frozen=True)
class Fill:
    """The one row that every model lacking a union token gets: copied from a model, a mean, or zeros."""

    token: int                         # union id
    donors: tuple[int, ...]            # indices (into UnionVocab.models) of the models whose rows it comes from
    rows: tuple[int, ...]              # their own ids of the token

    @property
    def mean(self) -> bool:
        return len(self.donors) > 1


@dataclass
class UnionVocab:
    """The merged tokenizer, and for each model where its rows go in the union's order."""

    tokenizer: Any                     # a transformers tokenizer: what the merged model ships with
    models: list[Any]                  # the SourceSet's models (ModelFolder), the anchor first
    rows: list[torch.Tensor]           # per model: (size,) its own id of each union token, -1 where it lacks it
    fills: list[Fill]                  # the tokens some model lacks, in union order
    contributors: tuple[int, ...]      # models beyond the anchor that brought tokens of their own
    new_ordinary: int                  # ordinary (not added) tokens the anchor lacked
    _lacking: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return int(self.rows[0].numel())

    @property
    def same_in_mergekit(self) -> bool:
        """Whether every run of mergekit 0.1.5 gives each token the id it has here: at most one source brought
        tokens of its own, at most one of them an ordinary one (the module's docstring says why)."""
        return len(self.contributors) <= 1 and self.new_ordinary <= 1

    def fill_rows(self, read: Callable[[int], torch.Tensor], *, dtype: torch.dtype) -> torch.Tensor | None:
        """The (len(fills), *row shape) rows of the tokens some model lacks; `read(i)` gives model i's tensor.
        A mean is taken in `dtype` (mergekit's working dtype: float32), a copied row keeps its model's dtype."""
        if not self.fills:
            return None
        tensors = {i: read(i) for i in sorted({i for f in self.fills for i in f.donors})}
        out_dtype = dtype if any(f.mean for f in self.fills) else None
        for tensor in tensors.values():
            out_dtype = tensor.dtype if out_dtype is None else torch.promote_types(out_dtype, tensor.dtype)
        shape = next(iter(tensors.values())).shape[1:] if tensors else read(0).shape[1:]
        out = torch.zeros((len(self.fills), *shape), dtype=out_dtype or dtype)   # a token no model has: zeros
        for j, fill in enumerate(self.fills):
            if fill.mean:
                acc = torch.zeros(shape, dtype=dtype)     # as mergekit: zeros, + each row in turn, / count
                for i, row in zip(fill.donors, fill.rows):
                    acc = acc + tensors[i][row].to(dtype)
                acc /= len(fill.donors)
                out[j] = acc
            elif fill.donors:
                out[j] = tensors[fill.donors[0]][fill.rows[0]]
        return out

    def permute(self, index: int, tensor: torch.Tensor, fills: torch.Tensor | None) -> torch.Tensor:
        """Model `index`'s (rows, *S) embedding or head as (size, *S) in union order; `fills`: `fill_rows`."""
        device = tensor.device
        rows = self.rows[index].to(device)
        present = rows >= 0
        dtype = tensor.dtype if fills is None else torch.promote_types(tensor.dtype, fills.dtype)
        out = torch.empty((self.size, *tensor.shape[1:]), dtype=dtype, device=device)
        out[present] = tensor[rows[present]].to(dtype)
        ids, positions = self.lacking(index)
        if ids.numel():
            out[ids.to(device)] = fills.to(device=device, dtype=dtype)[positions.to(device)]
        return out

    def lacking(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The union ids model `index` lacks, and the position of each one's row in `fills`."""
        if index not in self._lacking:
            position = {f.token: j for j, f in enumerate(self.fills)}
            ids = torch.nonzero(self.rows[index] < 0).flatten()
            self._lacking[index] = ids, torch.tensor([position[int(u)] for u in ids], dtype=torch.long)
        return self._lacking[index]

    def is_identity(self, index: int, rows: int) -> bool:
        """Whether model `index`'s tensor of `rows` rows is already in union order."""
        return self.size == rows and bool((self.rows[index] == torch.arange(rows)).all())


def vocab_size_of(folder: Any, *, file: str | None, field: str) -> int:
    """The model's vocabulary size from its config.json (top level, or a multimodal model's text_config)."""
    config = folder.config
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    if not isinstance(size, int) or size < 1:
        raise InputError(f"'{folder.spec}' has no vocab_size in its config.json, which vocab: union needs",
                         file=file, field=field, fix="add the model's vocabulary size to its config.json")
    return size


def build_union(models: Sequence[Any], sizes: Sequence[int], *, has_base: bool, fields: Sequence[str],
                file: str | None = None) -> UnionVocab:
    """The union of the models' tokenizers (`models[0]` the anchor; `sizes` their vocab sizes; `fields` where
    each is named in the config, for errors). Only tokenizer files are read: no weights."""
    tokenizers = [_load_tokenizer(m, fields[i], file=file, anchor=i == 0) for i, m in enumerate(models)]
    tokenizers[0] = _stripped(tokenizers[0], sizes[0], models[0], file=file, field=fields[0])
    vocabs = [t.get_vocab() for t in tokenizers]

    # mergekit's build_union_tokenizer: every token under each model's vocab_size (its added tokens too: mergekit
    # means to skip them here, but looks their text up among ids), then the added tokens, the first model's settings
    ordinary: dict[str, int] = {}          # token -> the model it first came from
    added: dict[str, tuple[Any, int]] = {}
    for i, (tok, vocab) in enumerate(zip(tokenizers, vocabs)):
        for token, idx in sorted(vocab.items(), key=lambda item: item[1]):
            if idx < sizes[i]:
                ordinary.setdefault(token, i)
        for idx, info in tok.added_tokens_decoder.items():
            if idx < sizes[i]:
                added.setdefault(info.content, (info, i))
    merged = _reloaded(tokenizers[0])
    contributors = set()
    new_ordinary = 0
    for token, i in ordinary.items():
        if token not in added and token not in vocabs[0]:
            merged.add_tokens(token)
            contributors.add(i)
            new_ordinary += 1
    for token, (info, i) in added.items():
        if token not in vocabs[0]:
            contributors.add(i)
        merged.add_tokens(info)

    union = merged.get_vocab()
    if max(union.values()) != len(union) - 1:       # mergekit would index past its rows, or leave some unset
        raise InputError(f"the union of the tokenizers has {len(union)} tokens but ids up to {max(union.values())}",
                         file=file, field="vocab", fix="use tokenizers whose ids are 0..N-1, or vocab: base")
    tokens = sorted(union, key=union.get)
    rows = []
    for i, vocab in enumerate(vocabs):
        own = [vocab.get(t, -1) for t in tokens]
        beyond = next((t for t, r in zip(tokens, own) if r >= sizes[i]), None)
        if beyond is not None:
            raise InputError(f"token {beyond!r} has id {vocab[beyond]} in '{models[i].spec}' but the model's "
                             f"vocab_size is {sizes[i]} (mergekit 0.1.5 refuses this union)", file=file,
                             field=fields[i], fix="resize the model's embeddings to its tokenizer, or use vocab: base")
        rows.append(torch.tensor(own, dtype=torch.long))
    fills = _fills(rows, has_base=has_base)
    return UnionVocab(tokenizer=merged, models=list(models), rows=rows, fills=fills,
                      contributors=tuple(sorted(contributors - {0})), new_ordinary=new_ordinary)


def _fills(rows: list[torch.Tensor], *, has_base: bool) -> list[Fill]:
    """mergekit's PermutedVocabulary.assign_embedding_sources, for the tokens some model lacks: the only model
    that has the token, else the base (models[0] where `has_base`) if it has it, else the mean of those that
    have it (sources only then, in their order: mergekit's order of the models it merges)."""
    stack = torch.stack(rows)                        # (models, size)
    lacking = torch.nonzero((stack < 0).any(dim=0)).flatten().tolist()
    fills = []
    for u, own in zip(lacking, stack[:, lacking].T.tolist()):
        present = [i for i, r in enumerate(own) if r >= 0]
        if len(present) > 1 and has_base and present[0] == 0:
            present = [0]
        fills.append(Fill(token=u, donors=tuple(present), rows=tuple(own[i] for i in present)))
    return fills


def _load_tokenizer(folder: Any, field: str, *, file: str | None, anchor: bool) -> Any:
    from transformers import AutoTokenizer

    if not folder.has_tokenizer():
        raise InputError(f"'{folder.spec}' has no tokenizer files ({folder.path}); vocab: union merges the "
                         "models' tokenizers", file=file, field=field,
                         fix="save its tokenizer into the folder (tokenizer.save_pretrained), or use vocab: base")
    try:
        if anchor:
            return AutoTokenizer.from_pretrained(str(folder.path), use_fast=True, trust_remote_code=False)
        return AutoTokenizer.from_pretrained(str(folder.path), trust_remote_code=False)
    except Exception as err:     # a broken or foreign tokenizer: the user's to fix
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(f"cannot load the tokenizer of '{folder.spec}' ({type(err).__name__}: {message[:160]})",
                         file=file, field=field, fix="check its tokenizer files, or use vocab: base") from None


def _stripped(tokenizer: Any, size: int, folder: Any, *, file: str | None, field: str) -> Any:
    """The anchor's tokenizer without its tokens at or beyond `size` (mergekit's get_stripped_tokenizer)."""
    unused = {tok for tok, idx in tokenizer.get_vocab().items() if idx >= size}
    if not unused:
        return tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    data = json.loads(backend.to_str()) if tokenizer.is_fast and backend is not None else None
    if data is None or data["model"]["type"] != "BPE":
        kind = data["model"]["type"] if data else "a slow tokenizer"
        raise InputError(f"the tokenizer of '{folder.spec}' has {len(unused)} tokens at or beyond its vocab_size "
                         f"{size} and is {kind}: mergekit 0.1.5 strips them only from a fast BPE tokenizer",
                         file=file, field=field, fix="use vocab: base")
    from tokenizers import Tokenizer

    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _reloaded(tokenizer: Any) -> Any:
    """A fresh copy of `tokenizer` (saved and loaded again, as mergekit makes it) to add tokens to."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp, legacy_format=False, safe_serialization=True)
        return AutoTokenizer.from_pretrained(str(Path(tmp)), use_fast=True, trust_remote_code=False)
