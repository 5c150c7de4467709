"""The LoraHub experiment, small (issue 19): compose a library of LoRA adapters for a task none was trained on.

The zoo's adapter library (`evomerge zoo build` writes ZOO/lora/<skill>/: one PEFT LoRA adapter per skill,
trained over ZOO/base) and its composed task inc_rot (digits and letters in one input: inc's and rot's skills
at once), which no adapter was trained on. Each search sees at most `--examples` rows of inc_rot (a seeded
subsample of its search split, another per seed) and is scored on inc_rot's whole held-out split.

Arms, at one budget of trials each (baselines included), over `--seeds` seeds:
- LoraHub's setting (Huang et al. 2023): CMA-ES over one weight per adapter in [-1.5, 1.5], λ = 1 (LoraHub
  weighs the A and B factors themselves; here the weights scale each adapter's product B·A, task arithmetic),
  and the same in evomerge's weight range [0, 1.5];
- evomerge: a weight per adapter and per layer group (and per module kind: attention, MLP) with the samplers
  `--samplers` (tpe+cmaes, adamerging);
and, from the same searches, what a user would try by hand: every adapter alone (its own `source:` baseline;
the best single adapter is the one best on the search examples) and the uniform merge (every weight 1).
Writes results/lora.md and results/lora.png.

    python benchmarks/lorahub.py --zoo ~/.cache/evomerge/zoo --seeds 3 --budget 60
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from _harness import REPO, add_run_options, header, mean_std, runs_from, std

TASK = "inc_rot"


def adapters_of(zoo: Path) -> list[str]:
    return sorted(p.name for p in (zoo / "lora").iterdir() if (p / "adapter_config.json").is_file())


def write_tasks(zoo: Path, work: Path, *, examples: int, seed: int) -> Path:
    """A task file with `examples` rows of the composed task's search split (seeded) and its whole held-out."""
    rows = (zoo / "data" / f"{TASK}.search.jsonl").read_text().splitlines()
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(examples, len(rows))))
    data = work / f"{TASK}.search{examples}-seed{seed}.jsonl"
    data.write_text("".join(rows[i] + "\n" for i in picked))
    spec = json.loads(json.dumps(next(t for t in _zoo_tasks(zoo) if t["name"] == TASK)))
    spec["data"] = {"search": str(data), "heldout": str(zoo / "data" / f"{TASK}.heldout.jsonl")}
    path = work / f"tasks-seed{seed}.yaml"
    path.write_text(json.dumps({"tasks": [spec]}))      # JSON is YAML
    return path


def _zoo_tasks(zoo: Path) -> list[dict]:
    import yaml

    return yaml.safe_load((zoo / "tasks.yaml").read_text())["tasks"]


ARMS = {   # name -> (label, sampler, layer_groups, filters, weight range)
    "lorahub": ("LoraHub's setting: CMA-ES, one weight per adapter in [-1.5, 1.5]", "cmaes", 1, [], [-1.5, 1.5]),
    "lorahub-range": ("CMA-ES, one weight per adapter in evomerge's range [0, 1.5]", "cmaes", 1, [], None),
    "tpe+cmaes": ("evomerge: tpe+cmaes, a weight per adapter, layer group and kind", "tpe+cmaes", 2,
                  ["attn", "mlp"], None),
    "adamerging": ("evomerge: adamerging, a weight per adapter, layer group and kind", "adamerging", 2,
                   ["attn", "mlp"], None),
}


def write_config(zoo: Path, work: Path, arm: str, *, seed: int, budget: int, tasks: Path) -> Path:
    _, sampler, groups, filters, weight = ARMS[arm]
    adapters = [str(zoo / "lora" / name) for name in adapters_of(zoo)]
    ranges = {"lambda": [1.0, 1.0]} | ({"weight": weight} if weight else {})
    config = {"name": f"lora-{arm.replace('+', '-')}-{seed}", "base": str(zoo / "base"), "sources": adapters,
              "search": {"methods": ["task_arithmetic"], "layer_groups": groups, "filters": filters,
                         "sampler": sampler, "n_trials": budget, "seed": seed, "pruner": "none", "ranges": ranges},
              "tasks": str(tasks), "objective": {TASK: 1.0}, "device": "cpu", "threads": 1}
    path = work / f"{arm}-seed{seed}.yaml"
    path.write_text(json.dumps(config))
    return path


def run_arm(zoo: Path, work: Path, arm: str, *, seed: int, budget: int, examples: int) -> dict:
    from evomerge import search

    tasks = write_tasks(zoo, work, examples=examples, seed=seed)
    config = write_config(zoo, work, arm, seed=seed, budget=budget, tasks=tasks)
    result = search(str(config), out=str(work / f"run-{config.stem}"), progress=False)   # resumes a finished run
    seconds = _study_seconds(result)
    rows = result.summary["rows"]
    best = next(r for r in rows if r["kind"] == "best" or "= best" in r["label"])
    sources = [r for r in rows if r["kind"] == "source"]
    single = max(sources, key=lambda r: (r["search_mean"], -r["number"]))     # chosen on the search examples
    uniform = next(r for r in rows if r["kind"] == "default")
    return {"arm": ARMS[arm][0], "budget": budget, "seed": seed, "seconds": seconds, "best": best["heldout_mean"],
            "best_search": best["search_mean"],
            "single": single["heldout_mean"], "single_label": single["label"],
            "oracle_single": max(r["heldout_mean"] for r in sources), "uniform": uniform["heldout_mean"],
            "alone": {r["label"].split(":", 1)[1].rsplit("/", 1)[-1].split(" ")[0]: r["heldout_mean"] for r in sources}}


def _study_seconds(result) -> float:
    """From the first trial's start to the last one's end (a resumed, finished study keeps its own time)."""
    import optuna

    trials = optuna.load_study(study_name=result.study_name, storage=result.storage).get_trials(deepcopy=False)
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(t.datetime_start for t in trials if t.datetime_start)).total_seconds()


def report(runs: list[dict], *, cmd: str | None, zoo: Path, budget: int, examples: int, seeds: int) -> str:
    adapters = adapters_of(zoo)
    lines = [*header(f"LoRA adapters composed for an unseen task (LoraHub, small): {TASK}", cmd=cmd), "",
             f"The zoo's {len(adapters)} LoRA adapters ({', '.join(adapters)}; each trained over the base on its own "
             f"skill) and the composed task {TASK}, which none was trained on. Each search sees {examples} rows of "
             f"{TASK}'s search split (another seeded subsample per seed) and is scored on its whole held-out split "
             f"(exact match). {budget} trials per search, baselines included; {seeds} seeds; mean ± std over "
             "seeds.", "",
             "| arm | held-out | search examples | seconds |", "|---|---|---|---|"]
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(_label(run, budget), []).append(run)
    first = next(iter(by_arm.values()))
    lines.append(f"| best single adapter (picked on the {examples} examples) | "
                 f"{mean_std([r['single'] for r in first])} | — | — |")
    lines.append("| best single adapter (picked on held-out: an oracle) | "
                 f"{mean_std([r['oracle_single'] for r in first])} | — | — |")
    lines.append(f"| uniform merge (every weight 1) | {mean_std([r['uniform'] for r in first])} | — | — |")
    for arm, group in by_arm.items():
        lines.append(f"| {arm} | {mean_std([r['best'] for r in group])} | "
                     f"{mean_std([r['best_search'] for r in group])} | "
                     f"{statistics.mean(r['seconds'] for r in group):.0f} |")
    lines += ["", "Each adapter alone on the held-out split: " +
              ", ".join(f"{name} {value:.3f}" for name, value in first[0]["alone"].items()) + ".", ""]
    lines += ["Per seed (held-out):", ""]
    for arm, group in by_arm.items():
        lines.append(f"- {arm}: " + ", ".join(f"{r['best']:.3f}" for r in group))
    lines.append("")
    return "\n".join(lines)


def _label(run: dict, budget: int) -> str:
    return run["arm"] if run["budget"] == budget else f"{run['arm']}, {run['budget']} trials"


def plot(runs: list[dict], out: Path, *, examples: int, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm: dict[str, list[float]] = {}
    first = [r for r in runs if _label(r, budget) == _label(runs[0], budget)]
    for run in runs:
        by_arm.setdefault(_label(run, budget), []).append(run["best"])
    bars = {f"best single adapter\n(on {examples} examples)": [r["single"] for r in first],
            "uniform merge": [r["uniform"] for r in first]}
    bars |= by_arm
    import textwrap

    fig, ax = plt.subplots(figsize=(10, 0.6 * len(bars) + 1.2))
    names = [textwrap.fill(name.replace("\n", " "), 48) for name in bars]
    means = [statistics.mean(v) for v in bars.values()]
    ax.barh(range(len(names)), means, xerr=[std(v) for v in bars.values()],
            capsize=4, color=["#999999", "#bbbbbb"] + ["#4c72b0"] * (len(names) - 2))
    for i, values in enumerate(bars.values()):
        ax.scatter(values, [i] * len(values), color="black", s=10, zorder=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{TASK} held-out exact match (bars: mean ± std over seeds; dots: seeds)")
    ax.set_xlim(0, 1)
    ax.set_title(f"Composing LoRA adapters for an unseen task from {examples} examples")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(Path.home() / ".cache" / "evomerge" / "zoo"))
    parser.add_argument("--workdir", default="/tmp/evomerge-lorahub")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    add_run_options(parser)
    parser.add_argument("--out", default=str(REPO / "results"))
    parser.add_argument("--command", default=None, help="the commands to name in the report (with --load)")
    args = parser.parse_args()
    zoo, work = Path(args.zoo).expanduser(), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    runs = runs_from(args, lambda: [run_arm(zoo, work, arm, seed=seed, budget=args.budget, examples=args.examples)
                                    for arm in args.arms.split(",") for seed in range(args.seeds)])
    text = report(runs, cmd=args.command, zoo=zoo, budget=args.budget, examples=args.examples, seeds=args.seeds)
    out = Path(args.out)
    (out / "lora.md").write_text(text + "\n![held-out by arm](lora.png)\n")
    plot(runs, out / "lora.png", examples=args.examples, budget=args.budget)
    print(text)


if __name__ == "__main__":
    main()
