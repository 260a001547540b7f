"""Writing and checking one Parquet shard: temp name, fsync, rename, checksum.

A shard file either exists whole under its final name or not at all, so a crash at any moment
leaves at worst a `*.tmp-PID` file that the next run deletes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CacheError
from ..files import atomic_path, fsync_dir

METADATA_PREFIX = "dadpo."


@dataclass(frozen=True)
class ShardFile:
    path: Path
    rows: int
    bytes: int
    sha256: str


def shard_path(stage_dir: Path, shard: int) -> Path:
    return stage_dir / f"shard-{shard:05d}.parquet"


def write_shard(table: pa.Table, path: Path, metadata: dict[str, str]) -> ShardFile:
    """Write `table` atomically to `path` (zstd Parquet) with our keys in the key-value metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = table.schema.metadata or {}
    kv = {**existing, **{f"{METADATA_PREFIX}{k}".encode(): str(v).encode() for k, v in metadata.items()}}
    table = table.replace_schema_metadata(kv)
    try:
        with atomic_path(path) as temp:
            pq.write_table(table, temp, compression="zstd")
            with temp.open("rb+") as handle:
                os.fsync(handle.fileno())
        fsync_dir(path.parent)
    except OSError as exc:  # a full disk, a quota, a read-only mount: no temp file left behind
        raise CacheError(f"cannot write {path}: {exc.strerror or str(exc).splitlines()[0]}") from exc
    return ShardFile(path, table.num_rows, path.stat().st_size, file_sha256(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_metadata(path: Path) -> dict[str, str]:
    """Our key-value metadata of a shard; CacheError when the file is not readable Parquet."""
    try:
        kv = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as exc:
        raise CacheError(f"{path}: not a readable Parquet shard ({exc})") from exc
    return {k.decode()[len(METADATA_PREFIX):]: v.decode() for k, v in kv.items()
            if k.startswith(METADATA_PREFIX.encode())}


def read_shard(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise CacheError(f"{path}: not a readable Parquet shard ({exc})") from exc


def remove_stale_temps(stage_dir: Path, shards: list[int]) -> int:
    """Delete leftovers of writers that died before their rename, for the shards this job owns.

    Other `--shard i/N` jobs own other shards, so their files in flight are never touched.
    """
    stale = [temp for k in shards for temp in stage_dir.glob(f"{shard_path(stage_dir, k).name}.tmp-*")]
    for temp in stale:
        temp.unlink(missing_ok=True)
    return len(stale)


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(settings: dict) -> str:
    """Hash of everything that determines a stage's output; a changed setting gives a new folder."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:16]
