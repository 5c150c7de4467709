"""The machine a benchmark ran on, in one line for its report (shared by the benchmarks)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> str:
    """'CPU model, N logical cores, R GiB RAM, OS release' (from /proc where it exists)."""
    cpu = platform.processor() or platform.machine() or "?"
    ram = "RAM unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
                      .split()[1])
        ram = f"{mem_kib / 1024**2:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {ram}, {platform.system()} {platform.release()}"
