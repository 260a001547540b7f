"""`cache index`: build `index.duckdb` from the commit records and replace the old one atomically.

Built by DuckDB on the local disk of whoever runs it (the system's temporary folder, $TMPDIR),
copied beside the index under a temporary name, fsynced, then renamed over it (a same-folder
rename: atomic on POSIX, NFS and Lustre). So DuckDB never writes on a shared file system and no
DuckDB lock is ever shared: a reader that has the old index open keeps reading the old file,
whole, and the next reader opens the new one. It reads only records, so a rerun over the same
records gives the same registry (idempotent), and a shard whose writer was killed before its
record exists is not in it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from ..errors import CacheError
from ..files import fsync_dir
from . import records
from .index import INDEX_NAME, NO_EXTENSIONS, REGISTRY_SQL, CacheIndex

STAGES_SCHEMA = pa.schema([("stage", pa.string()), ("fingerprint", pa.string()), ("settings", pa.string()),
                           ("n_shards", pa.int32()), ("active", pa.bool_()), ("created_at", pa.timestamp("us"))])
SHARDS_SCHEMA = pa.schema([("stage", pa.string()), ("fingerprint", pa.string()), ("shard", pa.int32()),
                           ("path", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])


@dataclass(frozen=True)
class Indexed:
    stages: int
    shards: int
    rows: int
    seconds: float


def build_index(cache: CacheIndex) -> Indexed:
    """Registry rows and views from every stage and commit record; the index replaced whole."""
    start = time.perf_counter()
    root = cache.root
    begun = records.stage_records(root)
    active = records.active_fingerprints(begun)
    stages, shards = [], []
    for r in begun:
        stages.append({"stage": r.stage, "fingerprint": r.fingerprint, "settings": json.dumps(r.settings, sort_keys=True),
                       "n_shards": r.n_shards, "active": (r.stage, r.fingerprint) in active,
                       "created_at": r.begun_ns // 1000})
        for k, entry in sorted(cache.registered(r.stage, r.fingerprint).items()):
            shards.append({"stage": r.stage, "fingerprint": r.fingerprint, "shard": k,
                           "path": entry.path.relative_to(root).as_posix(), "rows": entry.rows,
                           "bytes": entry.bytes, "sha256": entry.sha256})
    temp = root / f"{INDEX_NAME}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        with tempfile.TemporaryDirectory(prefix="dadpo-index-") as local:
            built = Path(local) / INDEX_NAME  # DuckDB writes on local disk, never on a shared file system
            _write(cache, built, pa.Table.from_pylist(stages, STAGES_SCHEMA), pa.Table.from_pylist(shards, SHARDS_SCHEMA))
            shutil.copyfile(built, temp)
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, cache.index_path)
        fsync_dir(root)
    except (OSError, duckdb.Error) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise CacheError(f"cannot write {cache.index_path} ({text}); the old index is unchanged — "
                         f"fix that, then rerun: dadpo-offline cache index {root}") from exc
    finally:
        temp.unlink(missing_ok=True)
    return Indexed(len(stages), len(shards), sum(s["rows"] for s in shards), time.perf_counter() - start)


def _write(cache: CacheIndex, path: Path, stages: pa.Table, shards: pa.Table) -> None:
    path.unlink(missing_ok=True)
    con = duckdb.connect(str(path), config=NO_EXTENSIONS)
    try:
        con.execute(REGISTRY_SQL)
        con.register("new_stages", stages)
        con.register("new_shards", shards)
        con.execute("INSERT INTO stages SELECT * FROM new_stages")
        con.execute("INSERT INTO shards SELECT * FROM new_shards")
        con.execute("INSERT INTO meta VALUES ('format', ?)", [records.FORMAT_VERSION])
        cache._write_views(con)
        con.execute("CHECKPOINT")
    finally:
        con.close()
