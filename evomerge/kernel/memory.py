"""Memory: what a merge needs against a budget (resident or streaming), what the process holds, and the C heap."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from .stores import TensorStore

@functools.cache
def _glibc():
    """The C library's handle where it is glibc (Linux), else None."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@functools.cache
def keep_chunk_temporaries_on_the_heap() -> None:
    """glibc serves allocations above 128 KiB with a fresh mmap, and every page of it faults on first touch:
    a chunk's temporaries (a few MiB) then cost more than the arithmetic on them. Raise the mmap threshold to 64 MiB so they are reused from the heap; whole tensors above
    it still map and unmap. Elsewhere than glibc nothing changes. Once per process, by the first merger on
    the CPU: importing evomerge changes nothing in the allocator."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 64 << 20)      # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)     # M_TRIM_THRESHOLD: keep up to 128 MiB freed at the heap's top


def return_freed_memory() -> None:
    """Hand memory freed to the C heap back to the OS, so the process's RSS tracks what it holds."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def in_use_bytes(device: torch.device) -> int:
    """Memory this process holds now: device memory on a GPU, resident set (RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # peak so far: an upper bound


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class MemoryPlan:
    """What a merge needs at its peak, resident and streaming, against a memory budget.

    The budget bounds the whole process (the device's memory on a GPU): what it holds
    already (interpreter, libraries), the merged model, and the merge's own tensors —
    every source's task vectors when resident; when streaming, one tensor's anchor,
    stack and temporaries at a time.
    """

    budget: int | None
    in_use: int
    model: int
    resident_need: int
    streaming_need: int

    @classmethod
    def of(cls, store: "TensorStore", *, out_dtype: torch.dtype, score_dtype: torch.dtype,
           budget: int | None, holds_outputs: bool = True) -> "MemoryPlan":
        """The needs of `store` held resident (stores.TensorStore, not yet loaded), merged into a model scored
        in `score_dtype` and exported in `out_dtype`; `holds_outputs` False: into one tensor at a time, written
        out before the next (a one-off merge)."""
        layout = store.sources.layout
        k = len(store.sources.sources)
        item = torch.empty((), dtype=store.compute_dtype).element_size()
        out_item = torch.empty((), dtype=out_dtype).element_size()
        score_item = torch.empty((), dtype=score_dtype).element_size()
        largest = max(info.numel for info in layout.tensors.values())
        if budget is not None and holds_outputs:
            import transformers  # noqa: F401  (what loading the model imports is part of what is in use)
        in_use = in_use_bytes(store.device) if budget is not None else 0
        # the scored model, plus the merged tensors in the output dtype where the model scores in another
        model = layout.numel * (score_item + (out_item if score_dtype != out_dtype else 0))
        if not holds_outputs:
            model = largest * out_item
        # One tensor at a time: its anchor, stack, fields and ranks (resident_bytes' copies, for this
        # tensor alone), then as much again for one source's read and the method's temporaries. Measured
        # on 3 sources of 100M parameters (results/bench_streaming.md): 6.4, 10.8 and 15.5 times the largest
        # tensor for ties, dare_ties and della, against 9, 15 and 21 here. The model costs a tenth more
        # than its weights (buffers, loading), the C heap 5 %.
        copies = 1 + k + store.field_copies()      # as float32 task vectors: a raw tensor forms them to merge
        per_tensor = (2 * copies + 1) * largest * item
        margin = 1.05
        resident = int((in_use + 1.1 * model + store.resident_bytes() + per_tensor) * margin)
        streaming = int((in_use + 1.1 * model + per_tensor) * margin)
        return cls(budget, in_use, model, resident, streaming)

    @property
    def streaming(self) -> bool:
        return self.budget is not None and self.resident_need > self.budget

    def check(self) -> None:
        if self.streaming and self.streaming_need > self.budget:
            raise InputError(
                f"{_gb(self.budget)} is below the {_gb(self.streaming_need)} this merge needs even "
                f"streaming (this process {_gb(self.in_use)}, the merged model {_gb(self.model)}, the largest "
                f"tensor's work {_gb(self.streaming_need - self.in_use - self.model)})", field="memory_budget",
                fix=f"raise it to at least {math.ceil(self.streaming_need / 1e8) / 10:g}GB")


def parse_bytes(value: int | str | None, *, device: torch.device) -> int | None:
    """'2GB', '512MiB', 123 or 'auto' (80 % of the device's free memory) -> bytes; None: no budget."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower().replace(" ", "")
    if text == "auto":
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.8)
        return int(_available_ram() * 0.8)
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise InputError(f"cannot read memory size {value!r}", field="memory_budget",
                         fix="write e.g. 2GB, 512MiB or auto") from None


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
