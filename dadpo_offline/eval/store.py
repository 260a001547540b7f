"""Eval work kept in the cache like phase-one data: sharded, fingerprinted, resumed after a crash.

Answers and judgments are the expensive parts of an eval (GPU time, paid judge calls): each shard
is written atomically and registered, so a rerun redoes only the shard that was in flight.
"""
from __future__ import annotations

from typing import Callable

import pyarrow as pa

from ..cache.build import build_stage
from ..cache.index import CacheIndex
from ..cache.schema import STAGES


def cached_shards(cache: CacheIndex, stage: str, fingerprint: str, settings: dict, n_shards: int,
                  build: Callable[[int], pa.Table], desc: str | None) -> pa.Table:
    """All shards of (stage, fingerprint): the registered intact ones read back, the rest built now.

    `desc` labels a progress bar over shards; None when `build` shows its own.
    """
    return build_stage(cache, stage, fingerprint, settings, n_shards, lambda k: build(k).cast(STAGES[stage]),
                       desc=desc, read_back=True).table
