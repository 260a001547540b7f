"""The phase-one cache: Parquet shards per stage fingerprint, indexed by one DuckDB file."""
from .index import CacheIndex, open_cache
from .schema import STAGES

__all__ = ["CacheIndex", "open_cache", "STAGES"]
