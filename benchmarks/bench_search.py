"""Sampler comparison on the demo search: best-so-far against trials, over several seeds.

For each sampler and seed, the demo config's search runs with that sampler (baselines off,
so every sampler starts from nothing; --baselines to enqueue them as a search does) on one resident workbench; the curve of the best
search-split objective so far, the held-out score of the best trial, and the number of
trials each sampler needs to reach 95 % of the best final score are written to
results/bench_search.md and results/bench_search.png.

    python benchmarks/bench_search.py [--config configs/demo.yaml] [--trials 100] [--seeds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

SAMPLERS = ("random", "tpe", "cmaes", "gp", "tpe+cmaes")


def run(config_path: Path, *, samplers: list[str], seeds: int, trials: int, workdir: Path,
        baselines: bool = False) -> dict:
    from evomerge.config import load_config
    from evomerge.export.run import heldout_scores
    from evomerge.search import SearchSession, Workbench

    base = load_config(config_path)
    bench = Workbench(base, device="cpu", progress=False)
    storage = f"sqlite:///{workdir / 'bench_search.db'}"
    curves: dict[str, list[list[float]]] = {}
    heldout: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    try:
        for sampler in samplers:
            for seed in range(seeds):
                search = base.search.model_copy(update={"sampler": sampler, "seed": seed, "n_trials": trials,
                                                        "baselines": baselines})
                if sampler == "cmaes" and len(search.methods) > 1:
                    search = search.model_copy(update={"methods": [search.methods[0]]})
                config = base.model_copy(update={"name": f"bench.{sampler}.{seed}.{time.time_ns()}",
                                                 "search": search})
                started = time.perf_counter()
                with SearchSession(config, storage_url=storage, device=None, progress=False, bench=bench) as s:
                    s.run(trials)
                    done = sorted((t for t in s.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                                  key=lambda t: t.number)
                    best, curve = float("-inf"), []
                    for t in done:
                        best = max(best, t.values[0])
                        curve.append(best)
                    top = max(done, key=lambda t: (t.values[0], -t.number))
                    weights = config.objectives[0]
                    scores = heldout_scores(s, top)
                    metric = {task: s.suite.primary_metric(task) for task in weights}
                    heldout.setdefault(sampler, []).append(
                        sum(w * scores[t][metric[t]] for t, w in weights.items()) / sum(weights.values()))
                curves.setdefault(sampler, []).append(curve)
                seconds.setdefault(sampler, []).append(time.perf_counter() - started)
                print(f"{sampler:10s} seed {seed}: best search {curve[-1]:.4f}, held-out {heldout[sampler][-1]:.4f}, "
                      f"{seconds[sampler][-1]:.0f} s", flush=True)
    finally:
        bench.close()
    return {"curves": curves, "heldout": heldout, "seconds": seconds, "config": base, "baselines": baselines}


def trials_to_reach(curve: list[float], target: float) -> int | None:
    for i, value in enumerate(curve):
        if value >= target:
            return i + 1
    return None


def report(result: dict, *, out: Path, trials: int, seeds: int, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves, heldout = result["curves"], result["heldout"]
    best_final = max(c[-1] for runs in curves.values() for c in runs)
    target = 0.95 * best_final
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rows = []
    for sampler, runs in curves.items():
        length = min(len(c) for c in runs)
        arr = np.array([c[:length] for c in runs])
        mean = arr.mean(axis=0)
        ax.plot(np.arange(1, length + 1), mean, label=sampler)
        ax.fill_between(np.arange(1, length + 1), arr.min(axis=0), arr.max(axis=0), alpha=0.15)
        reach = [trials_to_reach(c, target) for c in runs]
        reached = [r for r in reach if r is not None]
        rows.append((sampler, statistics.fmean(c[-1] for c in runs), statistics.fmean(heldout[sampler]),
                     statistics.pstdev(heldout[sampler]), reach, statistics.fmean(result["seconds"][sampler]),
                     statistics.median(reached) if reached else None))
    ax.axhline(target, ls=":", color="gray", label="95 % of best final")
    ax.set_xlabel("trial")
    ax.set_ylabel("best search objective so far (mean; band = min..max over seeds)")
    ax.set_title(f"samplers on {result['config'].name}: {seeds} seeds x {trials} trials")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out / "bench_search.png", dpi=110, bbox_inches="tight")
    lines = [
        "# Sampler comparison on the demo search", "",
        f"Config `{result['config'].path}` (methods {', '.join(result['config'].search.methods)}, "
        f"{result['config'].search.layer_groups} layer groups), {trials} trials per run, seeds 0..{seeds - 1}, "
        f"baselines {'on (as the demo runs)' if result['baselines'] else 'off'}; "
        "cmaes searches the config's first method only.", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; command: `{command}`", "",
        f"Target: 95 % of the best final search score of any run ({target:.4f}).", "",
        "| sampler | best search (mean) | best trial held-out (mean ± std) | trials to 95 % per seed (median) "
        "| seconds per run |",
        "|---|---|---|---|---|",
    ]
    for sampler, final, ho, ho_std, reach, secs, med in rows:
        reach_text = ", ".join("—" if r is None else str(r) for r in reach)
        lines.append(f"| {sampler} | {final:.4f} | {ho:.4f} ± {ho_std:.4f} | {reach_text} ({med if med else '—'}) "
                     f"| {secs:.0f} |")
    lines += ["", "![best so far](bench_search.png)", ""]
    (out / "bench_search.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    parser.add_argument("--baselines", action="store_true", help="enqueue the baselines first, as a search does")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from evomerge.demo import ensure_zoo

    ensure_zoo()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.config, samplers=args.samplers.split(","), seeds=args.seeds, trials=args.trials,
                     workdir=Path(tmp), baselines=args.baselines)
    args.out.mkdir(parents=True, exist_ok=True)
    report(result, out=args.out, trials=args.trials, seeds=args.seeds,
           command="python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]))
    print(f"wrote {args.out / 'bench_search.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
