"""Training rows read from the cache with DuckDB, and the collators that pad them.

Phase two never re-tokenises: the token ids are the student's ids that the reference was
scored on, read from the `pairs` view, and each row's response length is asserted against the
cache's own count. Pairs stay in an Arrow table (int32 ids, 4 bytes a token) and become Python
lists one batch at a time: 100k pairs of 1k tokens hold 0.8 GB, not the ~7 GB of Python ints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..cache.index import dropped_summary, open_cache
from ..errors import CacheError
from ..core.roles import take_turns

ANCHORS = ["ref_chosen_logp", "ref_rejected_logp", "teacher_chosen_logp", "teacher_rejected_logp"]
PAIR_COLUMNS = ["prompt_id", "chosen_sample", "rejected_sample", "chosen_input_ids", "chosen_prompt_len", "rejected_input_ids",
                "rejected_prompt_len", *ANCHORS, "chosen_tokens", "rejected_tokens"]


class Rows:
    """Rows of an Arrow table as dicts, on demand: `rows[i]`, `len(rows)`, `for row in rows`."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return {name: self.table.column(name)[i].as_py() for name in self.table.column_names}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def anchors(self) -> torch.Tensor:
        """The cached log-probs, [pairs, 4] float64 in `ANCHORS` order, row i = pair i. Read with several
        teachers: [pairs, 2 + 2n], the reference's chosen and rejected, then each teacher's chosen, then
        each teacher's rejected (one teacher: the same four columns in the same order)."""
        if "teachers_chosen_logp" not in self.table.column_names:
            columns = [self.table.column(c).to_numpy() for c in ANCHORS]
        else:
            lists = [np.stack(self.table.column(c).to_pylist()) for c in ("teachers_chosen_logp", "teachers_rejected_logp")]
            columns = [self.table.column(c).to_numpy() for c in ANCHORS[:2]] + [*lists[0].T, *lists[1].T]
        return torch.from_numpy(np.column_stack(columns).astype(np.float64))

    def max_token_id(self) -> int:
        return max(pc.max(pc.list_flatten(self.table.column(c))).as_py() for c in ("chosen_input_ids", "rejected_input_ids"))


def load_pairs(cache_dir: str, split: str = "train", limit: int | None = None, teachers: list[str] | None = None) -> Rows:
    """Every trainable pair of `split`, in a fixed order (the Trainer's seeded sampler shuffles); with
    `teachers` (manifest `teachers:`), also every teacher's numbers, checked to be those teachers' in that order."""
    cache = open_cache(cache_dir)
    cache.ready_fingerprint("pairs", "score")
    cache.check_intact(["pairs"], "dadpo-offline precompute MANIFEST --stage score")
    columns = PAIR_COLUMNS + (["teachers", "teachers_chosen_logp", "teachers_rejected_logp"] if teachers else [])
    query = (f"SELECT {', '.join(columns)} FROM pairs WHERE split = ? "
             "ORDER BY prompt_id, chosen_sample, rejected_sample" + (" LIMIT ?" if limit else ""))
    with cache.connect() as con:
        try:
            table = con.sql(query, params=[split, limit] if limit else [split]).to_arrow_table()
        except duckdb.BinderException:  # pairs shards from before pairs.policy: no chosen_sample column
            raise CacheError(f"the pairs in {cache.root} were built by an older dadpo-offline — rebuild them with: "
                             "dadpo-offline precompute MANIFEST --stage score") from None
        dropped = dropped_summary(con, split)
    if table.num_rows == 0 and dropped:
        raise CacheError(f"no {split} pairs to train on in {cache.root}: all are dropped ({dropped}) — raise "
                         "generate.teacher.max_tokens and generate.student.max_tokens, or relax "
                         "pairs.require_finished, then rerun precompute")
    if table.num_rows == 0:
        raise CacheError(f"no {split} pairs in {cache.root}: the pairs view needs generations and both scores — "
                         "run: dadpo-offline precompute MANIFEST")
    if teachers:
        found = {tuple(x) if x else None for x in table.column("teachers").to_pylist()}
        if found != {tuple(teachers)}:
            raise CacheError(f"the pairs in {cache.root} hold the scores of teachers {sorted(found, key=str)}, the "
                             f"manifest lists {list(teachers)} — run: dadpo-offline precompute MANIFEST --stage score")
    for side in ("chosen", "rejected"):  # vectorised; the first bad row is re-checked for its message
        counted = pc.subtract(pc.list_value_length(table.column(f"{side}_input_ids")), table.column(f"{side}_prompt_len"))
        bad = pc.or_(pc.not_equal(counted, table.column(f"{side}_tokens")),
                     pc.or_(pc.less(table.column(f"{side}_prompt_len"), 1), pc.less(counted, 1)))
        if pc.any(bad).as_py():
            row = Rows(table)[pc.index(bad, True).as_py()]
            check_lengths(row[f"{side}_input_ids"], row[f"{side}_prompt_len"], row[f"{side}_tokens"], row["prompt_id"])
    return Rows(table)


def check_lengths(ids: list[int], prompt_len: int, n_tokens: int, prompt_id: str) -> None:
    """The response the trainer sums over must be exactly the one the cache scored."""
    if prompt_len < 1 or len(ids) - prompt_len != n_tokens or n_tokens < 1:
        raise CacheError(f"prompt {prompt_id}: cached ids hold {len(ids) - prompt_len} response tokens after "
                         f"prompt_len {prompt_len}, but the cache counted {n_tokens} — the cache is inconsistent; "
                         "rebuild it with: dadpo-offline precompute MANIFEST --stage score --force")


def load_sft_examples(cache_dir: str, student_fmt, split: str = "train") -> list[dict]:
    """Teacher responses as student token ids: (input_ids, prompt_len) per teacher generation.

    `ChatFormat.sequence` decides, as phase one's score stage does, from the prompt ids the
    prompts stage stored for the student: dSFT trains on the same ids that the reference is
    later scored on, whatever day or clock the template would render today.
    """
    cache = open_cache(cache_dir)
    cache.ready_fingerprint("generate-teacher", "generate")
    cache.check_intact(["prompts", "generations"], "dadpo-offline precompute MANIFEST --stage generate")
    with cache.connect() as con:
        teacher, prompts = (con.execute("SELECT settings FROM stages WHERE stage = ? AND active", [stage]).fetchone()
                            for stage in ("generate-teacher", "prompts"))
        try:
            rows = con.execute(
                "SELECT g.prompt_id, g.sample, g.prompt_token_ids, g.response_token_ids, g.text, g.truncated, "
                "p.student_prompt_ids FROM generations g JOIN prompts p USING (prompt_id) "
                "WHERE g.role = 'teacher' AND p.split = ? ORDER BY g.prompt_id, g.sample", [split]).fetchall()
        except duckdb.BinderException:
            raise CacheError(f"{cache.root} was built by an older dadpo-offline, which did not store rendered prompt "
                             "ids — rebuild it with: dadpo-offline precompute MANIFEST") from None
    if teacher is None or not rows:
        raise CacheError(f"no teacher generations for split {split} in {cache.root} — "
                         "run: dadpo-offline precompute MANIFEST --stage generate")
    if json.loads(prompts[0])["formats"][0] != student_fmt.identity:
        raise CacheError(f"the prompts in {cache.root} were rendered for another student tokenizer or chat template "
                         "than this manifest's — run: dadpo-offline precompute MANIFEST --stage generate")
    made = json.loads(teacher[0])
    formats = {}  # pairs.chosen_from each: the teachers wrote in turn, each in its own format
    if made.get("chosen_from") == "each":
        formats = take_turns([p[0] for p in json.loads(prompts[0])["prompts"]], made["chat_formats"])
    examples = []
    for prompt_id, sample, prompt_token_ids, response_token_ids, text, truncated, student_prompt_ids in rows:
        generation = {"prompt_token_ids": prompt_token_ids, "response_token_ids": response_token_ids, "text": text,
                      "truncated": truncated}
        prompt_ids, response_ids = student_fmt.sequence(generation, student_prompt_ids,
                                                      formats.get(prompt_id, made.get("chat_format")))
        if not response_ids:
            continue
        examples.append({"prompt_id": prompt_id, "sample": sample, "input_ids": list(prompt_ids) + list(response_ids),
                         "prompt_len": len(prompt_ids)})
    return examples


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass
class PairCollator:
    """Chosen rows first, then rejected rows, right-padded: one forward scores both sides.

    A batch holds integers only. The cached log-probs stay out of it, because the Trainer casts
    every floating input to DeepSpeed's dtype (bf16 turns −152.68 into −153.0); the loss looks
    them up in float64 by `pair_index` instead (`DadpoTrainer.anchors_for`).
    """

    pad_id: int

    def __call__(self, features: list[dict]) -> dict:
        seqs = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        ids, mask = _pad(seqs, self.pad_id)
        return {
            "input_ids": ids, "attention_mask": mask,
            "prompt_lens": torch.tensor([f["chosen_prompt_len"] for f in features]
                                        + [f["rejected_prompt_len"] for f in features], dtype=torch.long),
            "seq_lens": torch.tensor([len(s) for s in seqs], dtype=torch.long),
            "pair_index": torch.tensor([f["index"] for f in features], dtype=torch.long),
        }


@dataclass
class SftCollator:
    """Labels are the input ids on response tokens and −100 on prompt and padding."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict:
        ids, mask = _pad([f["input_ids"] for f in features], self.pad_id)
        labels = ids.clone()
        for i, f in enumerate(features):
            labels[i, : f["prompt_len"]] = -100
            labels[i, len(f["input_ids"]):] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class RowDataset(torch.utils.data.Dataset):
    """Dict rows (a list or `Rows`); each row also carries its index so errors can name the pair."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self.rows[i], "index": i}
