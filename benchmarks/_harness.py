"""What the benchmarks share: a report's header (machine, date, command as run), interleaved wall and CPU timing,
a child-process runner, the load average, one std, repeated runs (`--save` / `--load`) and the tests' helper
modules. A benchmark run as a script (`python benchmarks/bench_x.py`) imports it as `_harness`: the script's folder
is the first place Python looks for modules."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# The report's header


def describe() -> str:
    """'CPU model, N logical cores, R GiB RAM, OS release' (from /proc where it exists)."""
    cpu = platform.processor() or platform.machine() or "?"
    ram = "RAM unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        total = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        ram = f"{int(total.split()[1]) / 1024**2:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {ram}, {platform.system()} {platform.release()}"


def command(argv: Sequence[str] | None = None) -> str:
    """The command as run, 'python benchmarks/bench_x.py --flag v': the script relative to the repository where
    it is in it, then `argv` (default: this process's arguments), quoted where the shell needs it."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO).as_posix() if script.is_relative_to(REPO) else sys.argv[0]
    return shlex.join(["python", shown, *(sys.argv[1:] if argv is None else argv)])


def header(title: str, *, cmd: str | None = None, elapsed: float | None = None) -> list[str]:
    """A report's first lines: its title, then bullets for the machine, the date (UTC) with the torch and Python
    versions, and the command (`cmd`, default `command()`; with the run's `elapsed` seconds where given)."""
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "not installed"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    took = f" ({elapsed / 60:.1f} min in all)" if elapsed is not None else ""
    return [f"# {title}", "", f"- Machine: {describe()}",
            f"- Date: {date}; torch {torch}, Python {platform.python_version()}",
            f"- Command: `{cmd or command()}`{took}"]


# ------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median seconds of one callable: wall clock, and this process's CPU time (all its threads)."""

    wall: float
    cpu: float


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, *, warmup: int = 1) -> dict[str, Timing]:
    """The median wall and CPU seconds of each callable over `repeats` rounds, after `warmup` untimed calls of
    each. Every round calls each callable once, in turn, so that other load on the machine hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: Timing(statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for name, t in times.items()}


def load_average() -> float:
    """The 1-minute load average (NaN where unknown): other processes on the cores skew every timing."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return float("nan")


# ------------------------------------------------------------------------------------------------
# Child processes


class ChildError(RuntimeError):
    """A child process that failed; `stderr` holds what it wrote there."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{shlex.join(argv)} exited {returncode}:\n{stderr[-2000:]}")
        self.returncode, self.stderr = returncode, stderr


@dataclasses.dataclass(frozen=True)
class Child:
    """A finished child process: its wall seconds (start-up included), exit status, output and peak resident
    memory (bytes; its own, not its children's)."""

    wall: float
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int = 0

    def json(self) -> Any:
        """The last line of its stdout, parsed as JSON (what a benchmark's worker prints)."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def run_child(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float | None = None,
              check: bool = True) -> Child:
    """Run `argv` to its end, its output captured as text, with `env` set over this process's environment.
    With `check`, a non-zero exit raises ChildError carrying its stderr; past `timeout`, TimeoutExpired."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, text=True,
                                env={**os.environ, **env} if env is not None else None)
        timer = threading.Timer(timeout, proc.kill) if timeout is not None else None
        if timer is not None:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)       # its own resource usage, as it ends
        wall = time.perf_counter() - start
        if timer is not None:
            timer.cancel()
        proc.returncode = returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        child = Child(wall, returncode, out.read(), err.read(), peak_rss=usage.ru_maxrss * 1024)
    if timeout is not None and wall >= timeout and returncode < 0:
        raise subprocess.TimeoutExpired(list(argv), timeout, child.stdout, child.stderr)
    if check and returncode != 0:
        raise ChildError(argv, returncode, child.stderr)
    return child


# ------------------------------------------------------------------------------------------------
# Statistics and repeated runs


def std(values: Sequence[float]) -> float:
    """The sample standard deviation (0.0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± std' to `digits` decimals ('mean' for one value, '—' for none)."""
    if not values:
        return "—"
    return f"{statistics.fmean(values):.{digits}f}" + (f" ± {std(values):.{digits}f}" if len(values) > 1 else "")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """`--save` and `--load`: the runs of several processes reported together."""
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


# ------------------------------------------------------------------------------------------------
# The tests' helpers


def tests_module(name: str) -> ModuleType:
    """tests/<name>.py as the module `name` (the test suite's model factories and toys), loaded once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
