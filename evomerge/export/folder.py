"""Write a merged model as a Hugging Face folder, atomically.

The folder is built beside its destination and renamed into place at the end,
so a crash leaves either the old folder or the new one, never half of either.
Same tensors and recipe -> byte-identical safetensors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import yaml

from ..errors import InputError
from ..kernel import TensorStream
from ..recipe import Recipe
from ..sources import ModelFolder

SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


def check_destination(out: Path, *, force: bool) -> None:
    """Refuse to overwrite an existing output unless forced (before any work is done)."""
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise InputError("output already exists", file=out, fix="choose another folder or pass --force")
    check_writable(out.parent if out.parent != Path("") else Path("."))


def check_writable(folder: Path, *, what: str = "folder", fix: str = "choose a writable output folder") -> None:
    """Refuse a folder that cannot be made: its nearest existing ancestor is not writable."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise InputError(f"{what} is not writable", file=probe, fix=fix)


@contextlib.contextmanager
def atomic_dir(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder that becomes `out` only if the block finishes."""
    out = Path(out)
    check_destination(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(out: Path) -> None:
    """Scratch folders left by a killed writer (its process is gone) are removed."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = stale.name.rpartition("-")
        if not kind.endswith((".partial", ".old")) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class WeightsWriter:
    """Sharded safetensors written tensor by tensor, in any order: every file's header is written up front
    from the tensors' dtypes and shapes, then each tensor's bytes go to their place, so that a merge hands
    over one tensor at a time and holds none. Headers are canonical (sorted keys; safetensors' own writer
    orders metadata through a hash map, which differs between processes): equal tensors give equal bytes.
    Shards follow the given order, each file's tensors sorted by name; an index where there are several."""

    def __init__(self, folder: Path, specs: Mapping[str, tuple[torch.dtype, Sequence[int]]], *,
                 metadata: Mapping[str, str], shard_bytes: int = SHARD_BYTES) -> None:
        self.folder, self.specs, self.metadata = folder, specs, metadata
        shards: list[list[str]] = [[]]
        size = 0
        for name, (dtype, shape) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        self.files = (["model.safetensors"] if len(shards) == 1 else
                      [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        self.places: dict[str, tuple[int, int]] = {}      # name -> (file descriptor, byte offset)
        self.file_of = {name: file for file, names in zip(self.files, shards) for name in names}
        self.fds: list[int] = []
        for file, names in zip(self.files, shards):
            self.fds.append(os.open(folder / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            self._header(self.fds[-1], sorted(names))
        self.written: set[str] = set()

    def _header(self, fd: int, names: list[str]) -> None:
        header: dict[str, object] = {"__metadata__": dict(sorted(self.metadata.items()))}
        offset = 0
        for name in names:
            dtype, shape = self.specs[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.places[name] = (fd, offset)
            offset += nbytes
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        _write_at(fd, len(raw).to_bytes(8, "little") + raw, 0)
        start = 8 + len(raw)
        self.places.update({n: (fd, start + self.places[n][1]) for n in names})
        os.ftruncate(fd, start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """One tensor's bytes, at its place (once, of the dtype and shape announced)."""
        dtype, shape = self.specs[name]
        if name in self.written or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"tensor '{name}' written twice or not as announced ({tensor.dtype}, "
                               f"{list(tensor.shape)} against {dtype}, {list(shape)})")
        self.written.add(name)
        if tensor.numel():
            fd, offset = self.places[name]
            _write_at(fd, tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy(), offset)

    def close(self) -> list[str]:
        """Every file made durable, the index written; the files' names."""
        try:
            missing = [n for n in self.specs if n not in self.written]
            if missing:
                raise RuntimeError(f"{len(missing)} tensors were never written, e.g. '{missing[0]}'")
            for fd in self.fds:
                os.fsync(fd)
        finally:
            self.abort()
        if len(self.files) > 1:
            total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in self.specs.values())
            index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": self.file_of}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def abort(self) -> None:
        """The files closed as they are, once (the atomic folder they are in is then removed)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _write_at(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def write_weights(folder: Path, tensors: Mapping[str, torch.Tensor] | TensorStream, *, metadata: Mapping[str, str],
                  shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Sharded safetensors (+ index when more than one shard), shards in the given order: tensors held, or a
    TensorStream whose tensors are written as they come (a one-off merge's)."""
    stream = tensors if isinstance(tensors, TensorStream) else TensorStream.of(tensors)
    writer = WeightsWriter(folder, stream.specs, metadata=metadata, shard_bytes=shard_bytes)
    try:
        stream.fill(writer.write)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_model_folder(out: Path, *, tensors: Mapping[str, torch.Tensor] | TensorStream, recipe: Recipe,
                       config_from: ModelFolder, tokenizer_from: ModelFolder, dtype: torch.dtype, force: bool = False,
                       card_extra: str = "", extra_files: Mapping[str, str] | None = None,
                       base_models: Sequence[str] = (), tokenizer: Any = None,
                       config: Mapping[str, Any] | None = None, chat_template: str | None = None) -> Path:
    """config + tokenizer + safetensors (recipe hash and version in the metadata) + model card + recipe.

    `tokenizer`: a transformers tokenizer to save (a union vocabulary's) instead of `tokenizer_from`'s files;
    config.json then has its vocabulary size. `config`: the model's config where it is not `config_from`'s (a
    stack's). `chat_template`: the tokenizer's, in place of the one it came with (chat_template_of)."""
    from .. import __version__

    with atomic_dir(Path(out), force=force) as tmp:
        config = dict(config_from.config if config is None else config)
        config["dtype"] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        config.pop("torch_dtype", None)
        if tokenizer is not None:
            _set_vocab_size(config, len(tokenizer.get_vocab()))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = config_from.path / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, tmp / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))      # as mergekit writes its merged tokenizer
        else:
            for name in TOKENIZER_FILES:
                if (tokenizer_from.path / name).is_file():
                    shutil.copyfile(tokenizer_from.path / name, tmp / name)
        if chat_template is not None:
            set_chat_template(tmp, chat_template)
        metadata = {"format": "pt", "evomerge_version": __version__, "evomerge_recipe_sha256": recipe.sha256()}
        write_weights(tmp, tensors, metadata=metadata)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(model_card(recipe, extra=card_extra, base_models=base_models))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def chat_template_of(value: str, models: Sequence[ModelFolder]) -> str | None:
    """A recipe's chat_template as text: itself, or for "auto" the template most of `models` have (mergekit's
    rule: the first of the most common; None where no model has one)."""
    if value != "auto":
        return value
    found = [t.strip() for t in (m.chat_template() for m in models) if t]
    return Counter(found).most_common(1)[0][0] if found else None


def set_chat_template(folder: Path, template: str) -> None:
    """Give the tokenizer files in `folder` this chat template, as transformers 5 saves one: chat_template.jinja,
    and no other copy that a loader could prefer."""
    (folder / "chat_template.jinja").write_text(template)
    (folder / "chat_template.json").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.pop("chat_template", None) is not None:
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _set_vocab_size(config: dict, size: int) -> None:
    """Set the vocabulary size where the config keeps it (top level, or a multimodal model's text_config)."""
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        config["text_config"] = {**text, "vocab_size": size}
    else:
        config["vocab_size"] = size


def model_card(recipe: Recipe, *, extra: str = "", base_models: Sequence[str] = ()) -> str:
    """The folder's README.md. Its metadata follows the hub's convention for merges, so that an upload shows its
    lineage: `base_model` lists the base and every source that is a hub id, `base_model_relation: merge`."""
    sources = "\n".join(f"- `{s}`" for s in recipe.sources)
    score = (recipe.provenance or {}).get("score")
    meta: dict = {"library_name": "transformers", "tags": ["merge", "evomerge"]}
    if base_models:
        meta |= {"base_model": list(base_models), "base_model_relation": "merge"}
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        f"# Merged model ({recipe.method})",
        "",
        f"Made with evomerge by `{recipe.method}` of these sources"
        + (f" onto base `{recipe.base}`" if recipe.base else "") + ":",
        "",
        sources,
        "",
    ]
    if score:
        lines += [f"Scores: {', '.join(f'{k} {v:.4f}' for k, v in score.items() if isinstance(v, (int, float)))}", ""]
    lines += ["Rebuild it bit for bit with `evomerge merge recipe.yaml -o OUT`:", "", "```yaml",
              recipe.to_yaml().rstrip(), "```", ""]
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)
