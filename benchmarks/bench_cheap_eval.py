"""Cheap evaluation (search.evaluation): how well each estimator predicts a candidate's full search-split score
from a fifth of its rows, side by side: a plain random subsample (`mean`), anchor rows (`anchors`), IRT (`irt`).

Per problem (a search config, or `suite:K`): its baselines (each source alone, each technique at its defaults,
the one-knob sweeps: what a study scores in full before it estimates), then `--candidates` trials of a TPE search
after them, then `--candidates` uniformly random candidates of its search space (both seeded), all scored on
every search row once, and cached. Each estimator is fitted on the baselines' per-row results, as a study fits
it, and estimates every candidate from its rows at `--rows`. Reported per kind of candidate: the mean absolute
error of the estimated objective against the full one, the worst, the bias, the Spearman correlation, and the
error per task. Written to results/cheap_eval.md.

    python benchmarks/bench_cheap_eval.py --problems configs/demo.yaml,suite:1,configs/smol.yaml@20/0 \\
        --candidates 100 --rows 0.2 [--workdir /tmp/evomerge-cheap]     (PROBLEM@R/S: R random, S TPE candidates)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _harness import REPO, command, header

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def score_problem(config_path: Path, *, candidates: int, searched: int, seed: int, cache: Path) -> dict:
    """Per-row search-split results of the problem's baselines and random candidates (cached as JSON; a run cut
    short leaves what it scored in the cache's .partial.json: rename it to the cache's name to report on it)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    partial = cache.with_suffix(".partial.json")
    import optuna

    from evomerge.config import load_config
    from evomerge.search import SearchSession
    from evomerge.workbench import Workbench

    config = load_config(config_path)
    config = config.model_copy(update={"search": config.search.model_copy(update={"seed": seed})})
    bench = Workbench(config, device="cpu", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        session = SearchSession(config, storage_url=f"sqlite:///{tmp}/study.db", device="cpu", progress=False,
                                bench=bench)
        baselines = session.baselines()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        out = {"config": str(config_path), "objective": config.objectives[0], "points": []}
        started = time.perf_counter()

        def score(label: str, trial) -> float:
            method = session.space.suggest(trial)
            bench.materialize(session.space.decode(trial.params, method=method))
            result = bench.evaluator.evaluate("search")
            out["points"].append({"label": label, "method": method,
                                  "rows": {t: result.examples[t][result.primary_metrics[t]] for t in result.tasks}})
            out["minimized"] = sorted(result.minimized)
            partial.write_text(json.dumps(out))      # what is scored so far, if the run is cut short
            print(f"{config_path.name}: {len(out['points'])}/{len(baselines) + candidates + searched} scored, "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            return result.objective(config.objectives[0])

        # a search's own candidates: TPE after the baselines, every trial scored in full
        tpe = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="maximize")
        for label, params in baselines:
            tpe.enqueue_trial(params, user_attrs={"baseline": label})
        for i in range(len(baselines) + searched):
            trial = tpe.ask()
            label = trial.user_attrs.get("baseline") or f"search:{i - len(baselines)}"
            tpe.tell(trial, score(label, trial))
        uniform = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
        for i in range(candidates):
            trial = uniform.ask()
            uniform.tell(trial, score(f"random:{i}", trial))
        out["seconds"] = time.perf_counter() - started
    bench.close()
    cache.write_text(json.dumps(out))
    partial.unlink(missing_ok=True)
    return out


def measure(data: dict, *, rows: float, seed: int, kind_of_candidate: str) -> dict[str, dict]:
    """Each estimator's error on the candidates of one kind (random: or search:), fitted on the baselines
    (what a study scores in full: at least its first MIN_FIT trials)."""
    from evomerge.cheap import MIN_FIT
    from evomerge.evaluate.estimate import ESTIMATORS, fit_task, rows_to_score
    from evomerge.evaluate.result import objective_value

    objective = data["objective"]
    minimized = frozenset(data.get("minimized", ()))
    base = [p for p in data["points"] if ":" in p["label"] and p["label"].split(":")[0] not in ("random", "search")]
    searched = [p for p in data["points"] if p["label"].startswith("search:")]
    base += searched[:max(0, MIN_FIT - len(base))]
    cands = [p for p in data["points"] if p["label"].startswith(kind_of_candidate) and p not in base]
    tasks = list(data["points"][0]["rows"])
    report = {}
    for kind in ESTIMATORS:
        started = time.perf_counter()
        fitted = {t: fit_task(kind, [p["rows"][t] for p in base], rows_to_score(rows, len(base[0]["rows"][t])),
                              seed=seed, key=t) for t in tasks}
        fit_s = time.perf_counter() - started
        full, est, per_task = [], [], {t: [] for t in tasks}
        for p in cands:
            truth = {t: sum(p["rows"][t]) / len(p["rows"][t]) for t in tasks}
            guess = {t: fitted[t].estimate([p["rows"][t][i] for i in fitted[t].rows]) for t in tasks}
            for t in tasks:
                per_task[t].append(abs(guess[t] - truth[t]))
            full.append(objective_value(truth, objective, minimized))
            est.append(objective_value(guess, objective, minimized))
        errors = [abs(a - b) for a, b in zip(full, est)]
        report[kind] = {"mae": sum(errors) / len(errors), "max": max(errors), "spearman": spearman(full, est),
                        "bias": sum(b - a for a, b in zip(full, est)) / len(full),
                        "tasks": {t: sum(v) / len(v) for t, v in per_task.items()}, "fit_s": fit_s,
                        "scored": sum(len(f.rows) for f in fitted.values()),
                        "total": sum(f.n for f in fitted.values())}
    return report


def end_to_end(problem: str, *, seed: int, trials: int, rows: float, estimator: str, workdir: Path,
               equal_time: str = "ratio") -> dict:
    """Three searches of a problem: every row scored, cheap evaluation at the same trials, and cheap evaluation
    at about the first one's wall time. Each: the exported model's held-out and search scores, the search's wall
    time, and evaluation seconds per trial (a cheap search's include its finalists' re-scoring).

    The third search's trials (`equal_time`): "ratio", trials × full wall ÷ cheap wall; "marginal", trials plus
    the wall time the cheap search has left (full wall − cheap wall) over its own seconds per trial of the
    technique arms (its trials after the baselines and the gradient arm's, which are what more trials add).
    "ratio" undercounts where part of a search's time does not shrink with cheap evaluation (the baselines,
    scored on every row; auto's gradient steps).

    The wall time is read from the study: its first trial's start to its last trial's end, plus the finalists'
    re-scoring; loading the models and the export's held-out scoring, the same for all three, are left out. So a
    search that finished in `workdir` before (an interrupted benchmark's, or a run copied there) is resumed with
    nothing left to do and keeps its own time. A search stopped midway would count its pause: remove its folder."""
    from evomerge.config import EvaluationOptions, load_config

    config = load_config(problem_config(problem))
    runs = {}

    def run(label: str, n: int, evaluation: EvaluationOptions) -> dict:
        import optuna
        import torch

        from evomerge.auto import is_gradient_trial
        from evomerge.cheap import FULL_ATTR
        from evomerge.search import search

        torch.set_num_threads(config.threads or os.cpu_count())   # (an earlier problem's `threads: 1` stays set)
        section = config.search.model_copy(update={"seed": seed, "n_trials": n, "evaluation": evaluation})
        out = workdir / f"e2e-{problem.replace('/', '_').replace(':', '')}-{seed}-{label}"
        result = search(config.model_copy(update={"search": section}), out=out, progress=False)
        study = optuna.load_study(study_name=result.study_name, storage=result.storage)
        done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
        finalists = sum(v.get("seconds", 0.0) for k, v in study.user_attrs.items() if k.startswith(FULL_ATTR))
        def span(trials) -> float:     # the first one's start to the last one's end
            return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()

        wall = span(done) + finalists
        evals = sum(t.user_attrs.get("seconds", {}).get("eval", 0.0) for t in done) + finalists
        late = [t.user_attrs["seconds"]["eval"] for t in done if "baseline" not in t.user_attrs]
        arms = [t for t in done if "baseline" not in t.user_attrs and not is_gradient_trial(t)]
        arm_wall = span(arms) if arms else wall
        best, kept = result.summary["best"], result.summary["kept"]
        return {"heldout": best["heldout_mean"], "search": best["search_mean"], "wall": wall, "trials": len(done),
                "arm_seconds_per_trial": arm_wall / max(len(arms), 1),
                "kept": sum(kept.values()) / len(kept) if kept else float("nan"),
                "eval_per_trial": evals / len(done), "eval_after_baselines": sum(late) / max(len(late), 1)}

    runs["full"] = run("full", trials, EvaluationOptions())
    cheap = EvaluationOptions(rows=rows, estimator=estimator)
    runs["cheap"] = run("cheap", trials, cheap)
    if equal_time == "ratio":
        equal = max(trials, round(trials * runs["full"]["wall"] / runs["cheap"]["wall"]))
    else:
        left = runs["full"]["wall"] - runs["cheap"]["wall"]
        equal = max(trials, trials + round(left / runs["cheap"]["arm_seconds_per_trial"]))
    runs["cheap_equal_time"] = run("cheap-equal", equal, cheap)
    return runs


def eval_seconds(config_path: Path, data: dict, *, rows: float, estimator: str, seed: int) -> tuple[float, float]:
    """Seconds to score the untuned task_arithmetic merge (the first method's default) on every search row, and
    on the rows the estimator fitted on the baselines picks: each the mean of two runs after a first one."""
    from evomerge.config import load_config
    from evomerge.evaluate.estimate import fit_task, rows_to_score
    from evomerge.search import SearchSession
    from evomerge.workbench import Workbench

    config = load_config(config_path)
    base = [p for p in data["points"] if p["label"].split(":")[0] not in ("random", "search")]
    picked = {t: list(fit_task(estimator, [p["rows"][t] for p in base], rows_to_score(rows, len(base[0]["rows"][t])),
                               seed=seed, key=t).rows) for t in base[0]["rows"]}
    import torch

    torch.set_num_threads(config.threads or os.cpu_count())   # (an earlier problem's `threads: 1` stays set)
    bench = Workbench(config, device="cpu", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        session = SearchSession(config, storage_url=f"sqlite:///{tmp}/study.db", device="cpu", progress=False,
                                bench=bench)
        method = session.space.methods[0]
        bench.materialize(session.space.decode(session.space.defaults(method), method=method))
        seconds = {"full": 0.0, "part": 0.0}
        for run in range(3):          # the first builds each plan's batches: not timed
            for kind, subset in (("full", None), ("part", picked)):
                started = time.perf_counter()
                bench.evaluator.evaluate("search", rows=subset)
                seconds[kind] += (time.perf_counter() - started) / 2 if run else 0.0
    bench.close()
    return seconds["full"], seconds["part"]


def problem_config(name: str) -> Path:
    """A problem's search config: a path, or `suite:K` (a suite variant, built once and cached)."""
    if name.startswith("suite:"):
        from evomerge.zoo.variants import suite_problem

        return suite_problem(int(name.split(":", 1)[1])) / "problem.yaml"
    return Path(name) if Path(name).is_absolute() else REPO / name


def end_to_end_section(args, workdir: Path) -> list[str]:
    lines = ["## End to end", "",
             f"Each problem searched as its config says, {args.trials} trials, seeds 0-{args.seeds - 1}: every row "
             f"scored (full), cheap evaluation (`rows: {args.rows}`, `estimator: {args.estimator}`, 5 finalists) at "
             "the same trials, and cheap evaluation at about the full search's wall time (more trials: "
             + ("trials × full wall ÷ cheap wall" if args.equal_time == "ratio" else "trials + (full wall − cheap "
                "wall) ÷ the cheap search's seconds per trial after the baselines and the gradient arm")
             + "). Held-out: "
             "the exported model's. Evaluation per trial: all evaluation seconds of the study (a cheap one's "
             "finalists included) over its trials; after the baselines: the mean of the trials that are not "
             "baselines. Wall: the study's, its first trial's start to its last trial's end plus the finalists' "
             "re-scoring (model loading and the export are left out). Skills kept: per task the exported model's "
             "held-out over the best source's (where a source scores above 0), the mean over the tasks, as "
             f"summary.md gives it. Command: `{command()}`.", "",
             "| problem | seed | held-out full | held-out cheap | Δ | eval/trial cheap ÷ full (after baselines) | "
             "trials at equal time | held-out cheap, equal time | wall full / cheap-equal (s) | "
             "skills kept full / cheap / cheap equal time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for problem in args.search_problems.split(","):
        for seed in range(args.seeds):
            r = end_to_end(problem, seed=seed, trials=args.trials, rows=args.rows, estimator=args.estimator,
                           workdir=workdir, equal_time=args.equal_time)
            full, cheap, equal = r["full"], r["cheap"], r["cheap_equal_time"]
            lines.append(f"| {problem} | {seed} | {full['heldout']:.4f} | {cheap['heldout']:.4f} | "
                         f"{cheap['heldout'] - full['heldout']:+.4f} | "
                         f"{cheap['eval_per_trial'] / full['eval_per_trial']:.2f} "
                         f"({cheap['eval_after_baselines'] / full['eval_after_baselines']:.2f}) | {equal['trials']} | "
                         f"{equal['heldout']:.4f} | {full['wall']:.0f} / {equal['wall']:.0f} | "
                         f"{full['kept']:.3f} / {cheap['kept']:.3f} / {equal['kept']:.3f} |")
            print(lines[-1], flush=True)
    return lines + [""]


def overview(summary: list[tuple[str, str, str, dict]]) -> list[str]:
    """Per estimator and kind of candidate: the mean over the problems, and the problems that meet the targets
    (MAE <= 0.02, Spearman >= 0.9)."""
    lines = ["## Over the problems", "", "| candidates | estimator | mean MAE | mean Spearman | problems within "
             "MAE 0.02 and Spearman 0.9 |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((name, kind) for _, name, kind, _ in summary))
    for name, kind in keys:
        rs = [r for _, n, k, r in summary if (n, k) == (name, kind)]
        ok = sum(1 for r in rs if r["mae"] <= 0.02 and r["spearman"] >= 0.9)
        lines.append(f"| {name} | {kind} | {sum(r['mae'] for r in rs) / len(rs):.4f} | "
                     f"{sum(r['spearman'] for r in rs) / len(rs):.3f} | {ok} of {len(rs)} |")
    return lines + [""]


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="configs/demo.yaml")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--search-candidates", type=int, default=None, help="TPE's (default: --candidates)")
    parser.add_argument("--rows", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "evomerge-cheap"))
    parser.add_argument("--out", default=str(REPO / "results" / "cheap_eval.md"))
    parser.add_argument("--search-problems", default="", help="end to end: these problems searched three ways")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--estimator", default="mean")
    parser.add_argument("--equal-time", choices=("ratio", "marginal"), default="ratio",
                        help="the trials of the equal-time cheap search: from the ratio of the two walls, or from "
                             "the full search's wall left over the cheap search's seconds per technique-arm trial")
    parser.add_argument("--timing", action="store_true", help="also time scoring every row against the picked ones")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [*header("Cheap evaluation: the estimators side by side"), "",
             "Each estimator is fitted on the problem's baselines (scored on every search row, as a study scores "
             "them) and estimates each candidate from the rows it picks: uniformly random candidates of the search "
             "space, and the trials of a TPE search after the baselines (what a search scores). "
             "Error = |estimated objective − full search-split objective|.", ""]
    overview_at = len(lines)
    summary: list[tuple[str, str, str, dict]] = []
    for entry in args.problems.split(","):     # PROBLEM or PROBLEM@RANDOM/SEARCHED (candidates of each kind)
        problem, _, counts = entry.partition("@")
        path = problem_config(problem)
        searched = args.candidates if args.search_candidates is None else args.search_candidates
        candidates = args.candidates
        if counts:
            candidates, searched = (int(c) for c in counts.split("/"))
        cache = workdir / f"{problem.replace('/', '_').replace(':', '')}-{args.seed}-{candidates}-{searched}.json"
        data = score_problem(path, candidates=candidates, searched=searched, seed=args.seed, cache=cache)
        n_base = sum(1 for p in data["points"] if p["label"].split(":")[0] not in ("random", "search"))
        lines += [f"## {problem}", "", f"{n_base} baselines; scoring them and {candidates + searched} "
                  f"candidates in full took {data['seconds']:.0f} s.", "",
                  "| candidates | estimator | rows scored | MAE | max error | bias | Spearman | fit (s) | "
                  "MAE per task |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for kind_of_candidate, name in (("random:", "random"), ("search:", "TPE's"))[:2 if searched else 1]:
            report = measure(data, rows=args.rows, seed=args.seed, kind_of_candidate=kind_of_candidate)
            for kind, r in report.items():
                per_task = ", ".join(f"{t} {v:.3f}" for t, v in r["tasks"].items())
                lines.append(f"| {name} | {kind} | {r['scored']} of {r['total']} | {r['mae']:.4f} | {r['max']:.4f} | "
                             f"{r['bias']:+.4f} | {r['spearman']:.3f} | {r['fit_s']:.2f} | {per_task} |")
                summary.append((problem, name, kind, r))
        if args.timing:
            full_s, part_s = eval_seconds(path, data, rows=args.rows, estimator=args.estimator, seed=args.seed)
            lines += ["", "Evaluation time, the first technique's untuned merge (two runs after a first): every "
                          f"search row {full_s:.2f} s, the rows `{args.estimator}` picks at `rows: {args.rows}` "
                          f"{part_s:.2f} s ({part_s / full_s:.2f}×)."]
        lines.append("")
    lines[overview_at:overview_at] = overview(summary)
    if args.search_problems:
        lines += end_to_end_section(args, workdir)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
