"""Log-probs of cached answers under one model, computed once and cached (stage `answer-scores`).

The scorer reads each answer through its own tokenizer and chat template, after the conversation it
answered, as phase one's scoring does: when it shares the answering model's tokenizer and template
(a model scoring its own answers), the sampled token ids themselves; else the answer's decoded
text, re-tokenised, closed by the scorer's end-of-turn token when the answer ended and scored as
the prefix it is when it was cut at its budget. Answers cached before token ids were kept are
re-tokenised too. The fingerprint is the scorer's identity (name, weights, chat format, engine
numerics), the answering model's chat format and a hash of the answer rows themselves: the same
answers are never scored twice by the same model, changed ones always are.
"""
from __future__ import annotations

import json

import pyarrow as pa

from ..cache.index import CacheIndex
from ..cache.schema import ANSWER_SCORES
from ..cache.shards import fingerprint
from ..core.engines import engine_identity
from ..core.roles import Engines, Role
from .store import cached_shards


def score_answers(cache: CacheIndex, scorer: Role, author: Role, answers: pa.Table, engines: Engines) -> pa.Table:
    """Rows of ANSWER_SCORES for every row of `answers` (written by `author`), read from the cache or scored now.

    The engine is asked for only when a shard is missing: a rerun loads no model.
    """
    rows = answers.to_pylist()
    settings = {"scorer": scorer.name, "reference": scorer.model.reference, "revision": scorer.model.revision,
                "chat_format": scorer.fmt.identity, "author_chat_format": author.fmt.identity,
                "engine": engine_identity(engines.backend, scorer.dtype, engines.manifest.engine),
                "answers": fingerprint({"answers": rows})}
    size = engines.manifest.engine.shard_size
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    models = ",".join(sorted({a["model"] for a in rows}))
    same_ids = author.fmt.identity == scorer.fmt.identity
    build = lambda k: score_shard(chunks[k], scorer, same_ids, engines.get(scorer))
    return cached_shards(cache, "answer-scores", fingerprint(settings), settings, len(chunks), build,
                         desc=f"scores {scorer.name} of {models}")


def score_shard(rows: list[dict], scorer: Role, same_ids: bool, engine) -> pa.Table:
    sequences, prompt_lens = [], []
    for a in rows:
        prompt = scorer.fmt.prompt_ids(json.loads(a["messages"]))
        reuse = same_ids and a.get("token_ids") is not None
        response = a["token_ids"] if reuse else scorer.fmt.response_ids(a["text"], finished=a["finish_reason"] == "stop")
        sequences.append(prompt + list(response))
        prompt_lens.append(len(prompt))
    scores = engine.score(sequences, prompt_lens) if sequences else []
    return pa.Table.from_pylist([{"suite": a["suite"], "model": a["model"], "question_id": a["question_id"],
                                  "turn": a["turn"], "scorer": scorer.name, "token_logprobs": logprobs,
                                  "logprob": float(sum(logprobs)), "n_tokens": len(logprobs)}
                                 for a, logprobs in zip(rows, scores)], schema=ANSWER_SCORES)
