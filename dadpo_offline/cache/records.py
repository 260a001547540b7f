"""Commit records: the writer side of the cache, and its single source of truth.

A shard is published as its Parquet file (temp, fsync, rename) followed by a small JSON commit
record written the same way, `STAGE/FP/commit-KKKKK.json` (stage, fingerprint, shard, path, rows,
bytes, sha256, engine identity); a shard without its record does not exist. A job that begins
a stage writes `STAGE/FP/stage.json` (settings, shard count, when it began: the stage's newest
fingerprint is the active one), unless that would change nothing. Workers write only these files
and their shards, never `index.duckdb`, so no file lock is shared between nodes: DuckDB's lock
is not safe on NFS, nor on Lustre under `localflock`. `cache index` (publish.py's `build_index`) reads them all.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CacheError
from ..files import atomic_path, fsync_dir
from .schema import ACCUMULATING

MARKER = "dadpo-cache.json"  # says "this folder is a cache" without the index (written by every writer)
STAGE_RECORD = "stage.json"
FORMAT_VERSION = "2"  # 1: the registry lived only inside index.duckdb


@dataclass(frozen=True)
class RegisteredShard:
    shard: int
    path: Path
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class StageRecord:
    stage: str
    fingerprint: str
    settings: dict
    n_shards: int
    begun_ns: int


def commit_path(stage_dir: Path, shard: int) -> Path:
    return stage_dir / f"commit-{shard:05d}.json"


def write_record(path: Path, record: dict) -> None:
    """Temp name, fsync, rename, fsync of the folder: the record is whole on disk or absent."""
    try:
        with atomic_path(path) as temp:
            with temp.open("w", encoding="utf-8") as handle:
                json.dump(record, handle, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
        fsync_dir(path.parent)
    except OSError as exc:
        raise CacheError(f"cannot write {path}: {exc.strerror or str(exc).splitlines()[0]}") from exc


def read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: not a readable commit record ({exc}) — remove it and rerun the job that "
                         "wrote it") from exc


def mark_cache(root: Path) -> None:
    if not (root / MARKER).is_file():
        write_record(root / MARKER, {"format": FORMAT_VERSION})


def begin(stage_dir: Path, stage: str, fingerprint: str, settings: dict, n_shards: int) -> None:
    """Make this fingerprint the stage's newest. A rerun that would change nothing writes nothing (the
    same settings and shard count, and already active by `active_fingerprints`' own rule), so a
    finished cache stays byte for byte as it was."""
    path = stage_dir / STAGE_RECORD
    if path.is_file():
        kept = read_record(path)
        same = json.dumps(kept["settings"], sort_keys=True) == json.dumps(settings, sort_keys=True) \
            and kept["n_shards"] == n_shards
        if same and (stage, fingerprint) in active_fingerprints(stage_records(stage_dir.parent.parent, stage)):
            return
    write_record(path, {"stage": stage, "fingerprint": fingerprint, "settings": settings, "n_shards": n_shards,
                        "begun_ns": time.time_ns()})


def commit(root: Path, stage_dir: Path, stage: str, fingerprint: str, shard: int, path: Path, rows: int,
           size: int, sha256: str, engine) -> None:
    """Called only after the shard's rename: a committed shard is always a complete file."""
    write_record(commit_path(stage_dir, shard), {
        "stage": stage, "fingerprint": fingerprint, "shard": shard, "path": path.relative_to(root).as_posix(),
        "rows": rows, "bytes": size, "sha256": sha256, "engine": engine})


def commits(root: Path, stage_dir: Path) -> dict[int, RegisteredShard]:
    """The committed shards of one stage folder, by shard number."""
    found = {}
    for path in sorted(stage_dir.glob("commit-*.json")):
        r = read_record(path)
        found[r["shard"]] = RegisteredShard(r["shard"], root / r["path"], r["rows"], r["bytes"], r["sha256"])
    return found


def stage_records(root: Path, stage: str = "*") -> list[StageRecord]:
    """Every begun stage fingerprint in the cache (`STAGE/FP/stage.json`), or of one stage."""
    records = []
    for path in sorted(root.glob(f"{stage}/*/{STAGE_RECORD}")):
        r = read_record(path)
        records.append(StageRecord(r["stage"], r["fingerprint"], r["settings"], r["n_shards"], r["begun_ns"]))
    return records


def active_fingerprints(records: list[StageRecord]) -> set[tuple[str, str]]:
    """(stage, fingerprint) pairs the views show: the newest begun of each stage; every one of an
    accumulating stage (one per model, one per eval run)."""
    newest: dict[str, StageRecord] = {}
    for r in records:
        if r.stage not in newest or (r.begun_ns, r.fingerprint) > (newest[r.stage].begun_ns, newest[r.stage].fingerprint):
            newest[r.stage] = r
    return {(r.stage, r.fingerprint) for r in records if r.stage in ACCUMULATING or newest[r.stage] is r}
