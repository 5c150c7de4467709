"""What identifies a zoo: its version and file names, its manifest, and the seeds derived from its one seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "zoo.json"
TASK_FILE = "tasks.yaml"
# The zoo's own version, in zoo.json: raise it whenever training or the task data change, so that a
# zoo cached by an older evomerge is rebuilt rather than silently reused (2: AdamW experts with
# headroom; prompts that end with a space; 3: an instruction stage shared by the compatible experts in
# the lower blocks, their skills in the upper ones, and a composed task; 4: a LoRA adapter per skill over the
# base, in PEFT's format, under lora/).
ZOO_VERSION = 4
# The smol zoo's (`--size smol`), raised on the same terms.
SMOL_ZOO_VERSION = 2   # 2: 200 search rows per task (cheap evaluation learns from them); words 1-999


def read_manifest(root: str | Path) -> dict | None:
    """The zoo.json of the zoo at `root`, or None where there is no readable one."""
    import json

    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_current(manifest: dict | None, *, size: str = "tiny", seed: int = 0) -> bool:
    """Whether a zoo's manifest is what this version of evomerge would build for `size` and `seed`."""
    version = SMOL_ZOO_VERSION if size.startswith("smol") else ZOO_VERSION
    return manifest is not None and \
        (manifest.get("evomerge_zoo"), manifest.get("size"), manifest.get("seed")) == (version, size, seed)


def derive_seed(seed: int, *names: str) -> int:
    """A stable 63-bit seed for one purpose (not Python's salted `hash`)."""
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
