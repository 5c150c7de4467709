"""Parameter space, data-flow space and both (issue 17): PS vs DFS vs PS + DFS at one budget, on the zoo.

The demo's sources (the zoo's compatible experts inc, rot, mir) and objective (their three tasks), searched
three ways with one sampler and one budget of trials (baselines included), over `--seeds` seeds:
- PS: task_arithmetic, ties and dare_ties with a weight per source and layer group (2 groups);
- DFS (`search.space: dfs`): stacks of the experts' blocks, 2 passes over them (24 candidate blocks), at most
  8 in a stack, a scale per block;
- PS + DFS (`search.space: ps+dfs`): the PS merge's blocks and the experts', one recipe.
Each best model is scored on the held-out split of the objective's tasks and the composed task inc_rot (both
skills at once, never searched on). Writes results/dfs.md and results/dfs.png. `--config configs/smol.yaml`
runs the same on another zoo (its base, sources, methods, tasks and objective).

    python benchmarks/dfs.py --seeds 3 --budget 100
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _harness import REPO, add_run_options, header, mean_std, runs_from, std

SPACES = {"ps": "PS: the config's methods, weights per source and layer group",
          "dfs": "DFS: stacks of the sources' blocks, a scale each",
          "ps+dfs": "PS + DFS: the PS merge's blocks and the sources', one recipe"}
TASKS = ("inc", "rot", "mir", "inc_rot")


ZOO = {"base": "zoo/base", "sources": ["zoo/inc", "zoo/rot", "zoo/mir"],
       "search": {"methods": ["task_arithmetic", "ties", "dare_ties"], "layer_groups": 2, "pruner": "none",
                  "dfs": {"repeats": 2, "max_layers": 8}},
       "tasks": str(REPO / "configs" / "tasks" / "zoo.yaml"),
       "objective": {"inc": 1.0, "rot": 1.0, "mir": 1.0}, "device": "cpu", "threads": 1}


def write_config(work: Path, space: str, *, seed: int, budget: int, sampler: str, base: dict) -> Path:
    config = json.loads(json.dumps(base))
    config["name"] = f"dfs-{space.replace('+', '-')}-{seed}"
    config["search"] |= {"sampler": sampler, "n_trials": budget, "seed": seed, "space": space}
    config.pop("out", None)
    path = work / f"{space}-seed{seed}.yaml"
    path.write_text(json.dumps(config))
    return path


def run_space(work: Path, space: str, *, seed: int, budget: int, sampler: str, zoo: Path, base: dict,
              tasks: tuple[str, ...]) -> dict:
    from evomerge.build import merger_for
    from evomerge.evaluate import evaluate, load_tasks
    from evomerge.recipe import Recipe
    from evomerge.search import search

    config = write_config(work, space, seed=seed, budget=budget, sampler=sampler, base=base)
    result = search(str(config), out=str(work / f"run-{config.stem}"), progress=False)
    best = next(r for r in result.summary["rows"] if r["kind"] == "best" or "= best" in r["label"])
    recipe = Recipe.from_yaml(result.run_dir / "recipe.yaml")
    merged = merger_for(recipe)
    suite = load_tasks(zoo / "tasks.yaml")
    scores = evaluate(merged.model, suite, tokenizer=merged.sources.tokenizer(), split="heldout")
    return {"space": space, "seed": seed, "budget": budget, "search": best["search_mean"],
            "heldout": best["heldout_mean"], "blocks": len(recipe.layers) or None, "method": recipe.method,
            "tasks": {t: scores.primary(t) for t in tasks}}


def report(runs: list[dict], *, budget: int, seeds: int, sampler: str, setup: str) -> str:
    tasks = list(runs[0]["tasks"])
    lines = [*header("Parameter space, data-flow space, and both, at one budget"), "",
             f"{setup} Searched with {sampler}, {budget} trials each (baselines included), {seeds} seeds. Held-out "
             "score of the best trial's model: the objective's mean and each task. Mean ± std over seeds.", "",
             "| space | objective (held-out) | " + " | ".join(tasks) + " | blocks in the best stack |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for space, label in SPACES.items():
        group = [r for r in runs if r["space"] == space]
        if not group:
            continue
        blocks = sorted({r["blocks"] for r in group if r["blocks"]})
        lines.append(f"| {label} | {mean_std([r['heldout'] for r in group])} | "
                     + " | ".join(mean_std([r["tasks"][t] for r in group]) for t in tasks)
                     + f" | {', '.join(map(str, blocks)) or '—'} |")
    lines += ["", "Per seed (objective, held-out): " + "; ".join(
        f"{space} " + ", ".join(f"{r['heldout']:.3f}" for r in runs if r["space"] == space) for space in SPACES), ""]
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(SPACES)
    for k, space in enumerate(SPACES):
        group = [r for r in runs if r["space"] == space]
        if not group:
            continue
        labels = ["objective", *group[0]["tasks"]]
        values = [[r["heldout"] for r in group]] + [[r["tasks"][t] for r in group] for t in group[0]["tasks"]]
        xs = [i + (k - 1) * width for i in range(len(labels))]
        ax.bar(xs, [statistics.mean(v) for v in values], width,
               yerr=[std(v) for v in values], capsize=3, label=space)
        ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out exact match")
    ax.set_title("PS vs DFS vs PS + DFS, equal budget (mean ± std over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(Path.home() / ".cache" / "evomerge" / "zoo"))
    parser.add_argument("--workdir", default="/tmp/evomerge-dfs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--sampler", default="tpe+cmaes")
    parser.add_argument("--config", default=None,
                        help="a search config to take base, sources, methods, tasks and objective from (with "
                             "--zoo its zoo, e.g. configs/smol.yaml); default: the demo's experts on the tiny zoo")
    parser.add_argument("--dfs", default=None, help='the data-flow options as JSON, e.g. \'{"repeats": 1}\'')
    parser.add_argument("--name", default="dfs", help="the report's name under --out")
    parser.add_argument("--setup", default=None, help="the report's description of the models and tasks")
    parser.add_argument("--spaces", default=",".join(SPACES))
    add_run_options(parser)
    parser.add_argument("--out", default=str(REPO / "results"))
    args = parser.parse_args()
    zoo, work = Path(args.zoo).expanduser(), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    def measure() -> list[dict]:
        base = ZOO
        if args.config:
            import yaml

            path = Path(args.config).resolve()
            base = yaml.safe_load(path.read_text())
            base["tasks"] = str((path.parent / base["tasks"]).resolve()) if not base["tasks"].startswith(
                ("zoo/", "smol/", "/")) else base["tasks"]
        base = json.loads(json.dumps(base))
        base["search"]["dfs"] = base["search"].get("dfs", ZOO["search"]["dfs"]) | json.loads(args.dfs or "{}")
        tasks = tuple(base["objective"]) + tuple(t for t in TASKS if t not in base["objective"] and not args.config)
        return [run_space(work, space, seed=seed, budget=args.budget, sampler=args.sampler, zoo=zoo, base=base,
                          tasks=tasks) for space in args.spaces.split(",") for seed in range(args.seeds)]

    runs = runs_from(args, measure)
    setup = args.setup or ("The zoo's compatible experts (inc, rot, mir) and the demo's objective (their three tasks); "
                           "DFS over 2 passes of their blocks (24 candidates), at most 8 in a stack; the composed "
                           "task inc_rot (digits and letters in one input) is scored, never searched on.")
    text = report(runs, budget=args.budget, seeds=args.seeds, sampler=args.sampler, setup=setup)
    out = Path(args.out)
    (out / f"{args.name}.md").write_text(text + f"\n![held-out by space]({args.name}.png)\n")
    plot(runs, out / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
