"""Judge-free distillation metrics: how close each model's distribution is to the teacher's.

Three measurements on the held-out prompts (eval.winrate.prompts), each model reading text through
its own tokenizer and chat template:

- teacher log-prob of the model's greedy answers (the winrate suite's, cached once);
- reverse KL, KL(model‖teacher) = E_{y~model}[log π_model(y|x) − log π_teacher(y|x)], estimated per
  sentence on `eval.likelihood.samples` answers per prompt drawn at temperature 1.0, top_p 1.0:
  only unbiased draws of the model's own distribution make the mean an estimate of the KL (greedy
  or tempered answers would not); for the teacher it is 0 by construction;
- the model's cross-entropy on the teacher's samples, −E_{y~teacher}[log π_model(y|x)] per token:
  the forward direction, how much of the teacher's distribution the model covers.

A model scores its own samples on the exact token ids it sampled (answer_scores.py); a model with
another tokenizer or chat template reads the decoded text (special tokens dropped, whitespace
stripped), re-tokenised: the teacher's log-prob of a student's sample is that of the text as the
teacher would tokenise it, which can differ slightly from the student's tokenisation (and for a
random model's byte soup, by a lot: a split UTF-8 character decodes to U+FFFD). A sample cut at
`eval.likelihood.max_tokens` (finish_reason length) is scored as a prefix, without an end-of-turn
token, by both sides. Per token means per token of the evaluated model's own tokenisation (KL,
CE), of the teacher's for the teacher's log-prob of greedy answers; per answer, per answer.

Intervals: percentile bootstrap over prompts (all samples of a prompt move together), one fixed set
of resampled prompt indices for every model, so `<metric>_vs_student` intervals are paired.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from ..core.roles import Engines, Role
from ..manifest import LikelihoodConfig
from .answer_scores import score_answers
from .answers import Question

SUITE = "likelihood"
GREEDY = "winrate"  # the suite whose greedy answers the teacher scores
BOOTSTRAP_SAMPLES = 2000
PER_TOKEN, PER_ANSWER = "per_token", "per_answer"


def sampled_questions(questions: list[Question], config: LikelihoodConfig) -> list[Question]:
    """Each prompt asked `samples` times at temperature 1; `<id>#<k>` gives every sample its own seed."""
    return [dataclasses.replace(q, question_id=f"{q.question_id}#{k}", temperature=1.0, max_tokens=config.max_tokens)
            for q in questions for k in range(config.samples)]


def prompt_of(question_id: str) -> str:
    return question_id.rsplit("#", 1)[0]


# -- scoring, in the order that loads each model once and the teacher twice --------------------------

Answers = dict[tuple[str, str], pa.Table]  # (suite, model) -> that model's answers
Scores = dict[tuple[str, str, str], list[dict]]  # (scorer, suite, model) -> rows of ANSWER_SCORES


def score_while_loaded(cache, role: Role, teacher: Role, answers: Answers, engines: Engines) -> Scores:
    """Right after a model answered: its own samples and the teacher's samples (the teacher: its own
    samples and greedy answers). The teacher answers first, so its samples exist by then."""
    jobs = [(GREEDY, role), (SUITE, role)] if role.name == teacher.name else [(SUITE, role), (SUITE, teacher)]
    return {(role.name, suite, author.name): score_answers(cache, role, author, answers[(suite, author.name)],
                                                           engines).to_pylist() for suite, author in jobs}


def score_by_teacher(cache, teacher: Role, roles: dict[str, Role], answers: Answers, engines: Engines) -> Scores:
    """The teacher's log-probs of every other model's greedy answers and samples."""
    return {(teacher.name, suite, model): score_answers(cache, teacher, roles[model], table, engines).to_pylist()
            for (suite, model), table in answers.items() if suite in (GREEDY, SUITE) and model != teacher.name}


# -- the math: pure functions of log-probs -----------------------------------------------------------

def teacher_logp_terms(greedy: list[dict]) -> list[tuple[str, float, int]]:
    """(prompt, log π_teacher(y), teacher tokens of y) of each greedy answer y, as the teacher scored it."""
    return [(s["question_id"], s["logprob"], s["n_tokens"]) for s in greedy]


def reverse_kl_terms(own: list[dict], by_teacher: list[dict]) -> list[tuple[str, float, int]]:
    """(prompt, log π_model(y) − log π_teacher(y), model tokens of y) for each of the model's own samples y."""
    teacher_logp = {s["question_id"]: s["logprob"] for s in by_teacher}
    return [(prompt_of(s["question_id"]), s["logprob"] - teacher_logp[s["question_id"]], s["n_tokens"]) for s in own]


def cross_entropy_terms(on_teacher_samples: list[dict]) -> list[tuple[str, float, int]]:
    """(prompt, −log π_model(y), model tokens of y) for each teacher sample y."""
    return [(prompt_of(s["question_id"]), -s["logprob"], s["n_tokens"]) for s in on_teacher_samples]


def ratio_sums(prompts: list[str], terms: list[tuple[str, float, int]], per: str) -> np.ndarray:
    """(Σ value, Σ tokens or answers) per prompt, in `prompts` order: the metric is Σ col 0 / Σ col 1."""
    index = {p: i for i, p in enumerate(prompts)}
    sums = np.zeros((len(prompts), 2))
    for prompt, value, tokens in terms:
        sums[index[prompt]] += (value, tokens if per == PER_TOKEN else 1)
    return sums


def ratio(sums: np.ndarray) -> float:
    """Σ value / Σ tokens (or answers); NaN for a model whose answers hold no token (all empty)."""
    den = sums[:, 1].sum()
    return float(sums[:, 0].sum() / den) if den > 0 else float("nan")


def bootstrap_indices(n_prompts: int, resamples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """resamples × n_prompts prompt indices drawn with replacement; shared by every model (paired)."""
    return np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))


def bootstrap_ratios(sums: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The metric on each resample of prompts (NaN where a resample holds no token)."""
    num, den = sums[indices, 0].sum(axis=1), sums[indices, 1].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def interval(stats: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2
    if np.isnan(stats).all():
        return float("nan"), float("nan")
    low, high = np.nanquantile(stats, [tail, 1 - tail])
    return float(low), float(high)


# -- result rows -------------------------------------------------------------------------------------

def metric_sums(prompts: list[str], scores: Scores, model: str, teacher: str) -> dict[str, tuple[np.ndarray, int]]:
    """Every likelihood metric of one model: its per-prompt ratio sums and the number of answers averaged."""
    greedy = teacher_logp_terms(scores[(teacher, GREEDY, model)])
    kl = reverse_kl_terms(scores[(model, SUITE, model)], scores[(teacher, SUITE, model)])
    ce = cross_entropy_terms(scores[(model, SUITE, teacher)])
    return {"teacher_logp_per_token": (ratio_sums(prompts, greedy, PER_TOKEN), len(greedy)),
            "teacher_logp_per_answer": (ratio_sums(prompts, greedy, PER_ANSWER), len(greedy)),
            "reverse_kl_per_token": (ratio_sums(prompts, kl, PER_TOKEN), len(kl)),
            "reverse_kl_per_answer": (ratio_sums(prompts, kl, PER_ANSWER), len(kl)),
            "teacher_answer_ce_per_token": (ratio_sums(prompts, ce, PER_TOKEN), len(ce))}


def likelihood_rows(prompts: list[str], scores: Scores, models: list[str], teacher: str = "teacher",
                    baseline: str = "student") -> list[dict]:
    """Each metric with its 95% interval, and for every other model its paired difference from the student."""
    indices = bootstrap_indices(len(prompts))
    sums = {model: metric_sums(prompts, scores, model, teacher) for model in models}
    rows = []
    for model in models:
        for metric, (s, n) in sums[model].items():
            stats = bootstrap_ratios(s, indices)
            rows.append(row(model, metric, ratio(s), interval(stats), n))
            if baseline in sums and model != baseline:
                b = sums[baseline][metric][0]
                rows.append(row(model, f"{metric}_vs_{baseline}", ratio(s) - ratio(b),
                                interval(stats - bootstrap_ratios(b, indices)), n))
    return rows


def row(model: str, metric: str, value: float, ci: tuple[float, float], n: int) -> dict:
    """A result row; NaN (no token to divide by) is stored as null, shown as "–"."""
    known = lambda x: None if np.isnan(x) else x
    return {"model": model, "suite": SUITE, "metric": metric, "value": known(value), "ci_low": known(ci[0]),
            "ci_high": known(ci[1]), "n": n}
