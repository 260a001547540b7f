"""`dadpo-offline eval`: a real judge (vLLM's OpenAI server on 127.0.0.1), resume, and one-line errors."""
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest

from dadpo_offline.eval.serve import free_port
from conftest import write_manifest
from test_cli_precompute import invoke, one_line_error


def eval_manifest(tmp_path, prompts_file, base_url, model="smol-judge", extra=""):
    path = write_manifest(tmp_path, prompts_file, tmp_path / "cache")
    path.write_text(path.read_text() + f"""\
eval:
  suites: [mtbench, winrate]
  output_dir: {tmp_path / "eval"}
  judge: {{base_url: "{base_url}", model: {model}, max_tokens: 40, concurrency: 4, max_retries: 1, timeout_s: 60}}
  mtbench: {{limit: 1, max_tokens: 16}}
  winrate: {{limit: 3, max_tokens: 16}}
{extra}""", encoding="utf-8")
    return path


def served_requests(base_url):
    """Chat requests the judge has finished, from vLLM's Prometheus counters."""
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def test_eval_judges_with_a_real_server_and_reruns_from_the_cache(tmp_path, prompts_file, judge_server):
    manifest = eval_manifest(tmp_path, prompts_file, judge_server["base_url"])
    result = invoke("eval", manifest)
    assert result.exit_code == 0, result.output
    assert "# Eval " in result.stdout and "| student | teacher |" in result.stdout
    run_dir = next((tmp_path / "eval").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["judge"] == {"base_url": judge_server["base_url"], "model": "smol-judge", "temperature": 0.0,
                                "max_tokens": 40, "logprobs": 20, "followup_max_tokens": 3}
    assert "OPENAI_API_KEY" not in (run_dir / "summary.json").read_text()
    con = duckdb.connect(str(tmp_path / "cache" / "index.duckdb"), read_only=True)
    # MT-Bench, one question per category: 8 questions x 2 turns, for teacher and student
    assert con.execute("SELECT count(*) FROM judgments WHERE suite = 'mtbench'").fetchone() == (32,)
    assert con.execute("SELECT count(*) FROM judgments WHERE suite = 'winrate'").fetchone() == (6,)  # 3 prompts x 2 orders
    assert con.execute("SELECT DISTINCT judge FROM judgments").fetchall() == [(f"smol-judge@{judge_server['base_url']}",)]
    graded, unparsed = con.execute("""
        SELECT sum(n) FILTER (WHERE metric = 'overall'), sum(value) FILTER (WHERE metric = 'unparsed_judgments')
        FROM eval_results WHERE suite = 'mtbench'""").fetchone()
    assert (graded or 0) + unparsed == 32  # every turn is either scored or counted as a miss
    missed = con.execute("SELECT count(*) FROM judgments WHERE suite = 'mtbench' AND score IS NULL").fetchone()[0]
    assert missed == unparsed
    assert con.execute("SELECT count(*) FROM answers WHERE suite = 'mtbench' AND turn = 2").fetchone() == (16,)
    wins, ties, losses = (con.execute("SELECT value FROM eval_results WHERE metric = ?", [f"{k}_vs_teacher"]).fetchone()[0]
                          for k in ("wins", "ties", "losses"))
    assert wins + ties + losses == 3
    methods = dict(con.execute("SELECT method, count(*) FROM judgments GROUP BY method").fetchall())
    assert set(methods) <= {"logprobs", "text", "followup", "none"} and sum(methods.values()) == 38
    counted = con.execute("SELECT suite, sum(value) FROM eval_results WHERE metric LIKE 'verdicts_%' GROUP BY suite")
    assert dict(counted.fetchall()) == {"mtbench": 32.0, "winrate": 6.0}  # every judgment counted once, by method
    assert "Verdicts read by log-probs / text / follow-up / not at all: mtbench/student " in result.stdout
    con.close()

    calls = served_requests(judge_server["base_url"])
    again = invoke("eval", manifest)
    assert again.exit_code == 0, again.output
    assert served_requests(judge_server["base_url"]) == calls  # only the cheap GET /models: no judge call repeated
    assert len(list((tmp_path / "eval").iterdir())) == 2  # one folder per run
    sql = invoke("sql", tmp_path / "cache", "SELECT count(DISTINCT run_id) AS runs FROM eval_results", "-f", "json")
    assert json.loads(sql.stdout) == [{"runs": 2}]


def test_eval_unreachable_judge_is_one_line(tmp_path, prompts_file):
    url = f"http://127.0.0.1:{free_port()}/v1"
    one_line_error(invoke("eval", eval_manifest(tmp_path, prompts_file, url)), f"judge at {url} is unreachable")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "eval").exists()


def test_eval_without_a_judge_says_which_settings(tmp_path, prompts_file):
    manifest = eval_manifest(tmp_path, prompts_file, "x")
    one_line_error(invoke("eval", manifest, "--set", "eval.judge.base_url=null"), "set eval.judge.base_url and eval.judge.model")


class BrokenJudge(BaseHTTPRequestHandler):
    """A deliberately broken OpenAI-compatible endpoint: a real HTTP server written for this test.

    GET /v1/models lists the model; POST /v1/chat/completions answers 200 with a body that is not a
    chat completion (`reply` is set per test).
    """
    reply = b"not json at all"
    status = 200
    models = json.dumps({"object": "list", "data": [{"id": "broken", "object": "model"}]}).encode()
    content_type = "application/json"

    def do_GET(self):
        self.answer(self.models)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer(self.reply, self.status)

    def answer(self, body, status=200):
        self.send_response(status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def broken_judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.parametrize("reply", [b"not json at all", b'{"id": "x", "choices": []}'])
def test_eval_malformed_judge_reply_is_one_line_and_keeps_answers(tmp_path, prompts_file, broken_judge, reply, monkeypatch):
    monkeypatch.setattr(BrokenJudge, "reply", reply)
    manifest = eval_manifest(tmp_path, prompts_file, broken_judge, model="broken")
    result = invoke("eval", manifest, "--suite", "winrate", "--set", "eval.winrate.limit=1")
    assert result.exit_code == 1
    assert f"judge at {broken_judge} sent a malformed reply" in result.output.strip().splitlines()[-1]
    con = duckdb.connect(str(tmp_path / "cache" / "index.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM answers").fetchone() == (2,)  # kept: the next run only judges
    assert con.execute("SELECT count(*) FROM judgments").fetchone() == (0,)


@pytest.mark.parametrize("content_type", ["application/json", "text/html"])
def test_eval_judge_whose_model_list_is_not_json_is_one_line(tmp_path, prompts_file, broken_judge, monkeypatch,
                                                             content_type):
    """HTTP 200 with a body that is not JSON (a proxy's login page, a wrong base URL): before any work."""
    monkeypatch.setattr(BrokenJudge, "models", b"<html>please sign in</html>")
    monkeypatch.setattr(BrokenJudge, "content_type", content_type)
    result = invoke("eval", eval_manifest(tmp_path, prompts_file, broken_judge, model="broken"), "--suite", "winrate")
    one_line_error(result, f"judge at {broken_judge} answered GET /models with something other than an OpenAI "
                           "model list: '<html>please sign in</html>'")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "eval").exists()


def test_eval_request_refused_by_the_judge_is_recorded_and_counted(tmp_path, prompts_file, broken_judge, monkeypatch):
    """HTTP 400 (e.g. an answer longer than the judge's context) costs that judgment, not the run."""
    monkeypatch.setattr(BrokenJudge, "status", 400)
    monkeypatch.setattr(BrokenJudge, "reply", b'{"error": {"message": "maximum context length exceeded", "code": 400}}')
    manifest = eval_manifest(tmp_path, prompts_file, broken_judge, model="broken")
    result = invoke("eval", manifest, "--suite", "winrate", "--set", "eval.winrate.limit=2")
    assert result.exit_code == 0, result.output
    con = duckdb.connect(str(tmp_path / "cache" / "index.duckdb"), read_only=True)
    errors = con.execute("SELECT DISTINCT error FROM judgments").fetchall()
    assert len(errors) == 1 and errors[0][0].startswith("HTTP 400: ") and "context length" in errors[0][0]
    assert con.execute("SELECT value FROM eval_results WHERE metric = 'unparsed_judgments_vs_teacher'").fetchone() == (4.0,)
    assert "winrate/student 4" in result.stdout


def test_eval_missing_benchmark_data_fails_before_any_work(tmp_path, prompts_file, broken_judge):
    manifest = eval_manifest(tmp_path, prompts_file, broken_judge, model="broken")
    result = invoke("eval", manifest, "--set", f"eval.mtbench.data_dir={tmp_path / 'nowhere'}")
    one_line_error(result, "MT-Bench file missing")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "eval").exists()


def test_eval_bad_flags_exit_2(tmp_path, prompts_file):
    manifest = eval_manifest(tmp_path, prompts_file, "http://127.0.0.1:1/v1")
    assert invoke("eval", manifest, "--suite", "mtbench,bogus").exit_code == 2
    assert invoke("eval", manifest, "--model", "no-equals-sign").exit_code == 2
    one_line_error(invoke("eval", manifest, "--only", "nobody"), "--only nobody: no such model")


def test_eval_alpacaeval_and_lmeval_suites_through_the_command(tmp_path, prompts_file, judge_server):
    """alpaca_eval judged by the real server against the teacher's answers; lm-eval on the project's local ARC rows."""
    data = Path(__file__).parent / "data" / "lmeval"
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in
                                    ["Name a colour of the sky.", "Say hello in French."]), encoding="utf-8")
    manifest = eval_manifest(tmp_path, prompts_file, judge_server["base_url"], extra=f"""\
  alpacaeval: {{instructions: {instructions}, max_tokens: 16}}
  lmeval:
    tasks: {{arc_challenge: 0}}
    data_files: {{arc_challenge: {{test: {data / "arc_challenge_test.jsonl"}}}}}
    limit: 2
""")
    result = invoke("eval", manifest, "--suite", "alpacaeval,lmeval", "--only", "teacher,student")
    assert result.exit_code == 0, result.output
    assert "AlpacaEval win %" in result.stdout and "arc_challenge/acc" in result.stdout
    rows = {(r["model"], r["suite"], r["metric"]): r for r in
            json.loads(next((tmp_path / "eval").glob("*/summary.json")).read_text())["results"]}
    assert 0 <= rows[("student", "alpacaeval", "win_rate")]["value"] <= 100
    assert ("teacher", "alpacaeval", "win_rate") not in rows  # the teacher is the reference
    assert {m for (model, suite, m) in rows if suite == "lmeval" and model == "teacher"} >= {"arc_challenge/acc",
                                                                                         "arc_challenge/acc_norm"}
    assert rows[("student", "lmeval", "arc_challenge/acc")]["n"] == 2
    assert (tmp_path / "cache" / "alpacaeval" / "annotator" / "configs.yaml").is_file()  # judgments kept for later runs
    status = json.loads(invoke("cache", "status", tmp_path / "cache", "-f", "json").stdout)
    done = {r["stage"]: r["done"] for r in status}
    assert done["lmeval"] == 1 and done["alpacaeval"] == 2  # one result per model and group; config + judgments
    assert [r["stage"] for r in status].count("lmeval") == 1  # teacher and student are the same model here: one result
    assert invoke("cache", "verify", tmp_path / "cache").stdout.strip() == "all shards intact"
