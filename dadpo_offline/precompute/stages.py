"""What one shard of each stage contains: prompts, generations of one role, scores of one scorer.

Pure functions of their inputs (prompt list, chat formats, an engine), so a shard rebuilt after a
crash, or by another `--shard i/N` job, holds exactly the same rows.
"""
from __future__ import annotations

import hashlib
import json

import duckdb
import pyarrow as pa

from ..cache.query import arrow_table
from ..cache.schema import GENERATIONS, PAIRS, PAIRS_JOIN_SQL, PROMPTS, SCORES
from ..manifest import SamplingConfig
from .chat import ChatFormat
from .engines import Request
from .prompts import Prompt, make_prompt


def fit_prompt(prompt: Prompt, formats: list[ChatFormat], max_tokens: int, mode: str) -> tuple[Prompt | None, list[int]]:
    """Return the prompt (or its shortened form) that fits under every model's template, or None."""
    messages = prompt.as_messages()
    while True:
        lengths = [len(f.prompt_ids(messages)) for f in formats]
        if max(lengths) <= max_tokens:
            if len(messages) == len(prompt.messages):
                return prompt, lengths
            return make_prompt(messages, prompt.source, prompt.split, prompt.category), lengths
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system):]
        if mode != "truncate" or len(rest) <= 1:
            return None, lengths
        rest = rest[1:]
        while rest and rest[0]["role"] != "user":  # a conversation restarts on a user turn
            rest = rest[1:]
        messages = system + rest


def prompts_table(prompts: list[Prompt], lengths: list[list[int]], shard_size: int) -> pa.Table:
    return pa.Table.from_pylist([{
        "prompt_id": p.prompt_id, "source": p.source, "split": p.split, "category": p.category,
        "messages": json.dumps(p.as_messages(), ensure_ascii=False), "n_turns": len(p.messages),
        "student_prompt_tokens": n[0], "teacher_prompt_tokens": n[1], "shard": i // shard_size,
    } for i, (p, n) in enumerate(zip(prompts, lengths))], schema=PROMPTS)


def request_seed(seed: int, prompt_id: str, sample: int, role: str) -> int:
    """Per-request seed: the same answer whatever batch or job the request lands in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}:{sample}:{role}".encode()).digest()[:7], "big")


def generate_shard(prompts: list[Prompt], role: str, fmt: ChatFormat, engine, sampling: SamplingConfig,
                   samples: int) -> pa.Table:
    keys, requests = [], []
    for prompt in prompts:
        ids = fmt.prompt_ids(prompt.as_messages())
        for sample in range(samples):
            seed = request_seed(sampling.seed, prompt.prompt_id, sample, role)
            keys.append((prompt.prompt_id, sample, seed))
            requests.append(Request(ids, sampling.temperature, sampling.top_p, sampling.max_tokens, seed))
    completions = engine.generate(requests)
    return pa.Table.from_pylist([{
        "prompt_id": pid, "sample": sample, "role": role, "seed": seed, "prompt_token_ids": req.prompt_ids,
        "response_token_ids": out.token_ids, "text": fmt.decode(out.token_ids),
        "finish_reason": "stop" if out.finished else "length", "truncated": not out.finished,
        "n_tokens": len(out.token_ids),
    } for (pid, sample, seed), req, out in zip(keys, requests, completions)], schema=GENERATIONS)


def score_shard(prompts: list[Prompt], generations: pa.Table, generator_formats: dict[str, ChatFormat],
                scorer: str, fmt: ChatFormat, engine) -> pa.Table:
    """Log-probs of every response under `scorer`, in the scorer's own token ids.

    Same tokenizer as the generator: reuse the sampled ids exactly. Another tokenizer: the same
    text through the scorer's tokenizer and template (sentence-level, so no shared vocabulary).
    """
    messages = {p.prompt_id: p.as_messages() for p in prompts}
    rows, sequences, prompt_lens = [], [], []
    for row in generations.to_pylist():
        prompt_ids, response_ids = fmt.sequence(row, messages[row["prompt_id"]], generator_formats[row["role"]].identity)
        rows.append(row)
        sequences.append(prompt_ids + response_ids)
        prompt_lens.append(len(prompt_ids))
    token_logprobs = engine.score(sequences, prompt_lens)
    return pa.Table.from_pylist([{
        "prompt_id": row["prompt_id"], "sample": row["sample"], "role": row["role"], "scorer": scorer,
        "input_ids": seq, "prompt_len": start, "token_logprobs": lps, "logprob": float(sum(lps)),
        "n_tokens": len(seq) - start,
    } for row, seq, start, lps in zip(rows, sequences, prompt_lens, token_logprobs)], schema=SCORES)


def pairs_shard(prompts: pa.Table, generations: pa.Table, scores: pa.Table) -> pa.Table:
    """One row per (prompt, sample) with everything training reads, joined once, here, per shard."""
    con = duckdb.connect()
    try:
        for name, table in (("prompts", prompts), ("generations", generations), ("scores", scores)):
            con.register(name, table)
        return arrow_table(con.sql(PAIRS_JOIN_SQL)).cast(PAIRS)
    finally:
        con.close()
