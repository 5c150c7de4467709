"""The optimizers over a suite of merge problems: held-out of the best so far as a share of what is reachable.

A problem is a search config: the demo's zoo (configs/demo.yaml), its LoRA adapters (the same skills as
low-rank task vectors), and the suite's variants (`suite:K`, evomerge/zoo/variants.py: other depths, widths,
expert counts, tuned blocks, with and without an instruction stage, a conflicting pair), each built once and
cached. Every problem is searched as its config says (technique a search variable, baselines first), by each
optimizer and seed, on one resident workbench per problem. Per run: the held-out score of the best trial so far
(by the search split, as an export picks it) after 25, 50 and 100 trials, its wall time, and its time per trial
outside merging and scoring (the optimizer's own), split into the gradient learner's forward and backward passes
and the rest (sampling, storage, setup).

Each problem's **reference** is the best held-out any run found: the runs above and reference runs at
`--reference-factor` times the budget (`--reference` optimizers, one seed), so that a result reads as a share
of what is reachable. The best one-knob sweep (the cheap tuned baseline a user would try, picked on the search
split) is reported beside it. Written to results/bench_search.md and results/bench_search.png (`--name`: another
name, e.g. for problems kept out of tuning).

    python benchmarks/bench_search.py [--problems demo,lora,suite:1,...,configs/smol.yaml] --seeds 3 --trials 100 \\
        [--save runs.json] [--load a.json,b.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _harness import REPO, command, header, mean_std, std

OPTIMIZERS = ("auto", "tpe", "tpe+cmaes", "adamerging")
CHECKPOINTS = (25, 50, 100)
LORA_CONFIG = """name: lora
base: zoo/base
sources: [zoo/lora/inc, zoo/lora/rot, zoo/lora/mir]
search: {{methods: [task_arithmetic, ties, dare_ties], layer_groups: 2, n_trials: 100, seed: 0}}
tasks: {tasks}
objective: {{inc: 1.0, rot: 1.0, mir: 1.0}}
device: cpu
threads: 1
"""


def problem_config(name: str, workdir: Path) -> Path:
    """The search config of a problem: `demo`, `lora`, `suite:K`, or a config file's path."""
    if name == "demo":
        return REPO / "configs" / "demo.yaml"
    if name == "lora":
        path = workdir / "lora.yaml"
        path.write_text(LORA_CONFIG.format(tasks=REPO / "configs" / "tasks" / "zoo.yaml"))
        return path
    if name.startswith("suite:"):
        from evomerge.zoo.variants import suite_problem

        return suite_problem(int(name.split(":", 1)[1])) / "problem.yaml"
    return Path(name)


def run_problem(name: str, *, optimizers: list[str], seeds: int, trials: int, reference: list[str],
                factor: int, workdir: Path) -> dict:
    """Every optimizer and seed on one problem, then the reference runs; the measured runs."""
    from evomerge.config import load_config
    from evomerge.search import SearchSession
    from evomerge.workbench import Workbench

    base = load_config(problem_config(name, workdir))
    bench = Workbench(base, device="cpu", progress=False)
    bench.sampler_process().wait_ready()    # started here: its imports would count in the first run's time
    storage = f"sqlite:///{workdir / (name.replace(':', '-') + '.db')}"
    plan = [(o, s, trials) for o in optimizers for s in range(seeds)] + [(o, 0, factor * trials) for o in reference]
    runs: dict[str, list[dict]] = {}
    try:
        for optimizer, seed, budget in plan:
            search = base.search.model_copy(update={"sampler": optimizer, "seed": seed, "n_trials": budget})
            config = base.model_copy(update={"name": f"{optimizer}.{seed}.{budget}.{time.time_ns()}",
                                             "search": search})
            started = time.time()
            with SearchSession(config, storage_url=storage, device=None, progress=False, bench=bench) as session:
                session.run(budget)
                result = measure(session, seconds=time.time() - started)
            key = optimizer if budget == trials else f"{optimizer}@{budget}"
            runs.setdefault(key, []).append(result)
            print(f"{name:10s} {key:14s} seed {seed}: held-out {result['heldout']}, "
                  f"{result['seconds']:.0f} s", flush=True)
    finally:
        bench.close()
    return {"config": str(base.path), "runs": runs, "sources": len(base.sources),
            "methods": base.search.methods, "layer_groups": base.search.layer_groups}


def measure(session, *, seconds: float) -> dict:
    """One finished run: held-out of the best so far at each checkpoint and at the end, the best one-knob sweep's
    held-out (picked on the search split), and the time outside merging and scoring, per trial."""
    from evomerge.export.run import heldout_scores

    done = sorted((t for t in session.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                  key=lambda t: t.number)
    weights = session.config.objectives[0]
    metric = {task: session.suite.primary_metric(task) for task in weights}

    def heldout(trial) -> float:
        scores = heldout_scores(session, trial)
        return sum(w * scores[t][metric[t]] for t, w in weights.items()) / sum(weights.values())

    def best(trials):
        return max(trials, key=lambda t: (t.values[0], -t.number))

    at = {n: heldout(best([t for t in done if t.number < n])) for n in CHECKPOINTS if n <= len(done)}
    at["end"] = heldout(best(done))
    sweeps = [t for t in done if str(t.user_attrs.get("baseline", "")).startswith(("sweep:", "default:"))]
    inside = sum(t.user_attrs["seconds"]["merge"] + t.user_attrs["seconds"]["eval"] for t in done)
    steps = sum(t.user_attrs.get("gradient_seconds", 0.0) for t in done)   # the gradient learner's own passes
    return {"heldout": at, "sweep": heldout(best(sweeps)) if sweeps else None, "seconds": seconds,
            "overhead": (seconds - inside) / max(len(done), 1), "gradient_steps": steps / max(len(done), 1),
            "trials": len(done),
            "gradient": session.study.user_attrs.get("auto_gradient")}


def _stats(values: list[float | None], digits: int = 3) -> str:
    return mean_std([v for v in values if v is not None], digits)


def reference(problem: dict) -> float:
    """The best held-out any run of the problem found (reference runs included, and the reference an earlier
    report recorded for it: --references)."""
    found = max(r["heldout"]["end"] for rs in problem["runs"].values() for r in rs)
    return max(found, problem.get("recorded_reference", found))


def report(problems: dict[str, dict], *, out: Path, optimizers: list[str], seeds: int, trials: int,
           cmd: str, name: str = "bench_search", about: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = [n for n in CHECKPOINTS if n <= trials]
    names = list(problems)
    share = {o: {p: [r["heldout"].get(trials, r["heldout"]["end"]) / reference(problems[p])
                     for r in problems[p]["runs"].get(o, [])] for p in names} for o in optimizers}
    lines = [
        *header("The optimizers over a suite of merge problems", cmd=cmd), "", *([about, ""] if about else []),
        f"Each problem searched as its config says (the technique a search variable, baselines first), {trials} "
        f"trials per run, seeds 0..{seeds - 1}; held-out of the best trial so far (by the search split, as an "
        "export picks it), as a share of the problem's **reference**: the best held-out any run found, reference "
        "runs at several times the budget included. `sweep`: the best one-knob sweep or untuned merge among the "
        "baselines (picked on the search split), as a share of the reference too.", "",
        "## Share of the reference at " + f"{trials} trials (mean ± std over seeds)", "",
        "| problem | reference | sweep | " + " | ".join(optimizers) + " |",
        "|---|---|---|" + "---|" * len(optimizers)]
    for p in names:
        ref = reference(problems[p])
        sweep = [r["sweep"] / ref for rs in problems[p]["runs"].values() for r in rs[:1] if r["sweep"] is not None]
        lines.append(f"| {p} | {ref:.3f} | {_stats(sweep[:1])} | "
                     + " | ".join(_stats(share[o][p]) for o in optimizers) + " |")
    means = {o: [statistics.fmean(v) for v in share[o].values() if v] for o in optimizers}
    lines.append("| **mean over problems** | | | " + " | ".join(
        f"**{statistics.fmean(means[o]):.3f}** (min {min(means[o]):.3f})" if means[o] else "—" for o in optimizers)
        + " |")
    lines += ["", "## Share of the reference by trials (mean over problems and seeds)", "",
              "| optimizer | " + " | ".join(f"at {n}" for n in points) + " | seconds per run | "
              "ms per trial outside merge and scoring | of which gradient steps | of which the rest (sampler, "
              "storage, setup) |", "|---|" + "---|" * (len(points) + 4)]
    for o in optimizers:
        by_n = []
        for n in points:
            vals = [r["heldout"][n] / reference(problems[p]) for p in names for r in problems[p]["runs"].get(o, [])
                    if n in r["heldout"]]
            by_n.append(_stats(vals))
        rs = [r for p in names for r in problems[p]["runs"].get(o, [])]
        outside = [1000 * r["overhead"] for r in rs]
        steps = [1000 * r["gradient_steps"] if "gradient_steps" in r else None for r in rs]   # None: saved before
        rest = [x - s if s is not None else None for x, s in zip(outside, steps)]            # it was measured
        lines.append(f"| {o} | " + " | ".join(by_n) + f" | {_stats([r['seconds'] for r in rs])} | "
                     f"{_stats(outside, 1)} | {_stats(steps, 1)} | {_stats(rest, 1)} |")
    gradient = [(p, r["gradient"]) for p in names for r in problems[p]["runs"].get("auto", []) if r.get("gradient")]
    if gradient:
        lines += ["", "## auto's gradient arm, per run", "", "| problem | state | trials | why |", "|---|---|---|---|"]
        lines += [f"| {p} | {g['state']} | {g.get('trials', '—')} | {g.get('why', '')} |" for p, g in gradient]
    lines += ["", "## Problems", "", "| problem | config | sources | methods | layer groups |", "|---|---|---|---|---|"]
    for p in names:
        info = problems[p]
        lines.append(f"| {p} | `{_shown(info['config'])}` | {info['sources']} | {', '.join(info['methods'])} | "
                     f"{info['layer_groups']} |")
    lines += ["", f"![share of the reference per problem]({name}.png)", ""]
    (out / f"{name}.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4.5))
    width = 0.8 / len(optimizers)
    for i, o in enumerate(optimizers):
        x = np.arange(len(names)) + (i - len(optimizers) / 2 + 0.5) * width
        ax.bar(x, [statistics.fmean(share[o][p]) if share[o][p] else 0 for p in names], width,
               yerr=[std(share[o][p]) for p in names],
               capsize=2, label=o)
    ax.axhline(0.95, ls=":", color="gray", label="0.95 of the reference")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"held-out at {trials} trials / reference")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=len(optimizers) + 1, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")


def _shown(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="demo,lora," + ",".join(f"suite:{k}" for k in range(1, 9)),
                        help="comma-separated: demo, lora, suite:K (a zoo variant, evomerge/zoo/variants.py), or a "
                             "config file's path")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--reference", default="auto,tpe+cmaes", help="optimizers run once at the larger budget")
    parser.add_argument("--reference-factor", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "results")
    parser.add_argument("--name", default="bench_search", help="the report's file name in --out, without .md / .png")
    parser.add_argument("--about", default="", help="a paragraph on what these problems are, after the header")
    parser.add_argument("--save", type=Path, help="also write the measured runs to this JSON file")
    parser.add_argument("--load", help="report from runs saved with --save (comma-separated; a later file's runs "
                                       "of an optimizer replace an earlier's, which are kept as '<optimizer> "
                                       "before', a column where --optimizers lists it), running nothing")
    parser.add_argument("--references", type=Path,
                        help="a JSON file of {problem: held-out}: references earlier reports found (at several times "
                             "the budget), which a problem's reference is at least, for a report without reference "
                             "runs (e.g. results/bench_search-references.json)")
    parser.add_argument("--workdir", type=Path, help="keep the studies (one SQLite file per problem) in this folder "
                                                     "to look into afterwards (default: a temporary one)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ran = command(argv)
    optimizers = args.optimizers.split(",")
    if args.load:
        saved = [json.loads(Path(p).read_text()) for p in args.load.split(",")]
        problems = {}
        for one in saved:   # a later file's runs of an optimizer on a problem replace an earlier file's, which
            for name, problem in one["problems"].items():   # stay as "<optimizer> before" (in the reference)
                if name in problems:
                    earlier = problems[name]["runs"]
                    runs = {**earlier, **{f"{o} before": earlier[o] for o in problem["runs"] if o in earlier}}
                    problem = {**problem, "runs": {**runs, **problem["runs"]}}
                problems[name] = problem
        for one in saved:
            for p in one["problems"].values():
                for rs in p["runs"].values():
                    for r in rs:
                        r["heldout"] = {(int(k) if k.isdigit() else k): v for k, v in r["heldout"].items()}
        ran = " && ".join([one["command"] for one in saved] + [ran])
    else:
        from evomerge.demo import ensure_zoo

        ensure_zoo()
        problems = {}
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for name in args.problems.split(","):
                problems[name] = run_problem(name, optimizers=optimizers, seeds=args.seeds, trials=args.trials,
                                             reference=[r for r in args.reference.split(",") if r],
                                             factor=args.reference_factor, workdir=workdir)
                if args.save:    # after each problem: a long run keeps what it has measured
                    args.save.write_text(json.dumps({"problems": problems, "command": ran}))
    if args.references:
        for name, value in json.loads(args.references.read_text()).items():
            if name in problems:
                problems[name]["recorded_reference"] = value
    args.out.mkdir(parents=True, exist_ok=True)
    report(problems, out=args.out, optimizers=optimizers, seeds=args.seeds, trials=args.trials, cmd=ran,
           name=args.name, about=args.about)
    print(f"wrote {args.out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
