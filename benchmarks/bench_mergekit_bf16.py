"""evomerge against mergekit 0.1.5 on a real bf16 model: differing entries, and what they do to the loss
(issue 14, part 4).

SmolLM2-135M-Instruct (bf16, evomerge.zoo.smol) and two synthetic bf16 fine-tunes of it
(bench_real_scoring.prepare) are merged by each deterministic method, by evomerge (`merge_to_folder`) and
by mergekit from the mergekit.yaml evomerge writes (float32 arithmetic, bf16 out). Per method: the entries
whose values differ, the largest difference, and each model's mean next-token loss on a fixed English text.
Writes results/mergekit_bf16.md.

    python benchmarks/bench_mergekit_bf16.py --workdir /tmp/evomerge-real
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml

from _harness import REPO, header

METHODS = ("linear", "task_arithmetic", "slerp", "model_stock", "ties", "breadcrumbs", "breadcrumbs_ties")
TEXT = ("The river rose slowly through the night, and by morning the lower fields were under water. Farmers "
        "moved their animals to the hills, while the children watched the boats drift past the old mill. In the "
        "afternoon the rain stopped, the sun came out, and the village began to count what the flood had taken. "
        "Nobody had been hurt, but the bridge to the market town was gone, and it would be weeks before it was "
        "rebuilt. Until then, the baker said, bread would come by boat.")


def recipe(method: str, base: Path, sources: list[Path]) -> dict:
    data = {"evomerge_recipe": 1, "method": method, "base": str(base), "sources": [str(s) for s in sources],
            "layer_groups": 2}
    if method == "slerp":
        data.update(sources=data["sources"][:1], t=0.35)
    if method in ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"):
        data["parameters"] = {str(sources[0]): {"weight": [0.8, 0.6]}, str(sources[1]): {"weight": 0.5}}
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        data["parameters"][str(sources[0])]["density"] = 0.5
        data["parameters"][str(sources[1])]["density"] = 0.7
    return data


def loss(folder: Path, tokenizer) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids).loss)


def run(work: Path, methods: list[str]) -> list[dict]:
    from bench_real_scoring import prepare
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from evomerge.export import merge_to_folder

    base, sources, _ = prepare(work)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    rows = []
    for method in methods:
        path = work / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe(method, base, sources)))
        t0 = time.perf_counter()
        ours_dir = merge_to_folder(path, work / f"ours-{method}", force=True)
        ours_s = time.perf_counter() - t0
        config = yaml.safe_load((ours_dir / "mergekit.yaml").read_text())
        theirs_dir = work / f"mergekit-{method}"
        shutil.rmtree(theirs_dir, ignore_errors=True)
        t0 = time.perf_counter()
        run_merge(MergeConfiguration.model_validate(config), str(theirs_dir),
                  options=MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, device="cpu"))
        theirs_s = time.perf_counter() - t0
        ours = load_file(str(ours_dir / "model.safetensors"))
        theirs = {}
        for file in theirs_dir.glob("*.safetensors"):
            theirs.update(load_file(str(file)))
        differing = sum(int((t != theirs[n]).sum()) for n, t in ours.items())
        largest = max(float((t.float() - theirs[n].float()).abs().max()) for n, t in ours.items())
        rows.append({"method": method, "entries": sum(t.numel() for t in ours.values()), "differing": differing,
                     "largest": largest, "loss_ours": loss(ours_dir, tokenizer),
                     "loss_theirs": loss(theirs_dir, tokenizer),
                     "ours_s": ours_s, "theirs_s": theirs_s, "dtype": config.get("dtype"),
                     "out_dtype": config.get("out_dtype")})
        print(rows[-1], flush=True)
    return rows


def report(rows: list[dict]) -> str:
    lines = [*header("evomerge against mergekit 0.1.5 on a real bf16 model"), "",
             "SmolLM2-135M-Instruct (bf16) and two synthetic bf16 fine-tunes (5 % Gaussian task vectors), 2 layer "
             "groups. mergekit runs the mergekit.yaml evomerge writes "
             f"(`dtype: {rows[0]['dtype']}`, `out_dtype: {rows[0]['out_dtype']}`). Loss: mean next-token loss of each "
             "merged model (bf16) on a fixed 90-word English paragraph.", "",
             "| method | differing entries | share | largest difference | loss evomerge | loss mergekit | "
             "evomerge s | mergekit s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['differing']:,} of {r['entries']:,} | "
                     f"{r['differing'] / r['entries']:.3%} | "
                     f"{r['largest']:.3g} | {r['loss_ours']:.4f} | {r['loss_theirs']:.4f} | {r['ours_s']:.1f} | "
                     f"{r['theirs_s']:.1f} |")
    lines += ["", "linear, task_arithmetic, slerp and model_stock repeat mergekit's float32 operations in its order "
              "(METHODS.md), so each entry is mergekit's. The TIES family differs where a bf16 task vector ties "
              "with the trim threshold: bf16 has 8 bits of mantissa, so many entries share the threshold's "
              "magnitude; evomerge keeps every tied entry (deterministic, METHODS.md), mergekit exactly k of them "
              "(chosen by an unstable sort). The difference in loss is what that choice does to the model.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/evomerge-real")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--out", default=str(REPO / "results" / "mergekit_bf16.md"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = run(work, [m for m in args.methods.split(",") if m])
    text = report(rows)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
