"""One local model folder, read through its JSON and its safetensors headers (no weight until asked).

`ModelFolder` is what every stage holds of a model: its config, its tensors' names, shapes and dtypes
(parsed from the safetensors headers, malformed files refused), content hashes, and a tensor read on
demand. `locate` finds the folder for a path, a zoo/ name or a hub id. A LoRA adapter folder is a
ModelFolder too (evomerge.adapters); sources.open_folder tells them apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .errors import InputError
from .paths import resolve_path

_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "merges.txt")
_PICKLE = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "pytorch_model.bin.index.json")

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}



@dataclass
class ModelFolder:
    """One local Hugging Face model folder, read through its safetensors headers."""

    spec: str                       # as written in the config / recipe
    path: Path
    files: dict[str, Path] = field(default_factory=dict)   # tensor name -> safetensors file
    hub_id: str | None = None       # org/name where the folder came from the Hugging Face hub (or its cache)

    @property
    def short(self) -> str:
        return Path(self.spec.split("@")[0].rstrip("/")).name

    @property
    def is_adapter(self) -> bool:
        """A PEFT LoRA adapter (evomerge.adapters.AdapterFolder) rather than a whole model."""
        return False

    @cached_property
    def config(self) -> dict:
        cfg = self.path / "config.json"
        try:
            return json.loads(cfg.read_text())
        except FileNotFoundError:
            raise InputError("no config.json in the model folder", file=self.path,
                             fix="point to a Hugging Face model folder") from None
        except json.JSONDecodeError as err:
            raise InputError(f"config.json is not valid JSON ({err.msg})", file=cfg) from None

    @cached_property
    def header(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {}
        for name, file in self.files.items():
            out[name] = header_of(file)[name]
        return out

    def has_tokenizer(self) -> bool:
        return any((self.path / name).is_file() for name in _TOKENIZER_MARKERS)

    def has_chat_template(self) -> bool:
        """Whether the folder's tokenizer has a chat template (its own file, or in tokenizer_config.json)."""
        if (self.path / "chat_template.jinja").is_file() or (self.path / "chat_template.json").is_file():
            return True
        try:
            return bool(json.loads((self.path / "tokenizer_config.json").read_text()).get("chat_template"))
        except (OSError, ValueError, AttributeError):
            return False

    def chat_template(self) -> str | None:
        """The folder's chat template, where transformers reads it (chat_template_in)."""
        return chat_template_in(self.path)

    def require_tokenizer(self, *, file: str | None = None) -> None:
        if not self.has_tokenizer():
            raise InputError(f"no tokenizer files in '{self.spec}' ({self.path})", file=file, field="base",
                             fix="save the tokenizer into the model folder (tokenizer.save_pretrained)")

    def weight_files(self) -> list[Path]:
        return sorted(set(self.files.values()))

    def sha256(self) -> str:
        """Hash of the weight files' bytes, in name order."""
        digest = hashlib.sha256()
        for file in self.weight_files():
            with open(file, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """A cheap content hash of the weights: a file under 64 MiB whole, a larger one by its size, header
        and 64 samples of 64 KiB spread over it (4 MiB read). Unlike mtimes it survives a copy or a
        byte-identical rebuild; unlike `sha256` it does not read a large model through."""
        digest = hashlib.sha256()
        for file in self.weight_files():
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as fh:
                if size < 64 << 20:
                    digest.update(fh.read())
                    continue
                head = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(min(head, 1 << 24)))
                for i in range(64):
                    fh.seek(size * i // 64)
                    digest.update(fh.read(1 << 16))
        return digest.hexdigest()

    def read(self, name: str, *, device: str | torch.device = "cpu") -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt", device=str(device)) as fh:
            return fh.get_tensor(name)


_HEADER_CACHE: dict[tuple[str, float, int], dict] = {}


def header_of(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Parse a safetensors header without reading tensor data; malformed files are InputErrors."""
    stat = file.stat()
    key = (str(file), stat.st_mtime, stat.st_size)
    if key in _HEADER_CACHE:
        return _HEADER_CACHE[key]
    try:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            size = int.from_bytes(raw, "little")
            if size > stat.st_size - 8 or size > 100_000_000:
                raise ValueError("header length beyond the end of the file")
            meta = json.loads(fh.read(size))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"not a valid safetensors file ({err})", file=file,
                         fix="re-save or re-download the weights") from None
    data_len = stat.st_size - 8 - size
    out = {}
    for name, entry in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"malformed header entry for tensor '{name}'", file=file) from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * torch.empty((), dtype=dtype).element_size() or end > data_len:
            raise InputError(f"tensor '{name}' header says shape {list(shape)} {entry['dtype']} but its data "
                             f"spans {end - begin} bytes (file truncated or header wrong)", file=file,
                             fix="re-save or re-download the weights")
        out[name] = (shape, dtype)
    _HEADER_CACHE[key] = out
    return out


def locate(spec: str, *, relative_to: Path | None = None, what: str = "source",
           file: str | None = None, field: str | None = None) -> Path:
    """A local folder for `spec`: a path, a zoo/ name, or a hub id (org/name[@revision])."""
    local = resolve_path(spec, relative_to=relative_to)
    if local is not None:
        if not local.is_dir():
            raise InputError(f"{what} '{spec}' is not a folder", file=file, field=field)
        return local
    repo, _, revision = spec.partition("@")
    looks_like_hub = re.fullmatch(r"[\w.-]+/[\w.-]+", repo) is not None and not spec.startswith(("zoo/", ".", "/"))
    if not looks_like_hub:
        raise InputError(f"{what} '{spec}' not found", file=file, field=field,
                         fix="give a model folder, a zoo/ name (run 'evomerge zoo build') or a hub id org/name")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo, revision=revision or None,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as err:  # offline, missing repo, auth: all the user's to fix
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise InputError(f"{what} '{spec}' is not a local folder and could not be fetched from the hub"
                         f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: {type(err).__name__}",
                         file=file, field=field, fix="check the name or download it first") from None
    return Path(path)


def chat_template_in(folder: Path) -> str | None:
    """A tokenizer folder's chat template, where transformers reads it: chat_template.jinja, chat_template.json,
    else tokenizer_config.json (a list of named templates: its "default")."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            template = json.loads((folder / name).read_text()).get("chat_template")
            if isinstance(template, list):
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if template:
                return template
    return None
