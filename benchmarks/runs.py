"""Repeated runs of a benchmark (shared by lorahub.py and dfs.py): mean ± std over seeds, and the runs of
several processes (`--save` in each) reported together (`--load`)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Callable


def mean_std(values: list[float]) -> str:
    """'mean ± std' over seeds ('mean' for one)."""
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--save", default=None, help="write the runs as JSON here (to merge processes with --load)")
    parser.add_argument("--load", default=None, help="comma-separated JSON files of earlier runs: report only")


def runs_from(args: argparse.Namespace, measure: Callable[[], list[dict]]) -> list[dict]:
    """The runs `--load` names, else measured now; written to `--save` where given."""
    if args.load:
        runs = [run for file in args.load.split(",") for run in json.loads(Path(file).read_text())]
    else:
        runs = measure()
    if args.save:
        Path(args.save).write_text(json.dumps(runs))
    return runs
