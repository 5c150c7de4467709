"""Search-loop benchmark: candidates per hour of evomerge's loop vs the loop a user writes with mergekit.

The same candidate recipes (task_arithmetic and ties, per-source weights and densities per layer group,
drawn from evomerge's search space by a seeded optuna RandomSampler) are scored on the same models and
tasks by each loop, in one process, one candidate at a time, the loops taking turns going first:

- evomerge: `SearchSession.run` -- the study's own loop (SQLite storage under --workdir, no pruner, no
  baselines; each candidate queued in the study just before its trial): ask a trial, decode its recipe,
  `ResidentMerger.materialize` it in place into the resident model, `Evaluator.evaluate("search")` on
  tokens prepared once, tell the score.
- mergekit: write the recipe's mergekit YAML (`evomerge.export.mergekit_yaml`), read it back and run
  `mergekit.merge.run_merge` in this process with mergekit-yaml's default options (read the safetensors,
  merge, write the merged safetensors, config, tokenizer and model card), load the result with
  `AutoModelForCausalLM.from_pretrained` + `AutoTokenizer.from_pretrained`, score it with the same
  evaluation (`Evaluator(...).evaluate("search")`, task rows read once before the loop), delete the folder.
- mergekit-yaml (first --cli-candidates candidates): the same, merging with the `mergekit-yaml` command,
  a process per candidate, as a shell loop would.

The script asserts that every loop gives every candidate the same merged tensors (to 1e-5; entries tied
with a TIES trim threshold excepted, see METHODS.md) and, where the tensors agree, the same scores (to
1e-4). Per-candidate figures are medians over the candidates, the first included; candidates per hour =
3600 / median. The models are the local zoo (`evomerge.zoo.build_zoo`, --zoo-size) where evomerge has
one, else the tiny Llama family of tests/modelfactory.py, built under --workdir if missing; sources and
objective follow configs/demo.yaml where it names the zoo's folders and tasks.

    python benchmarks/bench_loop.py --workdir /tmp/evomerge-bench-loop --out results/bench_loop.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from _harness import REPO, command, header, load_average, run_child, tests_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

METHODS = ("task_arithmetic", "ties")
SPEEDUP_TARGET = 20.0
TOLERANCE = 1e-4   # scores of the two loops: float32 merges that agree to ~1e-6 per tensor
TOKENIZER_NOTE = (
    "The mergekit YAML is evomerge's export without its `tokenizer_source: base` line, because the base's "
    "tokenizer has {tokens} tokens and its embedding {rows} rows: with that line mergekit resizes the embedding "
    "and head to the tokenizer's length and the scores no longer match. Without it mergekit copies the base "
    "model's tokenizer (its default).")


# ------------------------------------------------------------------------------------------------
# The models, tasks and config


def build_models(workdir: Path, *, seed: int, zoo_size: str) -> tuple[str, Path]:
    """(what they are, the model folder): the local zoo where evomerge has one, else the test family."""
    try:
        from evomerge.zoo import build_zoo
    except ImportError:
        build_zoo = None
    if build_zoo is not None:
        root = workdir / f"zoo-{zoo_size}"
        if not (root / "zoo.json").is_file():
            build_zoo(root, seed=seed, size=zoo_size, force=True)
        return f"local zoo (`evomerge.zoo.build_zoo`, size {zoo_size!r}, seed {seed})", root
    root = workdir / "fixture"
    if not (root / "tasks.yaml").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        tests_module("modelfactory").make_search_fixture(root, k=2, seed=seed)
    return "tests/modelfactory.py `make_search_fixture` (tiny Llama family; the zoo was not there yet)", root


def demo_choice(root: Path) -> tuple[list[str], dict[str, float]] | None:
    """configs/demo.yaml's sources and objective, where they name folders and tasks of `root`."""
    import yaml

    from evomerge.evaluate import load_tasks

    path = REPO / "configs" / "demo.yaml"
    if not path.is_file():
        return None
    demo = yaml.safe_load(path.read_text())
    sources = [Path(s).name for s in demo.get("sources", [])]
    objective = demo.get("objective")
    names = load_tasks(root / "tasks.yaml").names
    if (not sources or not all((root / s / "config.json").is_file() for s in sources)
            or not isinstance(objective, dict) or not all(t in names for t in objective)):
        return None
    return sources, {str(t): float(w) for t, w in objective.items()}


def model_folders(root: Path) -> tuple[str, list[str]]:
    """Base and the sources that share its tensor layout (experts with other shapes are left out)."""
    import json

    def header(folder: Path) -> dict:
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        shapes = {}
        for file in files:
            with safe_open(str(file), "pt") as fh:
                shapes.update({n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()})
        return shapes

    base = root / "base"
    layout = header(base)
    sources = [f.name for f in sorted(root.iterdir()) if f.is_dir() and f != base and (f / "config.json").is_file()
               and json.loads((f / "config.json").read_text()).get("model_type")
               and header(f) == layout]
    return "base", sources


def write_config(root: Path, workdir: Path, *, candidates: int, seed: int, layer_groups: int,
                 limit: int | None) -> tuple[Path, str]:
    """The benchmark's search config: the models' own tasks, equal weights, the two deterministic methods."""
    import yaml

    from evomerge.evaluate import load_tasks

    base, sources = model_folders(root)
    suite = load_tasks(root / "tasks.yaml", seed=seed)
    objective = {name: 1.0 for name in suite.names}
    chosen = "every source with the base's tensor layout, every task weighted equally"
    demo = demo_choice(root)
    if demo is not None:
        (sources, objective), chosen = demo, "the sources and objective of configs/demo.yaml"
    config = {
        "name": "bench_loop", "base": str(root / base), "sources": [str(root / s) for s in sources],
        "search": {"methods": list(METHODS), "layer_groups": layer_groups, "sampler": "random",
                   "n_trials": candidates, "seed": seed, "pruner": "none", "baselines": False},
        "tasks": str(root / "tasks.yaml"), "objective": objective,
        "device": "cpu", "dtype": "float32",
    }
    if limit is not None:
        config["limit"] = limit
    path = workdir / "bench_loop.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, chosen


# ------------------------------------------------------------------------------------------------
# The two loops


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the mergekit-yaml command)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Clock:
    """Wall-clock and CPU seconds (this process and its children) of named steps."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def step(self, name: str):
        clock = self

        class _Step:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), cpu_seconds()

            def __exit__(self, *exc):
                clock.wall[name] = clock.wall.get(name, 0.0) + time.perf_counter() - self.t
                clock.cpu[name] = clock.cpu.get(name, 0.0) + cpu_seconds() - self.c

        return _Step()


def draw_candidates(session, n: int, *, seed: int) -> list[tuple[dict, object]]:
    """n (parameters, recipe) from the session's search space, drawn by an optuna RandomSampler (seeded)."""
    import optuna

    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    candidates = []
    for _ in range(n):
        trial = draw.ask()
        method = session.space.suggest(trial)
        candidates.append((dict(trial.params), session.space.decode(trial.params, method=method)))
        draw.tell(trial, 0.0)
    return candidates


def evomerge_candidate(session, index: int, params: dict) -> tuple[object, dict, Clock]:
    """Queue `params` as the study's next trial and run the study's loop for it; (recipe, scores, clock)."""
    session.study.enqueue_trial(params)   # just in time: a queue of waiting trials would slow every storage read
    clock = Clock()
    with clock.step("total"):
        session.run(index + 1)
    trial = session.study.trials[index]
    if trial.state.name != "COMPLETE":
        raise RuntimeError(f"trial {index} {trial.state.name}: {trial.user_attrs.get('error')}")
    seconds = trial.user_attrs["seconds"]
    clock.wall["materialize"] = seconds["merge"]
    clock.wall["eval"] = seconds["eval"]
    clock.wall["recipe"] = seconds["total"] - seconds["merge"] - seconds["eval"]
    clock.wall["study"] = clock.wall["total"] - seconds["total"]
    scores = {"objective": trial.values[0], **trial.user_attrs["scores"]}
    return session.recipe_of(trial), scores, clock


def mergekit_candidate(recipe, sources, suite, config, folder: Path, *, cli: bool = False, threads: int = 1,
                       keep_tokenizer_source: bool = True, dtype=None) -> tuple[dict, Clock, dict]:
    """What a user's loop does for one candidate: mergekit YAML -> merge to disk -> load -> evaluate.

    The merge runs in this process (`run_merge`), or with `cli` as the `mergekit-yaml` command; the merged
    model is loaded in `dtype` (default float32; a bf16 model: the dtype evomerge scores it in).
    Returns the scores, the step times and the loaded model's tensors (to compare with evomerge's).
    """
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import Evaluator
    from evomerge.export import mergekit_yaml

    clock = Clock()
    out = folder / "merged"
    with clock.step("total"):
        with clock.step("yaml"):
            text = mergekit_yaml(recipe, sources)
            if text is None:
                raise RuntimeError(f"{recipe.method} has no mergekit YAML")
            if not keep_tokenizer_source:   # see TOKENIZER_NOTE
                data = yaml.safe_load(text)
                data.pop("tokenizer_source", None)
                text = yaml.safe_dump(data, sort_keys=False)
            (folder / "config.yaml").write_text(text)
        with clock.step("merge"):
            if cli:
                run_child([mergekit_command(), str(folder / "config.yaml"), str(out), "--device", "cpu", "--quiet",
                           "--num-threads", str(threads)], env={"OMP_NUM_THREADS": str(threads)})
            else:
                source = (folder / "config.yaml").read_text()
                merge_config = MergeConfiguration.model_validate(yaml.safe_load(source))
                run_merge(merge_config, str(out), options=MergeOptions(device="cpu", quiet=True),
                          config_source=source)
        with clock.step("load"):
            model = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype or torch.float32,
                                                         use_safetensors=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(out))
        with clock.step("eval setup"):
            evaluator = Evaluator(suite, model, tokenizer, seed=config.search.seed, limit=config.limit)
        with clock.step("eval"):
            result = evaluator.evaluate("search", objective=config.objectives[0])
        with clock.step("cleanup"):
            shutil.rmtree(out)
    scores = {"objective": result.objective(config.objectives[0]), **result.tasks}
    return scores, clock, model.state_dict()


def mergekit_command() -> str:
    """The `mergekit-yaml` script of this environment."""
    beside = Path(sys.executable).parent / "mergekit-yaml"
    found = str(beside) if beside.is_file() else shutil.which("mergekit-yaml")
    if found is None:
        raise RuntimeError("mergekit-yaml not found")
    return found


def tensor_differences(merger, recipe, theirs: dict) -> int:
    """How many entries of the merged tensors differ by more than 1e-5, all at TIES trim ties; else raises.

    METHODS.md: evomerge's TIES trim keeps every entry tied with the k-th largest |delta|, mergekit keeps
    exactly k (an unstable sort picks which). Such an entry may differ; nothing else may.
    """
    import torch

    from evomerge.methods.primitives import kth_largest_abs, ties_keep_count

    plan = merger.plan(recipe)
    differ = 0
    for name, ours in merger.state_dict().items():
        other = theirs.get(name)
        if other is None:
            raise AssertionError(f"tensor {name} is missing from the model mergekit wrote")
        bad = (ours.double() - other.double()).abs() > 1e-5
        count = int(bad.sum())
        if not count:
            continue
        differ += count
        at_tie = torch.zeros_like(bad)
        if recipe.method == "ties":
            deltas = merger.contexts[name].deltas
            for i, source in enumerate(recipe.sources):
                density = plan.value(name, source, "density")
                if density >= 1:
                    continue
                k = ties_keep_count(density, deltas[i].numel())
                threshold = kth_largest_abs(deltas[i], k)
                magnitude = deltas[i].abs()
                if int((magnitude >= threshold).sum()) > k:
                    at_tie |= magnitude == threshold
        unexplained = bad & ~at_tie
        if bool(unexplained.any()):
            raise AssertionError(f"{recipe.method}: tensor {name} differs from mergekit's in {count} entries, "
                                 f"{int(unexplained.sum())} of them not at a trim tie")
    return differ


def score_difference(ours: dict, theirs: dict) -> float:
    """Largest absolute difference over the objective and every metric of every task."""
    worst = abs(ours["objective"] - theirs["objective"])
    for task, metrics in ours.items():
        if task == "objective":
            continue
        for metric, value in metrics.items():
            worst = max(worst, abs(float(value) - float(theirs[task][metric])))
    return worst


# ------------------------------------------------------------------------------------------------
# The report


def median(clocks: list[Clock], step: str, *, cpu: bool = False) -> float:
    return statistics.median((c.cpu if cpu else c.wall).get(step, 0.0) for c in clocks)


def scores_text(run: dict) -> str:
    checks = run["checks"]
    same = sum(1 for c in checks if c["differ"] == 0)
    text = (f"Scores: in {same} of {len(checks)} candidates every merged tensor of the mergekit loop equals "
            f"evomerge's to 1e-5 and the scores agree to {run['worst']:.2g} (asserted ≤ {TOLERANCE:g}; the "
            "mergekit-yaml runs too).")
    if same < len(checks):
        entries = sum(c["differ"] for c in checks)
        text += (f" In the other {len(checks) - same} (ties), {entries} "
                 f"{'entry differs' if entries == 1 else 'entries differ'} in all, each tied "
                 "with its TIES trim threshold (asserted): evomerge keeps every entry tied with the k-th largest "
                 "|delta|, mergekit keeps exactly k (METHODS.md, ties step 1). Float32 task vectors tie more "
                 "often than one might think, being differences of nearby floats. The scores of those candidates "
                 f"differ by at most {run['worst_tied']:.2g}.")
    return text


def per_method_rows(run: dict) -> list[str]:
    rows = []
    for method in METHODS:
        picked = [i for i, m in enumerate(run["methods"]) if m == method]
        if not picked:
            continue
        ours = [run["ours"][i] for i in picked]
        theirs = [run["theirs"][i] for i in picked]
        rows.append(f"| {method} | {len(picked)} | {median(ours, 'materialize'):.3f} / {median(ours, 'eval'):.3f} / "
                    f"{median(ours, 'total'):.3f} | {median(theirs, 'merge'):.3f} / {median(theirs, 'total'):.3f} | "
                    f"{median(theirs, 'total') / median(ours, 'total'):.1f}× |")
    return rows


def report(run: dict) -> str:
    import importlib.metadata as md

    ours, theirs, cli = run["ours"], run["theirs"], run["cli"]
    n = len(ours)
    ours_s, theirs_s = median(ours, "total"), median(theirs, "total")
    ratio, ratio_cpu = theirs_s / ours_s, median(theirs, "total", cpu=True) / median(ours, "total", cpu=True)
    work_s = statistics.median(c.wall["materialize"] + c.wall["eval"] for c in ours)
    around_ours = statistics.median(c.wall["total"] - c.wall["eval"] for c in ours)
    around_theirs = statistics.median(c.wall["total"] - c.wall["eval"] for c in theirs)
    verdict = "met" if ratio >= SPEEDUP_TARGET else "**missed**"
    methods = ", ".join(f"{m} × {run['methods'].count(m)}" for m in METHODS)
    loads = run["loads"]
    lines = [
        *header("Search-loop benchmark: evomerge vs a mergekit-based loop", cmd=run["command"], elapsed=run["elapsed"]),
        f"- No GPU; torch threads: {run['threads']} in every loop "
        "(`torch.set_num_threads`; `--num-threads` and OMP_NUM_THREADS for the mergekit-yaml command)",
        f"- Load average (1 min): {run['load_start']:.2f} at the start, {run['load_end']:.2f} at the end; "
        f"1-minute load after each candidate: min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
        f"max {max(loads):.2f}. The machine is shared with other jobs; the loops take turns going first, "
        "candidate by candidate, so load hits all of them alike.",
        f"- Versions: evomerge {md.version('evomerge')}, mergekit {md.version('mergekit')}, "
        f"transformers {md.version('transformers')}, optuna {md.version('optuna')}",
        f"- Models: {run['models']}; base + {len(run['sources'])} sources ({', '.join(run['sources'])}), "
        f"{run['arch']}, {run['numel'] / 1e6:.2f}M float32 parameters each",
        f"- Tasks: {run['tasks']}; search split, {run['examples']} examples per candidate; objective: weighted "
        f"mean of the primary metrics of {', '.join(f'{t} × {w:g}' for t, w in run['objective'].items())} "
        f"({run['chosen']})",
        f"- Candidates: {n} recipes ({methods}), {run['layer_groups']} layer groups, drawn by optuna's "
        f"RandomSampler (seed {run['seed']}) from evomerge's search space; the same recipes in every loop "
        "(evomerge: each queued in the study just before its trial)",
        "",
        "## Result",
        "",
        "| loop | candidates timed | per candidate, median (s) | CPU s per candidate, median | candidates per hour "
        "| vs evomerge | one-time setup (s) |",
        "|---|---|---|---|---|---|---|",
        f"| evomerge `SearchSession.run` (SQLite study) | {n} | {ours_s:.3f} | "
        f"{median(ours, 'total', cpu=True):.3f} | {3600 / ours_s:,.0f} | 1× | {run['ours_setup']:.1f} |",
        f"| mergekit `run_merge` in process + `from_pretrained` + same evaluation | {n} | {theirs_s:.3f} | "
        f"{median(theirs, 'total', cpu=True):.3f} | {3600 / theirs_s:,.0f} | {ratio:.1f}× slower | "
        f"{run['theirs_setup']:.1f} |",
    ]
    if cli:
        cli_s = median(cli, "total")
        same = median(ours[:len(cli)], "total")
        lines.append(f"| same, merging with the `mergekit-yaml` command (a process per candidate) | {len(cli)} | "
                     f"{cli_s:.3f} | {median(cli, 'total', cpu=True):.3f} | {3600 / cli_s:,.0f} | "
                     f"{cli_s / same:.0f}× slower (same candidates) | — |")
    lines += [
        "",
        "One-time setup: evomerge opens the sources, loads the resident model, precomputes the TIES threshold "
        "tables and tokenizes the tasks; the mergekit loop reads the task rows. Imports both need (mergekit, "
        f"transformers, optuna: {run['imports']:.1f} s) are outside both.",
        "",
        f"**evomerge runs {ratio:.1f}× as many candidates per hour as the in-process mergekit loop** (by CPU time: "
        f"{ratio_cpu:.1f}×); target ≥ {SPEEDUP_TARGET:g}×: {verdict}. Merge and evaluation alone "
        f"(`materialize` + `evaluate`, without the study's bookkeeping) take {work_s:.3f} s per candidate, "
        f"{theirs_s / work_s:.1f}× less than the mergekit loop. Counting the one-time setup too, {n} candidates take "
        f"{run['ours_setup'] + sum(c.wall['total'] for c in ours):.1f} s with evomerge and "
        f"{run['theirs_setup'] + sum(c.wall['total'] for c in theirs):.1f} s with the in-process mergekit loop.",
        "",
        "What bounds the ratio: both loops run the same scoring, which costs "
        f"{median(ours, 'eval'):.3f} s per candidate in evomerge and {median(theirs, 'eval'):.3f} s in the mergekit "
        f"loop. Around it, the mergekit loop spends {around_theirs:.3f} s (YAML, `run_merge`, `from_pretrained`, "
        f"`Evaluator` set-up) where evomerge spends {around_ours:.3f} s (`materialize` + the study's bookkeeping) "
        f"— {around_theirs / around_ours:.1f}×, or {around_theirs / median(ours, 'materialize'):.0f}× against "
        f"`materialize` alone. Were evomerge's merge and bookkeeping free, the whole-loop ratio could reach "
        f"{theirs_s / median(ours, 'eval'):.1f}× on this workload.",
        "",
        scores_text(run),
        "",
        "| method | candidates | evomerge: materialize / evaluate / whole loop (s) | mergekit loop: run_merge / "
        "whole loop (s) | ratio of medians |",
        "|---|---|---|---|---|",
        *per_method_rows(run),
        "",
        "## Where a candidate's time goes (median seconds per step)",
        "",
        "| loop | step | wall (s) | CPU (s) | share of the loop's median |",
        "|---|---|---|---|---|",
    ]
    steps = [
        ("evomerge", ours, [("materialize", "`ResidentMerger.materialize` (in place)"),
                            ("eval", "`Evaluator.evaluate` (resident model, tokens prepared once)"),
                            ("recipe", "suggest the trial's parameters (a storage write each) + decode the recipe"),
                            ("study", "the rest of `SearchSession.run`: ask / tell, trial counts, user attrs, "
                                      "heartbeat (SQLite)")]),
        ("mergekit", theirs, [("yaml", "write the mergekit YAML"),
                              ("merge", "`run_merge`: read sources, merge, write safetensors + tokenizer + card"),
                              ("load", "`from_pretrained` model + tokenizer"),
                              ("eval setup", "`Evaluator(...)`: tokenize the rows for this model object"),
                              ("eval", "`Evaluator.evaluate`"),
                              ("cleanup", "delete the merged folder")]),
    ]
    if cli:
        steps.append(("mergekit-yaml", cli, [("merge", "`mergekit-yaml` command: start Python, import, merge, "
                                                       "write")]))
    for loop, clocks, names in steps:
        total = median(clocks, "total")
        for step, label in names:
            wall = median(clocks, step)
            cpu = f"{median(clocks, step, cpu=True):.3f}" if step in clocks[0].cpu else "—"
            lines.append(f"| {loop} | {label} | {wall:.3f} | {cpu} | {100 * wall / total:.0f}% |")
    lines += [
        "",
        "Evomerge's merge and evaluation times are the trial's own `seconds` user attribute (measured inside "
        "`SearchSession.objective`); its last two rows split the rest of the `SearchSession.run` call. The "
        "mergekit loop's evaluation builds an `Evaluator` per candidate because each candidate is a new model "
        "object; the task rows are read once, before the loop. CPU time counts this process and its children "
        "(the mergekit-yaml command), all threads.",
        "",
        "## Per candidate (wall seconds)",
        "",
        "| # | method | evomerge | mergekit loop | ratio | mergekit-yaml loop | objective | |score difference| "
        "| entries at trim ties |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (o, t) in enumerate(zip(ours, theirs)):
        c = f"{cli[i].wall['total']:.2f}" if i < len(cli) else "—"
        lines.append(f"| {i} | {run['methods'][i]} | {o.wall['total']:.3f} | {t.wall['total']:.3f} | "
                     f"{t.wall['total'] / o.wall['total']:.1f}× | {c} | {run['objectives'][i]:.4f} | "
                     f"{run['checks'][i]['score']:.1g} | {run['checks'][i]['differ']} |")
    if run["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in run["notes"]]
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench-loop"))
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer-groups", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: the whole search split)")
    parser.add_argument("--zoo-size", default="tiny", help="zoo size (tiny: the demo's; test; small)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both loops")
    parser.add_argument("--cli-candidates", type=int, default=3,
                        help="also run this many candidates with the mergekit-yaml command (a process each)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load_start = load_average()

    import logging
    import warnings

    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from evomerge.config import load_config, tasks_path
    from evomerge.evaluate import load_tasks
    from evomerge.search import SearchSession

    args.workdir.mkdir(parents=True, exist_ok=True)
    models, root = build_models(args.workdir, seed=args.seed, zoo_size=args.zoo_size)
    config_path, chosen = write_config(root, args.workdir, candidates=args.candidates, seed=args.seed,
                                       layer_groups=args.layer_groups, limit=args.limit)
    config = load_config(config_path)
    run_dir = args.workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    merged = args.workdir / "mergekit"
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir()

    notes: list[str] = []
    seen_warnings: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen_warnings.append(f"{record.name}: {record.getMessage()}")

    for name in ("", "transformers", "mergekit"):
        logging.getLogger(name).addHandler(_Catch())

    start = time.perf_counter()   # imports both loops need, outside either loop's setup
    import mergekit.merge  # noqa: F401
    import optuna  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    imports_s = time.perf_counter() - start
    start = time.perf_counter()
    session = SearchSession(config, storage_url=f"sqlite:///{run_dir / 'study.db'}", device="cpu", progress=False)
    ours_setup = time.perf_counter() - start
    candidates = draw_candidates(session, args.candidates, seed=args.seed)
    tokens = len(session.tokenizer)
    rows = session.merger.model.get_input_embeddings().weight.shape[0]
    keep_tokenizer_source = tokens == rows
    if not keep_tokenizer_source:
        notes.append(TOKENIZER_NOTE.format(tokens=tokens, rows=rows))
    start = time.perf_counter()
    suite = load_tasks(tasks_path(config), seed=config.search.seed)
    theirs_setup = time.perf_counter() - start

    ours: list[Clock] = []
    theirs: list[Clock] = []
    cli: list[Clock] = []
    methods, objectives, loads, checks, worst, worst_tied = [], [], [], [], 0.0, 0.0
    with session, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (params, drawn) in enumerate(candidates):
            loops = {
                "evomerge": lambda: evomerge_candidate(session, i, params),
                "mergekit": lambda: mergekit_candidate(drawn, session.sources, suite, config, merged,
                                                       threads=args.threads,
                                                       keep_tokenizer_source=keep_tokenizer_source),
            }
            if i < args.cli_candidates:
                loops["cli"] = lambda: mergekit_candidate(drawn, session.sources, suite, config, merged, cli=True,
                                                          threads=args.threads,
                                                          keep_tokenizer_source=keep_tokenizer_source)
            # rotate which loop goes first, so a slow spell of the shared machine hits all alike
            names = list(loops)
            names = names[i % len(names):] + names[:i % len(names)]
            done = {name: loops[name]() for name in names}
            recipe, our_scores, our_clock = done["evomerge"]
            if recipe.sha256() != drawn.sha256():
                raise RuntimeError(f"candidate {i}: the study ran another recipe than the one drawn")
            for name in ("mergekit", "cli"):
                if name not in done:
                    continue
                # evomerge's resident model still holds candidate i: compare tensors, then scores
                differ = tensor_differences(session.merger, recipe, done[name][2])
                diff = score_difference(our_scores, done[name][0])
                if name == "mergekit":
                    checks.append({"differ": differ, "score": diff})
                if differ == 0:
                    assert diff <= TOLERANCE, (f"candidate {i} ({recipe.method}, {name}): same tensors, scores "
                                               f"differ by {diff}: {our_scores} vs {done[name][0]}")
                    worst = max(worst, diff)
                else:
                    worst_tied = max(worst_tied, diff)
            ours.append(our_clock)
            theirs.append(done["mergekit"][1])
            if "cli" in done:
                cli.append(done["cli"][1])
            methods.append(recipe.method)
            objectives.append(our_scores["objective"])
            loads.append(load_average())
            print(f"candidate {i:2d} {recipe.method:16s} evomerge {our_clock.wall['total']:.3f} s   "
                  f"mergekit loop {done['mergekit'][1].wall['total']:.3f} s"
                  + (f"   mergekit-yaml loop {done['cli'][1].wall['total']:.3f} s" if "cli" in done else "")
                  + f"   objective {our_scores['objective']:.4f}   |score diff| {checks[-1]['score']:.1e}"
                  f"   entries at trim ties: {checks[-1]['differ']}   load {loads[-1]:.2f}", flush=True)
        numel = sum(p.numel() for p in session.merger.model.parameters())
        arch = type(session.merger.model).__name__
        tasks = ", ".join(f"`{n}` ({session.suite.spec(n).type})" for n in session.suite.names)
        examples = sum(len(v) for (name, split), v in session.evaluator._examples.items() if split == "search")
    for w in caught:
        seen_warnings.append(f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}")
    for text in sorted(set(seen_warnings)):
        notes.append(f"warning seen ({seen_warnings.count(text)}×): {text}")

    run = {"threads": torch.get_num_threads(), "load_start": load_start,
           "load_end": load_average(), "models": models, "sources": [Path(s).name for s in config.sources],
           "arch": arch, "numel": numel, "tasks": tasks, "examples": examples, "seed": args.seed,
           "layer_groups": args.layer_groups, "chosen": chosen, "objective": config.objectives[0],
           "command": command(argv), "elapsed": time.perf_counter() - started, "ours": ours, "theirs": theirs,
           "cli": cli, "loads": loads, "ours_setup": ours_setup, "imports": imports_s, "theirs_setup": theirs_setup,
           "methods": methods, "objectives": objectives, "worst": worst, "worst_tied": worst_tied, "checks": checks,
           "notes": notes}
    text = report(run)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
