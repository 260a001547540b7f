"""`dadpo-offline cache index`: many writers, some killed, one index built from their commit records;
readers that never write (a cache moved elsewhere and made read-only). Real CLI processes, real models."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from click.testing import CliRunner

from conftest import as_another_user, write_jsonl, write_manifest
from dadpo_offline.cache import open_cache
from dadpo_offline.cli import main
from test_cli_precompute import snapshot

N_PROMPTS = 16  # shard_size 1: 4 shards a job a stage, so a job killed after its first commit is mid-stage
READER = """
import duckdb, sys
con = duckdb.connect(sys.argv[1], read_only=True)
state = lambda: con.execute("SELECT (SELECT count(*) FROM pairs), (SELECT count(*) FROM dropped_pairs), "
                            "(SELECT coalesce(sum(rows), 0) FROM shards JOIN stages USING (stage, fingerprint) "
                            "WHERE stage = 'pairs' AND active)").fetchone()
print(*state(), flush=True)
sys.stdin.readline()
print(*state(), flush=True)
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def index_rows(cache_dir):
    with open_cache(cache_dir).connect() as con:
        return (con.execute("SELECT stage, fingerprint, shard, path, rows, bytes, sha256 FROM shards ORDER BY ALL").fetchall(),
                con.execute("SELECT stage, fingerprint, settings, n_shards, active FROM stages ORDER BY ALL").fetchall())


def committed(cache_dir):
    """(stage, fingerprint, shard) of every commit record on disk."""
    return sorted((p.parts[-3], p.parts[-2], int(p.stem.split("-")[1])) for p in cache_dir.glob("*/*/commit-*.json"))


def test_four_writers_two_killed_then_cache_index_holds_exactly_the_committed_shards(tmp_path, tiny_student):
    prompts = [{"prompt": f"What is {k} plus {k}?", "category": "math"} for k in range(N_PROMPTS)]
    manifest = write_manifest(tmp_path, write_jsonl(tmp_path / "prompts.jsonl", prompts), tmp_path / "cache",
                              teacher=tiny_student, student=tiny_student, shard_size=1, max_tokens=8,
                              backend="transformers")
    cache = tmp_path / "cache"
    command = lambda job: [sys.executable, "-m", "dadpo_offline", "precompute", str(manifest), "--shard", f"{job}/4"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    jobs = [subprocess.Popen(command(job), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for job in range(4)]
    # jobs 0 and 1 are killed once they have committed a shard of generate-teacher (0 and 1), with 3 more to go;
    # both are watched at once, so neither runs on to its pairs while the test waits for the other
    pending, deadline = {0, 1}, time.monotonic() + 300
    while pending and time.monotonic() < deadline:
        for job in sorted(pending):
            assert jobs[job].poll() is None, jobs[job].stderr.read()[-2000:]
            if list(cache.glob(f"generate-teacher/*/commit-0000{job}.json")):
                jobs[job].send_signal(signal.SIGKILL)
                pending.discard(job)
        time.sleep(0.01)
    assert not pending, f"jobs {sorted(pending)} committed no generate-teacher shard in 300 s"
    for job in (2, 3):
        assert jobs[job].wait(timeout=600) == 0, jobs[job].stderr.read()[-2000:]
    for job in jobs:
        job.wait()
        job.stderr.close()
    assert not (cache / "index.duckdb").exists()  # no worker opened it

    result = invoke("cache", "index", cache)
    assert result.exit_code == 0, result.output
    shards, stages = index_rows(cache)
    assert [(stage, fp, k) for stage, fp, k, *_ in shards] == committed(cache)
    assert {k for stage, _, k, *_ in shards if stage == "pairs"} == set(range(2, N_PROMPTS, 4)) | set(range(3, N_PROMPTS, 4))
    assert open_cache(cache).verify() == []  # every indexed shard is whole, with its recorded size and checksum
    assert invoke("cache", "index", cache).exit_code == 0
    assert index_rows(cache) == (shards, stages)  # a rerun is idempotent

    reader = subprocess.Popen([sys.executable, "-c", READER, str(cache / "index.duckdb")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        before = reader.stdout.readline().split()
        assert int(before[0]) + int(before[1]) == int(before[2]) == N_PROMPTS // 2
        reruns = [subprocess.Popen(command(job), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                  for job in (0, 1)]  # the killed jobs, rerun: they build only what they had not committed
        for rerun in reruns:
            assert rerun.wait(timeout=600) == 0, rerun.stderr.read()[-2000:]
            rerun.stderr.close()
        assert invoke("cache", "index", cache).exit_code == 0  # replaced while the reader holds the old one
        reader.stdin.write("again\n")
        reader.stdin.flush()
        assert reader.stdout.readline().split() == before  # the old index, whole: views and registry agree
    finally:
        reader.kill()
        reader.wait()
    counts = invoke("sql", cache, "SELECT count(*) AS n, count(DISTINCT prompt_id) AS prompts FROM pairs "
                                  "UNION ALL SELECT count(*), count(DISTINCT prompt_id) FROM dropped_pairs", "-f", "json")
    assert sum(r["n"] for r in json.loads(counts.output)) == N_PROMPTS
    assert sum(r["prompts"] for r in json.loads(counts.output)) == N_PROMPTS
    assert index_rows(cache)[0] != shards and [r[:3] for r in index_rows(cache)[0]] == committed(cache)
    assert invoke("cache", "verify", cache).output.strip() == "all shards intact"


def test_a_cache_copied_elsewhere_and_made_read_only_answers_sql_and_trains(tiny_cache, shared_dir):
    """Readers never write: `sql` as another user (root would write through a-w) and `train` on a copy at
    another path with every write bit cleared; not one byte of the copy changes."""
    source = json.loads(invoke("sql", tiny_cache.parent / "cache", "SELECT count(*) AS n FROM pairs", "-f",
                               "json").output)
    copy = shared_dir / "copied-cache"
    shutil.copytree(tiny_cache.parent / "cache", copy)
    manifest = shared_dir / "manifest.yaml"
    manifest.write_text(tiny_cache.read_text().replace(str(tiny_cache.parent / "cache"), str(copy)))
    subprocess.run(["chmod", "-R", "a-w", str(copy)], check=True)
    try:
        before = snapshot(copy)
        code, output = as_another_user("sql", copy, "SELECT count(*) AS n FROM pairs", "-f", "json")
        assert (code, json.loads(output)) == ("0", source)
        out = shared_dir / "out"
        result = invoke("train", manifest, "--loss", "ddpo", "--max-steps", 1, "--output-dir", out,
                        "--set", "train.micro_batch_size=2", "--set", "train.batch_size=2",
                        "--set", "train.report_to=[]")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout.strip())["steps"] == 1
        assert snapshot(copy) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(copy)], check=True)
