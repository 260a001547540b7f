"""`cache gc`: remove what no reader will use again — stale fingerprints and files no commit record points to.

Kept, always: the index, the cache's marker, `_empty/` (the typed empty files behind empty
views), and every fingerprint that is active or belongs to an accumulating stage (eval answers,
judgments, results, lm-eval and AlpacaEval files), with its records, its committed files, its
`manifest.yaml` and the complete shards a rerun would adopt; the files of the eval artefact
folders (a rerun adopts them too); temporary files whose writer may still be running. Removed:
each stale fingerprint (its records first, then its folder), and every other file or folder in
the cache, a killed `cache index`'s temporary file included. Then the index is rebuilt.

Like `cache index`, gc runs when no job writes to the cache (in a job array: after them all).
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CacheError
from . import records
from .index import EMPTY_DIR, INDEX_NAME, is_cache, open_cache
from .publish import build_index
from .schema import FILE_STAGES
from .shards import shard_metadata

TEMP_GRACE_S = 3600  # a temporary file from another host counts as in flight for this long
RECORD_NAMES = (records.STAGE_RECORD, "manifest.yaml")


@dataclass(frozen=True)
class Removal:
    path: str  # relative to the cache root; a folder ends with "/"
    what: str
    bytes: int


def collect_garbage(cache_dir: str | Path, dry_run: bool = False) -> list[Removal]:
    """Remove (or, with dry_run, only list) stale fingerprints and uncommitted files; return what."""
    root = Path(cache_dir).expanduser().resolve()
    if not is_cache(root):
        open_cache(root)  # raises: not a cache, or no cache yet
    if not (root / records.MARKER).is_file() and dry_run:
        raise CacheError(f"{root} was made before commit records — run: dadpo-offline cache index {root}, "
                         "then gc")
    cache = open_cache(root, create=not dry_run)
    begun = records.stage_records(root)
    active = records.active_fingerprints(begun)
    committed = {(r.stage, r.fingerprint): cache.registered(r.stage, r.fingerprint) for r in begun}
    stale = sorted(key for key in committed if key not in active)
    removals, gone, outside_files = [], set(), []
    for stage, fp in stale:
        folder = cache.stage_dir(stage, fp)
        files = [entry.path for entry in committed[(stage, fp)].values()]
        outside = [f for f in files if not f.is_relative_to(folder)]
        size = _size(folder) + sum(_size(f) for f in outside)
        removals.append(Removal(f"{stage}/{fp}/", f"stale fingerprint, {_count(len(files), 'shard')}", size))
        gone |= {folder, *outside}
        outside_files += outside
    kept = set(committed) - set(stale)
    sweep = Sweep(root, {entry.path for key in kept for entry in committed[key].values()},
                  {cache.stage_dir(stage, fp): (stage, fp) for stage, fp in kept}, gone)
    for path in sweep.removable():
        rel = path.relative_to(root).as_posix()
        if path.is_dir() and not path.is_symlink():
            files = sum(1 for p in path.rglob("*") if not p.is_dir())
            what = _count(files, "unregistered file") if files else "empty folder"
            removals.append(Removal(rel + "/", what, _size(path)))
        else:
            removals.append(Removal(rel, "temporary file" if ".tmp-" in path.name else "unregistered file",
                                    _size(path)))
    if dry_run:
        return removals
    for stage, fp in stale:  # the records first: a crash now leaves uncommitted files for the next gc
        (cache.stage_dir(stage, fp) / records.STAGE_RECORD).unlink(missing_ok=True)
    for removal in removals:
        path = root / removal.path
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for path in outside_files:  # a stale fingerprint's committed files outside its folder
        path.unlink(missing_ok=True)
    build_index(cache)
    return removals


class Sweep:
    """Walks the cache for files no kept fingerprint needs; a folder whose every file goes is one item."""

    def __init__(self, root: Path, registered: set[Path], kept_dirs: dict[Path, tuple[str, str]], gone: set[Path]):
        self.root, self.registered, self.kept_dirs, self.gone = root, registered, kept_dirs, gone

    def removable(self) -> list[Path]:
        return self._walk(self.root)[1]

    def _walk(self, folder: Path) -> tuple[bool, list[Path]]:
        """(whether all of `folder` may go, what to remove below it: whole folders where possible)"""
        whole, out = folder not in self.kept_dirs and folder != self.root, []
        for entry in sorted(folder.iterdir()):
            if entry in self.gone or (folder == self.root and entry.name in (INDEX_NAME, EMPTY_DIR, records.MARKER)):
                whole = False
            elif entry.is_dir() and not entry.is_symlink():
                all_of_it, below = self._walk(entry)
                out += [entry] if all_of_it else below
                whole = whole and all_of_it
            elif self._keep(entry):
                whole = False
            else:
                out.append(entry)
        return whole, out

    def _keep(self, path: Path) -> bool:
        if path in self.registered:
            return True
        if ".tmp-" in path.name:
            return in_flight(path)
        owner = self.kept_dirs.get(path.parent)
        if owner is not None:
            return (path.name in RECORD_NAMES or path.name.startswith("commit-") and path.suffix == ".json"
                    or _adoptable(path, *owner))
        return path.relative_to(self.root).parts[0] in FILE_STAGES  # an eval artefact the next eval adopts


def in_flight(temp: Path) -> bool:
    """Whether the writer of `temp` (NAME.tmp-HOST-PID or NAME.tmp-PID) may still be running."""
    host, _, pid = temp.name.rpartition(".tmp-")[2].rpartition("-")
    if not pid.isdigit():
        host, pid = pid, ""
    if host in ("", socket.gethostname()) and pid:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            return True
        return True
    return time.time() - temp.lstat().st_mtime < TEMP_GRACE_S


def _adoptable(path: Path, stage: str, fp: str) -> bool:
    """A complete shard of this fingerprint that its writer did not live to register: a rerun adopts it."""
    if not path.name.startswith("shard-") or path.suffix != ".parquet":
        return False
    try:
        meta = shard_metadata(path)
    except CacheError:
        return False
    return meta.get("stage") == stage and meta.get("fingerprint") == fp


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    if path.is_dir():
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_symlink() or p.is_file())
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def human_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as `du --si`)."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
