"""Where names in config files point.

A path in a config, recipe or task file is looked up, in order: as an absolute
path; relative to the file that names it; relative to the working directory;
and, when it starts with ``zoo/``, inside the local model zoo
(``$EVOMERGE_ZOO``, default ``~/.cache/evomerge/zoo``), or with ``smol/``, inside
the smol zoo (``$EVOMERGE_SMOL_ZOO``, default ``~/.cache/evomerge/smol``). A source that is none of
these is taken as a Hugging Face hub id (see sources.py).
"""

from __future__ import annotations

import os
from pathlib import Path

ZOO_PREFIX = "zoo/"
SMOL_PREFIX = "smol/"


def zoo_root() -> Path:
    env = os.environ.get("EVOMERGE_ZOO")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evomerge" / "zoo"


def smol_root() -> Path:
    env = os.environ.get("EVOMERGE_SMOL_ZOO")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evomerge" / "smol"


ROOTS = {ZOO_PREFIX: zoo_root, SMOL_PREFIX: smol_root}   # a path under one of these prefixes names a zoo's file


def candidates(text: str, *, relative_to: Path | None = None) -> list[Path]:
    """Every place `text` may refer to, most specific first."""
    path = Path(text).expanduser()
    if path.is_absolute():
        return [path]
    out = []
    if relative_to is not None:
        out.append(Path(relative_to) / path)
    out.append(Path.cwd() / path)
    out += [root() / text[len(prefix):] for prefix, root in ROOTS.items() if text.startswith(prefix)]
    return out


def resolve_path(text: str, *, relative_to: Path | None = None) -> Path | None:
    """The first existing place `text` refers to, or None."""
    for path in candidates(text, relative_to=relative_to):
        if path.exists():
            return path.resolve()
    return None
