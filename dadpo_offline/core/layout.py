"""Where a run's parts live, decided once: every command asks a `RunLayout` for the cache, the
training stage folders, the eval runs and the report, so `train.output_dir` and `eval.output_dir`
hold everywhere (a report of a run that moved them finds them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..manifest import Manifest


@dataclass(frozen=True)
class RunLayout:
    root: Path  # the run folder: the cache's parent
    cache: Path
    train: Path  # <train>/sft and <train>/<loss>
    eval: Path  # <eval>/<run id>
    report: Path

    @classmethod
    def of(cls, manifest: Manifest) -> RunLayout:
        cache = Path(manifest.cache_dir).expanduser().resolve()
        place = lambda configured, default: Path(configured).expanduser().resolve() if configured else default
        return cls(cache.parent, cache, place(manifest.train.output_dir, cache.parent / "train"),
                   place(manifest.eval.output_dir, cache.parent / "eval"), cache.parent / "report")

    @classmethod
    def in_folder(cls, run_dir: str | Path) -> RunLayout:
        """The default layout of a run folder (a manifest that sets no output_dir)."""
        root = Path(run_dir).expanduser().resolve()
        return cls(root, root / "cache", root / "train", root / "eval", root / "report")

    def stage(self, name: str) -> Path:
        """A training stage's output folder: `sft` or a loss name."""
        return self.train / name
