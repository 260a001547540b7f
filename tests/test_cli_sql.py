"""`dadpo-offline sql` and `cache status`: output formats, read-only, exit codes."""
import csv
import io
import json

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dadpo_offline.cache import open_cache
from dadpo_offline.cli import main
from test_cli_precompute import snapshot

QUERY = "SELECT prompt_id, chosen_tokens, teacher_chosen_logp FROM pairs ORDER BY prompt_id"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_sql_prints_table_csv_json_and_jsonl(small_cache):
    as_json = json.loads(invoke("sql", small_cache, QUERY, "-f", "json").output)
    assert len(as_json) == 6 and set(as_json[0]) == {"prompt_id", "chosen_tokens", "teacher_chosen_logp"}
    as_jsonl = [json.loads(line) for line in invoke("sql", small_cache, QUERY, "-f", "jsonl").output.splitlines()]
    assert as_jsonl == as_json
    as_csv = list(csv.DictReader(io.StringIO(invoke("sql", small_cache, QUERY, "-f", "csv").output)))
    assert [r["prompt_id"] for r in as_csv] == [r["prompt_id"] for r in as_json]
    table = invoke("sql", small_cache, QUERY).output.splitlines()
    assert table[0].split() == ["prompt_id", "chosen_tokens", "teacher_chosen_logp"] and len(table) == 8


def test_sql_parquet_output_and_parameters(small_cache, tmp_path):
    out = tmp_path / "pairs.parquet"
    result = invoke("sql", small_cache, "SELECT * FROM prompts WHERE category = ?", "-p", "writing",
                    "-f", "parquet", "-o", out)
    assert result.exit_code == 0
    assert pq.read_table(out).column("category").to_pylist() == ["writing", "writing"]
    assert invoke("sql", small_cache, "SELECT 1", "-f", "parquet").exit_code == 1
    bad = invoke("sql", small_cache, "SELECT 1", "-f", "csv", "-o", tmp_path / "no" / "such" / "x.csv")
    assert bad.exit_code == 1 and bad.output.startswith("Error: cannot write")


def test_sql_refuses_writes_and_reports_sql_errors(small_cache):
    for statement, fragment in [("DROP VIEW pairs", "refused: DROP"), ("INSERT INTO meta VALUES ('a', 'b')", "refused: INSERT"),
                                ("SELECT nope FROM pairs", "SQL error: Binder Error")]:
        result = invoke("sql", small_cache, statement)
        assert result.exit_code == 1 and fragment in result.output, result.output
    assert invoke("sql", small_cache, "SELECT count(*) AS n FROM pairs", "-f", "json").output.strip() == '[\n {\n  "n": 6\n }\n]'


def test_sql_on_a_missing_cache_names_the_next_command(tmp_path):
    result = invoke("sql", tmp_path / "nowhere", "SELECT 1")
    assert result.exit_code == 1 and "run: dadpo-offline precompute MANIFEST" in result.output


def test_cache_status_lists_every_stage(small_cache):
    rows = json.loads(invoke("cache", "status", small_cache, "-f", "json").output)
    active = {r["stage"]: r for r in rows if r["active"]}
    assert set(active) == {"prompts", "generate-student", "generate-teacher", "score-teacher", "score-reference",
                           "pairs"}
    assert active["score-teacher"]["done"] == active["score-teacher"]["n_shards"] == 3
    assert active["score-teacher"]["rows"] == 12


# every way DuckDB offers to write: COPY, EXPLAIN ANALYZE of a writing statement (which runs it), ATTACH,
# INSTALL/LOAD, SET of file settings, EXPORT, table functions that run SQL, DDL/DML, several statements
WRITES = [
    "COPY (SELECT * FROM pairs) TO '{out}/a.parquet'",
    "COPY pairs TO '{out}/b.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/c.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS prompt_id) TO '{shard}' (FORMAT parquet)",
    "explain  analyse\nCOPY (SELECT 1) TO '{out}/d.csv'",
    "/* first */ EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/e.csv'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "EXPLAIN ANALYZE INSERT INTO meta VALUES ('a', 'b')",
    "EXPLAIN EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/f.csv'",
    "ATTACH '{out}/g.duckdb' AS other",
    "INSTALL httpfs", "LOAD parquet", "FORCE INSTALL json",
    "SET enable_external_access = true", "SET log_query_path = '{out}/h.log'", "SET temp_directory = '{out}'",
    "RESET lock_configuration",
    "EXPORT DATABASE '{out}/export'", "CHECKPOINT", "VACUUM",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{out}/i.csv''')",
    "CREATE TABLE t AS SELECT 1", "UPDATE meta SET value = 'x'", "DELETE FROM shards",
    "CREATE OR REPLACE VIEW pairs AS SELECT 1",
    "SELECT 1; COPY (SELECT 1) TO '{out}/j.csv'",
    "PRAGMA enable_profiling = 'json'",
]


@pytest.mark.parametrize("statement", WRITES)
def test_sql_cannot_write_anything_anywhere(small_cache, tmp_path, statement):
    shard = sorted((small_cache / "pairs").rglob("shard-*.parquet"))[0]
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(small_cache), snapshot(out)
    result = invoke("sql", small_cache, statement.format(out=out, shard=shard))
    assert result.exit_code == 1 and result.output.startswith("Error: ") and len(result.output.splitlines()) == 1, \
        result.output
    assert (snapshot(small_cache), snapshot(out)) == before
    assert not any(out.iterdir())


def test_sql_explain_analyze_of_a_select_still_runs(small_cache):
    result = invoke("sql", small_cache, "EXPLAIN ANALYZE SELECT count(*) FROM pairs", "-f", "json")
    assert result.exit_code == 0 and "analyzed_plan" in result.output


def test_read_only_connections_are_confined_by_duckdb_itself(small_cache, tmp_path):
    """The second layer, without sql's allow-list: DuckDB refuses files outside the cache, extensions, settings."""
    with open_cache(small_cache).connect() as con:
        assert con.execute("SELECT count(*) FROM pairs").fetchone() == (6,)
        for statement in [f"COPY (SELECT 1) TO '{tmp_path}/x.csv'", "SELECT * FROM read_text('/etc/hostname')",
                          "SET enable_external_access = true", "LOAD httpfs",
                          f"ATTACH '{tmp_path}/y.duckdb' AS y"]:
            with pytest.raises(duckdb.Error):
                con.execute(statement)
    assert not any(tmp_path.iterdir())


def test_a_copied_run_folder_keeps_its_fingerprints_and_a_moved_cache_is_read_without_writing(
        tmp_path, shared_dir, tiny_student, tiny_other_model):
    """A run folder (manifest, prompts, local models, cache) with relative paths, copied elsewhere:
    precompute there rebuilds nothing (no absolute path is part of a fingerprint). Copied again into
    a folder another user may read but not write: that user queries it, and no file changes."""
    import shutil

    from conftest import PROMPTS, as_another_user, write_jsonl

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(tiny_student, run / "student")
    shutil.copytree(tiny_other_model, run / "teacher")
    write_jsonl(run / "prompts.jsonl", PROMPTS)
    (run / "manifest.yaml").write_text(
        "cache_dir: cache\nteacher: {model: ./teacher}\nstudent: {model: ./student}\n"
        "prompts: {sources: [{jsonl: prompts.jsonl}]}\n"
        "generate: {teacher: {max_tokens: 6}, student: {max_tokens: 6}}\n"
        "engine: {backend: transformers, shard_size: 3}\npairs: {require_finished: none}\n", encoding="utf-8")
    assert invoke("precompute", run / "manifest.yaml").exit_code == 0
    stages = lambda cache: {(r["stage"], r["fingerprint"]) for r in json.loads(invoke("cache", "status", cache, "-f", "json").output)}

    copy = shutil.copytree(run, tmp_path / "elsewhere" / "run")
    rerun = invoke("precompute", copy / "manifest.yaml")
    assert rerun.exit_code == 0, rerun.output
    assert " built 0, skipped 2" in rerun.output and " built 1" not in rerun.output and " built 2" not in rerun.output
    assert stages(copy / "cache") == stages(run / "cache")

    moved = shutil.copytree(run / "cache", shared_dir / "cache")
    before = snapshot(moved)
    code, output = as_another_user("sql", moved, "SELECT count(*) AS n FROM pairs", "-f", "csv")
    assert (code, output.split()) == ("0", ["n", "6"])
    code, output = as_another_user("cache", "verify", moved)
    assert code == "0", output
    assert snapshot(moved) == before
