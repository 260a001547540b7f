"""Read-only SQL over the cache, and the shared output formats of every command that prints rows."""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DadpoError
from .index import open_cache

EXPLAIN_PREFIX = re.compile(r"\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", re.IGNORECASE)


def run_query(cache_dir: str | Path, query: str, params: list | None = None) -> pa.Table:
    """Run one statement that can only read: a SELECT (DESCRIBE, SUMMARIZE, SHOW and VALUES are
    SELECTs to DuckDB) or an EXPLAIN [ANALYZE] of one. Everything else is refused before it runs;
    the connection itself is read-only and confined to the cache folder (CacheIndex.connect)."""
    cache = open_cache(cache_dir)
    statement = _only_statement(query)
    if statement != "SELECT":
        raise DadpoError(f"refused: {statement} statements are not plain reads; the sql command runs only SELECT "
                         "(with DESCRIBE, SUMMARIZE, SHOW, VALUES) or EXPLAIN [ANALYZE] SELECT")
    with cache.connect() as con:
        try:
            return arrow_table(con.sql(query, params=params or None))
        except duckdb.Error as exc:
            raise DadpoError(f"SQL error: {str(exc).splitlines()[0]}") from exc


def _only_statement(query: str) -> str:
    """The kind of the single statement in `query`; an EXPLAIN of a SELECT counts as a SELECT."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise DadpoError(f"SQL error: {str(exc).splitlines()[0]}") from exc
    if len(statements) != 1:
        raise DadpoError(f"give exactly one SQL statement (got {len(statements)})")
    kind = statements[0].type.name
    if kind != "EXPLAIN":
        return kind
    prefix = EXPLAIN_PREFIX.match(query)
    explained = query[prefix.end():] if prefix else ""
    try:  # EXPLAIN ANALYZE runs what it explains: that must be a read too
        inner = duckdb.extract_statements(explained)
    except duckdb.Error:
        inner = []
    return "SELECT" if [s.type.name for s in inner] == ["SELECT"] else "EXPLAIN"


def arrow_table(relation) -> pa.Table:
    """A DuckDB relation as an Arrow table (duckdb 2 renamed arrow() to to_arrow_table())."""
    if relation is None:  # statements such as EXPLAIN ANALYZE return no relation
        return pa.table({})
    return relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()


def _cell(value, limit: int = 60) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else ("" if value is None else str(value))
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_table(table: pa.Table) -> str:
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(name)] + [len(r[i]) for r in rows]) for i, name in enumerate(table.column_names)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(table.column_names), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


def write_rows(table: pa.Table, fmt: str, output: str | None) -> None:
    """table | csv | json | jsonl to stdout or a file; parquet to a file only."""
    if fmt == "parquet" and not output:
        raise DadpoError("--format parquet needs --output FILE")
    try:
        if fmt == "parquet":
            pq.write_table(table, output, compression="zstd")
            return
        handle = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout
    except OSError as exc:
        raise DadpoError(f"cannot write {output}: {exc.strerror or exc}") from exc
    try:
        rows = table.to_pylist()
        if fmt == "table":
            handle.write(format_table(table) + "\n")
        elif fmt == "csv":
            writer = csv.writer(handle)
            writer.writerow(table.column_names)
            writer.writerows([[json.dumps(v) if isinstance(v, (list, dict)) else v for v in r.values()] for r in rows])
        elif fmt == "json":
            handle.write(json.dumps(rows, default=str, ensure_ascii=False, indent=1) + "\n")
        else:
            handle.writelines(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows)
    finally:
        if output:
            handle.close()



