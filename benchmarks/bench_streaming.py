"""Streaming vs resident merges: identical bytes, and peak memory against the budget.

Runs `evomerge merge` on one recipe twice in fresh processes — resident, and with
`--memory-budget` below what the resident mode keeps — and records each process's peak
resident memory (ru_maxrss), the wall time and whether the safetensors are identical.
Writes results/bench_streaming.md.

    python benchmarks/bench_streaming.py --models /tmp/evomerge-bench --budget 1GB
(the model folders are the ones benchmarks/bench_merge.py writes: base, s0, s1, s2)
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "evomerge", "merge", str(recipe), "-o", str(out),
           "--force", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(done.stderr)
    wall, rss_kib = done.stdout.split()[-2:]
    return float(wall), int(rss_kib) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/evomerge-bench"))
    parser.add_argument("--budget", default="1GB")
    parser.add_argument("--methods", default="ties,dare_ties")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "bench_streaming.md")
    args = parser.parse_args()
    from evomerge.kernel import parse_bytes

    budget = parse_bytes(args.budget, device=None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in args.methods.split(","):
            recipe = tmp / f"{method}.yaml"
            recipe.write_text(RECIPE.format(method=method, models=args.models.resolve()))
            resident = merge(recipe, tmp / "resident")
            streaming = merge(recipe, tmp / "streaming", "--memory-budget", args.budget)
            same = (tmp / "resident" / "model.safetensors").read_bytes() == \
                (tmp / "streaming" / "model.safetensors").read_bytes()
            rows.append((method, resident, streaming, same))
            print(method, resident, streaming, same, flush=True)
    size = sum(p.stat().st_size for p in (args.models / "base").glob("*.safetensors")) / 2**30
    lines = ["# Streaming vs resident merges", "",
             f"- {time.strftime('%Y-%m-%d %H:%M')}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             "1 torch thread",
             f"- models: `{args.models}` (base + 3 sources, {size:.2f} GiB of float32 weights each)",
             f"- budget: `--memory-budget {args.budget}` ({budget / 2**30:.2f} GiB) — what the budget bounds is the "
             "sources' resident copies; the output model (one model's size) and the interpreter come on top",
             f"- command: `python benchmarks/bench_streaming.py --models {args.models} --budget {args.budget}`", "",
             "| method | resident: peak RSS, wall | streaming: peak RSS, wall | identical bytes |",
             "|---|---|---|---|"]
    for method, (rw, rm), (sw, sm), same in rows:
        lines.append(f"| {method} | {rm:.2f} GiB, {rw:.0f} s | {sm:.2f} GiB, {sw:.0f} s | {'yes' if same else 'NO'} |")
    lines += ["", "Peak RSS is the whole process (Python, torch, the output model and the transient per-tensor "
              "work), from `getrusage(RUSAGE_CHILDREN).ru_maxrss`.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
