"""`dadpo-offline cache gc`, and `cache status` / `cache verify` over eval's files: real caches, exact output."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pyarrow as pa
import pytest
from click.testing import CliRunner

from conftest import PROMPTS, write_jsonl, write_manifest
from dadpo_offline.cache import open_cache
from dadpo_offline.cache.artefacts import cached_json, register_files, store_json
from dadpo_offline.cache.build import build_stage
from dadpo_offline.cache.gc import human_bytes
from dadpo_offline.cache.publish import build_index
from dadpo_offline.cache.schema import ANSWERS
from dadpo_offline.cache.shards import fingerprint
from dadpo_offline.cli import main
from test_cli_precompute import one_line_error


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def snapshot(directory):
    """Every file with its content hash, and every folder: 'left exactly as it was' made checkable."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def size(path):
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def answers_table(model):
    return pa.Table.from_pylist([{"suite": "winrate", "model": model, "question_id": "q0", "turn": 1, "text": "hi"}],
                                schema=ANSWERS)


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def littered_cache(tmp_path, small_cache):
    """A copy of the small cache after a rerun with one setting changed (a stale prompts fingerprint),
    with eval stages (two answers fingerprints, one lm-eval file), a stray file, a dead writer's
    temporary file, a live writer's one, and a folder of a fingerprint the index never heard of."""
    cache_dir = shutil.copytree(small_cache, tmp_path / "cache")
    manifest = write_manifest(tmp_path, write_jsonl(tmp_path / "prompts.jsonl", PROMPTS), cache_dir)
    before = {r["fingerprint"] for r in json.loads(invoke("cache", "status", cache_dir, "-f", "json").output)
              if r["stage"] == "prompts"}
    result = invoke("precompute", manifest, "--stage", "prompts", "--set", "prompts.max_prompt_tokens=255")
    assert result.exit_code == 0, result.output
    cache = open_cache(cache_dir)
    for model in ("student", "teacher"):
        build_stage(cache, "answers", fingerprint({"model": model}), {"model": model}, 1, lambda k: answers_table(model))
    settings = {"suite": "lmeval", "model": "m"}
    store_json(cache, "lmeval", settings, cache.root / "lmeval" / f"{fingerprint(settings)}.json", {"results": {}})
    build_index(cache)
    active = lambda stage: next(r["fingerprint"] for r in cache.status() if r["stage"] == stage and r["active"])
    (stale,) = before
    stray = cache.root / "generate-student" / active("generate-student") / "notes.txt"
    stray.write_text("not ours")
    temp = cache.root / "pairs" / active("pairs") / f"shard-00000.parquet.tmp-{socket.gethostname()}-{dead_pid()}"
    temp.write_bytes(b"half a shard")
    live = cache.root / "pairs" / active("pairs") / f"shard-00001.parquet.tmp-{socket.gethostname()}-{os.getpid()}"
    live.write_bytes(b"a shard in flight")
    orphan = cache.root / "score-teacher" / "0123456789abcdef"
    orphan.mkdir()
    shutil.copy(next((cache.root / "score-teacher" / active("score-teacher")).glob("shard-*.parquet")), orphan)
    return {"cache": cache_dir, "stale": cache.root / "prompts" / stale, "stray": stray, "temp": temp, "live": live,
            "orphan": orphan}


def test_cache_gc_dry_run_lists_everything_and_changes_nothing_then_gc_removes_it(littered_cache):
    cache = littered_cache["cache"]
    before = snapshot(cache)
    dry = invoke("cache", "gc", cache, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert snapshot(cache) == before
    removed = [littered_cache[k] for k in ("stale", "stray", "temp", "orphan")]
    total = sum(size(p) for p in removed)
    assert dry.output.splitlines() == [
        f"would remove  {cache}/prompts/{removed[0].name}/ (stale fingerprint, 1 shard, {human_bytes(size(removed[0]))})",
        f"would remove  {cache}/{removed[1].relative_to(cache)} (unregistered file, 8 B)",
        f"would remove  {cache}/{removed[2].relative_to(cache)} (temporary file, 12 B)",
        f"would remove  {cache}/score-teacher/0123456789abcdef/ (1 unregistered file, {human_bytes(size(removed[3]))})",
        f"would free {human_bytes(total)}"]
    status_before = json.loads(invoke("cache", "status", cache, "-f", "json").output)

    result = invoke("cache", "gc", cache)
    assert result.exit_code == 0, result.output
    assert result.output == dry.output.replace("would remove  ", "removed  ").replace("would free ", "freed ")
    assert not any(p.exists() for p in removed)
    assert littered_cache["live"].exists()  # its writer (this process) still runs
    after = snapshot(cache)
    assert set(after) == set(before) - {k for k in before for p in removed if k.startswith(p.relative_to(cache).as_posix())}
    assert all(after[k] == before[k] for k in after if not k.startswith("index.duckdb"))  # gc rewrote the views
    status_after = json.loads(invoke("cache", "status", cache, "-f", "json").output)
    assert status_after == [r for r in status_before if f"{r['stage']}/{r['fingerprint']}" != f"prompts/{removed[0].name}"]
    assert all(r["active"] for r in status_after)  # accumulating: every answers fingerprint stays
    assert sorted(r["fingerprint"] for r in status_after if r["stage"] == "answers") == sorted(
        fingerprint({"model": model}) for model in ("student", "teacher"))
    assert {r["stage"] for r in status_after} >= {"answers", "lmeval", "pairs", "prompts"}
    assert invoke("cache", "verify", cache).output.strip() == "all shards intact"
    counts = invoke("sql", cache, "SELECT (SELECT count(*) FROM prompts) AS p, (SELECT count(*) FROM pairs) AS n, "
                                  "(SELECT count(*) FROM answers) AS a", "-f", "json")
    assert json.loads(counts.output) == [{"p": 6, "n": 6, "a": 2}]  # the view: active fingerprints only
    assert invoke("cache", "gc", cache).output == "freed 0 B\n"


def test_cache_gc_refuses_a_folder_that_is_not_a_cache(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    one_line_error(invoke("cache", "gc", tmp_path / "stuff"), "is not a dadpo-offline cache")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"
    one_line_error(invoke("cache", "gc", tmp_path / "absent", "--dry-run"), "no cache at")
    assert not (tmp_path / "absent").exists()


def test_cache_status_and_verify_cover_eval_files(tmp_path):
    """lm-eval results and alpaca_eval's annotator folder are registered files: listed, checked, recomputed."""
    cache = open_cache(tmp_path / "cache", create=True)
    settings = {"suite": "lmeval", "model": "m", "tasks": {"arc_challenge": 0}}
    result = cache.root / "lmeval" / f"{fingerprint(settings)}.json"
    assert cached_json(cache, "lmeval", settings, result) is None  # nothing yet: compute it
    data = {"results": {"arc_challenge": {"acc,none": 0.5}}}
    assert store_json(cache, "lmeval", settings, result, data) == data
    assert cached_json(cache, "lmeval", settings, result) == data  # a rerun reads it back
    annotator = cache.root / "alpacaeval" / "annotator"
    annotator.mkdir(parents=True)
    (annotator / "configs.yaml").write_text("annotator: {}\n")
    judgments = annotator / "annotations_seed0_configs.json"
    judgments.write_text(json.dumps([{"preference": 1.0}, {"preference": 2.0}]))
    from dadpo_offline.eval.alpacaeval import register_annotator

    register_annotator(cache, annotator)
    build_index(cache)  # as eval does at its end

    rows = {r["stage"]: r for r in json.loads(invoke("cache", "status", cache.root, "-f", "json").output)}
    assert (rows["lmeval"]["fingerprint"], rows["lmeval"]["done"], rows["lmeval"]["n_shards"]) == (fingerprint(settings), 1, 1)
    assert rows["lmeval"]["bytes"] == result.stat().st_size
    assert (rows["alpacaeval"]["done"], rows["alpacaeval"]["rows"]) == (2, 3)  # the config, and 2 judgments
    assert invoke("cache", "verify", cache.root).output.strip() == "all shards intact"

    data_bytes = bytearray(result.read_bytes())
    data_bytes[-3] ^= 0x01
    result.write_bytes(bytes(data_bytes))
    judgments.write_text("[{\"preference\": 1.0}")  # cut short
    verify = invoke("cache", "verify", cache.root)
    assert verify.exit_code == 1
    assert verify.output.splitlines()[:2] == [
        f"alpacaeval file (alpacaeval/annotator/annotations_seed0_configs.json): size {judgments.stat().st_size} bytes, registered "
        f"{len(json.dumps([{'preference': 1.0}, {'preference': 2.0}]))} (truncated or overwritten)",
        f"lmeval file (lmeval/{result.name}): checksum mismatch (corrupted)"]
    assert verify.output.splitlines()[2].startswith("Error: 2 bad shard(s)")
    assert cached_json(cache, "lmeval", settings, result) is None  # damaged: removed, to be computed again
    build_index(cache)
    assert not result.exists() and fingerprint(settings) not in {
        r["fingerprint"] for r in cache.status() if r["done"]}


def test_an_unregistered_lmeval_result_of_an_older_cache_is_adopted(tmp_path):
    cache = open_cache(tmp_path / "cache", create=True)
    settings = {"suite": "lmeval", "model": "old"}
    path = cache.root / "lmeval" / f"{fingerprint(settings)}.json"
    path.parent.mkdir()
    path.write_text('{"results": {}}')
    assert cached_json(cache, "lmeval", settings, path) == {"results": {}}
    build_index(cache)
    assert [(r["stage"], r["done"]) for r in cache.status()] == [("lmeval", 1)]
    assert cache.verify() == []
    register_files(cache, "lmeval", settings, [path])  # registering again replaces, never duplicates
    assert len(cache.registered("lmeval", fingerprint(settings))) == 1
