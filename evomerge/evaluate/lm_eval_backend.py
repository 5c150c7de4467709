"""lm-evaluation-harness tasks, run in memory on the resident model.

An ``lm_eval`` task names any lm-eval task or group (``task: arc_easy``), or a
custom lm-eval YAML task found under ``include_path``. The task objects and
lm-eval's HF wrapper around the resident model (``HFLM(pretrained=model)``) are
built once per Evaluator; each evaluation re-runs only lm-eval's request loop,
so in-place weight updates are seen. The evaluation documents are split into
search / heldout with the task's ``split_seed`` and subsampled with ``limit``,
and lm-eval is asked for exactly those documents (its ``samples`` argument).
Per-example metric values come back through lm-eval's logged samples.

Held-out means held out: at load, every document equal to a held-out one is removed from each
(sub)task's few-shot pool, so no prompt shows a held-out document with its answer. A pool drawn from
a training split is unchanged; one drawn from the evaluation documents keeps only search documents,
and an evaluated document is never its own example.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import InputError, suggest
from ..paths import resolve_path
from .splits import seeded_split, subsample

FEWSHOT_SEED = 1234   # lm-eval's own default, so a task's few-shot prompts are the ones lm_eval builds

_MANAGERS: dict[tuple[str, bool], Any] = {}  # task indexes: scanning lm-eval's 14k YAML files takes seconds


def task_manager(include_path: Path | None, *, defaults: bool = True) -> Any:
    key = (str(include_path), defaults)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _quiet()
        _MANAGERS[key] = TaskManager(include_path=str(include_path) if include_path else None,
                                     include_defaults=defaults)
    return _MANAGERS[key]


def _quiet() -> None:
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def include_dir(spec: Any, *, base_dir: Path, file: Path | None, field: str) -> Path | None:
    if spec.include_path is None:
        return None
    found = resolve_path(spec.include_path, relative_to=base_dir)
    if found is None or not found.is_dir():
        raise InputError(f"include_path not found: '{spec.include_path}'", file=file, field=f"{field}.include_path",
                         fix="a folder of lm-eval task YAML files, relative to the task file")
    return found


def check_task(spec: Any, *, base_dir: Path, file: Path | None, field: str) -> Any:
    """The task manager that knows `spec.task`; an unknown name is an InputError with a suggestion."""
    include = include_dir(spec, base_dir=base_dir, file=file, field=field)
    if include is not None:  # a custom task is found without scanning lm-eval's own tree
        manager = task_manager(include, defaults=False)
        if spec.task in manager.all_tasks:
            return manager
    manager = task_manager(include)
    if spec.task not in manager.all_tasks:
        near = [n for n in manager.all_tasks if abs(len(n) - len(spec.task)) <= 3]  # difflib on 14k names is slow
        raise InputError(f"unknown lm-eval task '{spec.task}'", file=file, field=f"{field}.task",
                         fix=suggest(spec.task, near) or "see `lm-eval ls tasks`")
    return manager


class LmEvalTask:
    """One lm_eval task of a suite, loaded once, evaluated on demand."""

    def __init__(self, spec: Any, lm: Any, *, base_dir: Path, file: Path | None) -> None:
        self.spec = spec
        self.lm = lm
        self.file = file
        manager = check_task(spec, base_dir=base_dir, file=file, field=f"tasks.{spec.name}")
        _quiet()
        try:
            self.loaded = manager.load([spec.task])
        except Exception as err:   # the task's own YAML: a data file not found, a bad template, ...
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise InputError(f"lm-eval cannot load task '{spec.task}': {type(err).__name__}: {first}", file=file,
                             field=f"tasks.{spec.name}.task", fix="check that task's YAML (and its data files)") from None
        self.sizes = {}
        for name, task in sorted(self.loaded["tasks"].items()):
            if spec.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            docs = task.eval_docs   # recomputed on each access when the task has process_docs: read once
            self.sizes[name] = len(docs)
            if task.get_config("num_fewshot") > 0:
                self._hold_out_of_fewshot(name, task, docs)
        self.metric, _, self.filter = spec.metric.partition(",")

    def _hold_out_of_fewshot(self, name: str, task: Any, docs: Any) -> None:
        """Remove every held-out document from the task's few-shot pool (lm-eval compares documents by
        equality); where the pool overlaps the evaluation documents, also keep each document out of its
        own prompt, as lm-eval does when the few-shot split is the test split."""
        heldout = set(seeded_split(len(docs), self.spec.heldout_fraction, seed=self.spec.split_seed)["heldout"])
        keys = [_doc_key(doc) for doc in docs]
        banned = {key for i, key in enumerate(keys) if i in heldout}
        sampler = getattr(task, "sampler", None)   # none when lm-eval found no few-shot documents at all
        pool = [] if sampler is None else list(sampler.fewshot_docs())   # fewshot_indices applied
        pool_keys = [_doc_key(doc) for doc in pool]
        kept = [doc for doc, key in zip(pool, pool_keys) if key not in banned]
        overlap = not set(keys).isdisjoint(pool_keys)
        shots = task.get_config("num_fewshot")
        need = shots + 1 if overlap else shots    # + the evaluated document, which lm-eval then skips
        if len(kept) < need:
            raise InputError(f"lm-eval task '{name}' has {len(kept)} few-shot document(s) outside the held-out split; "
                             f"num_fewshot {shots} needs {need}", file=self.file,
                             field=f"tasks.{self.spec.name}.num_fewshot",
                             fix="lower num_fewshot, or give the lm-eval task a fewshot_split disjoint from "
                                 "its test docs")
        if sampler is None:
            return
        sampler.fewshot_indices = None
        sampler.replace_df(kept)
        if overlap:   # lm-eval reads fewshot_cfg.split after load only to decide this exclusion
            task.fewshot_cfg.split = task.config.test_split

    def documents(self, split: str, *, seed: int, limit: int | None) -> list[tuple[str, int]]:
        """(subtask, document index) of a split, in a fixed order."""
        out = []
        for name, size in self.sizes.items():
            if size < 2:
                raise InputError(f"lm-eval task '{name}' has {size} document(s); cannot split it",
                                 file=self.file, field=f"tasks.{self.spec.name}")
            indices = seeded_split(size, self.spec.heldout_fraction, seed=self.spec.split_seed)[split]
            indices = subsample(indices, self.spec.limit, seed=seed, key=f"{self.spec.name}/{name}/{split}")
            out += [(name, i) for i in indices]
        return subsample(out, limit, seed=seed, key=f"{self.spec.name}/{split}") if limit else out

    @property
    def higher_is_better(self) -> bool:
        """Whether the primary metric grows with quality (lm-eval's own flag; perplexities do not)."""
        flags = [task.higher_is_better().get(self.metric) for task in self.loaded["tasks"].values()]
        return all(flag is not False for flag in flags)

    def run(self, documents: list[tuple[str, int]]) -> tuple[dict[str, list[float]], dict[str, float]]:
        """Per-document values of every per-example metric, in the order of `documents`, and the task's
        scores as lm-eval aggregates them (a perplexity over the whole corpus, a group's own weighting).

        Each document's value is the task's aggregation over that document alone: for a perplexity
        (lm-eval logs each document's log-likelihood, with its word count for word_perplexity), the
        document's own perplexity."""
        from lm_eval.evaluator import evaluate

        _quiet()
        samples: dict[str, list[int]] = {}
        for name, index in documents:
            samples.setdefault(name, []).append(index)
        tasks = {name: task for name, task in self.loaded["tasks"].items() if name in samples}
        for task in tasks.values():  # few-shot examples are drawn from a stream: restart it, or each call differs
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        whole = len(tasks) == len(self.loaded["tasks"])   # a group aggregates only over all its tasks
        task_dict = {"tasks": tasks, "groups": self.loaded["groups"] if whole else {},
                     "group_map": self.loaded.get("group_map", {}) if whole else {}}
        results = evaluate(lm=self.lm, task_dict=task_dict, samples=samples, bootstrap_iters=0, log_samples=True)
        logged = results["samples"]
        by_doc: dict[tuple[str, int], dict[str, Any]] = {}
        chosen = self.filter
        for name, entries in logged.items():
            filters = [e["filter"] for e in entries]
            chosen = self.filter or ("none" if "none" in filters else filters[0])
            if chosen not in filters:
                raise InputError(f"lm-eval task '{name}' has no filter '{chosen}'", file=self.file,
                                 field=f"tasks.{self.spec.name}.metric",
                                 fix=f"filters: {', '.join(sorted(set(filters)))}")
            for entry in entries:
                if entry["filter"] == chosen:
                    by_doc[(name, entry["doc_id"])] = entry
        first_name = documents[0][0]
        first = by_doc[documents[0]]
        metrics = [k for k in first.get("metrics", []) if _per_example(first.get(k))]   # not doc_id, target, ...
        if self.metric not in metrics:
            raise InputError(f"lm-eval task '{self.spec.task}' gives no per-example metric '{self.metric}'",
                             file=self.file, field=f"tasks.{self.spec.name}.metric",
                             fix=suggest(self.metric, metrics) or f"metrics: {', '.join(metrics)}")
        aggregations = {name: task.aggregation() for name, task in tasks.items()}
        per_doc = {m: [_one(by_doc[d][m], aggregations[d[0]].get(m)) for d in documents]
                   for m in [self.metric] + [k for k in metrics if k != self.metric]}
        found = results["results"]      # the named task or group; else one task of a group that `limit` cut
        scored = found.get(self.spec.task) or (found.get(first_name, {}) if len(tasks) == 1 else {})
        aggregates = {m: float(scored[f"{m},{chosen}"]) for m in per_doc
                      if isinstance(scored.get(f"{m},{chosen}"), (int, float))}
        return per_doc, aggregates


def _doc_key(doc: Any) -> str:
    """A document's identity for lm-eval's equality of documents (dicts), hashable and fast."""
    return json.dumps(doc, sort_keys=True, default=str)


def _per_example(value: Any) -> bool:
    """A metric's logged value: a number, or the (value, weight) pair of a corpus-level metric."""
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(_per_example(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one(value: Any, aggregate: Any) -> float:
    """A document's own value of a metric: lm-eval's aggregation over this one document (a perplexity's
    exp(-log-likelihood), a mean's value), so that it runs the way the task's score does."""
    item = tuple(value) if isinstance(value, (list, tuple)) else value
    try:
        return float(aggregate([item]))
    except Exception:          # an aggregation that needs several documents (a correlation)
        return float(item) if not isinstance(item, tuple) else float("nan")


def make_lm(model: Any, tokenizer: Any, *, batch_size: int) -> Any:
    """lm-eval's HF wrapper around the resident model object (it reads the weights at call time)."""
    from lm_eval.models.huggingface import HFLM

    _quiet()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def task_yaml(spec: Any, data_file: str | Path, *, task: str | None = None) -> dict[str, Any]:
    """An lm-eval task config equivalent to a built-in `choice` or `generate` task on one JSONL file.

    The same data scored by lm-eval: the agreement tests and the benchmark run it next to the built-in harness.
    """
    config: dict[str, Any] = {
        "task": task or spec.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "doc_to_text": "prompt",
        "num_fewshot": 0,
    }
    if spec.type == "choice":
        return config | {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "answer",
                         "target_delimiter": "",
                         "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    if spec.type != "generate":
        raise ValueError(f"no lm-eval equivalent for a {spec.type} task")
    rule = spec.extract if isinstance(spec.extract, str) else None
    pattern = {"first_line": r"[^\n]*\S[^\n]*", "last_number": r"-?\d[\d,]*(?:\.\d+)?"}.get(rule or "",
                                                                                       getattr(spec.extract, "regex", None))
    steps = [{"function": "remove_whitespace"}] if rule == "strip" else [
        {"function": "regex", "regex_pattern": pattern, "group_select": -1 if rule == "last_number" else 0,
         "fallback": "\u0000no match"}]
    return config | {
        "output_type": "generate_until",
        "doc_to_target": "{{target | trim}}",
        "generation_kwargs": {"until": list(spec.stop), "max_gen_toks": spec.max_new_tokens, "do_sample": False},
        "filter_list": [{"name": "none", "filter": steps + [{"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
