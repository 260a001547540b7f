"""`dadpo-offline precompute` and `run`: bad input gets one line, exit 1, and an untouched cache."""
import hashlib
import json

import pytest
from click.testing import CliRunner

from conftest import PROMPTS, write_jsonl, write_manifest
from dadpo_offline.cli import main


def snapshot(directory):
    """Every file under a directory with its content hash: 'left exactly as it was' made checkable."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.output


@pytest.mark.parametrize("content, fragment", [
    (b'{"prompt": "fine"}\n{"prompt": \n', "bad.jsonl:2: malformed JSON"),
    (b'{"prompt": ""}\n', "bad.jsonl:1: field 'prompt' is empty"),
    (b'{"prompt": ["a"]}\n', "bad.jsonl:1: field 'prompt' must be a string, got list"),
    (b'{"prompt": "\xff\xfe"}\n', "bad.jsonl:1: invalid UTF-8"),
])
def test_precompute_bad_prompts_leave_existing_cache_unchanged(small_cache, tmp_path, content, fragment):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    manifest = write_manifest(tmp_path, bad, small_cache)
    before = snapshot(small_cache)
    one_line_error(invoke("precompute", manifest), fragment)
    assert snapshot(small_cache) == before


def test_precompute_missing_model_fails_before_creating_the_cache(tmp_path, prompts_file):
    manifest = write_manifest(tmp_path, prompts_file, tmp_path / "cache", teacher=tmp_path / "no-such-model")
    one_line_error(invoke("precompute", manifest), "no-such-model' does not exist")
    assert not (tmp_path / "cache").exists()


def test_precompute_refuses_a_cache_dir_that_is_not_a_cache(tmp_path, prompts_file):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    manifest = write_manifest(tmp_path, prompts_file, tmp_path / "mine")
    one_line_error(invoke("precompute", manifest), "is not a dadpo-offline cache")
    assert snapshot(tmp_path / "mine") == {"thesis.tex": hashlib.sha256(b"precious").hexdigest()}


def test_precompute_prompts_over_max_are_skipped_and_counted_or_refused(tmp_path):
    long = {"prompt": "word " * 400}
    prompts = write_jsonl(tmp_path / "p.jsonl", [long, PROMPTS[0]])
    manifest = write_manifest(tmp_path, prompts, tmp_path / "cache")
    result = invoke("precompute", manifest, "--stage", "prompts", "--set", "prompts.max_prompt_tokens=100")
    assert result.exit_code == 0, result.output
    assert "prompts: 1 kept; dropped {'too_long': 1}" in result.output
    only_long = write_jsonl(tmp_path / "long.jsonl", [long])
    manifest = write_manifest(tmp_path, only_long, tmp_path / "cache2")
    one_line_error(invoke("precompute", manifest, "--set", "prompts.max_prompt_tokens=100"),
                   "all 1 prompts are longer than prompts.max_prompt_tokens=100")
    assert not (tmp_path / "cache2").exists()


def test_precompute_truncate_mode_drops_oldest_turns(tmp_path):
    chat = {"messages": [{"role": "user", "content": "story " * 150}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": "Now summarise it."}]}
    manifest = write_manifest(tmp_path, write_jsonl(tmp_path / "p.jsonl", [chat]), tmp_path / "cache")
    result = invoke("precompute", manifest, "--stage", "prompts", "--set", "prompts.max_prompt_tokens=100",
                    "--set", "prompts.long_prompts=truncate")
    assert result.exit_code == 0, result.output
    out = invoke("sql", tmp_path / "cache", "SELECT messages FROM prompts", "-f", "json")
    assert json.loads(json.loads(out.output)[0]["messages"]) == [{"role": "user", "content": "Now summarise it."}]


def test_precompute_bad_shard_spec_and_bad_override_exit_nonzero(tiny_manifest):
    one_line_error(invoke("precompute", tiny_manifest, "--shard", "2/2"), "--shard 2/2: need 0 <= I < N")
    one_line_error(invoke("precompute", tiny_manifest, "--set", "engine.shard_size=many"),
                   "engine.shard_size: expected int")
    assert invoke("precompute", tiny_manifest, "--stage", "everything").exit_code == 2


def test_run_dry_run_prints_the_plan_without_loading_models(tiny_manifest):
    result = invoke("run", tiny_manifest, "--dry-run")
    assert result.exit_code == 0 and "generate-student" in result.output and "train-dadpo" in result.output
    assert not (tiny_manifest.parent / "cache").exists()


def test_verify_names_a_corrupted_shard_and_a_rerun_rebuilds_it(small_cache, tmp_path):
    import shutil

    cache = tmp_path / "copy"
    shutil.copytree(small_cache, cache)
    manifest = small_cache.parent / "manifest.yaml"
    shard = sorted(cache.glob("score-teacher/*/shard-00001.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-200])
    result = invoke("cache", "verify", cache)
    assert result.exit_code == 1
    assert "score-teacher shard 1" in result.output and "truncated" in result.output
    rerun = invoke("precompute", manifest, "--set", f"cache_dir={cache}")
    assert rerun.exit_code == 0, rerun.output
    assert "score-teacher     " in rerun.output and "built 1, skipped 2" in rerun.output
    assert invoke("cache", "verify", cache).output.strip() == "all shards intact"


def test_precompute_score_without_generations_fails_before_touching_the_cache(tiny_manifest, tmp_path):
    one_line_error(invoke("precompute", tiny_manifest, "--stage", "score"), "no generations to score in ")
    assert not (tmp_path / "cache").exists()
    assert invoke("precompute", tiny_manifest, "--stage", "prompts").exit_code == 0
    before = snapshot(tmp_path / "cache")
    one_line_error(invoke("precompute", tiny_manifest, "--stage", "score"),
                   "3 of the 3 generate-teacher shards to score are missing for these settings — "
                   "run: dadpo-offline precompute MANIFEST --stage generate")
    assert snapshot(tmp_path / "cache") == before


READER = """
import duckdb, sys
con = duckdb.connect(sys.argv[1], read_only=True)
count = lambda: con.execute("SELECT count(*) FROM prompts").fetchone()[0]
print(count(), flush=True)
sys.stdin.readline()
print(count(), flush=True)
"""


def test_precompute_beside_a_reader_that_keeps_the_index_open_replaces_it_under_the_reader(tiny_manifest, tmp_path):
    """A stock DuckDB client (another process) keeps index.duckdb open read-only: the writer neither
    waits nor fails; the reader keeps its whole old index, and the next one opens the new."""
    import subprocess
    import sys

    assert invoke("precompute", tiny_manifest, "--stage", "prompts").exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path / "cache" / "index.duckdb")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "6"
        result = invoke("precompute", tiny_manifest, "--stage", "prompts", "--set", "prompts.limit=2")
        assert result.exit_code == 0, result.output
        holder.stdin.write("again\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "6"
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(invoke("sql", tmp_path / "cache", "SELECT count(*) AS n FROM prompts", "-f", "json").output) == [
        {"n": 2}]


FULL_DISK = """
set -eu
mount -t tmpfs -o size=3m tmpfs "$DISK"
dadpo() {{ "$PYTHON" -m dadpo_offline "$@"; }}
snapshot() {{ (cd "$DISK/cache" && find . -type f -exec sha256sum {{}} + | sort); }}
dadpo precompute "$MANIFEST" --stage prompts --set cache_dir="$DISK/cache" >/dev/null 2>"$OUT/first.err"
snapshot >"$OUT/before"
dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null || true
set +e
dadpo precompute "$MANIFEST" --stage prompts --set cache_dir="$DISK/cache" --set prompts.limit=2 >/dev/null 2>"$OUT/changed.err"
echo $? >"$OUT/changed.rc"
dadpo precompute "$MANIFEST" --stage prompts --set cache_dir="$DISK/new" >/dev/null 2>"$OUT/new.err"
echo $? >"$OUT/new.rc"
"$PYTHON" -c "
import sys, pyarrow as pa
from pathlib import Path
from dadpo_offline.cache.shards import write_shard
from dadpo_offline.errors import DadpoError
from dadpo_offline.manifest import load_manifest, write_resolved
try:
    write_shard(pa.table({{'x': list(range(100000))}}), Path(sys.argv[1]) / 'extra.parquet', {{}})
except DadpoError as exc:
    print(exc)
try:
    write_resolved(load_manifest(sys.argv[2]), Path(sys.argv[1]) / 'manifest.yaml')
except DadpoError as exc:
    print(exc)
" "$DISK/cache/prompts" "$MANIFEST" >"$OUT/writes.err"
snapshot >"$OUT/after"
ls -A "$DISK" >"$OUT/listing"
"""


def test_precompute_on_a_full_disk_is_one_line_and_changes_nothing(tiny_manifest, tmp_path):
    """A real small file system (tmpfs of 3 MB, mounted in a private mount namespace), filled up:
    a run that must register a new stage, a run that must create a new cache, a shard write and a
    resolved-manifest write each fail with one line; the cache is byte-identical, no half-made cache
    or temp file is left."""
    import os
    import subprocess
    import sys

    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    env = {**os.environ, "DISK": str(disk), "OUT": str(out), "MANIFEST": str(tiny_manifest), "PYTHON": sys.executable}
    done = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", FULL_DISK.format()], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + (out / "first.err").read_text()
    read = lambda name: (out / name).read_text().strip()
    assert read("changed.rc") == "1" and read("new.rc") == "1"
    assert read("changed.err").startswith(f"Error: cannot write {disk}/cache/prompts/")
    assert read("changed.err").endswith("/stage.json: No space left on device")
    assert read("new.err") == f"Error: cannot write {disk}/new/dadpo-cache.json: No space left on device"
    shard, manifest = read("writes.err").splitlines()
    assert shard.startswith(f"cannot write {disk}/cache/prompts/extra.parquet: ")
    assert shard.endswith("No space left on device")
    assert manifest == f"cannot write {disk}/cache/prompts/manifest.yaml: No space left on device"
    assert read("after") == read("before") and "index.duckdb" in read("before")
    assert read("listing").split() == ["cache", "filler"]


def test_moving_a_prompt_to_heldout_changes_the_prompts_fingerprint(tmp_path, prompts_file):
    """Same conversations, one moved to the held-out split: a new prompts stage, so training
    (which reads split = 'train') no longer sees it."""
    import json

    from conftest import PROMPTS

    manifest = write_manifest(tmp_path, prompts_file, tmp_path / "cache")
    assert invoke("precompute", manifest, "--stage", "prompts").exit_code == 0
    write_jsonl(prompts_file, [dict(PROMPTS[0], split="heldout")] + PROMPTS[1:])
    assert invoke("precompute", manifest, "--stage", "prompts").exit_code == 0
    rows = json.loads(invoke("cache", "status", tmp_path / "cache", "-f", "json").output)
    assert len([r for r in rows if r["stage"] == "prompts"]) == 2
    splits = invoke("sql", tmp_path / "cache", "SELECT split, count(*) AS n FROM prompts GROUP BY ALL ORDER BY ALL",
                    "-f", "json").output
    assert json.loads(splits) == [{"split": "heldout", "n": 1}, {"split": "train", "n": 5}]


def test_precompute_a_template_that_refuses_a_conversation_is_one_line_naming_the_prompt(tmp_path, prompts_file):
    """Templates raise on layouts they do not support (e.g. no system role): one line naming the
    prompt, its source and the template's own message; no cache."""
    refusing = tmp_path / "no_system.jinja"
    refusing.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}<|im_start|>assistant\n", encoding="utf-8")
    with_system = write_jsonl(tmp_path / "system.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}])
    manifest = write_manifest(tmp_path, with_system, tmp_path / "cache")
    result = invoke("precompute", manifest, "--set", f"student.chat_template={refusing}")
    one_line_error(result, "from jsonl:system.jsonl: the chat template of embedded:smollm2-135m-instruct refuses "
                           "this conversation: System role not supported")
    assert not (tmp_path / "cache").exists()
