"""Search overhead: the share of a trial's wall time spent outside merging and evaluation.

Runs the demo's search (configs/demo.yaml on the local zoo, its sampler and storage: SQLite in a
fresh run folder) for --trials trials and times the whole loop, `SearchSession.run`. Each trial
records the seconds its merge (`materialize`) and its evaluation took; the overhead is everything
else in the loop: sampling, the storage's reads and writes, the budget checks, the progress bar.

    overhead = (loop wall time − Σ merge − Σ evaluation) / loop wall time

With --profile, the top functions of the loop by cumulative time (cProfile) are printed too.

    python benchmarks/bench_overhead.py --trials 120 --out results/bench_overhead.md
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import datetime
import io
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 0.10


SAMPLER_CALLS = ("infer_relative_search_space", "sample_relative", "sample_independent", "before_trial",
                 "after_trial")
STORAGE_CALLS = ("get_all_trials", "set_trial_param", "set_trial_user_attr", "set_trial_state_values",
                 "create_new_trial", "get_trial", "get_study_user_attrs", "set_study_user_attr", "record_heartbeat")


def _timed(obj: object, name: str, label: str, totals: collections.Counter) -> None:
    """Wrap obj.name so that its wall time adds up in totals[label]."""
    inner = getattr(obj, name, None)
    if inner is None:
        return

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def measure(config_path: Path, trials: int, *, profile: bool) -> dict:
    from evomerge.config import load_config
    from evomerge.demo import ensure_zoo
    from evomerge.propose import AheadProposer, InlineProposer
    from evomerge.search import SearchSession

    ensure_zoo()
    config = load_config(config_path)
    parts: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'study.db'}"
        with SearchSession(config, storage_url=storage, device="cpu", progress=False) as session:
            for name in SAMPLER_CALLS:
                _timed(session.sampler, name, f"sampler `{name}`", parts)
            for name in STORAGE_CALLS:
                _timed(session.study._storage, name, f"storage `{name}`", parts)
            for cls in (AheadProposer, InlineProposer):   # waiting for (or running) the sampler
                _timed(cls, "take", f"`{cls.__name__}.take`", parts)
            profiler = cProfile.Profile() if profile else None
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            session.run(trials)
            if profiler:
                profiler.disable()
            wall = time.perf_counter() - start
            seconds = [t.user_attrs.get("seconds", {}) for t in session.study.get_trials()]
    merge = sum(s.get("merge", 0.0) for s in seconds)
    evaluate = sum(s.get("eval", 0.0) for s in seconds)
    top = ""
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(40)
        top = buf.getvalue()
    search = config.search
    setup = (f"{config_path.name}: {len(config.sources)} sources, {len(search.methods)} techniques, "
             f"{search.layer_groups} layer groups, sampler {search.sampler}, SQLite storage")
    return {"trials": len(seconds), "wall": wall, "merge": merge, "eval": evaluate, "profile": top, "parts": parts,
            "setup": setup}


def report(r: dict, command: str) -> str:
    other = r["wall"] - r["merge"] - r["eval"]
    share = other / r["wall"]
    n = r["trials"]
    verdict = "met" if share <= TARGET else "**missed**"
    return "\n".join([
        "# Search overhead", "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        f"- Command: `{command}`",
        f"- The search of {r['setup']}; {n} trials, one process, CPU", "",
        "| | total (s) | per trial (ms) | share of the loop |",
        "|---|---|---|---|",
        f"| merge (`materialize`) | {r['merge']:.2f} | {1000 * r['merge'] / n:.1f} | {r['merge'] / r['wall']:.1%} |",
        f"| evaluation | {r['eval']:.2f} | {1000 * r['eval'] / n:.1f} | {r['eval'] / r['wall']:.1%} |",
        f"| everything else (sampler, storage, checks) | {other:.2f} | {1000 * other / n:.1f} | {share:.1%} |",
        f"| the loop | {r['wall']:.2f} | {1000 * r['wall'] / n:.1f} | 100% |", "",
        f"Overhead {share:.1%} of the loop (target ≤ {TARGET:.0%}: {verdict}).", "",
        "Where the overhead goes (wall ms per trial; the sampler's own storage reads are counted in both its "
        "line and the storage's, and the heartbeat runs in a thread beside the trial):", "",
        "| call | ms per trial |", "|---|---|"]
        + [f"| {label} | {1000 * t / n:.1f} |" for label, t in r["parts"].most_common() if 1000 * t / n >= 0.5]
        + [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--profile", action="store_true", help="print the loop's top functions (cProfile)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = measure(args.config, args.trials, profile=args.profile)
    text = report(result, "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(text)
    if args.profile:
        print(result["profile"])
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
