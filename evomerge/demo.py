"""`evomerge demo`: the main job on the embedded default, with no network.

Builds the local model zoo if it is missing, searches `configs/demo.yaml` over the
zoo's compatible experts, and exports to results/demo/.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError
from .paths import zoo_root

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def ensure_zoo(*, size: str = "tiny", progress: bool = True) -> tuple[Path, bool]:
    """The zoo at $EVOMERGE_ZOO (default ~/.cache/evomerge/zoo), built on first use and rebuilt when it
    was built by an older evomerge (another zoo version)."""
    from .zoo import build_zoo, is_current, read_manifest

    root = zoo_root()
    manifest = read_manifest(root)
    if not is_current(manifest, size=size):
        stale = manifest is not None
        if stale and manifest.get("size") != size:     # somebody's own zoo of another size: never overwrite it
            raise InputError(f"holds a '{manifest.get('size')}' zoo; the demo needs the '{size}' one",
                             file=root / "zoo.json", fix="unset EVOMERGE_ZOO, or point it at an empty folder")
        print(f"{'rebuilding the outdated' if stale else 'building the'} local model zoo in {root} "
              "(once; about a minute on a laptop CPU)")
        build_zoo(root, size=size, force=root.exists(), progress=progress)
        return root, True
    return root, False


def run_demo(*, out: str | None = None, n_trials: int | None = None, config: str | None = None):
    from .config import load_config
    from .search import search

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    _, rebuilt = ensure_zoo()
    cfg = load_config(config or DEMO_CONFIG)
    out = Path(out or Path.cwd() / "results" / "demo")
    if rebuilt and (out / "study.db").is_file():     # its trials were scored on the old zoo's models
        for old in out.glob("study.db*"):
            old.rename(old.with_name(old.name.replace("study.db", "study-previous-zoo.db")))
        print(f"the zoo changed: the earlier demo study is kept as {out / 'study-previous-zoo.db'}")
    return search(cfg, n_trials=n_trials, out=str(out))
