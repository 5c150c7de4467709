"""Parameter specs, method specs and the one registry they live in.

Each merge technique declares its parameters (name, range, scope, default,
search range); the recipe validator and the search space are derived from these
declarations and from nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from ..errors import InputError, suggest

Scope = Literal["shared", "source"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method.

    `scope` "source" parameters take one value per source and may vary per layer
    group and module filter; "shared" parameters are one value per recipe.
    `low`/`high` bound valid values (`low_open` excludes `low`); `search` is the
    range a search samples from (None: not searched), on a grid of `step`.
    `choices` makes it a categorical option.
    """

    name: str
    scope: Scope
    default: float | bool | str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    search: tuple[float, float] | None = None
    step: float | None = None
    choices: tuple[str | bool, ...] | None = None
    integer: bool = False      # a count (karcher's max_iter): whole numbers only
    help: str = ""

    @property
    def numeric(self) -> bool:
        return self.choices is None

    def check(self, value: object, *, file: str | None = None, where: str | None = None) -> float | bool | str:
        """The value, validated; an InputError naming `where` otherwise."""
        if self.choices is not None:
            if value not in self.choices:
                raise InputError(f"must be one of {list(self.choices)}, got {value!r}", file=file, field=where)
            return value  # type: ignore[return-value]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"must be a number, got {value!r}", file=file, field=where)
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise InputError("must be finite", file=file, field=where)
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            left = "(" if self.low_open else "["
            raise InputError(f"{value} is outside {left}{_fmt(self.low)}, {_fmt(self.high)}]", file=file, field=where)
        if self.integer:
            if not value.is_integer():
                raise InputError(f"must be a whole number, got {value:g}", file=file, field=where)
            return int(value)
        return value


def _fmt(x: float | None) -> str:
    return "-inf" if x is None else f"{x:g}"


# Parameters that several methods share: declared once.
WEIGHT = ParamSpec("weight", "source", 1.0, low=-10.0, high=10.0, search=(0.0, 1.5), step=0.01,
                   help="scale of this source's contribution; negative subtracts a skill")
DENSITY = ParamSpec("density", "source", 0.5, low=0.0, high=1.0, low_open=True, search=(0.1, 1.0), step=0.01,
                    help="fraction of the task vector kept, in (0, 1]")
LAMBDA = ParamSpec("lambda", "shared", 1.0, low=-10.0, high=10.0, search=(0.5, 1.5), step=0.01,
                   help="scale of the merged task vector")
GAMMA = ParamSpec("gamma", "source", 0.01, low=0.0, high=0.5, search=(0.0, 0.1), step=0.001,
                  help="fraction of largest-magnitude entries dropped as outliers")
EPSILON = ParamSpec("epsilon", "source", 0.15, low=0.0, high=0.5, low_open=True, search=(0.01, 0.2), step=0.01,
                    help="spread of DELLA's keep probabilities around the density")
SLERP_T = ParamSpec("t", "shared", 0.5, low=0.0, high=1.0, search=(0.0, 1.0), step=0.01,
                    help="interpolation from the base (0) to the source (1)")
RESCALE = ParamSpec("rescale", "shared", "inverse", choices=("inverse", "l1", "none"),
                    help="how kept entries are rescaled: 1/p (paper), l1 norm (mergekit) or not")


def normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", "shared", default, choices=(True, False),
                     help="divide by the sum of the (agreeing) weights")


@dataclass(frozen=True)
class MethodSpec:
    """A merge technique: its parameters and what it needs from the kernel."""

    name: str
    params: tuple[ParamSpec, ...]
    apply: Callable  # (ctx: TensorContext, params: ResolvedParams) -> Tensor
    needs_base: bool = True
    min_sources: int = 1
    max_sources: int | None = None
    stochastic: bool = False
    magnitude_ranks: bool = False   # needs per-tensor magnitude thresholds (ties / breadcrumbs trims)
    row_ranks: bool = False         # needs per-row magnitude ranks (della)
    whole_tensor: bool = False      # its steps span the whole tensor (norms, a top-k, quantiles): never chunked
    reads_sources: bool = False     # it reads the sources x_i themselves, not only task vectors
    mergekit: str | None = None     # mergekit's name where the result is identical
    fused: Callable | None = None   # (ctx, params) -> fused.Plan, or None: this candidate runs `apply`
    summary: str = ""
    search_ranges: tuple[tuple[str, tuple[float, float]], ...] = ()   # per-method narrowing of a param's search

    def takes(self, count: int) -> str | None:
        """None where the method merges `count` sources, else how many it takes ("exactly 2")."""
        low, high = self.min_sources, self.max_sources
        if low <= count and (high is None or count <= high):
            return None
        if low == high:
            return f"exactly {low}"
        if high is None:
            return f"at least {low}"
        return f"at most {high}" if low <= 1 else f"{low} to {high}"

    def search_range(self, param: ParamSpec) -> tuple[float, float] | None:
        """Where a search samples `param` for this method (None: not searched)."""
        return dict(self.search_ranges).get(param.name, param.search)

    @property
    def source_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "source")

    @property
    def shared_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope == "shared")

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass
class Registry:
    """Name -> MethodSpec; refuses duplicates, suggests close matches on a typo."""

    methods: dict[str, MethodSpec] = field(default_factory=dict)

    def register(self, spec: MethodSpec) -> MethodSpec:
        if spec.name in self.methods:
            raise ValueError(f"merge method '{spec.name}' registered twice")
        self.methods[spec.name] = spec
        return spec

    def get(self, name: str, *, file: str | None = None, field: str | None = "method") -> MethodSpec:
        try:
            return self.methods[name]
        except KeyError:
            hint = suggest(str(name), self.methods) or f"known: {', '.join(self.methods)}"
            raise InputError(f"unknown merge method '{name}'", file=file, field=field, fix=hint) from None

    def __iter__(self):
        return iter(self.methods.values())

    def __contains__(self, name: object) -> bool:
        return name in self.methods

    def names(self) -> list[str]:
        return list(self.methods)


REGISTRY = Registry()
