"""`index.duckdb`: the shard registry and the views `prompts`, `generations`, `scores`, `pairs`,
and, once `eval` has run, `answers`, `judgments` and `eval_results`.

The index is derived: `cache index` (publish.py) builds it from the commit records (records.py)
and replaces it atomically; writers never open it. The views read the committed shards of each
stage's active fingerprint through absolute paths, so a stock DuckDB client opens them from any
working directory. Readers never write: in a moved or copied cache, this tool's read-only
connections see the views through temporary ones made for the new place (the file stays
untouched, and may be read-only).
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
from tqdm import tqdm

from ..errors import CacheError
from . import records
from .records import MARKER, RegisteredShard, mark_cache
from .schema import STAGES, TEACHER_SCORES, VIEW_FILTERS, VIEW_STAGES, VIEWS_BY_NAME, stage_schema
from .shards import ShardFile, file_sha256, read_shard, shard_metadata, shard_path

INDEX_NAME = "index.duckdb"
EMPTY_DIR = "_empty"  # typed zero-row files behind empty views
NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}

REGISTRY_SQL = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE stages (
    stage VARCHAR, fingerprint VARCHAR, settings JSON, n_shards INTEGER, active BOOLEAN,
    created_at TIMESTAMP, PRIMARY KEY (stage, fingerprint));
CREATE TABLE shards (
    stage VARCHAR, fingerprint VARCHAR, shard INTEGER, path VARCHAR, rows BIGINT, bytes BIGINT,
    sha256 VARCHAR, PRIMARY KEY (stage, fingerprint, shard));
"""


def is_cache(root: Path) -> bool:
    return (root / MARKER).is_file() or (root / INDEX_NAME).is_file()


def open_cache(root: str | Path, create: bool = False) -> "CacheIndex":
    """Open an existing cache to read; with `create`, to write (made when the folder is new or empty).

    A writer never opens `index.duckdb`: it writes shards and commit records only. A cache made
    before commit records existed is converted once, here, by its first writer.
    """
    root = Path(root).expanduser().resolve()
    if is_cache(root):
        cache = CacheIndex(root)
        if create and not (root / MARKER).is_file():
            cache.import_legacy_registry()
        elif not create and cache.index_path.is_file():
            with cache.connect():  # a file that is not a DuckDB index is named now, not mid-run
                pass
        return cache
    if root.exists() and not root.is_dir():
        raise CacheError(f"{root} is a file, not a cache directory")
    # a folder holding only another job's half-written marker is a cache being made at this moment (--shard jobs)
    if root.is_dir() and any(not p.name.startswith(f"{MARKER}.tmp-") for p in root.iterdir()):
        raise CacheError(f"{root} is not a dadpo-offline cache (no {INDEX_NAME}) and is not empty; "
                         "give an empty or new folder as cache_dir")
    if not create:
        raise CacheError(f"no cache at {root} — run: dadpo-offline precompute MANIFEST")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        mark_cache(root)
    except CacheError:  # e.g. a full disk: leave no half-made cache behind
        if created and not any(root.iterdir()):
            root.rmdir()
        raise
    return CacheIndex(root)


class CacheIndex:
    def __init__(self, root: Path):
        self.root = root
        self.index_path = root / INDEX_NAME

    @contextmanager
    def connect(self):
        """A read-only connection to the index: readers never write, so the cache may be mounted
        read-only, elsewhere, or replaced by `cache index` while this connection reads the old one.

        It is also confined by DuckDB's own controls: files only inside the cache folder, no
        extensions, settings locked. So even a statement that slipped past `sql`'s allow-list
        could neither write outside the cache nor turn the controls off.
        """
        if not self.index_path.is_file():
            raise CacheError(f"{self.root} has no index yet — run: dadpo-offline cache index {self.root}")
        try:
            con = duckdb.connect(str(self.index_path), read_only=True, config=NO_EXTENSIONS)
        except duckdb.IOException as exc:
            raise CacheError(f"{self.index_path}: cannot open the index ({str(exc).splitlines()[0]})") from exc
        except duckdb.Error as exc:
            raise CacheError(f"{self.index_path}: not a readable DuckDB index ({str(exc).splitlines()[0]})") from exc
        try:
            con.execute("SET allowed_directories = ?", [[f"{self.root}/"]])
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            if self._moved(con):
                self._temporary_views(con)
        except duckdb.Error as exc:
            con.close()
            raise CacheError(f"{self.index_path}: not a dadpo-offline index ({str(exc).splitlines()[0]})") from exc
        try:
            yield con
        finally:
            con.close()

    def stage_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / fingerprint

    # -- commit records (writers) ---------------------------------------------------------------

    def begin_stage(self, stage: str, fingerprint: str, settings: dict, n_shards: int) -> None:
        """Record a stage's settings and make this fingerprint the newest (the one the views show,
        beside the others if accumulating, once `cache index` has run)."""
        records.begin(self.stage_dir(stage, fingerprint), stage, fingerprint, settings, n_shards)

    def registered(self, stage: str, fingerprint: str) -> dict[int, RegisteredShard]:
        """The committed shards of a stage fingerprint, from their records (not from the index)."""
        return records.commits(self.root, self.stage_dir(stage, fingerprint))

    def register(self, stage: str, fingerprint: str, shard: int, written: ShardFile, engine=None) -> None:
        """Called only after the rename: a committed shard is always a complete file."""
        records.commit(self.root, self.stage_dir(stage, fingerprint), stage, fingerprint, shard, written.path,
                       written.rows, written.bytes, written.sha256, engine)

    def unregister(self, stage: str, fingerprint: str, shard: int) -> None:
        records.commit_path(self.stage_dir(stage, fingerprint), shard).unlink(missing_ok=True)

    def active_settings(self, stage: str) -> dict:
        """The settings of `stage`'s newest fingerprint, from the records; {} when none was begun."""
        begun = [r for r in records.stage_records(self.root) if r.stage == stage]
        return max(begun, key=lambda r: (r.begun_ns, r.fingerprint)).settings if begun else {}

    def import_legacy_registry(self) -> None:
        """Write the commit and stage records of a cache whose registry lived only in its index
        (format 1), then mark it: done once, by the first writer of the new protocol."""
        with self.connect() as con:
            stages = con.execute("SELECT stage, fingerprint, settings, n_shards, active, epoch_ns(created_at) "
                                 "FROM stages").fetchall()
            shards = con.execute("SELECT stage, fingerprint, shard, path, rows, bytes, sha256 FROM shards").fetchall()
        for stage, fp, settings, n_shards, active, created_ns in stages:
            records.write_record(self.stage_dir(stage, fp) / records.STAGE_RECORD, {
                "stage": stage, "fingerprint": fp, "settings": json.loads(settings), "n_shards": n_shards,
                "begun_ns": time.time_ns() if active else created_ns or 0})
        for stage, fp, shard, rel, rows, size, sha in shards:
            records.commit(self.root, self.stage_dir(stage, fp), stage, fp, shard, self.root / rel, rows, size, sha, None)
        mark_cache(self.root)

    # -- the index (readers) --------------------------------------------------------------------

    def ready_fingerprint(self, stage: str, producer: str) -> str:
        """The active fingerprint of `stage`, once all its shards exist and its inputs are still the active ones.

        Readers (training) call this so that they never train on a quarter of the data while other
        --shard jobs run, nor on pairs built from generations that a newer run has replaced.
        """
        command = f"run: dadpo-offline precompute MANIFEST --stage {producer}"
        with self.connect() as con:
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
        with self.connect() as con:
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
                empty = self.root / EMPTY_DIR / f"{stages[0]}.parquet"
                if temporary and not empty.is_file():  # a reader makes no file: the stored view stays
                    continue
                files = [str(empty if temporary else self._empty_shard(stages[0]))]
            listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            by_name = ", union_by_name = true" if view in VIEWS_BY_NAME else ""
            where = f" WHERE {VIEW_FILTERS[view]}" if view in VIEW_FILTERS else ""
            con.execute(f"CREATE OR REPLACE {'TEMP ' if temporary else ''}VIEW {view} AS "
                        f"SELECT * FROM read_parquet([{listing}]{by_name}){where}")
        if not temporary:
            con.execute("INSERT OR REPLACE INTO meta VALUES ('root', ?)", [str(self.root)])

    def _empty_shard(self, stage: str) -> Path:
        """A zero-row file with the stage's schema, so empty views still have typed columns."""
        path = self.root / EMPTY_DIR / f"{stage}.parquet"
        if not path.is_file() or not pq.read_schema(path).equals(STAGES[stage]):  # a column added since
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(STAGES[stage].empty_table(), path)
        return path

    # -- inspection -----------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """One row per stage fingerprint: shards done of expected, rows, bytes, active or stale; for
        the active pairs, how many training reads and why the others are dropped."""
        with self.connect() as con:
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
        with self.connect() as con:
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
