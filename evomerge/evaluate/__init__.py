"""Scoring a resident model on benchmark tasks.

```python
from evomerge.evaluate import load_tasks, Evaluator

suite = load_tasks("tasks.yaml", seed=0)               # validated, rows read; no model needed
with Evaluator(suite, model, tokenizer, seed=0) as evaluator:
    result = evaluator.evaluate("search", report=trial.report, objective={"inc": 1.0})
print(result.format_table())
```

Modules: `tasks` (the task file) and `rows` (reading rows); `codec` (tokens,
as lm-eval makes them); `forward` (calling the model), `score` (choice and
perplexity), `generate` (greedy decoding and its teacher-forced fast path);
`harness` (the Evaluator); `result` (EvalResult); `lm_eval_backend`.
torch, transformers, lm_eval and datasets load on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_LAZY = {
    "load_tasks": ("evomerge.evaluate.tasks", "load_tasks"),
    "TaskSuite": ("evomerge.evaluate.tasks", "TaskSuite"),
    "Evaluator": ("evomerge.evaluate.harness", "Evaluator"),
    "evaluate": ("evomerge.evaluate.harness", "evaluate"),
    "EvalResult": ("evomerge.evaluate.result", "EvalResult"),
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'evomerge.evaluate' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """`evomerge.evaluate(model, tasks=...)` keeps working once this package is imported.

    Importing ``evomerge.evaluate`` binds the package, not the function, to that name on
    ``evomerge``; calling the package calls the function.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
