"""A one-off merge, evomerge against mergekit-yaml on the same mergekit config (issue 28, part 4).

SmolLM2-135M-Instruct (bf16, evomerge.zoo.smol) and three synthetic bf16 fine-tunes of it
(bench_real_scoring.prepare, and a third alike). For every method both tools take, with 2 and with 3 sources
(or as many as the method merges), one mergekit config (the models: form, dtype bfloat16, per-source weights
and densities where the method has them) is merged by `evomerge merge CONFIG -o OUT` and by
`mergekit-yaml CONFIG OUT`, each a fresh process with OMP_NUM_THREADS=--threads: the wall time of the whole
process, start-up included, the median of --reps runs. Writes results/oneoff.md.

    python benchmarks/bench_oneoff.py --workdir /tmp/evomerge-real --threads 2 --reps 2 --out results/oneoff.md
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from _harness import header, run_child


def third_source(work: Path, base: Path) -> Path:
    """A third bf16 fine-tune, made as bench_real_scoring.prepare makes the first two."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = work / "ft2"
    if not (folder / "model.safetensors").is_file():
        shutil.copytree(base, folder, dirs_exist_ok=True)
        gen = torch.Generator().manual_seed(2)
        weights = load_file(str(base / "model.safetensors"))
        save_file({n: (w.float() + torch.randn(w.shape, generator=gen) * (w.float().std() * 0.05 + 1e-4))
                   .to(torch.bfloat16) for n, w in weights.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    return folder


def config(method: str, base: Path, sources: list[Path]) -> dict:
    from evomerge.methods import REGISTRY

    spec = REGISTRY.get(method)
    names = {p.name for p in spec.source_params}
    models = []
    for i, source in enumerate(sources):
        params = {}
        if "weight" in names:
            params["weight"] = [0.8, 0.5][i % 2] if method != "linear" else 1.0 / len(sources)
        if "density" in names:
            params["density"] = 0.5 if method.startswith("della") else [0.5, 0.7, 0.3][i]
        if "epsilon" in names:
            params["epsilon"] = 0.1
        models.append({"model": str(source), "parameters": params} if params else {"model": str(source)})
    data = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if spec.needs_base:
        data["base_model"] = str(base)
    shared = {"slerp": {"t": 0.35}, "nearswap": {"t": 0.001}, "sce": {"select_topk": 0.5}}
    if method in shared:
        data["parameters"] = shared[method]
    return data


def run(work: Path, threads: int, reps: int, methods: list[str]) -> list[dict]:
    from bench_real_scoring import prepare

    from evomerge.methods import REGISTRY

    base, two, _ = prepare(work)
    three = [*two, third_source(work, base)]
    evomerge = [sys.executable, "-m", "evomerge", "merge"]
    mergekit = [str(Path(sys.executable).with_name("mergekit-yaml"))]
    env = {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = []
    for method in methods:
        spec = REGISTRY.get(method)
        counts = sorted({min(max(k, spec.min_sources), spec.max_sources or k) for k in (2, 3)})
        for k in counts:
            path = work / "oneoff" / f"{method}-{k}.yml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(config(method, base, three[:k]), sort_keys=False))
            ours, theirs = [], []
            for _ in range(reps):        # alternated, so that a slow spell of the machine hits both
                out = work / "oneoff" / "out"
                shutil.rmtree(out, ignore_errors=True)
                ours.append(run_child([*evomerge, str(path), "-o", str(out)], env=env))
                shutil.rmtree(out, ignore_errors=True)
                theirs.append(run_child([*mergekit, str(path), str(out)], env=env))
            rows.append({"method": method, "sources": k, "evomerge": statistics.median(c.wall for c in ours),
                         "mergekit": statistics.median(c.wall for c in theirs),
                         "evomerge_rss": max(c.peak_rss for c in ours),
                         "mergekit_rss": max(c.peak_rss for c in theirs)})
            print(rows[-1], flush=True)
    return rows


def report(rows: list[dict], threads: int, reps: int, elapsed: float) -> str:
    lines = [*header("A one-off merge: evomerge against mergekit-yaml", elapsed=elapsed),
             f"- Models: SmolLM2-135M-Instruct (bf16) and 2 or 3 bf16 fine-tunes; one mergekit config per method "
             f"and source count (dtype bfloat16), merged by both tools as processes with OMP_NUM_THREADS={threads}",
             f"- Wall time of the whole process, start-up included: the median of {reps} runs, the tools alternated; "
             "peak resident memory (RSS) of the process: the largest of its runs",
             "",
             "| method | sources | evomerge (s) | mergekit-yaml (s) | evomerge ÷ mergekit | ≤ 1 "
             "| evomerge peak RSS (MiB) | mergekit peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["evomerge"] / r["mergekit"]
        lines.append(f"| {r['method']} | {r['sources']} | {r['evomerge']:.2f} | {r['mergekit']:.2f} | {ratio:.2f}× | "
                     f"{'met' if ratio <= 1 else '**missed**'} | {r['evomerge_rss'] / 2**20:.0f} "
                     f"| {r['mergekit_rss'] / 2**20:.0f} |")
    met = sum(r["evomerge"] <= r["mergekit"] for r in rows)
    lines += ["", f"evomerge is no slower on {met} of {len(rows)} merges."]
    return "\n".join(lines) + "\n"


def main() -> int:
    from evomerge.methods import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-real"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--methods", default=",".join(REGISTRY.names()))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start = time.time()
    rows = run(args.workdir, args.threads, args.reps, [m for m in args.methods.split(",") if m])
    text = report(rows, args.threads, args.reps, time.time() - start)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
