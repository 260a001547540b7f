"""Building one stage of the cache, the one recipe that precompute and eval share.

begin_stage (a stage record: the settings, this fingerprint the newest) → delete this job's stale
temporary files → find the shards that need no work (committed and intact, or complete and
adoptable) → build each missing one, write it atomically, then its commit record. A kill at any
moment loses only the shard in flight; a rerun builds only what is missing. Nothing here opens
`index.duckdb`: `cache index` builds it from the records.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from .index import CacheIndex
from .schema import STAGES
from .shards import read_shard, remove_stale_temps, shard_path, write_shard


@dataclass
class StageReport:
    stage: str
    fingerprint: str
    built: int = 0
    skipped: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class BuiltStage:
    report: StageReport
    table: pa.Table | None  # every shard of `todo`, in order, when read_back; else None


def build_stage(cache: CacheIndex, stage: str, fingerprint: str, settings: dict, n_shards: int,
                build: Callable[[int], pa.Table], *, todo: list[int] | None = None, force: bool = False,
                remove_temps: bool = True, desc: str | None = None, show_when_done: bool = False,
                rates: bool = False, read_back: bool = False,
                prepare: Callable[[Path], None] | None = None) -> BuiltStage:
    """Build the shards of `todo` (default: all n_shards) that are not in the cache yet.

    `force` rebuilds intact shards too. `remove_temps` is False where other jobs write the same
    shard at the same time (precompute's prompts shard under --shard I/N). `desc` labels a
    progress bar over shards (None: no bar, `build` shows its own); `show_when_done` shows it even
    when nothing is missing, `rates` adds rows and tokens per second. `read_back` returns the
    concatenated table of all `todo` shards, the intact ones read back from their files. `prepare`
    gets the stage folder once the fingerprint is registered (precompute writes its manifest there).
    """
    todo = list(range(n_shards)) if todo is None else todo
    cache.begin_stage(stage, fingerprint, settings, n_shards)
    stage_dir = cache.stage_dir(stage, fingerprint)
    if prepare is not None:
        prepare(stage_dir)
    if remove_temps:
        remove_stale_temps(stage_dir, todo)
    done = cache.intact_shards(stage, fingerprint, todo, force)
    registered = cache.registered(stage, fingerprint) if read_back and done else {}
    report = StageReport(stage, fingerprint)
    missing = [k for k in todo if k not in done]
    bar = tqdm(total=len(todo), initial=len(todo) - len(missing), desc=desc, unit="shard", file=sys.stderr,
               dynamic_ncols=True, disable=desc is None or (not missing and not show_when_done))
    tables = []
    start = time.perf_counter()
    for k in todo:
        if k in done:
            report.skipped += 1
            if read_back:
                tables.append(with_columns_of(read_shard(registered[k].path), STAGES[stage]))
            continue
        table = build(k)
        written = write_shard(table, shard_path(stage_dir, k), {"stage": stage, "fingerprint": fingerprint, "shard": k})
        cache.register(stage, fingerprint, k, written, settings.get("engine"))
        report.built += 1
        report.rows += table.num_rows
        if "n_tokens" in table.column_names:
            report.tokens += pc.sum(table["n_tokens"]).as_py() or 0
        if read_back:
            tables.append(table)
        bar.update(1)
        if rates:
            elapsed = time.perf_counter() - start
            bar.set_postfix(rows=report.rows, tok_s=f"{report.tokens / max(elapsed, 1e-9):.0f}")
    bar.close()
    report.seconds = time.perf_counter() - start
    table = None
    if read_back:
        table = pa.concat_tables(tables) if tables else STAGES[stage].empty_table()
    return BuiltStage(report, table)


def with_columns_of(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A shard read back in the stage's current layout: a column added since it was written reads as null."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names)
