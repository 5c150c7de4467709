"""Rows of a task: their shapes, and reading them from JSONL files or Hugging Face datasets.

Every bad row is an `InputError` located at ``file:line`` (or ``dataset[split]:index``)
with the field that is wrong. Extra keys in a row are ignored (ids, metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, suggest
from ..paths import resolve_path


@dataclass(frozen=True)
class ChoiceRow:
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class GenerateRow:
    prompt: str
    target: str


@dataclass(frozen=True)
class TextRow:
    text: str


def _string(obj: dict, key: str, *, empty_ok: bool = True) -> str:
    if key not in obj:
        raise InputError(f"missing '{key}'", field=key, fix=suggest(key, [str(k) for k in obj]))
    value = obj[key]
    if not isinstance(value, str):
        raise InputError(f"'{key}' must be a string, not {type(value).__name__}", field=key)
    if not empty_ok and not value:
        raise InputError(f"'{key}' is empty", field=key)
    return value


def parse_choice(obj: dict) -> ChoiceRow:
    prompt = _string(obj, "prompt")
    for key in ("choices", "answer"):
        if key not in obj:
            raise InputError(f"missing '{key}'", field=key, fix=suggest(key, [str(k) for k in obj]))
    choices = obj.get("choices")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise InputError("'choices' must be a list of at least 2 non-empty strings", field="choices")
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise InputError(f"'answer' must be an integer index into 'choices', not {answer!r}", field="answer")
    if not 0 <= answer < len(choices):
        raise InputError(f"answer index {answer} is out of range for {len(choices)} choices", field="answer",
                         fix=f"use 0..{len(choices) - 1}")
    return ChoiceRow(prompt, tuple(choices), answer)


def parse_generate(obj: dict) -> GenerateRow:
    return GenerateRow(_string(obj, "prompt"), _string(obj, "target", empty_ok=False))


def parse_text(obj: dict) -> TextRow:
    return TextRow(_string(obj, "text", empty_ok=False))


PARSERS: dict[str, Callable[[dict], Any]] = {"choice": parse_choice, "generate": parse_generate, "perplexity": parse_text}
FIELDS = {"choice": ("prompt", "choices", "answer"), "generate": ("prompt", "target"), "perplexity": ("text",)}


def read_jsonl(path: Path, parse: Callable[[dict], Any]) -> list[Any]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", file=path) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON: {err.msg} (column {err.colno})", file=f"{path}:{number}",
                             fix="one JSON object per line") from None
        if not isinstance(obj, dict):
            raise InputError(f"expected a JSON object, got {type(obj).__name__}", file=f"{path}:{number}")
        try:
            rows.append(parse(obj))
        except InputError as err:
            raise err.at(file=f"{path}:{number}") from None
    if not rows:
        raise InputError("no rows", file=path, fix="one JSON object per line")
    return rows


def read_dataset(source: Any, split: str, parse: Callable[[dict], Any], *, base_dir: Path, file: Path | None,
                 field: str) -> list[Any]:
    """Rows of a Hugging Face dataset split, columns renamed by ``source.columns`` (dotted paths reach into dicts)."""
    dataset = _open_dataset(source, split, base_dir=base_dir, file=file, field=field)
    where = f"{source.path}[{split}]"
    kind = next(k for k, p in PARSERS.items() if p is parse)
    columns = {name: source.columns.get(name, name) for name in FIELDS[kind]}
    for name in source.columns:
        if name not in FIELDS[kind]:
            raise InputError(f"unknown row field '{name}'", file=file, field=f"{field}.columns.{name}",
                             fix=f"a {kind} row has {', '.join(FIELDS[kind])}")
    available = list(dataset.column_names)
    for name, column in columns.items():
        if column.split(".")[0] not in available:
            raise InputError(f"column '{column}' not in {where} (columns: {', '.join(available)})", file=file,
                             field=f"{field}.columns.{name}", fix=suggest(column, available))
    rows = []
    for index, record in enumerate(dataset):
        obj = {name: _dig(record, column) for name, column in columns.items()}
        try:
            rows.append(parse(obj))
        except InputError as err:
            raise err.at(file=f"{where}:{index}") from None
    if not rows:
        raise InputError("no rows", file=file, field=field)
    return rows


def _dig(record: dict, column: str) -> Any:
    value: Any = record
    for part in column.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _open_dataset(source: Any, split: str, *, base_dir: Path, file: Path | None, field: str) -> Any:
    import datasets

    local = resolve_path(source.path, relative_to=base_dir)
    try:
        if local is not None and local.is_dir() and any((local / m).exists() for m in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise InputError(f"no split '{split}' in {source.path}", file=file, field=f"{field}.split",
                                     fix=suggest(split, list(loaded)) or f"splits: {', '.join(loaded)}")
                loaded = loaded[split]
            return loaded
        return datasets.load_dataset(str(local) if local is not None else source.path, source.name, split=split)
    except InputError:
        raise
    except Exception as err:  # datasets raises many types for a missing or offline dataset
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load dataset '{source.path}' split '{split}': {detail}", file=file, field=field,
                         fix="offline, a dataset must be in the local cache or saved with save_to_disk") from None
