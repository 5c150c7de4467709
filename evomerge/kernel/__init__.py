"""The merge kernel: a plan's tensors written in place on one device.

- device.py: where and in which dtypes a merge runs;
- memory.py: what a merge needs against a memory budget, resident or streaming;
- stores.py: the sources' tensors as the kernel reads them (dense, as stored, low rank, streaming);
- merger.py: ResidentMerger, whose `materialize(plan)` is the hot loop.

From a recipe file to a merged model: build.py.
"""

from __future__ import annotations

from .device import TORCH_DTYPES, chunk_elements, fast_cpu_dtypes, pick_device, scoring_dtype
from .memory import MemoryPlan, in_use_bytes, parse_bytes
from .merger import MergerOptions, NonFiniteMerge, ResidentMerger, TensorStream
from .stores import TensorStore

__all__ = ["TORCH_DTYPES", "MemoryPlan", "MergerOptions", "NonFiniteMerge", "ResidentMerger", "TensorStore",
           "TensorStream", "chunk_elements", "fast_cpu_dtypes", "in_use_bytes", "parse_bytes", "pick_device",
           "scoring_dtype"]
