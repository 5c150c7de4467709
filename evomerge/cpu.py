"""The CPU's feature flags (Linux's /proc/cpuinfo), read once: which half-precision dtypes it multiplies
natively (kernel/device.py) and what `-march=native` compiles the fused kernel for (methods/fused.py)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU listed (x86 `flags`, Arm `Features`); empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
