"""The likelihood suite's math on known log-probs (worked by hand), and the suite end to end on real models."""
import numpy as np
import pytest

from dadpo_offline.eval import likelihood
from dadpo_offline.eval.results import markdown_report
from dadpo_offline.manifest import LikelihoodConfig


def scored(model, scorer, suite, logprobs):
    """ANSWER_SCORES-like rows: {question_id: (logprob, n_tokens)}."""
    return [{"model": model, "scorer": scorer, "suite": suite, "question_id": q, "logprob": lp, "n_tokens": n}
            for q, (lp, n) in logprobs.items()]


# Two prompts p, q; two samples each. The student's own samples, scored by the student and the teacher:
#   sample   log π_s (tokens)   log π_t    log π_s − log π_t
#   p#0      -3 (3)             -4          1
#   p#1      -5 (2)             -5          0
#   q#0      -2 (1)             -6          4
#   q#1      -4 (4)             -3         -1
# reverse KL per answer = (1 + 0 + 4 − 1) / 4 = 1.0; per token = 4 / (3 + 2 + 1 + 4) = 0.4.
OWN = {"p#0": (-3.0, 3), "p#1": (-5.0, 2), "q#0": (-2.0, 1), "q#1": (-4.0, 4)}
BY_TEACHER = {"p#0": (-4.0, 5), "p#1": (-5.0, 1), "q#0": (-6.0, 2), "q#1": (-3.0, 3)}
# The student on the teacher's samples: CE per token = (2 + 4 + 6 + 8) / (2 + 2 + 3 + 3) = 2.0.
ON_TEACHER = {"p#0": (-2.0, 2), "p#1": (-4.0, 2), "q#0": (-6.0, 3), "q#1": (-8.0, 3)}


def test_reverse_kl_equals_a_hand_computation_on_known_logprobs():
    terms = likelihood.reverse_kl_terms(scored("student", "student", "likelihood", OWN),
                                        scored("student", "teacher", "likelihood", BY_TEACHER))
    assert sorted(terms) == [("p", 0.0, 2), ("p", 1.0, 3), ("q", -1.0, 4), ("q", 4.0, 1)]
    per_answer = likelihood.ratio_sums(["p", "q"], terms, likelihood.PER_ANSWER)
    per_token = likelihood.ratio_sums(["p", "q"], terms, likelihood.PER_TOKEN)
    assert per_answer.tolist() == [[1.0, 2.0], [3.0, 2.0]]
    assert per_token.tolist() == [[1.0, 5.0], [3.0, 5.0]]
    assert likelihood.ratio(per_answer) == pytest.approx(1.0)
    assert likelihood.ratio(per_token) == pytest.approx(0.4)


def test_cross_entropy_on_teacher_samples_equals_a_hand_computation():
    terms = likelihood.cross_entropy_terms(scored("teacher", "student", "likelihood", ON_TEACHER))
    assert likelihood.ratio(likelihood.ratio_sums(["p", "q"], terms, likelihood.PER_TOKEN)) == pytest.approx(2.0)


def test_bootstrap_resamples_whole_prompts_with_the_same_indices_for_every_model():
    """Resample [p, p]: KL/token = 1/5 = 0.2; [q, q]: 3/5 = 0.6; [p, q]: 0.4."""
    sums = likelihood.ratio_sums(["p", "q"], likelihood.reverse_kl_terms(
        scored("s", "s", "likelihood", OWN), scored("s", "t", "likelihood", BY_TEACHER)), likelihood.PER_TOKEN)
    indices = np.array([[0, 0], [1, 1], [0, 1]])
    assert likelihood.bootstrap_ratios(sums, indices).tolist() == pytest.approx([0.2, 0.6, 0.4])
    first, again = likelihood.bootstrap_indices(7), likelihood.bootstrap_indices(7)
    assert first.shape == (likelihood.BOOTSTRAP_SAMPLES, 7) and (first == again).all()  # fixed seed
    assert set(np.unique(first)) == set(range(7))


def test_paired_delta_interval_is_tighter_than_unpaired_when_models_move_together():
    """A model = the student + 0.1 on every prompt: the paired difference is exactly 0.1 in every resample."""
    rng = np.random.default_rng(1)
    student = np.column_stack([rng.normal(-20, 5, 30), np.full(30, 10.0)])
    model = student + np.column_stack([np.full(30, 1.0), np.zeros(30)])
    indices = likelihood.bootstrap_indices(30)
    low, high = likelihood.interval(likelihood.bootstrap_ratios(model, indices)
                                    - likelihood.bootstrap_ratios(student, indices))
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    alone = likelihood.interval(likelihood.bootstrap_ratios(model, indices))
    assert alone[1] - alone[0] > 0.1


def teacher_and_student_scores(student_greedy: dict, teacher_own: dict) -> dict:
    """Every score the suite reads for a teacher and a student, the student's samples from OWN/BY_TEACHER/ON_TEACHER."""
    return {
        ("teacher", "winrate", "teacher"): scored("teacher", "teacher", "winrate", {"p": (-2.0, 4), "q": (-3.0, 2)}),
        ("teacher", "winrate", "student"): scored("student", "teacher", "winrate", student_greedy),
        ("teacher", "likelihood", "teacher"): scored("teacher", "teacher", "likelihood", teacher_own),
        ("student", "likelihood", "student"): scored("student", "student", "likelihood", OWN),
        ("teacher", "likelihood", "student"): scored("student", "teacher", "likelihood", BY_TEACHER),
        ("student", "likelihood", "teacher"): scored("teacher", "student", "likelihood", ON_TEACHER),
    }


def test_likelihood_rows_have_intervals_and_paired_deltas_vs_the_student():
    teacher_own = {"p#0": (-1.0, 2), "p#1": (-2.0, 2), "q#0": (-3.0, 3), "q#1": (-1.0, 1)}
    scores = teacher_and_student_scores({"p": (-6.0, 3), "q": (-9.0, 3)}, teacher_own)
    rows = likelihood.likelihood_rows(["p", "q"], scores, ["teacher", "student"])
    value = {(r["model"], r["metric"]): r for r in rows}
    assert value[("student", "reverse_kl_per_token")]["value"] == pytest.approx(0.4)
    assert value[("student", "reverse_kl_per_answer")]["value"] == pytest.approx(1.0)
    assert value[("student", "teacher_answer_ce_per_token")]["value"] == pytest.approx(2.0)
    assert value[("student", "teacher_logp_per_token")]["value"] == pytest.approx(-15 / 6)
    assert value[("student", "teacher_logp_per_answer")]["value"] == pytest.approx(-7.5)
    assert value[("teacher", "reverse_kl_per_token")]["value"] == 0.0  # its samples, scored once, by itself
    # teacher CE on its own samples: (1 + 2 + 3 + 1) / 8 tokens
    assert value[("teacher", "teacher_answer_ce_per_token")]["value"] == pytest.approx(7 / 8)
    delta = value[("teacher", "reverse_kl_per_token_vs_student")]
    assert delta["value"] == pytest.approx(-0.4) and delta["ci_low"] <= -0.2 and delta["ci_high"] >= -0.6
    assert not any(m.endswith("_vs_student") for (model, m) in value if model == "student")
    for r in rows:
        assert r["ci_low"] <= r["value"] + 1e-12 or r["metric"].endswith("_vs_student"), r
        assert r["n"] in (2, 4)
    report = markdown_report("r", {"teacher": "t", "student": "s"}, None, rows)
    assert "KL(model‖teacher)/token [95% CI]" in report and "0.400 [0.20, 0.60]" in report
    assert "## Likelihood minus the student's" in report and "-0.400 [-0.60, -0.20]" in report


def test_a_model_whose_greedy_answers_are_all_empty_gets_null_per_token_figures_not_nan(recwarn):
    """A weak sweep point may answer every prompt with nothing: 0 tokens, so no per-token figure (null,
    shown as "–"), while its per-answer figure and the other metrics stay; no numpy warning either."""
    scores = teacher_and_student_scores({"p": (-1.0, 0), "q": (-1.5, 0)}, ON_TEACHER)
    value = {(r["model"], r["metric"]): r for r in likelihood.likelihood_rows(["p", "q"], scores, ["teacher", "student"])}
    empty = value[("student", "teacher_logp_per_token")]
    assert (empty["value"], empty["ci_low"], empty["ci_high"]) == (None, None, None)
    assert value[("teacher", "teacher_logp_per_token_vs_student")]["value"] is None
    assert value[("student", "teacher_logp_per_answer")]["value"] == pytest.approx(-1.25)
    assert value[("student", "reverse_kl_per_token")]["value"] == pytest.approx(0.4)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert "| student | – |" in markdown_report("r", {"teacher": "t", "student": "s"}, None, list(value.values()))


def test_sampled_questions_have_one_id_and_seed_per_sample_at_temperature_one():
    from dadpo_offline.eval.answers import Question

    asked = likelihood.sampled_questions([Question("abc", "x", ({"role": "user", "content": "hi"},))],
                                         LikelihoodConfig(samples=3, max_tokens=7))
    assert [q.question_id for q in asked] == ["abc#0", "abc#1", "abc#2"]
    assert {(q.temperature, q.max_tokens) for q in asked} == {(1.0, 7)}
    assert likelihood.prompt_of("abc#2") == "abc"


def test_answers_cached_before_token_ids_were_kept_read_back_with_null_ids(tmp_path):
    """An answers shard of an older version (no token_ids column) beside a new one: read back and in the view."""
    import pyarrow as pa

    from dadpo_offline.cache.index import open_cache
    from dadpo_offline.cache.publish import build_index
    from dadpo_offline.cache.schema import ANSWERS
    from dadpo_offline.cache.shards import shard_path, write_shard
    from dadpo_offline.eval.store import cached_shards

    cache = open_cache(tmp_path / "cache", create=True)
    answer = {"suite": "winrate", "model": "m", "question_id": "q", "turn": 1, "text": "hi", "n_tokens": 2,
              "finish_reason": "stop"}
    old = pa.Table.from_pylist([answer], schema=pa.schema([f for f in ANSWERS if f.name != "token_ids"]))
    cache.begin_stage("answers", "fp", {}, 2)
    cache.register("answers", "fp", 0, write_shard(old, shard_path(cache.stage_dir("answers", "fp"), 0),
                                                   {"stage": "answers", "fingerprint": "fp", "shard": 0}))
    new = pa.Table.from_pylist([answer | {"question_id": "r", "token_ids": [5, 6]}], schema=ANSWERS)
    table = cached_shards(cache, "answers", "fp", {}, 2, lambda k: new, desc=None)
    assert table.column("token_ids").to_pylist() == [None, [5, 6]]
    build_index(cache)
    with cache.connect() as con:
        assert con.execute("SELECT question_id, token_ids FROM answers ORDER BY 1").fetchall() == [("q", None),
                                                                                                  ("r", [5, 6])]


def test_likelihood_suite_on_real_models_twice_and_the_rerun_scores_nothing(tmp_path, prompts_file, tiny_other_model):
    """SmolLM2 teacher, the tiny Llama with its own tokenizer as the student (vLLM, CPU): 3 prompts,
    2 samples of at most 16 tokens each. The second run reads every score from the cache, loading no model."""
    import duckdb

    from conftest import write_manifest
    from test_cli_precompute import invoke, snapshot

    manifest = write_manifest(tmp_path, prompts_file, tmp_path / "cache", student=tiny_other_model)
    manifest.write_text(manifest.read_text() + f"""\
eval:
  suites: [likelihood]
  winrate: {{prompts: [{{jsonl: {prompts_file}}}], limit: 3, max_tokens: 16}}
  likelihood: {{samples: 2, max_tokens: 16}}
""", encoding="utf-8")
    small = ("--set", "engine.gpu_memory_utilization=0.2")  # of 23 GiB: room for SmolLM2 and its KV cache, beside other tests
    first = invoke("eval", manifest, *small)
    assert first.exit_code == 0, first.output
    rows = {(r["model"], r["metric"]): r for r in pd_rows(tmp_path)}
    metrics = ["teacher_logp_per_token", "teacher_logp_per_answer", "reverse_kl_per_token", "reverse_kl_per_answer",
               "teacher_answer_ce_per_token"]
    for model in ("teacher", "student"):
        for metric in metrics:
            r = rows[(model, metric)]
            assert r["ci_low"] - 1e-9 <= r["value"] <= r["ci_high"] + 1e-9, r
    assert all((("teacher", f"{m}_vs_student") in rows) for m in metrics)
    assert abs(rows[("teacher", "reverse_kl_per_token")]["value"]) < 1e-6
    assert rows[("student", "reverse_kl_per_token")]["value"] > 0.5
    assert rows[("student", "reverse_kl_per_answer")]["n"] == 6  # 3 prompts x 2 samples
    assert rows[("student", "teacher_answer_ce_per_token")]["value"] > rows[("teacher", "teacher_answer_ce_per_token")]["value"]
    assert "KL(model‖teacher)/token [95% CI]" in first.stdout

    cache = tmp_path / "cache"
    con = duckdb.connect(str(cache / "index.duckdb"), read_only=True)
    counts = dict(con.execute("SELECT scorer || ':' || suite || ':' || model, count(*) FROM answer_scores GROUP BY ALL").fetchall())
    assert counts == {"teacher:winrate:teacher": 3, "teacher:winrate:student": 3, "teacher:likelihood:teacher": 6,
                      "teacher:likelihood:student": 6, "student:likelihood:student": 6, "student:likelihood:teacher": 6}
    own, theirs = zip(*con.execute("""
        SELECT s.n_tokens, t.n_tokens FROM answer_scores s JOIN answer_scores t USING (suite, model, question_id)
        WHERE s.suite = 'likelihood' AND s.model = 'student' AND s.scorer = 'student' AND t.scorer = 'teacher'""").fetchall())
    assert own != theirs  # each model read the same text through its own tokenizer
    con.close()

    scores_before = snapshot(cache / "answer-scores")
    again = invoke("eval", manifest, *small)
    assert again.exit_code == 0, again.output
    assert "loading" not in again.stderr  # answers and scores all from the cache
    assert snapshot(cache / "answer-scores") == scores_before
    second = {(r["model"], r["metric"]): r for r in pd_rows(tmp_path, newest=True)}
    assert second == rows


def pd_rows(tmp_path, newest=False):
    import json

    runs = sorted((tmp_path / "eval").iterdir())
    return json.loads((runs[-1 if newest else 0] / "summary.json").read_text())["results"]
