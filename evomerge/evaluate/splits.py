"""Search and held-out splits, and seeded subsamples: the one place rows are split, for every kind of task."""

from __future__ import annotations

import random
from typing import Any

from ..errors import InputError

SPLITS = ("search", "heldout")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}'", field="split", fix=f"use one of {', '.join(SPLITS)}")


def subsample(rows: list[Any], limit: int | None, *, seed: int, key: str) -> list[Any]:
    """A seeded subsample in original order; nested across limits for one seed."""
    if limit is None or limit >= len(rows):
        return list(rows)
    order = list(range(len(rows)))
    random.Random(f"evomerge/limit/{seed}/{key}").shuffle(order)
    return [rows[i] for i in sorted(order[:limit])]


def seeded_split(n: int, fraction: float, *, seed: int) -> dict[str, list[int]]:
    """Row indices of the search and heldout splits of n rows (both non-empty): the same for every task."""
    order = list(range(n))
    random.Random(f"evomerge/split/{seed}/rows").shuffle(order)
    k = min(max(round(n * fraction), 1), n - 1)
    return {"search": sorted(order[k:]), "heldout": sorted(order[:k])}
