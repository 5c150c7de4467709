"""The local model zoo: a small base model and task experts, trained on CPU in about a minute.

``build_zoo(OUT)`` writes::

    OUT/base/            the base: knows every skill's format, echoes the input
    OUT/<skill>/         one expert per skill, fine-tuned from the base
    OUT/lora/<skill>/    one LoRA adapter per skill over the base, in PEFT's format (lora.py)
    OUT/data/<task>.{search,heldout}.jsonl
    OUT/tasks.yaml       the task file (generate and choice tasks, paths relative to it)
    OUT/zoo.json         the manifest: seed, size, skills, groups, each expert's own task, the adapters

Each model folder is a real Hugging Face folder (Llama config, safetensors,
a WordLevel tokenizer), loadable offline with ``AutoModelForCausalLM`` and
``AutoTokenizer``. The compatible skills (``inc``, ``rot``, ``mir``) each rewrite
a disjoint alphabet, so a merge with tuned weights recovers most of each skill
(an untuned one does not: the headroom a merge search is for); the
conflicting pair (``rev``, ``sort``) reorders the same digits in two ways, a
control where merging fails. Same seed and size, same bytes.

``build_zoo(OUT, size="smol")`` builds the smol zoo instead: SmolLM2-135M-Instruct
and three experts fine-tuned from it on natural-language skills, plus a task
that needs two of them at once (smol_build.py; about 25 minutes on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import InputError, suggest
from .sizes import SMOL_SIZES, ZOO_SIZES, SmolSize, ZooSize
from .version import MANIFEST, ZOO_VERSION, is_current, read_manifest

__all__ = ["SMOL_SIZES", "ZOO_SIZES", "SmolSize", "ZooSize", "build_zoo", "MANIFEST", "ZOO_VERSION", "is_current",
           "read_manifest"]

def build_zoo(out: str | Path, *, seed: int = 0, size: str = "tiny", force: bool = False,
              progress: bool = True) -> Path:
    """Train and write the zoo into `out`; return its path.

    Bad input (an unknown size, an existing non-empty `out` without `force`, a
    folder that cannot be written) raises InputError before anything is
    written. The zoo is built in a temporary folder beside `out` and renamed
    into place at the end, so `out` is never left half-built.
    """
    spec = _size(size)
    out = Path(out).expanduser().absolute()
    _check_target(out, force=force)
    staging = _staging_folder(out)
    try:
        log = _logger(progress)
        if isinstance(spec, SmolSize):
            from .smol_build import build_smol_into

            build_smol_into(staging, spec, seed=seed, size_name=size, log=log, progress=progress)
        else:
            from .build import build_into

            build_into(staging, spec, seed=seed, size_name=size, log=log)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _size(name: str) -> ZooSize | SmolSize:
    sizes: dict[str, ZooSize | SmolSize] = {**ZOO_SIZES, **SMOL_SIZES}
    if name in sizes:
        return sizes[name]
    hint = suggest(name, sizes) or f"choose one of {', '.join(sizes)}"
    raise InputError(f"unknown zoo size '{name}'", field="size", fix=hint)


def _check_target(out: Path, *, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", file=out, fix="choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError("folder exists and is not empty", file=out,
                         fix="pass --force (force=True) to replace it, or choose another folder")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create the folder: {ancestor} is not a folder", file=out,
                         fix="choose a folder you can write to")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write in {ancestor}", file=out, fix="choose a folder you can write to")


def _staging_folder(out: Path) -> Path:
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as err:
        raise InputError(f"cannot write here: {err.strerror or err}", file=out,
                         fix="choose a folder you can write to") from None
    return staging


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    retired = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.replace(out, retired)
    os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


def _logger(progress: bool):
    start = time.perf_counter()

    def log(message: str) -> None:
        if progress:
            print(f"zoo [{time.perf_counter() - start:5.1f}s] {message}", file=sys.stderr, flush=True)

    return log
