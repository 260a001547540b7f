"""The lm-eval "alignment tax" suite: standard benchmarks through `lm_eval.simple_evaluate`.

simple_evaluate's `num_fewshot` applies to every task of a call, so tasks are grouped by shot
count and each group is one call and one cached result. Per-task YAMLs with their own
`num_fewshot` would need one call only, but a group such as mmlu cannot be wrapped in a YAML,
and a per-group cache lets an interrupted run resume after its slowest group.

A task with `data_files` runs its built-in prompt, filters and metric on local files: a YAML in
`<out_dir>/tasks/` `include:`s the built-in one and replaces only where the data comes from.
Local and hub tasks go to separate calls, because each kind is read through its own TaskManager.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml
from tqdm import tqdm

from ..cache.artefacts import cached_json, store_json
from ..cache.index import open_cache
from ..cache.shards import file_sha256, fingerprint
from ..errors import InputError
from ..manifest import LmEvalConfig
from ..core.models import ResolvedModel
from ..core.engines import resolve_dtype, torch_device
from ..files import atomic_text

LOCAL_SUFFIX = "_local"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@dataclass(frozen=True)
class TaskGroup:
    """Tasks evaluated by one simple_evaluate call: same shot count, all local or all from the hub."""

    shots: int
    tasks: tuple[str, ...]
    local: bool

    def lm_eval_name(self, task: str) -> str:
        return task + LOCAL_SUFFIX if self.local else task

    @property
    def label(self) -> str:
        return f"{','.join(self.tasks)} ({self.shots}-shot{', local data' if self.local else ''})"


def run_lmeval(config: LmEvalConfig, models: dict[str, ResolvedModel], out_dir: Path, cache_dir: Path) -> list[dict]:
    """Run config.tasks on every model; return result rows.

    Each (model, group) result is a JSON file in the cache (`cache_dir`, made when new), registered
    as stage `lmeval` under its settings' fingerprint: `cache status` lists it, `cache verify`
    checks it, and a damaged one is computed again.
    """
    data_digests = data_file_digests(config)
    groups = group_tasks(config)
    dtype, device = resolve_dtype("auto"), torch_device()
    cache = open_cache(cache_dir, create=True)
    settings = {(name, group): group_settings(model, group, dtype, config, data_digests)
                for name, model in models.items() for group in groups}
    paths = {key: cache.root / "lmeval" / f"{fingerprint(value)}.json" for key, value in settings.items()}
    cached = {key: cached_json(cache, "lmeval", settings[key], paths[key]) for key in settings}
    # a finished result proves its tasks were valid, so a full cache hit skips lm-eval's slow task index
    done = all(result is not None for result in cached.values())
    task_managers = {} if done else prepare_tasks(config, groups, out_dir / "tasks")
    rows = []
    for name, model in models.items():
        lm, raw = None, {}
        for group in groups:
            result = cached[name, group]
            if result is not None:
                tqdm.write(f"lm-eval {group.label} for {name}: cached", file=sys.stderr)
            else:
                if lm is None:
                    tqdm.write(f"loading {model.reference} ({device}, {dtype}) for lm-eval as {name}", file=sys.stderr)
                    lm = load_lm(model, dtype, device, config.batch_size)
                tqdm.write(f"lm-eval {group.label} for {name}", file=sys.stderr)
                result = store_json(cache, "lmeval", settings[name, group], paths[name, group],
                                    evaluate_group(lm, group, task_managers[group], config.limit))
            raw[group.label] = result
            rows += result_rows(name, group, raw[group.label])
        atomic_text(out_dir / "lmeval" / f"{name}.json", json.dumps(raw, indent=2))
    return rows


def group_settings(model: ResolvedModel, group: TaskGroup, dtype: str, config: LmEvalConfig,
                   data_digests: dict[str, dict[str, str]]) -> dict:
    """Everything that decides one group's scores (its fingerprint); batch size and device only change the speed."""
    import lm_eval

    return {"suite": "lmeval", "model": model.reference, "path": model.path, "revision": model.revision,
            "dtype": dtype, "tasks": {task: group.shots for task in group.tasks},
            "data": {task: data_digests[task] for task in group.tasks if task in data_digests},
            "limit": config.limit, "lm_eval": lm_eval.__version__}


def data_file_digests(config: LmEvalConfig) -> dict[str, dict[str, str]]:
    """sha256 of every local data file, per task and split; InputError naming a missing one."""
    digests = {}
    for task, files in config.data_files.items():  # (a task missing from config.tasks fails the manifest's load)
        for split, file in files.items():
            if not Path(file).is_file():
                raise InputError(f"eval.lmeval.data_files.{task}.{split}: data file {file} does not exist")
        digests[task] = {split: file_sha256(Path(file)) for split, file in files.items()}
    return digests


def group_tasks(config: LmEvalConfig) -> list[TaskGroup]:
    """One group per (shot count, local or hub data), in the order the tasks were given."""
    keys = {}
    for task, shots in config.tasks.items():
        keys.setdefault((shots, task in config.data_files), []).append(task)
    return [TaskGroup(shots, tuple(tasks), local) for (shots, local), tasks in keys.items()]


@cache
def builtin_task_manager():
    """lm-eval's index of its built-in tasks; building it parses thousands of YAMLs (~10 s), so once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def prepare_tasks(config: LmEvalConfig, groups: list[TaskGroup], tasks_dir: Path) -> dict:
    """Check every task name and write the local-data YAMLs; return each group's TaskManager."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    builtin = builtin_task_manager()
    unknown = [task for task in config.tasks if task not in builtin.task_index]
    if unknown:
        raise InputError(f"eval.lmeval.tasks: lm-eval {lm_eval.__version__} does not know {', '.join(unknown)}; "
                         "list its task names with: lm-eval ls tasks")
    for task in config.tasks:
        entry = builtin.task_index[task]
        if entry.kind is Kind.TAG:  # lm-eval reports a tag's tasks one by one, never under the tag's name
            raise InputError(f"eval.lmeval.tasks: {task} is an lm-eval tag, a list of tasks without a score of its "
                             f"own; list its tasks instead: {', '.join(sorted(entry.tags))}")
    for task, files in config.data_files.items():
        entry = builtin.task_index[task]
        if entry.kind is not Kind.TASK:
            raise InputError(f"eval.lmeval.data_files.{task}: {task} is an lm-eval {entry.kind.name.lower()}, not one "
                             f"YAML task, so local files cannot replace its data; drop data_files.{task} or list its "
                             "subtasks (lm-eval ls subtasks) with their own data_files")
        write_local_task(task, Path(entry.yaml_path), entry.cfg, files, tasks_dir)
    # our YAMLs include the built-in ones by absolute path, so this index needs no second scan of lm-eval's tasks
    local = TaskManager(include_path=str(tasks_dir), include_defaults=False) if config.data_files else None
    return {group: local if group.local else builtin for group in groups}


def write_local_task(task: str, builtin_yaml: Path, builtin_cfg: dict, files: dict[str, str], tasks_dir: Path) -> Path:
    """Write `<task>_local.yaml`: the built-in task read from local JSON files instead of the hub.

    Split keys whose split has no local file are cleared, so lm-eval falls back the way it does for
    any task without that split (test -> validation for scoring, train -> validation -> test for shots).
    """
    used = {builtin_cfg.get(key) for key in SPLIT_KEYS} - {None}
    if set(files) - used:
        raise InputError(f"eval.lmeval.data_files.{task}: split(s) {', '.join(sorted(set(files) - used))} are not "
                         f"read by lm-eval task {task}; it reads {', '.join(sorted(used))}")
    if not {builtin_cfg.get("test_split"), builtin_cfg.get("validation_split")} & set(files):
        raise InputError(f"eval.lmeval.data_files.{task}: give its test or validation split, the data it is scored on")
    override = {"include": str(builtin_yaml), "task": task + LOCAL_SUFFIX, "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(file) for split, file in files.items()}},
                **{key: None for key in SPLIT_KEYS if builtin_cfg.get(key) and builtin_cfg[key] not in files}}
    tasks_dir.mkdir(parents=True, exist_ok=True)
    path = tasks_dir / f"{task}{LOCAL_SUFFIX}.yaml"
    path.write_text(yaml.safe_dump(override, sort_keys=False), encoding="utf-8")
    return path


def load_lm(model: ResolvedModel, dtype: str, device: str, batch_size: int):
    """lm-eval's "hf" model, loaded once per model and shared by its task groups."""
    from lm_eval.api.registry import get_model

    args = {"pretrained": model.path, "dtype": dtype}
    if model.load_revision:
        args["revision"] = model.load_revision
    return get_model("hf").create_from_arg_obj(args, {"batch_size": batch_size, "device": device})


def evaluate_group(lm, group: TaskGroup, task_manager, limit: int | None) -> dict:
    """One simple_evaluate call; its results (no samples) as plain JSON data."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=[group.lm_eval_name(t) for t in group.tasks],
                                          num_fewshot=group.shots, limit=limit, task_manager=task_manager,
                                          log_samples=False)
    except ConnectionError as exc:  # what `datasets` raises for a hub data set that is not cached offline
        raise InputError(f"lm-eval could not load the data set of {', '.join(group.tasks)} offline ({exc}); "
                         "give local files as eval.lmeval.data_files.<task>") from exc
    for task in group.tasks:
        used = results["n-shot"].get(group.lm_eval_name(task))
        if used is not None and used != group.shots:
            tqdm.write(f"lm-eval {task}: its config fixes {used} shots, not {group.shots}", file=sys.stderr)
    return json.loads(json.dumps(results, default=handle_non_serializable))


def result_rows(name: str, group: TaskGroup, results: dict) -> list[dict]:
    """One row per metric lm-eval reports for each task (`metric,filter` keys), stderr from the `_stderr` twin."""
    rows = []
    for task in group.tasks:
        metrics = results["results"][group.lm_eval_name(task)]
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            label = metric if filter_name == "none" else key  # keep the filter where it matters: gsm8k strict-match
            rows.append({"model": name, "suite": "lmeval", "metric": f"{task}/{label}",
                         "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": metrics["sample_len"]})
    return rows
