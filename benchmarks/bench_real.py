"""Per-trial cost on a real bf16 model: evomerge's search loop vs mergekit loops vs the floors (issue 15, part 3).

The smol zoo (SmolLM2-135M-Instruct and its three bf16 experts, `evomerge zoo build OUT --size smol`; --zoo,
else built under --workdir) with configs/smol.yaml's sources (add, words, caps) and objective, scored on the
four generate tasks of configs/tasks/smol.yaml (search split, chat template). The candidates are task_arithmetic
and ties recipes with per-source weights and densities per layer group (2 groups), drawn by a seeded optuna
RandomSampler from evomerge's search space (`bench_loop.draw_candidates`). For each candidate, in one process,
the loops taking turns going first:

- evomerge: `SearchSession.run` for the candidate queued as the study's next trial (`bench_loop.evomerge_candidate`;
  SQLite storage, no pruner, no baselines), split into merge (`ResidentMerger.materialize`, in place, sources
  resident in bf16), evaluation (`Evaluator.evaluate("search")`) and the study's bookkeeping (the rest: ask,
  suggest, decode, tell, user attributes, storage);
- mergekit: the recipe's mergekit YAML -> `run_merge` in this process -> `from_pretrained` in the dtype evomerge
  scores in -> the same evaluation (`bench_loop.mergekit_candidate`);
- mergekit-yaml (the first --cli-candidates): the same, merging with the `mergekit-yaml` command;
- merge floor: the memory traffic one candidate cannot avoid -- read the resident sources once (base and
  experts as stored), write the model's parameters once -- timed as one torch `copy_` between flat buffers
  moving as many bytes (bench_merge.py's memcpy baseline, sized to this traffic);
- evaluation floor: `bench_real_eval.generate_floor` for each task on the same search rows, on the resident
  model while it holds the candidate (batched prefill + KV-cache greedy decoding, pre-tokenized, no harness).

Targets: per trial <= 1.3 x (merge floor + evaluation floor); >= 5x the in-process mergekit loop's candidates
per hour. Agreement is reported, not assumed: every merged tensor of each mergekit loop against evomerge's
(task_arithmetic is expected bit-identical; ties may differ where a bf16 task vector ties with the trim
threshold, results/mergekit_bf16.md), and the scores.

    python benchmarks/bench_real.py --zoo /tmp/evomerge-smol/zoo --workdir /tmp/evomerge-bench-real \\
        --out results/real.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
import types
import warnings
from pathlib import Path

from _harness import REPO, command, header, load_average
from bench_loop import (TOKENIZER_NOTE, Clock, build_models, draw_candidates, evomerge_candidate, median,
                        mergekit_candidate, score_difference, tensor_differences)
from bench_real_eval import generate_floor

CONFIG = REPO / "configs" / "smol.yaml"
METHODS = ("task_arithmetic", "ties")
FLOOR_TARGET = 1.3     # per trial, at most this many times merge floor + evaluation floor
SPEEDUP_TARGET = 5.0   # at least this many times the in-process mergekit loop's candidates per hour


# ------------------------------------------------------------------------------------------------
# The zoo and the config


def open_zoo(zoo: Path | None, workdir: Path, *, seed: int) -> tuple[str, Path]:
    """(what it is, its folder): --zoo as given, else the smol zoo built under `workdir` if missing."""
    if zoo is None:
        _, zoo = build_models(workdir, seed=seed, zoo_size="smol")
    manifest = json.loads((zoo / "zoo.json").read_text())
    return f"smol zoo at {zoo} (size {manifest['size']!r}, seed {manifest['seed']})", zoo


def write_config(zoo: Path, workdir: Path, *, candidates: int, seed: int, layer_groups: int) -> Path:
    """configs/smol.yaml's sources, tasks and objective on `zoo`, the two deterministic methods, a random sampler."""
    import yaml

    smol = yaml.safe_load(CONFIG.read_text())
    in_zoo = lambda spec: str(zoo / spec.removeprefix("smol/"))  # noqa: E731
    config = {
        "name": "bench_real", "base": in_zoo(smol["base"]), "sources": [in_zoo(s) for s in smol["sources"]],
        "search": {"methods": list(METHODS), "layer_groups": layer_groups, "sampler": "random",
                   "n_trials": candidates, "seed": seed, "pruner": "none", "baselines": False},
        "tasks": str((CONFIG.parent / smol["tasks"]).resolve()), "objective": smol["objective"], "device": "cpu",
    }
    path = workdir / "bench_real.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------
# The floors


class MergeFloor:
    """One `copy_` moving the bytes a candidate's merge must move: the resident sources read, the model written."""

    def __init__(self, merger) -> None:
        import torch

        self.read = sum(c.anchor.nbytes + c.stack.nbytes for c in merger.contexts.values())
        self.written = sum(p.nbytes for p in merger.model.parameters())
        half = (self.read + self.written) // 2      # a copy reads as many bytes as it writes
        self.src = torch.empty(half, dtype=torch.uint8).random_()
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)                    # first touch of the pages, outside the timing

    def __call__(self) -> None:
        self.dst.copy_(self.src)


def evaluation_floor(session) -> dict:
    """Each task's `generate_floor` on the search rows of the session's evaluator (prepared once)."""
    evaluator = session.evaluator
    # generate_floor reads the "heldout" rows of the evaluator it is given: hand it the search rows under that key
    search_rows = types.SimpleNamespace(
        codec=evaluator.codec, _examples={(n, "heldout"): ex for (n, s), ex in evaluator._examples.items()
                                          if s == "search"})
    return {name: generate_floor(session.merger.model, search_rows, name, batch_size=evaluator.batch_size,
                                 max_new_tokens=session.suite.spec(name).max_new_tokens)
            for name in session.suite.names}


def floor_scores(session, outputs: dict[str, list[list[int]]]) -> tuple[dict[str, float], int]:
    """The floor's exact_match per task (its tokens decoded, cut at the task's stop strings, extracted), and how
    many rows ran past a stop string (the floor stops a row at end-of-sequence only)."""
    from evomerge.evaluate.extract import exact_match, extractor

    scores, past = {}, 0
    for name, rows in outputs.items():
        spec = session.suite.spec(name)
        extract = extractor(spec.extract if isinstance(spec.extract, str) else spec.extract.model_dump())
        hits = []
        for ex, tokens in zip(session.evaluator._examples[(name, "search")], rows):
            text = session.evaluator.codec.decode(tokens)
            cuts = [i for i in (text.find(s) for s in spec.stop) if i >= 0]
            if cuts and tokens and text[min(cuts):].strip():
                past += 1
            hits.append(exact_match(extract, text[:min(cuts)] if cuts else text, ex.target))
        scores[name] = sum(hits) / len(hits)
    return scores, past


# ------------------------------------------------------------------------------------------------
# Agreement


def agreement(merger, recipe, theirs: dict) -> dict:
    """Entries of evomerge's merged tensors that differ from `theirs`, the largest difference, and whether every
    difference is at a TIES trim tie (bench_loop.tensor_differences; its message where not)."""
    differ = total = 0
    largest = 0.0
    for name, ours in merger.state_dict().items():
        other = theirs[name]
        bad = ours != other
        total += ours.numel()
        count = int(bad.sum())
        if count:
            differ += count
            largest = max(largest, float((ours.float() - other.float()).abs().max()))
    explained = "—"
    if differ:
        try:
            tensor_differences(merger, recipe, theirs)
            explained = "all at trim ties"
        except AssertionError as err:
            explained = f"not all at trim ties: {err}"
        except Exception as err:   # the check itself failed: say so, keep the timings
            explained = f"not classified ({type(err).__name__}: {err})"
    return {"differ": differ, "total": total, "largest": largest, "explained": explained}


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------------------------------
# The report


def ratio_verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(run: dict) -> str:
    import importlib.metadata as md

    ours, theirs, cli, floors = run["ours"], run["theirs"], run["cli"], run["floors"]
    n = len(ours)
    ours_s, theirs_s = median(ours, "total"), median(theirs, "total")
    merge_floor, eval_floor = median(floors, "merge floor"), median(floors, "eval floor")
    floor_s = merge_floor + eval_floor
    vs_floor, speedup = ours_s / floor_s, theirs_s / ours_s
    per_floor = [o.wall["total"] / (f.wall["merge floor"] + f.wall["eval floor"]) for o, f in zip(ours, floors)]
    gb = run["floor_bytes"]
    loads = run["loads"]
    methods = ", ".join(f"{m} × {run['methods'].count(m)}" for m in METHODS)
    lines = [
        *header("Per-trial cost on a real bf16 model: evomerge vs mergekit loops vs the floors", cmd=run["command"],
                elapsed=run["elapsed"]),
        f"- No GPU; torch threads: {run['threads']} in every loop ("
        + ("`--threads`" if run["threads_given"] else "torch's default, the machine's cores")
        + "; `--num-threads` and OMP_NUM_THREADS for the mergekit-yaml command)",
        f"- Load average (1 min): {run['load_start']:.2f} at the start, {run['load_end']:.2f} at the end; "
        f"1-minute load after each candidate: min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
        f"max {max(loads):.2f}. The loops take turns going first, candidate by candidate, so other jobs on the "
        "machine hit all of them alike.",
        f"- Versions: evomerge {md.version('evomerge')}, mergekit {md.version('mergekit')}, "
        f"transformers {md.version('transformers')}, optuna {md.version('optuna')}",
        f"- Models: {run['models']}; base + {len(run['sources'])} sources ({', '.join(run['sources'])}), "
        f"{run['arch']}, {run['numel'] / 1e6:.1f}M parameters each, stored in {run['stored']}; evomerge holds them "
        f"resident as stored and scores in {run['score_dtype']}, the mergekit loops load their output in it",
        f"- Tasks: {run['tasks']} (configs/tasks/smol.yaml, chat template); search split, {run['examples']} rows "
        "per candidate; objective: mean exact_match of "
        + ", ".join(f"{t} × {w:g}" for t, w in run["objective"].items()),
        f"- Candidates: {n} recipes ({methods}), {run['layer_groups']} layer groups, drawn by optuna's RandomSampler "
        f"(seed {run['seed']}) from evomerge's search space; the same recipes in every loop",
        "",
        "## Result",
        "",
        "| loop | candidates timed | per trial, median (s) | CPU s per trial, median | candidates per hour "
        "| vs evomerge | one-time setup (s) |",
        "|---|---|---|---|---|---|---|",
        f"| evomerge `SearchSession.run` (SQLite study) | {n} | {ours_s:.2f} | {median(ours, 'total', cpu=True):.2f} | "
        f"{3600 / ours_s:,.0f} | 1× | {run['ours_setup']:.1f} |",
        f"| mergekit `run_merge` in process + `from_pretrained` + same evaluation | {n} | {theirs_s:.2f} | "
        f"{median(theirs, 'total', cpu=True):.2f} | {3600 / theirs_s:,.0f} | {speedup:.1f}× slower | — |",
    ]
    if cli:
        cli_s = median(cli, "total")
        lines.append(f"| same, merging with the `mergekit-yaml` command (a process per candidate) | {len(cli)} | "
                     f"{cli_s:.2f} | {median(cli, 'total', cpu=True):.2f} | {3600 / cli_s:,.0f} | "
                     f"{cli_s / median(ours[:len(cli)], 'total'):.1f}× slower (same candidates) | — |")
    lines += [
        f"| floor: merge floor + evaluation floor | {n} | {floor_s:.2f} | "
        f"{median(floors, 'merge floor', cpu=True) + median(floors, 'eval floor', cpu=True):.2f} | "
        f"{3600 / floor_s:,.0f} | evomerge takes {vs_floor:.2f}× this | — |",
        "",
        f"- **Per trial vs the floors: {vs_floor:.2f}× (merge floor + evaluation floor); target ≤ {FLOOR_TARGET:g}×: "
        f"{ratio_verdict(vs_floor <= FLOOR_TARGET)}.** Per candidate: {', '.join(f'{r:.2f}×' for r in per_floor)}.",
        f"- **Candidates per hour vs the in-process mergekit loop: {speedup:.1f}× (by CPU time "
        f"{median(theirs, 'total', cpu=True) / median(ours, 'total', cpu=True):.1f}×); target ≥ {SPEEDUP_TARGET:g}×: "
        f"{ratio_verdict(speedup >= SPEEDUP_TARGET)}.**",
        "",
        "One-time setup: evomerge opens the sources, loads the resident model, precomputes the TIES threshold "
        "tables and tokenizes the tasks (`SearchSession(...)`); the mergekit loops read the task rows once.",
        "",
        "## Where a trial's time goes (median seconds per step)",
        "",
        "| loop | step | wall (s) | CPU (s) | share of the loop's median |",
        "|---|---|---|---|---|",
    ]
    for c in ours:
        c.wall["bookkeeping"] = c.wall["total"] - c.wall["materialize"] - c.wall["eval"]
    steps = [
        ("evomerge", ours, [("materialize", "merge: `ResidentMerger.materialize` (in place)"),
                            ("eval", "evaluation: `Evaluator.evaluate` (resident model, tokens prepared once)"),
                            ("bookkeeping", "study bookkeeping: ask, suggest, decode, tell, user attrs (SQLite)")]),
        ("mergekit", theirs, [("yaml", "write the mergekit YAML"),
                              ("merge", "`run_merge`: read sources, merge, write safetensors + tokenizer + card"),
                              ("load", "`from_pretrained` model + tokenizer"),
                              ("eval setup", "`Evaluator(...)`: tokenize the rows for this model object"),
                              ("eval", "`Evaluator.evaluate`"),
                              ("cleanup", "delete the merged folder")]),
    ]
    if cli:
        steps.append(("mergekit-yaml", cli, [("merge", "`mergekit-yaml` command: start Python, import, merge, "
                                                       "write"), ("load", "`from_pretrained` model + tokenizer"),
                                             ("eval", "`Evaluator.evaluate`")]))
    steps.append(("floor", floors, [("merge floor", f"merge floor: one `copy_` of {gb / 2e9:.2f} GB ({gb / 1e9:.2f} "
                                                    "GB moved)"),
                                    ("eval floor", "evaluation floor: `generate_floor` per task, same rows")]))
    for loop, clocks, names in steps:
        total = median(clocks, "total") if loop != "floor" else floor_s
        for step, label in names:
            wall = median(clocks, step)
            cpu = f"{median(clocks, step, cpu=True):.2f}" if step in clocks[0].cpu else "—"
            lines.append(f"| {loop} | {label} | {wall:.3f} | {cpu} | {100 * wall / total:.0f}% |")
    book = median(ours, "bookkeeping")
    settled = ", ".join(f"{k} {v:.1f}" for k, v in sorted(run["settled"].items())) or "none recorded"
    mat, ev = median(ours, "materialize"), median(ours, "eval")
    lines += [
        "",
        f"Where the time goes: evaluation is {100 * ev / ours_s:.0f}% of an evomerge trial ({ev:.2f} s against a "
        f"floor of {eval_floor:.2f} s, {ev / eval_floor:.2f}×), the merge {100 * mat / ours_s:.0f}% ({mat:.2f} s "
        f"against a floor of {merge_floor:.3f} s, {mat / merge_floor:.1f}×) and the study's bookkeeping "
        f"{100 * book / ours_s:.0f}% ({book:.3f} s). The merge floor counts the bytes only: the kernel reads the "
        f"resident base and experts ({run['read_bytes'] / 1e9:.2f} GB, bf16 as stored) and writes the model "
        f"({run['written_bytes'] / 1e9:.2f} GB); the arithmetic runs in float32 on top, and ties also forms the "
        f"task vectors' magnitudes to trim and elects signs. The mergekit loop pays "
        f"{sum(median(theirs, step) for step in ('merge', 'load', 'eval setup', 'cleanup')):.2f} s "
        f"per trial around the same evaluation ({median(theirs, 'eval'):.2f} s): reading the safetensors, writing "
        "the merged model, loading it back and tokenizing the rows again for the new model object. "
        f"The evaluation floor does no prefix sharing and no target drafting; it stops a row only at the "
        f"end-of-sequence token, not at the tasks' `\\n` stop string ({run['floor_past']} rows of "
        f"{run['examples'] * n} ran past one), and its exact_match equals evomerge's in "
        f"{run['floor_same']} of {run['floor_checked']} (task, candidate) pairs. evomerge's evaluation settles "
        f"a row without decoding it where it can; rows per trial, on average: {settled} (target: one teacher-forced "
        "pass over prompt + target + end-of-turn proved the greedy output; redraft: a second such pass; ruled out: "
        "the proven first tokens already miss the target; decoded: the KV-cache loop, as the floor does for every "
        "row). Where few rows need decoding, evomerge's evaluation is below the floor.",
        "",
        "## Agreement between the loops",
        "",
        "| # | method | objective | entries differing from the mergekit loop | largest difference "
        "| where they differ | |score difference| | mergekit-yaml = run_merge |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, check in enumerate(run["checks"]):
        share = f"{check['differ']:,} of {check['total']:,} ({100 * check['differ'] / check['total']:.3f}%)"
        cli_same = {True: "bit-identical", False: "**differs**", None: "—"}[check["cli_same"]]
        lines.append(f"| {i} | {run['methods'][i]} | {run['objectives'][i]:.4f} | {share} | {check['largest']:.3g} "
                     f"| {check['explained']} | {check['score']:.3g} | {cli_same} |")
    ta = [c for c, m in zip(run["checks"], run["methods"]) if m == "task_arithmetic"]
    lines += [
        "",
        "task_arithmetic: expected bit-identical to mergekit (float32 arithmetic in mergekit's order, bf16 out); "
        + (f"{sum(c['differ'] == 0 for c in ta)} of {len(ta)} were." if ta else "no candidate drew it.")
        + " ties: evomerge keeps every entry tied with the k-th largest |delta|, mergekit exactly k (an unstable "
        "sort picks which), and bf16 task vectors tie often; a difference 'at trim ties' is such an entry "
        "(METHODS.md, results/mergekit_bf16.md). A score difference is a row whose greedy answer changed.",
        "",
        "## Per candidate (wall seconds)",
        "",
        "| # | method | evomerge: merge / eval / bookkeeping / trial | mergekit loop | mergekit-yaml loop "
        "| merge floor | eval floor | trial / floors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, (o, t, f) in enumerate(zip(ours, theirs, floors)):
        c = f"{cli[i].wall['total']:.2f}" if i < len(cli) else "—"
        lines.append(f"| {i} | {run['methods'][i]} | {o.wall['materialize']:.2f} / {o.wall['eval']:.2f} / "
                     f"{o.wall['bookkeeping']:.3f} / {o.wall['total']:.2f} | {t.wall['total']:.2f} | {c} | "
                     f"{f.wall['merge floor']:.3f} | {f.wall['eval floor']:.2f} | {per_floor[i]:.2f}× |")
    if run["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in run["notes"]]
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="the smol zoo (default: built under --workdir)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge-bench-real"))
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--cli-candidates", type=int, default=2,
                        help="also run this many candidates with the mergekit-yaml command (a process each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer-groups", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load_start = load_average()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from evomerge.config import load_config, tasks_path
    from evomerge.evaluate import load_tasks
    from evomerge.search import SearchSession

    args.workdir.mkdir(parents=True, exist_ok=True)
    models, zoo = open_zoo(args.zoo.resolve() if args.zoo else None, args.workdir, seed=args.seed)
    os.environ["EVOMERGE_SMOL_ZOO"] = str(zoo)   # configs/tasks/smol.yaml names its rows smol/data/...
    config = load_config(write_config(zoo, args.workdir, candidates=args.candidates, seed=args.seed,
                                      layer_groups=args.layer_groups))
    run_dir, merged = args.workdir / "run", args.workdir / "mergekit"
    for folder in (run_dir, merged):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    start = time.perf_counter()
    session = SearchSession(config, storage_url=f"sqlite:///{run_dir / 'study.db'}", device="cpu", progress=False)
    ours_setup = time.perf_counter() - start
    candidates = draw_candidates(session, args.candidates, seed=args.seed)
    suite = load_tasks(tasks_path(config), seed=config.search.seed)
    merger = session.merger
    merge_floor = MergeFloor(merger)
    eval_floor = evaluation_floor(session)
    for fn in eval_floor.values():   # a warm-up call (on the base's weights): the first call of a shape costs seconds
        fn()
    session.evaluator.stats.clear()
    loaded = dict(threads=threads, keep_tokenizer_source=len(session.tokenizer) ==
                  merger.model.get_input_embeddings().weight.shape[0], dtype=merger.score_dtype)

    ours, theirs, cli, floors = [], [], [], []
    methods, objectives, loads, checks = [], [], [], []
    floor_past = floor_same = floor_checked = 0
    with session, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (params, drawn) in enumerate(candidates):
            loops = {"evomerge": lambda: evomerge_candidate(session, i, params),
                     "mergekit": lambda: mergekit_candidate(drawn, session.sources, suite, config, merged, **loaded)}
            if i < args.cli_candidates:
                loops["cli"] = lambda: mergekit_candidate(drawn, session.sources, suite, config, merged, cli=True,
                                                          **loaded)
            names = list(loops)
            names = names[i % len(names):] + names[:i % len(names)]   # take turns going first
            done = {name: loops[name]() for name in names}
            recipe, our_scores, our_clock = done["evomerge"]
            if recipe.sha256() != drawn.sha256():
                raise RuntimeError(f"candidate {i}: the study ran another recipe than the one drawn")
            floor = Clock()   # the resident model still holds candidate i
            with floor.step("merge floor"):
                merge_floor()
            outputs = {}
            with floor.step("eval floor"):
                for name, fn in eval_floor.items():
                    outputs[name] = fn()
            floor.wall["total"] = floor.wall["merge floor"] + floor.wall["eval floor"]
            scores, past = floor_scores(session, outputs)
            floor_past += past
            floor_same += sum(scores[t] == our_scores[t]["exact_match"] for t in scores)
            floor_checked += len(scores)
            check = agreement(merger, recipe, done["mergekit"][2])
            check["score"] = score_difference(our_scores, done["mergekit"][0])
            check["cli_same"] = same_tensors(done["mergekit"][2], done["cli"][2]) if "cli" in done else None
            checks.append(check)
            ours.append(our_clock)
            theirs.append(done["mergekit"][1])
            if "cli" in done:
                cli.append(done["cli"][1])
            floors.append(floor)
            methods.append(recipe.method)
            objectives.append(our_scores["objective"])
            loads.append(load_average())
            print(f"candidate {i} {recipe.method:15s} evomerge {our_clock.wall['total']:.2f} s (merge "
                  f"{our_clock.wall['materialize']:.2f}, eval {our_clock.wall['eval']:.2f})   mergekit loop "
                  f"{done['mergekit'][1].wall['total']:.2f} s"
                  + (f"   mergekit-yaml loop {done['cli'][1].wall['total']:.2f} s" if "cli" in done else "")
                  + f"   floors {floor.wall['merge floor']:.3f} + {floor.wall['eval floor']:.2f} s   objective "
                  f"{our_scores['objective']:.4f}   differing entries {check['differ']}   |score diff| "
                  f"{check['score']:.3g}   load {loads[-1]:.2f}", flush=True)
            del done
        model = merger.model
        run = {
            "arch": type(model).__name__, "numel": sum(p.numel() for p in model.parameters()),
            "stored": str(merger.sources.layout.float_dtype).removeprefix("torch."),
            "score_dtype": str(merger.score_dtype).removeprefix("torch."),
            "tasks": ", ".join(f"`{n}` ({session.suite.spec(n).type}, ≤ {session.suite.spec(n).max_new_tokens} "
                               "new tokens)" for n in session.suite.names),
            "examples": sum(len(v) for (_, split), v in session.evaluator._examples.items() if split == "search"),
            "settled": {k: v / len(candidates) for k, v in session.evaluator.stats.items() if v},
        }
    notes: list[str] = []
    if not loaded["keep_tokenizer_source"]:
        notes.append(TOKENIZER_NOTE.format(tokens=len(session.tokenizer),
                                           rows=model.get_input_embeddings().weight.shape[0]))
    notes += sorted({f"warning seen: {w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught})
    run.update({
        "threads": threads, "threads_given": bool(args.threads),
        "load_start": load_start, "load_end": load_average(), "loads": loads, "models": models,
        "sources": [Path(s).name for s in config.sources], "objective": config.objectives[0], "seed": args.seed,
        "layer_groups": args.layer_groups, "command": command(argv), "elapsed": time.perf_counter() - started,
        "ours": ours, "theirs": theirs, "cli": cli, "floors": floors, "ours_setup": ours_setup,
        "methods": methods, "objectives": objectives, "checks": checks, "notes": notes,
        "floor_bytes": 2 * merge_floor.src.nbytes, "read_bytes": merge_floor.read,
        "written_bytes": merge_floor.written, "floor_past": floor_past, "floor_same": floor_same,
        "floor_checked": floor_checked,
    })
    text = report(run)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
