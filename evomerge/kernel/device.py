"""Where and in which dtypes a merge runs: the device, the scoring dtype, the piece size of an eager merge."""

from __future__ import annotations

import torch

from ..cpu import cpu_flags
from ..errors import InputError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


CHUNK = 1 << 17          # elements per piece of an elementwise merge on the CPU: temporaries stay in cache
DEVICE_CHUNK = 1 << 26   # on a GPU: each torch op is a kernel launch (~10 us from Python), so pieces as large
                         # as memory allows; 64M elements bound a piece's temporaries to a few hundred MB


def chunk_elements(device: torch.device) -> int:
    """Elements per piece of an eager elementwise merge on `device`."""
    return CHUNK if device.type == "cpu" else DEVICE_CHUNK


def scoring_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a model is scored in: the stored one, except bf16/fp16 on a CPU without native matmuls for it,
    where it runs in float32 (emulated half matmuls are several times slower than float32's; native ones faster:
    results/real_scoring.md). The weights are the same values, upcast exactly; storage and export keep the
    stored dtype. A GPU scores in the stored dtype."""
    if device.type == "cpu" and stored in (torch.bfloat16, torch.float16) and stored not in fast_cpu_dtypes():
        return torch.float32
    return stored


def fast_cpu_dtypes(flags: frozenset[str] | None = None) -> frozenset[torch.dtype]:
    """Half-precision dtypes this CPU multiplies natively (its /proc/cpuinfo flags: AVX512-BF16 or AMX-BF16,
    AVX512-FP16 or AMX-FP16; Arm's BF16 and FP16 extensions)."""
    flags = cpu_flags() if flags is None else flags
    fast = set()
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        fast.add(torch.bfloat16)
    if flags & {"avx512_fp16", "amx_fp16", "asimdhp"}:
        fast.add(torch.float16)
    return frozenset(fast)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available", field="device",
                         fix="use --device cpu or install a CUDA build of torch")
    return dev
