"""Several samples per prompt and `pairs.policy`: index, all, best_vs_worst.

The real cache here: 3 prompts, 2 teacher × 2 student samples each, SmolLM2 as the teacher and a
tiny random student (SmolLM2's tokenizer), both through vLLM on the CPU. Each policy's pairs are
compared with the pairs worked out by hand, in Python, from the cache's own `scores` and
`generations` rows.
"""
import pyarrow as pa
import pytest

from conftest import PROMPTS, SMOLLM2, write_jsonl, write_manifest
from dadpo_offline.cache import open_cache
from dadpo_offline.cache.schema import GENERATIONS, PAIRS, PROMPTS as PROMPTS_SCHEMA, SCORES
from dadpo_offline.errors import ManifestError
from dadpo_offline.manifest import PairsConfig, load_manifest
from dadpo_offline.precompute.run import precompute
from dadpo_offline.precompute.stages import pairs_shard

COLUMNS = ("prompt_id, chosen_sample, rejected_sample, ref_chosen_logp, ref_rejected_logp, teacher_chosen_logp, "
           "teacher_rejected_logp, dropped")


def write(tmp_path, text):
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_samples_per_prompt_means_both_roles_unless_a_role_says_otherwise(tmp_path):
    both = load_manifest(write(tmp_path, "generate: {samples_per_prompt: 3}\n"))
    assert (both.generate.samples("teacher"), both.generate.samples("student")) == (3, 3)
    assert both.pairs.policy == "index" and both.pairs.per_prompt(3, 3) == 3
    own = load_manifest(write(tmp_path, "generate: {samples_per_prompt: 3, teacher: {samples: 2}}\n"
                                        "pairs: {policy: all}\n"))
    assert (own.generate.samples("teacher"), own.generate.samples("student")) == (2, 3)
    assert own.pairs.per_prompt(2, 3) == 6 and PairsConfig(policy="best_vs_worst").per_prompt(2, 3) == 1


def test_manifest_refuses_bad_pairing_settings_all_at_once(tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, "generate: {student: {samples: 0}}\npairs: {policy: best}\n"))
    assert "pairs.policy: 'best' is not one of 'index', 'all', 'best_vs_worst'" in str(err.value)
    with pytest.raises(ManifestError, match=r"generate.student.samples: must be >= 1, got 0"):
        load_manifest(write(tmp_path, "generate: {student: {samples: 0}}\npairs: {policy: all}\n"))
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, "generate: {samples_per_prompt: 2, teacher: {samples: 4}}\n"))
    message = str(err.value)
    assert message.startswith(str(tmp_path / "m.yaml")) and "pairs.policy: index pairs teacher sample k" in message
    assert "the teacher gives 4 samples per prompt and the student 2" in message


def synthetic(answers):
    """Tables as the stages write them from {(prompt, role, sample): (teacher log-prob, teacher tokens, truncated)}."""
    prompts = pa.Table.from_pylist([{"prompt_id": p, "split": "train", "category": "x"}
                                    for p in dict.fromkeys(k[0] for k in answers)], schema=PROMPTS_SCHEMA)
    generations = pa.Table.from_pylist([{"prompt_id": p, "role": role, "sample": k, "truncated": cut}
                                        for (p, role, k), (_, _, cut) in answers.items()], schema=GENERATIONS)
    scores = pa.Table.from_pylist(
        [{"prompt_id": p, "role": role, "sample": k, "scorer": "teacher", "logprob": lp, "n_tokens": n,
          "input_ids": [1, 2], "prompt_len": 1} for (p, role, k), (lp, n, _) in answers.items()]
        + [{"prompt_id": p, "role": role, "sample": k, "scorer": "reference", "logprob": -1.0, "n_tokens": 1,
            "input_ids": [1, 2], "prompt_len": 1} for (p, role, k) in answers], schema=SCORES)
    return prompts, generations, scores


# Per token (teacher's view): p: teacher 0 → −2 (cut), 1 → −2.5; student 0 → −3, 1 → −4 (cut), 2 → −3.5.
# q: every teacher answer cut (−2, −3); student 0 → −2, 1 → −3.
ANSWERS = {("p", "teacher", 0): (-6.0, 3, True), ("p", "teacher", 1): (-10.0, 4, False),
           ("p", "student", 0): (-9.0, 3, False), ("p", "student", 1): (-8.0, 2, True),
           ("p", "student", 2): (-7.0, 2, False),
           ("q", "teacher", 0): (-4.0, 2, True), ("q", "teacher", 1): (-3.0, 1, True),
           ("q", "student", 0): (-2.0, 1, False), ("q", "student", 1): (-6.0, 2, False)}


@pytest.mark.parametrize("require_finished, expected", [
    # best teacher answer overall vs the student's worst: p 0 vs 1, q 0 vs 1
    ("none", [("p", 0, 1, None), ("q", 0, 1, None)]),
    # p: the finished teacher answer 1 beats the cut, likelier 0; the student's worst finished one is 2.
    # q: no finished teacher answer, so its best cut one is paired and the pair dropped, saying why
    ("both", [("p", 1, 2, None), ("q", 0, 1, "chosen truncated")]),
    ("chosen", [("p", 1, 1, None), ("q", 0, 1, "chosen truncated")]),  # any student answer may be rejected
])
def test_best_vs_worst_ranks_the_answers_that_may_be_trained_on_first(require_finished, expected):
    pairs = pairs_shard(*synthetic(ANSWERS), PairsConfig(require_finished=require_finished, policy="best_vs_worst"))
    assert pairs.schema == PAIRS
    assert [(r["prompt_id"], r["chosen_sample"], r["rejected_sample"], r["dropped"]) for r in pairs.to_pylist()] \
        == expected
    assert set(pairs.column("policy").to_pylist()) == {"best_vs_worst"}


def test_all_pairs_every_teacher_sample_with_every_student_sample():
    pairs = pairs_shard(*synthetic(ANSWERS), PairsConfig(require_finished="both", policy="all"))
    got = [(r["prompt_id"], r["chosen_sample"], r["rejected_sample"], r["dropped"]) for r in pairs.to_pylist()]
    assert got == [("p", 0, 0, "chosen truncated"), ("p", 0, 1, "both truncated"), ("p", 0, 2, "chosen truncated"),
                   ("p", 1, 0, None), ("p", 1, 1, "rejected truncated"), ("p", 1, 2, None),
                   ("q", 0, 0, "chosen truncated"), ("q", 0, 1, "chosen truncated"),
                   ("q", 1, 0, "chosen truncated"), ("q", 1, 1, "chosen truncated")]


# -- a real cache ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy_cache(tmp_path_factory, tiny_student):
    """Built once under pairs.policy=index; each test switches the policy (only pairs rebuild)."""
    base = tmp_path_factory.mktemp("policy_cache")
    path = write_manifest(base, write_jsonl(base / "prompts.jsonl", PROMPTS[:3]), base / "cache", teacher=SMOLLM2,
                          student=tiny_student, samples=2, max_tokens=16, temperature=1.0)
    first = precompute(load_manifest(path))
    assert [(r.stage, r.built) for r in first.stages] == [("prompts", 1), ("generate-student", 2),
                                                          ("generate-teacher", 2), ("score-teacher", 2),
                                                          ("score-reference", 2), ("pairs", 2)]
    return path


def query(cache_dir, sql, params=()):
    with open_cache(cache_dir).connect() as con:
        return con.execute(sql, list(params)).fetchall()


def by_hand(cache_dir, policy, require_finished):
    """The pairs `policy` should make, from the cached scores and generations, in plain Python."""
    scores = {(p, role, k, scorer): (lp, n) for p, role, k, scorer, lp, n in query(
        cache_dir, "SELECT prompt_id, role, sample, scorer, logprob, n_tokens FROM scores")}
    cut = {(p, role, k): t for p, role, k, t in query(cache_dir, "SELECT prompt_id, role, sample, truncated FROM generations")}
    must_end = {"teacher": require_finished in ("both", "chosen"), "student": require_finished == "both"}

    def eligible(p, role, k):
        return min(scores[p, role, k, s][1] for s in ("teacher", "reference")) >= 1 and not (cut[p, role, k] and must_end[role])

    def per_token(p, role, k):
        lp, n = scores[p, role, k, "teacher"]
        return lp / n if n else None

    def dropped(p, c, r):
        if min(scores[p, role, k, s][1] for role, k in (("teacher", c), ("student", r)) for s in ("teacher", "reference")) < 1:
            return "no scored tokens"
        why = {(True, True): "both truncated", (True, False): "chosen truncated", (False, True): "rejected truncated"}
        flags = (cut[p, "teacher", c] and must_end["teacher"], cut[p, "student", r] and must_end["student"])
        if require_finished == "chosen" and flags[0]:
            return "chosen truncated"
        return why.get(flags)

    def best(p, role, sign):  # eligible first, then by per-token log-prob (sign −1: highest first), then sample
        samples = sorted(k for (q, ro, k, s) in scores if q == p and ro == role and s == "teacher")
        return min(samples, key=lambda k: (not eligible(p, role, k), per_token(p, role, k) is None,
                                           sign * (per_token(p, role, k) or 0), k))

    pairs = []
    for p in sorted({key[0] for key in scores}):
        if policy == "index":
            chosen = [(k, k) for k in range(2)]
        elif policy == "all":
            chosen = [(c, r) for c in range(2) for r in range(2)]
        else:
            chosen = [(best(p, "teacher", -1), best(p, "student", 1))]
        pairs += [(p, c, r, scores[p, "teacher", c, "reference"][0], scores[p, "student", r, "reference"][0],
                   scores[p, "teacher", c, "teacher"][0], scores[p, "student", r, "teacher"][0], dropped(p, c, r))
                  for c, r in chosen]
    return pairs


@pytest.mark.parametrize("policy, require_finished, per_prompt", [
    ("index", "none", 2), ("all", "none", 4), ("best_vs_worst", "none", 1), ("best_vs_worst", "both", 1),
])
def test_each_policy_gives_the_pairs_computed_by_hand(policy_cache, policy, require_finished, per_prompt):
    m = load_manifest(policy_cache, [f"pairs.policy={policy}", f"pairs.require_finished={require_finished}"])
    summary = precompute(m)
    assert [r.built for r in summary.stages if r.stage != "pairs"] == [0, 0, 0, 0, 0]  # nothing regenerated or rescored
    got = query(m.cache_dir, f"SELECT {COLUMNS} FROM pairs UNION ALL SELECT {COLUMNS} FROM dropped_pairs ORDER BY ALL")
    expected = by_hand(m.cache_dir, policy, require_finished)
    assert len(got) == 3 * per_prompt
    assert got == sorted(expected, key=lambda row: tuple((v is None, v) for v in row))
    assert query(m.cache_dir, "SELECT DISTINCT policy FROM pairs UNION SELECT DISTINCT policy FROM dropped_pairs") \
        == [(policy,)]
    assert query(m.cache_dir, "SELECT settings->>'policy' FROM stages WHERE stage = 'pairs' AND active") == [(policy,)]
    if policy == "best_vs_worst" and require_finished == "none":  # the ranking itself, spelled out once more
        for p, c, r in query(m.cache_dir, "SELECT prompt_id, chosen_sample, rejected_sample FROM pairs"):
            per_token = dict(((role, k), lp / n) for role, k, lp, n in query(
                m.cache_dir, "SELECT role, sample, logprob, n_tokens FROM scores WHERE scorer = 'teacher' "
                             "AND prompt_id = ?", [p]))
            assert per_token["teacher", c] >= per_token["teacher", 1 - c]
            assert per_token["student", r] <= per_token["student", 1 - r]


def test_changing_the_policy_rebuilds_only_the_pairs_and_status_shows_them(policy_cache):
    index = precompute(load_manifest(policy_cache))
    fps = {r.stage: r.fingerprint for r in index.stages}
    # per-role counts equal to the old key's: the same generations, not new ones
    same = precompute(load_manifest(policy_cache, ["generate.samples_per_prompt=1", "generate.teacher.samples=2",
                                                   "generate.student.samples=2"]))
    assert {r.stage: r.fingerprint for r in same.stages} == fps and {r.built for r in same.stages} == {0}
    other = precompute(load_manifest(policy_cache, ["pairs.policy=all", "pairs.require_finished=chosen"]))
    assert [(r.stage, r.built) for r in other.stages] == [
        ("prompts", 0), ("generate-student", 0), ("generate-teacher", 0), ("score-teacher", 0), ("score-reference", 0),
        ("pairs", 2)]
    new = {r.stage: r.fingerprint for r in other.stages}
    assert new["pairs"] != fps["pairs"] and {k: v for k, v in new.items() if k != "pairs"} == \
        {k: v for k, v in fps.items() if k != "pairs"}
    everything = load_manifest(policy_cache, ["pairs.policy=all"])
    precompute(everything)
    note = next(r["note"] for r in open_cache(everything.cache_dir).status() if r["stage"] == "pairs" and r["active"])
    assert note == "12 trained on (per prompt: mean 4, min 4, max 4; policy all)"
    back = precompute(load_manifest(policy_cache))  # index's pairs are still there: resumed, not rebuilt
    assert back.stages[-1].fingerprint == fps["pairs"] and back.stages[-1].built == 0


@pytest.mark.parametrize("policy", ["all", "best_vs_worst"])
def test_training_reads_pairs_of_other_samples_and_step0_checks_each_side(policy_cache, policy, tmp_path):
    """One daDPO step on pairs whose chosen and rejected samples differ: the step-0 check looks up each
    side's cached scores by its own sample, so the anchors the loss receives equal the cache exactly."""
    from dadpo_offline.train.data import load_pairs
    from dadpo_offline.train.dpo import train_dadpo

    m = load_manifest(policy_cache, [f"pairs.policy={policy}", "train.report_to=[]", f"train.output_dir={tmp_path}",
                                     "train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=1",
                                     "train.step0_pairs=4"])
    precompute(m, stage="score")
    pairs = load_pairs(m.cache_dir)
    assert len(pairs) == 3 * m.pairs.per_prompt(2, 2)
    assert any(p["chosen_sample"] != p["rejected_sample"] for p in pairs)
    result = train_dadpo(m, quiet=True)
    assert result["step0"]["anchor_max"] == 0.0 and result["step0"]["sequences"] == 2 * min(4, len(pairs))
    assert len(result["history"]) == 1
