"""The search config: one frozen pydantic tree, validated before any weights load."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError, suggest
from .yamlio import load_yaml

SAMPLERS = ("auto", "tpe", "cmaes", "gp", "random", "nsga2", "qmc", "tpe+cmaes", "adamerging")
PRUNERS = ("none", "median", "wilcoxon", "successive_halving")
FILTER_KINDS = ("attn", "mlp", "norm")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GradientOptions(_Frozen):
    """`search.sampler: adamerging`: task-arithmetic weights learned by gradient descent (gradient.py)."""

    lr: float = Field(0.05, gt=0)                  # Adam's step size, in units of a weight
    steps_per_trial: int = Field(4, ge=1)          # gradient steps between two scored trials
    batch: int = Field(128, ge=1)                  # answers per step (all of them, where there are fewer)
    loss: Literal["tokens", "entropy"] = "tokens"  # the answers' token NLL, or the entropy where each answer begins


class StackOptions(_Frozen):
    """`search.space: dfs | ps+dfs`: the data-flow space, layer stacking (space.py, stack.py)."""

    repeats: int = Field(2, ge=1)                 # r: the candidate blocks are r passes over every model's blocks
    max_layers: int | None = Field(None, ge=1)    # at most this many blocks in a stack (default: the base's, twice)
    scale: bool = True                            # search a scale per candidate block (else every scale is 1)


class EvaluationOptions(_Frozen):
    """`search.evaluation`: cheap evaluation, each candidate scored on a few search rows (cheap.py)."""

    rows: float = Field(1.0, gt=0)      # a fraction (<= 1) or a count (> 1) of each task's search rows; 1 = all
    estimator: Literal["mean", "anchors", "irt"] = "mean"   # how the split's score is estimated (the best measured)
    finalists: int = Field(5, ge=1)     # the best by estimate, re-scored on every search row before export

    @field_validator("rows")
    @classmethod
    def _whole_count(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"a count of rows is a whole number (or give a fraction <= 1), got {value}")
        return value

    @property
    def cheap(self) -> bool:
        return self.rows != 1


class SearchSection(_Frozen):
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "ties", "dare_ties", "della"])
    layer_groups: int = Field(1, ge=1)
    filters: list[Literal["attn", "mlp", "norm"]] = Field(default_factory=list)
    sampler: str = "auto"            # a portfolio of the optimizers below (auto.py)
    n_trials: int = Field(200, ge=1)
    seed: int = Field(0, ge=0)
    pruner: str = "none"
    storage: str | None = None
    baselines: bool = True
    refine_after: float = Field(0.4, gt=0, lt=1)   # tpe+cmaes: fraction of trials before CMA-ES takes over
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)   # override search ranges by param name
    gradient: GradientOptions = Field(default_factory=GradientOptions)
    space: Literal["ps", "dfs", "ps+dfs"] = "ps"   # parameter space, layer stacking, or both in one recipe
    dfs: StackOptions = Field(default_factory=StackOptions)
    start: list[str] = Field(default_factory=list)   # the user's recipes, scored first among the baselines
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions)

    @field_validator("methods", "start", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class SearchConfig(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str
    sources: list[str] = Field(min_length=1)
    search: SearchSection = Field(default_factory=SearchSection)
    tasks: str
    objective: dict[str, float] | list[dict[str, float]]
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    vocab: Literal["error", "base", "union"] = "error"   # differing vocabularies: refused | the base's | merged
    limit: int | None = Field(None, ge=1)      # examples per task and split, subsampled with the seed
    memory_budget: int | str | None = None     # e.g. 2GB or auto: the process's peak; stream tensors when sources don't fit
    trust_remote_code: bool = False            # run a model's own Python code (only for sources you trust)
    threads: int | None = Field(None, ge=1)    # CPU threads for torch (default: torch's); 1 suits tiny models
    out: str | None = None
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        from .methods import REGISTRY

        s = self.search
        if not s.methods:
            raise ValueError("search.methods: give at least one merge method")
        for i, method in enumerate(s.methods):
            if method not in REGISTRY:
                hint = suggest(method, REGISTRY.names()) or f"known: {', '.join(REGISTRY.names())}"
                raise ValueError(f"search.methods[{i}]: unknown merge method '{method}' ({hint})")
            spec = REGISTRY.get(method)
            takes = spec.takes(len(self.sources))
            if takes is not None:
                raise ValueError(f"search.methods[{i}]: {method} cannot merge {len(self.sources)} source(s) "
                                 f"(it takes {takes} besides the base)")
        if s.sampler not in SAMPLERS:
            raise ValueError(f"search.sampler: unknown sampler '{s.sampler}' "
                             f"({suggest(s.sampler, SAMPLERS) or 'one of ' + ', '.join(SAMPLERS)})")
        if s.sampler == "cmaes" and len(s.methods) > 1:
            raise ValueError("search.sampler: cmaes searches one method only; list one method, or use tpe+cmaes")
        if s.sampler == "adamerging" and "task_arithmetic" not in s.methods:
            raise ValueError("search.sampler: adamerging learns task_arithmetic weights; add task_arithmetic to "
                             "search.methods")
        if s.sampler == "adamerging" and s.space != "ps":
            raise ValueError(f"search.space: adamerging learns task_arithmetic weights, not a stack ({s.space}); "
                             "use space: ps, or another sampler")
        if s.pruner not in PRUNERS:
            raise ValueError(f"search.pruner: unknown pruner '{s.pruner}' "
                             f"({suggest(s.pruner, PRUNERS) or 'one of ' + ', '.join(PRUNERS)})")
        _check_ranges(s)
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device: unknown device '{self.device}' (cpu, cuda, cuda:N, mps or auto)")
        objectives = self.objectives
        if not objectives or any(not o for o in objectives):
            raise ValueError("objective: name at least one task with a weight")
        for i, objective in enumerate(objectives):
            where = "objective" if len(objectives) == 1 else f"objective[{i}]"
            if any(w < 0 for w in objective.values()) or not any(w > 0 for w in objective.values()):
                raise ValueError(f"{where}: weights must be >= 0, at least one of them > 0")
        if len(objectives) > 1 and s.sampler not in ("auto", "nsga2", "random", "tpe", "gp"):
            raise ValueError("search.sampler: several objectives need auto, nsga2, tpe, gp or random")
        if len(self.sources) != len(set(self.sources)):
            raise ValueError("sources: a source is listed twice")
        return self

    @property
    def objectives(self) -> list[dict[str, float]]:
        return self.objective if isinstance(self.objective, list) else [self.objective]

    @property
    def objective_tasks(self) -> list[str]:
        """The tasks the objectives weight, in order, each once."""
        return list(dict.fromkeys(t for objective in self.objectives for t in objective))

    @property
    def needs_base(self) -> bool:
        """Whether a searched method takes task vectors from the base (then no source may be the base)."""
        from .methods import REGISTRY

        return any(REGISTRY.get(m).needs_base for m in self.search.methods)

    @property
    def relative_to(self) -> Path | None:
        return self.path.parent if self.path is not None else None

    def run_dir(self, override: str | None = None) -> Path:
        if override:
            return Path(override)
        if self.out:
            out = Path(self.out)
            return out if out.is_absolute() else Path.cwd() / out
        return Path.cwd() / "results" / self.name

    def storage_url(self, run_dir: Path, override: str | None = None) -> str:
        return override or self.search.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def _check_ranges(search: SearchSection) -> None:
    """search.ranges: each name a parameter of a searched method, each range [low, high] inside its bounds."""
    from .methods import REGISTRY

    params = {p.name: p for m in search.methods if m in REGISTRY for p in REGISTRY.get(m).params if p.numeric}
    for name, (low, high) in search.ranges.items():
        if name not in params:
            hint = suggest(name, list(params)) or f"parameters of {', '.join(search.methods)}: {', '.join(params)}"
            raise ValueError(f"search.ranges.{name}: no searched method has a parameter '{name}' ({hint})")
        if low > high:
            raise ValueError(f"search.ranges.{name}: range [{low:g}, {high:g}] is empty")
        for value in (low, high):
            try:
                params[name].check(value)
            except InputError as err:
                raise ValueError(f"search.ranges.{name}: {err.problem}") from None


def load_config(path: str | Path, **overrides: object) -> SearchConfig:
    """Read, validate and cross-check a search config (tasks and model headers; no weights)."""
    path = Path(path)
    data = load_yaml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = SearchConfig.model_validate({**data, "path": path})
    except ValidationError as err:
        raise _input_error(err, path) from None
    check_config(config)
    return config


def check_config(config: SearchConfig) -> None:
    """Checks that need other files: the task file, and the models' headers."""
    from .evaluate import load_tasks
    from .sources import open_sources

    file = str(config.path) if config.path else None
    tasks_path = _resolve(config.tasks, config, field="tasks")
    suite = load_tasks(tasks_path, seed=config.search.seed)
    for i, objective in enumerate(config.objectives):
        for task in objective:
            if task not in suite.names:
                where = "objective" if len(config.objectives) == 1 else f"objective[{i}]"
                raise InputError(f"unknown task '{task}'", file=file, field=f"{where}.{task}",
                                 fix=suggest(task, suite.names) or f"tasks in {config.tasks}: {', '.join(suite.names)}")
    sources = open_sources(config.base, config.sources, relative_to=config.relative_to, vocab=config.vocab, file=file,
                           needs_base=config.needs_base)
    sources.layout.check_groups(config.search.layer_groups, file=file, field="search.layer_groups")
    sources.anchor.require_tokenizer(file=file)
    suite.require_chat_template(sources.anchor.has_chat_template())
    if config.search.start:
        from .start import load_starts

        load_starts(config)


def tasks_path(config: SearchConfig) -> Path:
    return _resolve(config.tasks, config, field="tasks")


def _resolve(text: str, config: SearchConfig, *, field: str) -> Path:
    from .paths import resolve_path

    found = resolve_path(text, relative_to=config.relative_to)
    if found is None:
        raise InputError(f"'{text}' not found", file=str(config.path) if config.path else None, field=field,
                         fix="check the path (relative to the config file)")
    return found


def _input_error(err: ValidationError, path: Path) -> InputError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return InputError(f"unknown key '{first['loc'][-1]}'", file=path, field=loc or None,
                          fix="remove it or check its spelling")
    if kind == "missing":
        return InputError("missing", file=path, field=loc)
    message = first["msg"].removeprefix("Value error, ")
    return InputError(message, file=path, field=loc or None)
