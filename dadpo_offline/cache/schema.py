"""Column layout of every stage's shards, and the SQL views that any DuckDB client sees.

Rows are keyed by ids, never by text: prompt_id, sample, role (who wrote the response:
teacher or student) and scorer (whose log-probs: teacher or reference).
"""
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

# One row per trainable pair: chosen = teacher response, rejected = student response, same sample.
# Token ids and reference numbers are the student's (reference) view; teacher numbers its own.
# Materialised per shard (stage `pairs`) so that reading pairs costs a scan, not six joins.
PAIRS = pa.schema([
    ("prompt_id", pa.string()),
    ("sample", pa.int32()),
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
    ("dropped", pa.string()),  # why the pair is not trained on (the CASE in PAIRS_JOIN_SQL), null when it is
])

# Joins one shard's prompts, generations and scores (tables registered under these names). `dropped`:
# a side with no scored token, or an answer cut at max_tokens that `pairs.require_finished` asks to have ended.
PAIRS_JOIN_SQL = """
SELECT p.prompt_id, rc.sample, p.split, p.category,
       rc.input_ids AS chosen_input_ids, rc.prompt_len AS chosen_prompt_len,
       rr.input_ids AS rejected_input_ids, rr.prompt_len AS rejected_prompt_len,
       rc.logprob AS ref_chosen_logp, rr.logprob AS ref_rejected_logp,
       tc.logprob AS teacher_chosen_logp, tr.logprob AS teacher_rejected_logp,
       rc.n_tokens AS chosen_tokens, rr.n_tokens AS rejected_tokens,
       tc.n_tokens AS teacher_chosen_tokens, tr.n_tokens AS teacher_rejected_tokens,
       gt.truncated AS chosen_truncated, gs.truncated AS rejected_truncated,
       CASE WHEN least(rc.n_tokens, rr.n_tokens, tc.n_tokens, tr.n_tokens) < 1 THEN 'no scored tokens'
            WHEN $require_finished = 'both' AND gt.truncated AND gs.truncated THEN 'both truncated'
            WHEN $require_finished IN ('both', 'chosen') AND gt.truncated THEN 'chosen truncated'
            WHEN $require_finished = 'both' AND gs.truncated THEN 'rejected truncated' END AS dropped
FROM prompts p
JOIN scores rc ON rc.prompt_id = p.prompt_id AND rc.role = 'teacher' AND rc.scorer = 'reference'
JOIN scores rr ON rr.prompt_id = p.prompt_id AND rr.sample = rc.sample AND rr.role = 'student' AND rr.scorer = 'reference'
JOIN scores tc ON tc.prompt_id = p.prompt_id AND tc.sample = rc.sample AND tc.role = 'teacher' AND tc.scorer = 'teacher'
JOIN scores tr ON tr.prompt_id = p.prompt_id AND tr.sample = rc.sample AND tr.role = 'student' AND tr.scorer = 'teacher'
JOIN generations gt ON gt.prompt_id = p.prompt_id AND gt.sample = rc.sample AND gt.role = 'teacher'
JOIN generations gs ON gs.prompt_id = p.prompt_id AND gs.sample = rc.sample AND gs.role = 'student'
ORDER BY p.prompt_id, rc.sample
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
    # how the verdict was read: logprobs | text | none. Shards written before these three columns
    # existed read them as null (views read shards by column name).
    ("method", pa.string()),
    ("preference", pa.float64()),  # pairwise: P(model better) + 0.5 P(tie) in [0, 1]; text: 1 / 0.5 / 0
    ("probs", pa.string()),  # logprobs: JSON of the renormalised verdict-token probabilities at the decision position
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
    "scores": ["score-teacher", "score-reference"],
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
