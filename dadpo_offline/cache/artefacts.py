"""Eval artefacts that stay the files their tools read back (FILE_STAGES: lm-eval results,
alpaca_eval's annotator folder), registered in the index with size and sha256 like shards, so
that `cache status` lists them, `cache verify` checks them and `cache gc` keeps them.

Their fingerprints are those of their settings, as for shards; a file found unregistered (a cache
made before they were registered, or a kill between writing and registering) is adopted when it
reads back whole.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..files import atomic_text
from .index import CacheIndex, shard_problem
from .shards import ShardFile, file_sha256, fingerprint


def cached_json(cache: CacheIndex, stage: str, settings: dict, path: Path) -> dict | None:
    """The JSON at `path` when it is intact (registered with this size and checksum, or adopted now);
    None when it must be computed, after saying why and removing a damaged file."""
    fp = fingerprint(settings)
    entry = cache.registered(stage, fp).get(0)
    rel = path.relative_to(cache.root).as_posix()
    if entry is not None:
        problem = shard_problem(path, entry.bytes, entry.sha256, stage, fp)
        if problem is None:
            return json.loads(path.read_text(encoding="utf-8"))
        tqdm.write(f"{stage} {rel}: {problem}; computing it again", file=sys.stderr)
        cache.unregister(stage, fp, 0)
        path.unlink(missing_ok=True)
        return None
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        tqdm.write(f"{stage} {rel}: not readable JSON; computing it again", file=sys.stderr)
        path.unlink()
        return None
    register_files(cache, stage, settings, [path])
    return data


def store_json(cache: CacheIndex, stage: str, settings: dict, path: Path, data: dict) -> dict:
    """Write `data` atomically to `path`, register it, and return it as read back (as a cache hit would)."""
    atomic_text(path, json.dumps(data, indent=2))
    register_files(cache, stage, settings, [path])
    return json.loads(path.read_text(encoding="utf-8"))


def register_files(cache: CacheIndex, stage: str, settings: dict, paths: list[Path]) -> None:
    """Record `paths` (inside the cache) as the files 0..n-1 of (stage, fingerprint(settings)),
    replacing what was registered there before. Rows: a JSON list's length, else 1."""
    fp = fingerprint(settings)
    cache.begin_stage(stage, fp, settings, len(paths))
    for k, path in enumerate(paths):
        cache.register(stage, fp, k, ShardFile(path, _rows(path), path.stat().st_size, file_sha256(path)))
    for k in cache.registered(stage, fp):
        if k >= len(paths):
            cache.unregister(stage, fp, k)


def _rows(path: Path) -> int:
    if path.suffix != ".json":
        return 1
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return 1
    return len(data) if isinstance(data, list) else 1
