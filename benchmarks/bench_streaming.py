"""Streaming vs resident merges: identical bytes, and peak memory against the budget.

Runs `evomerge merge` on one recipe twice in fresh processes — resident, and with a
`--memory-budget` below what the resident mode needs — and records each process's peak
resident memory (ru_maxrss), the wall time and whether the safetensors are identical.
Writes results/bench_streaming.md.

    python benchmarks/bench_streaming.py --models /tmp/evomerge-bench
(the model folders are the ones benchmarks/bench_merge.py writes: base, s0, s1, s2)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _harness import REPO, header, run_child

RECIPE = """evomerge_recipe: 1
method: {method}
base: {models}/base
sources: [{models}/s0, {models}/s1, {models}/s2]
seed: 3
layer_groups: 2
parameters:
  {models}/s0: {{weight: [0.8, 0.6], density: 0.5}}
  {models}/s1: {{weight: 0.7, density: [0.4, 0.6]}}
  {models}/s2: {{weight: 0.5, density: 0.7}}
"""


def merge(recipe: Path, out: Path, *extra: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one `evomerge merge` in a fresh process."""
    code = ("import resource, subprocess, sys, time; t = time.time(); "
            "r = subprocess.run(sys.argv[1:]); "
            "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    argv = [sys.executable, "-c", code, sys.executable, "-m", "evomerge", "merge", str(recipe), "-o", str(out),
            "--force", *extra]
    wall, rss_kib = run_child(argv, env={"OMP_NUM_THREADS": "1"}).stdout.split()[-2:]
    return float(wall), int(rss_kib) / 2**20


def plan_for(recipe: Path):
    """The kernel's memory plan for `recipe`, computed here without loading weights."""
    from evomerge.build import open_recipe_sources
    from evomerge.kernel import MemoryPlan, ResidentMerger
    from evomerge.recipe import Recipe

    parsed = Recipe.from_yaml(recipe)
    merger = ResidentMerger(open_recipe_sources(parsed), methods=[parsed.method], build_model=False, streaming=True)
    return MemoryPlan.of(merger.store, out_dtype=merger.out_dtype, score_dtype=merger.score_dtype, budget=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/evomerge-bench"))
    parser.add_argument("--budget", default=None,
                        help="--memory-budget for the streaming run (default: per method, halfway between what "
                             "streaming and what the resident mode need by the kernel's plan)")
    parser.add_argument("--methods", default="ties,dare_ties,della")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_streaming.md")
    args = parser.parse_args()
    from evomerge.kernel import parse_bytes

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in args.methods.split(","):
            recipe = tmp / f"{method}.yaml"
            recipe.write_text(RECIPE.format(method=method, models=args.models.resolve()))
            plan = plan_for(recipe)
            budget = args.budget or f"{round((plan.streaming_need + plan.resident_need) / 2e8) / 10:g}GB"
            resident = merge(recipe, tmp / "resident")
            streaming = merge(recipe, tmp / "streaming", "--memory-budget", budget)
            same = (tmp / "resident" / "model.safetensors").read_bytes() == \
                (tmp / "streaming" / "model.safetensors").read_bytes()
            refused = run_child([sys.executable, "-m", "evomerge", "merge", str(recipe), "-o", str(tmp / "no"),
                                 "--memory-budget", f"{plan.streaming_need / 2e9:.2f}GB"], check=False)
            rows.append((method, budget, plan, resident, streaming, same, refused))
            print(method, budget, resident, streaming, same, refused.returncode, flush=True)
    size = sum(p.stat().st_size for p in (args.models / "base").glob("*.safetensors")) / 2**30
    lines = [*header("Streaming vs resident merges"),
             "- 1 torch thread",
             f"- models: `{args.models}` (base + 3 sources, {size:.2f} GiB of float32 weights each)",
             "- `memory_budget` bounds the whole process: what it holds already (Python, torch, transformers), "
             "the merged model, and the merge's tensors. The kernel plans before any weights load: resident if "
             "everything fits, else streaming (one tensor's anchor, task vectors and temporaries at a time), "
             "else exit 2 naming the smallest budget that works.", "",
             "| method | plan: streaming / resident need | budget | resident: peak RSS, wall | "
             "streaming: peak RSS, wall | peak below budget | identical bytes | half the streaming need |",
             "|---|---|---|---|---|---|---|---|"]
    ok = True
    for method, budget, plan, (rw, rm), (sw, sm), same, refused in rows:
        below = sm * 2**30 < parse_bytes(budget, device=None)
        ok &= below and same and refused.returncode == 2
        lines.append(f"| {method} | {plan.streaming_need / 1e9:.2f} / {plan.resident_need / 1e9:.2f} GB | {budget} | "
                     f"{rm * 2**30 / 1e9:.2f} GB, {rw:.0f} s | {sm * 2**30 / 1e9:.2f} GB, {sw:.0f} s | "
                     f"{'yes' if below else '**no**'} | {'yes' if same else '**NO**'} | "
                     f"exit {refused.returncode} |")
    example = next((r[6].stderr.strip() for r in rows if r[6].returncode == 2), "")
    lines += ["", "Peak RSS is the whole process (Python, torch, the output model and the transient per-tensor "
              "work), from `getrusage(RUSAGE_CHILDREN).ru_maxrss`. The last column runs the same merge with half "
              "the budget streaming needs; it is refused before any weights load:", "", f"    {example}", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
