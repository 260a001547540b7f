"""`dadpo-offline precompute`: prompts → generate (student, teacher) → score (teacher, reference).

Recipe: validate everything (prompts, models, tokenizers) before touching the cache; then, stage
by stage, build each missing shard of this job (`--shard i/N`), write it atomically, commit it (a record
beside it). A rerun skips committed, intact shards, so a kill at any moment loses only the shard
in flight, and nothing is ever duplicated. A lone job rebuilds `index.duckdb` after each stage;
`--shard` jobs never open it (run `cache index` once they have all finished).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from ..cache.build import StageReport, build_stage
from ..cache.index import CacheIndex, is_cache, open_cache
from ..cache.publish import build_index
from ..cache.shards import fingerprint, read_shard
from ..errors import CacheError, InputError
from ..manifest import Manifest, manifest_dict, write_resolved
from ..core.engines import engine_identity, pick_backend
from ..core.prompts import collect_prompts
from ..core.roles import Engines, Role, model_role, take_turns
from .stages import fit_prompt, generate_shard, pairs_shard, prompts_table, score_shard

STAGE_CHOICES = ("all", "prompts", "generate", "score")


@dataclass
class Summary:
    prompts: int
    dropped: dict
    stages: list[StageReport] = field(default_factory=list)


def parse_shard_spec(spec: str | None) -> tuple[int, int]:
    if not spec:
        return 0, 1
    try:
        index, total = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"--shard {spec!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < total:
        raise InputError(f"--shard {spec}: need 0 <= I < N")
    return index, total


def precompute(manifest: Manifest, stage: str = "all", shard_spec: str | None = None, force: bool = False) -> Summary:
    job, jobs = parse_shard_spec(shard_spec)
    # 1. Validate all inputs before the cache exists or changes.
    prompts, counts = collect_prompts(manifest.prompts)
    backend = pick_backend(manifest.engine.backend)
    roles = {"student": model_role("student", manifest.student), "teacher": model_role("teacher", manifest.chosen_teacher),
             "reference": model_role("reference", manifest.reference_model)}
    scorers = teacher_scorers(manifest, roles["teacher"])  # {stage: (scorer, role)}: one per teacher
    each = manifest.pairs.chosen_from == "each"
    writers = [role for _, role in scorers.values()] if each else [roles["teacher"]]  # who writes chosen answers
    if roles["reference"].fmt.identity != roles["student"].fmt.identity:
        raise InputError(f"the reference ({roles['reference'].model.reference}) reads text differently from the student "
                         f"({roles['student'].model.reference}): another tokenizer, chat template or end-of-turn token. "
                         "The reference's token ids are the ones the student trains on, so they must be the same")
    # the teachers beside the chosen one read prompts under their own templates too: fitted and rendered here
    others = [(stage, role) for stage, (scorer, role) in scorers.items() if role is not roles["teacher"]]
    fitted, rendered, seen = [], [], set()
    for prompt in prompts:
        kept, ids = fit_prompt(prompt, [roles["student"].fmt, roles["teacher"].fmt, *(r.fmt for _, r in others)],
                               manifest.prompts.max_prompt_tokens, manifest.prompts.long_prompts)
        if kept is None:
            counts["too_long"] += 1
        elif kept.prompt_id in seen:  # truncation can shorten a conversation into another prompt
            counts["duplicates"] += 1
        else:
            seen.add(kept.prompt_id)
            fitted.append(kept)
            rendered.append([np.asarray(x, dtype=np.int32) for x in ids])  # 4 bytes a token, not a Python int
    if not fitted:
        raise InputError(f"all {len(prompts)} prompts are longer than prompts.max_prompt_tokens="
                         f"{manifest.prompts.max_prompt_tokens}")
    shard_size = manifest.engine.shard_size
    n_shards = -(-len(fitted) // shard_size)
    mine = [k for k in range(n_shards) if k % jobs == job]
    summary = Summary(len(fitted), {k: v for k, v in counts.items() if k != "read"})

    # 2. Fingerprints: every setting that shapes a stage's rows.
    prompt_settings = {"prompts": [[p.prompt_id, p.split, p.category] for p in fitted],  # moving one to heldout counts
                       "config": _portable(manifest_dict(manifest)["prompts"]),
                       "formats": [roles[r].fmt.identity for r in ("student", "teacher")] + [r.fmt.identity for _, r in others],
                       "shard_size": shard_size,
                       "ids": _ids_digest(rendered)}  # what the templates rendered, so no rebuild can differ silently
    fps = {"prompts": fingerprint(prompt_settings)}
    settings = {"prompts": prompt_settings}
    for role in ("student", "teacher"):
        r = roles[role]
        sampling = dataclasses.asdict(getattr(manifest.generate, role))
        del sampling["samples"]  # the resolved count below: older caches, which had one count, keep their fingerprints
        settings[f"generate-{role}"] = {"prompts": fps["prompts"], **_model_settings(r, backend, manifest),
                                        "sampling": sampling, "samples_per_prompt": manifest.generate.samples(role)}
        if role == "teacher" and each:  # every teacher writes, in turn; their formats tell dSFT how to read them
            settings[f"generate-{role}"] |= {"chosen_from": "each", "chat_formats": [w.fmt.identity for w in writers],
                                             "writers": [_model_settings(w, backend, manifest) for w in writers]}
        fps[f"generate-{role}"] = fingerprint(settings[f"generate-{role}"])
    score_roles = {**{stage: role for stage, (_, role) in scorers.items()}, "score-reference": roles["reference"]}
    for name, role in score_roles.items():
        settings[name] = {"prompts": fps["prompts"], "generate-teacher": fps["generate-teacher"],
                          "generate-student": fps["generate-student"], **_model_settings(role, backend, manifest)}
        fps[name] = fingerprint(settings[name])
    pairs_settings = dataclasses.asdict(manifest.pairs)
    if manifest.pairs.chosen_from is None:
        del pairs_settings["chosen_from"]  # a single-teacher cache keeps the fingerprint it had before teachers:
    if manifest.teachers:  # the order of the pairs' teachers_* lists
        pairs_settings["teachers"] = [scorer for scorer, _ in scorers.values()]
    settings["pairs"] = {**{stage: fps[stage] for stage in fps}, **pairs_settings}
    fps["pairs"] = fingerprint(settings["pairs"])

    # 3. Build what is missing, stage by stage.
    if stage == "score":
        _require_generations(manifest.cache_dir, fps, mine)
    cache = open_cache(manifest.cache_dir, create=True)
    engines = Engines(manifest, backend)
    generate = ["prompts", "generate-student", "generate-teacher"]
    # the teacher that generated last scores first: its engine is still loaded
    score = ["prompts", *sorted(scorers, key=lambda stage: scorers[stage][1] is not writers[-1]), "score-reference", "pairs"]
    wanted = {"all": generate + score[1:], "prompts": ["prompts"], "generate": generate, "score": score}[stage]
    _say_if_rendered_differently(cache, settings["prompts"])
    all_prompts = prompts_table(fitted, [x[:2] for x in rendered], shard_size)
    chosen_scorer = manifest.chosen_teacher.name if manifest.teachers else "teacher"  # fills the pairs' teacher_* columns
    shard_prompts = lambda k: all_prompts.filter(pc.equal(all_prompts["shard"], k))
    stored_as = {id(roles["teacher"]): "teacher_prompt_ids", id(roles["reference"]): "student_prompt_ids",
                 id(roles["student"]): "student_prompt_ids"}
    writer_of = take_turns([p.prompt_id for p in fitted], writers)  # one writer unless pairs.chosen_from is each
    writer = lambda row: writer_of[row["prompt_id"]].fmt if row["role"] == "teacher" else roles["student"].fmt
    other_ids = {id(role): {p.prompt_id: x[2 + i] for p, x in zip(fitted, rendered)} for i, (_, role) in enumerate(others)}

    def prompt_ids(role: Role, k: int) -> dict:
        """{prompt id: ids} of shard k as `role` reads the prompts: stored, or rendered above (other teachers)."""
        shard = shard_prompts(k)
        if id(role) in other_ids:
            return {p: other_ids[id(role)][p] for p in shard["prompt_id"].to_pylist()}
        return dict(zip(shard["prompt_id"].to_pylist(), shard[stored_as[id(role)]].to_pylist()))

    def build(name: str, k: int) -> pa.Table:
        if name == "prompts":
            return all_prompts
        if name == "pairs":
            return pairs_shard(shard_prompts(k),
                               _shard_inputs(cache, fps, ["generate-teacher", "generate-student"], k, "generate"),
                               _shard_inputs(cache, fps, [*scorers, "score-reference"], k, "score"),
                               manifest.pairs, [scorer for scorer, _ in scorers.values()], chosen_scorer)
        if name.startswith("generate-"):
            role = name.split("-", 1)[1]
            sampling, samples = getattr(manifest.generate, role), manifest.generate.samples(role)
            if role == "student":
                return generate_shard(prompt_ids(roles["student"], k), role, roles["student"].fmt,
                                      engines.get(roles["student"]), sampling, samples)
            turns = [(w, {p: x for p, x in prompt_ids(w, k).items() if writer_of[p] is w}) for w in writers]
            return pa.concat_tables([generate_shard(own, role, w.fmt, engines.get(w), sampling, samples)
                                     for w, own in turns if own])
        generations = _shard_inputs(cache, fps, ["generate-teacher", "generate-student"], k, "generate")
        scorer, role = scorers.get(name, ("reference", roles["reference"]))
        return score_shard(prompt_ids(role, k), generations, writer, scorer, role.fmt, engines.get(role))

    try:
        for name in wanted:
            # every job writes the (identical) prompts shard: only a lone job may delete its temps
            built = build_stage(cache, name, fps[name], settings[name], 1 if name == "prompts" else n_shards,
                                lambda k, name=name: build(name, k), todo=[0] if name == "prompts" else mine,
                                force=force, remove_temps=name != "prompts" or jobs == 1,
                                desc=name, show_when_done=True, rates=True,
                                prepare=lambda folder: write_resolved(manifest, folder / "manifest.yaml"))
            summary.stages.append(built.report)
            if jobs == 1:  # a lone job indexes each stage; N jobs leave it to one `cache index` after them all
                build_index(cache)
    finally:
        engines.close()
    return summary


def teacher_scorers(manifest: Manifest, chosen: Role) -> dict[str, tuple[str, Role]]:
    """{score stage: (scores.scorer, role)} (`Manifest.teacher_scorers`), the chosen-answer teacher's role reused."""
    return {stage: (scorer, chosen if config is manifest.chosen_teacher else model_role(scorer, config))
            for stage, (scorer, config) in manifest.teacher_scorers().items()}


def _model_settings(role: Role, backend: str, manifest: Manifest) -> dict:
    return {"model": role.model.portable_name, "revision": role.model.revision, "chat_format": role.fmt.identity,
            "engine": engine_identity(backend, role.dtype, manifest.engine)}


def _ids_digest(rendered: list[list[np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for ids in rendered:
        for x in ids:
            digest.update(len(x).to_bytes(4, "little"))
            digest.update(x.tobytes())
    return digest.hexdigest()[:16]


def _say_if_rendered_differently(cache: CacheIndex, prompt_settings: dict) -> None:
    """Same prompts and templates, other ids than the cache's newest prompts stage (another
    tokenizers version, a template that reads a clock or a random value): a new fingerprint, said."""
    before = cache.active_settings("prompts")
    if "ids" in before and before["ids"] != prompt_settings["ids"] and \
            {**before, "ids": None} == json.loads(json.dumps({**prompt_settings, "ids": None})):
        tqdm.write("prompts: the chat templates render the same prompts to other token ids than the cache holds "
                   "(another tokenizer version, or a template that reads a clock or a random value); every stage "
                   "is rebuilt under new fingerprints", file=sys.stderr)


def _portable(prompts_config: dict) -> dict:
    """The prompts settings without where a JSONL file lies (the prompt ids identify its content)."""
    sources = [{**source, "jsonl": Path(source["jsonl"]).name} if source.get("jsonl") else source
               for source in prompts_config["sources"]]
    return {**prompts_config, "sources": sources}


def _require_generations(cache_dir: str, fps: dict, mine: list[int]) -> None:
    """`--stage score` reads this job's generate shards: make sure they exist before the cache changes at all."""
    command = "run: dadpo-offline precompute MANIFEST --stage generate"
    root = Path(cache_dir).expanduser().resolve()
    if not is_cache(root):
        raise CacheError(f"no generations to score in {cache_dir} — {command}")
    cache = CacheIndex(root)
    for stage in ("generate-teacher", "generate-student"):
        missing = [k for k in mine if k not in cache.registered(stage, fps[stage])]
        if missing:
            raise CacheError(f"{len(missing)} of the {len(mine)} {stage} shards to score are missing for these "
                             f"settings — {command}")


def _shard_inputs(cache: CacheIndex, fps: dict, stages: list[str], k: int, producer: str) -> pa.Table:
    """Shard k of earlier stages, concatenated; a missing one names the command that makes it."""
    tables = []
    for stage in stages:
        entry = cache.registered(stage, fps[stage]).get(k)
        if entry is None:
            raise CacheError(f"{stage} shard {k} is missing for these settings — run: "
                             f"dadpo-offline precompute MANIFEST --stage {producer}")
        tables.append(read_shard(entry.path))
    return pa.concat_tables(tables)


def format_summary(summary: Summary) -> str:
    lines = [f"prompts: {summary.prompts} kept" + (f"; dropped {summary.dropped}" if summary.dropped else "")]
    for r in summary.stages:
        rate = f", {r.tokens / r.seconds:.0f} tok/s" if r.tokens and r.seconds else ""
        lines.append(f"{r.stage:<17} {r.fingerprint}  built {r.built}, skipped {r.skipped}, rows {r.rows}, "
                     f"tokens {r.tokens}, {r.seconds:.1f} s{rate}")
    return "\n".join(lines)
