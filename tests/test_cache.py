import os
import socket
import subprocess
import sys

import duckdb
import pyarrow as pa
import pytest

from dadpo_offline.cache import open_cache
from dadpo_offline.cache.publish import build_index
from dadpo_offline.cache.query import run_query
from dadpo_offline.cache.schema import GENERATIONS
from dadpo_offline.cache.shards import fingerprint, remove_stale_temps, shard_metadata, shard_path, write_shard
from dadpo_offline.errors import CacheError, DadpoError


def generations(n, role="student"):
    return pa.Table.from_pylist([{"prompt_id": f"p{i}", "sample": 0, "role": role, "seed": i, "prompt_token_ids": [1, 2],
                                  "response_token_ids": [3, 4, 2], "text": "hi", "finish_reason": "stop",
                                  "truncated": False, "n_tokens": 3} for i in range(n)], schema=GENERATIONS)


@pytest.fixture
def cache_with_generations(tmp_path):
    cache = open_cache(tmp_path / "cache", create=True)
    fp = fingerprint({"test": 1})
    cache.begin_stage("generate-student", fp, {"test": 1}, 2)
    for k in range(2):
        written = write_shard(generations(3), shard_path(cache.stage_dir("generate-student", fp), k),
                              {"stage": "generate-student", "fingerprint": fp, "shard": k})
        cache.register("generate-student", fp, k, written)
    build_index(cache)
    return cache, fp


def test_write_shard_is_atomic_and_carries_metadata(tmp_path):
    path = shard_path(tmp_path, 3)
    written = write_shard(generations(2), path, {"stage": "generate-student", "fingerprint": "abc", "shard": 3})
    assert path.name == "shard-00003.parquet" and written.rows == 2 and len(written.sha256) == 64
    assert shard_metadata(path) == {"stage": "generate-student", "fingerprint": "abc", "shard": "3"}
    assert not list(tmp_path.glob("*.tmp-*"))
    (tmp_path / "shard-00004.parquet.tmp-host-999").write_bytes(b"half a file")
    (tmp_path / "shard-00005.parquet.tmp-other-998").write_bytes(b"another job's file in flight")
    assert remove_stale_temps(tmp_path, [3, 4]) == 1
    assert (tmp_path / "shard-00005.parquet.tmp-other-998").exists()


def test_fingerprint_changes_with_any_setting():
    base = {"model": "m", "sampling": {"temperature": 0.7, "max_tokens": 20}}
    assert fingerprint(base) == fingerprint({"sampling": {"max_tokens": 20, "temperature": 0.7}, "model": "m"})
    assert fingerprint(base) != fingerprint({**base, "sampling": {"temperature": 0.7, "max_tokens": 21}})


def test_views_are_readable_by_stock_duckdb_from_another_directory(cache_with_generations, tmp_path):
    cache, _ = cache_with_generations
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import duckdb; c = duckdb.connect('%s', read_only=True); "
            "print(c.execute('SELECT count(*) FROM generations').fetchone()[0], "
            "c.execute('SELECT count(*) FROM pairs').fetchone()[0])" % cache.index_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["6", "0"]


REGISTER_MANY = """
import sys
import pyarrow as pa
from dadpo_offline.cache import open_cache
from dadpo_offline.cache.shards import shard_path, write_shard
sys.path.insert(0, sys.argv[3])
from test_cache import generations
cache = open_cache(sys.argv[1], create=True)
job = int(sys.argv[2])
for k in range(job, 16, 2):
    path = shard_path(cache.stage_dir("generate-student", "fp"), k)
    cache.register("generate-student", "fp", k, write_shard(generations(2), path,
                   {"stage": "generate-student", "fingerprint": "fp", "shard": k}))
"""


def test_two_jobs_commit_at_the_same_time_and_cache_index_holds_both(tmp_path):
    """Jobs share no file lock (they never open the index); one `cache index` after them sees every shard."""
    cache = open_cache(tmp_path / "cache", create=True)
    cache.begin_stage("generate-student", "fp", {}, 16)
    jobs = [subprocess.Popen([sys.executable, "-c", REGISTER_MANY, str(cache.root), str(job), os.path.dirname(__file__)],
                             stderr=subprocess.PIPE, text=True) for job in (0, 1)]
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.stderr.read()
    assert sorted(cache.registered("generate-student", "fp")) == list(range(16))
    assert not cache.index_path.exists()
    build_index(cache)
    assert cache.verify() == []
    with cache.connect() as con:
        assert con.execute("SELECT count(*), count(DISTINCT prompt_id) FROM generations").fetchone() == (32, 2)


def test_empty_cache_views_have_typed_columns(tmp_path):
    cache = open_cache(tmp_path / "c", create=True)
    build_index(cache)
    with cache.connect() as con:
        assert con.execute("SELECT count(*) FROM pairs").fetchone()[0] == 0
        columns = [r[0] for r in con.execute("DESCRIBE pairs").fetchall()]
    assert {"chosen_input_ids", "ref_chosen_logp", "teacher_rejected_logp", "rejected_prompt_len"} <= set(columns)


def test_verify_names_truncated_and_corrupted_shards(cache_with_generations):
    cache, fp = cache_with_generations
    assert cache.verify() == []
    first, second = (shard_path(cache.stage_dir("generate-student", fp), k) for k in (0, 1))
    first.write_bytes(first.read_bytes()[:100])
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF
    second.write_bytes(bytes(data))
    problems = cache.verify()
    assert len(problems) == 2
    assert "shard 0" in problems[0] and "truncated" in problems[0]
    assert "shard 1" in problems[1] and "checksum mismatch" in problems[1]


def test_status_counts_shards_rows_and_active(cache_with_generations):
    cache, fp = cache_with_generations
    cache.begin_stage("generate-student", "newer", {"test": 2}, 5)
    build_index(cache)
    rows = {r["fingerprint"]: r for r in cache.status()}
    assert rows["newer"]["active"] and rows["newer"]["done"] == 0 and rows["newer"]["n_shards"] == 5
    assert not rows[fp]["active"] and rows[fp]["done"] == 2 and rows[fp]["rows"] == 6
    with cache.connect() as con:  # the view follows the active fingerprint only
        assert con.execute("SELECT count(*) FROM generations").fetchone()[0] == 0


def test_moved_cache_is_read_through_temporary_views_and_cache_index_stores_the_new_place(cache_with_generations,
                                                                                           tmp_path):
    cache, fp = cache_with_generations
    moved = tmp_path / "moved"
    os.rename(cache.root, moved)
    index = (moved / "index.duckdb").read_bytes()
    assert run_query(moved, "SELECT count(*) AS n FROM generations").to_pylist() == [{"n": 6}]
    assert (moved / "index.duckdb").read_bytes() == index  # a reader never writes
    build_index(open_cache(moved, create=True))  # the next index stores the new place's views
    stock = duckdb.connect(str(moved / "index.duckdb"), read_only=True)
    assert stock.execute("SELECT count(*) FROM generations").fetchone() == (6,)


def test_sql_is_read_only_and_takes_parameters(cache_with_generations):
    cache, _ = cache_with_generations
    assert run_query(cache.root, "SELECT count(*) AS n FROM generations WHERE prompt_id = ?", ["p1"]).to_pylist() == [{"n": 2}]
    for statement in ["DELETE FROM shards", "COPY (SELECT 1) TO 'x.csv'", "ATTACH 'x.db'", "CREATE TABLE t (x INT)",
                      "SELECT 1; SELECT 2"]:
        with pytest.raises(DadpoError):
            run_query(cache.root, statement)
    with cache.connect() as con:
        assert con.execute("SELECT count(*) FROM shards").fetchone()[0] == 2


def test_open_cache_refuses_a_folder_that_is_not_a_cache(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not a dadpo-offline cache"):
        open_cache(tmp_path / "stuff", create=True)
    with pytest.raises(CacheError, match="no cache at .* run: dadpo-offline precompute"):
        open_cache(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_index_that_is_not_duckdb_is_reported(tmp_path):
    (tmp_path / "index.duckdb").write_bytes(b"not a database at all" * 100)
    with pytest.raises(CacheError, match="index"):
        open_cache(tmp_path)


def test_ready_fingerprint_refuses_incomplete_and_stale_stages(cache_with_generations):
    cache, fp = cache_with_generations
    assert cache.ready_fingerprint("generate-student", "generate") == fp
    with pytest.raises(CacheError, match="has no pairs stage yet — run: dadpo-offline precompute MANIFEST --stage score"):
        cache.ready_fingerprint("pairs", "score")
    cache.begin_stage("score-reference", "s1", {"generate-student": fp}, 2)
    build_index(cache)
    with pytest.raises(CacheError, match=r"2 of 2 score-reference shards are missing .* every job"):
        cache.ready_fingerprint("score-reference", "score")
    for k in range(2):
        path = shard_path(cache.stage_dir("score-reference", "s1"), k)
        cache.register("score-reference", "s1", k, write_shard(generations(1), path, {"stage": "score-reference",
                                                                                     "fingerprint": "s1", "shard": k}))
    build_index(cache)
    assert cache.ready_fingerprint("score-reference", "score") == "s1"
    cache.begin_stage("generate-student", "newer", {}, 2)  # new generations: the scores no longer match them
    build_index(cache)
    with pytest.raises(CacheError, match="built from older generate-student shards"):
        cache.ready_fingerprint("score-reference", "score")


def test_build_stage_resumes_builds_only_its_todo_and_rebuilds_with_force(tmp_path):
    """Shard 1 crashes (injected); the rerun builds 1 and 2 and reads 0 back. A job's todo list
    limits what it builds; force rebuilds intact shards."""
    from dadpo_offline.cache.build import build_stage

    cache = open_cache(tmp_path / "cache", create=True)
    built = []

    class InjectedCrash(Exception):
        """Stands in for a kill during shard 1."""

    def build(k):
        built.append(k)
        if built == [0, 1]:
            raise InjectedCrash
        return generations(k + 1)

    with pytest.raises(InjectedCrash):
        build_stage(cache, "generate-student", "fp", {}, 3, build)
    first = shard_path(cache.stage_dir("generate-student", "fp"), 0)
    written = first.stat().st_mtime_ns
    built.clear()
    result = build_stage(cache, "generate-student", "fp", {}, 3, build, read_back=True)
    assert built == [1, 2] and first.stat().st_mtime_ns == written
    assert (result.report.built, result.report.skipped, result.report.rows, result.report.tokens) == (2, 1, 5, 15)
    build_index(cache)
    assert result.table.num_rows == 6 and cache.verify() == []
    built.clear()
    again = build_stage(cache, "generate-student", "fp", {}, 3, build, read_back=True)
    assert built == [] and again.table.equals(result.table) and again.report.skipped == 3
    assert build_stage(cache, "generate-student", "fp", {}, 3, build, todo=[2], force=True).report.built == 1
    assert built == [2] and first.stat().st_mtime_ns == written


def test_cache_index_ignores_what_a_killed_writer_left_and_gc_removes_its_temporary_files(cache_with_generations):
    """A shard renamed but never committed, a half-written record and a half-built index (their writers
    dead): the index holds only the committed shards; gc removes the temporary files, keeps the shard
    (a rerun adopts it)."""
    from dadpo_offline.cache.gc import collect_garbage

    cache, fp = cache_with_generations
    folder = cache.stage_dir("generate-student", fp)
    uncommitted = write_shard(generations(3), shard_path(folder, 2), {"stage": "generate-student", "fingerprint": fp,
                                                                      "shard": 2}).path
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = f"tmp-{socket.gethostname()}-{child.pid}"
    temps = [folder / f"commit-00003.json.{dead}", cache.root / f"index.duckdb.{dead}"]
    for temp in temps:
        temp.write_bytes(b"cut short")
    before = cache.status()
    build_index(cache)
    assert cache.status() == before and sorted(cache.registered("generate-student", fp)) == [0, 1]
    assert run_query(cache.root, "SELECT count(*) AS n FROM generations").to_pylist() == [{"n": 6}]
    removed = {r.path for r in collect_garbage(cache.root)}
    assert removed == {t.relative_to(cache.root).as_posix() for t in temps}
    assert uncommitted.is_file() and not any(t.exists() for t in temps)


def test_a_cache_whose_registry_lived_only_in_its_index_is_converted_by_its_first_writer(cache_with_generations):
    """Format 1 (before commit records): the first writer writes the records from the index, once."""
    cache, fp = cache_with_generations
    cache.begin_stage("generate-student", "newer", {"test": 2}, 5)
    build_index(cache)
    with cache.connect() as con:
        registry = con.execute("SELECT * FROM shards ORDER BY ALL").fetchall()
        stages = con.execute("SELECT stage, fingerprint, settings, n_shards, active FROM stages ORDER BY ALL").fetchall()
    for record in [cache.root / "dadpo-cache.json", *cache.root.glob("*/*/*.json")]:
        record.unlink()
    assert cache.registered("generate-student", fp) == {}
    converted = open_cache(cache.root, create=True)
    assert sorted(converted.registered("generate-student", fp)) == [0, 1]
    build_index(converted)
    with converted.connect() as con:
        assert con.execute("SELECT * FROM shards ORDER BY ALL").fetchall() == registry
        assert con.execute("SELECT stage, fingerprint, settings, n_shards, active FROM stages "
                           "ORDER BY ALL").fetchall() == stages


def test_beginning_a_stage_again_changes_nothing_unless_the_active_fingerprint_moves(tmp_path):
    """A rerun that builds nothing must leave the cache byte for byte as it was (the eval and sweep
    reruns snapshot it); going back to an older fingerprint must make it the active one again."""
    cache = open_cache(tmp_path / "cache", create=True)
    old, new = fingerprint({"n": 1}), fingerprint({"n": 2})
    record = lambda fp: cache.stage_dir("generate-student", fp) / "stage.json"
    cache.begin_stage("generate-student", old, {"n": 1}, 2)
    first = record(old).read_bytes()
    cache.begin_stage("generate-student", old, {"n": 1}, 2)
    assert record(old).read_bytes() == first
    cache.begin_stage("generate-student", new, {"n": 2}, 2)
    cache.begin_stage("generate-student", old, {"n": 1}, 2)  # back to the old settings: it is the newest again
    assert record(old).read_bytes() != first
    build_index(cache)
    with cache.connect() as con:
        assert con.execute("SELECT fingerprint FROM stages WHERE stage = 'generate-student' AND active").fetchall() == [(old,)]
