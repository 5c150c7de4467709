"""Merge-kernel benchmark: what one search candidate costs.

Three fine-tuned sources and a base of ~100M float32 parameters with Llama shapes (hidden 768,
intermediate 2048, 12 heads / 4 KV heads, 8 layers, vocabulary 32000, untied head) are written as
safetensors folders under --workdir. For each method, in a fresh process:

- load: sources read and task vectors stacked (once per study);
- precompute: `ResidentMerger.prepare([method])` (threshold tables, random fields, row ranks);
- per candidate: the median of `materialize(recipe)` over several candidates with different scalars
  (per-group weights and densities on the 0.01 grid; one seed, as a search uses one per study, so
  the random fields are drawn once), written in place into the resident model, with the default
  finiteness check;
- memcpy: the median of one `copy_` of a flat buffer the size of all parameters (same process);
- mergekit: in another fresh process, `mergekit.merge.run_merge` of the same recipe on the same
  folders (the exported mergekit.yaml for deterministic methods; mergekit's own dare/della with the
  same weights and densities otherwise) — the whole merge: reading the safetensors, merging, writing
  the merged safetensors and config. That is what a mergekit-based search pays per candidate.

    python benchmarks/bench_merge.py --workdir /tmp/evomerge-bench --out results/bench_merge.md
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from _harness import ChildError, Timing, command, header, interleaved, load_average, run_child

METHODS = ("linear", "task_arithmetic", "slerp", "ties", "dare_linear", "dare_ties", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear", "model_stock")
# mergekit's other methods: --methods nuslerp,multislerp,... (results/bench_merge_mergekit_methods.md)
MERGEKIT_METHODS = ("nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
# their shared parameters, drawn per candidate in these ranges (the rest at their defaults)
SHARED_DRAWS = {"sce": {"select_topk": (0.2, 0.9)}, "nearswap": {"t": (0.0005, 0.005)},
                "ramplus_tl": {"r": (0.1, 0.9), "alpha": (0.1, 0.9)}}
TARGETS = {"linear": 3.0, "task_arithmetic": 3.0, "ties": 6.0, "dare_linear": 6.0, "dare_ties": 6.0,
           "breadcrumbs": 6.0, "breadcrumbs_ties": 6.0, "della": 6.0, "della_linear": 6.0}
MERGEKIT_SPEEDUP_TARGET = 20.0
SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
LAYER_GROUPS = 2


# ------------------------------------------------------------------------------------------------
# The models


def build_sources(workdir: Path, *, k: int = 3, seed: int = 0) -> tuple[Path, list[Path]]:
    """base + k sources (base + small random task vectors) as safetensors folders; reused if present."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folders = [workdir / "base"] + [workdir / f"s{i}" for i in range(k)]
    config = LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])
    def same_shape(folder: Path) -> bool:
        saved = folder / "config.json"
        return saved.is_file() and json.loads(saved.read_text()).get("num_hidden_layers") == SHAPE["num_hidden_layers"]

    if all((f / "model.safetensors").is_file() and same_shape(f) for f in folders):
        for folder in folders:
            config.save_pretrained(folder)
        return folders[0], folders[1:]
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    base = {n: (torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=gen)) for n, s in shapes.items()}
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        tensors = base if i == 0 else {n: t + 0.002 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    return folders[0], folders[1:]


def candidate(method: str, base: Path, sources: list[Path], index: int) -> dict:
    """A recipe with per-group scalars drawn for candidate `index` (densities on the 0.01 grid, seed 0)."""
    from evomerge.methods import REGISTRY

    rng = random.Random(f"{method}-{index}")
    if method == "slerp":
        return {"method": method, "base": str(base), "sources": [str(sources[0])], "t": round(rng.uniform(0.1, 0.9), 2)}
    spec = REGISTRY.get(method)
    sources = sources[:spec.max_sources or len(sources)]
    recipe: dict = {"method": method, "sources": [str(s) for s in sources], "layer_groups": LAYER_GROUPS}
    if spec.needs_base:
        recipe["base"] = str(base)
    for name, (low, high) in SHARED_DRAWS.get(method, {}).items():
        recipe[name] = round(rng.uniform(low, high), 4)
    if "weight" not in {p.name for p in spec.params}:
        return recipe
    low, high = (0.2, 0.8) if method.startswith("della") else (0.1, 0.9)
    parameters = {}
    for source in sources:
        entry: dict = {"weight": [round(rng.uniform(0.3, 1.2), 2) for _ in range(LAYER_GROUPS)]}
        if "density" in {p.name for p in spec.params}:
            entry["density"] = [round(rng.uniform(low, high), 2) for _ in range(LAYER_GROUPS)]
        if method.startswith("della"):
            entry["epsilon"] = 0.1
        parameters[source.name] = entry
    recipe["parameters"] = parameters
    return recipe


def mergekit_config(recipe_data: dict) -> dict:
    """The mergekit config of a recipe: evomerge's own export where one exists, else mergekit's dare/della."""
    from evomerge.export import mergekit_yaml
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources
    import yaml

    recipe = Recipe.from_dict(recipe_data)
    text = mergekit_yaml(recipe, open_sources(recipe.base, recipe.sources))
    if text is not None:
        config = yaml.safe_load(text)
    else:   # stochastic methods: same weights and densities, mergekit's own random masks
        layers = SHAPE["num_hidden_layers"]

        def per_layer(values: list[float]) -> list[float]:
            return [values[layer * LAYER_GROUPS // layers] for layer in range(layers)]

        models = [{"model": s, "parameters": {k: per_layer(v) if isinstance(v, list) else v
                                                for k, v in recipe_data["parameters"][Path(s).name].items()}}
                  for s in recipe_data["sources"]]
        config = {"merge_method": recipe.method, "base_model": recipe.base, "models": models, "dtype": "float32"}
    config.pop("tokenizer_source", None)
    return config


# ------------------------------------------------------------------------------------------------
# Workers (one fresh process each, so peak memory and precompute are per method)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def memcpy_timing(numel: int, device: str, sync: Callable[[], None]) -> Timing:
    """One `copy_` of a flat float32 buffer of `numel` entries: the median of 7, after one that touches the pages."""
    import torch

    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)

    def memcpy() -> None:
        dst.copy_(src)
        sync()

    return interleaved({"memcpy": memcpy}, 7)["memcpy"]


def evomerge_worker(method: str, workdir: Path, candidates: int, device: str = "cpu") -> dict:
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    from evomerge.kernel import ResidentMerger
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources

    base, sources = build_sources(workdir)
    recipes = [Recipe.from_dict(candidate(method, base, sources, i)) for i in range(candidates + 1)]
    opened = open_sources(recipes[0].base, recipes[0].sources)
    start = time.perf_counter()
    merger = ResidentMerger(opened, seed=0, methods=(), device=device)
    sync()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    merger.prepare([method])
    sync()
    precompute_s = time.perf_counter() - start
    start = time.perf_counter()
    merger.materialize(recipes[0])           # first candidate: lazy per-tensor statistics, first touch of the model
    sync()
    first_s = time.perf_counter() - start
    times, cpu_times = [], []
    for recipe in recipes[1:]:
        start, cpu = time.perf_counter(), time.process_time()
        merger.materialize(recipe)
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)

    params = list(merger.model.parameters())
    numel = sum(p.numel() for p in params)
    copy = memcpy_timing(numel, device, sync)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        merger.materialize(recipes[1])
        sync()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    profile = [(e.key, round(100 * getattr(e, key) / total, 1)) for e in events[:5]]
    return {"method": method, "numel": numel, "load_s": load_s, "precompute_s": precompute_s, "first_s": first_s,
            "candidate_s": statistics.median(times), "candidate_all_s": times, "memcpy_s": copy.wall,
            "candidate_cpu_s": statistics.median(cpu_times), "memcpy_cpu_s": copy.cpu,
            "profile": profile, "peak_rss_gib": peak_rss_gib(), "threads": torch.get_num_threads(),
            "kernel": "fused C++" if merger.fused is not None else "eager torch",
            "load": load_average(), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}


def mergekit_worker(method: str, workdir: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, sources = build_sources(workdir)
    config = MergeConfiguration.model_validate(mergekit_config(candidate(method, base, sources, 1)))
    out = workdir / f"mergekit-{method}"
    shutil.rmtree(out, ignore_errors=True)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu", random_seed=1)
    start, cpu = time.perf_counter(), time.process_time()
    run_merge(config, str(out), options=options)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(out, ignore_errors=True)
    return {"method": method, "mergekit_s": seconds, "mergekit_cpu_s": cpu_seconds, "peak_rss_gib": peak_rss_gib(),
            "load": load_average()}


def build_kernel(device: str) -> None:
    """Compile the fused kernel (first time on this machine) before any worker times its load."""
    import torch

    from evomerge.methods import fused

    fused.kernel_for(torch.device(device))


def run_worker(kind: str, method: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--worker", kind, "--methods", method, "--workdir", str(args.workdir),
            "--candidates", str(args.candidates), "--device", args.device, "--layers", str(args.layers)]
    argv += ["--threads", str(args.threads)] if args.threads else []
    try:
        return run_child(argv, env={"HF_HUB_OFFLINE": "1"}).json()
    except ChildError as err:
        return {"method": method, "error": (err.stderr.strip().splitlines() or ["?"])[-1]}


# ------------------------------------------------------------------------------------------------
# The report


def report(rows: list[dict], cmd: str, elapsed: float) -> str:
    import importlib.metadata as md

    import evomerge

    numel = next((r["numel"] for r in rows if "numel" in r), 0)
    memcpy = statistics.median([r["memcpy_s"] for r in rows if "memcpy_s" in r] or [float("nan")])
    device = next((r["device"] + (f" ({r['gpu']})" if r.get("gpu") else "") for r in rows if "device" in r), "cpu")
    try:
        mergekit_version = md.version("mergekit")
    except md.PackageNotFoundError:
        mergekit_version = "not installed"
    lines = [
        *header("Merge kernel benchmark", cmd=cmd, elapsed=elapsed),
        f"- Device of evomerge's kernel: {device}; merge kernel: "
        f"{', '.join(sorted({r['kernel'] for r in rows if 'kernel' in r})) or '?'} "
        "(EVOMERGE_NO_FUSED=1 selects the eager torch steps)",
        f"- evomerge {evomerge.__version__}, mergekit {mergekit_version}; torch threads in both: "
        f"{next((r['threads'] for r in rows if 'threads' in r), '?')}",
        f"- Models: base + 3 sources, Llama shapes (hidden {SHAPE['hidden_size']}, intermediate "
        f"{SHAPE['intermediate_size']}, {SHAPE['num_hidden_layers']} layers, vocabulary {SHAPE['vocab_size']}, "
        f"untied head), {numel / 1e6:.1f}M float32 parameters each ({numel * 4 / 1024**3:.2f} GiB)",
        f"- Candidates: per-source weights and densities per layer group ({LAYER_GROUPS} groups), "
        "densities on the 0.01 grid, one seed (a search uses one per study)",
        f"- memcpy of the output (one `copy_` of {numel / 1e6:.1f}M float32): median {memcpy * 1000:.0f} ms "
        f"({numel * 8 / memcpy / 1e9:.1f} GB/s read+write)",
        "",
        "Per candidate: median wall-clock seconds of `materialize`; × memcpy: that over the memcpy's median, "
        "by wall clock and by process CPU time (user + system over all threads; less sensitive to other "
        "processes on the machine). mergekit: one whole `run_merge`; ÷ candidate: mergekit's time over ours. "
        "load avg: the 1-minute load average at the end of each worker, the benchmark's own threads included.",
        "",
        "| method | load (s) | precompute (s) | first candidate (s) | per candidate (s) | × memcpy wall / CPU | "
        "target | mergekit merge (s) | mergekit ÷ candidate wall / CPU | peak RSS ours / mergekit (GiB) | "
        "load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error']} ||||||||||")
            continue
        ratio = r["candidate_s"] / r["memcpy_s"]
        ratio_cpu = r["candidate_cpu_s"] / r["memcpy_cpu_s"]
        target = TARGETS.get(r["method"])
        if target is None:
            target_text = "—"
        else:
            verdict = "met" if ratio <= target else ("met on CPU time" if ratio_cpu <= target else "**missed**")
            target_text = f"≤ {target:g}×: {verdict}"
        mk, mk_cpu = r.get("mergekit_s"), r.get("mergekit_cpu_s")
        if mk:
            speedup, speedup_cpu = mk / r["candidate_s"], mk_cpu / r["candidate_cpu_s"]
            verdict = ("met" if speedup >= MERGEKIT_SPEEDUP_TARGET else
                       "met on CPU time" if speedup_cpu >= MERGEKIT_SPEEDUP_TARGET else "**missed**")
            speed_text = f"{speedup:.1f}× / {speedup_cpu:.1f}× (≥ 20×: {verdict})"
        else:
            speed_text = "—" + (f" ({r['mergekit_error']})" if r.get("mergekit_error") else "")
        lines.append(f"| {r['method']} | {r['load_s']:.1f} | {r['precompute_s']:.2f} | {r['first_s']:.2f} | "
                     f"{r['candidate_s']:.3f} | {ratio:.1f}× / {ratio_cpu:.1f}× | {target_text} | "
                     f"{'—' if mk is None else f'{mk:.1f}'} | {speed_text} | "
                     f"{r['peak_rss_gib']:.1f} / {r.get('mergekit_rss_gib', float('nan')):.1f} | "
                     f"{r['load']:.1f} / {r.get('mergekit_load', float('nan')):.1f} |")
    lines += ["", "## Where a candidate's time goes (torch profiler, self CPU time, top 5 ops)", ""]
    for r in rows:
        if "profile" in r:
            ops = ", ".join(f"`{name}` {share}%" for name, share in r["profile"])
            lines.append(f"- **{r['method']}**: {ops}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench"))
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in both workers (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="where evomerge's kernel runs (cpu, cuda); mergekit: cpu")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"],
                        help="decoder layers of the generated models (8: ~100M parameters; 32: ~250M)")
    parser.add_argument("--worker", choices=["evomerge", "mergekit"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    SHAPE["num_hidden_layers"] = args.layers
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = (evomerge_worker(methods[0], args.workdir, args.candidates, args.device) if args.worker == "evomerge"
                  else mergekit_worker(methods[0], args.workdir))
        print(json.dumps(result))
        return 0
    started = time.perf_counter()
    build_sources(args.workdir)
    build_kernel(args.device)
    rows = []
    for method in methods:
        row = run_worker("evomerge", method, args)
        if not args.no_mergekit and "error" not in row:
            theirs = run_worker("mergekit", method, args)
            row["mergekit_s"] = theirs.get("mergekit_s")
            row["mergekit_rss_gib"] = theirs.get("peak_rss_gib", float("nan"))
            row["mergekit_load"] = theirs.get("load", float("nan"))
            row["mergekit_cpu_s"] = theirs.get("mergekit_cpu_s")
            if "error" in theirs:
                row["mergekit_error"] = theirs["error"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "candidate_all_s"}), flush=True)
    text = report(rows, command(argv), time.perf_counter() - started)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
