"""Eval work kept in the cache like phase-one data: sharded, fingerprinted, resumed after a crash.

Answers and judgments are the expensive parts of an eval (GPU time, paid judge calls): each shard
is written atomically and registered, so a rerun redoes only the shard that was in flight.
"""
from __future__ import annotations

import sys
from typing import Callable

import pyarrow as pa
from tqdm import tqdm

from ..cache.index import CacheIndex
from ..cache.schema import STAGES
from ..cache.shards import read_shard, remove_stale_temps, shard_path, write_shard


def cached_shards(cache: CacheIndex, stage: str, fingerprint: str, settings: dict, n_shards: int,
                  build: Callable[[int], pa.Table], desc: str | None) -> pa.Table:
    """All shards of (stage, fingerprint): the registered intact ones read back, the rest built now.

    `desc` labels a progress bar over shards; None when `build` shows its own.
    """
    cache.begin_stage(stage, fingerprint, settings, n_shards)
    todo = list(range(n_shards))
    stage_dir = cache.stage_dir(stage, fingerprint)
    remove_stale_temps(stage_dir, todo)
    done = cache.intact_shards(stage, fingerprint, todo, force=False)
    registered = cache.registered(stage, fingerprint)
    tables = []
    missing = [k for k in todo if k not in done]
    bar = tqdm(total=n_shards, initial=len(done), desc=desc, unit="shard", file=sys.stderr, dynamic_ncols=True,
               disable=not missing or desc is None)
    for k in todo:
        if k in done:
            tables.append(read_shard(registered[k].path))
            continue
        table = build(k).cast(STAGES[stage])
        written = write_shard(table, shard_path(stage_dir, k), {"stage": stage, "fingerprint": fingerprint, "shard": k})
        cache.register(stage, fingerprint, k, written)
        tables.append(table)
        bar.update(1)
    bar.close()
    return pa.concat_tables(tables) if tables else STAGES[stage].empty_table()
