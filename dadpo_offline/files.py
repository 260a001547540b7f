"""How our outputs land on disk: whole or not at all, and with the user's normal file mode, so a
team can share a run.

transformers writes `model.safetensors` through a private temporary file (mode 600); the other
files of the same folder get the umask's mode (usually 644). Every model folder we write (a
converted embedded model, a pruned student, dSFT and trained outputs, their checkpoints) is
given the umask's mode throughout, as `cp` or `touch` would have made it.
"""
from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | Path) -> None:
    """chmod every file (666 & ~umask) and folder (777 & ~umask) under `folder`, itself included."""
    mask = current_umask()
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(path: Path):
    """A temporary name beside `path` to write; renamed over `path` when the block ends, removed when it
    fails: a reader sees the whole file or none. The name (`*.tmp-HOST-PID`) tells whose leftover it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (the directory entry itself is fsynced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_text(path: Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")


@contextmanager
def staged_folder(target: Path):
    """A sibling folder to fill, renamed to `target` with the user's file mode when the block ends and
    removed when it fails: `target` appears whole or not at all. An empty `target` is replaced; a
    filled one (another process finished first, with the same content) is kept and ours dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # same file system
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
        apply_umask(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
