"""Benchmark of `cache index`: building index.duckdb from the commit records of many shards.

    python bench/cache_index.py [--shards 10000] [--pairs 1000000] [--runs 3]

A synthetic cache is written through the real writer path (write_shard, begin_stage, register:
one Parquet file and one commit record per shard) with the real schemas: one prompts shard and
--shards pairs shards holding --pairs pairs in all (bench/precompute.py's synthetic rows). Then
`build_index` runs --runs times (the first on a cache without an index, the others replacing it),
and the `pairs` view of the new index is read once, to show it covers every pair.
Figures go to stdout, progress to stderr; there are no targets (exit 0).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from precompute import Synth, log, median  # noqa: E402  (bench/precompute.py: the synthetic rows)


def write_cache(root: Path, n_shards: int, n_pairs: int) -> float:
    """The cache as `--shard` workers leave it: shards and their records, no index. Returns seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dadpo_offline.cache.index import open_cache
    from dadpo_offline.cache.shards import shard_path, write_shard
    from dadpo_offline.manifest import PairsConfig
    from dadpo_offline.precompute.stages import pairs_shard

    start = time.perf_counter()
    per_shard = -(-n_pairs // n_shards)
    synth = Synth(n_pairs)
    cache = open_cache(root, create=True)
    prompts = synth.prompts(per_shard)
    fps = {"prompts": "bench0000000000p", "pairs": "bench0000000000q"}
    cache.begin_stage("prompts", fps["prompts"], {"bench": "synthetic"}, 1)
    cache.begin_stage("pairs", fps["pairs"], {"bench": "synthetic", "prompts": fps["prompts"]}, n_shards)

    def put(stage, k, table):
        written = write_shard(table, shard_path(cache.stage_dir(stage, fps[stage]), k),
                              {"stage": stage, "fingerprint": fps[stage], "shard": k})
        cache.register(stage, fps[stage], k, written, "bench")

    put("prompts", 0, prompts)
    # one real join (pairs_shard) makes a template shard; each shard k is the template with shard k's
    # prompt ids, so 10,000 shards take minutes, not the hours 10,000 joins would
    tables = synth.shard(0, per_shard)
    template = pairs_shard(prompts.filter(pc.equal(prompts["shard"], 0)),
                           pa.concat_tables([tables["generate-teacher"], tables["generate-student"]]),
                           pa.concat_tables([tables["score-teacher"], tables["score-reference"]]), PairsConfig())
    column = template.schema.get_field_index("prompt_id")
    for k in range(n_shards):
        rows = min(per_shard, n_pairs - k * per_shard)
        put("pairs", k, template.slice(0, rows).set_column(column, "prompt_id",
                                                           synth.prompt_ids.slice(k * per_shard, rows)))
        if (k + 1) % 1000 == 0:
            log(f"synthetic cache: {k + 1}/{n_shards} pairs shards written")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=10_000, help="pairs shards (each with its commit record)")
    parser.add_argument("--pairs", type=int, default=1_000_000, help="synthetic pairs in all")
    parser.add_argument("--runs", type=int, default=3, help="cache index runs (the first builds a new index)")
    parser.add_argument("--dir", type=Path, help="where to build the cache (default: a temporary folder, removed)")
    args = parser.parse_args()

    import duckdb

    from dadpo_offline.cache.index import open_cache
    from dadpo_offline.cache.publish import build_index

    tmp = Path(tempfile.mkdtemp(prefix="dadpo-bench-index-", dir=args.dir))
    try:
        root = tmp / "cache"
        written_s = write_cache(root, args.shards, args.pairs)
        records = len(list(root.glob("*/*/commit-*.json")))
        print(f"== cache index: {args.shards:,} pairs shards + 1 prompts shard, {args.pairs:,} pairs, "
              f"{records:,} commit records; duckdb {duckdb.__version__}; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs ==")
        print(f"writing the cache (write_shard + commit record per shard): {written_s:.1f} s")
        cache = open_cache(root, create=True)
        seconds = []
        for run in range(args.runs):
            start = time.perf_counter()
            done = build_index(cache)
            seconds.append(time.perf_counter() - start)
            log(f"cache index run {run + 1}: {seconds[-1]:.2f} s")
        print(f"cache index: first (no index yet) {seconds[0]:.2f} s; "
              f"median of {len(seconds)} {median(seconds):.2f} s {[round(s, 2) for s in seconds]}; "
              f"{done.shards:,} shards, {done.rows:,} rows registered")
        print(f"index.duckdb: {cache.index_path.stat().st_size / 2 ** 20:.1f} MiB")
        start = time.perf_counter()
        with cache.connect() as con:
            pairs = con.execute("SELECT count(*) FROM pairs").fetchone()[0] + \
                con.execute("SELECT count(*) FROM dropped_pairs").fetchone()[0]
        print(f"first read of the new index (open + count over pairs and dropped_pairs): "
              f"{time.perf_counter() - start:.2f} s -> {pairs:,} pairs")
        if pairs != args.pairs:
            print(f"WARNING: the views hold {pairs} pairs, expected {args.pairs}")
            return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
