"""Does a variant have headroom: a merge that beats every source alone? Measured with the search's own parts.

Each source alone is loaded from its folder and scored on the objective's tasks; then task_arithmetic merges
are materialized in place on one resident model (`ResidentMerger`) and scored on the search split: a grid of
one weight per source, a grid of one weight per layer group (every source alike), then coordinate sweeps
from the best point so far (one weight of one source in one group changed at a time). The layer groups are
the problem's, so every point is one its search can reach. The best point, picked on the search split, is
scored on held-out, as a search would pick and report it; the headroom is that held-out objective minus the
best source's alone. One weight per source is not enough where the experts share an instruction stage: its
change, in every task vector, wants 1/k in its blocks while the skills want about 1 in theirs.
"""

from __future__ import annotations

import dataclasses
import itertools
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..evaluate import Evaluator, load_tasks
from ..evaluate.tasks import TaskSuite
from ..kernel import ResidentMerger
from ..recipe import Recipe
from ..sources import open_sources
from .version import TASK_FILE

METHOD = "task_arithmetic"
# The grid, in three stages: one weight per source (fewer values as sources are added, so that the stage stays
# under 100 points); one weight per layer group shared by every source (with 1/k among the values, the weight
# at which k copies of a change every expert shares add up to one); then coordinate sweeps, one weight of one
# source in one group changed at a time from the best point so far, until a sweep changes nothing.
PER_SOURCE: dict[int, tuple[float, ...]] = {2: (0.5, 0.75, 1.0, 1.25), 3: (0.5, 0.75, 1.0, 1.25), 4: (0.5, 0.75, 1.0)}
PER_GROUP = (0.25, 0.5, 0.75, 1.0)
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
MAX_SWEEPS = 2

Weights = dict[str, tuple[float, ...]]   # per source, one task_arithmetic weight per layer group


def per_source_values(sources: int) -> tuple[float, ...]:
    return PER_SOURCE.get(sources, (0.5, 1.0))


def per_group_values(sources: int, groups: int) -> tuple[float, ...]:
    """PER_GROUP and 1/k; for three groups or more, fewer values (0.25, 1/k, 0.5, 1)."""
    values = PER_GROUP if groups <= 2 else (0.25, 0.5, 1.0)
    return tuple(sorted({*values, round(1 / sources, 4)}))


def _grid(sources: list[str], groups: int) -> Iterator[Weights]:
    """The first two stages' points: one weight per source, then one per layer group."""
    for point in itertools.product(per_source_values(len(sources)), repeat=len(sources)):
        yield {s: (w,) * groups for s, w in zip(sources, point)}
    for point in itertools.product(per_group_values(len(sources), groups), repeat=groups):
        yield {s: tuple(point) for s in sources}


def grid_recipe(sources: list[str], weights: Mapping[str, tuple[float, ...] | list[float]]) -> Recipe:
    """The task_arithmetic merge (lambda 1) of a grid point, over the folder's base: one weight per source and
    layer group (as many groups as each source has weights)."""
    groups = len(next(iter(weights.values())))
    return Recipe.from_dict({"evomerge_recipe": 1, "method": METHOD, "base": "base", "sources": sources, "seed": 0,
                             "layer_groups": groups,
                             "parameters": {s: {"weight": list(weights[s])} for s in sources}})


def objective_suite(folder: Path, objective: Mapping[str, float]) -> TaskSuite:
    """The folder's task file, cut down to the tasks the objective weights (the choice tasks are not scored)."""
    suite = load_tasks(folder / TASK_FILE)
    return dataclasses.replace(suite, specs=tuple(s for s in suite.specs if s.name in objective))


def score_folder(folder: Path, suite: TaskSuite, objective: Mapping[str, float], *, tokenizer: Any) -> dict[str, Any]:
    """A model folder alone: the objective on both splits and each task on held-out."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # one bar per tiny model is noise in the build's log
    try:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    with Evaluator(suite, model, tokenizer) as evaluator:
        return _scores(evaluator, objective)


def score_recipe(merger: ResidentMerger, evaluator: Evaluator, recipe: Recipe, objective: Mapping[str, float],
                 *, split: str) -> float:
    merger.materialize(recipe)
    return evaluator.evaluate(split).objective(objective)


def _scores(evaluator: Evaluator, objective: Mapping[str, float]) -> dict[str, Any]:
    search = evaluator.evaluate("search").objective(objective)
    heldout = evaluator.evaluate("heldout")
    return {"search": search, "heldout": heldout.objective(objective),
            "tasks": {task: heldout.primary(task) for task in objective}}


@contextmanager
def one_thread() -> Iterator[None]:
    """Score on one thread, as the problem's config says (`threads: 1`); the caller's count restored after.
    Denormals are not flushed (training flushes them): a search scores without, so the numbers match its."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure_headroom(folder: Path, sources: list[str], *, objective: Mapping[str, float], layer_groups: int,
                     target: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Sources alone, the grid's best (picked on search, reported on held-out) and the headroom between them."""
    from transformers import AutoTokenizer

    suite = objective_suite(folder, objective)
    tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    with one_thread():
        alone = {s: score_folder(folder / s, suite, objective, tokenizer=tokenizer) for s in sources}
        opened = open_sources("base", sources, relative_to=folder)
        with ResidentMerger(opened, device="cpu", methods=[METHOD]) as merger, \
                Evaluator(suite, merger.model, tokenizer) as evaluator:
            best, points = _search(lambda w: score_recipe(merger, evaluator, grid_recipe(sources, w), objective,
                                                          split="search"), sources, layer_groups)
            merger.materialize(grid_recipe(sources, best))
            found = _scores(evaluator, objective)
    best_source = max(sources, key=lambda s: alone[s]["heldout"])
    headroom = found["heldout"] - alone[best_source]["heldout"]
    log(f"headroom: best source alone {best_source} {alone[best_source]['heldout']:.3f}, grid best "
        f"{found['heldout']:.3f} on held-out ({points} points; "
        f"{', '.join(s + ' ' + '/'.join(f'{w:g}' for w in ws) for s, ws in best.items())})")
    return {
        "objective": dict(objective),
        "target": target,
        "sources_alone": alone,
        "best_source": best_source,
        "grid": {"method": METHOD, "layer_groups": layer_groups,
                 "per_source": list(per_source_values(len(sources))),
                 "per_group": list(per_group_values(len(sources), layer_groups)), "sweep": list(SWEEP),
                 "max_sweeps": MAX_SWEEPS, "points": points,
                 "best": {"weights": {s: list(w) for s, w in best.items()}, **found}},
        "headroom": headroom,
        "passed": headroom >= target,
    }


def _search(score: Callable[[Weights], float], sources: list[str], groups: int) -> tuple[Weights, int]:
    """The grid's best point on the search split (the first of equals) and how many points were scored."""
    best: Weights = {}
    best_value, points = float("-inf"), 0
    for weights in _grid(sources, groups):
        value, points = score(weights), points + 1
        if value > best_value:
            best, best_value = weights, value
    for _ in range(MAX_SWEEPS):
        improved = False
        for source in sources:
            for group in range(groups):
                for weight in SWEEP:
                    old = best[source]
                    if weight == old[group]:
                        continue
                    weights = {**best, source: old[:group] + (weight,) + old[group + 1:]}
                    value, points = score(weights), points + 1
                    if value > best_value:
                        best, best_value, improved = weights, value, True
        if not improved:
            break
    return best, points
