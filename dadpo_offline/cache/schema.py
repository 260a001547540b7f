"""Column layout of every stage's shards, and the SQL views that any DuckDB client sees.

Rows are keyed by ids, never by text: prompt_id, sample, role (who wrote the response:
teacher or student) and scorer (whose log-probs: teacher or reference).
"""
from fnmatch import fnmatchcase

import pyarrow as pa

ids = pa.list_(pa.int32())

PROMPTS = pa.schema([
    ("prompt_id", pa.string()),  # sha256 of the canonical messages JSON, 16 hex digits
    ("source", pa.string()),
    ("split", pa.string()),  # train / heldout
    ("category", pa.string()),
    ("messages", pa.string()),  # JSON list of {role, content}, ending with a user turn
    ("n_turns", pa.int32()),
    ("student_prompt_tokens", pa.int32()),
    ("teacher_prompt_tokens", pa.int32()),
    ("shard", pa.int32()),  # which work shard the prompt belongs to
    ("student_prompt_ids", ids),  # rendered once, here; every later stage and dSFT read these
    ("teacher_prompt_ids", ids),
])

GENERATIONS = pa.schema([
    ("prompt_id", pa.string()),
    ("sample", pa.int32()),
    ("role", pa.string()),  # teacher | student
    ("seed", pa.int64()),
    ("prompt_token_ids", ids),  # generator's tokenizer and chat template
    ("response_token_ids", ids),  # exactly what was sampled, end-of-turn included when it stopped
    ("text", pa.string()),
    ("finish_reason", pa.string()),  # stop | length
    ("truncated", pa.bool_()),
    ("n_tokens", pa.int32()),
])

SCORES = pa.schema([
    ("prompt_id", pa.string()),
    ("sample", pa.int32()),
    ("role", pa.string()),  # whose response: teacher | student
    ("scorer", pa.string()),  # whose log-probs: teacher | reference
    ("input_ids", ids),  # scorer's token ids of prompt + response: what phase two trains on
    ("prompt_len", pa.int32()),
    ("token_logprobs", pa.list_(pa.float32())),  # one per response token
    ("logprob", pa.float64()),  # sum over response tokens, end-of-turn included
    ("n_tokens", pa.int32()),
])

# One row per pair: chosen = a teacher response, rejected = a student response, the samples of each
# that `pairs.policy` (recorded in `policy`) pairs. Token ids and reference numbers are the student's
# (reference) view; teacher numbers its own. Materialised per shard (stage `pairs`) so that reading
# pairs costs a scan, not six joins.
PAIRS = pa.schema([
    ("prompt_id", pa.string()),
    ("chosen_sample", pa.int32()),  # the teacher's sample number in `generations` and `scores`
    ("rejected_sample", pa.int32()),  # the student's
    ("split", pa.string()),
    ("category", pa.string()),
    ("chosen_input_ids", ids),  # student ids of prompt + teacher response
    ("chosen_prompt_len", pa.int32()),
    ("rejected_input_ids", ids),  # student ids of prompt + student response
    ("rejected_prompt_len", pa.int32()),
    ("ref_chosen_logp", pa.float64()),
    ("ref_rejected_logp", pa.float64()),
    ("teacher_chosen_logp", pa.float64()),  # teacher's own tokenisation of the same text
    ("teacher_rejected_logp", pa.float64()),
    ("chosen_tokens", pa.int32()),  # response tokens, end-of-turn included
    ("rejected_tokens", pa.int32()),
    ("teacher_chosen_tokens", pa.int32()),
    ("teacher_rejected_tokens", pa.int32()),
    ("chosen_truncated", pa.bool_()),
    ("rejected_truncated", pa.bool_()),
    ("policy", pa.string()),  # the pairs.policy that chose these samples: index | all | best_vs_worst
    # Every teacher's numbers, one per teacher in `teachers` order (manifest `teachers:`; with `teacher:`
    # the one scorer 'teacher'): what several-teacher training reads. Null in shards from before them.
    ("teachers", pa.list_(pa.string())),  # the teachers' scorer names
    ("teachers_chosen_logp", pa.list_(pa.float64())),
    ("teachers_rejected_logp", pa.list_(pa.float64())),
    ("dropped", pa.string()),  # why the pair is not trained on (the CASE in PAIRS_JOIN_SQL), null when it is
])

# Joins one shard's prompts, generations and scores (tables registered under these names).
# `anchors`: each sample's scores by every teacher in $teachers, as lists in that order; `t` is the
# $chosen_scorer teacher (the chosen answers' one), whose numbers fill the teacher_* columns.
# `answers`: every sample with the reference's and every teacher's score; `eligible` when it may be trained on (scored tokens, and
# ended if `pairs.require_finished` asks it to); `rank` orders a prompt's samples of one role for
# best_vs_worst: eligible ones first, then teacher samples by the teacher's log-prob per token, high
# to low, student samples low to high, ties by sample number. `dropped`: a side with no scored
# token, or an answer cut at max_tokens that `pairs.require_finished` asks to have ended.
PAIRS_JOIN_SQL = """
WITH anchors AS (
    SELECT prompt_id, sample, role, list(logprob ORDER BY list_position($teachers, scorer)) AS logps,
           min(n_tokens) AS min_tokens, count(*) AS n
    FROM scores WHERE list_contains($teachers, scorer) GROUP BY prompt_id, sample, role
), answers AS (
    SELECT g.prompt_id, g.sample, g.role, g.truncated, r.input_ids, r.prompt_len, r.logprob AS ref_logp,
           r.n_tokens AS ref_tokens, t.logprob AS teacher_logp, t.n_tokens AS teacher_tokens,
           a.logps AS teachers_logp, a.min_tokens AS teachers_min_tokens,
           least(r.n_tokens, t.n_tokens, a.min_tokens) >= 1 AND NOT (g.truncated AND (
               $require_finished = 'both' OR ($require_finished = 'chosen' AND g.role = 'teacher'))) AS eligible
    FROM generations g
    JOIN scores r ON r.prompt_id = g.prompt_id AND r.sample = g.sample AND r.role = g.role AND r.scorer = 'reference'
    JOIN scores t ON t.prompt_id = g.prompt_id AND t.sample = g.sample AND t.role = g.role AND t.scorer = $chosen_scorer
    JOIN anchors a ON a.prompt_id = g.prompt_id AND a.sample = g.sample AND a.role = g.role AND a.n = len($teachers)
), ranked AS (
    SELECT *, row_number() OVER (PARTITION BY prompt_id, role ORDER BY eligible DESC,
        CASE role WHEN 'teacher' THEN -1 ELSE 1 END * teacher_logp / nullif(teacher_tokens, 0) NULLS LAST,
        sample) AS rank
    FROM answers
)
SELECT p.prompt_id, c.sample AS chosen_sample, r.sample AS rejected_sample, p.split, p.category,
       c.input_ids AS chosen_input_ids, c.prompt_len AS chosen_prompt_len,
       r.input_ids AS rejected_input_ids, r.prompt_len AS rejected_prompt_len,
       c.ref_logp AS ref_chosen_logp, r.ref_logp AS ref_rejected_logp,
       c.teacher_logp AS teacher_chosen_logp, r.teacher_logp AS teacher_rejected_logp,
       c.ref_tokens AS chosen_tokens, r.ref_tokens AS rejected_tokens,
       c.teacher_tokens AS teacher_chosen_tokens, r.teacher_tokens AS teacher_rejected_tokens,
       c.truncated AS chosen_truncated, r.truncated AS rejected_truncated, $policy AS policy,
       $teachers AS teachers, c.teachers_logp AS teachers_chosen_logp, r.teachers_logp AS teachers_rejected_logp,
       CASE WHEN least(c.ref_tokens, r.ref_tokens, c.teachers_min_tokens, r.teachers_min_tokens) < 1
                 THEN 'no scored tokens'
            WHEN $require_finished = 'both' AND c.truncated AND r.truncated THEN 'both truncated'
            WHEN $require_finished IN ('both', 'chosen') AND c.truncated THEN 'chosen truncated'
            WHEN $require_finished = 'both' AND r.truncated THEN 'rejected truncated' END AS dropped
FROM prompts p
JOIN ranked c ON c.prompt_id = p.prompt_id AND c.role = 'teacher'
JOIN ranked r ON r.prompt_id = p.prompt_id AND r.role = 'student'
WHERE CASE $policy WHEN 'index' THEN c.sample = r.sample
                   WHEN 'all' THEN true
                   WHEN 'best_vs_worst' THEN c.rank = 1 AND r.rank = 1 END
ORDER BY p.prompt_id, c.sample, r.sample
"""

# Eval: answers of each model to each benchmark's questions, one row per (question, turn).
ANSWERS = pa.schema([
    ("suite", pa.string()),  # mtbench | alpacaeval | winrate
    ("model", pa.string()),  # the name in the eval manifest (teacher, student, sft, dadpo, ...)
    ("question_id", pa.string()),
    ("category", pa.string()),
    ("turn", pa.int32()),  # 1-based; MT-Bench turn 2 follows the model's own turn-1 answer
    ("messages", pa.string()),  # JSON conversation the model answered
    ("text", pa.string()),
    ("n_tokens", pa.int32()),
    ("finish_reason", pa.string()),  # stop | length
    ("temperature", pa.float32()),
    ("seed", pa.int64()),
    # exactly what was sampled, end-of-turn included when it stopped; null in shards written before
    # this column existed (views read answers by column name)
    ("token_ids", ids),
])

# Eval: one answer's log-probs under one model (the likelihood suite), that model's own tokenizer and
# chat template. One row per (answer, scorer); keyed by the scorer's identity and the answers' content.
ANSWER_SCORES = pa.schema([
    ("suite", pa.string()),  # the answers' suite: winrate (greedy) | likelihood (sampled)
    ("model", pa.string()),  # whose answer
    ("question_id", pa.string()),  # likelihood: `<prompt id>#<sample>`
    ("turn", pa.int32()),
    ("scorer", pa.string()),  # whose log-probs: the scoring model's eval name
    ("token_logprobs", pa.list_(pa.float32())),  # one per response token of the scorer's tokenisation
    ("logprob", pa.float64()),  # their sum; end-of-turn included when the answer ended
    ("n_tokens", pa.int32()),
])

# Every judge call, kept for audit: the exact request text and the raw reply.
JUDGMENTS = pa.schema([
    ("suite", pa.string()),
    ("judge", pa.string()),  # model@base_url: scores of different judges are not comparable
    ("template", pa.string()),  # judge prompt name, e.g. single-math-v1-multi-turn, pair-v2
    ("model", pa.string()),
    ("opponent", pa.string()),  # pairwise: the other model (null for single grading)
    ("question_id", pa.string()),
    ("category", pa.string()),
    ("turn", pa.int32()),
    ("order", pa.string()),  # pairwise: "model-first" or "opponent-first"
    ("system", pa.string()),
    ("prompt", pa.string()),
    ("reply", pa.string()),
    ("error", pa.string()),  # why the judge refused this request (HTTP 400/413/422), else null
    ("score", pa.float64()),  # single grading: the [[rating]], null when the reply has none
    ("verdict", pa.string()),  # pairwise: model | opponent | tie | null (unparseable); the likeliest one by log-probs
    # how the verdict was read: logprobs | text | followup | none. Shards written before these columns
    # existed read them as null (views read shards by column name).
    ("method", pa.string()),
    ("preference", pa.float64()),  # pairwise: P(model better) + 0.5 P(tie) in [0, 1]; text: 1 / 0.5 / 0
    ("probs", pa.string()),  # logprobs / followup: JSON of the renormalised verdict-token probabilities at the decision position
    ("followup", pa.string()),  # the judge's answer to the follow-up question (asked when the reply had no verdict)
])

# One row per (eval run, model, suite, metric): what reports and `sql` compare.
EVAL_RESULTS = pa.schema([
    ("run_id", pa.string()),
    ("model", pa.string()),
    ("suite", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("stderr", pa.float64()),
    ("ci_low", pa.float64()),
    ("ci_high", pa.float64()),
    ("n", pa.int64()),
    ("judge", pa.string()),
])

STAGES = {
    "prompts": PROMPTS,
    "generate-teacher": GENERATIONS,
    "generate-student": GENERATIONS,
    "score-teacher": SCORES,
    "score-reference": SCORES,
    "pairs": PAIRS,
    "answers": ANSWERS,
    "answer-scores": ANSWER_SCORES,
    "judgments": JUDGMENTS,
    "eval-results": EVAL_RESULTS,
}
# With `teachers:`, each teacher's scores are their own stage, score-teacher-NAME, with SCORES rows.
TEACHER_SCORES = "score-teacher-*"


def stage_schema(stage: str) -> pa.Schema | None:
    """The shard layout of a stage name, a per-teacher score stage included; None for no stage."""
    return STAGES.get(stage) or (SCORES if fnmatchcase(stage, TEACHER_SCORES) else None)


# Eval artefacts kept as the files their tools read back (not Parquet), registered with size and
# sha256 like shards so that `cache status`, `verify` and `gc` see them; where they lie in the cache.
FILE_STAGES = {
    "lmeval": "lmeval/FINGERPRINT.json",  # one lm_eval.simple_evaluate result per (model, task group)
    "alpacaeval": "alpacaeval/annotator/",  # alpaca_eval's annotator config and its judgment cache
}
# Stages whose fingerprints all stay visible (one per model and benchmark, one per eval run)
# instead of the newest replacing the rest.
ACCUMULATING = {"answers", "answer-scores", "judgments", "eval-results", *FILE_STAGES}
# view -> the stages whose active shards it reads
VIEW_STAGES = {
    "prompts": ["prompts"],
    "generations": ["generate-teacher", "generate-student"],
    "scores": ["score-teacher", "score-reference", TEACHER_SCORES],  # a pattern matches every stage it names
    "pairs": ["pairs"],
    "dropped_pairs": ["pairs"],
    "answers": ["answers"],
    "answer_scores": ["answer-scores"],
    "judgments": ["judgments"],
    "eval_results": ["eval-results"],
}
# Views that show only some rows of their shards: `pairs` is what training reads.
VIEW_FILTERS = {"pairs": "dropped IS NULL", "dropped_pairs": "dropped IS NOT NULL"}
# Views whose shards may predate a column (a filter's, judgments.method, answers.token_ids): read by
# column name, the missing column as null. Only these: reading by name opens every shard's footer when
# the view is made, so a damaged shard there fails at once instead of when (and if) a query reads it.
VIEWS_BY_NAME = {"pairs", "dropped_pairs", "answers", "judgments"}
