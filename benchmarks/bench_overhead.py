"""Search overhead: the share of a trial's wall time spent outside merging and evaluation.

Runs the demo's search (configs/demo.yaml on the local zoo and its storage, SQLite in a fresh run
folder; with --sampler, default tpe+cmaes, the model-based sampler whose overhead this measures: the demo
itself learns its weights by gradient, adamerging) for --trials trials and times the whole loop,
`SearchSession.run`. Each trial records the seconds its merge (`materialize`) and its evaluation took; the
overhead is everything else in the loop: sampling, the storage's reads and writes, the budget checks, the
progress bar.

    overhead = (loop wall time − Σ merge − Σ evaluation) / loop wall time

The search runs twice, in one process: sampling each trial ahead in the sampler process (the
default, evomerge/propose.py) and sampling inline, the baseline. With --profile, the top
functions of the loop by cumulative time (cProfile) are printed too.

    python benchmarks/bench_overhead.py --trials 200 --out results/bench_overhead.md
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import functools
import io
import os
import pstats
import tempfile
import time
from pathlib import Path

from _harness import REPO, command, header

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET = 0.10


SAMPLER_CALLS = ("infer_relative_search_space", "sample_relative", "sample_independent", "before_trial",
                 "after_trial")
STORAGE_CALLS = ("get_all_trials", "set_trial_param", "set_trial_user_attr", "set_trial_state_values",
                 "create_new_trial", "get_trial", "get_study_user_attrs", "set_study_user_attr", "record_heartbeat")


@contextlib.contextmanager
def _timed(obj: object, name: str, label: str, totals: collections.Counter):
    """While inside, obj.name adds its wall time up in totals[label]."""
    inner = getattr(obj, name, None)
    if inner is None:
        yield
        return

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, inner)


def measure(config_path: Path, trials: int, *, ahead: bool, profile: bool, sampler: str | None = None) -> dict:
    """One search of `trials` trials in a fresh storage, sampled ahead or inline."""
    from evomerge.config import load_config
    from evomerge.propose import AheadProposer, InlineProposer
    from evomerge.search import SearchSession

    config = load_config(config_path)
    if sampler:
        config = config.model_copy(update={"search": config.search.model_copy(update={"sampler": sampler})})
    parts: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as timing:
        storage = f"sqlite:///{Path(tmp) / 'study.db'}"
        with SearchSession(config, storage_url=storage, device="cpu", progress=False) as session:
            for name in SAMPLER_CALLS:
                timing.enter_context(_timed(session.sampler, name, f"sampler `{name}`", parts))
            for name in STORAGE_CALLS:
                timing.enter_context(_timed(session.study._storage, name, f"storage `{name}`", parts))
            for cls in (AheadProposer, InlineProposer):   # waiting for (or running) the sampler
                timing.enter_context(_timed(cls, "take", f"`{cls.__name__}.take`", parts))
            started = time.perf_counter()
            if ahead:   # started with the workbench; its imports are setup, once per run, like loading the weights
                session.bench.sampler_process().wait_ready()
            startup = time.perf_counter() - started
            profiler = cProfile.Profile() if profile else None
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            session.run(trials, ahead=ahead)
            if profiler:
                profiler.disable()
            wall = time.perf_counter() - start
            seconds = [t.user_attrs.get("seconds", {}) for t in session.study.get_trials()]
    top = ""
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(40)
        top = buf.getvalue()
    search = config.search
    setup = (f"{config_path.name}: {len(config.sources)} sources, {len(search.methods)} techniques, "
             f"{search.layer_groups} layer groups, sampler {search.sampler}, SQLite storage")
    return {"startup": startup, "trials": len(seconds), "wall": wall,
            "merge": sum(s.get("merge", 0.0) for s in seconds), "eval": sum(s.get("eval", 0.0) for s in seconds),
            "profile": top, "parts": parts, "setup": setup}


MODES = {"ahead": "trial n+1 sampled in the sampler process while trial n runs (the default)",
         "inline": "each trial sampled in the search process when it is taken (EVOMERGE_SAMPLE_INLINE=1)"}


def report(runs: dict[str, dict], cmd: str) -> str:
    first = next(iter(runs.values()))
    lines = [
        *header("Search overhead", cmd=cmd),
        f"- The search of {first['setup']}; {first['trials']} trials per run, CPU, one run per mode "
        "in one process, each in a fresh storage:",
        *[f"  - {mode}: {MODES[mode]}" for mode in runs], "",
        "| mode | merge (ms/trial) | evaluation (ms/trial) | everything else (ms/trial) | trial (ms) | overhead |",
        "|---|---|---|---|---|---|"]
    for mode, r in runs.items():
        n, other = r["trials"], r["wall"] - r["merge"] - r["eval"]
        lines.append(f"| {mode} | {1000 * r['merge'] / n:.1f} | {1000 * r['eval'] / n:.1f} | {1000 * other / n:.1f} "
                     f"| {1000 * r['wall'] / n:.1f} | {other / r['wall']:.1%} |")
    if "ahead" in runs:
        lines += ["", "Not in the loop: the wait, after the workbench had loaded, for the sampler process to finish "
                      "starting (its imports; once per run, like loading the weights): "
                      f"{runs['ahead']['startup']:.2f} s."]
    main_mode = "ahead" if "ahead" in runs else next(iter(runs))
    r = runs[main_mode]
    share = (r["wall"] - r["merge"] - r["eval"]) / r["wall"]
    lines += ["", f"Overhead of the default ({main_mode}) loop: {share:.1%} of the loop "
              f"(target ≤ {TARGET:.0%}: {'met' if share <= TARGET else '**missed**'}).", "",
              "Where the overhead goes, in the search process (wall ms per trial; calls inside another are counted "
              "in both lines; `AheadProposer.take` is the wait for the sampler process, whose own work is not "
              "listed):", "",
              "| call | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    labels = sorted({label for r in runs.values() for label in r["parts"]},
                    key=lambda label: -max(r["parts"][label] / r["trials"] for r in runs.values()))
    for label in labels:
        per = [1000 * r["parts"][label] / r["trials"] for r in runs.values()]
        if max(per) >= 0.5:
            lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in per) + " |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--sampler", default="tpe+cmaes", help="the config's sampler, replaced (empty: kept)")
    parser.add_argument("--modes", default="ahead,inline", help="comma-separated: ahead, inline")
    parser.add_argument("--profile", action="store_true", help="print the loop's top functions (cProfile)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from evomerge.demo import ensure_zoo

    ensure_zoo()
    runs = {mode: measure(args.config, args.trials, ahead=mode == "ahead", profile=args.profile,
                          sampler=args.sampler or None)
            for mode in args.modes.split(",")}
    text = report(runs, command(argv))
    print(text)
    if args.profile:
        for mode, r in runs.items():
            print(f"## {mode}\n{r['profile']}")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
