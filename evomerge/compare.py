"""`evomerge compare`: techniques side by side under an equal budget and several seeds.

For each technique of the config: a search restricted to it (same trial budget,
same tasks, same evaluation subsample) repeated over seeds, plus the technique at
its untuned defaults; the best trial of each search is re-scored on held-out data.
Every number in the report is read back from the study storage (`compare.db`).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SearchConfig, load_config
from .errors import InputError
from .export import atomic_write_text


GRADIENT_FALLBACK = "tpe+cmaes"


@dataclass
class CompareResult:
    out: Path
    rows: list[dict[str, Any]]      # one per (technique, seed, kind) with held-out scores
    table: str


def compare(config: SearchConfig | str | Path, *, seeds: int = 3, budget: int | None = None,
            out: str | Path | None = None, device: str | None = None, progress: bool = True) -> CompareResult:
    from .search import SWEEP_SHARE, SearchSession
    from .workbench import Workbench

    if not isinstance(config, SearchConfig):
        config = load_config(config)
    for flag, value in (("--seeds", seeds), ("--budget", budget)):
        if value is not None and value < 1:
            raise InputError(f"must be at least 1, got {value}", field=flag)
    if config.search.space != "ps":
        raise InputError(f"compare compares merge techniques in parameter space, and the config searches "
                         f"{config.search.space}", file=config.path, field="search.space",
                         fix="compare with space: ps; run PS, DFS and PS+DFS as three searches (benchmarks/dfs.py)")
    out = Path(out) if out else config.run_dir(None).parent / f"compare-{config.name}"
    storage = f"sqlite:///{(out / 'compare.db').resolve()}"
    budget = budget or config.search.n_trials
    started = time.time()
    bench = Workbench(config, device=device or config.device, progress=progress)   # bad input stops here, unwritten
    rows: list[dict[str, Any]] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for method in config.search.methods:
            for seed in range(config.search.seed, config.search.seed + seeds):
                sub = _restricted(config, method=method, seed=seed, budget=budget)
                with SearchSession(sub, storage_url=storage, device=None, progress=progress, bench=bench) as session:
                    # the same head start for all: the default, and the one-knob sweep
                    session.enqueue_baselines([(f"default:{method}", session.space.defaults(method))]
                                              + session.space.sweep(method, round(SWEEP_SHARE * budget)))
                    session.run(budget)
                    rows.extend(_score(session, method=method, seed=seed))
    finally:
        bench.close()
    tasks = config.objective_tasks
    table = summary_table(rows, tasks)
    _write(out, config, rows, tasks, table, seeds=seeds, budget=budget, seconds=time.time() - started)
    return CompareResult(out=out, rows=rows, table=table)


def sampler_for(config: SearchConfig, method: str) -> str:
    """The config's sampler, except that adamerging learns task_arithmetic weights only: the other techniques
    are searched with tpe+cmaes."""
    sampler = config.search.sampler
    return GRADIENT_FALLBACK if sampler == "adamerging" and method != "task_arithmetic" else sampler


def _restricted(config: SearchConfig, *, method: str, seed: int, budget: int) -> SearchConfig:
    search = config.search.model_copy(update={"methods": [method], "seed": seed, "n_trials": budget,
                                              "baselines": False, "sampler": sampler_for(config, method)})
    # the budget is in the name: a rerun with another budget runs studies of its own, never a larger one's
    return config.model_copy(update={"name": f"{config.name}.{method}.seed{seed}.budget{budget}", "search": search})


def _score(session, *, method: str, seed: int) -> list[dict[str, Any]]:
    """The untuned default, the one-knob sweep point a user would keep (the best on the search split) and the
    tuned best of one study, on both splits. The best is the search's own
    pick (with several objectives, the Pareto-front trial with the best mean of them); a row's means are
    the mean of its objectives, each computed as the search computes it (a lower-is-better metric negated)."""
    from .export.run import heldout_scores, objective_values, sweep_picks

    session.rescore_finalists()     # cheap evaluation: the tuned best is picked by full search score
    trials = [t for t in session.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    default = next((t for t in trials if t.user_attrs.get("baseline") == f"default:{method}"), None)
    rows = []
    for kind, trial in (("default", default), ("sweep", sweep_picks(session).get(method)),
                        ("tuned", session.best_trial())):
        if trial is None:
            continue
        heldout = heldout_scores(session, trial)
        row = {"technique": method, "seed": seed, "kind": kind, "trial": trial.number,
               "study": session.study.study_name, "search_value": statistics.fmean(session.search_values(trial)),
               "n_complete": len(trials)}
        for task in session.suite.names:
            row[f"heldout:{task}"] = heldout.get(task, {}).get(session.suite.primary_metric(task), float("nan"))
        row["heldout_mean"] = statistics.fmean(
            objective_values(session, {t: row[f"heldout:{t}"] for t in session.suite.names}))
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["technique"], r["kind"]), []).append(r)
    out = []
    for (technique, kind), rs in groups.items():
        entry = {"technique": technique, "kind": kind, "seeds": len(rs)}
        for key in [f"heldout:{t}" for t in tasks] + ["heldout_mean"]:
            entry[key] = _mean_std([r[key] for r in rs])
        out.append(entry)
    out.sort(key=lambda e: ({"tuned": 0, "sweep": 1}.get(e["kind"], 2), -e["heldout_mean"][0]))
    return out


def summary_table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    head = ["technique", "kind", "seeds"] + [f"{t} (held-out)" for t in tasks] + ["mean (held-out)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in aggregate(rows, tasks):
        cells = [e["technique"], e["kind"], str(e["seeds"])]
        cells += [f"{e[f'heldout:{t}'][0]:.3f} ± {e[f'heldout:{t}'][1]:.3f}" for t in tasks]
        cells.append(f"**{e['heldout_mean'][0]:.3f} ± {e['heldout_mean'][1]:.3f}**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(out: Path, config: SearchConfig, rows, tasks, table: str, *, seeds: int, budget: int,
           seconds: float) -> None:
    buf = io.StringIO()
    keys = ["technique", "seed", "kind", "trial", "study", "search_value", "n_complete"] + \
        [f"heldout:{t}" for t in tasks] + ["heldout_mean"]
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "compare.csv", buf.getvalue())
    _plot(out / "compare.png", rows, tasks)
    report = [f"# Technique comparison: `{config.name}`", "",
              f"Each technique searched alone with the same budget of {budget} trials "
              f"(sampler `{config.search.sampler}`"
              + (f", which learns task_arithmetic only: the other techniques with `{GRADIENT_FALLBACK}`"
                 if config.search.sampler == "adamerging" else "")
              + f", {config.search.layer_groups} layer groups), "
              f"over {seeds} seeds (mean ± std); `default` is the technique at its declared defaults, "
              "`sweep` the best point (on the search split) of a one-knob sweep of it run first, about a tenth of "
              "the budget (a global scale: one weight for all sources and layers, or lambda where weights are "
              "normalized; a density; slerp's t), `tuned` the best search trial, each scored on the held-out "
              "split.", "",
              *([f"With {len(config.objectives)} objectives, `tuned` is the Pareto-front trial with the best mean "
                 "of them on the search split, and a mean is the mean of the objectives (each a weighted mean of "
                 "its tasks, a lower-is-better metric negated).", ""] if len(config.objectives) > 1 else []),
              table, "", "![comparison](compare.png)", "",
              f"Sources: {', '.join(config.sources)}; tasks: {', '.join(tasks)}; "
              f"{seconds / 60:.1f} min in all. Regenerate: `evomerge compare {config.path} --seeds {seeds} "
              f"--budget {budget}`. Raw numbers: `compare.csv`; studies: `compare.db`.", ""]
    atomic_write_text(out / "report.md", "\n".join(report))


def _plot(path: Path, rows, tasks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    agg = aggregate(rows, tasks)
    techniques = sorted({e["technique"] for e in agg})
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(techniques)), 4))
    x = np.arange(len(techniques))
    kinds = [k for k in ("default", "sweep", "tuned") if any(e["kind"] == k for e in agg)]
    colors = {"default": "#bbbbbb", "sweep": "#ff7f0e", "tuned": "#1f77b4"}
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        means = [next((e["heldout_mean"][0] for e in agg if e["technique"] == t and e["kind"] == kind), np.nan)
                 for t in techniques]
        stds = [next((e["heldout_mean"][1] for e in agg if e["technique"] == t and e["kind"] == kind), np.nan)
                for t in techniques]
        ax.bar(x + (i - (len(kinds) - 1) / 2) * width, means, width, yerr=stds, capsize=4, label=kind,
               color=colors[kind])
    ax.set_xticks(x)
    ax.set_xticklabels(techniques, rotation=15)
    ax.set_ylabel("held-out objective (mean ± std over seeds)")
    ax.set_title("merge techniques: untuned defaults, a one-knob sweep, tuned by search")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    tmp = path.parent / f".{path.name}.partial.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def compare_command(args) -> int:
    result = compare(args.config, seeds=args.seeds, budget=args.budget, out=args.out, device=args.device)
    print(result.table)
    print(f"report: {result.out / 'report.md'}")
    return 0
