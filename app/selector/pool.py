"""A built-in pool of unrelated prompts (``app/data/locality_pool.txt``).

Editing methods draw locality prompts from it when a request brings none, and hidden-state
encoders centre their vectors on it. The prompts are generic facts, questions and chat lines
written for this purpose, so they overlap no evaluation set.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

POOL_FILE = Path(__file__).resolve().parent.parent / "data" / "locality_pool.txt"


@lru_cache(maxsize=1)
def _pool() -> tuple[str, ...]:
    lines = POOL_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def locality_pool() -> list[str]:
    """Every prompt of the pool, in file order."""
    return list(_pool())


def sample_locality(k: int, seed: int, exclude: str | None = None) -> list[str]:
    """``k`` distinct pool prompts chosen by ``seed`` (the same seed gives the same prompts).

    ``exclude`` drops pool prompts that contain it (case-insensitive), e.g. the edit's subject.
    """
    pool = list(_pool())
    if exclude:
        needle = exclude.lower()
        pool = [p for p in pool if needle not in p.lower()]
    rng = random.Random(seed)
    return rng.sample(pool, min(k, len(pool)))
