"""The search space, derived from the methods' declared parameters and nothing else.

Parameter names are stable and readable: ``method`` (the technique, when there is
a choice), ``ties.lambda`` (shared), ``ties.inc.density`` (per source, one group),
``ties.inc.density.g1`` (per layer group), ``ties.inc.density.io`` (the tensors
outside the blocks), ``ties.inc.weight.attn.g0`` (per module filter and group).
`decode(params)` turns a trial's parameters into a Recipe; the same parameters
always give the same recipe, so any stored trial can be rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .config import SearchConfig
from .errors import InputError
from .methods import REGISTRY, MethodSpec, ParamSpec
from .plan import MergePlan
from .recipe import MERGED, PASSTHROUGH, PASSTHROUGH_SPEC, SCALE_RANGE, Recipe, StackEntry
from .sources import IO_GROUP, Layout, ModelFolder

WARM_SPREAD = 0.1    # a warm trial's standard deviation around its centre, as a share of each parameter's range

# the data-flow space (search.space dfs / ps+dfs): per candidate block, whether the stack has it (>= 0.5) and its
# scale; a block is on by default where it belongs to the stack the parameter-space search alone would score
INCLUDE = ParamSpec("include", "shared", 0.0, low=0.0, high=1.0, search=(0.0, 1.0), step=0.01,
                    help="the block is in the stack where >= 0.5")
INCLUDE_ON = ParamSpec("include", "shared", 1.0, low=0.0, high=1.0, search=(0.0, 1.0), step=0.01,
                       help=INCLUDE.help)
SCALE = ParamSpec("scale", "shared", 1.0, low=SCALE_RANGE[0], high=SCALE_RANGE[1], search=(0.5, 1.5), step=0.01,
                  help="the block's residual-branch outputs times this")


class EmptyStack(ValueError):
    """A data-flow candidate with no block: it fails its trial."""


def method_spec(name: str) -> MethodSpec:
    return PASSTHROUGH_SPEC if name == PASSTHROUGH else REGISTRY.get(name)


@dataclass(frozen=True)
class Dimension:
    name: str
    method: str
    param: ParamSpec
    low: float
    high: float
    step: float | None
    source: str | None = None        # source spec, for per-source parameters
    kind: str | None = None          # module filter, or None for the unfiltered parameters
    group: int | str | None = None   # layer group index, IO_GROUP, or None for one value over all groups
    slot: int | None = None          # the data-flow space's candidate block (SearchSpace.slots) it is about

    def distribution(self):
        import optuna

        return optuna.distributions.FloatDistribution(self.low, self.high, step=self.step)

    def snap(self, value: float) -> float:
        """The grid point nearest `value`, inside the range."""
        value = min(self.high, max(self.low, float(value)))
        if self.step is not None:
            value = min(self.high, self.low + round((value - self.low) / self.step) * self.step)
        return self.clean(value)

    def clean(self, value: float) -> float:
        """Snap a sampled value to its grid, so a density lands exactly on the threshold table."""
        if self.step is None:
            return float(value)
        decimals = max(0, len(f"{self.step:g}".split(".")[-1])) if "." in f"{self.step:g}" else 0
        return round(float(value), decimals)


class SearchSpace:
    def __init__(self, config: SearchConfig, sources: list[ModelFolder], layout: Layout) -> None:
        self.config = config
        self.stacking = config.search.space          # ps | dfs | ps+dfs
        self.methods = [PASSTHROUGH] if self.stacking == "dfs" else list(config.search.methods)
        self.sources = sources
        self.layout = layout
        self.groups = config.search.layer_groups
        self.filters = list(config.search.filters)
        self.slots = self._slots()
        self.max_layers = config.search.dfs.max_layers or 2 * layout.num_layers
        stack = self._stack_dimensions()
        self.dims: dict[str, list[Dimension]] = {m: self._dimensions(method_spec(m)) + stack for m in self.methods}

    @property
    def candidates(self) -> int | None:
        """How many distinct candidates the space holds where that is finite (no method has a parameter to
        search: each method at its defaults is the only candidate), else None."""
        return None if any(self.dims[m] for m in self.methods) else len(self.methods)

    def fingerprint(self) -> str:
        """A digest of the dimensions (names, ranges, steps) and of the method choice."""
        import hashlib
        import json

        dims = [(d.name, d.low, d.high, d.step) for m in self.methods for d in self.dims[m]]
        return hashlib.sha256(json.dumps([self.methods, dims]).encode()).hexdigest()[:16]

    # -- construction --------------------------------------------------------------
    def _range(self, spec: MethodSpec, param: ParamSpec) -> tuple[float, float] | None:
        override = self.config.search.ranges.get(param.name)
        rng = tuple(override) if override is not None else spec.search_range(param)
        if rng is None:
            return None
        low, high = float(rng[0]), float(rng[1])
        if low > high:
            raise InputError(f"range [{low:g}, {high:g}] is empty", field=f"search.ranges.{param.name}")
        for value in (low, high):
            param.check(value, where=f"search.ranges.{param.name}")
        return low, high

    def _dimensions(self, spec: MethodSpec) -> list[Dimension]:
        dims: list[Dimension] = []
        for param in spec.shared_params:
            rng = self._range(spec, param)
            if rng is not None and param.numeric:
                dims.append(Dimension(f"{spec.name}.{param.name}", spec.name, param, *rng, param.step))
        groups: list[int | str | None] = [None] if self.groups == 1 else [*range(self.groups), IO_GROUP]
        for folder in self.sources:
            for param in spec.source_params:
                rng = self._range(spec, param)
                if rng is None:
                    continue
                for kind in [None, *self.filters]:
                    for group in groups:
                        if kind is not None and group == IO_GROUP:
                            continue   # filtered kinds (attn, mlp, norm inside blocks) have no io tensors
                        inside = None if group is None else group != IO_GROUP
                        if not _reaches(folder, self.layout, kind=kind, inside=inside, filtered=self.filters):
                            continue   # an adapter that reaches no tensor there: a knob that would turn nothing
                        name = ".".join(p for p in (spec.name, folder.short, param.name, kind,
                                                    _group_label(group)) if p)
                        dims.append(Dimension(name, spec.name, param, *rng, param.step, source=folder.spec,
                                              kind=kind, group=group))
        return dims

    def _slots(self) -> list[tuple[str, int, int]]:
        """The data-flow space's candidate blocks, (model, block, pass): `repeats` passes over every model's blocks
        in order (Akiba et al.), the parameter-space merge's first where there is one; none for space ps."""
        if self.stacking == "ps":
            return []
        models = ([MERGED] if self.stacking == "ps+dfs" else []) + [f.spec for f in self.sources]
        return [(m, b, r) for r in range(self.config.search.dfs.repeats) for m in models
                for b in range(self.layout.num_layers)]

    def _stack_dimensions(self) -> list[Dimension]:
        """An include and (with dfs.scale) a scale per candidate block. On by default: the first model's blocks of
        the first pass (the merge alone for ps+dfs, the first source alone for dfs)."""
        dims = []
        first = self.slots[0][0] if self.slots else None
        shorts = {f.spec: f.short for f in self.sources} | {MERGED: MERGED}
        for i, (model, block, rep) in enumerate(self.slots):
            label = f"dfs.r{rep}.{shorts[model]}.b{block}"
            include = INCLUDE_ON if (model == first and rep == 0) else INCLUDE
            dims.append(Dimension(label, "dfs", include, *include.search, include.step, slot=i))
            if self.config.search.dfs.scale:
                dims.append(Dimension(f"{label}.scale", "dfs", SCALE, *SCALE.search, SCALE.step, slot=i))
        return dims

    def stack_of(self, params: Mapping[str, Any], dims: list[Dimension]) -> tuple[StackEntry, ...]:
        """The blocks a data-flow candidate includes, in slot order, at most max_layers of them."""
        include: dict[int, float] = {}
        scale: dict[int, float] = {}
        for dim in dims:
            if dim.slot is None:
                continue
            value = dim.clean(params[dim.name]) if dim.name in params else float(dim.param.default)
            (include if dim.param.name == "include" else scale)[dim.slot] = value
        layers = [StackEntry(model, block, scale.get(i, 1.0)) for i, (model, block, _) in enumerate(self.slots)
                  if include.get(i, 0.0) >= 0.5]
        if not layers:
            raise EmptyStack("the candidate includes no block")
        return tuple(layers[:self.max_layers])

    # -- Optuna side ---------------------------------------------------------------
    def suggest(self, trial, *, method: str | None = None) -> str:
        """Sample a candidate in `trial` (define-by-run); returns the method it chose."""
        if method is None:
            method = trial.suggest_categorical("method", self.methods) if len(self.methods) > 1 else self.methods[0]
        for dim in self.dims[method]:
            trial.suggest_float(dim.name, dim.low, dim.high, step=dim.step)
        trial.set_user_attr("method", method)
        return method

    def distributions(self, method: str) -> dict[str, Any]:
        return {d.name: d.distribution() for d in self.dims[method]}

    def method_of(self, params: Mapping[str, Any], attrs: Mapping[str, Any] | None = None) -> str:
        if "method" in params:
            return str(params["method"])
        if attrs and "method" in attrs:
            return str(attrs["method"])
        return self.methods[0]

    # -- recipes -------------------------------------------------------------------
    def decode(self, params: Mapping[str, Any], *, method: str | None = None) -> Recipe:
        """The recipe a trial's parameters stand for."""
        method = method or self.method_of(params)
        spec = method_spec(method)
        shared: dict[str, Any] = {}
        per_group: dict[tuple[str | None, str, str], dict[int | str | None, float]] = {}
        defaults: dict[str, float] = {}
        for dim in self.dims[method]:
            if dim.slot is not None:      # the data-flow part: stack_of
                continue
            value = dim.clean(params[dim.name]) if dim.name in params else float(dim.param.default)
            if dim.source is None:
                shared[dim.param.name] = value
            else:
                per_group.setdefault((dim.kind, dim.source, dim.param.name), {})[dim.group] = value
                defaults[dim.param.name] = float(dim.param.default)
        parameters: dict[str, dict[str, Any]] = {}
        filters: dict[str, dict[str, dict[str, Any]]] = {}
        for (kind, source, name), values in per_group.items():
            if self.groups > 1 and not any(g in values for g in range(self.groups)):   # an adapter's io weight alone
                filters.setdefault(IO_GROUP, {}).setdefault(source, {})[name] = values[IO_GROUP]
                continue
            blocks = values[None] if self.groups == 1 else tuple(values.get(g, defaults[name])    # (a group the
                                                                 for g in range(self.groups))     # adapter skips)
            target = parameters if kind is None else filters.setdefault(kind, {})
            target.setdefault(source, {})[name] = blocks
            if IO_GROUP in values:
                filters.setdefault(IO_GROUP, {}).setdefault(source, {})[name] = values[IO_GROUP]
        for param in spec.shared_params:
            if not param.numeric:
                shared.setdefault(param.name, param.default)
        return Recipe(method=method, sources=tuple(f.spec for f in self.sources), base=self.config.base,
                      seed=self.config.search.seed, dtype=self.config.dtype, layer_groups=self.groups,
                      shared=shared, parameters=parameters, filters=filters, vocab=self.config.vocab,
                      layers=self.stack_of(params, self.dims[method]) if self.slots else (), path=self.config.path)

    def encode(self, recipe: Recipe) -> dict[str, Any]:
        """The parameters nearest a recipe of one of the space's methods (each value snapped into its range
        and onto its grid), for the samplers to model: a user's own recipe among the baselines (start.py).
        Each dimension takes the recipe's value for one tensor it covers: of its group's first block, of its
        module kind (the MLP's for a dimension without one)."""
        params: dict[str, Any] = {"method": recipe.method} if len(self.methods) > 1 else {}
        plan = MergePlan.of(recipe, self.layout)
        for dim in self.dims[recipe.method]:
            name = self._representative(dim)
            value = (plan.slot(name).shared[dim.param.name] if dim.source is None
                     else plan.value(name, dim.source, dim.param.name))
            params[dim.name] = dim.snap(value)
        return params

    def _representative(self, dim: Dimension) -> str:
        """A tensor a dimension covers: of its group's first block (outside the blocks for IO_GROUP), of its
        module kind where it has one, else the MLP's where there is one."""
        layers = self.layout.num_layers
        if dim.group == IO_GROUP:
            inside = [n for n, t in self.layout.tensors.items() if t.layer is None]
        else:
            first = -(-(dim.group or 0) * layers // self.groups)     # the first block of search group g
            inside = [n for n, t in self.layout.tensors.items() if t.layer == first]
        inside = inside or list(self.layout.tensors)
        kind = dim.kind or "mlp"
        return next((n for n in inside if self.layout.tensors[n].kind == kind), inside[0])

    def defaults(self, method: str) -> dict[str, Any]:
        """Parameters of `method` at its declared defaults (an untuned merge)."""
        params = {d.name: float(d.param.default) for d in self.dims[method]}
        if len(self.methods) > 1:
            params["method"] = method
        return params

    def sweep(self, method: str, points: int) -> list[tuple[str, dict[str, Any]]]:
        """(label, params): what a user tunes by hand, one knob at a time at the method's defaults: a global scale
        (one weight for every source and layer group; lambda where the method normalizes the weights, which
        makes a common weight a no-op), a density for every source where the method sparsifies, slerp's t.
        `points` values in all, at the centres of equal cells of each knob's search range (which miss the
        declared defaults of weight and density); a value equal to the default is left out."""
        normalized = any(p.name == "normalize" and p.default is True for p in method_spec(method).params)
        scale = "lambda" if normalized else "weight"
        knobs = [name for name in (scale, "density", "t") if any(d.param.name == name for d in self.dims[method])]
        if not knobs or points < 1:
            return []
        out = []
        defaults = self.defaults(method)
        for i, knob in enumerate(knobs):
            dims = [d for d in self.dims[method] if d.param.name == knob]
            n = points // len(knobs) + (1 if i < points % len(knobs) else 0)
            low, high = max(d.low for d in dims), min(d.high for d in dims)
            for j in range(1, n + 1):
                value = dims[0].clean(low + (high - low) * (j - 0.5) / n)
                if value == float(dims[0].param.default):
                    continue       # the untuned default is a baseline of its own
                params = dict(defaults) | {d.name: value for d in dims}
                out.append((f"sweep:{method} {knob}={value:g}", params))
        return out

    def source_alone(self, index: int) -> dict[str, Any] | None:
        """Parameters that reproduce source `index` unchanged, in the first method able to; else None. In the
        data-flow space alone: its blocks of the first pass, in order."""
        if self.stacking == "dfs":
            spec = self.sources[index].spec
            return {d.name: (1.0 if d.param.name == "scale" or self.slots[d.slot][0::2] == (spec, 0) else 0.0)
                    for d in self.dims[PASSTHROUGH]}
        for method in self.methods:
            spec = REGISTRY.get(method)
            if "weight" not in {p.name for p in spec.params} or "epsilon" in {p.name for p in spec.source_params}:
                continue        # no weights to make one-hot, or della's, whose density cannot keep every entry
            params: dict[str, Any] = {"method": method} if len(self.methods) > 1 else {}
            ok = True
            for dim in self.dims[method]:
                if dim.param.name == "weight":
                    value = 1.0 if dim.source == self.sources[index].spec else 0.0
                elif dim.param.name == "density":
                    value = 1.0
                elif dim.param.name == "lambda":
                    value = 1.0
                else:
                    value = float(dim.param.default)
                ok &= dim.low <= value <= dim.high
                params[dim.name] = value
            if ok:
                return params
        return None

    def around(self, params: Mapping[str, Any], attrs: Mapping[str, Any] | None, *, spread: float,
               rng) -> dict[str, Any]:
        """Parameters near a trial's, in its technique: each moved by a normal step of `spread` of its range,
        kept in the range and on its grid (a warm start, samplers.WarmStart)."""
        method = self.method_of(params, attrs)
        out: dict[str, Any] = {"method": method} if len(self.methods) > 1 else {}
        for dim in self.dims[method]:
            centre = float(params.get(dim.name, dim.param.default))
            out[dim.name] = dim.snap(centre + rng.normal() * spread * (dim.high - dim.low))
        return out


def _reaches(folder: ModelFolder, layout: Layout, *, kind: str | None, inside: bool | None,
             filtered: list[str]) -> bool:
    """Whether the source's task vector reaches a tensor that the weights of module kind `kind` scale (None: the
    unfiltered weights, which scale every kind not in `filtered`), inside the blocks (`inside` True), outside
    them (False) or anywhere (None): a full model's does everywhere, a LoRA adapter's only on its targets."""
    if not folder.is_adapter:
        return True
    for name in folder.factors:
        info = layout.tensors[name]
        if (info.kind == kind if kind is not None else info.kind not in filtered) \
                and (inside is None or (info.layer is not None) == inside):
            return True
    return False


def _group_label(group: int | str | None) -> str | None:
    if group is None:
        return None
    return IO_GROUP if group == IO_GROUP else f"g{group}"
