"""The Evaluator: one resident model, a task suite, scores on demand.

The merge kernel overwrites the model's weights in place between calls, so the
Evaluator keeps everything that depends only on the text -- tokens, padded
batches, gather indices, the report order -- and nothing that depends on the
weights. A call walks a fixed, seeded, shuffled order of all examples of all
tasks in chunks; each chunk is scored task by task in length-sorted batches,
then its examples are reported (``report(step, value)``) in that order, so a
pruner sees a steady mix of tasks and the same example at the same step in
every trial.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import InputError, suggest
from .codec import Codec
from .forward import Runner
from .generate import GenExample, draft_batch, generate
from .result import EvalResult
from .score import (ChoiceExample, build_choice_batch, build_text_batch, choice_loglikelihoods, choice_metrics,
                    text_nll, text_windows)
from .splits import SPLITS, check_split, subsample
from .tasks import TaskSuite

DEFAULT_BATCH_SIZE = 64  # rows per forward pass
MAX_BATCH_TOKENS = 64 * 512  # fewer rows when they are long (a padded batch's tokens, roughly)


@dataclass
class _Chunk:
    order: list[tuple[str, int]]  # (task, example index) in report order
    work: dict[str, list[Any]]  # task -> batches (prebuilt tensors, or example-index lists)


class Evaluator:
    """Scores one resident model on a task suite; usable as a context manager."""

    def __init__(self, suite: TaskSuite, model: Any, tokenizer: Any, *, seed: int = 0, limit: int | None = None,
                 batch_size: int | None = None, shared_prompt: bool | None = None) -> None:
        self.suite, self.model, self.tokenizer = suite, model, tokenizer
        self.seed, self.limit = seed, limit
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.codec = Codec(tokenizer, model)
        suite.require_chat_template(self.codec.has_chat_template)
        self.runner = Runner(model)
        self.stats: Counter[str] = Counter()  # how generate examples were settled (fast path coverage)
        self._examples: dict[tuple[str, str], list[Any]] = {}
        # perplexity: mean scored tokens per text of each (task, split); each text's value is its log-likelihood
        # over this, so the per-example values average to the pooled per-token value
        self._mean_tokens: dict[tuple[str, str], float] = {}
        self._plans: dict[tuple[str, tuple[str, ...]], list[_Chunk]] = {}
        self._lm = None
        self._lm_tasks: dict[str, Any] = {}
        self._lower: frozenset[str] | None = None
        for spec in suite.specs:
            if spec.type != "lm_eval":
                for split in SPLITS:
                    rows = subsample(list(suite.rows(spec.name, split)), limit, seed=seed, key=f"{spec.name}/{split}")
                    examples = self._examples[(spec.name, split)] = self._encode(spec, rows)
                    if spec.type == "perplexity":
                        tokens = sum(len(scored) for ex in examples for _, scored in ex)
                        self._mean_tokens[(spec.name, split)] = tokens / len(examples) if tokens else 1.0
        self.shared_prompt = self._check_shared_prompt() if shared_prompt is None else shared_prompt

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._plans.clear()
        self._lm_tasks.clear()
        self._lm = None

    # ---------------------------------------------------------------- public

    def evaluate(self, split: str = "search", *, report: Callable[[int, float], None] | None = None,
                 objective: Mapping[str, float] | None = None,
                 rows: Mapping[str, Sequence[int]] | None = None) -> EvalResult:
        """Score every task of the suite on one split.

        `report(step, value)` gets each example's primary metric as examples finish, in the seeded
        order; with `objective`, only examples of the tasks it weights are reported, each times its
        weight. An exception `report` raises (optuna.TrialPruned) propagates. `rows` (task -> sorted example
        indices) scores only those examples of a task (cheap evaluation): its per-example values are theirs,
        in that order, and its metrics their means.
        """
        check_split(split)
        weights = self._weights(objective)
        names = tuple(self.suite.names)
        minimized = self.lower_is_better()
        start = time.perf_counter()
        values: dict[str, dict[str, list[float]]] = {}
        aggregates: dict[str, dict[str, float]] = {}  # lm_eval: the scores as lm-eval aggregates them
        outputs: dict[str, list[str | None]] = {}  # generate: each continuation (None: ruled out undecoded)
        subset = self._subset(rows)
        chosen = dict(subset)
        step = 0
        with torch.inference_mode():
            for chunk in self._plan(split, names, subset):
                for name, batches in chunk.work.items():
                    self._run(name, split, batches, values, outputs, aggregates, chosen.get(name))
                for name, index in chunk.order:
                    weight = 1.0 if weights is None else weights.get(name, 0.0)
                    if report is not None and weight > 0:
                        sign = -1.0 if name in minimized else 1.0
                        report(step, sign * weight * values[name][self.suite.primary_metric(name)][index])
                        step += 1
        for name, indices in subset:      # only the scored examples, in the order asked
            values[name] = {m: [v[i] for i in indices] for m, v in values[name].items()}
            if name in outputs:
                outputs[name] = [outputs[name][i] for i in indices]
            aggregates.pop(name, None)    # (lm-eval's over a subset would be no estimate of the whole split's)
        tasks = {}
        for name in names:
            metrics = {m: sum(v) / len(v) for m, v in values[name].items()}
            metrics.update(aggregates.get(name, {}))
            metrics["n"] = len(next(iter(values[name].values())))
            tasks[name] = metrics
        return EvalResult(split=split, tasks=tasks, primary_metrics={n: self.suite.primary_metric(n) for n in names},
                          seconds=time.perf_counter() - start, examples=values, outputs=outputs, minimized=minimized)

    def lower_is_better(self) -> frozenset[str]:
        """Tasks whose primary metric falls as the model improves (an lm-eval perplexity); found once."""
        if self._lower is None:
            self._lower = frozenset(n for n in self.suite.names if self.suite.spec(n).type == "lm_eval"
                                    and not self._lm_task(n).higher_is_better)
        return self._lower

    def reported(self, split: str = "search", objective: Mapping[str, float] | None = None,
                 rows: Mapping[str, Sequence[int]] | None = None) -> int:
        """How many examples `evaluate(split, report=..., objective=objective, rows=rows)` reports."""
        weights = self._weights(objective)
        return sum(1 for chunk in self._plan(split, tuple(self.suite.names), self._subset(rows))
                   for name, _ in chunk.order if (1.0 if weights is None else weights.get(name, 0.0)) > 0)

    def size(self, task: str, split: str = "search") -> int:
        """How many examples a task has on a split (after `limit`)."""
        if self.suite.spec(task).type == "lm_eval":
            return len(self._lm_task(task).documents(split, seed=self.seed, limit=self.limit))
        return len(self._examples[(task, split)])

    def answers(self, split: str = "search",
                objective: Mapping[str, float] | None = None) -> list[tuple[str, float, list[int], int]]:
        """(task, weight, tokens, n): every example of the weighted tasks as one token sequence whose last `n`
        tokens are its answer, for a loss on the answers (gradient.py): a choice task's right choice after
        its context, a generate task's target and EOS after its prompt, each window of a perplexity text.
        lm_eval tasks have no rows here (InputError)."""
        weights = self._weights(objective) or {name: 1.0 for name in self.suite.names}
        out = []
        for name, weight in weights.items():
            kind = self.suite.spec(name).type
            if weight <= 0:
                continue
            if kind == "lm_eval":
                raise InputError(f"task '{name}' is an lm_eval task, whose rows evomerge does not read",
                                 field="objective", fix="weight choice, generate or perplexity tasks")
            for example in self._examples[(name, split)]:
                if kind == "choice":
                    answer = example.continuations[example.answer]
                    context = (example.contexts or [example.context] * len(example.continuations))[example.answer]
                    out.append((name, weight, context + answer, len(answer)))
                elif kind == "generate":
                    out.append((name, weight, example.context + example.draft, len(example.draft)))
                else:
                    out += [(name, weight, inputs + scored[-1:], len(scored)) for inputs, scored in example]
        return out

    # ---------------------------------------------------------------- construction

    def _encode(self, spec: Any, rows: list[Any]) -> list[Any]:
        codec, limit = self.codec, self.codec.max_length
        if spec.type in ("choice", "generate"):
            prompts = [r.prompt for r in rows]
            if spec.chat_template:
                prompts = codec.chat(prompts, system=spec.system_prompt)
        if spec.type == "choice":
            pairs = codec.pairs([p for p, r in zip(prompts, rows) for _ in r.choices], [c for r in rows for c in r.choices])
            out, it = [], iter(pairs)
            for row in rows:
                encoded = [next(it) for _ in row.choices]
                contexts = None
                if any(len(ctx) + len(cont) > limit + 1 for ctx, cont in encoded):  # lm-eval keeps the last
                    if any(len(cont) > limit for _, cont in encoded):                # limit + 1 tokens
                        raise InputError(f"a choice is longer than the model's context ({limit} tokens)",
                                         file=self.suite.path, field=f"tasks.{spec.name}")
                    contexts = [ctx[len(ctx) + len(cont) - limit - 1:] if len(ctx) + len(cont) > limit + 1 else ctx
                                for ctx, cont in encoded]
                out.append(ChoiceExample(encoded[0][0], [c for _, c in encoded], row.answer,
                                         [len(c) for c in row.choices], contexts))
            return out
        if spec.type == "generate":
            room = limit - spec.max_new_tokens  # lm-eval: the prompt's last (context - max_gen_toks) tokens
            if room <= 0:
                raise InputError(f"max_new_tokens {spec.max_new_tokens} leaves no room for a prompt in the model's "
                                 f"context ({limit} tokens)", file=self.suite.path, field=f"tasks.{spec.name}")
            contexts = [ctx[-room:] for ctx in codec.prompts(prompts)]
            targets = codec.tails(prompts, [r.target for r in rows])
            eos = [codec.eos_id] if codec.eos_id is not None else []
            return [GenExample(p, r.target, ctx, (t + eos)[:limit - len(ctx)])  # drafts stay in the context
                    for p, r, ctx, t in zip(prompts, rows, contexts, targets)]
        return [text_windows(codec.text_tokens(r.text), limit) for r in rows]

    def _check_shared_prompt(self) -> bool:
        """Whether this model honours the shared-prompt layout: same log-likelihoods as one row per choice."""
        sample = next((ex[:4] for (name, split), ex in self._examples.items()
                       if split == "search" and self.suite.spec(name).type == "choice"), None)
        if not sample:
            return False
        try:
            with torch.inference_mode():
                packed = choice_loglikelihoods(self.runner, build_choice_batch(
                    sample, pad_id=self.codec.pad_id, shared_prompt=True, device=self.runner.device))
                plain = choice_loglikelihoods(self.runner, build_choice_batch(
                    sample, pad_id=self.codec.pad_id, shared_prompt=False, device=self.runner.device))
        except Exception:  # a model that rejects a 4-D mask or explicit positions
            return False
        finite = torch.isfinite(plain)
        tol = 1e-3 if self.runner.dtype in (torch.float32, torch.float64) else 5e-2
        return bool(torch.allclose(packed[finite], plain[finite], rtol=tol, atol=tol))

    def _subset(self, rows: Mapping[str, Sequence[int]] | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """`rows` as a hashable plan key; a task it does not name is scored on every example."""
        if not rows:
            return ()
        for name in rows:
            if name not in self.suite.names:
                raise InputError(f"rows names unknown task '{name}'", field="rows")
        return tuple((name, tuple(sorted(rows[name]))) for name in self.suite.names if name in rows)

    def _plan(self, split: str, names: tuple[str, ...], subset: tuple = ()) -> list[_Chunk]:
        key = (split, names, subset)
        if key not in self._plans:
            if subset and len(self._plans) > 8:     # an older subset's prebuilt batches: dropped
                for old in [k for k in self._plans if k[2]]:
                    del self._plans[old]
            chosen = dict(subset)
            order = []
            for name in names:
                indices = chosen.get(name, range(self.size(name, split)))
                order += [(name, i) for i in indices]
            random.Random(f"evomerge/order/{self.seed}/{split}").shuffle(order)
            size = self.batch_size * max(1, len(names))
            self._plans[key] = [self._chunk(split, order[i:i + size]) for i in range(0, len(order), size)]
        return self._plans[key]

    def _chunk(self, split: str, order: list[tuple[str, int]]) -> _Chunk:
        by_task: dict[str, list[int]] = {}
        for name, index in order:
            by_task.setdefault(name, []).append(index)
        work: dict[str, list[Any]] = {}
        for name, indices in by_task.items():
            kind = self.suite.spec(name).type
            if kind == "lm_eval":
                work[name] = [indices]
                continue
            examples = self._examples[(name, split)]
            length = {"choice": lambda e: len(e.context) + sum(map(len, e.continuations)),
                      "generate": lambda e: len(e.context) + len(e.draft),
                      "perplexity": lambda e: sum(len(i) for i, _ in e)}[kind]
            indices = sorted(indices, key=lambda i: -length(examples[i]))
            per_row = 1
            if kind == "choice" and not self.shared_prompt:
                per_row = max(len(examples[i].continuations) for i in indices)
            groups, start = [], 0
            while start < len(indices):  # at most batch_size rows, and a token budget for long rows
                longest = max(length(examples[indices[start]]), 1)
                take = max(1, min(self.batch_size, MAX_BATCH_TOKENS // longest) // per_row)
                groups.append(indices[start:start + take])
                start += take
            if kind == "choice":
                work[name] = [(g, build_choice_batch([examples[i] for i in g], pad_id=self.codec.pad_id,
                                                     shared_prompt=self.shared_prompt, device=self.runner.device))
                              for g in groups]
            elif kind == "perplexity":
                work[name] = [(g, build_text_batch([examples[i] for i in g], pad_id=self.codec.pad_id,
                                                   device=self.runner.device)) for g in groups]
            else:  # the first-round drafts: each target + EOS after its prompt
                work[name] = [(g, draft_batch([examples[i].context for i in g], [examples[i].draft for i in g],
                                              pad_id=self.codec.pad_id, device=self.runner.device)) for g in groups]
        return _Chunk(order, work)

    # ---------------------------------------------------------------- scoring

    def _run(self, name: str, split: str, batches: list[Any], values: dict, outputs: dict, aggregates: dict,
             indices: Sequence[int] | None = None) -> None:
        spec = self.suite.spec(name)
        if spec.type == "lm_eval":
            if name not in values:  # (the whole task runs in the first chunk that holds one of its documents)
                task = self._lm_task(name)
                documents = task.documents(split, seed=self.seed, limit=self.limit)
                if indices is None:
                    values[name], aggregates[name] = task.run(documents)
                else:               # a subset: its values at their indices, as the other task types keep them
                    found, _ = task.run([documents[i] for i in indices])
                    values[name] = {m: [0.0] * len(documents) for m in found}
                    for m, vals in found.items():
                        for i, v in zip(indices, vals):
                            values[name][m][i] = v
            return
        examples = self._examples[(name, split)]
        n = len(examples)
        for indices, batch in batches:
            if spec.type == "choice":
                found = choice_metrics(batch, choice_loglikelihoods(self.runner, batch))
            elif spec.type == "perplexity":
                nll, _ = text_nll(self.runner, batch)
                mean_tokens = self._mean_tokens[(name, split)]
                found = {"neg_log_ppl": [-a / mean_tokens for a in nll]}
            else:
                found, texts = generate(self.runner, self.codec, spec, [examples[i] for i in indices], batch,
                                        batch_size=self.batch_size, stats=self.stats)
                column = outputs.setdefault(name, [""] * n)
                for i, text in zip(indices, texts):
                    column[i] = text
            task_values = values.setdefault(name, {})
            for metric, vals in found.items():
                column = task_values.setdefault(metric, [0.0] * n)
                for i, v in zip(indices, vals):
                    column[i] = v

    def _lm_task(self, name: str) -> Any:
        if name not in self._lm_tasks:
            from .lm_eval_backend import LmEvalTask, make_lm

            if self._lm is None:
                self._lm = make_lm(self.model, self.tokenizer, batch_size=self.batch_size)
            self._lm_tasks[name] = LmEvalTask(self.suite.spec(name), self._lm, base_dir=self.suite.base_dir,
                                              file=self.suite.path)
        return self._lm_tasks[name]

    def _weights(self, objective: Mapping[str, float] | None) -> dict[str, float] | None:
        if objective is None:
            return None
        for name, weight in objective.items():
            if name not in self.suite.names:
                raise InputError(f"objective names unknown task '{name}'", field="objective",
                                 fix=suggest(name, self.suite.names) or f"tasks: {', '.join(self.suite.names)}")
            if weight < 0:
                raise InputError(f"objective weight of '{name}' is negative", field=f"objective.{name}")
        if not any(w > 0 for w in objective.values()):
            raise InputError("objective gives no task a positive weight", field="objective")
        return dict(objective)


def evaluate(model: Any, tasks: Any, *, tokenizer: Any = None, split: str = "heldout", seed: int = 0,
             limit: int | None = None) -> EvalResult:
    """Score a model on a task file (or a loaded TaskSuite): ``evomerge.evaluate(model, tasks="tasks.yaml")``."""
    from .tasks import load_tasks

    suite = tasks if isinstance(tasks, TaskSuite) else load_tasks(tasks, seed=seed)
    if tokenizer is None:
        tokenizer = _folder_tokenizer(model)
    with Evaluator(suite, model, tokenizer, seed=seed, limit=limit) as evaluator:
        return evaluator.evaluate(split)


def _folder_tokenizer(model: Any) -> Any:
    """The tokenizer of the folder the model was loaded from; refused where the model's vocabulary is no longer
    that folder's (a merge with `vocab: union` resized it), since its added tokens would be split."""
    from transformers import AutoConfig, AutoTokenizer

    folder = model.name_or_path
    size = getattr(model.config, "vocab_size", None)
    stored = getattr(AutoConfig.from_pretrained(folder), "vocab_size", None)
    if size is not None and stored is not None and size != stored:
        raise InputError(f"the model's vocabulary ({size} tokens) is not that of '{folder}' ({stored})",
                         field="tokenizer", fix="pass tokenizer=, e.g. evomerge.kernel.merger_for(recipe)"
                                                ".sources.tokenizer() for a vocab: union recipe")
    return AutoTokenizer.from_pretrained(folder)
