"""`dadpo-offline`: a thin click layer over the package. Errors cross it once, here.

Stdout carries data (query rows, summaries); progress bars and logs go to stderr.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import DadpoError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_MANIFEST = "manifests/demo.yaml"


def domain_errors(command):
    """Turn DadpoError into a one-line `Error: …` and exit code 1; no traceback for user mistakes."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DadpoError as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def manifest_options(command):
    command = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a manifest field, e.g. --set generate.teacher.temperature=0 (repeatable).")(command)
    return click.argument("manifest", required=False, type=click.Path(dir_okay=False))(command)


def load(manifest_path, overrides):
    from .manifest import load_manifest

    if manifest_path is None and Path(DEFAULT_MANIFEST).is_file():
        manifest_path = DEFAULT_MANIFEST
    return load_manifest(manifest_path, list(overrides))


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V")
def main():
    """Distil a large chat LLM (teacher) into a small one (student) with daDPO.

    \b
    Phase one precomputes generations and log-probs into a Parquet cache indexed by DuckDB;
    phase two trains the student with only the student in memory; eval measures the result.

    \b
    Example:
      dadpo-offline precompute manifests/demo.yaml
      dadpo-offline sql runs/demo/cache "SELECT count(*) FROM pairs"
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@main.command(context_settings=CONTEXT)
@manifest_options
@click.option("--stage", type=click.Choice(["all", "prompts", "generate", "score"]), default="all", show_default=True,
              help="Which stages to run; score needs generate's shards.")
@click.option("--shard", "shard_spec", metavar="I/N", help="Do only work shards k with k % N == I, so N jobs fill one cache.")
@click.option("--force", is_flag=True, help="Recompute this job's shards even when intact ones exist.")
@domain_errors
def precompute(manifest, overrides, stage, shard_spec, force):
    """Generate teacher and student responses and score them into the cache.

    \b
    Resumable: rerun the same command after a crash and only missing shards are built.
    Without MANIFEST, manifests/demo.yaml (or the built-in defaults) is used.

    \b
    Example:
      dadpo-offline precompute manifests/demo.yaml --stage generate --shard 0/2
    """
    from .precompute.run import format_summary, precompute as run_precompute

    m = load(manifest, overrides)
    summary = run_precompute(m, stage=stage, shard_spec=shard_spec, force=force)
    click.echo(format_summary(summary))
    click.echo(f"cache: {m.cache_dir}")


@main.command(context_settings=CONTEXT)
@manifest_options
@click.option("--dry-run", is_flag=True, help="Validate the manifest and print the plan; load no model.")
@domain_errors
def run(manifest, overrides, dry_run):
    """Run the pipeline for a manifest (default: manifests/demo.yaml); today phase one only.

    \b
    Example:
      dadpo-offline run
      dadpo-offline run manifests/demo.yaml --dry-run
    """
    from .manifest import manifest_dict
    from .precompute.run import format_summary, precompute as run_precompute
    import yaml

    m = load(manifest, overrides)
    if dry_run:
        click.echo(yaml.safe_dump({"plan": ["precompute: prompts, generate-student, generate-teacher, score-teacher, "
                                            "score-reference, pairs",
                                            "train: run separately for now: dadpo-offline train MANIFEST --stage sft|dadpo",
                                            "eval: not implemented yet"],
                                   "manifest": manifest_dict(m)}, sort_keys=False))
        return
    summary = run_precompute(m)
    click.echo(format_summary(summary))
    click.echo(f"cache: {m.cache_dir}")
    click.echo(f"next: dadpo-offline train {manifest or DEFAULT_MANIFEST} --stage dadpo  (run does not chain "
               f"training yet); inspect: dadpo-offline sql {m.cache_dir} \"SELECT * FROM pairs LIMIT 5\"", err=True)


@main.command(context_settings=CONTEXT)
@manifest_options
@click.option("--stage", type=click.Choice(["sft", "dadpo"]), default="dadpo", show_default=True,
              help="sft: fine-tune the student on teacher responses (makes the reference); dadpo: preference training.")
@click.option("--loss", type=click.Choice(["dadpo", "ddpo", "rdpo"]), help="Loss for --stage dadpo (default: train.loss).")
@click.option("--beta1", type=float, help="Weight of the reference anchor (default: train.beta1).")
@click.option("--beta2", type=float, help="Weight of the teacher anchor (default: train.beta2).")
@click.option("--max-steps", type=int, help="Stop after this many optimiser steps (default: train.max_steps).")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Folder for stage outputs (default: train.output_dir).")
@click.option("--resume/--no-resume", default=None, help="Continue from the newest checkpoint (default: train.resume).")
@domain_errors
def train(manifest, overrides, stage, loss, beta1, beta2, max_steps, output_dir, resume):
    """Train the student: dSFT, then daDPO / dDPO / rDPO from the cache.

    \b
    Only the student policy (and its optimiser) is in memory: reference and teacher log-probs are
    read from the cache. Rerun the same command after a crash to resume from the last checkpoint.
    Multi-GPU: accelerate launch --config_file manifests/accelerate_fsdp.yaml -m dadpo_offline train ...

    \b
    Example:
      dadpo-offline train manifests/demo.yaml --stage sft
      dadpo-offline train manifests/demo.yaml --stage dadpo --loss dadpo --beta1 0.1 --beta2 0.01
    """
    import json

    flags = {"loss": loss, "beta1": beta1, "beta2": beta2, "max_steps": max_steps, "resume": resume,
             "output_dir": str(Path(output_dir).resolve()) if output_dir else None}  # a flag's path is the shell's
    extra = [f"train.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    m = load(manifest, list(overrides) + extra)
    if stage == "sft":
        from .train.sft import train_sft

        result = train_sft(m)
    else:
        from .train.dpo import train_dadpo

        result = train_dadpo(m)
    last = result["history"][-1] if result["history"] else {}
    summary = {"stage": stage if stage == "sft" else m.train.loss, "output_dir": result["output_dir"],
               "steps": result["steps"], "train_loss": result["train_loss"], "resumed_from": result["resumed_from"]}
    summary.update({k: last[k] for k in ("rewards/margins", "rewards/accuracies") if k in last})
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch, one summary line, not one per GPU
        click.echo(json.dumps(summary))


@main.command(name="eval", context_settings=CONTEXT)
@manifest_options
@domain_errors
def eval_command(manifest, overrides):
    """Evaluate models: MT-Bench, AlpacaEval, lm-eval, win rate vs teacher (not implemented yet)."""
    raise click.ClickException("eval is not implemented yet")


OUTPUT_FORMATS = ["table", "csv", "json", "jsonl", "parquet"]


def output_options(command):
    command = click.option("--output", "-o", type=click.Path(dir_okay=False),
                           help="Write to this file instead of stdout (required for parquet).")(command)
    command = click.option("--format", "-f", "fmt", type=click.Choice(OUTPUT_FORMATS), default="table",
                           show_default=True, help="Output format.")(command)
    return command


@main.command(context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.argument("query")
@click.option("--param", "-p", "params", multiple=True, help="A value for a ? placeholder (repeatable, in order).")
@output_options
@domain_errors
def sql(cache_dir, query, params, fmt, output):
    """Run a read-only SQL query over the cache's views (prompts, generations, scores, pairs).

    \b
    Statements that would write (INSERT, COPY, ATTACH, ...) are refused.

    \b
    Example:
      dadpo-offline sql runs/demo/cache "SELECT avg(teacher_chosen_logp - teacher_rejected_logp) FROM pairs"
      dadpo-offline sql runs/demo/cache "SELECT * FROM prompts WHERE category = ?" -p coding -f json
    """
    from .cache.query import run_query, write_rows

    table = run_query(cache_dir, query, list(params))
    write_rows(table, fmt, output)


@main.group(context_settings=CONTEXT)
def cache():
    """Inspect and check a cache directory."""


@cache.command(context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(file_okay=False))
@output_options
@domain_errors
def status(cache_dir, fmt, output):
    """Show each stage: fingerprint, shards done of expected, rows, bytes, active or stale.

    \b
    Example:
      dadpo-offline cache status runs/demo/cache
    """
    import pyarrow as pa

    from .cache import open_cache
    from .cache.query import write_rows

    rows = open_cache(cache_dir).status()
    write_rows(pa.Table.from_pylist(rows) if rows else pa.table({"stage": pa.array([], pa.string())}), fmt, output)


@cache.command(context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(file_okay=False))
@domain_errors
def verify(cache_dir):
    """Check every registered shard's size, checksum and metadata; name each bad one.

    \b
    Exit 1 when a shard is missing or corrupted; rerunning its stage rebuilds it.

    \b
    Example:
      dadpo-offline cache verify runs/demo/cache
    """
    from .cache import open_cache

    problems = open_cache(cache_dir).verify()
    for problem in problems:
        click.echo(problem)
    if problems:
        raise click.ClickException(f"{len(problems)} bad shard(s) — rerun: dadpo-offline precompute MANIFEST")
    click.echo("all shards intact")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
