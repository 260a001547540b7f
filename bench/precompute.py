"""Benchmark of phase one ("precompute"): engines and the DuckDB cache, measured side by side.

    python bench/precompute.py [--prompts 24] [--max-tokens 64] [--pairs 1000000]

1. Generation tokens/s, our VllmEngine vs our TransformersEngine, same model (embedded
   SmolLM2-135M-Instruct), same prompts, same max_tokens, same dtype (float32 on CPU).
2. Scoring tokens/s (`score`) of both engines on the same sequences (prompt + generated
   response ids), plus the largest |delta sequence log-prob| between them.
3. DuckDB over a synthetic cache of --pairs pairs written through the real code path
   (write_shard, open_cache, begin_stage, register, build_index), queried through the real `pairs` view.
4. A table of targets with PASS/FAIL.

Timings on a shared machine are noisy, hence ratios of measurements taken in the same run.
Results go to stdout; progress and library chatter (vLLM logs included) go to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import shutil
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

MODEL = "embedded:smollm2-135m-instruct"
TARGET_GENERATE = 1.5  # vLLM / transformers, generation tokens/s
TARGET_SCORE = 1.0  # vLLM / transformers, scoring tokens/s
TARGET_PAIRS_S = 1.0  # aggregate over the pairs view, seconds

VOCAB = 49152  # SmolLM2's vocabulary size: synthetic token ids are drawn from it
PROMPT_TOKENS = (16, 40)  # synthetic prompt lengths (inclusive), tokens
RESPONSE_TOKENS = (16, 56)  # synthetic response lengths (inclusive): input_ids are 32-96 tokens
CHARS_PER_TOKEN = 4


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# ---------------------------------------------------------------------------------------------
# 1 + 2: engines
# ---------------------------------------------------------------------------------------------

def bench_engines(args, emit) -> dict:
    import torch

    from dadpo_offline.manifest import EngineConfig
    from dadpo_offline.core.models import resolve_model
    from dadpo_offline.core.chat import load_chat_format
    from dadpo_offline.core.engines import Request, TransformersEngine, VllmEngine
    from dadpo_offline.core.prompts import builtin_prompts

    model = resolve_model(MODEL)
    fmt = load_chat_format(model)
    pool = builtin_prompts("train")
    prompts = [pool[i % len(pool)] for i in range(args.prompts)]
    prompt_ids = [fmt.prompt_ids(p.as_messages()) for p in prompts]
    requests = [Request(ids, args.temperature, 0.95, args.max_tokens, seed=i) for i, ids in enumerate(prompt_ids)]
    warm_requests = [Request(ids, args.temperature, 0.95, 8, seed=i) for i, ids in enumerate(prompt_ids[:2])]
    config = EngineConfig()  # the manifest defaults: eager vLLM, batch_tokens 8192
    dtype = "float32"

    log(f"model {model.path}; {len(requests)} prompts of {min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} "
        f"tokens, max_tokens {args.max_tokens}, temperature {args.temperature}, dtype {dtype}")
    threads_before = torch.get_num_threads()
    start = time.perf_counter()
    hf = TransformersEngine(model, dtype, config, fmt.end_of_turn_id)
    hf_load = time.perf_counter() - start
    log(f"transformers engine loaded in {hf_load:.1f} s (torch threads {torch.get_num_threads()})")
    start = time.perf_counter()
    vl = VllmEngine(model, dtype, config, fmt.end_of_turn_id)
    vl_load = time.perf_counter() - start
    threads_after = torch.get_num_threads()
    log(f"vLLM engine loaded in {vl_load:.1f} s (torch threads {threads_before} before, {threads_after} after)")

    engines = {"transformers": hf, "vllm": vl}
    # Warm-up, excluded from timing: one small generate and one small score per engine.
    for name, engine in engines.items():
        start = time.perf_counter()
        warm = engine.generate(warm_requests)
        engine.score([r.prompt_ids + c.token_ids for r, c in zip(warm_requests, warm)],
                     [len(r.prompt_ids) for r in warm_requests])
        log(f"{name} warm-up {time.perf_counter() - start:.1f} s")

    # Generation: rounds alternate the engines so both see the same background load.
    gen_s = {name: [] for name in engines}
    gen_tokens = {name: 0 for name in engines}
    completions = {}
    for rnd in range(args.rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            out = engine.generate(requests)
            elapsed = time.perf_counter() - start
            gen_s[name].append(elapsed)
            gen_tokens[name] = sum(len(c.token_ids) for c in out)
            completions[name] = out
            log(f"generate round {rnd + 1} {name}: {gen_tokens[name]} tokens in {elapsed:.1f} s "
                f"= {gen_tokens[name] / elapsed:.0f} tok/s")
    gen_rate = {name: gen_tokens[name] / median(gen_s[name]) for name in engines}

    # Scoring: the same sequences (prompt + vLLM's responses) through both engines.
    sequences = [r.prompt_ids + c.token_ids for r, c in zip(requests, completions["vllm"])]
    prompt_lens = [len(r.prompt_ids) for r in requests]
    score_tokens = sum(len(s) for s in sequences)
    score_s = {name: [] for name in engines}
    logps = {}
    for rnd in range(args.score_rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            lps = engine.score(sequences, prompt_lens)
            elapsed = time.perf_counter() - start
            score_s[name].append(elapsed)
            logps[name] = [sum(x) for x in lps]
            log(f"score round {rnd + 1} {name}: {score_tokens} tokens in {elapsed:.2f} s "
                f"= {score_tokens / elapsed:.0f} tok/s")
    score_rate = {name: score_tokens / median(score_s[name]) for name in engines}
    deltas = [abs(a - b) for a, b in zip(logps["vllm"], logps["transformers"])]
    same_text = sum(a.token_ids == b.token_ids for a, b in zip(completions["vllm"], completions["transformers"]))
    for engine in engines.values():
        engine.close()

    gen_ratio = gen_rate["vllm"] / gen_rate["transformers"]
    score_ratio = score_rate["vllm"] / score_rate["transformers"]
    emit(f"== engines: load average {os.getloadavg()[0]:.1f} at the end; {MODEL}, {dtype}, {len(requests)} prompts, max_tokens {args.max_tokens}, "
         f"temperature {args.temperature}, EngineConfig defaults (enforce_eager=True, batch_tokens "
         f"{config.batch_tokens}), {os.cpu_count()} CPU cores, torch threads {threads_before}->{threads_after} ==")
    emit(f"engine start (excluded):  transformers {hf_load:.1f} s, vLLM {vl_load:.1f} s")
    emit(f"generation:  vLLM {gen_rate['vllm']:.0f} tok/s ({gen_tokens['vllm']} tokens, median of {args.rounds} "
         f"{_fmt_list(gen_s['vllm'])} s)  transformers {gen_rate['transformers']:.0f} tok/s "
         f"({gen_tokens['transformers']} tokens, {_fmt_list(gen_s['transformers'])} s)  ratio {gen_ratio:.2f}x")
    emit(f"             identical greedy outputs: {same_text}/{len(requests)}" if args.temperature == 0 else
         "             (sampled outputs: token counts differ between engines)")
    emit(f"scoring:     vLLM {score_rate['vllm']:.0f} tok/s  transformers {score_rate['transformers']:.0f} tok/s  "
         f"ratio {score_ratio:.2f}x  ({len(sequences)} sequences, {score_tokens} tokens, median of "
         f"{args.score_rounds}: vLLM {_fmt_list(score_s['vllm'])} s, transformers "
         f"{_fmt_list(score_s['transformers'])} s)")
    emit(f"numerics:    max |delta sequence log-prob| vLLM vs transformers {max(deltas):.2e} nats "
         f"(mean {sum(deltas) / len(deltas):.2e}; sequence log-probs {min(logps['transformers']):.1f} .. "
         f"{max(logps['transformers']):.1f})")
    return {"gen_ratio": gen_ratio, "score_ratio": score_ratio, "max_delta": max(deltas)}


def _fmt_list(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


# ---------------------------------------------------------------------------------------------
# 3: DuckDB over a synthetic cache
# ---------------------------------------------------------------------------------------------

class Synth:
    """Vectorised synthetic rows with the real schemas (no Python loop per row)."""

    def __init__(self, n_pairs: int, seed: int = 0):
        import numpy as np

        from dadpo_offline.core.prompts import builtin_prompts

        self.np = np
        self.n = n_pairs
        rng = np.random.default_rng(seed)
        # Unique 16-hex-digit prompt ids (a bijective 64-bit mix of 0..n-1, so hash-like and distinct).
        self.prompt_ids = self.hex_ids(self.splitmix64(np.arange(n_pairs, dtype=np.uint64)))
        self.plen = rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1, n_pairs).astype(np.int32)
        # Text pool: words of the built-in prompts in random order (compresses roughly like prose).
        words = " ".join(" ".join(c for _, c in p.messages) for p in builtin_prompts("all")).split()
        words = [w.replace("\\", "").replace('"', "") or "x" for w in words]
        self.text_pool = np.frombuffer(" ".join(rng.choice(words, 400_000)).encode(), dtype=np.uint8)

    @staticmethod
    def splitmix64(x):
        import numpy as np

        with np.errstate(over="ignore"):
            x = x + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return x ^ (x >> np.uint64(31))

    @staticmethod
    def hex_ids(values):
        import numpy as np
        import pyarrow as pa

        raw = values.astype(">u8").view(np.uint8).reshape(-1, 8)
        lut = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
        chars = np.stack([lut[raw >> 4], lut[raw & 15]], axis=-1).reshape(-1, 16)
        offsets = np.arange(len(values) + 1, dtype=np.int32) * 16
        return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))

    def offsets(self, lengths):
        out = self.np.zeros(len(lengths) + 1, dtype=self.np.int64)
        self.np.cumsum(lengths, out=out[1:])
        return out

    def gather(self, values, starts, lengths):
        """Concatenation of values[starts[j] : starts[j] + lengths[j]] for all j."""
        np = self.np
        seg = self.offsets(lengths)
        idx = np.repeat(starts - seg[:-1], lengths) + np.arange(seg[-1])
        return values[idx]

    def token_ids(self, rng, count):
        """Zipf-like (log-uniform) ids over the vocabulary: ~10 bits each, like real text."""
        np = self.np
        return (np.exp(rng.random(count) * np.log(VOCAB)).astype(np.int32) - 1).clip(0, VOCAB - 1)

    def list_array(self, lengths, values):
        import pyarrow as pa

        return pa.ListArray.from_arrays(pa.array(self.offsets(lengths).astype(self.np.int32)), pa.array(values))

    def strings(self, rng, lengths):
        import pyarrow as pa

        np = self.np
        starts = rng.integers(0, len(self.text_pool) - int(lengths.max()) - 1, len(lengths))
        data = self.gather(self.text_pool, starts, lengths)
        return pa.StringArray.from_buffers(len(lengths), pa.py_buffer(self.offsets(lengths).astype(np.int32)),
                                           pa.py_buffer(data.tobytes()))

    def prompts(self, shard_size: int):
        import pyarrow as pa
        import pyarrow.compute as pc

        from dadpo_offline.cache.schema import PROMPTS

        np, n = self.np, self.n
        rng = np.random.default_rng([1, n])
        content = self.strings(rng, rng.integers(20, 600, n))
        prompt_ids = self.list_array(self.plen, self.token_ids(rng, int(self.plen.sum())))  # student = teacher ids
        messages = pc.binary_join_element_wise('[{"role": "user", "content": "', content, '"}]', "")
        categories = pa.array(["advice", "coding", "math", "writing", "knowledge", "reasoning"])
        category = pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, len(categories), n).astype(np.int32)),
                                                  categories).cast(pa.string())
        return pa.Table.from_arrays([
            self.prompt_ids, pa.repeat(pa.scalar("bench:synthetic"), n), pa.repeat(pa.scalar("train"), n), category,
            messages, pa.array(rng.integers(1, 4, n).astype(np.int32)), pa.array(self.plen), pa.array(self.plen),
            pa.array((np.arange(n) // shard_size).astype(np.int32)), prompt_ids, prompt_ids], schema=PROMPTS)

    def shard(self, k: int, shard_size: int):
        """The four generation/score tables of work shard k: {stage: table}."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from dadpo_offline.cache.schema import GENERATIONS, SCORES

        np = self.np
        lo, hi = k * shard_size, min((k + 1) * shard_size, self.n)
        m = hi - lo
        rng = np.random.default_rng([2, k])
        ids = self.prompt_ids.slice(lo, m)
        plen = self.plen[lo:hi]
        pvals = self.token_ids(rng, int(plen.sum()))
        poff = self.offsets(plen)
        zeros = pa.array(np.zeros(m, dtype=np.int32))
        tables, per_role = {}, {}
        for role in ("teacher", "student"):
            rlen = rng.integers(RESPONSE_TOKENS[0], RESPONSE_TOKENS[1] + 1, m).astype(np.int32)
            truncated = rlen == RESPONSE_TOKENS[1]
            rvals = self.token_ids(rng, int(rlen.sum()))
            roff = self.offsets(rlen)
            # input_ids = prompt ids then response ids, row by row
            both = np.concatenate([pvals, rvals])
            starts = np.stack([poff[:-1], len(pvals) + roff[:-1]], axis=1).ravel()
            lens = np.stack([plen, rlen], axis=1).ravel()
            per_role[role] = (rlen, self.list_array(plen + rlen, self.gather(both, starts, lens)))
            trunc = pa.array(truncated)
            tables[f"generate-{role}"] = pa.Table.from_arrays([
                ids, zeros, pa.repeat(pa.scalar(role), m), pa.array(rng.integers(0, 2 ** 56, m)),
                self.list_array(plen, pvals), self.list_array(rlen, rvals),
                self.strings(rng, rlen * CHARS_PER_TOKEN), pc.if_else(trunc, "length", "stop"), trunc,
                pa.array(rlen)], schema=GENERATIONS)
        for scorer in ("teacher", "reference"):
            parts = []
            for role in ("teacher", "student"):  # score_shard's row order: teacher rows, then student rows
                rlen, input_ids = per_role[role]
                lps = (-rng.exponential(1.0, int(rlen.sum()))).astype(np.float32)
                sums = np.add.reduceat(lps.astype(np.float64), self.offsets(rlen)[:-1])
                parts.append(pa.Table.from_arrays([
                    ids, zeros, pa.repeat(pa.scalar(role), m), pa.repeat(pa.scalar(scorer), m), input_ids,
                    pa.array(plen), self.list_array(rlen, lps), pa.array(sums), pa.array(rlen)], schema=SCORES))
            tables[f"score-{scorer}"] = pa.concat_tables(parts)
        return tables


def build_cache(root: Path, n_pairs: int, shard_size: int) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    from dadpo_offline.cache.index import open_cache
    from dadpo_offline.cache.publish import build_index
    from dadpo_offline.cache.shards import shard_path, write_shard
    from dadpo_offline.precompute.stages import pairs_shard

    synth = Synth(n_pairs)
    n_shards = -(-n_pairs // shard_size)
    cache = open_cache(root, create=True)
    fps = {}
    for i, stage in enumerate(("prompts", "generate-teacher", "generate-student", "score-teacher", "score-reference",
                               "pairs")):
        fps[stage] = f"bench{i:011d}"
        cache.begin_stage(stage, fps[stage], {"bench": "synthetic", "pairs": n_pairs}, 1 if stage == "prompts" else n_shards)
    total_bytes = 0

    def put(stage, k, table):
        nonlocal total_bytes
        written = write_shard(table, shard_path(cache.stage_dir(stage, fps[stage]), k),
                              {"stage": stage, "fingerprint": fps[stage], "shard": k})
        cache.register(stage, fps[stage], k, written)
        total_bytes += written.bytes

    prompts = synth.prompts(shard_size)
    put("prompts", 0, prompts)  # as run.py: one prompts shard holding every prompt
    for k in range(n_shards):
        tables = synth.shard(k, shard_size)
        for stage, table in tables.items():
            put(stage, k, table)
        # as run.py: the pairs stage joins shard k's prompts, generations and scores once
        put("pairs", k, pairs_shard(prompts.filter(pc.equal(prompts["shard"], k)),
                                    pa.concat_tables([tables["generate-teacher"], tables["generate-student"]]),
                                    pa.concat_tables([tables["score-teacher"], tables["score-reference"]])))
        log(f"synthetic cache: shard {k + 1}/{n_shards} written ({total_bytes / 2 ** 20:.0f} MiB so far)")
    build_index(cache)  # as `cache index` after --shard jobs
    return total_bytes, n_shards


AGGREGATE_SQL = ("SELECT count(*), avg(teacher_chosen_logp - teacher_rejected_logp), "
                 "avg(ref_chosen_logp - ref_rejected_logp) FROM pairs")


def bench_duckdb(args, emit) -> dict:
    import duckdb
    import numpy as np

    from dadpo_offline.cache.index import INDEX_NAME

    tmp = Path(tempfile.mkdtemp(prefix="dadpo-bench-"))
    try:
        start = time.perf_counter()
        total_bytes, n_shards = build_cache(tmp / "cache", args.pairs, args.shard_pairs)
        build_s = time.perf_counter() - start
        con = duckdb.connect(str(tmp / "cache" / INDEX_NAME), read_only=True)  # fresh, read-only
        threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
        log(f"cache built in {build_s:.0f} s; timing the aggregate ({args.query_runs} runs after one warm-up)")
        result = con.execute(AGGREGATE_SQL).fetchone()  # warm-up
        agg_s = []
        for _ in range(args.query_runs):
            start = time.perf_counter()
            result = con.execute(AGGREGATE_SQL).fetchone()
            agg_s.append(time.perf_counter() - start)
        profile = profile_query(con, AGGREGATE_SQL, tmp / "profile.json")
        # A typical training read: the token-id columns of a batch of 32 pairs, by prompt_id.
        rng = np.random.default_rng(7)
        synth_ids = Synth.hex_ids(Synth.splitmix64(rng.choice(args.pairs, 32 * (args.query_runs + 1),
                                                              replace=False).astype(np.uint64))).to_pylist()
        batch_sql = ("SELECT prompt_id, sample, chosen_input_ids, chosen_prompt_len, rejected_input_ids, "
                     "rejected_prompt_len, ref_chosen_logp, ref_rejected_logp, teacher_chosen_logp, "
                     "teacher_rejected_logp FROM pairs WHERE prompt_id IN (SELECT unnest(?::VARCHAR[]))")
        batch_s, got = [], 0
        for i in range(args.query_runs + 1):
            start = time.perf_counter()
            got = len(con.execute(batch_sql, [synth_ids[32 * i: 32 * (i + 1)]]).fetchall())
            if i:  # the first is the warm-up
                batch_s.append(time.perf_counter() - start)
        con.close()
        files = sorted((tmp / "cache").rglob("shard-*.parquet"))
        by_stage = {}
        for f in files:
            by_stage[f.parent.parent.name] = by_stage.get(f.parent.parent.name, 0) + f.stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    agg = median(agg_s)
    emit(f"== DuckDB: load average {os.getloadavg()[0]:.1f} at the end; synthetic cache of {args.pairs:,} pairs, {n_shards} shards of {args.shard_pairs:,} pairs "
         f"per stage (+1 prompts shard, as run.py writes it); prompts {PROMPT_TOKENS[0]}-{PROMPT_TOKENS[1]} tokens, "
         f"responses {RESPONSE_TOKENS[0]}-{RESPONSE_TOKENS[1]} (input_ids {PROMPT_TOKENS[0] + RESPONSE_TOKENS[0]}-"
         f"{PROMPT_TOKENS[1] + RESPONSE_TOKENS[1]}), duckdb {duckdb.__version__}, threads {threads} ==")
    emit(f"cache build (synthesis + write_shard + register): {build_s:.1f} s")
    emit(f"on disk: {total_bytes / args.pairs:.0f} bytes/pair ({total_bytes / 2 ** 30:.2f} GiB in {len(files)} shards; "
         + ", ".join(f"{s} {b / args.pairs:.0f}" for s, b in by_stage.items()) + " bytes/pair)")
    emit(f"pairs aggregate: {agg:.2f} s median of {args.query_runs} {_fmt_list(agg_s)} "
         f"-> count {result[0]:,}, avg teacher margin {result[1]:.4f}, avg ref margin {result[2]:.4f}")
    emit(f"  where the aggregate's time goes (EXPLAIN ANALYZE, operator CPU time summed over threads): {profile}")
    emit(f"training read (32 pairs by prompt_id): {median(batch_s):.2f} s median {_fmt_list(batch_s)}, "
         f"{got} rows")
    if result[0] != args.pairs:
        emit(f"WARNING: the pairs view returned {result[0]} rows, expected {args.pairs}")
    return {"agg_s": agg, "count_ok": result[0] == args.pairs, "batch_s": median(batch_s)}


def profile_query(con, sql: str, path: Path) -> str:
    """One profiled run of `sql`: operator CPU time by operator kind, and rows scanned."""
    import json

    con.execute("PRAGMA enable_profiling='json'")
    con.execute(f"PRAGMA profiling_output='{path}'")
    con.execute(sql).fetchall()
    con.execute("PRAGMA disable_profiling")
    profile = json.loads(path.read_text())
    by_kind: dict[str, list] = {}

    def walk(node):
        kind = by_kind.setdefault(node.get("name", "?"), [0, 0.0])
        kind[0] += 1
        kind[1] += node.get("timing", 0.0)
        for child in node.get("children", []):
            walk(child)

    for node in profile.get("operator", []):
        walk(node)
    query = profile.get("query", {})
    parts = [f"{n} x {name} {t:.2f} s" for name, (n, t) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])
             if t >= 0.005]
    return (", ".join(parts) + f"; wall {query.get('total_time', 0):.2f} s, CPU {query.get('cpu_time', 0):.2f} s, "
            f"{query.get('total_rows_scanned', 0):,} rows scanned, {query.get('total_intermediate_rows', 0):,} "
            f"intermediate rows, row groups {query.get('total_row_groups_scanned', '?')}/"
            f"{query.get('total_row_groups_to_scan', '?')}")


# ---------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24, help="prompts to generate for (built-in train set)")
    parser.add_argument("--max-tokens", type=int, default=64, help="response budget per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (same outputs in both engines)")
    parser.add_argument("--rounds", type=int, default=1, help="timed generation rounds per engine (alternating)")
    parser.add_argument("--score-rounds", type=int, default=3, help="timed scoring rounds per engine (alternating)")
    parser.add_argument("--pairs", type=int, default=1_000_000, help="pairs in the synthetic DuckDB cache")
    parser.add_argument("--shard-pairs", type=int, default=50_000, help="pairs per synthetic shard")
    parser.add_argument("--query-runs", type=int, default=3, help="timed runs per DuckDB query (after one warm-up)")
    parser.add_argument("--skip-engines", action="store_true")
    parser.add_argument("--skip-duckdb", action="store_true")
    args = parser.parse_args()

    # Results only on stdout: everything written to file descriptor 1 (vLLM's logger included) goes to stderr.
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(line: str) -> None:
        print(line, file=results, flush=True)
        log(line)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    begin = time.perf_counter()
    emit(f"(started {time.strftime('%Y-%m-%d %H:%M:%S')}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: "
         "other processes' load slows both sides of each ratio alike only roughly)")
    rows = []
    if not args.skip_engines:
        e = bench_engines(args, emit)
        rows.append(("generation tok/s, vLLM / transformers", f">= {TARGET_GENERATE:.1f}x", f"{e['gen_ratio']:.2f}x",
                     e["gen_ratio"] >= TARGET_GENERATE))
        rows.append(("scoring tok/s, vLLM / transformers", f">= {TARGET_SCORE:.1f}x", f"{e['score_ratio']:.2f}x",
                     e["score_ratio"] >= TARGET_SCORE))
    if not args.skip_duckdb:
        d = bench_duckdb(args, emit)
        rows.append((f"pairs aggregate, {args.pairs:,} pairs", f"< {TARGET_PAIRS_S:.1f} s", f"{d['agg_s']:.2f} s",
                     d["agg_s"] < TARGET_PAIRS_S and d["count_ok"]))
    emit("== targets ==")
    width = max(len(r[0]) for r in rows) if rows else 0
    for name, target, value, ok in rows:
        emit(f"{name:<{width}}  target {target:<7}  measured {value:<8}  {'PASS' if ok else 'FAIL'}")
    emit(f"(total benchmark time {time.perf_counter() - begin:.0f} s)")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
