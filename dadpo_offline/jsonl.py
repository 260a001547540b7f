"""Reading the JSONL files users hand us (prompts, instructions, benchmark questions) one way.

Every problem names the file and line: invalid UTF-8, malformed JSON, a missing file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError


def read_jsonl(path: Path, what: str) -> list[tuple[str, Any]]:
    """(path:line, record) for each non-blank line; `what` names the file in the not-found error."""
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    records = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{where}: invalid UTF-8 at byte {exc.start}") from None
            if not line.strip():
                continue
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    return records
