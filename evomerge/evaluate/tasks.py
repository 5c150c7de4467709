"""The task file: schema, validation, and the rows of each split.

```yaml
tasks:
  - name: inc
    type: generate                 # choice | generate | perplexity | lm_eval
    data: {search: data/inc.search.jsonl, heldout: data/inc.heldout.jsonl}
    max_new_tokens: 8
    extract: strip                 # strip | first_line | last_number | {regex: "..."}
  - name: pick
    type: choice
    data: data/pick.jsonl          # one file: a seeded split (heldout_fraction, split_seed)
    chat_template: true            # each prompt as one user turn of the model's chat template (lm-eval's
    system_prompt: Answer briefly. #   apply_chat_template=True and system_instruction); choice and generate
    limit: 100                     # a seeded subsample, the same on every call
  - name: wiki
    type: perplexity
    dataset: {path: data/wiki_ds, split: test, columns: {text: body}}
  - name: arc
    type: lm_eval
    task: arc_easy
```

`load_tasks` validates the file and reads every row before any model exists,
so a bad file fails in one line (`InputError`) and never mid-search. The
split of one file is drawn with `split_seed` (a property of the task file, so
held-out scores stay comparable across studies) and depends on nothing else but the
number of rows: two tasks over the same rows (a choice and a generate version, or a
renamed task) split them alike, so no task's held-out rows are another's search rows;
`limit` subsamples with the
study seed, nested (the rows for limit 50 are among those for limit 100).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InputError, suggest
from ..paths import resolve_path
from ..yamlio import load_yaml
from . import rows as row_io
from .splits import SPLITS, check_split, seeded_split, subsample

TASK_TYPES = ("choice", "generate", "perplexity", "lm_eval")
METRICS = {
    "choice": ("acc", "acc_norm"),
    "generate": ("exact_match", "token_acc", "target_logprob"),
    "perplexity": ("neg_log_ppl",),
}
_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFiles(_Strict):
    search: str
    heldout: str


class DatasetSource(_Strict):
    """Rows from a Hugging Face dataset: a hub id (cached, offline-safe) or a local folder."""

    path: str
    name: str | None = None
    split: str | SplitFiles = "train"
    columns: dict[str, str] = {}


class RegexExtract(_Strict):
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        return value


class _Split(_Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    split_seed: int = 0
    limit: Annotated[int, Field(ge=1)] | None = None


class _DataTask(_Split):
    data: str | SplitFiles | None = None
    dataset: DatasetSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "_DataTask":
        if (self.data is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'data' (JSONL files) and 'dataset' (a Hugging Face dataset)")
        return self


class _PromptTask(_DataTask):
    """A task whose rows are prompts: written as they are, or as one user turn of the model's chat template."""

    chat_template: bool = False    # the prompt rendered as lm-eval's apply_chat_template=True renders it
    system_prompt: str | None = None   # a system turn before it (lm-eval's system_instruction)

    @model_validator(mode="after")
    def _system_in_a_chat(self) -> "_PromptTask":
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("system_prompt needs chat_template: true (a system turn is part of a chat)")
        return self


class ChoiceTask(_PromptTask):
    type: Literal["choice"]
    metric: Literal["acc", "acc_norm"] = "acc"


class GenerateTask(_PromptTask):
    type: Literal["generate"]
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 32
    stop: list[Annotated[str, Field(min_length=1)]] = []
    extract: Literal["strip", "first_line", "last_number"] | RegexExtract = "strip"
    metric: Literal["exact_match", "token_acc", "target_logprob"] = "exact_match"
    fast_path: bool = True  # teacher-forced verification; results are identical either way


class PerplexityTask(_DataTask):
    type: Literal["perplexity"]
    metric: Literal["neg_log_ppl"] = "neg_log_ppl"


class LmEvalTask(_Split):
    type: Literal["lm_eval"]
    task: str
    include_path: str | None = None
    metric: str = "acc"  # an lm-eval metric key; 'acc' or 'exact_match,strict-match' (metric,filter)
    num_fewshot: Annotated[int, Field(ge=0)] | None = None


TaskSpec = Annotated[Union[ChoiceTask, GenerateTask, PerplexityTask, LmEvalTask], Field(discriminator="type")]
_MODELS = {"choice": ChoiceTask, "generate": GenerateTask, "perplexity": PerplexityTask, "lm_eval": LmEvalTask}


class TaskFile(_Strict):
    tasks: Annotated[list[TaskSpec], Field(min_length=1)]

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list) -> list:
        seen = set()
        for task in tasks:
            if task.name in seen:
                raise ValueError(f"task name '{task.name}' is used twice")
            seen.add(task.name)
        return tasks


@dataclass(frozen=True)
class TaskSuite:
    """A validated task file with the rows of each split (lm_eval tasks load their documents in the Evaluator)."""

    path: Path | None
    specs: tuple[Any, ...]
    seed: int = 0
    _rows: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def spec(self, name: str) -> Any:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise InputError(f"no task named '{name}'", file=self.path, field="tasks", fix=suggest(name, self.names))

    def primary_metric(self, name: str) -> str:
        """The metric a task is scored by: an lm_eval `metric: exact_match,strict-match` reports `exact_match`
        (of that filter's outputs)."""
        return self.spec(name).metric.partition(",")[0]

    def with_options(self, name: str, **changes: Any) -> "TaskSuite":
        """The same suite with one task's options changed (e.g. ``fast_path=False``), re-validated."""
        spec = self.spec(name)
        updated = type(spec).model_validate(spec.model_dump() | changes)
        return dataclasses.replace(self, specs=tuple(updated if s.name == name else s for s in self.specs))

    def require_chat_template(self, has_template: bool) -> None:
        """Bad input where a task renders its prompts with the model's chat template and the tokenizer has none."""
        chat = [spec.name for spec in self.specs if getattr(spec, "chat_template", False)]
        if chat and not has_template:
            raise InputError(f"task '{chat[0]}' renders its prompts with the model's chat template, and the "
                             "model's tokenizer has none", file=self.path, field=f"tasks.{chat[0]}.chat_template",
                             fix="use a chat model's tokenizer, or set chat_template: false")

    def rows(self, name: str, split: str) -> tuple[Any, ...]:
        """The rows of one split of a data task, after `limit`."""
        check_split(split)
        return self._rows[(name, split)]


def load_tasks(path: str | Path, *, seed: int = 0) -> TaskSuite:
    """Validate a task file and read every row; every problem is one `InputError` line."""
    path = Path(path)
    raw = load_yaml(path)
    file = parse_task_file(raw, file=path)
    rows: dict[tuple[str, str], tuple[Any, ...]] = {}
    for spec in file.tasks:
        where = f"tasks.{spec.name}"
        if spec.type == "lm_eval":
            from .lm_eval_backend import check_task

            check_task(spec, base_dir=path.parent, file=path, field=where)
            continue
        for split, split_rows in _split_rows(spec, base_dir=path.parent, file=path, field=where).items():
            rows[(spec.name, split)] = tuple(subsample(split_rows, spec.limit, seed=seed, key=f"{spec.name}/{split}"))
    return TaskSuite(path=path.resolve(), specs=tuple(file.tasks), seed=seed, _rows=rows)


def parse_task_file(raw: dict[str, Any], *, file: Path | None = None) -> TaskFile:
    """The schema check alone (no files read), with typo suggestions."""
    for key in raw:
        if key != "tasks":
            raise InputError(f"unknown key '{key}'", file=file, field=key,
                             fix=suggest(key, ["tasks"]) or "a task file has one key, 'tasks'")
    tasks = raw.get("tasks")
    for index, task in enumerate(tasks if isinstance(tasks, list) else []):
        if not isinstance(task, dict):
            continue
        where = f"tasks.{task.get('name', index)}"
        kind = task.get("type")
        if kind not in _MODELS:
            problem = "missing 'type'" if kind is None else f"unknown task type '{kind}'"
            raise InputError(problem, file=file, field=f"{where}.type",
                             fix=(suggest(str(kind), TASK_TYPES) if kind else None) or f"one of {', '.join(TASK_TYPES)}")
        known = _MODELS[kind].model_fields
        for key in task:
            if key not in known:
                raise InputError(f"unknown key '{key}' for a {kind} task", file=file, field=f"{where}.{key}",
                                 fix=suggest(str(key), list(known)) or f"known keys: {', '.join(known)}")
    try:
        return TaskFile.model_validate(raw)
    except ValidationError as err:
        raise _input_error(err, raw, file) from None


def _input_error(err: ValidationError, raw: dict[str, Any], file: Path | None) -> InputError:
    errors = err.errors()
    first = max(errors, key=lambda e: len(e["loc"]))  # for a union, the branch that got furthest
    loc = list(first["loc"])
    parts: list[str] = []
    if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
        task = raw["tasks"][loc[1]]
        parts.append(f"tasks.{task.get('name', loc[1])}" if isinstance(task, dict) else f"tasks.{loc[1]}")
        loc = loc[3:] if len(loc) > 2 and loc[2] in _MODELS else loc[2:]  # drop the union tag
    parts += [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p[:1].isupper()))]  # no union labels
    message = first["msg"].removeprefix("Value error, ")
    field = ".".join(p for p in parts if p) or None
    fix = None
    if field and field.endswith(".extract") and first["type"] == "literal_error":
        fix = "or a regex: {regex: '...'}, whose first group (else the whole match) is compared"
    return InputError(message, file=file, field=field, fix=fix)


def _split_rows(spec: Any, *, base_dir: Path, file: Path, field: str) -> dict[str, list[Any]]:
    parse = row_io.PARSERS[spec.type]
    if spec.data is not None:
        if isinstance(spec.data, SplitFiles):
            return {split: row_io.read_jsonl(_data_path(getattr(spec.data, split), base_dir, file, f"{field}.data.{split}"),
                                             parse) for split in SPLITS}
        rows = row_io.read_jsonl(_data_path(spec.data, base_dir, file, f"{field}.data"), parse)
    else:
        source = spec.dataset
        if isinstance(source.split, SplitFiles):
            return {split: row_io.read_dataset(source, getattr(source.split, split), parse, base_dir=base_dir,
                                               file=file, field=f"{field}.dataset") for split in SPLITS}
        rows = row_io.read_dataset(source, source.split, parse, base_dir=base_dir, file=file, field=f"{field}.dataset")
    if len(rows) < 2:
        raise InputError(f"{len(rows)} row(s) cannot be split into search and heldout", file=file, field=field,
                         fix="give at least 2 rows, or separate search and heldout files")
    indices = seeded_split(len(rows), spec.heldout_fraction, seed=spec.split_seed)
    return {split: [rows[i] for i in idx] for split, idx in indices.items()}


def _data_path(text: str, base_dir: Path, file: Path, field: str) -> Path:
    found = resolve_path(text, relative_to=base_dir)
    if found is None or not found.is_file():
        raise InputError(f"data file not found: '{text}'", file=file, field=field,
                         fix="paths are relative to the task file; 'zoo/...' points into the model zoo")
    return found
