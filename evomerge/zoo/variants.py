"""Variants of the local model zoo: structurally different merge problems, for a suite of search benchmarks.

One zoo is one problem, and a sampler tuned on one problem may only have learned that problem. A variant
k is the zoo's recipe with its structure changed: which experts (two to five of the compatible skills
``inc``, ``rot``, ``mir`` and the conflicting ``rev``, ``sort``), the depth and width, which blocks each
expert fine-tunes (every parameter, the upper or the lower blocks, or a random subset), whether the
compatible experts share an instruction stage, and how fast the skills are learned. ``build_variant(OUT,
variant=k)`` writes the zoo's folder layout (base/, one folder per expert, data/, tasks.yaml, zoo.json) and a
search config, problem.yaml, that merges the experts with the objective weighting each expert's own task
equally.

A problem counts only where some merge beats every source alone, so every build is checked
(variant_headroom.py): a grid of task_arithmetic weights, picked on the search split, must beat the best
source alone by ``HEADROOM_TARGET`` on the held-out split. A structure that misses it is retrained with the
next derived seed, and zoo.json records every attempt. ``suite_problem(k)`` is the cached variant.

The check's best grid point (zoo.json's ``headroom.grid.best``) is also a first lower bound of what a search
on the problem should reach.

Variants 1-8 were tuned by hand (each builds in half a minute to a minute on one thread and passes at its
first attempt); a k above 8 draws its structure from a generator seeded by k, unchecked until built. What
the tuning found: experts that tune the lower blocks under a shared instruction stage in the upper ones, or
that each learn the instruction format themselves (variant_train.py), leave no grid merge that beats the best
expert alone; so no variant has the first, and a base without the stage knows the format.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .version import MANIFEST, TASK_FILE, derive_seed, read_manifest

# The variants' own version, in zoo.json: raise it whenever a variant's structure, training or checks change,
# so that a cached suite problem is rebuilt rather than reused.
VARIANT_VERSION = 1
PROBLEM_FILE = "problem.yaml"
HEADROOM_TARGET = 0.05   # the best grid merge's held-out objective above the best source alone's, at least
ATTEMPTS = 5             # training seeds tried before a variant is declared without headroom
TUNED_MODES = ("full", "all", "upper", "lower", "subset")   # which parameters each expert fine-tunes
PACES: dict[str, tuple[int, float]] = {   # expert (AdamW) steps and peak learning rate
    "fast": (100, 3e-3),
    "normal": (150, 1.5e-3),
    "slow": (300, 6e-4),
}


@dataclass(frozen=True)
class VariantSpec:
    """A variant's structure: everything that differs between two suite problems.

    `tuned` names which parameters the experts fine-tune (TUNED_MODES: "full" every one, "all" every block
    but not the embeddings, final norm and head, "upper" and "lower" half the blocks, "subset" a random half
    per expert); `blocks[i]` are the blocks expert `experts[i]` tunes. `instruct_blocks` are those the shared
    instruction stage tunes before the compatible experts start from it (empty: no such stage, the base knows
    the instruction format and every expert starts from it). `layer_groups` is the problem's (search config).
    """

    variant: int
    experts: tuple[str, ...]
    layers: int
    hidden: int
    tuned: str
    blocks: tuple[tuple[int, ...], ...]
    instruct_blocks: tuple[int, ...]
    pace: str
    expert_steps: int
    expert_lr: float
    layer_groups: int

    @property
    def instruct(self) -> bool:
        return bool(self.instruct_blocks)

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["blocks"] = {name: list(b) for name, b in zip(self.experts, self.blocks)}
        data["instruct_blocks"] = list(self.instruct_blocks)
        data["experts"] = list(self.experts)
        return data


# variant: (experts, layers, hidden, tuned, instruction stage, pace)
_TABLE: dict[int, tuple[tuple[str, ...], int, int, str, bool, str]] = {
    1: (("inc", "rot"), 3, 64, "full", False, "normal"),               # two full fine-tunes of a 3-block base
    2: (("inc", "rot", "mir"), 4, 48, "upper", True, "normal"),        # the zoo's structure, smaller
    3: (("inc", "rot", "rev", "sort"), 6, 32, "subset", False, "slow"),
    4: (("mir", "rev"), 2, 96, "lower", False, "fast"),
    5: (("inc", "rot", "mir", "rev", "sort"), 4, 64, "upper", True, "fast"),
    6: (("rot", "mir", "sort"), 6, 48, "lower", False, "slow"),
    7: (("inc", "mir", "rev"), 5, 80, "subset", True, "fast"),
    8: (("inc", "rot", "mir", "sort"), 2, 64, "all", True, "slow"),
}
SKILL_NAMES = ("inc", "rot", "mir", "rev", "sort")


def variant_spec(k: int) -> VariantSpec:
    """The structure of variant `k` (1, 2, ...): a pure function of k, so every machine builds the same suite."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"must be a whole number from 1 on, not {k!r}", field="variant",
                         fix=f"1-{max(_TABLE)} are the tuned suite problems")
    if k in _TABLE:
        experts, layers, hidden, tuned, instruct, pace = _TABLE[k]
    else:
        experts, layers, hidden, tuned, instruct, pace = _drawn(k)
    steps, lr = PACES[pace]
    return VariantSpec(
        variant=k, experts=experts, layers=layers, hidden=hidden, tuned=tuned,
        blocks=tuple(_expert_blocks(tuned, layers, k=k, expert=e) for e in experts),
        instruct_blocks=_instruct_blocks(tuned, layers) if instruct else (),
        pace=pace, expert_steps=steps, expert_lr=lr, layer_groups=3 if layers % 3 == 0 else 2,
    )


def _drawn(k: int) -> tuple[tuple[str, ...], int, int, str, bool, str]:
    """An untuned structure for k beyond the table, from a generator seeded by k (not Python's salted hash)."""
    rng = random.Random(derive_seed(0, "variant", str(k)))
    count = rng.randint(2, 5)
    experts = tuple(sorted(rng.sample(SKILL_NAMES, count), key=SKILL_NAMES.index))
    if not set(experts) - {"rev", "sort"}:          # the conflicting pair alone has no merge to find
        experts = ("inc", *experts)
    tuned = rng.choice(TUNED_MODES)
    instruct = tuned != "lower" and rng.random() < 0.5     # lower blocks under the stage: no merge found (above)
    return experts, rng.randint(2, 6), rng.choice((32, 48, 64, 80, 96)), tuned, instruct, rng.choice(tuple(PACES))


def _expert_blocks(tuned: str, layers: int, *, k: int, expert: str) -> tuple[int, ...]:
    """Blocks an expert fine-tunes: every one, the upper or lower half (the middle block of an odd depth goes with
    the larger side), or a random half drawn for this variant and expert."""
    half = layers // 2
    if tuned in ("full", "all"):
        return tuple(range(layers))
    if tuned == "upper":
        return tuple(range(half, layers))
    if tuned == "lower":
        return tuple(range(0, layers - half))
    rng = random.Random(derive_seed(0, "variant", str(k), "blocks", expert))
    return tuple(sorted(rng.sample(range(layers), max(1, (layers + 1) // 2))))


def _instruct_blocks(tuned: str, layers: int) -> tuple[int, ...]:
    """The instruction stage tunes the lower half, or the upper half where the experts tune the lower one."""
    half = max(1, layers // 2)
    return tuple(range(layers - half, layers)) if tuned == "lower" else tuple(range(0, half))


def build_variant(out: str | Path, *, variant: int, seed: int = 0, force: bool = False,
                  progress: bool = True) -> Path:
    """Train and write variant `variant` into `out`, checked for headroom; return its path.

    Each attempt trains every model from its own derived seed (the task data stay the same); the first
    attempt whose grid beats every source alone by HEADROOM_TARGET is kept, and zoo.json records the numbers
    of every attempt. Raises NoHeadroomError where none of ATTEMPTS does, InputError for bad input (before
    anything is written). Built in a staging folder and renamed into place, like build_zoo.
    """
    from . import _check_target, _logger, _move_into_place, _staging_folder

    spec = variant_spec(variant)
    out = Path(out).expanduser().absolute()
    _check_target(out, force=force)
    staging = _staging_folder(out)
    log = _logger(progress)
    try:
        attempts = []
        for attempt in range(ATTEMPTS):
            training, headroom = _build_attempt(staging, spec, seed=seed, attempt=attempt, log=log)
            attempts.append({"attempt": attempt, "train_seed": train_seed(seed, variant, attempt),
                             "headroom": headroom["headroom"], "passed": headroom["passed"]})
            log(f"attempt {attempt}: headroom {headroom['headroom']:+.3f} (target {HEADROOM_TARGET})")
            if headroom["passed"]:
                break
        else:
            measured = ", ".join(f"{a['headroom']:+.3f}" for a in attempts)
            raise NoHeadroomError(f"variant {variant} (seed {seed}): no grid merge beat every source alone by "
                                  f"{HEADROOM_TARGET} in {ATTEMPTS} training attempts (headroom {measured})")
        from .write import write_json

        write_json(staging / MANIFEST, manifest(spec, seed=seed, training=training,
                                                headroom={**headroom, "attempts": attempts}))
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


class NoHeadroomError(RuntimeError):
    """No training attempt gave a variant a merge that beats every source alone: not a usable problem."""


def train_seed(seed: int, variant: int, attempt: int) -> int:
    """The root seed of every model of one attempt (the task data's is `data_seed`)."""
    return derive_seed(seed, "variant", str(variant), "train", str(attempt))


def data_seed(seed: int, variant: int) -> int:
    return derive_seed(seed, "variant", str(variant), "data")


def _build_attempt(folder: Path, spec: VariantSpec, *, seed: int, attempt: int,
                   log: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Empty `folder`, write the variant trained from the attempt's seed, and measure its headroom; return the
    training budget and the headroom."""
    from .variant_headroom import measure_headroom
    from .variant_train import build_variant_into

    for child in folder.iterdir():       # an earlier attempt's files
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    training = build_variant_into(folder, spec, data_seed=data_seed(seed, spec.variant),
                                  train_seed=train_seed(seed, spec.variant, attempt), log=log)
    (folder / PROBLEM_FILE).write_text(problem_yaml(spec), encoding="utf-8")
    return training, measure_headroom(folder, list(spec.experts), objective=objective(spec),
                                      layer_groups=spec.layer_groups, target=HEADROOM_TARGET, log=log)


def objective(spec: VariantSpec) -> dict[str, float]:
    """Each expert's own generate task, weighted equally."""
    return {name: 1.0 for name in spec.experts}


def problem_config(spec: VariantSpec) -> dict[str, Any]:
    """The search config of the problem, paths relative to problem.yaml; the sampler is left to the default."""
    return {
        "name": f"variant-{spec.variant}",
        "base": "base",
        "sources": list(spec.experts),
        "search": {"methods": ["task_arithmetic", "ties", "dare_ties"], "layer_groups": spec.layer_groups,
                   "n_trials": 100, "seed": 0},
        "tasks": TASK_FILE,
        "objective": objective(spec),
        "device": "cpu",
        "threads": 1,
    }


def problem_yaml(spec: VariantSpec) -> str:
    from ..yamlio import dump_yaml

    header = (f"# Written by `evomerge zoo build --variant {spec.variant}`: merge the variant's experts into one "
              "model that does every expert's task.\n")
    return header + dump_yaml(problem_config(spec))


def manifest(spec: VariantSpec, *, seed: int, training: dict[str, Any], headroom: dict[str, Any]) -> dict[str, Any]:
    """What zoo.json says: the structure, the problem, the training budget and the measured headroom."""
    from .skills import SKILLS_BY_NAME
    from .write import choice_task_name

    return {
        "evomerge_variant": VARIANT_VERSION,
        "variant": spec.variant,
        "seed": seed,
        "base": "base",
        "task_file": TASK_FILE,
        "problem": PROBLEM_FILE,
        "skills": list(spec.experts),
        "structure": spec.describe(),
        "experts": {
            name: {"folder": name, "task": name, "choice_task": choice_task_name(SKILLS_BY_NAME[name]),
                   "group": SKILLS_BY_NAME[name].group, "alphabet": SKILLS_BY_NAME[name].alphabet,
                   "rule": SKILLS_BY_NAME[name].rule, "blocks": list(blocks)}
            for name, blocks in zip(spec.experts, spec.blocks)
        },
        "training": training,
        "headroom": headroom,
    }


def is_current_variant(manifest_data: dict | None, *, variant: int, seed: int = 0) -> bool:
    """Whether a variant's zoo.json is what this version of evomerge would build for `variant` and `seed`."""
    return manifest_data is not None and (manifest_data.get("evomerge_variant"), manifest_data.get("variant"),
                                          manifest_data.get("seed")) == (VARIANT_VERSION, variant, seed)


def suite_root() -> Path:
    env = os.environ.get("EVOMERGE_SUITE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evomerge" / "suite"


def suite_problem(k: int, *, cache: str | Path | None = None, progress: bool = True) -> Path:
    """The folder of suite problem `k` (problem.yaml inside), built into `cache` (default $EVOMERGE_SUITE or
    ~/.cache/evomerge/suite) as v{k} if missing or built by another version."""
    spec = variant_spec(k)
    folder = (Path(cache).expanduser() if cache is not None else suite_root()) / f"v{spec.variant}"
    if not is_current_variant(read_manifest(folder), variant=spec.variant):
        build_variant(folder, variant=spec.variant, force=True, progress=progress)
    return folder
