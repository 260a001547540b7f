"""Answers of one model to one benchmark's questions, generated once and cached (stage `answers`).

A question may have follow-up turns (MT-Bench): turn t+1 is asked in the same conversation, after
the model's own turn-t answer, so all turn-t answers of a shard are generated before turn t+1.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pyarrow as pa

from ..cache.index import CacheIndex
from ..cache.schema import ANSWERS
from ..cache.shards import fingerprint
from ..core.engines import Request, engine_identity, request_seed
from ..core.roles import Engines, Role
from .store import cached_shards


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    messages: tuple  # conversation up to the first user turn to answer: ({"role", "content"}, ...)
    followups: tuple = ()  # later user turns, each asked after the model's own previous answer
    temperature: float = 0.0
    max_tokens: int = 512


def generate_answers(cache: CacheIndex, suite: str, role: Role, questions: list[Question], engines: Engines) -> pa.Table:
    """Rows of ANSWERS for every (question, turn), read from the cache or generated and cached now.

    `engines` keeps the model loaded across suites, so each model is loaded once per eval run.
    """
    engine_config = engines.manifest.engine
    settings = {"suite": suite, "model": role.name, "reference": role.model.reference, "revision": role.model.revision,
                "chat_format": role.fmt.identity, "engine": engine_identity(engines.backend, role.dtype, engine_config),
                "questions": fingerprint({"questions": [dataclasses.asdict(q) for q in questions]})}
    size = engine_config.shard_size
    chunks = [questions[i:i + size] for i in range(0, len(questions), size)]
    build = lambda k: answer_shard(chunks[k], suite, role.name, role.fmt, engines.get(role))
    return cached_shards(cache, "answers", fingerprint(settings), settings, len(chunks), build,
                         desc=f"answers {suite}/{role.name}")


def answer_shard(questions: list[Question], suite: str, name: str, fmt, engine) -> pa.Table:
    conversations = {q.question_id: [dict(m) for m in q.messages] for q in questions}
    rows = []
    for turn in range(1, 1 + max(1 + len(q.followups) for q in questions)):
        asked = [q for q in questions if turn <= 1 + len(q.followups)]
        for q in asked:
            if turn > 1:
                conversations[q.question_id].append({"role": "user", "content": q.followups[turn - 2]})
        seeds = [request_seed(0, f"{suite}:{q.question_id}", turn, "answer") for q in asked]
        requests = [Request(fmt.prompt_ids(conversations[q.question_id]), q.temperature, 1.0, q.max_tokens, seed)
                    for q, seed in zip(asked, seeds)]
        for q, seed, out in zip(asked, seeds, engine.generate(requests)):
            text = fmt.decode(out.token_ids).strip()
            rows.append({"suite": suite, "model": name, "question_id": q.question_id, "category": q.category,
                         "turn": turn, "messages": json.dumps(conversations[q.question_id], ensure_ascii=False),
                         "text": text, "n_tokens": len(out.token_ids),
                         "finish_reason": "stop" if out.finished else "length", "temperature": q.temperature,
                         "seed": seed, "token_ids": out.token_ids})
            conversations[q.question_id].append({"role": "assistant", "content": text})
    return pa.Table.from_pylist(rows, schema=ANSWERS)
