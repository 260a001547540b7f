"""`dadpo-offline sql` and `cache status`: output formats, read-only, exit codes."""
import csv
import io
import json

import pyarrow.parquet as pq
from click.testing import CliRunner

from dadpo_offline.cli import main

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
