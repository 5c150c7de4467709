"""Sampler comparison on a search config: held-out of the best so far, trials to beat the baselines, wall time.

For each sampler (and the gradient optimizer, `adamerging`) and seed, the config's search runs on one resident
workbench with its baselines queued first, as a search does (--no-baselines: every sampler starts from
nothing). Per run: the held-out score of the best trial so far after 25, 50, 100 and 200 trials (the best by
the search split, as the export picks it), the number of trials after the baselines until one beats the best
baseline on the search split, and the best search objective against wall-clock seconds, for a comparison at
equal wall time. Written to results/bench_search.md and results/bench_search.png.

    python benchmarks/bench_search.py [--config configs/demo.yaml] [--trials 200] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from machine import describe  # benchmarks/machine.py: run as a script, this folder is on sys.path

SAMPLERS = ("random", "tpe", "cmaes", "gp", "tpe+cmaes", "adamerging")
CHECKPOINTS = (25, 50, 100, 200)


def run(config_path: Path, *, samplers: list[str], seeds: int, trials: int, workdir: Path,
        baselines: bool = True) -> dict:
    from evomerge.config import load_config
    from evomerge.search import SearchSession, Workbench

    base = load_config(config_path)
    bench = Workbench(base, device="cpu", progress=False)
    storage = f"sqlite:///{workdir / 'bench_search.db'}"
    runs: dict[str, list[dict]] = {}
    try:
        for sampler in samplers:
            for seed in range(seeds):
                search = base.search.model_copy(update={"sampler": sampler, "seed": seed, "n_trials": trials,
                                                        "baselines": baselines})
                if sampler == "cmaes" and len(search.methods) > 1:
                    search = search.model_copy(update={"methods": [search.methods[0]]})
                config = base.model_copy(update={"name": f"bench.{sampler}.{seed}.{time.time_ns()}",
                                                 "search": search})
                started = time.time()
                with SearchSession(config, storage_url=storage, device=None, progress=False, bench=bench) as s:
                    s.run(trials)
                    seconds = time.time() - started
                    runs.setdefault(sampler, []).append(measure(s, started=started, seconds=seconds))
                last = runs[sampler][-1]
                print(f"{sampler:10s} seed {seed}: held-out {last['heldout']}, beats baselines after "
                      f"{last['beat']}, {seconds:.0f} s", flush=True)
    finally:
        bench.close()
    return {"runs": runs, "config": base, "baselines": baselines, "trials": trials}


def measure(session, *, started: float, seconds: float) -> dict:
    """One finished run: best-so-far curves by trial and by second, held-out of the best at each checkpoint,
    trials after the baselines to beat the best of them."""
    from evomerge.export.run import heldout_scores

    done = sorted((t for t in session.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                  key=lambda t: t.number)
    weights = session.config.objectives[0]
    metric = {task: session.suite.primary_metric(task) for task in weights}

    def heldout(trial) -> float:
        scores = heldout_scores(session, trial)
        return sum(w * scores[t][metric[t]] for t, w in weights.items()) / sum(weights.values())

    curve, clock, best = [], [], None
    for t in done:
        if best is None or t.values[0] > best.values[0]:
            best = t
        curve.append(best.values[0])
        clock.append((t.datetime_complete.timestamp() - started, best.values[0]))
    at = {}
    for n in CHECKPOINTS:
        first = [t for t in done if t.number < n]
        if first and n <= len(done):
            at[n] = heldout(max(first, key=lambda t: (t.values[0], -t.number)))
    base = [t for t in done if "baseline" in t.user_attrs]
    beat = None
    if base:
        bar = max(t.values[0] for t in base)
        after = [t for t in done if "baseline" not in t.user_attrs]
        beat = next((i + 1 for i, t in enumerate(after) if t.values[0] > bar), None)
    return {"curve": curve, "clock": clock, "heldout": at, "beat": beat, "seconds": seconds,
            "baseline_heldout": heldout(max(base, key=lambda t: (t.values[0], -t.number))) if base else None}


def best_by(clock: list[tuple[float, float]], seconds: float) -> float | None:
    """The best search objective found within `seconds` of the run's start."""
    found = [value for t, value in clock if t <= seconds]
    return found[-1] if found else None


def _shown(path: Path | None) -> str:
    """A path inside the repository as relative to it."""
    root = Path(__file__).resolve().parents[1]
    return str(path.resolve().relative_to(root)) if path and path.resolve().is_relative_to(root) else str(path)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"


def report(result: dict, *, out: Path, seeds: int, command: str, name: str = "bench_search") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs, trials = result["runs"], result["trials"]
    points = [n for n in CHECKPOINTS if n <= trials]
    equal = min(statistics.fmean(r["seconds"] for r in rs) for rs in runs.values())   # every sampler had this long
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(runs)
    rows = []
    for i, (sampler, rs) in enumerate(runs.items()):
        means = [statistics.fmean(r["heldout"][n] for r in rs if n in r["heldout"]) for n in points]
        stds = [statistics.pstdev([r["heldout"][n] for r in rs if n in r["heldout"]]) for n in points]
        left.errorbar(np.arange(len(points)) + (i - len(runs) / 2 + 0.5) * width, means, yerr=stds, fmt="o",
                      capsize=3, label=sampler)
        grid = np.linspace(0, max(r["seconds"] for r in rs), 200)
        curves = np.array([[best_by(r["clock"], g) for g in grid] for r in rs], dtype=float)   # None: NaN
        with warnings.catch_warnings():    # before a run's first trial: no best yet (NaN)
            warnings.simplefilter("ignore", RuntimeWarning)
            line, = right.plot(grid, np.nanmean(curves, axis=0), label=sampler)
            right.fill_between(grid, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0), alpha=0.12,
                               color=line.get_color())
        at_equal = [best_by(r["clock"], equal) for r in rs]
        rows.append((sampler, [[r["heldout"][n] for r in rs if n in r["heldout"]] for n in points],
                     [r["beat"] for r in rs], [v for v in at_equal if v is not None],
                     statistics.fmean(r["seconds"] for r in rs)))
    baseline = [r["baseline_heldout"] for rs in runs.values() for r in rs if r["baseline_heldout"] is not None]
    if baseline:
        left.axhline(statistics.fmean(baseline), ls=":", color="gray", label="best baseline")
    left.set_xticks(range(len(points)), [str(n) for n in points])
    left.set_xlabel("trials")
    left.set_ylabel("held-out of the best trial so far (mean ± std over seeds)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.axvline(equal, ls=":", color="gray", label=f"equal wall time ({equal:.0f} s)")
    right.set_xlabel("seconds since the run started")
    right.set_ylabel("best search objective so far (mean; band min..max)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(f"{result['config'].name}: {seeds} seeds x {trials} trials per sampler")
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    config = result["config"]
    warm = ("" if result.get("warm", True)
            else ", the samplers without their warm start (--no-warm-start; sampled inline)")
    lines = [
        "# Samplers and the gradient optimizer on one search", "",
        f"Config `{_shown(config.path)}` (methods {', '.join(config.search.methods)}, "
        f"{config.search.layer_groups} layer groups), {trials} trials per run, seeds 0..{seeds - 1}, baselines "
        f"{'on, as a search runs' if result['baselines'] else 'off'}{warm}; cmaes searches the config's first "
        "method only; adamerging learns task_arithmetic weights by gradient descent (evomerge/gradient.py).", "",
        f"Machine: {describe()}; {time.strftime('%Y-%m-%d %H:%M')}; command: `{command}` (runs saved by "
        "`--save` in separate processes ran at once, one per core, each on one thread)", "",
        "Held-out: of the best trial so far by the search split (the one an export at that point would pick); "
        "mean ± std over seeds. Beats the baselines: trials after the baselines until one scores above the best "
        f"of them on the search split, per seed. Equal wall time: the best search objective each run had "
        f"found {equal:.0f} s after it started (the shortest sampler's mean run).", "",
        f"Best baseline (by the search split), held-out: {_mean_std(baseline)}.", "",
        "| sampler | " + " | ".join(f"held-out at {n}" for n in points)
        + " | beats the baselines after (per seed) | search objective at equal wall time | seconds per run |",
        "|---|" + "---|" * len(points) + "---|---|---|",
    ]
    for sampler, at, beat, at_equal, secs in rows:
        beat_text = ", ".join("—" if b is None else str(b) for b in beat)
        lines.append(f"| {sampler} | " + " | ".join(_mean_std(v) for v in at)
                     + f" | {beat_text} | {_mean_std(at_equal)} | {secs:.0f} |")
    lines += ["", f"![held-out by trials, best by seconds]({name}.png)", ""]
    (out / f"{name}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    parser.add_argument("--name", default="bench_search", help="the report's file name (NAME.md, NAME.png)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="start every sampler from nothing (by default the baselines run first, as in a search)")
    parser.add_argument("--no-warm-start", dest="warm", action="store_false",
                        help="the samplers without their warm start (for measuring it): nothing sampled around "
                             "the best baseline, CMA-ES from the ranges' centres")
    parser.add_argument("--save", type=Path, help="also write the measured runs to this JSON file")
    parser.add_argument("--load", help="report from runs saved with --save (comma-separated files, e.g. one per "
                                       "core, each run with its own --samplers), running nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    if args.load:
        result = load([Path(p) for p in args.load.split(",")])
        command = " && ".join(result.pop("commands") + [command])
    else:
        from evomerge.demo import ensure_zoo

        if not args.warm:
            import evomerge.samplers

            evomerge.samplers.anchor = lambda study, trial_number: None   # no baseline to start from
            os.environ["EVOMERGE_SAMPLE_INLINE"] = "1"    # in this process, where the patch holds

        ensure_zoo()
        with tempfile.TemporaryDirectory() as tmp:
            result = run(args.config, samplers=args.samplers.split(","), seeds=args.seeds, trials=args.trials,
                         workdir=Path(tmp), baselines=args.baselines)
        result["warm"] = args.warm
        if args.save:
            args.save.write_text(json.dumps({**result, "config": str(args.config.resolve()), "command": command,
                                             "seeds": args.seeds, "warm": args.warm}))
            print(f"wrote {args.save}")
    args.out.mkdir(parents=True, exist_ok=True)
    report(result, out=args.out, seeds=result.pop("seeds", args.seeds), command=command, name=args.name)
    print(f"wrote {args.out / (args.name + '.md')}")
    return 0


def load(paths: list[Path]) -> dict:
    """Saved runs (--save) of one config, merged: the samplers of each file, in file order."""
    from evomerge.config import load_config

    saved = [json.loads(p.read_text()) for p in paths]
    runs: dict[str, list[dict]] = {}
    for one in saved:
        for sampler, rs in one["runs"].items():
            runs[sampler] = [{**r, "heldout": {int(k): v for k, v in r["heldout"].items()}} for r in rs]
    first = saved[0]
    return {"runs": runs, "config": load_config(first["config"]), "baselines": first["baselines"],
            "trials": first["trials"], "seeds": first["seeds"], "warm": first.get("warm", True),
            "commands": [one["command"] for one in saved]}


if __name__ == "__main__":
    raise SystemExit(main())
