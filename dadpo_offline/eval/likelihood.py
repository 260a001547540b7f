"""Teacher likelihood of each model's answers: how much of the teacher's distribution a student keeps.

No judge needed: the teacher scores every model's answers to the held-out prompts (its own
tokenizer and chat template, as phase one scores). Reported per token, so that a model that says
less is not rewarded for it, and per answer.
"""
from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from ..core.roles import Engines, Role
from .answers import Question


def teacher_likelihood(answers: pa.Table, questions: list[Question], teacher: Role, engines: Engines) -> list[dict]:
    conversation = {q.question_id: list(q.messages) for q in questions}
    rows = [a for a in answers.to_pylist() if a["turn"] == 1]
    sequences, prompt_lens = [], []
    for a in rows:
        prompt = teacher.fmt.prompt_ids(conversation[a["question_id"]])
        sequences.append(prompt + teacher.fmt.response_ids(a["text"], finished=a["finish_reason"] == "stop"))
        prompt_lens.append(len(prompt))
    scores = engines.get(teacher).score(sequences, prompt_lens) if sequences else []
    totals = defaultdict(lambda: [0.0, 0, 0])  # model -> [sum log-prob, tokens, answers]
    for a, token_logprobs in zip(rows, scores):
        total = totals[a["model"]]
        total[0] += sum(token_logprobs)
        total[1] += len(token_logprobs)
        total[2] += 1
    return [row for model, (logp, tokens, n) in totals.items() for row in (
        {"model": model, "suite": "likelihood", "metric": "teacher_logp_per_token", "value": logp / tokens if tokens else None,
         "n": n},  # a model whose every answer is empty (a weak sweep point) has no per-token figure
        {"model": model, "suite": "likelihood", "metric": "teacher_logp_per_answer", "value": logp / n, "n": n})]
