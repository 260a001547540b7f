"""`index.duckdb`: the shard registry and the views `prompts`, `generations`, `scores`, `pairs`,
and, once `eval` has run, `answers`, `judgments` and `eval_results`.

The views read the registered shards of each stage's active fingerprint through absolute paths,
so a stock DuckDB client opens them from any working directory. Readers never write: in a moved
or copied cache, this tool's read-only connections see the views through temporary ones made
for the new location (the file stays untouched, and may be read-only); the next writer rewrites
the stored views.

Writers hold the DuckDB file only for a moment (open, write, close) so that several
`--shard i/N` jobs on one cache take turns instead of failing on the file lock.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
from tqdm import tqdm

from ..errors import CacheError
from .schema import ACCUMULATING, STAGES, TEACHER_SCORES, VIEW_FILTERS, VIEW_STAGES, VIEWS_BY_NAME, stage_schema
from .shards import ShardFile, file_sha256, read_shard, shard_metadata, shard_path

INDEX_NAME = "index.duckdb"
FORMAT_VERSION = "1"
LOCK_WAIT_S = 300  # another writer (a --shard job) holds the index: wait for our turn
READER_WAIT_S = 20  # a reader holds it open: past this, it is not one of ours
NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}

REGISTRY_SQL = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS stages (
    stage VARCHAR, fingerprint VARCHAR, settings JSON, n_shards INTEGER, active BOOLEAN,
    created_at TIMESTAMP DEFAULT current_timestamp, PRIMARY KEY (stage, fingerprint));
CREATE TABLE IF NOT EXISTS shards (
    stage VARCHAR, fingerprint VARCHAR, shard INTEGER, path VARCHAR, rows BIGINT, bytes BIGINT,
    sha256 VARCHAR, created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (stage, fingerprint, shard));
"""


@dataclass(frozen=True)
class RegisteredShard:
    shard: int
    path: Path
    rows: int
    bytes: int
    sha256: str


def open_cache(root: str | Path, create: bool = False) -> "CacheIndex":
    """Open an existing cache, or create one when `create` and the folder is new or empty."""
    root = Path(root).expanduser().resolve()
    index = root / INDEX_NAME
    if index.is_file():
        cache = CacheIndex(root)
        with cache.connect(read_only=True):  # a file that is not a DuckDB index is named now, not mid-run
            return cache
    if root.exists() and not root.is_dir():
        raise CacheError(f"{root} is a file, not a cache directory")
    if root.is_dir() and any(root.iterdir()):
        raise CacheError(f"{root} is not a dadpo-offline cache (no {INDEX_NAME}) and is not empty; "
                         "give an empty or new folder as cache_dir")
    if not create:
        raise CacheError(f"no cache at {root} — run: dadpo-offline precompute MANIFEST")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    cache = CacheIndex(root)
    try:
        with cache.connect() as con:
            con.execute(REGISTRY_SQL)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", [FORMAT_VERSION])
            cache._write_views(con)
    except (CacheError, OSError):  # e.g. a full disk: leave no half-made cache behind
        for leftover in (index, wal_path(index)):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(root / "_empty", ignore_errors=True)
        if created and not any(root.iterdir()):
            root.rmdir()
        raise
    return cache


def wal_path(index: Path) -> Path:
    return index.with_name(index.name + ".wal")


class CacheIndex:
    def __init__(self, root: Path):
        self.root = root
        self.index_path = root / INDEX_NAME

    @contextmanager
    def connect(self, read_only: bool = False, wait_s: float | None = None):
        """A short-lived connection; waits (with jitter) while another job holds the write lock, at
        most `wait_s` seconds when given.

        A read-only one is also confined by DuckDB's own controls: files only inside the cache
        folder, no extensions, settings locked. So even a statement that slipped past `sql`'s
        allow-list could neither write outside the cache nor turn the controls off.
        """
        start = time.monotonic()
        while True:
            try:
                con = duckdb.connect(str(self.index_path), read_only=read_only, config=NO_EXTENSIONS)
                if read_only:
                    con.execute("SET allowed_directories = ?", [[f"{self.root}/"]])
                    con.execute("SET enable_external_access = false")
                    con.execute("SET lock_configuration = true")
                    if self._moved(con):
                        self._temporary_views(con)
                break
            except duckdb.IOException as exc:
                text = str(exc)
                if "lock" not in text.lower():
                    raise CacheError(f"{self.index_path}: cannot open the index ({text.splitlines()[0]})") from exc
                # DuckDB adds "you would be able to open this database in read-only mode" when the
                # holder has it open for reading: our own readers let go within moments, a
                # notebook or a stock client may keep it for hours, so a writer stops waiting soon.
                held_by_reader = "read-only mode" in text
                patience = wait_s if wait_s is not None else READER_WAIT_S if held_by_reader else LOCK_WAIT_S
                if time.monotonic() - start > patience:
                    raise CacheError(lock_holder_message(self.index_path, text, held_by_reader, patience)) from exc
                time.sleep(random.uniform(0.05, 0.5))
            except duckdb.Error as exc:
                raise CacheError(f"{self.index_path}: not a readable DuckDB index ({str(exc).splitlines()[0]})") from exc
        try:
            yield con
        except duckdb.Error as exc:
            if "No space left on device" not in str(exc):
                raise
            # the commit failed, so nothing was registered; the WAL it began is empty, and ours to
            # remove while this connection still holds the lock
            wal = wal_path(self.index_path)
            if wal.is_file() and wal.stat().st_size == 0:
                wal.unlink()
            raise CacheError(f"no space left on device for {self.index_path}; nothing was registered — free "
                             "space, then rerun (finished shards are kept)") from exc
        finally:
            con.close()

    def stage_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / fingerprint

    # -- registry -------------------------------------------------------------------------------

    def begin_stage(self, stage: str, fingerprint: str, settings: dict, n_shards: int) -> None:
        """Record a stage's settings and make this fingerprint the one the views show (beside the others, if accumulating)."""
        with self.connect() as con:
            if stage not in ACCUMULATING:
                con.execute("UPDATE stages SET active = false WHERE stage = ? AND fingerprint <> ?", [stage, fingerprint])
            con.execute("INSERT INTO stages (stage, fingerprint, settings, n_shards, active) VALUES (?, ?, ?, ?, true) "
                        "ON CONFLICT DO UPDATE SET active = true, n_shards = excluded.n_shards",
                        [stage, fingerprint, json.dumps(settings, sort_keys=True), n_shards])
            self._write_views(con)

    def registered(self, stage: str, fingerprint: str) -> dict[int, RegisteredShard]:
        with self.connect() as con:
            rows = con.execute("SELECT shard, path, rows, bytes, sha256 FROM shards WHERE stage = ? AND fingerprint = ?",
                               [stage, fingerprint]).fetchall()
        return {r[0]: RegisteredShard(r[0], self.root / r[1], r[2], r[3], r[4]) for r in rows}

    def register(self, stage: str, fingerprint: str, shard: int, written: ShardFile) -> None:
        """Called only after the rename: a registered shard is always a complete file."""
        relative = written.path.relative_to(self.root).as_posix()
        with self.connect() as con:
            con.execute("INSERT OR REPLACE INTO shards (stage, fingerprint, shard, path, rows, bytes, sha256) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [stage, fingerprint, shard, relative, written.rows, written.bytes, written.sha256])
            self._write_views(con)

    def unregister(self, stage: str, fingerprint: str, shard: int) -> None:
        with self.connect() as con:
            con.execute("DELETE FROM shards WHERE stage = ? AND fingerprint = ? AND shard = ?", [stage, fingerprint, shard])
            self._write_views(con)

    def ready_fingerprint(self, stage: str, producer: str) -> str:
        """The active fingerprint of `stage`, once all its shards exist and its inputs are still the active ones.

        Readers (training) call this so that they never train on a quarter of the data while other
        --shard jobs run, nor on pairs built from generations that a newer run has replaced.
        """
        command = f"run: dadpo-offline precompute MANIFEST --stage {producer}"
        with self.connect(read_only=True) as con:
            row = con.execute("""
                SELECT t.fingerprint, t.settings, t.n_shards, count(s.shard) FROM stages t
                LEFT JOIN shards s USING (stage, fingerprint) WHERE t.stage = ? AND t.active GROUP BY ALL""",
                              [stage]).fetchone()
            active = dict(con.execute("SELECT stage, fingerprint FROM stages WHERE active").fetchall())
        if row is None:
            raise CacheError(f"{self.root} has no {stage} stage yet — {command}")
        fingerprint, settings, expected, done = row
        if done < expected:
            raise CacheError(f"{expected - done} of {expected} {stage} shards are missing — {command} "
                             "(with --shard I/N: every job)")
        stale = sorted(name for name, value in json.loads(settings).items()
                       if stage_schema(name) is not None and isinstance(value, str) and active.get(name) != value)
        if stale:
            raise CacheError(f"the active {stage} shards were built from older {', '.join(stale)} shards — {command}")
        return fingerprint

    def check_intact(self, views: list[str], repair: str) -> None:
        """Refuse to read `views` while one of their active shards is missing or damaged: a reader
        names the shard and the repair instead of failing inside DuckDB."""
        with self.connect(read_only=True) as con:
            stages = _matching(con, [stage for view in views for stage in VIEW_STAGES[view]])
        damaged = self.verify(stages)
        if damaged:
            raise CacheError(f"damaged cache: {damaged[0]} — list every damaged shard with: "
                             f"dadpo-offline cache verify {self.root}; rebuild with: {repair}")

    def intact_shards(self, stage: str, fp: str, todo: list[int], force: bool) -> set[int]:
        """Shards that need no work: registered and intact, or complete on disk but not yet registered."""
        if force:
            return set()
        registered = self.registered(stage, fp)
        done = set()
        for k in todo:
            path = shard_path(self.stage_dir(stage, fp), k)
            entry = registered.get(k)
            if entry is not None:
                problem = shard_problem(entry.path, entry.bytes, entry.sha256, stage, fp)
                if problem is None:
                    done.add(k)
                else:
                    tqdm.write(f"{stage} shard {k}: {problem}; rebuilding it", file=sys.stderr)
                    self.unregister(stage, fp, k)
            elif path.is_file():  # renamed but the job died before registering: adopt it if it is ours
                try:
                    ours = shard_metadata(path).get("fingerprint") == fp
                except CacheError:
                    ours = False
                if ours:
                    table_rows = read_shard(path).num_rows
                    self.register(stage, fp, k, ShardFile(path, table_rows, path.stat().st_size, file_sha256(path)))
                    done.add(k)
        return done

    # -- views ----------------------------------------------------------------------------------

    def _temporary_views(self, con) -> None:
        """Views for the cache's new place, on this connection only. A view whose shards cannot be
        read (missing, truncated) keeps its stored definition: the registry stays readable, so
        `cache verify` and training's shard check name the damage instead of failing here."""
        for view in VIEW_STAGES:
            try:
                self._write_views(con, temporary=True, views=[view])
            except duckdb.Error:
                pass

    def _moved(self, con) -> bool:
        rows = con.execute("SELECT value FROM meta WHERE key = 'root'").fetchall()
        return rows != [(str(self.root),)]

    def _write_views(self, con, temporary: bool = False, views: list[str] | None = None) -> None:
        """Each view = the registered shards of its stages' active fingerprints, absolute paths."""
        for view in views or VIEW_STAGES:
            stages = VIEW_STAGES[view]
            files = [str(self.root / path) for (path,) in con.execute(
                "SELECT s.path FROM shards s JOIN stages t USING (stage, fingerprint) "
                "WHERE t.active AND s.stage IN (SELECT unnest(?)) ORDER BY s.stage, s.shard",
                [_matching(con, stages)]).fetchall()]
            if not files:
                files = [str(self._empty_shard(stages[0]))]
            listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            by_name = ", union_by_name = true" if view in VIEWS_BY_NAME else ""
            where = f" WHERE {VIEW_FILTERS[view]}" if view in VIEW_FILTERS else ""
            con.execute(f"CREATE OR REPLACE {'TEMP ' if temporary else ''}VIEW {view} AS "
                        f"SELECT * FROM read_parquet([{listing}]{by_name}){where}")
        if not temporary:
            con.execute("INSERT OR REPLACE INTO meta VALUES ('root', ?)", [str(self.root)])

    def _empty_shard(self, stage: str) -> Path:
        """A zero-row file with the stage's schema, so empty views still have typed columns."""
        path = self.root / "_empty" / f"{stage}.parquet"
        if not path.is_file() or not pq.read_schema(path).equals(STAGES[stage]):  # a column added since
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(STAGES[stage].empty_table(), path)
        return path

    # -- inspection -----------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """One row per stage fingerprint: shards done of expected, rows, bytes, active or stale; for
        the active pairs, how many training reads and why the others are dropped."""
        with self.connect(read_only=True) as con:
            cursor = con.execute("""
                SELECT t.stage, t.fingerprint, t.active, t.n_shards, count(s.shard) AS done,
                       coalesce(sum(s.rows), 0) AS rows, coalesce(sum(s.bytes), 0) AS bytes,
                       t.created_at
                FROM stages t LEFT JOIN shards s USING (stage, fingerprint)
                GROUP BY ALL ORDER BY t.active DESC, t.created_at, t.stage""")
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row)) | {"note": None} for row in cursor.fetchall()]
            for row in rows:
                if row["stage"] == "pairs" and row["active"] and row["done"]:
                    row["note"] = self._pairs_note(con)
                elif fnmatchcase(row["stage"], TEACHER_SCORES):  # several teachers: which one, which model
                    settings = con.execute("SELECT settings FROM stages WHERE stage = ? AND fingerprint = ?",
                                           [row["stage"], row["fingerprint"]]).fetchone()[0]
                    row["note"] = (f"teacher {row['stage'][len('score-teacher-'):]}: "
                                   f"{json.loads(settings).get('model')} (scores.scorer)")
        return rows

    def _pairs_note(self, con) -> str:
        try:
            trained = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
            per_prompt = pairs_per_prompt(con)
            dropped = dropped_summary(con)
        except duckdb.Error:
            return f"unreadable — check: dadpo-offline cache verify {self.root}"
        return f"{trained} trained on (per prompt: {per_prompt})" + (f"; dropped: {dropped}" if dropped else "")

    def verify(self, stages: list[str] | None = None) -> list[str]:
        """Every registered shard and eval artefact file (or the active ones of `stages`): present,
        same size and checksum, and for a shard readable with the right fingerprint. One line per problem."""
        query = ("SELECT s.stage, s.fingerprint, s.shard, s.path, s.bytes, s.sha256 FROM shards s "
                 "JOIN stages t USING (stage, fingerprint)")
        if stages is not None:
            query += " WHERE t.active AND s.stage IN (SELECT unnest(?))"
        with self.connect(read_only=True) as con:
            rows = con.execute(query + " ORDER BY ALL", [stages] if stages is not None else []).fetchall()
        problems = []
        for stage, fp, shard, rel, size, sha in rows:
            problem = shard_problem(self.root / rel, size, sha, stage, fp)
            if problem:
                what = f"shard {shard}" if rel.endswith(".parquet") else "file"
                problems.append(f"{stage} {what} ({rel}): {problem}")
        return problems


def _matching(con, patterns: list[str]) -> list[str]:
    """The recorded stage names that `patterns` (names, or globs like score-teacher-*) name."""
    names = [name for (name,) in con.execute("SELECT DISTINCT stage FROM stages").fetchall()]
    return [name for name in names if any(fnmatchcase(name, p) for p in patterns)]


def dropped_summary(con, split: str | None = None) -> str:
    """Why pairs (of one split) are left out of training, e.g. '30 chosen truncated, 6 both truncated';
    '' when none is."""
    counts = con.execute("SELECT dropped, count(*) FROM dropped_pairs WHERE ? IS NULL OR split = ? "
                         "GROUP BY ALL ORDER BY 2 DESC, 1", [split, split]).fetchall()
    return ", ".join(f"{n} {why}" for why, n in counts)


def pairs_per_prompt(con) -> str:
    """Trained pairs per prompt (a prompt whose pairs are all dropped counts 0) and the `pairs.policy`
    that made them, from the active pairs stage's settings, e.g. 'mean 3.5, min 2, max 4; policy all'."""
    mean, low, high = con.execute("""
        SELECT avg(n), min(n), max(n)
        FROM (SELECT prompt_id, count(*) FILTER (WHERE dropped IS NULL) AS n
              FROM (SELECT prompt_id, dropped FROM pairs UNION ALL SELECT prompt_id, dropped FROM dropped_pairs)
              GROUP BY prompt_id)""").fetchone()
    row = con.execute("SELECT settings->>'policy' FROM stages WHERE stage = 'pairs' AND active").fetchone()
    policy = (row and row[0]) or "index"  # pairs built before pairs.policy existed paired by index
    return "none" if mean is None else f"mean {mean:.3g}, min {low}, max {high}; policy {policy}"


def lock_holder_message(index: Path, duckdb_message: str, held_by_reader: bool, waited_s: float = LOCK_WAIT_S) -> str:
    """Who holds the index (PID and command line, from DuckDB's message and /proc) and what to do."""
    found = re.search(r"\(PID (\d+)\)", duckdb_message)
    pid = found.group(1) if found else "?"
    try:
        command = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
    except OSError:
        command = ""
    holder = f"PID {pid}" + (f" ({command[:120]})" if command else "")
    if held_by_reader:
        return (f"{index} is held open for reading by {holder}, which blocks every writer — close that DuckDB "
                "connection (con.close(), or quit the client), then rerun")
    return f"{index} stayed locked by {holder} for {waited_s:g} s — wait for it to finish, or stop it, then rerun"


def shard_problem(path: Path, size: int, sha256: str, stage: str, fingerprint: str) -> str | None:
    """Why a registered shard cannot be trusted, or None when it is intact."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != size:
        return f"size {path.stat().st_size} bytes, registered {size} (truncated or overwritten)"
    if file_sha256(path) != sha256:
        return "checksum mismatch (corrupted)"
    if path.suffix != ".parquet":  # an eval artefact kept as its tool's own file (FILE_STAGES): no key-value metadata
        return None
    try:
        meta = shard_metadata(path)
    except CacheError as exc:
        return str(exc)
    if meta.get("stage") != stage or meta.get("fingerprint") != fingerprint:
        return "metadata names another stage or fingerprint"
    return None
